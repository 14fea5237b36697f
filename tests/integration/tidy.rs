//! Tidy checks kept as ordinary tests (rust-analyzer style): the dependency
//! rules of docs/ARCHITECTURE.md, file headers, no stubs.

use std::collections::{BTreeMap, BTreeSet};
use std::process::Command;

use lora_tests::{rust_files, workspace_root};
use serde_json::Value;

/// Packages allowed to link libtorch (directly or through a dependency).
const TORCH_ALLOWED: [&str; 6] = [
    "lora-engine",
    "lora-training",
    "lora-eval",
    "lora-merge",
    "lora-cli",
    "lora-tests",
];

fn metadata() -> Value {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .args(["metadata", "--format-version", "1"])
        .current_dir(workspace_root())
        .output()
        .expect("cargo metadata runs");
    assert!(
        out.status.success(),
        "cargo metadata failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("cargo metadata prints JSON")
}

/// Package name -> names of its normal (non-dev, non-build) dependencies that are packages in the graph.
fn normal_deps(meta: &Value) -> BTreeMap<String, BTreeSet<String>> {
    let names: BTreeMap<&str, &str> = meta["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|p| {
            (
                p["id"].as_str().unwrap_or(""),
                p["name"].as_str().unwrap_or(""),
            )
        })
        .collect();
    let mut out = BTreeMap::new();
    for node in meta["resolve"]["nodes"].as_array().into_iter().flatten() {
        let name = names
            .get(node["id"].as_str().unwrap_or(""))
            .copied()
            .unwrap_or("");
        let deps: BTreeSet<String> = node["deps"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|d| {
                d["dep_kinds"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .any(|k| k["kind"].is_null())
            })
            .filter_map(|d| {
                names
                    .get(d["pkg"].as_str().unwrap_or(""))
                    .map(|s| s.to_string())
            })
            .collect();
        out.insert(name.to_string(), deps);
    }
    out
}

fn closure(deps: &BTreeMap<String, BTreeSet<String>>, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_string()];
    while let Some(p) = stack.pop() {
        if seen.insert(p.clone())
            && let Some(ds) = deps.get(&p)
        {
            stack.extend(ds.iter().cloned());
        }
    }
    seen
}

#[test]
fn libtorch_stays_in_the_tensor_crates() {
    let meta = metadata();
    let deps = normal_deps(&meta);
    let members: Vec<String> = meta["workspace_members"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|id| {
            meta["packages"]
                .as_array()?
                .iter()
                .find(|p| p["id"] == *id)
                .and_then(|p| p["name"].as_str())
                .map(String::from)
        })
        .collect();
    assert!(members.len() >= 14, "workspace members: {members:?}");
    let mut offenders = Vec::new();
    for m in &members {
        let c = closure(&deps, m);
        let links_torch = c.contains("torch-sys") || c.contains("tch");
        if links_torch && !TORCH_ALLOWED.contains(&m.as_str()) {
            offenders.push(m.clone());
        }
    }
    assert!(
        offenders.is_empty(),
        "these crates pull in libtorch but must build without it: {offenders:?}"
    );
    // The orchestrator gets skills from a registry, never from their crates.
    let orch = closure(&deps, "lora-orchestrator");
    for forbidden in [
        "lora-dataset",
        "lora-config",
        "lora-training",
        "lora-eval",
        "lora-hpo",
        "lora-artifact",
        "lora-merge",
        "lora-engine",
    ] {
        assert!(
            !orch.contains(forbidden),
            "lora-orchestrator depends on {forbidden}: it must call skills through the registry"
        );
    }
    // Libraries do not depend on the CLI.
    for m in &members {
        if m != "lora-cli" && m != "lora-tests" && m != "xtask" {
            assert!(
                !closure(&deps, m).contains("lora-cli") || m == "lora-cli",
                "{m} depends on lora-cli"
            );
        }
    }
}

