#!/usr/bin/env bash
# The GPU figures of benchmarks/RESULTS.md (one GPU, random-init weights):
#   embed: isa embed, ViT-L-14 from 640x480 JPEGs, against the tower's own forward rate;
#   train: isa train, efficientnet_b0 with M=4 and the ViT-L-14 text tower, batch 256, against the
#          training step alone (then 5 steps under torch.profiler: how busy its kernels keep the GPU)
#          and a plain loop; isa train's wait for its input is printed beside its rate.
# Usage: bash benchmarks/gpu.sh [LOG_DIR] [all|embed|train]; the tables are printed again at the end.
# Each part can take most of 10 minutes on one H100 with 16 cores (an earlier version of both took 7.4
# minutes, most of it building random-init ViT-L-14 models on the CPU): under a per-call limit, run the
# two parts as two calls. EMBED_FLAGS adds flags to the embed benchmark, e.g. "--tower-dtype bfloat16".
set -uo pipefail
cd "$(dirname "$0")/.."
logs=${1:-$(mktemp -d)}
part=${2:-all}
case $part in
    all | embed | train) ;;
    *) echo "gpu.sh: the part must be all, embed or train, not '$part'" >&2; exit 2 ;;
esac
mkdir -p "$logs"
export PYTHONUNBUFFERED=1
python=${PYTHON:-python3}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$logs/gpu.txt"
if [[ $part == all || $part == embed ]]; then
    timeout 600 "$python" benchmarks/embed_throughput.py --device cuda --teacher ViT-L-14 --images "${EMBED_IMAGES:-20000}" \
        --plain-images 1024 --batch-size 256 --fast-decode ${EMBED_FLAGS:-} 2>&1 | tee "$logs/embed.log"
fi
if [[ $part == all || $part == train ]]; then
    timeout 600 "$python" benchmarks/train_throughput.py --device cuda --make-cache --cache-images "${TRAIN_IMAGES:-8000}" \
        --steps "${TRAIN_STEPS:-150}" --plain-steps 40 --step-only 30 --profile 5 --rounds 1 2>&1 | tee "$logs/train.log"
fi
echo
cat "$logs/gpu.txt"
for log in "$logs"/embed.log "$logs"/train.log; do
    [[ -f $log ]] || continue
    grep -h "keep the device busy\|kernel ms per step" "$log"
    sed -n '/ · .* cores/,$p' "$log" | grep -v '^\s*$'
done
