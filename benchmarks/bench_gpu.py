"""The GPU check: every CUDA path of the toolkit run once and the 124M headline measured, in one go
(about 6 minutes on an H100; benchmarks/gpu_check.sh wraps it for a fresh GPU machine). Stages run
most important first; each is recorded even when it fails, so one broken path hides no other, and
stages that would not finish inside --budget_s are skipped and say so:

  headline  124M, context 1024, bf16 autocast, torch.compile, SDPA, fused AdamW, vocabulary padded to
            50304: the training loop's own train_step at each --batch_sizes -> tokens/s, MFU, memory
  real_run  pretraining_advanced.py itself at the best batch size: its logged tok/s and MFU, the
            checkpoint it writes and a --resume auto from it
  torchrun  torchrun --nproc_per_node 1 (NCCL): SIGTERM to the job mid-run (as a scheduler would), the
            checkpoint of that step, then --resume auto from it
  eager     the headline without torch.compile
  explicit  attention written out (no SDPA), eager, half the batch
  fp16      fp16 autocast with loss scaling
  galore    GaLore AdamW (rank 128) instead of AdamW
  355M      GPT-2 medium, compiled
  unpadded  the headline with the plain 50257-row vocabulary
  1558M_24GB  GPT-2 XL on the GPU capped to 24 GB (set_per_process_memory_fraction): the single-card
            path for the big presets, bf16 + activation checkpointing + GaLore, batch 1

MFU counts 6N + 12 L d T FLOPs per token (PaLM's appendix) against the GPU's dense bf16 peak (989
TFLOP/s for an H100 SXM). Each row is appended to --out (JSON lines) as soon as it is measured.

    python benchmarks/bench_gpu.py --out gpu_results.jsonl
    python benchmarks/bench_gpu.py --stages headline --batch_sizes 8,16,32,64
    python benchmarks/bench_gpu.py --smoke      # every stage on CPU with the debug model: checks this script
"""

import argparse
import dataclasses
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import make_optimizer, make_train_step, peak_memory_mb, print_table, reset_peak_memory, timed

import torch

import gpt_train as gt
from gptkit.runtime import peak_flops_for

ROOT = Path(__file__).resolve().parents[1]
STAGES = ("headline", "real_run", "torchrun", "eager", "explicit", "fp16", "galore", "355M", "unpadded", "1558M_24GB")
# About how long each stage takes on an H100 (compiles dominate), to skip what would overrun the budget.
STAGE_SECONDS = {"headline": 150, "real_run": 120, "torchrun": 70, "eager": 15, "unpadded": 45, "explicit": 15,
                 "fp16": 50, "galore": 50, "355M": 70, "1558M_24GB": 60}
LOG_LINE = re.compile(r"^step\s+(\d+)/\d+ \| loss ([\d.]+) .*\| tok/s\s+(\d+) \| ms/step\s+([\d.]+)(?: \| mfu ([\d.]+)%)?")


@dataclasses.dataclass
class Plan:
    """What the stages run: a GPU and GPT-2 sizes, or (--smoke) the CPU and tiny models."""
    device: str = "cuda"
    model: str = "124M"
    big_model: str = "355M"
    huge_model: str = "1558M"
    dtype: str = "bf16"
    compile: bool = True
    batch_sizes: tuple[int, ...] = (16, 32, 64)
    iters: int = 20
    run_steps: int = 60
    budget_s: float = 450.0
    data: str = "gutenberg"  # --data of the script runs


SMOKE = Plan(device="cpu", model="debug", big_model="small", huge_model="small", compile=False, batch_sizes=(2, 4), iters=2,
             run_steps=6, budget_s=600.0)


class Results:
    """Rows printed as they come and appended to a JSON-lines file, so a run cut short keeps them."""

    def __init__(self, path: Path | None):
        self.path, self.rows = path, []

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        if self.path:
            with open(self.path, "a", encoding="utf-8") as f:
                f.write(json.dumps(row) + "\n")
        return row


