//! The HPO benchmark (docs/BENCHMARKS.md, "HPO"): every strategy on the
//! `lora-surrogate-v1` tasks, side by side with Optuna's TPESampler and
//! RandomSampler run on the same tasks and noise by
//! `crates/hpo/bench/optuna_anchor.py` in the same invocation.
//!
//! ```text
//! cargo run --release -p lora-hpo --example hpo_bench -- [--tasks 16] [--seeds 8]
//!     [--no-optuna] [--no-asha] [--tune-startup] [--asha-target 0.05] [--asha-hours 80]
//! ```
//!
//! Reports the median (and IQR) noise-free regret of the recommended config
//! after 10, 20 and 40 trials, one-sided paired Wilcoxon signed-rank and
//! Mann-Whitney U p-values against random search and against Optuna, and for
//! ASHA the device-hours needed to reach a target regret against full-fidelity search.
#![allow(clippy::print_stdout, clippy::print_stderr)] // A benchmark binary prints its report.

use std::path::PathBuf;
use std::process::Command;
use std::time::Instant;

use lora_hpo::surrogate::{Hp, RunSettings, Task, bench_space, noise, run_budgeted, run_full};
use lora_spec::contracts::hpo::BanditPolicy;
use lora_spec::contracts::hpo::{HPOInput, HalvingSettings, Strategy, TpeSettings, TrialRecord};
use statrs::distribution::{ContinuousCDF, Normal};

const KS: [usize; 3] = [10, 20, 40];
const STEPS: u64 = 27;

struct Args {
    tasks: u64,
    seeds: u64,
    task_offset: u64,
    optuna: bool,
    tune_startup: bool,
    asha: bool,
    asha_target: f64,
    asha_hours: f64,
    out: PathBuf,
}

fn args() -> Args {
    let mut a = Args {
        tasks: 16,
        seeds: 8,
        task_offset: 0,
        optuna: true,
        tune_startup: false,
        asha: true,
        asha_target: 0.05,
        asha_hours: 80.0,
        out: std::env::temp_dir().join("lora-hpo-bench"),
    };
    let v: Vec<String> = std::env::args().skip(1).collect();
    let mut i = 0;
    let num = |i: usize| -> f64 {
        v.get(i + 1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("{} needs a number", v[i]))
    };
    while i < v.len() {
        match v[i].as_str() {
            "--tasks" => a.tasks = num(i) as u64,
            "--seeds" => a.seeds = num(i) as u64,
            "--task-offset" => a.task_offset = num(i) as u64,
            "--asha-target" => a.asha_target = num(i),
            "--asha-hours" => a.asha_hours = num(i),
            "--out" => a.out = PathBuf::from(&v[i + 1]),
            "--no-optuna" => {
                a.optuna = false;
                i -= 1;
            }
            "--no-asha" => {
                a.asha = false;
                i -= 1;
            }
            "--tune-startup" => {
                a.tune_startup = true;
                i -= 1;
            }
            other => panic!("unknown argument {other}"),
        }
        i += 2;
    }
    a
}

fn settings(strategy: Strategy, f: impl FnOnce(&mut HPOInput)) -> RunSettings {
    let mut input = HPOInput {
        strategy,
        search_space: bench_space(),
        halving: HalvingSettings {
            max_resource: STEPS,
            ..HalvingSettings::default()
        },
        ..HPOInput::default()
    };
    f(&mut input);
    RunSettings {
        input,
        steps: STEPS,
    }
}

/// Runs `f` over every (task, seed) on two threads; results in (task, seed) order.
fn par<T: Send>(jobs: &[(u64, u64)], f: impl Fn(u64, u64) -> T + Sync) -> Vec<T> {
    let half = jobs.len().div_ceil(2);
    std::thread::scope(|s| {
        let (a, b) = jobs.split_at(half);
        let fa = &f;
        let ha = s.spawn(move || a.iter().map(|&(t, sd)| fa(t, sd)).collect::<Vec<T>>());
        let mut rb: Vec<T> = b.iter().map(|&(t, sd)| f(t, sd)).collect();
        let mut ra = ha.join().expect("worker thread");
        ra.append(&mut rb);
        ra
    })
}

