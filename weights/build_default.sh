#!/usr/bin/env bash
# Rebuild weights/default from scratch: fetch the corpus, train, evaluate the held-out plays, write the card.
#
#   weights/build_default.sh                        # on 2 threads
#   THREADS=1 STEPS=4500 weights/build_default.sh   # on one thread, fewer steps
#
# The run lives in .cache/default-run (git-ignored) and saves every 250 steps: if that folder holds an
# unfinished run, this script resumes it (FRESH=1 starts over). Only config.json, model.safetensors and
# MODEL_CARD.md are copied into weights/default.
#
# The recipe: 3.3M parameters (dim 256, 4 layers of 4 heads x 64, window 128, rotary, no absolute positions,
# one residual stream), 16 crops of 512 bytes a step, AdamW lr 2e-3 with 200 warmup steps and cosine decay to
# 2e-4, weight decay 0.1, clipping 1.0, bfloat16 autocast. Why: the budget is about an hour of CPU training,
# which buys a few passes over the 8.5 MB of training text, what a model of this size can use; a larger one
# would see too few bytes. Crops of 4 windows (not 2) put most predicted bytes at full attention context, as
# when the model streams.
set -euo pipefail

root="$(cd "$(dirname "$0")/.." && pwd)"
cd "$root"
python="${PYTHON:-$root/.venv/bin/python}"
run="${RUN_DIR:-$root/.cache/default-run}"
threads="${THREADS:-2}"
steps="${STEPS:-6000}"

texts="$("$root/weights/fetch_shakespeare.sh")"
echo "corpus: $texts" >&2

resume=()
if [ "${FRESH:-0}" = 1 ]; then
    rm -rf "$run"
elif [ -d "$run/train_state" ]; then
    echo "resuming the run in $run (FRESH=1 starts over)" >&2
    resume=(--resume)
fi

# `windowlm train` runs this same function.
"$python" -m weights.train ${resume[@]+"${resume[@]}"} \
    --shakespeare "$texts" --val-fraction 0.1 --split-seed 0 \
    --out "$run" \
    --dim 256 --depth 4 --heads 4 --dim-head 64 --window 128 --ff-mult 4 --residual-streams 1 --no-dynamic-pos-bias \
    --steps "$steps" --batch-size 16 --seq-len 512 \
    --lr 2e-3 --min-lr-ratio 0.1 --warmup 200 --weight-decay 0.1 --grad-clip 1.0 --bf16 --seed 0 \
    --eval-every 250 --eval-batches 8 --eval-seq-len 2048 --sample-every 1000 --threads "$threads"

"$python" - "$run" <<'PY'
import sys
from weights.io import read_config
record = read_config(sys.argv[1]).training
if record.get("steps") != record.get("planned_steps") or "validation" not in record:
    sys.exit(f"build_default: the run in {sys.argv[1]} is not finished; run this script again to resume it")
PY

mkdir -p weights/default
for file in config.json model.safetensors; do
    cp "$run/$file" "weights/default/.$file.tmp"
    mv "weights/default/.$file.tmp" "weights/default/$file"
done
"$python" -m weights.model_card weights/default
du -h weights/default/model.safetensors >&2
grep -m1 "Held-out validation" weights/default/MODEL_CARD.md >&2
