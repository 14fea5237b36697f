//! `lora-trainer`: the command line of the lora-trainer workspace.
//!
//! Every command is a thin layer over the library crates: it parses
//! arguments, builds a [`lora_skill::SkillContext`] whose events are drawn as
//! indicatif bars, calls a skill or a library function, and prints a readable
//! table or `--json`. Exit codes: 0 ok, 1 failed run, 2 bad input.

mod cmd;
mod exit;
mod output;
mod render;
mod skills;

use clap::{Parser, Subcommand};
use std::process::ExitCode;

/// mimalloc for the whole process: built with its `override` feature it also
/// serves libtorch's `posix_memalign`/`free`, whose glibc heap kept ~1.2 GB of
/// freed activation buffers as fragmentation at the peak of a training step
/// (see docs/BENCHMARKS.md, Training).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// mimalloc's `purge_delay` option: its index in `mi_option_e` (mimalloc v3,
/// the version libmimalloc-sys 0.1.49 builds; the test below checks it by the
/// defaults of it and its neighbours).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Keeps freed memory in the process instead of returning it to the OS after
/// mimalloc's purge delay. A training step frees and re-allocates the same activation buffers
/// every step; returning them made every step fault them back in, zeroing
/// 2 MiB pages (23 % of the `small` benchmark's samples in `clear_page_erms`;
/// 90,000 page faults in 4 steps, 19,000 without purging; steps 5 % faster
/// for 80 MB more resident, see docs/BENCHMARKS.md). The peak resident
/// memory is the same either way. An explicit `MIMALLOC_PURGE_DELAY` in the
/// environment is left alone.
fn keep_freed_memory() {
    #[allow(unsafe_code)]
    // SAFETY: plain C calls that read and set an integer option of the
    // process allocator; any option id is accepted (unknown ones are ignored).
    unsafe {
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_none() {
            libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1);
        }
    }
}

/// Run LoRA/QLoRA fine-tuning experiments end to end.
#[derive(Debug, Parser)]
#[command(name = "lora-trainer", version, about, long_about = None)]
struct Cli {
    /// More log output (-v info, -vv debug).
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run a whole experiment: profile, preflight, HPO trials under a budget, merge and export.
    Run(cmd::run::Args),
    /// Re-run one trial of an experiment from its manifest.json and say whether it matches.
    Reproduce(cmd::run::ReproduceArgs),
    /// Profile a dataset (`dataset analyze PATH`) or write a seeded train/eval split (`dataset split`).
    Dataset(cmd::dataset::Args),
    /// Models: `model import FILE.gguf --out DIR` (GGUF to a trainable Hugging Face folder).
    Model(cmd::model::ModelArgs),
    /// Generate text with a model (+ LoRA adapter): greedy unless sampling options are given.
    Generate(cmd::model::GenerateArgs),
    /// Write the configs of an ablation: one parameter (`--param lora_rank --values 4,8,16`), a grid or a preset.
    Ablation(cmd::protocols::AblationArgs),
    /// Build curriculum stages from named files or by difficulty.
    Curriculum(cmd::protocols::CurriculumArgs),
    /// Write diverse ensemble member configs (seeds, ranks, learning rates, target sets).
    Ensemble(cmd::protocols::EnsembleArgs),
    /// Reproducibility manifest: `manifest create SPEC`, `manifest verify FILE`.
    Manifest(cmd::protocols::ManifestArgs),
    /// Check an experiment spec (YAML or JSON) and print what it resolves to.
    Validate(cmd::validate::Args),
    /// List every registered skill.
    Skills(cmd::skills::ListArgs),
    /// Run one registered skill on a JSON input and print its StepResult as JSON.
    Skill(cmd::skills::CallArgs),
    /// Export the JSON schemas of every skill and of the experiment spec.
    Schema(cmd::schema::Args),
    /// The adapter store: list, show, verify, gc, delete, store.
    Artifacts(cmd::artifacts::Args),
    /// Check an experiment before launch: compatibility, memory against the limit, time per step.
    Preflight(cmd::config::PreflightArgs),
    /// Model facts and smart defaults: `config suggest`, `config models`.
    Config(cmd::config::ConfigArgs),
    /// Merge a LoRA adapter into its base model (Hugging Face safetensors, validated).
    Merge(cmd::merge::MergeArgs),
    /// Export a model (+ adapter) as safetensors, GGUF or PyTorch .bin, or an adapter as a GGUF LoRA.
    Export(cmd::merge::ExportArgs),
    /// Train the spec's base configuration once (LoRA SFT) with a progress bar.
    Train(cmd::train::Args),
    /// Evaluate a model (+ adapter): loss, perplexity, delta vs base, accuracy, generation.
    Eval(cmd::eval::Args),
    /// Benchmarks: `bench train` (LoRA training throughput, as peft_anchor.py).
    Bench(cmd::bench::Args),
}

fn main() -> ExitCode {
    keep_freed_memory();
    let cli = Cli::parse();
    render::init_tracing(cli.verbose);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => return exit::report(anyhow::anyhow!("cannot start the async runtime: {e}")),
    };
    let result = runtime.block_on(async move {
        match cli.command {
            Command::Run(a) => cmd::run::run(a, cli.verbose).await,
            Command::Reproduce(a) => cmd::run::reproduce(a, cli.verbose).await,
            Command::Dataset(a) => cmd::dataset::run(a).await,
            Command::Model(a) => cmd::model::model(a).await,
            Command::Generate(a) => cmd::model::generate_cmd(a).await,
            Command::Ablation(a) => cmd::protocols::ablation(a).await,
            Command::Curriculum(a) => cmd::protocols::curriculum(a).await,
            Command::Ensemble(a) => cmd::protocols::ensemble(a).await,
            Command::Manifest(a) => cmd::protocols::manifest(a).await,
            Command::Validate(a) => cmd::validate::run(a).await,
            Command::Skills(a) => cmd::skills::list(a).await,
            Command::Skill(a) => cmd::skills::call(a).await,
            Command::Schema(a) => cmd::schema::run(a).await,
            Command::Artifacts(a) => cmd::artifacts::run(a).await,
            Command::Preflight(a) => cmd::config::preflight(a).await,
            Command::Config(a) => cmd::config::config(a).await,
            Command::Merge(a) => cmd::merge::merge(a, cli.verbose).await,
            Command::Export(a) => cmd::merge::export(a, cli.verbose).await,
            Command::Train(a) => cmd::train::run(a, cli.verbose).await,
            Command::Eval(a) => cmd::eval::run(a).await,
            Command::Bench(a) => cmd::bench::run(a).await,
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => exit::report(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(unsafe_code)]
    fn the_purge_delay_option_index_is_mimallocs() {
        // SAFETY: plain C calls reading integer options of the allocator.
        let (before, neighbours) = unsafe {
            (
                libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY),
                (
                    libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY - 1),
                    libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY + 1),
                ),
            )
        };
        if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
            return;
        }
        // purge_delay defaults to 1000 ms in this build; its neighbours (a
        // deprecated eager-commit delay, use_numa_nodes) to 1 and 0.
        assert_eq!((before, neighbours), (1000, (1, 0)));
        keep_freed_memory();
        // SAFETY: as above.
        assert_eq!(
            unsafe { libmimalloc_sys::mi_option_get(MI_OPTION_PURGE_DELAY) },
            -1
        );
    }
}
