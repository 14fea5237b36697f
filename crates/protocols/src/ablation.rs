//! Ablation (seed 001 §9, seed 003): configs that vary one parameter, a grid
//! of several (every combination), or a seed 003 preset group, each built on
//! the base config; and, once measured, the results table (metric per value,
//! delta against the baseline, best value) and a plot of metric against value.
//!
//! A parameter is a `TrialConfig` field (`lora_rank`) or a seed 003 dotted
//! path (`optimizer.learning_rate`), which goes through the lead's
//! `TrainingConfig` overrides; presets come from `training_config::PRESETS`.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use lora_spec::contracts::orchestrator::{AblationResult, AblationRow};
use lora_spec::contracts::protocols::{AblationMeasurement, AblationPoint};
use lora_spec::experiment::trial_fields;
use lora_spec::load::{decode_value, suggest};
use lora_spec::training_config::{
    TrainingConfig, load_training_config_over, parse_preset, preset_trial_field,
};
use lora_spec::trial::TrialConfig;
use plotters::prelude::*;
use serde_json::{Map, Value};

use crate::ProtocolError;

/// A value as written in labels (`8`, `0.0002`, `q_proj+v_proj`).
pub fn value_text(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Array(a) => a.iter().map(value_text).collect::<Vec<_>>().join("+"),
        other => other.to_string(),
    }
}

/// `lora_rank=8,learning_rate=0.0002`.
pub fn label_of(values: &Map<String, Value>) -> String {
    values
        .iter()
        .map(|(k, v)| format!("{k}={}", value_text(v)))
        .collect::<Vec<_>>()
        .join(",")
}

/// Makes the micro-batch divide the (effective) batch.
fn fit_micro_batch(c: &mut TrialConfig) {
    let b = c.batch_size.max(1);
    let m = c.micro_batch_size.clamp(1, b);
    c.micro_batch_size = (1..=m).rev().find(|d| b.is_multiple_of(*d)).unwrap_or(1);
    c.gradient_accumulation = 0;
}

/// `base` with `param` set to `value`.
pub fn set_param(
    base: &TrialConfig,
    param: &str,
    value: &Value,
) -> Result<TrialConfig, ProtocolError> {
    let mut t = if param.contains('.') {
        // Seed 003 dotted path: through TrainingConfig, so its names and checks apply.
        let text = serde_json::to_string(value).unwrap_or_default();
        let tc = load_training_config_over(
            Some(&TrainingConfig::from_trial(base)),
            None,
            &[format!("{param}={text}")],
            None,
        )
        .map_err(|e| {
            let i = e.issues.into_iter().next();
            ProtocolError::invalid(
                param,
                i.as_ref()
                    .map_or_else(|| "bad override".to_string(), |i| i.message.clone()),
                i.and_then(|i| i.hint),
            )
        })?;
        let mut t = base.clone();
        let not_run = tc.apply_to(&mut t);
        if let Some(n) = not_run.first() {
            return Err(ProtocolError::Unsupported {
                field: param.into(),
                message: format!("is parsed but not trained by this build: {n}"),
                hint: Some("every point would train the same config; ablate a LoRA, optimiser or batch setting".into()),
            });
        }
        t
    } else {
        let fields = trial_fields();
        if !fields.iter().any(|f| f == param) || param == "trial_id" {
            let hint = match suggest(param, fields.iter().map(String::as_str)) {
                Some(s) => format!(
                    "did you mean `{s}`? (or a seed 003 path such as optimizer.learning_rate)"
                ),
                None => {
                    "a TrialConfig field such as lora_rank, learning_rate, lora_alpha, batch_size"
                        .into()
                }
            };
            return Err(ProtocolError::invalid(
                "param",
                format!("`{param}` is not a parameter of a trial"),
                Some(hint),
            ));
        }
        let mut v = serde_json::to_value(base)
            .map_err(|e| ProtocolError::invalid("base_config", e.to_string(), None))?;
        if let Some(obj) = v.as_object_mut() {
            obj.insert(param.to_string(), value.clone());
        }
        decode_value::<TrialConfig>(v).map_err(|i| {
            ProtocolError::invalid(
                format!("values ({param}={})", value_text(value)),
                i.message,
                i.hint,
            )
        })?
    };
    fit_micro_batch(&mut t);
    let t = t.normalized();
    if let Some(i) = t.check().into_iter().next() {
        return Err(ProtocolError::invalid(
            format!("values ({param}={})", value_text(value)),
            format!("{}: {}", i.path, i.message),
            i.hint,
        ));
    }
    Ok(t)
}