fn quantile(v: &[f64], q: f64) -> f64 {
    let mut s: Vec<f64> = v.to_vec();
    s.sort_by(f64::total_cmp);
    if s.is_empty() {
        return f64::NAN;
    }
    let pos = q * (s.len() - 1) as f64;
    let (lo, hi) = (pos.floor() as usize, pos.ceil() as usize);
    if lo == hi || !s[hi].is_finite() {
        return if pos - (lo as f64) < 0.5 {
            s[lo]
        } else {
            s[hi]
        };
    }
    s[lo] + (s[hi] - s[lo]) * (pos - lo as f64)
}

/// Average ranks (1-based) with ties, and the tie correction sum of t^3 - t.
fn ranks(v: &[f64]) -> (Vec<f64>, f64) {
    let mut idx: Vec<usize> = (0..v.len()).collect();
    idx.sort_by(|&a, &b| v[a].total_cmp(&v[b]));
    let mut r = vec![0.0; v.len()];
    let mut ties = 0.0;
    let mut i = 0;
    while i < idx.len() {
        let mut j = i;
        while j + 1 < idx.len() && v[idx[j + 1]] == v[idx[i]] {
            j += 1;
        }
        let avg = (i + j) as f64 / 2.0 + 1.0;
        for &k in &idx[i..=j] {
            r[k] = avg;
        }
        let t = (j - i + 1) as f64;
        ties += t * t * t - t;
        i = j + 1;
    }
    (r, ties)
}

fn phi(z: f64) -> f64 {
    Normal::new(0.0, 1.0).map(|n| n.cdf(z)).unwrap_or(f64::NAN)
}

/// One-sided p-value that `a` is lower than `b` (paired Wilcoxon signed-rank, normal approximation).
fn wilcoxon_less(a: &[f64], b: &[f64]) -> f64 {
    let d: Vec<f64> = a
        .iter()
        .zip(b)
        .map(|(x, y)| x - y)
        .filter(|d| d.abs() > 1e-15)
        .collect();
    let n = d.len() as f64;
    if d.is_empty() {
        return 1.0;
    }
    let abs: Vec<f64> = d.iter().map(|x| x.abs()).collect();
    let (r, ties) = ranks(&abs);
    let w_plus: f64 = d
        .iter()
        .zip(&r)
        .filter(|(x, _)| **x > 0.0)
        .map(|(_, r)| r)
        .sum();
    let mean = n * (n + 1.0) / 4.0;
    let var = n * (n + 1.0) * (2.0 * n + 1.0) / 24.0 - ties / 48.0;
    phi((w_plus - mean) / var.sqrt())
}

/// One-sided p-value that `a` is stochastically lower than `b` (Mann-Whitney U).
fn mann_whitney_less(a: &[f64], b: &[f64]) -> f64 {
    let (na, nb) = (a.len() as f64, b.len() as f64);
    let all: Vec<f64> = a.iter().chain(b).copied().collect();
    let (r, ties) = ranks(&all);
    let ra: f64 = r[..a.len()].iter().sum();
    let u = ra - na * (na + 1.0) / 2.0;
    let n = na + nb;
    let var = na * nb / 12.0 * ((n + 1.0) - ties / (n * (n - 1.0)));
    phi((u - na * nb / 2.0) / var.sqrt())
}

fn fmt_p(p: f64) -> String {
    if p < 1e-4 {
        format!("{p:.1e}")
    } else {
        format!("{p:.4}")
    }
}

struct Result {
    name: String,
    /// runs x K
    regrets: Vec<[f64; 3]>,
    us_per_suggest: f64,
}

fn at_ks(r: &[f64]) -> [f64; 3] {
    KS.map(|k| r.get(k - 1).or(r.last()).copied().unwrap_or(f64::NAN))
}

/// Microseconds of one `suggest` call with a history of `n` completed trials (mean of 50 calls).
fn suggest_latency_us(s: &RunSettings, n: usize) -> f64 {
    let task = Task::new(0);
    let mut input = s.input.clone();
    let mut maker = settings(Strategy::Random, |_| {}).input;
    maker.trials_remaining = n as u32 + 1;
    let mut history = Vec::new();
    for k in 0..n {
        maker.trial_history = history.clone();
        let out = lora_hpo::suggest(&maker).expect("suggest");
        let Some(sg) = out.suggestions.into_iter().next() else {
            break;
        };
        let h = Hp::of(&sg.trial_config);
        history.push(TrialRecord {
            config: sg.trial_config,
            objective: Some(task.loss(&h, 1.0) + noise(0, 0, k as u64, STEPS, 0.01)),
            status: "completed".into(),
            gpu_hours: task.cost(&h),
            ..TrialRecord::default()
        });
    }
    input.trial_history = history;
    input.trials_remaining = 1;
    let t0 = Instant::now();
    for seed in 0..50 {
        input.seed = Some(seed);
        std::hint::black_box(lora_hpo::suggest(&input).expect("suggest"));
    }
    t0.elapsed().as_secs_f64() * 1e6 / 50.0
}

