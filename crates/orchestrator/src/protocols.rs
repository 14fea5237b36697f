//! The research protocols as the orchestrator runs them (ablation,
//! curriculum, ensemble). The plans come from the protocol skills.

use lora_skill::SkillError;
use lora_spec::contracts::orchestrator::TrialSummary;
use lora_spec::contracts::training::TrainingRequest;
use lora_spec::experiment::ProtocolType;

use crate::plan::PlannedTrial;
use crate::runner::{Run, protocol_name};

/// The protocol's whole plan (deterministic: the same on every run).
pub(crate) async fn plan(run: &mut Run<'_>) -> Result<Vec<PlannedTrial>, SkillError> {
    let kind = run.spec().protocol.kind;
    match kind {
        ProtocolType::Standard => Ok(Vec::new()),
        _ => Err(SkillError::unsupported(format!(
            "protocol `{}` needs the protocol skills, which this build does not register yet",
            protocol_name(kind)
        ))
        .with_field("experiment.protocol.type")
        .with_hint("use protocol type: standard")),
    }
}

/// Adds the adapter a trial starts from.
pub(crate) fn with_init_adapter(
    _run: &Run<'_>,
    _t: &TrialSummary,
    input: TrainingRequest,
) -> Result<TrainingRequest, SkillError> {
    Ok(input)
}

/// The artifact version a trial derives from.
pub(crate) fn parent_version(_run: &Run<'_>, _t: &TrialSummary) -> Option<String> {
    None
}

/// What a protocol does after its trials.
pub(crate) async fn epilogue(_run: &mut Run<'_>) -> Result<(), SkillError> {
    Ok(())
}