fn same_run(a: &TrialConfig, b: &TrialConfig) -> bool {
    let mut a = a.normalized();
    let mut b = b.normalized();
    a.trial_id = 0;
    b.trial_id = 0;
    a == b
}

fn finish(
    base: &TrialConfig,
    mut points: Vec<AblationPoint>,
    keys: &[String],
    include_baseline: bool,
) -> Vec<AblationPoint> {
    let mut base_n = base.clone();
    fit_micro_batch(&mut base_n);
    let base_n = base_n.normalized();
    let mut has_baseline = false;
    for p in &mut points {
        if same_run(&p.trial_config, &base_n) {
            p.baseline = true;
            has_baseline = true;
        }
    }
    if include_baseline && !has_baseline {
        let bv = serde_json::to_value(&base_n).unwrap_or(Value::Null);
        let values: Map<String, Value> = keys
            .iter()
            .map(|k| {
                (
                    k.clone(),
                    bv.get(k.as_str()).cloned().unwrap_or(Value::Null),
                )
            })
            .collect();
        points.insert(
            0,
            AblationPoint {
                trial_config: base_n,
                label: "baseline".into(),
                values,
                baseline: true,
            },
        );
    }
    for (i, p) in points.iter_mut().enumerate() {
        p.trial_config.trial_id = i as u32 + 1;
    }
    points
}

/// Seed 001's `generate_configs(base, param, values)`: one config per value.
pub fn generate_configs(
    base: &TrialConfig,
    param: &str,
    values: &[Value],
    include_baseline: bool,
) -> Result<Vec<AblationPoint>, ProtocolError> {
    if values.is_empty() {
        return Err(ProtocolError::invalid(
            "values",
            format!("no values given for `{param}`"),
            Some("for example --values 4,8,16".into()),
        ));
    }
    let mut points = Vec::new();
    for v in values {
        let t = set_param(base, param, v)?;
        if points
            .iter()
            .any(|p: &AblationPoint| same_run(&p.trial_config, &t))
        {
            continue;
        }
        let mut values = Map::new();
        values.insert(param.to_string(), v.clone());
        points.push(AblationPoint {
            trial_config: t,
            label: label_of(&values),
            values,
            baseline: false,
        });
    }
    Ok(finish(base, points, &[param.to_string()], include_baseline))
}

/// A grid: every combination (product) of the parameters' values, in the
/// order the parameters are given, the last varying fastest.
pub fn generate_grid(
    base: &TrialConfig,
    grid: &[(String, Vec<Value>)],
    include_baseline: bool,
) -> Result<Vec<AblationPoint>, ProtocolError> {
    if grid.is_empty() || grid.iter().any(|(_, v)| v.is_empty()) {
        return Err(ProtocolError::invalid(
            "grid",
            "every parameter of the grid needs at least one value",
            Some("for example {lora_rank: [8, 16], learning_rate: [1e-4, 2e-4]}".into()),
        ));
    }
    let total: usize = grid.iter().map(|(_, v)| v.len()).product();
    if total > 10_000 {
        return Err(ProtocolError::invalid(
            "grid",
            format!("{total} combinations is too many"),
            Some("ablate fewer parameters or values".into()),
        ));
    }
    let mut points = Vec::with_capacity(total);
    for idx in 0..total {
        let mut rem = idx;
        let mut choice = vec![0; grid.len()];
        for (d, (_, vals)) in grid.iter().enumerate().rev() {
            choice[d] = rem % vals.len();
            rem /= vals.len();
        }
        let mut t = base.clone();
        let mut values = Map::new();
        for (d, (param, vals)) in grid.iter().enumerate() {
            t = set_param(&t, param, &vals[choice[d]])?;
            values.insert(param.clone(), vals[choice[d]].clone());
        }
        points.push(AblationPoint {
            trial_config: t,
            label: label_of(&values),
            values,
            baseline: false,
        });
    }
    let keys: Vec<String> = grid.iter().map(|(k, _)| k.clone()).collect();
    Ok(finish(base, points, &keys, include_baseline))
}

