"""GPU benchmark and CUDA-only checks, for a machine with an NVIDIA GPU (e.g. an H100):
124M, bf16 autocast, torch.compile, SDPA, context 1024 -> tokens/s and MFU (target >= 50%), then
eager/explicit-attention comparisons, fused AdamW, fp16 with loss scaling, and a short real run of
pretraining_advanced.py (log line with MFU, checkpoint, resume). Exits 0 with a note when there is no GPU.

    python benchmarks/bench_gpu.py                   # ~3-5 minutes on an H100
    python benchmarks/bench_gpu.py --batch_size 32 --iters 30
"""

import argparse
import math
import sys
import tempfile
from pathlib import Path

from _common import make_train_step, peak_memory_mb, print_table, reset_peak_memory, timed

import torch

import gpt_train as gt
import pretraining_advanced as adv


def measure(cfg, batch_size, runtime, compile_, iters, fused=True):
    """The training loop's own train_step, timed: tokens/s, MFU and peak memory."""
    rt = gt.Runtime(runtime.device, runtime.dtype, compile_)
    step, model, _ = make_train_step(cfg, batch_size, rt, iters + 8, optimizer=lambda m: torch.optim.AdamW(
        gt.param_groups(gt.unwrap_model(m), 0.1), lr=3e-4, fused=fused))
    reset_peak_memory(runtime.device)
    sec = timed(step, warmup=5 if compile_ else 2, iters=iters, device=runtime.device)
    tokens = batch_size * cfg.context_length
    peak = adv.peak_flops_for(runtime.device)
    mfu = gt.flops_per_token(cfg) * tokens / sec / peak if peak else float("nan")
    loss = step().loss
    return {"dtype": runtime.dtype, "attention": "sdpa" if cfg.flash else "explicit",
            "mode": "compile" if compile_ else "eager", "fused adamw": fused, "batch": batch_size,
            "ms/step": f"{1000 * sec:.1f}", "tokens/s": f"{tokens / sec:,.0f}", "MFU": f"{100 * mfu:.1f}%",
            "peak GiB": f"{peak_memory_mb(runtime.device) / 1024:.1f}", "loss finite": bool(math.isfinite(loss))}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--batch_size", type=int, default=16, help="sequences per step (context 1024)")
    p.add_argument("--iters", type=int, default=20, help="timed steps per configuration")
    p.add_argument("--quick", action="store_true", help="only the headline configuration")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark is skipped (run it on a machine with an NVIDIA GPU)")
        return []
    name = torch.cuda.get_device_name()
    print(f"{name}, torch {torch.__version__}, CUDA {torch.version.cuda}, peak bf16 "
          f"{(adv.peak_flops_for(torch.device('cuda')) or float('nan')) / 1e12:.0f} TFLOP/s, "
          f"flash SDPA {'on' if torch.backends.cuda.flash_sdp_enabled() else 'off'}")
    cfg = gt.get_config("124M")
    bf16 = gt.setup_runtime("cuda", "bf16")
    rows = [measure(cfg, args.batch_size, bf16, compile_=True, iters=args.iters)]
    print_table(rows)
    if not args.quick:
        rows.append(measure(cfg, args.batch_size, bf16, compile_=False, iters=args.iters))
        rows.append(measure(gt.get_config("124M", flash=False), args.batch_size // 2, bf16, compile_=False,
                            iters=args.iters))
        rows.append(measure(cfg, args.batch_size, bf16, compile_=True, iters=args.iters, fused=False))
        rows.append(measure(cfg, args.batch_size, gt.setup_runtime("cuda", "fp16"), compile_=True, iters=args.iters))
        print()
        print_table(rows)
        # The real script end to end on the GPU: log line with MFU, checkpoint, resume.
        with tempfile.TemporaryDirectory() as tmp:
            flags = ["--model", "124M", "--batch_size", str(args.batch_size), "--compile", "--dtype", "bf16",
                     "--warmup_steps", "10", "--log_every", "10", "--eval_every", "0", "--no-progress",
                     "--run_dir", str(Path(tmp) / "run"), "--cache_dir", str(Path(tmp) / "cache"),
                     "--val_fraction", "0.05"]
            first = adv.main([*flags, "--max_steps", "30"])
            again = adv.main([*flags, "--max_steps", "40", "--resume", "auto"])
            print(f"pretraining_advanced.py on {name}: steps {first['state'].step} -> {again['state'].step}, "
                  f"loss {first['history']['train_loss'][0]:.3f} -> {again['history']['train_loss'][-1]:.3f}")
    return rows


if __name__ == "__main__":
    sys.exit(0 if main() is not None else 1)
