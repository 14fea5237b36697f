//! What the user reads at the end: the state as JSON, a markdown and an HTML
//! report with the trial table, and SVG plots (loss curves, the metric per
//! trial, the ablation's metric against the varied value) drawn with plotters.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use lora_skill::SkillError;
use lora_spec::contracts::orchestrator::{ExperimentState, TrialRole};
use lora_spec::experiment::ExperimentSpec;
use plotters::prelude::*;

use crate::data;
use crate::error::OrchestratorError;
use crate::runner::{describe_config, fmt_hours, fmt_metric, protocol_name};

/// One named line of a plot.
type Series = (String, Vec<(f64, f64)>);

/// Writes `state.json`, `report.md`, `report.html` and `plots/*.svg` into
/// `dir`; returns the paths written.
pub fn write_all(
    dir: &Path,
    spec: &ExperimentSpec,
    state: &mut ExperimentState,
    log: &[String],
) -> Result<Vec<String>, SkillError> {
    let mut written: Vec<PathBuf> = Vec::new();
    let plots = dir.join("plots");
    // Loss curves of every trial that left a metrics.jsonl.
    let mut curves: Vec<Series> = Vec::new();
    for t in &state.trial_history {
        if let Some(od) = &t.output_dir {
            let (train, _) = data::read_curves(Path::new(od));
            if !train.is_empty() {
                curves.push((
                    format!("trial {}", t.trial_id),
                    train.iter().map(|p| (p.step, p.loss)).collect(),
                ));
            }
        }
    }
    let mut images: Vec<(String, String)> = Vec::new();
    if !curves.is_empty() {
        let p = plots.join("loss_curves.svg");
        line_plot(&p, "Training loss", "step", "loss", &curves, false)?;
        images.push((
            "Training loss per trial".into(),
            "plots/loss_curves.svg".into(),
        ));
        written.push(p);
    }
    let by_trial: Vec<(f64, f64)> = state
        .trial_history
        .iter()
        .filter_map(|t| t.record.objective.map(|v| (f64::from(t.trial_id), v)))
        .collect();
    if !by_trial.is_empty() {
        let p = plots.join("metric_by_trial.svg");
        line_plot(
            &p,
            &format!("{} by trial", spec.stop_metric),
            "trial",
            &spec.stop_metric,
            &[(spec.stop_metric.clone(), by_trial)],
            true,
        )?;
        images.push((
            format!("{} by trial", spec.stop_metric),
            "plots/metric_by_trial.svg".into(),
        ));
        written.push(p);
    }
    if let Some(ab) = state.ablation.as_mut() {
        let numeric: Vec<(f64, f64)> = ab
            .rows
            .iter()
            .filter_map(|r| {
                let v = r.label.rsplit('=').next()?.parse::<f64>().ok()?;
                Some((v, r.metric?))
            })
            .collect();
        let single_param = ab.rows.iter().all(|r| !r.label.contains(','));
        let p = plots.join("ablation.svg");
        if single_param
            && numeric.len() == ab.rows.iter().filter(|r| r.metric.is_some()).count()
            && !numeric.is_empty()
        {
            let mut pts = numeric;
            pts.sort_by(|a, b| a.0.total_cmp(&b.0));
            let param = ab.rows[0]
                .label
                .split('=')
                .next()
                .unwrap_or("value")
                .to_string();
            line_plot(
                &p,
                &format!("Ablation: {} against {param}", ab.metric),
                &param,
                &ab.metric,
                &[(ab.metric.clone(), pts)],
                true,
            )?;
        } else {
            // Categorical or grid: the metric per point, in plan order.
            let pts: Vec<(f64, f64)> = ab
                .rows
                .iter()
                .enumerate()
                .filter_map(|(i, r)| Some((i as f64 + 1.0, r.metric?)))
                .collect();
            line_plot(
                &p,
                &format!("Ablation: {} per point", ab.metric),
                "point (see table)",
                &ab.metric,
                &[(ab.metric.clone(), pts)],
                true,
            )?;
        }
        ab.plot_path = Some(p.display().to_string());
        images.push(("Ablation".into(), "plots/ablation.svg".into()));
        written.push(p);
    }
    let state_path = dir.join("state.json");
    let md_path = dir.join("report.md");
    let html_path = dir.join("report.html");
    state.reports = written
        .iter()
        .chain([&state_path, &md_path, &html_path])
        .map(|p| p.display().to_string())
        .collect();
    let md = markdown(spec, state, &images, log);
    lora_skill::fs::write_atomic(&md_path, md.as_bytes())
        .map_err(|e| OrchestratorError::io(&md_path, e))?;
    let html = html(spec, state, &images);
    lora_skill::fs::write_atomic(&html_path, html.as_bytes())
        .map_err(|e| OrchestratorError::io(&html_path, e))?;
    lora_skill::fs::write_json_atomic(&state_path, &*state)
        .map_err(|e| OrchestratorError::io(&state_path, e))?;
    Ok(state.reports.clone())
}