/// A seed 003 preset (`lora_rank` for every variant, `lora_rank:r32` for one).
pub fn generate_preset(
    base: &TrialConfig,
    preset: &str,
    include_baseline: bool,
) -> Result<Vec<AblationPoint>, ProtocolError> {
    let presets =
        parse_preset(preset).map_err(|i| ProtocolError::invalid("preset", i.message, i.hint))?;
    let mut points = Vec::new();
    let mut key = String::new();
    for p in &presets {
        // The TrialConfig field when the group maps to one, else the dotted TrainingConfig path.
        let (param, value) = match preset_trial_field(&p.group) {
            Some(f) if f == "learning_rate" => (f.to_string(), serde_json::json!(p.value)),
            Some(f) => (f.to_string(), serde_json::json!(p.value.round() as u64)),
            None => (p.path.clone(), serde_json::json!(p.value)),
        };
        let t = set_param(base, &param, &value)?;
        let mut values = Map::new();
        values.insert(param.clone(), value);
        key = param;
        points.push(AblationPoint {
            trial_config: t,
            label: format!("{}:{}", p.group, p.variant),
            values,
            baseline: false,
        });
    }
    Ok(finish(base, points, &[key], include_baseline))
}

/// The results table: metric per point, delta against the baseline, best.
pub fn results_table(
    measurements: &[AblationMeasurement],
    metric: &str,
    higher_is_better: bool,
) -> AblationResult {
    let base = measurements
        .iter()
        .find(|m| m.baseline)
        .and_then(|m| m.metric);
    let rows: Vec<AblationRow> = measurements
        .iter()
        .map(|m| AblationRow {
            trial_id: m.trial_id,
            label: if m.values.is_empty() {
                format!("trial {}", m.trial_id)
            } else {
                label_of(&m.values)
            },
            metric: m.metric.filter(|v| v.is_finite()),
            delta_vs_baseline: match (m.metric, base) {
                (Some(v), Some(b)) if v.is_finite() => Some(v - b),
                _ => None,
            },
            baseline: m.baseline,
        })
        .collect();
    let best = rows
        .iter()
        .filter_map(|r| r.metric.map(|v| (v, r)))
        .min_by(|a, b| {
            if higher_is_better {
                b.0.total_cmp(&a.0)
            } else {
                a.0.total_cmp(&b.0)
            }
        })
        .map(|(_, r)| r.label.clone());
    AblationResult {
        metric: metric.to_string(),
        rows,
        best,
        plot_path: None,
    }
}

/// The table as markdown (the best row is marked).
pub fn table_markdown(t: &AblationResult) -> String {
    let mut s = format!(
        "| trial | values | {} | delta vs baseline |\n|---|---|---|---|\n",
        t.metric
    );
    for r in &t.rows {
        let best = t.best.as_deref() == Some(r.label.as_str());
        let _ = writeln!(
            s,
            "| {} | {}{}{} | {} | {} |",
            r.trial_id,
            r.label,
            if r.baseline { " (baseline)" } else { "" },
            if best { " **best**" } else { "" },
            r.metric.map_or("failed".into(), |v| format!("{v:.4}")),
            r.delta_vs_baseline
                .map_or("-".into(), |d| format!("{d:+.4}")),
        );
    }
    s
}

