#!/usr/bin/env bash
# The README's GPU measurements in one run, for a machine with a CUDA device (about 5-10
# minutes on an H200 class GPU, and step 4's compilation; each step is stopped after LIMIT
# seconds, default 240):
#
#   1. benchmarks/cuda_check.py: CUDA correctness (penalties, proximal maps, Fisher, training,
#      no host sync per step, every method against the CPU);
#   2. benchmarks/train_throughput.py: spbench's step against the bare loop at 224 px, batch 64,
#      fp32 and bf16, for ResNet-101 (issue goal: >= 0.95, bf16 >= 1.8x fp32, >= 2,000 images/s)
#      and ResNet-50 (the paper's grid trains both), then ResNet-101 in bf16 with 8, 16, 24 and
#      31 of its 34 units frozen (Fig. 3's runs, which make plan prices at the deepest measured
#      depth up to theirs: depths 1 and 4 at the full fine-tune's rate, 12 at 8's, ...);
#   3. benchmarks/penalty_overhead.py: every penalty's share of that step (bf16 autocast);
#   4. last (its compilation may take minutes; twice LIMIT): ResNet-101 in bf16 with its
#      backbone compiled (--compile, as finetune.compile), to set against step 2's eager bf16 row.
# Eleven files, named after the GPU. The grid's device-hours then come from step 2's JSON files,
# on any machine with the project's environment (step 4's price a config with finetune.compile):
#   python -m spbench.plan config/paper.yaml [config/halving.yaml] --throughput OUTDIR/*-throughput_*.json
# (the compiled run's file is left out, with a note, unless the config sets finetune.compile)
#
# Usage (from the checkout root):  bash benchmarks/on_device.sh OUTDIR
# PYTHON picks the interpreter (default: .venv/bin/python if there, else python3); the
# checkout's src/ goes first on PYTHONPATH, so an installed spbench is not needed. Every
# output lands in OUTDIR as <device>-<step>.txt (and .json), named after the GPU; a step
# that fails is reported and the others still run; the exit status is that of the worst.
set -uo pipefail
out=${1:?usage: bash benchmarks/on_device.sh OUTDIR}
mkdir -p "$out" && out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
py=${PYTHON:-$([ -x .venv/bin/python ] && echo .venv/bin/python || echo python3)}
limit=${LIMIT:-240}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
if ! slug=$("$py" -c 'import re, torch; assert torch.cuda.is_available(); print(re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-"))' 2>/dev/null); then
    echo "on_device.sh: no CUDA device visible to $py" >&2
    exit 2
fi
"$py" -c 'import torch; print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}")'
worst=0

step() {  # step NAME COMMAND...: run it under the time limit, its output into OUTDIR/<device>-NAME.txt
    local name=$1 rc
    shift
    echo "== $name: $*"
    local began=$SECONDS
    timeout "$limit" "$@" > "$out/$slug-$name.txt" 2>&1
    rc=$?
    tail -n 25 "$out/$slug-$name.txt"
    echo "== $name: exit $rc after $((SECONDS - began)) s"
    [ "$rc" -gt "$worst" ] && worst=$rc
    return 0
}

step cuda_check "$py" benchmarks/cuda_check.py --json "$out/$slug-cuda_check.json"
for arch in resnet101 resnet50; do
    step "throughput_$arch" "$py" benchmarks/train_throughput.py --device cuda --arch "$arch" --image 224 --batch 64 \
        --json-file "$out/$slug-throughput_$arch.json"
done
step throughput_resnet101_frozen "$py" benchmarks/train_throughput.py --device cuda --arch resnet101 --image 224 \
    --batch 64 --precisions bf16 --freeze 8,16,24,31 --json-file "$out/$slug-throughput_resnet101_frozen.json"
step penalty_overhead "$py" benchmarks/penalty_overhead.py --device cuda --arch resnet101 --dtype bfloat16 \
    --batch 64 --steps 5 --repeats 3
limit=$((2 * limit))  # the last step compiles ResNet-101's training graph first (minutes, not timed)
step throughput_resnet101_compiled "$py" benchmarks/train_throughput.py --device cuda --arch resnet101 --image 224 \
    --batch 64 --precisions bf16 --compile --json-file "$out/$slug-throughput_resnet101_compiled.json"
exit "$worst"
