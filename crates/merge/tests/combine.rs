//! Adapter combination against PEFT's own `add_weighted_adapter` on the same adapters.
#![allow(clippy::unwrap_used, clippy::print_stderr)]

mod common;

use common::*;
use lora_merge::Adapter;
use lora_merge::combine::{combine, dense_delta};
use lora_spec::contracts::merge::{AdapterCombination, CombinationType};

#[test]
fn combinations_match_peft_add_weighted_adapter() {
    let Some(s) = require_python("combinations_match_peft_add_weighted_adapter") else {
        return;
    };
    let out = scratch();
    let peft_dir = out.join("peft");
    py(&[
        "combine-many",
        s.join("llama").to_str().unwrap(),
        peft_dir.to_str().unwrap(),
        "--adapters",
        &format!(
            "{},{}",
            s.join("a_plain").display(),
            s.join("a_second").display()
        ),
        "--weights",
        "0.7,-0.4",
        "--types",
        "linear,cat,svd,ties:0.5,dare_linear:1.0,dare_ties:1.0",
    ]);
    let inputs = [
        Adapter::open(&s.join("a_plain")).unwrap(),
        Adapter::open(&s.join("a_second")).unwrap(),
    ];
    // DARE is random; with density 1 PEFT (and we) keep everything, so dare_linear == linear and
    // dare_ties == ties without pruning: exact comparisons. Random masks are checked structurally
    // in the unit tests (keep rate = density, survivors scaled by 1/density).
    for (ty, name, density) in [
        (CombinationType::Linear, "linear", None),
        (CombinationType::Cat, "cat", None),
        (CombinationType::Svd, "svd", None),
        (CombinationType::Ties, "ties", Some(0.5)),
        (CombinationType::DareLinear, "dare_linear", Some(1.0)),
        (CombinationType::DareTies, "dare_ties", Some(1.0)),
    ] {
        let spec = AdapterCombination {
            adapters: vec![],
            weights: vec![0.7, -0.4],
            combination_type: ty,
            density,
            svd_rank: None,
            seed: 0,
            majority_sign_method: "total".into(),
        };
        let ours_dir = out.join(format!("ours-{name}"));
        let rep = combine(&inputs, &spec, &ours_dir).unwrap();
        let ours = Adapter::open(&ours_dir).unwrap();
        let theirs = Adapter::open(&peft_dir.join(name).join(format!("c_{name}"))).unwrap();
        assert_eq!(ours.config.r, theirs.config.r, "{name}: rank");
        assert_eq!(rep.modules, theirs.modules.len());
        let mut worst = 0f32;
        for m in &theirs.modules {
            let (a, _, _) = dense_delta(&theirs, &m.module).unwrap();
            let (b, _, _) = dense_delta(&ours, &m.module).unwrap();
            let scale = a.iter().fold(0f32, |x, v| x.max(v.abs()));
            worst = worst.max(max_abs(&a, &b) / scale);
        }
        eprintln!("{name}: max |Δ(scale·B·A)| / max |PEFT| = {worst:.1e}");
        assert!(worst < 1e-4, "{name}: {worst}");
    }
}
