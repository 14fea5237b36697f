//! `lora-trainer artifacts` as a user meets it: store, list, show, filter,
//! verify (exit 1 naming the corrupt path), delete and gc, in tables and `--json`.

use std::fs;
use std::path::Path;
use std::process::{Command, Output};

const BIN: &str = env!("CARGO_BIN_EXE_lora-trainer");

fn run(dir: &Path, args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .current_dir(dir)
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

fn json(o: &Output) -> serde_json::Value {
    assert!(o.status.success(), "{}", text(o));
    serde_json::from_slice(&o.stdout).expect("--json prints JSON")
}

fn adapter(dir: &Path, weights: &[u8]) {
    fs::create_dir_all(dir).expect("mkdir");
    fs::write(dir.join("adapter_config.json"), br#"{"r": 8}"#).expect("write");
    fs::write(dir.join("adapter_model.safetensors"), weights).expect("write");
}

#[test]
fn store_list_show_verify_delete_gc() {
    let tmp = tempfile::tempdir().expect("tempdir");
    let d = tmp.path();
    // No store yet: a user error naming the folder.
    let o = run(d, &["artifacts", "list"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
    assert!(text(&o).contains("no artifact store"), "{}", text(&o));

    adapter(&d.join("a1"), &[1u8; 5000]);
    adapter(&d.join("a2"), &[2u8; 7000]);
    let o = json(&run(
        d,
        &[
            "artifacts",
            "store",
            "a1",
            "--trial",
            "1",
            "--metric",
            "eval_loss=0.5",
            "--tag",
            "lora",
            "--json",
        ],
    ));
    assert_eq!(o["version"], "v1");
    let o = json(&run(
        d,
        &[
            "artifacts",
            "store",
            "a2",
            "--trial",
            "2",
            "--metric",
            "eval_loss=0.3",
            "--tag",
            "lora",
            "--tag",
            "keep",
            "--parent",
            "v1",
            "--json",
        ],
    ));
    assert_eq!(o["version"], "v2");

    let o = run(d, &["artifacts", "list"]);
    assert!(o.status.success(), "{}", text(&o));
    let t = text(&o);
    assert!(
        t.contains("eval_loss=0.3000") && t.contains("keep, lora"),
        "{t}"
    );
    assert!(t.contains("2 versions"), "{t}");
    let l = json(&run(d, &["artifacts", "list", "--tag", "keep", "--json"]));
    assert_eq!(l.as_array().map(Vec::len), Some(1));
    let l = json(&run(
        d,
        &["artifacts", "list", "--max", "eval_loss=0.4", "--json"],
    ));
    assert_eq!(l[0]["version"], "v2");

    let s = json(&run(d, &["artifacts", "show", "best:eval_loss", "--json"]));
    assert_eq!(s["version"]["version"], "v2");
    assert_eq!(s["version"]["parent"], "default/v1");
    assert_eq!(s["files"].as_array().map(Vec::len), Some(2));
    let o = run(d, &["artifacts", "show", "v9"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));

    let o = run(d, &["artifacts", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    assert!(text(&o).starts_with("ok:"), "{}", text(&o));

    // Corrupt the weights of v1 through its blob.
    let blob = s["files"]
        .as_array()
        .and_then(|_| {
            let v1 = json(&run(d, &["artifacts", "show", "v1", "--json"]));
            v1["files"]
                .as_array()?
                .iter()
                .find(|f| f["path"] == "adapter_model.safetensors")
                .and_then(|f| f["blob_path"].as_str().map(String::from))
        })
        .expect("v1's weights blob");
    let mut perms = fs::metadata(&blob).expect("blob").permissions();
    #[allow(clippy::permissions_set_readonly_false)] // The test corrupts the blob on purpose.
    perms.set_readonly(false);
    fs::set_permissions(&blob, perms).expect("chmod");
    fs::write(&blob, [9u8; 5000]).expect("corrupt");
    let o = run(d, &["artifacts", "verify"]);
    assert_eq!(o.status.code(), Some(1), "{}", text(&o));
    assert!(text(&o).contains(&blob), "{}", text(&o));
    assert!(text(&o).contains("corrupt_blob"), "{}", text(&o));
    let o = run(d, &["artifacts", "verify", "v2"]);
    assert!(o.status.success(), "{}", text(&o));

    // Delete v1 and collect its files.
    let o = run(d, &["artifacts", "delete", "v1"]);
    assert!(o.status.success(), "{}", text(&o));
    let g = json(&run(d, &["artifacts", "gc", "--dry-run", "--json"]));
    assert_eq!(g["blobs_removed"], 1);
    assert!(Path::new(&blob).exists());
    let g = json(&run(d, &["artifacts", "gc", "--json"]));
    assert_eq!(
        (g["blobs_removed"].as_u64(), g["adapters_removed"].as_u64()),
        (Some(1), Some(1))
    );
    assert!(!Path::new(&blob).exists());
    let o = run(d, &["artifacts", "verify"]);
    assert!(o.status.success(), "{}", text(&o));
    let o = run(d, &["artifacts", "list", "--max", "eval_loss"]);
    assert_eq!(o.status.code(), Some(2), "{}", text(&o));
}
