"""Shared bits of the benchmark scripts: import path, peak-memory probes, table printing."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import gpt_train as gt  # noqa: E402


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) of this process
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return float("nan")


def timed(fn, warmup: int, iters: int, device: torch.device) -> float:
    """Seconds per call of fn after `warmup` untimed calls."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - t0) / iters


def print_table(rows: list[dict]) -> None:
    if not rows:
        return
    cols = list(dict.fromkeys(c for r in rows for c in r))  # every row's columns (an error row has its own)
    widths = {c: max(len(c), *(len(str(r.get(c, ""))) for r in rows)) for c in cols}
    print(" | ".join(c.ljust(widths[c]) for c in cols))
    print("-+-".join("-" * widths[c] for c in cols))
    for r in rows:
        print(" | ".join(str(r.get(c, "")).ljust(widths[c]) for c in cols))


def random_batches(cfg, batch_size: int, steps: int, device, seed: int = 0) -> "gt.BatchSampler":
    """A BatchSampler over random token ids, enough for `steps` micro-batches: the loop's own batch
    source (pinned prefetch on a GPU), without reading a corpus."""
    n = batch_size * (cfg.context_length + 1) * (steps + 1)
    ids = np.random.default_rng(seed).integers(0, cfg.vocab_size, size=n).astype(np.uint16)
    return gt.BatchSampler(gt.TokenWindowDataset(ids, cfg.context_length), batch_size, seed=seed, device=device)


def make_optimizer(name: str, model, device, lr: float = 3e-4, **config):
    """An optimizer of the registry by name, its own settings from `config` (defaults otherwise)."""
    from gptkit.optim import OptimArgs, build_optimizer, optimizer_spec

    spec = optimizer_spec(name)
    return build_optimizer(model, OptimArgs(optimizer=name, lr=lr), spec.config(**config) if spec.config else None,
                           device)


def make_train_step(cfg, batch_size: int, runtime: "gt.Runtime", steps: int, optimizer=None, grad_accum: int = 1):
    """(fn, model, optimizer): fn() runs one `gt.train_step` (the training loop's own step: micro-batches,
    autocast, scaling, clipping, the reduction and the update) on a fresh model of `cfg`."""
    gt.seed_everything(0)
    model = runtime.prepare(gt.GPTModel(cfg))
    opt = optimizer(model) if optimizer else gt.make_adamw(model, 3e-4, device=runtime.device)
    batches = random_batches(cfg, batch_size, steps * grad_accum, runtime.device)
    scaler = runtime.grad_scaler()
    return (lambda: gt.train_step(model, opt, batches, runtime, grad_accum, 1.0, scaler)), model, opt
