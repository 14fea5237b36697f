#!/usr/bin/env bash
# Store throughput of lora-artifact (ArtifactStore::store / verify, one process
# per operation like `lora-trainer artifacts store|verify`) against the do-it-yourself anchor
# (Python hashlib + shutil.copytree + a JSON index, what a script around PEFT
# does to version adapters) and coreutils (sha256sum + cp -r), side by side in
# one run, on the same adapter folder, median of N runs each.
#
# usage: cargo build --release -p lora-artifact --example store_op &&
#        crates/artifact/bench/store_bench.sh [SIZE_MIB] [RUNS]
#   BIN=path/to/store_op (default: $CARGO_TARGET_DIR or target, release profile)
set -euo pipefail
SIZE=${1:-256}
RUNS=${2:-5}
BIN=${BIN:-${CARGO_TARGET_DIR:-target}/release/examples/store_op}
PY=${PYTHON:-python3}
W=$(mktemp -d)
trap 'rm -rf "$W"' EXIT

# An adapter: config + SIZE MiB of weights + a 2 MiB tokenizer file.
mkdir -p "$W/adapter"
echo '{"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}' > "$W/adapter/adapter_config.json"
head -c $((SIZE * 1024 * 1024)) /dev/urandom > "$W/adapter/adapter_model.safetensors"
head -c $((2 * 1024 * 1024)) /dev/urandom > "$W/adapter/tokenizer.json"

now() { date +%s.%N; }
median() { sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

cat > "$W/anchor.py" <<'PY'
import hashlib, json, os, shutil, sys
src, root, trial = sys.argv[1], sys.argv[2], sys.argv[3]
h = hashlib.sha256()
for dp, dn, fn in os.walk(src):
    dn.sort()
    for n in sorted(fn):
        p = os.path.join(dp, n)
        h.update(os.path.relpath(p, src).encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
digest = h.hexdigest()
os.makedirs(root, exist_ok=True)
dst = os.path.join(root, f"trial_{trial}")
shutil.copytree(src, dst)
for dp, dn, fn in os.walk(dst):
    for n in fn:
        with open(os.path.join(dp, n), "rb+") as f:
            os.fsync(f.fileno())
idx = os.path.join(root, "index.json")
data = json.load(open(idx)) if os.path.exists(idx) else []
data.append({"trial": trial, "hash": digest, "path": dst})
json.dump(data, open(idx, "w"))
PY

declare -a ours ours_dedup ours_verify anchor core
for r in $(seq 1 "$RUNS"); do
  rm -rf "$W/store" "$W/py" "$W/cu"
  t0=$(now); "$BIN" "$W/store" store "$W/adapter" 1 >/dev/null; t1=$(now)
  "$BIN" "$W/store" store "$W/adapter" 2 >/dev/null; t2=$(now)
  "$BIN" "$W/store" verify >/dev/null; t3=$(now)
  "$PY" "$W/anchor.py" "$W/adapter" "$W/py" 1; t4=$(now)
  mkdir -p "$W/cu"; (cd "$W/adapter" && find . -type f | LC_ALL=C sort | xargs sha256sum > "$W/cu/manifest") && cp -r "$W/adapter" "$W/cu/trial_1" && sync -f "$W/cu/trial_1/adapter_model.safetensors"; t5=$(now)
  ours+=("$(echo "$t1 - $t0" | bc)"); ours_dedup+=("$(echo "$t2 - $t1" | bc)"); ours_verify+=("$(echo "$t3 - $t2" | bc)")
  anchor+=("$(echo "$t4 - $t3" | bc)"); core+=("$(echo "$t5 - $t4" | bc)")
done
mib=$((SIZE + 2))
row() { local name=$1; shift; local m; m=$(printf '%s\n' "$@" | median); printf '| %-44s | %6.3f s | %7.0f MiB/s |\n' "$name" "$m" "$(echo "$mib / $m" | bc -l)"; }
echo "adapter: $mib MiB in 3 files, $RUNS runs, median; $(nproc) cores"
echo "| what | median | throughput |"
echo "|---|---|---|"
row "lora-artifact store (new adapter)" "${ours[@]}"
row "lora-artifact store (same bytes, new trial)" "${ours_dedup[@]}"
row "lora-artifact verify" "${ours_verify[@]}"
row "anchor: Python hashlib + shutil.copytree" "${anchor[@]}"
row "coreutils: sha256sum + cp -r" "${core[@]}"
echo "store footprint after two stores of the same bytes: $(du -sm "$W/store" | cut -f1) MiB (python anchor after one: $(du -sm "$W/py" | cut -f1) MiB)"
