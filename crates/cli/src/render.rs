//! Drawing skill events for people: indicatif bars for progress, log lines
//! above the bars, tracing to stderr.

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use lora_skill::{Event, EventSink, Level};
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tracing_subscriber::EnvFilter;

/// Sets up tracing on stderr; `RUST_LOG` overrides the level.
pub fn init_tracing(verbose: u8) {
    let default = match verbose {
        0 => "warn",
        1 => "info",
        _ => "debug",
    };
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false)
        .try_init();
}

/// An [`EventSink`] that draws indicatif bars on stderr (hidden when stderr is not a terminal).
pub struct BarSink {
    multi: MultiProgress,
    bars: Mutex<HashMap<u64, (ProgressBar, String)>>,
    show_logs: bool,
}

impl BarSink {
    /// A new sink; `show_logs` prints info/warn lines above the bars.
    pub fn new(show_logs: bool) -> Arc<Self> {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr_with_hz(8));
        Arc::new(Self {
            multi,
            bars: Mutex::new(HashMap::new()),
            show_logs,
        })
    }

    fn style(total: Option<u64>) -> ProgressStyle {
        let t = match total {
            Some(_) => "{spinner} {prefix:.bold} [{bar:30}] {pos}/{len} {msg} (eta {eta})",
            None => "{spinner} {prefix:.bold} {pos} {msg} ({elapsed})",
        };
        ProgressStyle::with_template(t)
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> ")
    }
}

impl EventSink for BarSink {
    fn emit(&self, event: Event) {
        let Ok(mut bars) = self.bars.lock() else {
            return;
        };
        match event {
            Event::ProgressStart {
                id,
                label,
                total,
                unit,
            } => {
                let bar = match total {
                    Some(n) => self.multi.add(ProgressBar::new(n)),
                    None => self.multi.add(ProgressBar::new_spinner()),
                };
                bar.set_style(Self::style(total));
                bar.set_prefix(label);
                bar.enable_steady_tick(Duration::from_millis(250));
                bars.insert(id, (bar, unit));
            }
            Event::ProgressUpdate {
                id,
                position,
                message,
                metrics,
            } => {
                if let Some((bar, unit)) = bars.get(&id) {
                    bar.set_position(position);
                    let mut parts: Vec<String> = Vec::new();
                    if let Some(m) = message {
                        parts.push(m);
                    }
                    for (k, v) in metrics {
                        parts.push(format!("{k} {}", fmt_num(v)));
                    }
                    if !parts.is_empty() {
                        bar.set_message(parts.join(" | "));
                    } else if bar.length().is_none() {
                        bar.set_message(unit.clone());
                    }
                }
            }
            Event::ProgressFinish { id, message } => {
                if let Some((bar, _)) = bars.remove(&id) {
                    match message {
                        Some(m) => bar.finish_with_message(m),
                        None => bar.finish_and_clear(),
                    }
                }
            }
            Event::Log {
                level,
                source,
                message,
            } => {
                if self.show_logs || level == Level::Warn {
                    let tag = match level {
                        Level::Warn => "warning",
                        Level::Info => "info",
                        Level::Debug => "debug",
                    };
                    let line = if source.is_empty() {
                        format!("{tag}: {message}")
                    } else {
                        format!("{tag} [{source}]: {message}")
                    };
                    let _ = self.multi.println(line);
                }
            }
        }
    }
}

fn fmt_num(v: f64) -> String {
    if v != 0.0 && (v.abs() < 1e-3 || v.abs() >= 1e5) {
        format!("{v:.3e}")
    } else {
        format!("{v:.4}")
    }
}

/// A cancellation token that the first Ctrl-C cancels (skills then stop at
/// their next checkpoint); a second Ctrl-C exits at once with code 130.
/// Must be called inside the tokio runtime.
pub fn ctrl_c_token() -> lora_skill::CancelToken {
    let token = lora_skill::CancelToken::new();
    let t = token.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            tracing::warn!("Ctrl-C: stopping at the next safe point (press again to abort)");
            t.cancel();
            if tokio::signal::ctrl_c().await.is_ok() {
                std::process::exit(130);
            }
        }
    });
    token
}