/// Draws the metric against the first varied parameter (one series per
/// combination of the others) into an SVG file; the baseline is a dashed line.
pub fn plot(
    measurements: &[AblationMeasurement],
    metric: &str,
    path: &Path,
) -> Result<PathBuf, ProtocolError> {
    let Some(first) = measurements
        .iter()
        .find(|m| !m.baseline && !m.values.is_empty())
    else {
        return Err(ProtocolError::invalid(
            "results",
            "no measured point names its values",
            None,
        ));
    };
    let key = first.values.keys().next().cloned().unwrap_or_default();
    let pts: Vec<&AblationMeasurement> = measurements
        .iter()
        .filter(|m| m.metric.is_some_and(f64::is_finite) && m.values.contains_key(&key))
        .collect();
    let numeric = pts.iter().all(|m| m.values[&key].is_number());
    let raw: Vec<f64> = pts.iter().filter_map(|m| m.values[&key].as_f64()).collect();
    let positive = raw.iter().all(|v| *v > 0.0);
    let (mn, mx) = raw
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |a, &v| {
            (a.0.min(v), a.1.max(v))
        });
    let log = numeric && positive && mx / mn >= 8.0;
    let mut cats: Vec<String> = Vec::new();
    let x_of = |m: &AblationMeasurement, cats: &mut Vec<String>| -> f64 {
        let v = &m.values[&key];
        if numeric {
            let x = v.as_f64().unwrap_or(0.0);
            if log { x.log10() } else { x }
        } else {
            let t = value_text(v);
            match cats.iter().position(|c| *c == t) {
                Some(i) => i as f64,
                None => {
                    cats.push(t);
                    (cats.len() - 1) as f64
                }
            }
        }
    };
    let mut series: Vec<(String, Vec<(f64, f64)>)> = Vec::new();
    for m in &pts {
        let rest: Map<String, Value> = m
            .values
            .iter()
            .filter(|(k, _)| **k != key)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let name = if rest.is_empty() {
            metric.to_string()
        } else {
            label_of(&rest)
        };
        let x = x_of(m, &mut cats);
        let y = m.metric.unwrap_or(f64::NAN);
        match series.iter_mut().find(|s| s.0 == name) {
            Some(s) => s.1.push((x, y)),
            None => series.push((name, vec![(x, y)])),
        }
    }
    for s in &mut series {
        s.1.sort_by(|a, b| a.0.total_cmp(&b.0));
    }
    let baseline = measurements
        .iter()
        .find(|m| m.baseline)
        .and_then(|m| m.metric)
        .filter(|v| v.is_finite());
    let all: Vec<(f64, f64)> = series.iter().flat_map(|s| s.1.iter().copied()).collect();
    if all.is_empty() {
        return Err(ProtocolError::invalid(
            "results",
            "no point has a metric to plot",
            None,
        ));
    }
    let (mut x0, mut x1) = all.iter().fold((f64::INFINITY, f64::NEG_INFINITY), |a, p| {
        (a.0.min(p.0), a.1.max(p.0))
    });
    let (mut y0, mut y1) = all
        .iter()
        .map(|p| p.1)
        .chain(baseline)
        .fold((f64::INFINITY, f64::NEG_INFINITY), |a, y| {
            (a.0.min(y), a.1.max(y))
        });
    let xpad = ((x1 - x0) * 0.05).max(0.5 * f64::from(u8::from(x1 == x0)));
    x0 -= xpad;
    x1 += xpad;
    let ypad = ((y1 - y0) * 0.1).max(1e-6);
    y0 -= ypad;
    y1 += ypad;
    let x_desc = if log {
        format!("log10({key})")
    } else {
        key.clone()
    };
    let mut svg = String::new();
    let mut draw = || -> Result<(), Box<dyn std::error::Error>> {
        let root = SVGBackend::with_string(&mut svg, (800, 480)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption(format!("{metric} vs {key}"), ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(64)
            .build_cartesian_2d(x0..x1, y0..y1)?;
        let cats_ref = &cats;
        let fmt = move |x: &f64| -> String {
            if numeric {
                format!("{x:.3}")
            } else {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 {
                    cats_ref.get(i as usize).cloned().unwrap_or_default()
                } else {
                    String::new()
                }
            }
        };
        chart
            .configure_mesh()
            .x_desc(x_desc.as_str())
            .y_desc(metric)
            .x_label_formatter(&fmt)
            .light_line_style(WHITE.mix(0.0))
            .draw()?;
        for (i, (name, pts)) in series.iter().enumerate() {
            let color = Palette99::pick(i).to_rgba();
            chart
                .draw_series(LineSeries::new(pts.iter().copied(), color.stroke_width(2)))?
                .label(name.clone())
                .legend(move |(x, y)| {
                    PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
                });
            chart.draw_series(pts.iter().map(|&p| Circle::new(p, 4, color.filled())))?;
        }
        if let Some(b) = baseline {
            chart
                .draw_series(DashedLineSeries::new(
                    vec![(x0, b), (x1, b)],
                    6,
                    4,
                    BLACK.mix(0.6).stroke_width(1),
                ))?
                .label("baseline")
                .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 18, y)], BLACK.mix(0.6)));
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
        root.present()?;
        Ok(())
    };
    draw().map_err(|e| ProtocolError::Plot {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    lora_skill::fs::write_atomic(path, svg.as_bytes()).map_err(|e| ProtocolError::io(path, e))?;
    Ok(path.to_path_buf())
}

/// A file name from a label.
pub fn file_stem(index: usize, label: &str) -> String {
    let clean: String = label
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || "._-=".contains(c) {
                c
            } else {
                '_'
            }
        })
        .collect();
    format!("{:02}_{clean}", index + 1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn seed_001_generate_configs_varies_one_parameter() {
        let base = TrialConfig::default();
        let vals: Vec<Value> = [4, 8, 16, 32, 64].iter().map(|v| json!(v)).collect();
        let pts = generate_configs(&base, "lora_rank", &vals, true).unwrap();
        // 16 is the base's rank: that point is the baseline, not an extra one.
        assert_eq!(pts.len(), 5);
        assert_eq!(pts.iter().filter(|p| p.baseline).count(), 1);
        assert_eq!(pts[2].label, "lora_rank=16");
        assert!(pts[2].baseline);
        for (p, r) in pts.iter().zip([4, 8, 16, 32, 64]) {
            assert_eq!(p.trial_config.lora_rank, r);
            assert_eq!(p.trial_config.learning_rate, base.learning_rate);
            assert_eq!(p.trial_config.lora_alpha, base.lora_alpha);
        }
        assert_eq!(
            pts.iter()
                .map(|p| p.trial_config.trial_id)
                .collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        // Without the base value, a baseline point is added first.
        let pts = generate_configs(&base, "lora_rank", &[json!(8), json!(32)], true).unwrap();
        assert_eq!(pts.len(), 3);
        assert_eq!(pts[0].label, "baseline");
        assert_eq!(pts[0].values["lora_rank"], json!(16));
    }

    #[test]
    fn dotted_paths_go_through_training_config_and_bad_input_is_named() {
        let base = TrialConfig::default();
        let pts =
            generate_configs(&base, "optimizer.learning_rate", &[json!(1e-4)], false).unwrap();
        assert_eq!(pts.len(), 1);
        assert_eq!(pts[0].trial_config.learning_rate, 1e-4);
        let e = generate_configs(&base, "lora_rnk", &[json!(8)], false).unwrap_err();
        assert!(format!("{e:?}").contains("lora_rank"), "{e:?}");
        let e = generate_configs(&base, "lora_rank", &[json!("big")], false).unwrap_err();
        assert!(e.to_string().contains("lora_rank=big"), "{e}");
        let e = generate_configs(&base, "lora_dropout", &[json!(1.5)], false).unwrap_err();
        assert!(e.to_string().contains("lora_dropout"), "{e}");
        // GRPO is parsed but not trained: refused rather than training identical configs.
        let e = generate_configs(&base, "grpo.beta", &[json!(0.02)], false).unwrap_err();
        assert!(matches!(e, ProtocolError::Unsupported { .. }), "{e:?}");
    }

    #[test]
    fn grids_are_products_and_presets_come_from_seed_003() {
        let base = TrialConfig::default();
        let grid = vec![
            ("lora_rank".to_string(), vec![json!(8), json!(32)]),
            (
                "learning_rate".to_string(),
                vec![json!(1e-4), json!(2e-4), json!(5e-4)],
            ),
        ];
        let pts = generate_grid(&base, &grid, true).unwrap();
        assert_eq!(pts.len(), 7); // baseline + 2 x 3
        assert_eq!(pts[1].label, "lora_rank=8,learning_rate=0.0001");
        assert_eq!(pts[6].trial_config.lora_rank, 32);
        assert_eq!(pts[6].trial_config.learning_rate, 5e-4);
        let pts = generate_preset(&base, "lora_rank", false).unwrap();
        assert_eq!(
            pts.iter()
                .map(|p| p.trial_config.lora_rank)
                .collect::<Vec<_>>(),
            vec![4, 8, 16, 32, 64]
        );
        assert_eq!(pts[3].label, "lora_rank:r32");
        let pts = generate_preset(&base, "batch_size:bs32", true).unwrap();
        assert_eq!(pts.len(), 2); // the preset point and the baseline
        let b = &pts[1].trial_config;
        assert_eq!(b.batch_size, 32);
        assert_eq!(b.batch_size % b.micro_batch_size, 0);
        assert!(generate_preset(&base, "lora_rnk", false).is_err());
    }

    #[test]
    fn table_and_plot() {
        let m = |id, r: u64, v: Option<f64>, baseline| AblationMeasurement {
            trial_id: id,
            values: [("lora_rank".to_string(), json!(r))].into_iter().collect(),
            baseline,
            metric: v,
        };
        let ms = vec![
            m(1, 16, Some(1.0), true),
            m(2, 4, Some(1.2), false),
            m(3, 64, Some(0.9), false),
            m(4, 8, None, false),
        ];
        let t = results_table(&ms, "eval_loss", false);
        assert_eq!(t.best.as_deref(), Some("lora_rank=64"));
        assert!((t.rows[1].delta_vs_baseline.unwrap() - 0.2).abs() < 1e-12);
        assert_eq!(t.rows[3].metric, None);
        let md = table_markdown(&t);
        assert!(
            md.contains("lora_rank=64 **best**") && md.contains("+0.2000") && md.contains("failed"),
            "{md}"
        );
        let dir = tempfile::tempdir().unwrap();
        let p = plot(&ms, "eval_loss", &dir.path().join("a.svg")).unwrap();
        let svg = std::fs::read_to_string(p).unwrap();
        assert!(
            svg.starts_with("<svg") && svg.contains("log10(lora_rank)") && svg.contains("baseline")
        );
        let hib = results_table(&ms, "accuracy", true);
        assert_eq!(hib.best.as_deref(), Some("lora_rank=4"));
    }
}