fn bounds(series: &[Series]) -> (f64, f64, f64, f64) {
    let pts = series.iter().flat_map(|s| s.1.iter());
    let (mut x0, mut x1, mut y0, mut y1) = (f64::MAX, f64::MIN, f64::MAX, f64::MIN);
    for (x, y) in pts {
        x0 = x0.min(*x);
        x1 = x1.max(*x);
        y0 = y0.min(*y);
        y1 = y1.max(*y);
    }
    if x0 > x1 {
        return (0.0, 1.0, 0.0, 1.0);
    }
    if (x1 - x0).abs() < 1e-12 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let pad = ((y1 - y0).abs() * 0.08).max(1e-6);
    (x0, x1, y0 - pad, y1 + pad)
}

/// Draws `series` as lines (with points when `points`) into an SVG file.
pub fn line_plot(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    points: bool,
) -> Result<(), SkillError> {
    let mut svg = String::new();
    draw(&mut svg, title, x_label, y_label, series, points)
        .map_err(|e| SkillError::backend(format!("could not draw {}: {e}", path.display())))?;
    lora_skill::fs::write_atomic(path, svg.as_bytes())
        .map_err(|e| OrchestratorError::io(path, e).into())
}

fn draw(
    svg: &mut String,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    points: bool,
) -> Result<(), Box<dyn std::error::Error>> {
    let (x0, x1, y0, y1) = bounds(series);
    let root = SVGBackend::with_string(svg, (800, 480)).into_drawing_area();
    root.fill(&WHITE)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 20))
        .margin(12)
        .x_label_area_size(40)
        .y_label_area_size(64)
        .build_cartesian_2d(x0..x1, y0..y1)?;
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
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
        if points {
            chart.draw_series(PointSeries::of_element(
                pts.iter().copied(),
                4,
                color.filled(),
                &|c, s, st| Circle::new(c, s, st),
            ))?;
        }
    }
    if series.len() > 1 || !points {
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK.mix(0.4))
            .position(SeriesLabelPosition::UpperRight)
            .draw()?;
    }
    root.present()?;
    Ok(())
}

/// The trial table as markdown.
pub fn trial_table_markdown(spec: &ExperimentSpec, state: &ExperimentState) -> String {
    let best = state.best_trial.as_ref().map(|b| b.trial_id);
    let mut s = format!(
        "| trial | role | status | config | steps | final loss | {} | delta vs base | device-h | version |\n|---|---|---|---|---|---|---|---|---|---|\n",
        spec.stop_metric
    );
    for t in &state.trial_history {
        let role = match &t.role {
            TrialRole::Search => "search".to_string(),
            TrialRole::Ablation { values, baseline } => {
                let v: Vec<String> = values.iter().map(|(k, v)| format!("{k}={v}")).collect();
                format!(
                    "{}{}",
                    v.join(", "),
                    if *baseline { " (baseline)" } else { "" }
                )
            }
            TrialRole::Stage { index, name, .. } => format!("stage {index} {name}"),
            TrialRole::Member { index } => format!("member {index}"),
            TrialRole::Ensemble => "ensemble".into(),
        };
        let _ = writeln!(
            s,
            "| {}{} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
            t.trial_id,
            if Some(t.trial_id) == best { " *" } else { "" },
            role,
            t.failure
                .as_ref()
                .map(|f| format!("{}: {}", t.record.status, f.replace('|', "/")))
                .unwrap_or_else(|| t.record.status.clone()),
            describe_config(&t.record.config),
            t.training_steps,
            t.final_loss.map(fmt_metric).unwrap_or_else(|| "-".into()),
            t.record
                .objective
                .map(fmt_metric)
                .unwrap_or_else(|| "-".into()),
            t.eval
                .as_ref()
                .and_then(|e| e.delta_vs_base_loss)
                .map(fmt_metric)
                .unwrap_or_else(|| "-".into()),
            fmt_hours(t.record.gpu_hours),
            t.artifact
                .as_ref()
                .map(|a| a.version.clone())
                .unwrap_or_else(|| "-".into()),
        );
    }
    s
}