fn golden(path: &std::path::Path, tasks: &[u64]) -> std::io::Result<()> {
    let space = bench_space();
    let mut points = Vec::new();
    for i in 0..200u64 {
        let task = tasks[(i as usize) % tasks.len()];
        let u = |k: u64| lora_hpo::surrogate::unit(i * 977 + k + 12345);
        let h = Hp {
            lr: 10f64.powf(-6.0 + 4.0 * u(0)),
            rank: [8.0, 16.0, 32.0, 64.0][(u(1) * 4.0) as usize % 4],
            ratio: 0.5 + 3.5 * u(2),
            dropout: 0.3 * u(3),
            batch: [4.0, 8.0, 16.0, 32.0, 64.0][(u(4) * 5.0) as usize % 5],
            warmup: 0.2 * u(5),
            targets: (u(6) * 3.0) as usize % 3,
        };
        let frac = (1 + i % 27) as f64 / 27.0;
        points.push(serde_json::json!({
            "task": task, "seed": i % 5, "trial": i, "step": i % 28, "frac": frac,
            "hp": {"lr": h.lr, "rank": h.rank, "ratio": h.ratio, "dropout": h.dropout,
                   "batch": h.batch, "warmup": h.warmup, "targets": h.targets},
            "loss": Task::new(task).loss(&h, frac),
            "noise": noise(task, i % 5, i, i % 28, 1.0),
        }));
    }
    let optimum: serde_json::Map<String, serde_json::Value> = tasks
        .iter()
        .map(|&t| {
            (
                t.to_string(),
                serde_json::json!(Task::new(t).optimum(&space)),
            )
        })
        .collect();
    let doc = serde_json::json!({"points": points, "optimum": optimum});
    std::fs::write(
        path,
        serde_json::to_vec(&doc).map_err(std::io::Error::other)?,
    )
}

