"""The memory planner against what training measures: for each preset, with and without activation
checkpointing, with AdamW and GaLore, the planner's estimate (without its margin) next to the
measured peak of a few loop steps (train_step) in a fresh process: the CPU's resident memory above
what the process held before the model existed, or torch.cuda.max_memory_allocated on a GPU. Also the
time activation checkpointing costs.

    python benchmarks/bench_memory.py                          # CPU: debug, small, 124M, 355M (short context)
    python benchmarks/bench_memory.py --device cuda --context_length 1024 --batch_size 8
    python benchmarks/bench_memory.py --device cuda --cap_gb 24 --presets 1558M --optimizer galore --dtype bf16
"""

import argparse
import json
import subprocess
import sys
import time

from _common import make_optimizer, make_train_step, print_table

import torch

import gpt_train as gt


def rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def peak_rss_bytes() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    return 0


def measure(preset: str, ctx: int, batch: int, dtype: str, optimizer: str, ckpt: bool, device: str, steps: int,
            cap_gb: float | None) -> dict:
    """One configuration in this process: peak memory above the baseline, seconds per step."""
    runtime = gt.setup_runtime(device, dtype)
    if runtime.device.type == "cuda" and cap_gb:
        total = torch.cuda.get_device_properties(runtime.device).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gb * 2**30 / total), runtime.device)
    cfg = gt.get_config(preset, context_length=ctx, activation_checkpointing=ckpt)
    if optimizer == "galore":  # its imports (bitsandbytes) are not training memory
        import galore_torch  # noqa: F401
    base = torch.cuda.memory_allocated(runtime.device) if runtime.device.type == "cuda" else rss_bytes()
    step, _, _ = make_train_step(cfg, batch, runtime, steps + 1,
                                 optimizer=lambda m: make_optimizer(optimizer, m, runtime.device))
    step()  # the optimizer state exists from the first step on
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats(runtime.device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if runtime.device.type == "cuda":
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated(runtime.device) - base
    else:
        peak = peak_rss_bytes() - base
    setup = gt.TrainSetup(batch_size=batch, dtype=runtime.dtype, optimizer=optimizer,
                          activation_checkpointing=ckpt, cuda=runtime.device.type == "cuda")
    plan = gt.memory_plan(cfg, setup)
    estimate = plan["total"] - plan["margin"]
    return {"preset": preset, "batch x ctx": f"{batch} x {ctx}", "dtype": runtime.dtype, "optimizer": optimizer,
            "act. ckpt": ckpt, "estimate GiB": round(estimate / 2**30, 3), "measured GiB": round(peak / 2**30, 3),
            "estimate / measured": f"{estimate / max(peak, 1):.2f}",
            "s/step": f"{(time.perf_counter() - t0) / steps:.2f}"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--presets", default="debug,small,124M,355M", help="comma-separated presets")
    p.add_argument("--context_length", type=int, default=256, help="sequence length (the small presets keep theirs)")
    p.add_argument("--batch_size", type=int, default=2, help="micro-batch")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"), help="precision")
    p.add_argument("--optimizer", default="both", choices=("adamw", "galore", "both"), help="optimizers to measure")
    p.add_argument("--steps", type=int, default=2, help="timed steps per configuration")
    p.add_argument("--cap_gb", type=float, default=None, help="on a GPU: cap this process's memory to this many GB")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        print(json.dumps(measure(*json.loads(args.one))))
        return None
    rows = []
    optimizers = ("adamw", "galore") if args.optimizer == "both" else (args.optimizer,)
    for preset in args.presets.split(","):
        ctx = min(args.context_length, gt.get_config(preset).context_length)
        for optimizer in optimizers:
            for ckpt in (False, True):
                one = json.dumps([preset, ctx, args.batch_size, args.dtype, optimizer, ckpt, args.device, args.steps,
                                  args.cap_gb])
                r = subprocess.run([sys.executable, __file__, "--one", one], capture_output=True, text=True)
                if r.returncode:
                    why = (r.stderr.strip().splitlines() or ["?"])[-1][:60]
                    rows.append({"preset": preset, "optimizer": optimizer, "act. ckpt": ckpt, "estimate GiB": "",
                                 "measured GiB": f"failed: {why}"})
                else:
                    rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
                print(rows[-1], flush=True)
    print()
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
