//! Exit codes and error reports: 0 ok, 1 failed run, 2 bad input.

use lora_skill::SkillError;
use lora_spec::SpecError;
use std::process::ExitCode;

/// A usage error of the command line itself (exit code 2).
#[derive(Debug)]
pub struct Usage(pub String);

impl std::fmt::Display for Usage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Usage {}

/// A run that finished but failed (exit code 1), with its message already shown.
#[derive(Debug)]
pub struct Failed(pub String);

impl std::fmt::Display for Failed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for Failed {}

/// The exit code an error maps to.
pub fn code_of(err: &anyhow::Error) -> u8 {
    if let Some(e) = err.downcast_ref::<SkillError>() {
        return if e.kind.is_user_error() { 2 } else { 1 };
    }
    if err.downcast_ref::<SpecError>().is_some() || err.downcast_ref::<Usage>().is_some() {
        return 2;
    }
    1
}

/// Prints the error to stderr (no backtrace) and returns its exit code.
#[allow(clippy::print_stderr)] // The binary's one place that reports errors.
pub fn report(err: anyhow::Error) -> ExitCode {
    let code = code_of(&err);
    if let Some(e) = err.downcast_ref::<SkillError>() {
        eprintln!("error[{}]: {e}", e.kind);
    } else {
        eprintln!("error: {err:#}");
    }
    ExitCode::from(code)
}