#[test]
fn anyhow_only_in_binaries() {
    let deps = normal_deps(&metadata());
    for (name, ds) in &deps {
        if name.starts_with("lora-") && name != "lora-cli" && name != "lora-tests" {
            assert!(
                !ds.contains("anyhow"),
                "{name} is a library: use a thiserror type, not anyhow"
            );
        }
    }
}

#[test]
fn every_rust_file_opens_with_a_module_doc() {
    let root = workspace_root();
    let mut missing = Vec::new();
    let files: Vec<_> = ["crates", "xtask", "tests"]
        .iter()
        .flat_map(|d| rust_files(&root.join(d)))
        .collect();
    // Files pulled in with `include!` cannot hold inner doc comments; they open with `//`.
    let included: Vec<String> = files
        .iter()
        .filter_map(|f| std::fs::read_to_string(f).ok())
        .flat_map(|t| {
            t.split("include!(\"")
                .skip(1)
                .filter_map(|r| r.split('"').next())
                .filter_map(|p| p.rsplit('/').next().map(String::from))
                .collect::<Vec<_>>()
        })
        .collect();
    for dir in ["crates", "xtask", "tests"] {
        for f in rust_files(&root.join(dir)) {
            let name = f
                .file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default();
            if included.contains(&name) {
                continue;
            }
            let text = std::fs::read_to_string(&f).unwrap_or_default();
            let first = text.lines().find(|l| !l.trim().is_empty()).unwrap_or("");
            if !first.starts_with("//!") {
                missing.push(f.strip_prefix(&root).unwrap_or(&f).display().to_string());
            }
        }
    }
    assert!(
        missing.is_empty(),
        "files without a `//!` header: {missing:?}"
    );
}

#[test]
fn no_stubs_in_library_code() {
    let root = workspace_root();
    let mut found = Vec::new();
    for f in rust_files(&root.join("crates")) {
        let text = std::fs::read_to_string(&f).unwrap_or_default();
        for (i, line) in text.lines().enumerate() {
            let t = line.trim_start();
            if t.starts_with("//") {
                continue;
            }
            if t.contains(concat!("todo", "!(")) || t.contains(concat!("unimplemented", "!(")) {
                found.push(format!("{}:{}", f.display(), i + 1));
            }
        }
    }
    assert!(found.is_empty(), "stubs left in code: {found:?}");
}

#[test]
fn architecture_doc_names_every_crate() {
    let root = workspace_root();
    let doc = std::fs::read_to_string(root.join("docs/ARCHITECTURE.md"))
        .expect("docs/ARCHITECTURE.md exists");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(root.join("crates"))
        .expect("crates/ exists")
        .flatten()
    {
        let manifest = entry.path().join("Cargo.toml");
        let Ok(text) = std::fs::read_to_string(&manifest) else {
            continue;
        };
        let name = text
            .lines()
            .find_map(|l| l.strip_prefix("name = \""))
            .and_then(|l| l.strip_suffix('"'))
            .unwrap_or("")
            .to_string();
        if !doc.contains(&format!("`{name}`")) {
            missing.push(name);
        }
    }
    assert!(
        missing.is_empty(),
        "docs/ARCHITECTURE.md does not describe: {missing:?}"
    );
}

#[test]
fn ci_runs_the_readme_test_command() {
    let root = workspace_root();
    let readme = std::fs::read_to_string(root.join("README.md")).expect("README.md exists");
    let ci = std::fs::read_to_string(root.join(".ci/run")).expect(".ci/run exists");
    let command = "cargo xtask ci";
    assert!(
        readme.contains(&format!("```\n{command}\n```")),
        "README.md must show the test command `{command}`"
    );
    assert!(
        ci.lines().any(|l| l.trim() == command),
        ".ci/run must call the README's test command `{command}`"
    );
    let toolchain =
        std::fs::read_to_string(root.join("rust-toolchain.toml")).expect("rust-toolchain.toml");
    assert!(toolchain.contains("channel = \"1.95.0\""));
}
