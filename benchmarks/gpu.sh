#!/usr/bin/env bash
# The GPU figures of PERFORMANCE.md in one run (one GPU, random-init weights):
#   isa embed, ViT-L-14 from 640x480 JPEGs, against the tower's own forward rate;
#   isa train, efficientnet_b0 with M=4 and the ViT-L-14 text tower, batch 256.
# Usage: bash benchmarks/gpu.sh [LOG_DIR]; the tables are printed again at the end. An earlier version took
# 7.4 minutes on one H100 with 16 cores, most of it building random-init ViT-L-14 models on the CPU; this
# one adds the training-step ceiling and a second plain training loop.
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-$(mktemp -d)}
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
timeout 600 "$python" benchmarks/embed_throughput.py --device cuda --teacher ViT-L-14 --images "${EMBED_IMAGES:-20000}" \
    --plain-images 1024 --batch-size 256 --fast-decode 2>&1 | tee "$logs/embed.log"
timeout 600 "$python" benchmarks/train_throughput.py --device cuda --make-cache --cache-images "${TRAIN_IMAGES:-8000}" \
    --steps "${TRAIN_STEPS:-150}" --plain-steps 40 --step-only 30 --rounds 1 2>&1 | tee "$logs/train.log"
echo
cat "$logs/gpu.txt"
for log in "$logs/embed.log" "$logs/train.log"; do
    sed -n '/ · .* cores/,$p' "$log" | grep -v '^\s*$'
done
