"""Training-step throughput of the shared loop's step (forward, backward, clip, AdamW) on this machine:
tokens/s, ms/step and peak memory for the small preset and 124M, eager vs torch.compile, SDPA vs explicit
attention; and optimizer-state bytes of AdamW vs GaLore for 124M.

    python benchmarks/bench_train_step.py                 # CPU defaults (short sequences for 124M)
    python benchmarks/bench_train_step.py --device cuda --dtype bf16 --batch_size 16 --context_length 1024
"""

import argparse
import json
import subprocess
import sys
import types

from _common import peak_memory_mb, print_table, reset_peak_memory, timed

import torch

import gpt_train as gt
import pretraining_advanced as adv


def bench_step(preset, batch_size, context_length, runtime, flash, compile_, iters):
    gt.seed_everything(0)
    cfg = gt.get_config(preset, context_length=context_length, flash=flash)
    model = gt.GPTModel(cfg).to(runtime.device)
    step_model = gt.Runtime(runtime.device, runtime.dtype, compile_).prepare(model)
    opt = gt.make_adamw(model, 3e-4, device=runtime.device)
    x = torch.randint(0, cfg.vocab_size, (batch_size, context_length + 1), device=runtime.device)

    def step():
        with runtime.autocast():
            loss = gt.calc_loss_batch(x[:, :-1], x[:, 1:], step_model, runtime.device)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    reset_peak_memory(runtime.device)
    sec = timed(step, warmup=2 if not compile_ else 3, iters=iters, device=runtime.device)
    tokens = batch_size * context_length
    return {"preset": preset, "attention": "sdpa" if flash else "explicit", "mode": "compile" if compile_ else "eager",
            "batch x ctx": f"{batch_size} x {context_length}", "ms/step": f"{1000 * sec:.0f}",
            "tokens/s": f"{tokens / sec:,.0f}", "peak MB": f"{peak_memory_mb(runtime.device):,.0f}"}


def optimizer_bytes(optimizer_name, runtime, rank=128):
    gt.seed_everything(0)
    model = gt.GPTModel(gt.get_config("124M", context_length=64)).to(runtime.device)
    args = types.SimpleNamespace(optimizer=optimizer_name, lr=3e-4, weight_decay=0.1, beta1=0.9, beta2=0.95,
                                 galore_rank=rank, galore_update_proj_gap=200, galore_scale=0.25, galore_proj_type="std")
    opt = adv.make_optimizer(model, args, runtime.device)
    x = torch.randint(0, 50257, (1, 65), device=runtime.device)
    gt.calc_loss_batch(x[:, :-1], x[:, 1:], model, runtime.device).backward()
    opt.step()
    return adv.optimizer_state_bytes(opt)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu, cuda, ...")
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16", "fp16"), help="autocast precision")
    p.add_argument("--iters", type=int, default=3, help="timed steps per configuration")
    p.add_argument("--small_batch", type=int, default=16, help="batch size for the small preset")
    p.add_argument("--batch_size", type=int, default=2, help="batch size for 124M")
    p.add_argument("--context_length", type=int, default=256, help="sequence length for 124M")
    p.add_argument("--compile", action=argparse.BooleanOptionalAction, default=True, help="include torch.compile runs")
    p.add_argument("--galore", action=argparse.BooleanOptionalAction, default=True, help="include optimizer-state sizes")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    runtime = gt.setup_runtime(args.device, args.dtype)
    if args.one:  # a single configuration, in this (fresh) process, as JSON: peak memory is its own
        preset, bs, ctx, flash, compile_ = json.loads(args.one)
        print(json.dumps(bench_step(preset, bs, ctx, runtime, flash, compile_, args.iters)))
        return None
    print(f"device {runtime.device} ({torch.cuda.get_device_name() if runtime.device.type == 'cuda' else 'CPU'}), "
          f"{torch.get_num_threads()} threads, dtype {args.dtype}, torch {torch.__version__}")
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
    if args.galore:
        adamw, galore = optimizer_bytes("adamw", runtime), optimizer_bytes("galore", runtime)
        print(f"\noptimizer state for 124M: AdamW {adamw / 2**20:,.0f} MiB, GaLore (rank 128, attention+MLP) "
              f"{galore / 2**20:,.0f} MiB ({galore / adamw:.0%} of AdamW)")
    return rows


if __name__ == "__main__":
    main()
