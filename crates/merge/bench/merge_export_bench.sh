#!/usr/bin/env bash
# Merge + Q4_K_M export of the 135M `small` model: lora-trainer vs PEFT merge_and_unload +
# llama.cpp convert_hf_to_gguf.py + llama-quantize, side by side, wall time and peak RSS.
# Usage: merge_export_bench.sh WORK_DIR LLAMA_CPP_SRC
#   WORK_DIR gets small/ (anchors/make_tiny_llama.py --shape small) and ad16/ (a PEFT r16 adapter
#   on all 7 projections, tests/py/fixture.py adapter); LLAMA_CPP_SRC is a llama.cpp checkout
#   (for example llama-cpp-python's vendor/llama.cpp) for convert_hf_to_gguf.py.
set -euo pipefail
W=$1; SRC=$2
PY=${LORA_TRAINER_PYTHON:?set LORA_TRAINER_PYTHON}
EX=${MERGE_EXAMPLE_BIN:?cargo build --release -p lora-merge --example export; set MERGE_EXAMPLE_BIN=<target>/release/examples/export}
HERE=$(cd "$(dirname "$0")" && pwd)
LOG="$W/times.log"
T="/usr/bin/time -f %e_s_%M_KB -a -o $LOG"
label() { echo "== $*"; echo "== $*" >> "$LOG"; }
cd "$W"
rm -f "$LOG"; rm -rf ours.gguf ours-merged peft_merged anchor-f16.gguf anchor-q4km.gguf ours-from-merged.gguf
label "ours: merge + Q4_K_M in one streaming pass"
$T "$EX" small ad16 gguf q4_k_m ours.gguf
label "ours: merge to safetensors (f32)"
$T "$EX" small ad16 safetensors f32 ours-merged
label "anchor: PEFT merge_and_unload + save_pretrained"
$T "$PY" "$HERE/merge_anchor.py" small ad16 peft_merged > /dev/null 2>&1
label "anchor: convert_hf_to_gguf.py --outtype f16"
$T "$PY" "$HERE/convert_anchor.py" "$SRC" peft_merged --outtype f16 --outfile anchor-f16.gguf > /dev/null 2>&1
label "anchor: llama-quantize Q4_K_M"
$T "$PY" "$HERE/quantize_anchor.py" anchor-f16.gguf anchor-q4km.gguf > /dev/null 2>&1
label "ours: Q4_K_M from the same merged weights (no adapter)"
$T "$EX" peft_merged - gguf q4_k_m ours-from-merged.gguf
ls -l ours.gguf anchor-q4km.gguf ours-from-merged.gguf
cat "$LOG"