fn markdown(
    spec: &ExperimentSpec,
    state: &ExperimentState,
    images: &[(String, String)],
    log: &[String],
) -> String {
    let mut s = format!("# Experiment `{}`\n\n", spec.experiment_name);
    if !spec.goal.is_empty() {
        let _ = writeln!(s, "Goal: {}\n", spec.goal);
    }
    let _ = writeln!(
        s,
        "- base model: `{}`\n- data: `{}`\n- protocol: {} ({} strategy), stop metric `{}`",
        spec.base_model,
        spec.dataset_path,
        protocol_name(spec.protocol.kind),
        serde_json::to_value(spec.protocol.strategy)
            .ok()
            .and_then(|v| v.as_str().map(String::from))
            .unwrap_or_default(),
        spec.stop_metric
    );
    let b = &state.budget;
    let _ = writeln!(
        s,
        "- budget: {} of {} device-hours used{}",
        fmt_hours(b.gpu_hours_used),
        fmt_hours(b.budget_gpu_hours),
        match (b.dollars_used, b.budget_dollars) {
            (Some(u), Some(l)) => format!(", ${u:.2} of ${l:.2}"),
            (Some(u), None) => format!(", ${u:.2}"),
            _ => String::new(),
        }
    );
    if let Some(r) = state.stop_reason {
        let _ = writeln!(
            s,
            "- stopped: **{r}** — {}",
            state.stop_message.clone().unwrap_or_default()
        );
    }
    if let Some(bt) = &state.best_trial {
        let _ = writeln!(
            s,
            "- best: trial {} with {} = {}{}",
            bt.trial_id,
            spec.stop_metric,
            bt.record
                .objective
                .map(fmt_metric)
                .unwrap_or_else(|| "-".into()),
            state
                .base_loss
                .map(|b| format!(" (base model eval_loss {})", fmt_metric(b)))
                .unwrap_or_default()
        );
        if let Some(a) = &bt.adapter_path {
            let _ = writeln!(s, "- best adapter: `{a}`");
        }
    }
    if let Some(m) = &state.merged_path {
        let _ = writeln!(s, "- merged/exported model: `{m}`");
    }
    let _ = writeln!(s, "\n## Trials\n\n{}", trial_table_markdown(spec, state));
    if let Some(ab) = &state.ablation {
        let _ = writeln!(
            s,
            "## Ablation\n\n| point | {} | delta vs baseline |\n|---|---|---|",
            ab.metric
        );
        for r in &ab.rows {
            let _ = writeln!(
                s,
                "| {}{} | {} | {} |",
                r.label,
                if r.baseline { " (baseline)" } else { "" },
                r.metric.map(fmt_metric).unwrap_or_else(|| "-".into()),
                r.delta_vs_baseline
                    .map(fmt_metric)
                    .unwrap_or_else(|| "-".into())
            );
        }
        if let Some(b) = &ab.best {
            let _ = writeln!(s, "\nBest: `{b}`\n");
        }
    }
    if let Some(en) = &state.ensemble {
        let _ = writeln!(
            s,
            "## Ensemble\n\n- members: {:?}\n- weights: {:?}\n- combined adapter: `{}`\n- ensemble {}: {} vs best member (trial {}): {}\n",
            en.members,
            en.weights
                .iter()
                .map(|w| (w * 1000.0).round() / 1000.0)
                .collect::<Vec<_>>(),
            en.combined_adapter.clone().unwrap_or_default(),
            spec.stop_metric,
            en.ensemble_metric
                .map(fmt_metric)
                .unwrap_or_else(|| "-".into()),
            en.best_member
                .map(|m| m.to_string())
                .unwrap_or_else(|| "-".into()),
            en.best_member_metric
                .map(fmt_metric)
                .unwrap_or_else(|| "-".into()),
        );
    }
    if !state.samples.is_empty() {
        let _ = writeln!(s, "## Before / after (greedy, held-out prompts)\n");
        for x in &state.samples {
            let _ = writeln!(
                s,
                "**{}**\n\n- base: {}\n- fine-tuned: {}\n- reference: {}\n",
                x.prompt
                    .clone()
                    .unwrap_or_else(|| format!("row {}", x.index))
                    .replace('\n', " "),
                x.before.trim().replace('\n', " "),
                x.after.trim().replace('\n', " "),
                x.reference.trim().replace('\n', " ")
            );
        }
    }
    if !images.is_empty() {
        let _ = writeln!(s, "## Plots\n");
        for (title, rel) in images {
            let _ = writeln!(s, "![{title}]({rel})\n");
        }
    }
    let _ = writeln!(s, "## Log\n\n```text\n{}\n```", log.join("\n"));
    s
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

fn html(spec: &ExperimentSpec, state: &ExperimentState, images: &[(String, String)]) -> String {
    let mut s = format!(
        "<!doctype html>\n<html><head><meta charset=\"utf-8\"><title>{0}</title>\n<style>body{{font-family:sans-serif;max-width:1100px;margin:2em auto}}table{{border-collapse:collapse}}td,th{{border:1px solid #ccc;padding:4px 8px;font-size:13px}}tr.best{{background:#eef8ee}}</style></head><body>\n<h1>Experiment <code>{0}</code></h1>\n",
        esc(&spec.experiment_name)
    );
    let _ = writeln!(
        s,
        "<p>Base model <code>{}</code>, data <code>{}</code>, protocol {}, stop metric <code>{}</code>.</p>",
        esc(&spec.base_model),
        esc(&spec.dataset_path),
        protocol_name(spec.protocol.kind),
        esc(&spec.stop_metric)
    );
    if let Some(r) = state.stop_reason {
        let _ = writeln!(
            s,
            "<p>Stopped: <b>{r}</b> — {}</p>",
            esc(&state.stop_message.clone().unwrap_or_default())
        );
    }
    let _ = writeln!(
        s,
        "<p>Budget: {} of {} device-hours used.</p>",
        fmt_hours(state.budget.gpu_hours_used),
        fmt_hours(state.budget.budget_gpu_hours)
    );
    if let Some(m) = &state.merged_path {
        let _ = writeln!(s, "<p>Merged/exported model: <code>{}</code></p>", esc(m));
    }
    let best = state.best_trial.as_ref().map(|b| b.trial_id);
    let _ = writeln!(
        s,
        "<h2>Trials</h2><table><tr><th>trial</th><th>status</th><th>config</th><th>steps</th><th>final loss</th><th>{}</th><th>delta vs base</th><th>device-h</th><th>version</th></tr>",
        esc(&spec.stop_metric)
    );
    for t in &state.trial_history {
        let _ = writeln!(
            s,
            "<tr{}><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if Some(t.trial_id) == best {
                " class=\"best\""
            } else {
                ""
            },
            t.trial_id,
            esc(&t
                .failure
                .as_ref()
                .map(|f| format!("{}: {f}", t.record.status))
                .unwrap_or_else(|| t.record.status.clone())),
            esc(&describe_config(&t.record.config)),
            t.training_steps,
            t.final_loss.map(fmt_metric).unwrap_or_else(|| "-".into()),
            t.record
                .objective
                .map(fmt_metric)
                .unwrap_or_else(|| "-".into()),
            t.eval
                .as_ref()
                .and_then(|e| e.delta_vs_base_loss)
                .map(fmt_metric)
                .unwrap_or_else(|| "-".into()),
            fmt_hours(t.record.gpu_hours),
            t.artifact
                .as_ref()
                .map(|a| esc(&a.version))
                .unwrap_or_else(|| "-".into()),
        );
    }
    s.push_str("</table>\n");
    if let Some(ab) = &state.ablation {
        let _ = writeln!(
            s,
            "<h2>Ablation</h2><table><tr><th>point</th><th>{}</th><th>delta vs baseline</th></tr>",
            esc(&ab.metric)
        );
        for r in &ab.rows {
            let _ = writeln!(
                s,
                "<tr><td>{}{}</td><td>{}</td><td>{}</td></tr>",
                esc(&r.label),
                if r.baseline { " (baseline)" } else { "" },
                r.metric.map(fmt_metric).unwrap_or_else(|| "-".into()),
                r.delta_vs_baseline
                    .map(fmt_metric)
                    .unwrap_or_else(|| "-".into())
            );
        }
        s.push_str("</table>\n");
    }
    for (title, rel) in images {
        let _ = writeln!(
            s,
            "<h3>{}</h3><img src=\"{}\" alt=\"{}\">",
            esc(title),
            esc(rel),
            esc(title)
        );
    }
    s.push_str("</body></html>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plots_are_svg_with_the_series_names() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.svg");
        line_plot(
            &p,
            "Training loss",
            "step",
            "loss",
            &[
                ("trial 1".into(), vec![(1.0, 2.0), (2.0, 1.5), (3.0, 1.2)]),
                ("trial 2".into(), vec![(1.0, 2.1), (2.0, 1.9)]),
            ],
            false,
        )
        .unwrap();
        let svg = std::fs::read_to_string(&p).unwrap();
        assert!(svg.starts_with("<svg"), "{}", &svg[..50]);
        assert!(svg.contains("trial 2") && svg.contains("Training loss"));
        assert!(svg.matches("<polyline").count() >= 2);
    }

    #[test]
    fn a_single_point_still_plots() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("p.svg");
        line_plot(
            &p,
            "m",
            "trial",
            "eval_loss",
            &[("eval_loss".into(), vec![(1.0, 0.5)])],
            true,
        )
        .unwrap();
        assert!(std::fs::read_to_string(&p).unwrap().contains("<circle"));
    }
}