def measure(stage: str, plan: Plan, preset: str, batch: int, dtype: str | None = None, compile_: bool | None = None,
            optimizer: str = "adamw", **overrides) -> dict:
    """The training loop's own step (gt.train_step) on random tokens, timed after warm-up."""
    dtype = dtype or plan.dtype
    compile_ = plan.compile if compile_ is None else compile_
    cfg = gt.get_config(preset, **{"vocab_multiple": 64, **overrides})
    runtime = gt.setup_runtime(plan.device, dtype, compile_)
    make_opt = None
    if optimizer == "galore":
        make_opt = lambda m: make_optimizer("galore", m, runtime.device, rank=min(128, cfg.emb_dim // 2))  # noqa: E731
    row = {"stage": stage, "model": preset, "batch": batch, "context": cfg.context_length, "dtype": dtype,
           "attention": "sdpa" if cfg.flash else "explicit", "compile": compile_, "optimizer": optimizer,
           "vocab": cfg.padded_vocab_size}
    t0 = time.perf_counter()
    try:
        sec, loss, peak_mb = _time_steps(cfg, batch, runtime, plan.iters, make_opt)
    except torch.cuda.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    finally:
        torch._dynamo.reset()  # each model is new: start each measurement from empty compile caches
        if runtime.device.type == "cuda":
            torch.cuda.empty_cache()
    tokens = batch * cfg.context_length
    peak = peak_flops_for(runtime.device)
    mfu = gt.flops_per_token(cfg) * tokens / sec / peak if peak else None
    return {**row, "ms/step": round(1000 * sec, 2), "tokens/s": round(tokens / sec),
            "MFU %": round(100 * mfu, 1) if mfu else None, "peak GiB": round(peak_mb / 1024, 2),
            "loss": round(loss, 4), "wall s": round(time.perf_counter() - t0, 1)}


def _time_steps(cfg, batch: int, runtime, iters: int, make_opt) -> tuple[float, float, float]:
    """(seconds per step, the loss of one more step, peak memory in MiB); the model and optimizer are
    freed when this returns."""
    warmup = 3 if runtime.compile else 2  # compilation of forward, backward and the optimizer's first step
    step, _, _ = make_train_step(cfg, batch, runtime, warmup + iters + 1, optimizer=make_opt)
    reset_peak_memory(runtime.device)
    sec = timed(step, warmup=warmup, iters=iters, device=runtime.device)
    return sec, step().loss, peak_memory_mb(runtime.device)


def script_flags(plan: Plan, work: Path, batch: int, compile_: bool) -> list[str]:
    """pretraining_advanced.py on plan.data (the embedded Gutenberg sample), its cache and run folder in `work`."""
    return ["--model", plan.model, "--batch_size", str(batch), "--device", plan.device, "--dtype", plan.dtype,
            "--compile" if compile_ else "--no-compile", "--warmup_steps", "10", "--log_every", "5",
            "--eval_every", "0", "--eval_iters", "5", "--sample_every", "0", "--no-progress",
            "--data", plan.data, "--cache_dir", str(work / "cache"), "--run_dir", str(work / "run")]


def logged_steps(output: str) -> list[dict]:
    rows = []
    for line in output.splitlines():
        m = LOG_LINE.match(line.strip())
        if m:
            rows.append({"step": int(m[1]), "loss": float(m[2]), "tok/s": int(m[3]), "ms": float(m[4]),
                         "mfu": float(m[5]) if m[5] else None})
    return rows


def _env() -> dict:
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _run(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def _steady(steps: list[dict]) -> dict:
    """Median speed over the logged steps after the first two (compilation, warm-up)."""
    late = steps[2:] or steps
    mfus = [s["mfu"] for s in late if s["mfu"] is not None]
    return {"tokens/s": round(statistics.median(s["tok/s"] for s in late)),
            "ms/step": round(statistics.median(s["ms"] for s in late), 2),
            "MFU %": round(statistics.median(mfus), 1) if mfus else None}


def real_run(plan: Plan, batch: int, work: Path) -> dict:
    """pretraining_advanced.py as a user runs it: its own log lines give the speed."""
    script = [sys.executable, "pretraining_advanced.py", *script_flags(plan, work, batch, plan.compile)]
    first = _run([*script, "--max_steps", str(plan.run_steps)], timeout=400)
    steps = logged_steps(first.stdout)
    row = {"stage": "real_run", "model": plan.model, "batch": batch, "dtype": plan.dtype, "compile": plan.compile,
           "rc": first.returncode}
    if first.returncode != 0 or not steps:
        return {**row, "error": (first.stderr or first.stdout)[-1500:]}
    ckpts = sorted(p.name for p in (work / "run").glob("ckpt_*"))
    again = _run([*script, "--max_steps", str(plan.run_steps + 10), "--resume", "auto"], timeout=300)
    resumed = logged_steps(again.stdout)
    return {**row, **_steady(steps), "first loss": steps[0]["loss"], "last loss": steps[-1]["loss"],
            "checkpoints": ckpts, "resume rc": again.returncode,
            "resumed steps": [s["step"] for s in resumed],
            "resume error": None if again.returncode == 0 else again.stderr[-1500:]}


def torchrun_sigterm(plan: Plan, batch: int, work: Path) -> dict:
    """A one-process torchrun job (NCCL on a GPU) stopped by SIGTERM to its whole process group after
    its first checkpoint, then resumed: the stop must save the step it reached and exit 143."""
    run_dir = work / "run"
    script = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "pretraining_advanced.py",
              *script_flags(plan, work, batch, compile_=False), "--save_every", "10"]
    log = open(work / "torchrun.log", "w+")
    proc = subprocess.Popen([sys.executable, *script, "--max_steps", "100000"], cwd=ROOT, env=_env(), stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None and not list(run_dir.glob("ckpt_00000010*")):
        time.sleep(0.5)
    time.sleep(1.0)
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        rc = proc.wait(timeout=120)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        rc = "hung after SIGTERM"
    log.seek(0)
    out = log.read()
    saved = sorted(int(p.name[5:13]) for p in run_dir.glob("ckpt_*"))
    reached = max((s["step"] for s in logged_steps(out)), default=0)
    row = {"stage": "torchrun", "rc after SIGTERM": rc, "last logged step": reached, "checkpoints": saved,
           "stop message": "SIGTERM received" in out}
    if not saved:
        return {**row, "error": out[-1500:]}
    again = _run([sys.executable, *script, "--max_steps", str(saved[-1] + 5), "--resume", "auto"], timeout=240)
    resumed = logged_steps(again.stdout)
    return {**row, "resume rc": again.returncode, "resumed from": _resumed_from(again.stdout),
            "resumed steps": [s["step"] for s in resumed],
            "resume error": None if again.returncode == 0 else (again.stderr or again.stdout)[-1500:]}


def _resumed_from(output: str) -> int | None:
    m = re.search(r"resumed from .* at step (\d+)", output)
    return int(m[1]) if m else None


def run_stage(name: str, plan: Plan, best: dict, work: Path) -> list[dict]:
    b = best.get("batch", plan.batch_sizes[0])
    if name == "headline":
        return sweep(plan, best)
    if name == "real_run":
        return [real_run(plan, b, work)]
    if name == "torchrun":
        return [torchrun_sigterm(plan, b, work)]
    if name == "eager":
        return [measure("eager", plan, plan.model, b, compile_=False)]
    if name == "unpadded":
        return [measure("unpadded", plan, plan.model, b, vocab_multiple=1)]
    if name == "explicit":
        return [measure("explicit", plan, plan.model, max(1, b // 2), compile_=False, flash=False)]
    if name == "fp16":
        return [measure("fp16", plan, plan.model, b, dtype="fp16")]
    if name == "galore":
        return [measure("galore", plan, plan.model, b, optimizer="galore")]
    if name == "1558M_24GB":
        return [capped_24gb(plan)]
    return [measure(name, plan, plan.big_model, max(1, b // 2))]


def capped_24gb(plan: Plan) -> dict:
    """The biggest preset on a 24 GB card, simulated by capping this process's share of the GPU."""
    if plan.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * 2**30 / total))
    try:
        return measure("1558M_24GB", plan, plan.huge_model, 1, compile_=False, optimizer="galore",
                       activation_checkpointing=True)
    finally:
        if plan.device == "cuda":
            torch.cuda.set_per_process_memory_fraction(1.0)


def sweep(plan: Plan, best: dict) -> list[dict]:
    """The headline at each batch size, up to the first that does not fit; `best` gets the fastest."""
    rows = []
    for batch in plan.batch_sizes:
        rows.append(measure("headline", plan, plan.model, batch))
        if "error" in rows[-1]:
            break
        if rows[-1]["tokens/s"] > best.get("tokens/s", 0):
            best.update(rows[-1])
    return rows


def environment(plan: Plan) -> dict:
    row = {"stage": "environment", "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": sys.version.split()[0], "device": plan.device}
    if plan.device == "cuda":
        row.update(gpu=torch.cuda.get_device_name(), memory_gib=round(torch.cuda.get_device_properties(0).total_memory
                                                                       / 2**30, 1),
                   peak_bf16_tflops=(peak_flops_for(torch.device("cuda")) or 0) / 1e12,
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled(), nccl=str(torch.cuda.nccl.version()))
    return row


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=gt.HelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in this order")
    p.add_argument("--batch_sizes", default=None, help="headline batch sizes (sequences of 1024 tokens), e.g. 16,32,64")
    p.add_argument("--iters", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--budget_s", type=float, default=None, help="skip stages that would end after this many seconds")
    p.add_argument("--data", default=None, help="--data for the pretraining_advanced.py runs (default: the Gutenberg sample)")
    p.add_argument("--out", type=Path, default=None, help="append each result row to this JSON-lines file")
    p.add_argument("--smoke", action="store_true", help="run every stage on the CPU with tiny models (checks the script)")
    args = p.parse_args(argv)
    plan = SMOKE if args.smoke else Plan()
    plan = dataclasses.replace(plan, **{k: v for k, v in {
        "batch_sizes": tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else None,
        "iters": args.iters, "budget_s": args.budget_s, "data": args.data}.items() if v is not None})
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark is skipped (run it on a machine with an NVIDIA GPU, or --smoke)")
        return []
    return run_all(plan, stages, Results(args.out))


def run_all(plan: Plan, stages: list[str], results: Results) -> list[dict]:
    start, best = time.perf_counter(), {}
    results.add(environment(plan))
    with tempfile.TemporaryDirectory() as tmp:
        for name in stages:
            elapsed = time.perf_counter() - start
            if elapsed + STAGE_SECONDS[name] > plan.budget_s:
                results.add({"stage": name, "skipped": f"time budget ({elapsed:.0f} s used of {plan.budget_s:.0f})"})
                continue
            (Path(tmp) / name).mkdir()
            try:
                for row in run_stage(name, plan, best, Path(tmp) / name):
                    results.add(row)
            except Exception as e:  # one broken path must not hide the others
                results.add({"stage": name, "error": f"{type(e).__name__}: {e}"[-1500:]})
    table = [r for r in results.rows if "tokens/s" in r and r["stage"] != "real_run"]
    print()
    print_table([{k: r.get(k) for k in ("stage", "model", "batch", "dtype", "attention", "compile", "optimizer",
                                        "vocab", "ms/step", "tokens/s", "MFU %", "peak GiB")} for r in table])
    return results.rows


if __name__ == "__main__":
    main()
