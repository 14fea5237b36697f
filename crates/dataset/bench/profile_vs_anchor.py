"""Side-by-side benchmark: lora-dataset's profiler against the HF `datasets` anchor.

Runs /work/shared/anchors/dataset_anchor.py (engine `datasets`) and the release build of
`crates/dataset/examples/profile_bench.rs` alternately, ROUNDS times each, on the same file,
checks that both report the same counts, and prints the median time and peak RSS of each
and the ratios as one JSON line (plus the per-run lines on stderr).

Usage: profile_vs_anchor.py FILE [--rounds 3] [--anchor PATH] [--bench PATH] [--pandas]
"""
import argparse, json, statistics, subprocess, sys

ap = argparse.ArgumentParser()
ap.add_argument("file")
ap.add_argument("--rounds", type=int, default=3)
ap.add_argument("--anchor", default="/work/shared/anchors/dataset_anchor.py")
ap.add_argument("--bench", default="/work/target-dataset/release/examples/profile_bench")
ap.add_argument("--pandas", action="store_true", help="also run the pandas engine once")
a = ap.parse_args()

def run(cmd):
    out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    print(out, file=sys.stderr)
    return json.loads(out)

ours, theirs = [], []
for _ in range(a.rounds):
    theirs.append(run([sys.executable, a.anchor, a.file, "--engine", "datasets"]))
    ours.append(run([a.bench, a.file, "--threads", "2"]))
pandas = run([sys.executable, a.anchor, a.file, "--engine", "pandas"]) if a.pandas else None

same = {}
for k in ("total_samples", "columns", "has_instruction", "has_output", "duplicates_found", "avg_tokens", "max_tokens"):
    same[k] = all(o[k] == t[k] for o, t in zip(ours, theirs))
med = lambda rs, k: statistics.median(r[k] for r in rs)
res = {
    "file": a.file,
    "rounds": a.rounds,
    "same_counts": same,
    "datasets_seconds": med(theirs, "seconds"),
    "datasets_peak_rss_mb": med(theirs, "peak_rss_mb"),
    "ours_seconds": med(ours, "seconds"),
    "ours_peak_rss_mb": med(ours, "peak_rss_mb"),
}
res["speedup"] = round(res["datasets_seconds"] / res["ours_seconds"], 2)
res["rss_ratio"] = round(res["ours_peak_rss_mb"] / res["datasets_peak_rss_mb"], 3)
if pandas:
    res["pandas_seconds"] = pandas["seconds"]
    res["pandas_peak_rss_mb"] = pandas["peak_rss_mb"]
print(json.dumps(res))
sys.exit(0 if all(same.values()) else 1)
