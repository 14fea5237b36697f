//! One store operation per process, for crates/artifact/bench/store_bench.sh:
//! `store_op STORE store ADAPTER TRIAL` or `store_op STORE verify`.
//! Exits non-zero (with the error on stderr) when the operation fails.

use std::io::Write;
use std::process::ExitCode;

use lora_artifact::ArtifactStore;
use lora_skill::SkillContext;
use lora_spec::contracts::artifact::ArtifactStoreInput;

fn run(args: &[String]) -> Result<String, String> {
    let ctx = SkillContext::new(std::env::current_dir().map_err(|e| e.to_string())?);
    match args {
        [root, op, adapter, trial] if op == "store" => {
            let trial: u32 = trial
                .parse()
                .map_err(|_| format!("trial {trial:?} is not a number"))?;
            let mut store = ArtifactStore::open(root).map_err(|e| e.to_string())?;
            let out = store
                .store(&ArtifactStoreInput::new(adapter.clone(), trial), &ctx)
                .map_err(|e| e.to_string())?;
            Ok(format!(
                "{} {} {} bytes written",
                out.version, out.adapter_hash, out.bytes_written
            ))
        }
        [root, op] if op == "verify" => {
            let store = ArtifactStore::open_existing(root).map_err(|e| e.to_string())?;
            let r = store
                .verify(None, "default", &ctx)
                .map_err(|e| e.to_string())?;
            if r.ok {
                Ok(format!("ok {} bytes hashed", r.bytes_hashed))
            } else {
                Err(format!("{} problems", r.problems.len()))
            }
        }
        _ => Err("usage: store_op STORE store ADAPTER TRIAL | store_op STORE verify".into()),
    }
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    match run(&args) {
        Ok(line) => {
            let _ = writeln!(std::io::stdout(), "{line}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            let _ = writeln!(std::io::stderr(), "error: {e}");
            ExitCode::FAILURE
        }
    }
}
