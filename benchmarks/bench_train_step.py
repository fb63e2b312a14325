"""Training-step throughput of the loop's own `gpt_train.train_step` (forward, backward, clip, the
cross-rank reduction, AdamW) on this machine.

1. Precision: fp32 against --dtype auto (what the scripts use by default) for the small preset and
   124M, in interleaved rounds in one process, so the ratio is fair whatever else the machine does.
2. Modes: tokens/s, ms/step and peak memory for eager vs torch.compile and SDPA vs explicit attention,
   each configuration in a fresh process (its peak memory is its own). Optimizer state of AdamW vs GaLore.

    python benchmarks/bench_train_step.py                 # CPU defaults (short sequences for 124M)
    python benchmarks/bench_train_step.py --device cuda --dtype bf16 --batch_size 16 --context_length 1024
"""

import argparse
import json
import statistics
import subprocess
import sys
import time

from _common import make_optimizer, make_train_step, peak_memory_mb, print_table, reset_peak_memory, timed

import torch

import gpt_train as gt
from gptkit.optim import measured_state_bytes, optimizer_spec


def bench_step(preset, batch_size, context_length, runtime, flash, compile_, iters):
    cfg = gt.get_config(preset, context_length=context_length, flash=flash)
    rt = gt.Runtime(runtime.device, runtime.dtype, compile_)
    step, _, _ = make_train_step(cfg, batch_size, rt, iters + 3)
    reset_peak_memory(runtime.device)
    sec = timed(step, warmup=2 if not compile_ else 3, iters=iters, device=runtime.device)
    tokens = batch_size * context_length
    return {"preset": preset, "attention": "sdpa" if flash else "explicit", "mode": "compile" if compile_ else "eager",
            "batch x ctx": f"{batch_size} x {context_length}", "ms/step": f"{1000 * sec:.0f}",
            "tokens/s": f"{tokens / sec:,.0f}", "peak MB": f"{peak_memory_mb(runtime.device):,.0f}"}


def precision_rounds(preset, batch_size, context_length, device, rounds, steps_per_round):
    """tokens/s of fp32 and of --dtype auto, alternating round by round; medians and their ratio."""
    cfg = gt.get_config(preset, context_length=context_length)
    runtimes = {"fp32": gt.setup_runtime(device, "fp32"), "auto": gt.setup_runtime(device, "auto")}
    steps = {name: make_train_step(cfg, batch_size, rt, rounds * steps_per_round + 2)[0] for name, rt in runtimes.items()}
    for step in steps.values():
        step()  # warm-up: first-call allocations and kernel choices
    rates = {name: [] for name in steps}
    losses = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            for _ in range(steps_per_round):
                losses[name].append(step().loss)
            rates[name].append(steps_per_round * batch_size * context_length / (time.perf_counter() - t0))
    fp32, auto = statistics.median(rates["fp32"]), statistics.median(rates["auto"])
    return {"preset": preset, "batch x ctx": f"{batch_size} x {context_length}",
            "auto is": f"{runtimes['auto'].dtype} ({runtimes['auto'].dtype_reason})",
            "fp32 tok/s": f"{fp32:,.0f}", "auto tok/s": f"{auto:,.0f}", "auto / fp32": f"{auto / fp32:.2f}x",
            "last loss fp32 / auto": f"{losses['fp32'][-1]:.4f} / {losses['auto'][-1]:.4f}"}


def optimizer_bytes(optimizer_name, runtime, rank=128):
    config = {"rank": rank} if optimizer_name == "galore" else {}
    step, _, opt = make_train_step(gt.get_config("124M", context_length=64), 1, runtime, 2,
                                   optimizer=lambda m: make_optimizer(optimizer_name, m, runtime.device, **config))
    step()
    return measured_state_bytes(opt, optimizer_spec(optimizer_name))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast precision of the modes table")
    p.add_argument("--iters", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--small_batch", type=int, default=16, help="batch size for the small preset")
    p.add_argument("--batch_size", type=int, default=2, help="batch size for 124M")
    p.add_argument("--context_length", type=int, default=256, help="sequence length for 124M")
    p.add_argument("--rounds", type=int, default=5, help="interleaved rounds of the precision comparison")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="include torch.compile runs")
    p.add_argument("--modes", action=argparse.BooleanOptionalAction, default=True, help="run the modes table")
    p.add_argument("--galore", action=argparse.BooleanOptionalAction, default=True, help="include optimizer-state sizes")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    runtime = gt.setup_runtime(args.device, args.dtype)
    if args.one:  # a single configuration, in this (fresh) process, as JSON: peak memory is its own
        preset, bs, ctx, flash, compile_ = json.loads(args.one)
        print(json.dumps(bench_step(preset, bs, ctx, runtime, flash, compile_, args.iters)))
        return None
    print(f"device {runtime.device} ({torch.cuda.get_device_name() if runtime.device.type == 'cuda' else cpu_name()}), "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}, CPU capability "
          f"{torch.backends.cpu.get_cpu_capability()}")
    rows = [precision_rounds("small", args.small_batch, 128, args.device, args.rounds, 5),
            precision_rounds("124M", args.batch_size, args.context_length, args.device, args.rounds, 2)]
    print_table(rows)
    if args.modes:
        rows = modes_table(args)
    if args.galore:
        adamw, galore = optimizer_bytes("adamw", runtime), optimizer_bytes("galore", runtime)
        print(f"\noptimizer state for 124M: AdamW {adamw / 2**20:,.0f} MiB, GaLore (rank 128, attention+MLP) "
              f"{galore / 2**20:,.0f} MiB ({galore / adamw:.0%} of AdamW)")
    return rows


def modes_table(args) -> list[dict]:
    rows = []
    for preset, bs, ctx in (("small", args.small_batch, 128), ("124M", args.batch_size, args.context_length)):
        for flash, compile_ in ((True, False), (False, False), (True, True)):
            if compile_ and not args.compile:
                continue
            one = json.dumps([preset, bs, ctx, flash, compile_])
            r = subprocess.run([sys.executable, __file__, "--one", one, "--device", args.device, "--dtype", args.dtype,
                                "--iters", str(args.iters)], capture_output=True, text=True, check=True)
            rows.append(json.loads(r.stdout.strip().splitlines()[-1]))
            print(" | ".join(f"{k} {v}" for k, v in rows[-1].items()), flush=True)
    print()
    print_table(rows)
    return rows


def cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    import platform

    return platform.processor() or "CPU"


if __name__ == "__main__":
    main()
