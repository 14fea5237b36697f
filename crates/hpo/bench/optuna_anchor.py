#!/usr/bin/env python3
"""Optuna anchor of the HPO benchmark: the same lora-surrogate-v1 tasks,
noise and search space as crates/hpo/src/surrogate.rs, searched by Optuna's
TPESampler (its defaults: 10 random startup trials, 24 EI candidates,
multivariate in Optuna 5) and RandomSampler.

Run by `cargo run --release -p lora-hpo --example hpo_bench`, which first
writes golden points computed in Rust; this script refuses to run unless its
surrogate agrees with them to 1e-12.

Usage: optuna_anchor.py --golden G.json --tasks 16 --seeds 4 --trials 40 --out OUT.json
"""

import argparse
import json
import math
import sys
import time

M64 = (1 << 64) - 1


def splitmix(z):
    z = (z + 0x9E3779B97F4A7C15) & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def unit(key):
    return (splitmix(key & M64) >> 11) / float(1 << 53)


TARGET_SETS = [["q_proj", "v_proj"], ["q_proj", "k_proj", "v_proj", "o_proj"], ["all-linear"]]
TARGET_LOSS = [1.0, 0.5, 0.0]
TARGET_COST = [1.0, 1.15, 1.5]
SPACE = dict(lr=(1e-6, 1e-2), ranks=[8, 16, 32, 64], ratio=(0.5, 4.0), dropout=(0.0, 0.3),
             batches=[4, 8, 16, 32, 64], warmup=(0.0, 0.2))


def task(index):
    u = lambda k: unit((index * 1_000_003 + k) & M64)
    return dict(c=-4.3 + u(0), b_star=[8.0, 16.0, 32.0][min(int(u(1) * 3.0), 2)], p_star=0.15 * u(2),
                w_star=0.02 + 0.06 * u(3), kappa=0.05 + 0.25 * u(4), l0=1.0 + u(5), tau=0.02 + 0.06 * u(6))


def softplus(x):
    return x if x > 30.0 else math.log1p(math.exp(x))


def z_of(t, h):
    return math.log10(h["lr"] * h["ratio"]) - t["c"] - 0.5 * math.log10(h["batch"] / 16.0)


def loss(t, h, frac):
    z = z_of(t, h)
    rank_pen = t["kappa"] * (8.0 / h["rank"]) ** 0.7
    f = (t["l0"] + 0.08 * z * z + 0.6 * softplus(6.0 * (z - 0.6 - 4.0 * h["warmup"])) + rank_pen
         + 0.03 * max(math.log2(h["batch"] / t["b_star"]), 0.0) ** 2 + 0.4 * (h["dropout"] - t["p_star"]) ** 2
         + 0.5 * (h["warmup"] - t["w_star"]) ** 2 + t["tau"] * TARGET_LOSS[h["targets"]])
    k = 8.0 * 10.0 ** min(max(z, -2.0), 0.5) * (16.0 / h["batch"]) ** 0.3
    return f - rank_pen * (1.0 - frac * frac) + 1.5 * math.exp(-k * frac)


def noise(task_i, seed, trial, step, sd):
    key = (task_i * 0x9E3779B9 + seed * 0x85EBCA6B + trial * 0xC2B2AE35 + step * 0x27D4EB2F) & M64
    u1 = max(unit(key), 1e-300)
    u2 = unit(key ^ 0x5555555555555555)
    return sd * math.sqrt(-2.0 * math.log(u1)) * math.cos(2.0 * math.pi * u2)


def observe(task_i, t, seed, trial, h, steps):
    sd = 0.03 if z_of(t, h) - 0.6 - 4.0 * h["warmup"] > 0.0 else 0.01
    return loss(t, h, 1.0) + noise(task_i, seed, trial, steps, sd)


def check_golden(path):
    with open(path) as f:
        gold = json.load(f)
    worst = 0.0
    for g in gold["points"]:
        t = task(g["task"])
        got = loss(t, g["hp"], g["frac"])
        worst = max(worst, abs(got - g["loss"]))
        got_n = noise(g["task"], g["seed"], g["trial"], g["step"], 1.0)
        worst = max(worst, abs(got_n - g["noise"]))
    if worst > 1e-12:
        sys.exit(f"golden check failed: max |python - rust| = {worst:.3e}")
    return worst, len(gold["points"])


def run(sampler_name, task_i, seed, trials, steps, optimum):
    import optuna
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t = task(task_i)
    if sampler_name == "optuna_tpe":
        sampler = optuna.samplers.TPESampler(seed=seed)
    else:
        sampler = optuna.samplers.RandomSampler(seed=seed)
    study = optuna.create_study(direction="minimize", sampler=sampler)
    best = None
    regrets = []
    for n in range(trials):
        tr = study.ask()
        rank = tr.suggest_categorical("lora_rank", SPACE["ranks"])
        h = dict(
            lr=tr.suggest_float("learning_rate", *SPACE["lr"], log=True),
            rank=float(rank),
            ratio=tr.suggest_float("alpha_ratio", *SPACE["ratio"]),
            dropout=tr.suggest_float("lora_dropout", *SPACE["dropout"]),
            batch=float(tr.suggest_categorical("batch_size", SPACE["batches"])),
            warmup=tr.suggest_float("warmup_ratio", *SPACE["warmup"]),
            targets=tr.suggest_categorical("target_set", [0, 1, 2]),
        )
        y = observe(task_i, t, seed, n, h, steps)
        study.tell(tr, y)
        if best is None or y < best[0]:
            best = (y, loss(t, h, 1.0))
        regrets.append(best[1] - optimum)
    return regrets


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--golden", required=True)
    ap.add_argument("--tasks", type=int, default=16)
    ap.add_argument("--task-offset", type=int, default=0)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--trials", type=int, default=40)
    ap.add_argument("--steps", type=int, default=27)
    ap.add_argument("--out", required=True)
    a = ap.parse_args()
    import optuna
    worst, npts = check_golden(a.golden)
    with open(a.golden) as f:
        optima = {int(k): v for k, v in json.load(f)["optimum"].items()}
    out = dict(optuna_version=optuna.__version__, golden_points=npts, golden_max_abs_diff=worst, samplers={})
    for name in ["optuna_tpe", "optuna_random"]:
        runs = []
        t0 = time.perf_counter()
        for ti in range(a.task_offset, a.task_offset + a.tasks):
            for s in range(a.seeds):
                runs.append(dict(task=ti, seed=s, regrets=run(name, ti, s, a.trials, a.steps, optima[ti])))
        dt = time.perf_counter() - t0
        out["samplers"][name] = dict(runs=runs, ms_per_trial=1e3 * dt / (len(runs) * a.trials))
    with open(a.out, "w") as f:
        json.dump(out, f)


if __name__ == "__main__":
    main()