fn main() {
    let a = args();
    std::fs::create_dir_all(&a.out).expect("create the output folder");
    let tasks: Vec<u64> = (a.task_offset..a.task_offset + a.tasks).collect();
    let jobs: Vec<(u64, u64)> = tasks
        .iter()
        .flat_map(|&t| (0..a.seeds).map(move |s| (t, s)))
        .collect();
    let kmax = *KS.last().unwrap_or(&40);
    println!(
        "lora-surrogate-v1: {} tasks x {} seeds = {} paired runs per strategy, {} trials each; tasks {}..{}",
        a.tasks,
        a.seeds,
        jobs.len(),
        kmax,
        a.task_offset,
        a.task_offset + a.tasks
    );

    if a.tune_startup {
        println!("\n## auto: startup trials N (tuning tasks, not the reported ones)\n");
        println!("| N | median regret @10 | @20 | @40 |\n|---|---|---|---|");
        for n in [3u32, 5, 8, 10, 15] {
            let s = settings(Strategy::Auto, |i| i.n_startup_trials = Some(n));
            let r: Vec<[f64; 3]> = par(&jobs, |t, sd| {
                at_ks(&run_full(t, sd, kmax, &s).expect("run"))
            });
            let med: Vec<String> = (0..3)
                .map(|k| {
                    format!(
                        "{:.4}",
                        quantile(&r.iter().map(|x| x[k]).collect::<Vec<_>>(), 0.5)
                    )
                })
                .collect();
            println!("| {n} | {} |", med.join(" | "));
        }
        return;
    }

    let strategies: Vec<(&str, RunSettings)> = vec![
        ("random (LHS start)", settings(Strategy::Random, |_| {})),
        (
            "auto (TPE after N=clamp(T/5,3,8)=8)",
            settings(Strategy::Auto, |_| {}),
        ),
        (
            "bayesian (TPE after 3)",
            settings(Strategy::Bayesian, |_| {}),
        ),
        (
            "TPE, Optuna defaults (10 startup)",
            settings(Strategy::Bayesian, |i| i.n_startup_trials = Some(10)),
        ),
        (
            "TPE multivariate (auto)",
            settings(Strategy::Auto, |i| {
                i.tpe = TpeSettings {
                    multivariate: true,
                    ..TpeSettings::default()
                }
            }),
        ),
        (
            "bandit epsilon-greedy 80/20",
            settings(Strategy::Bandit, |_| {}),
        ),
        (
            "bandit UCB1 over ranks",
            settings(Strategy::Bandit, |i| i.bandit_policy = BanditPolicy::Ucb),
        ),
    ];
    let mut results: Vec<Result> = Vec::new();
    for (name, s) in &strategies {
        let r: Vec<[f64; 3]> = par(&jobs, |t, sd| {
            at_ks(&run_full(t, sd, kmax, s).expect("run"))
        });
        results.push(Result {
            name: name.to_string(),
            regrets: r,
            us_per_suggest: suggest_latency_us(s, kmax - 1),
        });
    }

    if a.optuna {
        let py = std::env::var("LORA_TRAINER_PYTHON").unwrap_or_else(|_| "python3".into());
        let script = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("bench/optuna_anchor.py");
        let gold = a.out.join("golden.json");
        let out = a.out.join("optuna.json");
        golden(&gold, &tasks).expect("write golden points");
        let t0 = Instant::now();
        let status = Command::new(&py)
            .arg(&script)
            .args([
                "--golden",
                &gold.display().to_string(),
                "--out",
                &out.display().to_string(),
            ])
            .args([
                "--tasks",
                &a.tasks.to_string(),
                "--seeds",
                &a.seeds.to_string(),
            ])
            .args([
                "--task-offset",
                &a.task_offset.to_string(),
                "--trials",
                &kmax.to_string(),
            ])
            .status();
        match status {
            Ok(s) if s.success() => {
                let doc: serde_json::Value =
                    serde_json::from_slice(&std::fs::read(&out).expect("read optuna.json"))
                        .expect("parse optuna.json");
                println!(
                    "Optuna {} ran in {:.0} s; its surrogate matches Rust on {} golden points (max |diff| {:.1e})",
                    doc["optuna_version"].as_str().unwrap_or("?"),
                    t0.elapsed().as_secs_f64(),
                    doc["golden_points"],
                    doc["golden_max_abs_diff"].as_f64().unwrap_or(f64::NAN)
                );
                for (key, label) in [
                    ("optuna_tpe", "Optuna TPESampler (defaults)"),
                    ("optuna_random", "Optuna RandomSampler"),
                ] {
                    let s = &doc["samplers"][key];
                    let mut regrets = Vec::new();
                    for run in s["runs"].as_array().into_iter().flatten() {
                        let r: Vec<f64> = run["regrets"]
                            .as_array()
                            .into_iter()
                            .flatten()
                            .filter_map(|v| v.as_f64())
                            .collect();
                        regrets.push(at_ks(&r));
                    }
                    results.push(Result {
                        name: label.into(),
                        regrets,
                        us_per_suggest: s["ms_per_trial"].as_f64().unwrap_or(f64::NAN) * 1e3,
                    });
                }
            }
            other => eprintln!(
                "the Optuna anchor did not run ({other:?}); install it with `$LORA_TRAINER_PYTHON -m pip install optuna`"
            ),
        }
    }

    let col = |r: &Result, k: usize| r.regrets.iter().map(|x| x[k]).collect::<Vec<f64>>();
    println!("\n## Median regret (IQR) of the recommended config; lower is better\n");
    println!(
        "| strategy | @10 | @20 | @40 | wins vs random @40 | Wilcoxon p (< random) @10 / @20 / @40 | Mann-Whitney p @40 | time per suggestion (39 trials in history) |"
    );
    println!("|---|---|---|---|---|---|---|---|");
    for r in &results {
        let cells: Vec<String> = (0..3)
            .map(|k| {
                let c = col(r, k);
                format!(
                    "{:.4} ({:.4}-{:.4})",
                    quantile(&c, 0.5),
                    quantile(&c, 0.25),
                    quantile(&c, 0.75)
                )
            })
            .collect();
        let base = &results[0];
        let wins = col(r, 2)
            .iter()
            .zip(col(base, 2))
            .filter(|(x, y)| **x < *y)
            .count();
        let ps: Vec<String> = (0..3)
            .map(|k| fmt_p(wilcoxon_less(&col(r, k), &col(base, k))))
            .collect();
        println!(
            "| {} | {} | {}/{} | {} | {} | {:.0} µs |",
            r.name,
            cells.join(" | "),
            wins,
            r.regrets.len(),
            ps.join(" / "),
            fmt_p(mann_whitney_less(&col(r, 2), &col(base, 2))),
            r.us_per_suggest
        );
    }
    if let Some(opt) = results.iter().find(|r| r.name.starts_with("Optuna TPE")) {
        println!(
            "\n## Ours against Optuna's TPESampler (paired runs: same task, seed and noise)\n"
        );
        println!(
            "| strategy | median ratio ours/Optuna @10 / @20 / @40 | p (ours worse) @10 / @20 / @40 | p (ours better) @10 / @20 / @40 |"
        );
        println!("|---|---|---|---|");
        for r in results.iter().filter(|r| !r.name.starts_with("Optuna")) {
            let ratio: Vec<String> = (0..3)
                .map(|k| {
                    format!(
                        "{:.2}",
                        quantile(&col(r, k), 0.5) / quantile(&col(opt, k), 0.5)
                    )
                })
                .collect();
            let worse: Vec<String> = (0..3)
                .map(|k| fmt_p(wilcoxon_less(&col(opt, k), &col(r, k))))
                .collect();
            let better: Vec<String> = (0..3)
                .map(|k| fmt_p(wilcoxon_less(&col(r, k), &col(opt, k))))
                .collect();
            println!(
                "| {} | {} | {} | {} |",
                r.name,
                ratio.join(" / "),
                worse.join(" / "),
                better.join(" / ")
            );
        }
    }

    // ASHA: device-hours to reach the target regret, one worker, against full-fidelity search.
    if !a.asha {
        return;
    }
    println!(
        "\n## ASHA (eta 3, rungs at 3/9/27 of 27 steps) vs full fidelity: device-hours to regret <= {} (cap {} h)\n",
        a.asha_target, a.asha_hours
    );
    println!(
        "| search | median hours to target | runs reaching it | trials started / completed (median) | median hours ratio vs full |"
    );
    println!("|---|---|---|---|---|");
    let variants: Vec<(&str, RunSettings)> = vec![
        ("random, full fidelity", settings(Strategy::Random, |_| {})),
        ("random + ASHA", settings(Strategy::Halving, |_| {})),
        (
            "TPE (auto), full fidelity",
            settings(Strategy::Auto, |_| {}),
        ),
        (
            "TPE + ASHA",
            settings(Strategy::Halving, |i| {
                i.halving.sampler = Strategy::Bayesian
            }),
        ),
    ];
    let mut full_hours: Vec<f64> = Vec::new();
    for (vi, (name, s)) in variants.iter().enumerate() {
        let runs = par(&jobs, |t, sd| {
            run_budgeted(t, sd, a.asha_hours, s).expect("run")
        });
        let hours: Vec<f64> = runs
            .iter()
            .map(|r| r.hours_to(a.asha_target).unwrap_or(f64::INFINITY))
            .collect();
        let reached = hours.iter().filter(|h| h.is_finite()).count();
        let med = quantile(&hours, 0.5);
        let started = quantile(
            &runs.iter().map(|r| r.started as f64).collect::<Vec<_>>(),
            0.5,
        );
        let completed = quantile(
            &runs.iter().map(|r| r.completed as f64).collect::<Vec<_>>(),
            0.5,
        );
        let ratio = if vi % 2 == 0 {
            full_hours = hours.clone();
            "1.00x (reference)".to_string()
        } else {
            // Paired: each run against the full-fidelity run of the same task and seed;
            // a run that never reached the target counts as the cap.
            let r: Vec<f64> = hours
                .iter()
                .zip(&full_hours)
                .map(|(a_, f)| a_.min(a.asha_hours) / f.min(a.asha_hours))
                .collect();
            let fm = quantile(&full_hours, 0.5);
            format!(
                "ratio of medians {}; paired median {:.2}x; Wilcoxon p (ASHA faster) {}",
                if fm.is_finite() && med.is_finite() {
                    format!("{:.2}x", med / fm)
                } else {
                    "undefined (a median is over the cap)".into()
                },
                quantile(&r, 0.5),
                fmt_p(wilcoxon_less(
                    &hours
                        .iter()
                        .map(|h| h.min(a.asha_hours))
                        .collect::<Vec<_>>(),
                    &full_hours
                        .iter()
                        .map(|h| h.min(a.asha_hours))
                        .collect::<Vec<_>>()
                ))
            )
        };
        println!(
            "| {name} | {} | {reached}/{} | {started:.0} / {completed:.0} | {ratio} |",
            if med.is_finite() {
                format!("{med:.2}")
            } else {
                "> cap".into()
            },
            runs.len(),
        );
    }
}
