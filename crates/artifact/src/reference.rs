//! Version references: `v3`, `latest`, `best:eval_loss`, `best:accuracy:max`,
//! each optionally prefixed by an experiment id and a slash (`sweep-2/v3`).

use lora_spec::contracts::artifact::MetricGoal;

/// Which version of an experiment a reference names.
#[derive(Debug, Clone, PartialEq)]
pub enum Selector {
    /// `vN` (or plain `N`).
    Number(i64),
    /// `latest`: the highest version number still in the index.
    Latest,
    /// `best:<metric>[:min|:max]`: the best value of a metric (ties go to the older version).
    Best {
        /// The metric.
        metric: String,
        /// Smaller or larger is better.
        goal: MetricGoal,
    },
}

/// A parsed reference.
#[derive(Debug, Clone, PartialEq)]
pub struct VersionRef {
    /// The experiment, when the reference names one.
    pub experiment: Option<String>,
    /// The version within it.
    pub selector: Selector,
}

impl VersionRef {
    /// Parses a reference; the error says what is accepted.
    pub fn parse(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let (experiment, rest) = match t.rsplit_once('/') {
            Some((e, r)) => {
                check_experiment_id(e)?;
                (Some(e.to_string()), r)
            }
            None => (None, t),
        };
        let selector = if rest.eq_ignore_ascii_case("latest") {
            Selector::Latest
        } else if let Some(spec) = rest.strip_prefix("best:") {
            let (metric, goal) = match spec.rsplit_once(':') {
                Some((m, "max")) => (m, MetricGoal::Max),
                Some((m, "min")) => (m, MetricGoal::Min),
                _ => (spec, MetricGoal::Min),
            };
            check_name("metric", metric)?;
            Selector::Best {
                metric: metric.to_string(),
                goal,
            }
        } else {
            let digits = rest
                .strip_prefix('v')
                .or_else(|| rest.strip_prefix('V'))
                .unwrap_or(rest);
            match digits.parse::<i64>() {
                Ok(n) if n >= 1 && !digits.starts_with('+') => Selector::Number(n),
                _ => {
                    return Err(format!(
                        "{text:?} is not a version reference; use v3, latest, best:eval_loss, \
                         best:accuracy:max, or any of them after an experiment id and a slash (exp/v3)"
                    ));
                }
            }
        };
        Ok(Self {
            experiment,
            selector,
        })
    }
}

/// Checks an experiment id: 1 to 128 of `A-Z a-z 0-9 . _ -`, not starting with `.` or `-`.
pub fn check_experiment_id(id: &str) -> Result<(), String> {
    let ok_chars = id
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if id.is_empty() || id.len() > 128 || !ok_chars || id.starts_with(['.', '-']) {
        return Err(format!(
            "experiment id {id:?} must be 1 to 128 letters, digits, '.', '_' or '-', not starting with '.' or '-'"
        ));
    }
    Ok(())
}

/// Checks a tag or metric name: 1 to 128 characters, no control characters.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    if name.trim().is_empty() || name.chars().count() > 128 || name.chars().any(char::is_control) {
        return Err(format!(
            "{what} {name:?} must be 1 to 128 characters without control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)] // Tests: a panic is the failure report.
mod tests {
    use super::*;

    #[test]
    fn parses_every_form() {
        assert_eq!(
            VersionRef::parse("v3").unwrap().selector,
            Selector::Number(3)
        );
        assert_eq!(
            VersionRef::parse("12").unwrap().selector,
            Selector::Number(12)
        );
        let r = VersionRef::parse("sweep-2/latest").unwrap();
        assert_eq!(r.experiment.as_deref(), Some("sweep-2"));
        assert_eq!(r.selector, Selector::Latest);
        assert_eq!(
            VersionRef::parse("best:accuracy:max").unwrap().selector,
            Selector::Best {
                metric: "accuracy".into(),
                goal: MetricGoal::Max
            }
        );
        assert_eq!(
            VersionRef::parse("e/best:eval_loss").unwrap().selector,
            Selector::Best {
                metric: "eval_loss".into(),
                goal: MetricGoal::Min
            }
        );
        for bad in ["v0", "v-1", "x", "", "bad id/v1", "v+3", "best:"] {
            assert!(VersionRef::parse(bad).is_err(), "{bad}");
        }
        assert!(
            VersionRef::parse("x")
                .unwrap_err()
                .contains("best:eval_loss")
        );
    }

    #[test]
    fn experiment_ids_are_checked() {
        assert!(check_experiment_id("qa_sweep-2.1").is_ok());
        for bad in ["", ".hidden", "-x", "a/b", "a b", &"x".repeat(129)] {
            assert!(check_experiment_id(bad).is_err(), "{bad}");
        }
    }
}
