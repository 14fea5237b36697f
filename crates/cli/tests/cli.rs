//! The `lora-trainer` binary as a user meets it: broken specs give exit code 2
//! and a message naming the field or line; schemas are valid, validate the
//! example inputs, and the committed copies under docs/schemas are fresh.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lora-trainer");

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn run(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .env("RUST_BACKTRACE", "1")
        .output()
        .expect("the binary runs")
}

fn text(o: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    )
}

/// Seed 000's example, unchanged.
const SEED_000: &str = include_str!("specs/seed_000.yaml");

#[test]
fn the_seed_000_example_validates() {
    let o = run(&[
        "validate",
        root()
            .join("crates/cli/tests/specs/seed_000.yaml")
            .to_str()
            .unwrap(),
    ]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).contains("llama3-sql-finetune"));
    let o = run(&[
        "validate",
        "--json",
        root()
            .join("crates/cli/tests/specs/seed_000.yaml")
            .to_str()
            .unwrap(),
    ]);
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).expect("--json prints JSON");
    assert_eq!(v["spec"]["base_config"]["learning_rate"], 0.0002);
    assert_eq!(v["spec"]["max_trials"], 5);
}

#[test]
fn twelve_broken_specs_exit_2_and_name_the_field_or_line() {
    let dir = tempfile::tempdir().unwrap();
    let cases: Vec<(&str, String, Vec<&str>)> = vec![
        (
            "wrong_type.yaml",
            SEED_000.replace("lora_rank: 64", "lora_rank: \"sixty-four\""),
            vec!["config.lora_rank", ":16:", "wrong type"],
        ),
        (
            "unknown_key.yaml",
            format!("{SEED_000}colour: blue\n"),
            vec!["colour", "unknown key", ":31:"],
        ),
        (
            "typo.yaml",
            SEED_000.replace("lora_alpha: 16", "lora_alpah: 16"),
            vec!["config.lora_alpah", "did you mean `lora_alpha`", ":17:"],
        ),
        (
            "negative_rank.yaml",
            SEED_000.replace("lora_rank: 64", "lora_rank: -8"),
            vec!["config.lora_rank", "-8", ":16:"],
        ),
        (
            "lr_range.yaml",
            format!("{SEED_000}search_space:\n  lr_min: 0.01\n  lr_max: 0.0001\n"),
            vec!["search_space.lr_min", ":32:"],
        ),
        (
            "protocol.yaml",
            SEED_000.replace("type: \"standard\"", "type: \"grid\""),
            vec!["protocol.type", "grid", ":24:"],
        ),
        (
            "export.yaml",
            SEED_000.replace("export_format: \"gguf\"", "export_format: \"onnx\""),
            vec!["output.export_format", "onnx", ":29:"],
        ),
        (
            "no_dataset.yaml",
            SEED_000.replace("  path: \"data/text_to_sql.json\"\n", ""),
            vec!["dataset.path", "missing"],
        ),
        (
            "syntax.yaml",
            SEED_000.replace("lora_alpha: 16", "lora_alpha: [16"),
            vec!["invalid YAML", ":"],
        ),
        (
            "version.yaml",
            SEED_000.replace("version: \"1.0\"", "version: \"2.0\""),
            vec!["version", "2.0", ":1:"],
        ),
        ("empty.yaml", String::new(), vec!["empty"]),
        (
            "trailing_comma.json",
            "{\n  \"version\": \"1.0\",\n  \"dataset\": {\"path\": \"d.jsonl\"},\n}\n".into(),
            vec!["trailing comma", ":4:"],
        ),
    ];
    assert_eq!(cases.len(), 12);
    for (name, body, expect) in cases {
        let p = dir.path().join(name);
        std::fs::write(&p, body).unwrap();
        let o = run(&["validate", p.to_str().unwrap()]);
        let out = text(&o);
        assert_eq!(
            o.status.code(),
            Some(2),
            "{name}: expected exit 2, got {:?}: {out}",
            o.status
        );
        assert!(!out.contains("panicked"), "{name} panicked: {out}");
        for e in expect {
            assert!(out.contains(e), "{name}: `{e}` not in: {out}");
        }
    }
}

