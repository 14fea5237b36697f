//! `cargo xtask`: project automation kept in Rust (rust-analyzer style).
//!
//! - `setup`: installs what the project needs on a fresh machine (libtorch
//!   from PyPI's torch wheel into a cached Python environment, the parity
//!   tools, the default base model) and links it into the checkout;
//! - `ci`: setup, then `cargo fmt --check`, `clippy -D warnings` and every
//!   test — what `.ci/run` runs;
//! - `codegen`: regenerates the committed JSON schemas under docs/schemas.

mod setup;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{Context, bail};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let root = project_root();
    match args.first().map(String::as_str) {
        Some("setup") => setup::run(&root, &args[1..]),
        Some("ci") => ci(&root, &args[1..]),
        Some("codegen") => codegen(&root),
        Some("help") | Some("--help") | Some("-h") | None => {
            usage();
            Ok(())
        }
        Some(other) => {
            usage();
            bail!("unknown xtask `{other}`")
        }
    }
}

#[allow(clippy::print_stdout)] // xtask is a binary; its help goes to stdout.
fn usage() {
    println!(
        "cargo xtask <task>\n\n  setup    install libtorch, the Python parity tools and the default base model (idempotent)\n  ci       setup + fmt --check + clippy -D warnings + all tests (what .ci/run runs)\n  codegen  regenerate docs/schemas from the registered skills"
    );
}

/// The workspace root (the parent of this crate's folder).
fn project_root() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    dir.parent().map(Path::to_path_buf).unwrap_or(dir)
}

fn cargo() -> Command {
    Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
}

/// Runs a command in `root`, failing with its name when it fails.
pub(crate) fn run(root: &Path, cmd: &mut Command) -> anyhow::Result<()> {
    let shown = format!("{cmd:?}");
    eprintln_step(&shown);
    let status = cmd
        .current_dir(root)
        .status()
        .with_context(|| format!("could not start {shown}"))?;
    if !status.success() {
        bail!("{shown} failed with {status}");
    }
    Ok(())
}

#[allow(clippy::print_stderr)] // Step banners for people watching CI.
pub(crate) fn eprintln_step(s: &str) {
    eprintln!("\n==> {s}");
}

fn ci(root: &Path, args: &[String]) -> anyhow::Result<()> {
    let skip_setup = args.iter().any(|a| a == "--no-setup");
    if !skip_setup {
        setup::run(root, &[])?;
    }
    run(root, cargo().args(["fmt", "--all", "--check"]))?;
    run(
        root,
        cargo().args([
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ]),
    )?;
    run(
        root,
        cargo().args(["test", "--workspace", "--no-fail-fast"]),
    )?;
    Ok(())
}

/// Rewrites the generated part of docs/SPEC.md from the spec types.
fn spec_doc(root: &Path) -> anyhow::Result<()> {
    use lora_spec::reference::{BEGIN, END, spec_reference};
    let path = root.join("docs/SPEC.md");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("reading {}", path.display()))?;
    let (Some(a), Some(b)) = (text.find(BEGIN), text.find(END)) else {
        bail!("{} lacks the generated-reference markers", path.display());
    };
    let new = format!(
        "{}{}{}",
        &text[..a],
        spec_reference(),
        &text[b + END.len()..].trim_start_matches('\n')
    );
    std::fs::write(&path, new).with_context(|| format!("writing {}", path.display()))?;
    eprintln_step(&format!("wrote {}", path.display()));
    Ok(())
}

fn codegen(root: &Path) -> anyhow::Result<()> {
    spec_doc(root)?;
    run(
        root,
        cargo().args([
            "run",
            "--quiet",
            "--package",
            "lora-cli",
            "--",
            "schema",
            "--format",
            "json-schema",
            "--out",
            "docs/schemas",
        ]),
    )?;
    run(
        root,
        cargo().args([
            "run",
            "--quiet",
            "--package",
            "lora-cli",
            "--",
            "schema",
            "--format",
            "openai-tools",
            "--out",
            "docs/schemas",
        ]),
    )?;
    run(
        root,
        cargo().args([
            "run",
            "--quiet",
            "--package",
            "lora-cli",
            "--",
            "schema",
            "--format",
            "anthropic-tools",
            "--out",
            "docs/schemas",
        ]),
    )
}