#[test]
fn missing_file_and_unknown_skill_are_user_errors() {
    let o = run(&["validate", "/nonexistent/exp.yaml"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    let o = run(&["skill", "no_such_skill", "--input", "{}"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("not_found"));
    let o = run(&["skill", "no_such_skill", "--input", "{not json"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}

fn schemas_in(format: &str) -> serde_json::Value {
    let o = run(&["schema", "--format", format]);
    assert!(o.status.success(), "{}", text(&o));
    serde_json::from_slice(&o.stdout).expect("schema output is JSON")
}

#[test]
fn tool_exports_are_valid_json_with_object_roots() {
    let reg = run(&["skills", "--json"]);
    let skills: serde_json::Value = serde_json::from_slice(&reg.stdout).unwrap();
    let n = skills.as_array().unwrap().len();
    let openai = schemas_in("openai-tools");
    let tools = openai.as_array().expect("an array of tools");
    assert_eq!(tools.len(), n);
    for t in tools {
        assert_eq!(t["type"], "function");
        assert_eq!(t["function"]["parameters"]["type"], "object", "{t}");
        assert!(!t["function"]["description"].as_str().unwrap().is_empty());
        assert!(!t.to_string().contains("$ref"));
    }
    let anthropic = schemas_in("anthropic-tools");
    for t in anthropic.as_array().unwrap() {
        assert_eq!(t["input_schema"]["type"], "object", "{t}");
    }
}

fn validator(schema: &serde_json::Value) -> jsonschema::Validator {
    jsonschema::validator_for(schema).expect("a valid JSON schema")
}

#[test]
fn example_inputs_validate_against_the_schemas() {
    let all = schemas_in("json-schema");
    // The experiment document.
    let exp = validator(&all["experiment"]);
    let doc: serde_json::Value = {
        let v = lora_spec::load::Document::parse(SEED_000, "seed", lora_spec::load::Syntax::Yaml)
            .unwrap();
        v.value
    };
    assert!(exp.is_valid(&doc), "seed 000 rejected by the schema");
    let mut bad = doc.clone();
    bad["config"]["lora_rank"] = serde_json::json!("sixty-four");
    assert!(!exp.is_valid(&bad));
    let mut bad = doc.clone();
    bad["protocol"]["type"] = serde_json::json!("grid");
    assert!(!exp.is_valid(&bad));
    let mut bad = doc;
    bad["colour"] = serde_json::json!("blue");
    assert!(!exp.is_valid(&bad), "unknown keys are rejected");
    // Every registered skill has examples, valid and invalid.
    let skills: serde_json::Value =
        serde_json::from_slice(&run(&["skills", "--json"]).stdout).unwrap();
    for s in skills.as_array().unwrap() {
        let name = s["name"].as_str().unwrap();
        let path = root().join(format!("crates/cli/tests/examples/{name}.json"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|_| {
            panic!(
                "add example inputs for skill `{name}` at {}",
                path.display()
            )
        });
        let ex: serde_json::Value = serde_json::from_str(&text).expect("examples are JSON");
        let v = validator(&all[format!("{name}.input")]);
        for good in ex["valid"].as_array().expect("`valid` list") {
            assert!(v.is_valid(good), "{name}: valid example rejected: {good}");
        }
        let invalid = ex["invalid"].as_array().expect("`invalid` list");
        assert!(
            !invalid.is_empty(),
            "{name}: give at least one invalid example"
        );
        for bad in invalid {
            assert!(!v.is_valid(bad), "{name}: invalid example accepted: {bad}");
        }
    }
}

#[test]
fn committed_schemas_are_fresh() {
    let dir = tempfile::tempdir().unwrap();
    for format in ["json-schema", "openai-tools", "anthropic-tools"] {
        let o = run(&[
            "schema",
            "--format",
            format,
            "--out",
            dir.path().to_str().unwrap(),
        ]);
        assert!(o.status.success(), "{}", text(&o));
    }
    let committed = root().join("docs/schemas");
    let mut stale = Vec::new();
    for e in std::fs::read_dir(dir.path()).unwrap().flatten() {
        let fresh = std::fs::read_to_string(e.path()).unwrap();
        let old = std::fs::read_to_string(committed.join(e.file_name())).unwrap_or_default();
        if fresh != old {
            stale.push(e.file_name().to_string_lossy().into_owned());
        }
    }
    let extra: Vec<String> = std::fs::read_dir(&committed)
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| !dir.path().join(n).exists())
                .collect()
        })
        .unwrap_or_default();
    assert!(
        stale.is_empty() && extra.is_empty(),
        "docs/schemas is stale ({stale:?}, no longer generated: {extra:?}): run `cargo xtask codegen`"
    );
}
