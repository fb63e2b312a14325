"""The GPU check's benchmark: each stage in a process of its own, under a timeout of its own, its rows
appended to --out (JSON lines) as each is measured and its whole output kept in --logs, so a crash, an
NCCL abort or a timeout in one stage loses no other stage's rows. benchmarks/gpu_check.sh runs it
after tests/test_cuda.py on a fresh GPU machine.

Stages, in this order (the first four always; the rest while the budget lasts):

  headline  124M, context 1024, bf16 autocast, torch.compile, SDPA, fused AdamW, vocabulary padded to
            50304: the training loop's own train_step, at each of two batch sizes (a process each)
  real_run  pretraining_advanced.py itself at the better batch size: its logged tok/s and MFU (averaged
            over each log interval), the checkpoint it writes and a --resume auto from it
  eager     the headline without torch.compile
  explicit  attention written out (no SDPA), eager, half the batch
  355M      GPT-2 medium, compiled
  galore    GaLore AdamW (rank 128) instead of AdamW
  fp16      fp16 autocast with loss scaling
  1558M_24GB  GPT-2 XL on the GPU capped to 24 GB (set_per_process_memory_fraction): the single-card
            path for the big presets, bf16 + activation checkpointing + GaLore, batch 1

Every measured row has tokens/s, MFU (6N + the attention's FLOPs per token against the GPU's dense
bf16 peak: the table in gptkit/runtime.py, or --peak_tflops), peak memory allocated by tensors (what
the memory planner counts, and its estimate beside it) and reserved by the allocator.

    python benchmarks/bench_gpu.py --out gpu_results.jsonl --logs gpu_logs --budget_s 300
    python benchmarks/bench_gpu.py --stages headline --batch_sizes 16,32
    python benchmarks/bench_gpu.py --smoke      # every stage on the CPU with tiny models (checks this script)
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
STAGES = ("headline", "real_run", "eager", "explicit", "355M", "galore", "fp16", "1558M_24GB")
# Each stage's timeout on an H200, cold compile included (a compile of 124M's step takes ~40 s, its
# measurement ~5 s): the plan of gpu_check.sh adds these up.
STAGE_TIMEOUT_S = {"headline": 55, "real_run": 75, "eager": 30, "explicit": 30, "355M": 70, "galore": 45,
                   "fp16": 55, "1558M_24GB": 60}
ALWAYS = ("headline", "real_run", "eager", "explicit")  # the rest only while the budget lasts
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
    run_compile: bool = True  # the real run with --compile (the smoke leaves it eager: see SMOKE)
    batch_sizes: tuple[int, ...] = (32, 64)
    iters: int = 20
    run_steps: int = 60
    budget_s: float = 335.0
    timeout_scale: float = 1.0
    peak_tflops: float | None = None
    data: str = "gutenberg"  # --data of the script runs


# The smoke compiles where the GPU run compiles (headline, 355M, GaLore, fp16), except the real run: the
# script's own --compile is tested by tests/test_pretraining_advanced.py, and a cold CPU compile of its train
# and eval graphs would double the smoke's time.
SMOKE = Plan(device="cpu", model="debug", big_model="small", huge_model="small", dtype="fp32", batch_sizes=(2, 4),
             iters=2, run_steps=6, budget_s=600.0, timeout_scale=4.0, run_compile=False)


# ----------------------------------------------------------------------------------------------
# One stage, in its own process


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
        sec, loss, peak_mb, reserved_mb = _time_steps(cfg, batch, runtime, plan.iters, make_opt)
    except torch.OutOfMemoryError:
        return {**row, "error": "out of memory"}
    tokens = batch * cfg.context_length
    peak = peak_flops_for(runtime.device, plan.peak_tflops)
    mfu = gt.flops_per_token(cfg) * tokens / sec / peak if peak else None
    setup = gt.TrainSetup(batch_size=batch, dtype=dtype, optimizer=optimizer,
                          activation_checkpointing=cfg.activation_checkpointing, cuda=runtime.device.type == "cuda")
    return {**row, "ms/step": round(1000 * sec, 2), "tokens/s": round(tokens / sec),
            "MFU %": round(100 * mfu, 1) if mfu else None, "peak alloc GiB": round(peak_mb / 1024, 2),
            "peak reserved GiB": round(reserved_mb / 1024, 2) if reserved_mb else None,
            "plan GiB": round(gt.memory_plan(cfg, setup)["total"] / 2**30, 2),
            "loss": round(loss, 4), "wall s": round(time.perf_counter() - t0, 1)}


def _time_steps(cfg, batch: int, runtime, iters: int, make_opt) -> tuple[float, float, float, float | None]:
    """(seconds per step, the loss of one more step, peak MiB allocated, peak MiB reserved on a GPU)."""
    warmup = 3 if runtime.compile else 2  # compilation of forward, backward and the optimizer's first step
    step, _, _ = make_train_step(cfg, batch, runtime, warmup + iters + 1, optimizer=make_opt)
    reset_peak_memory(runtime.device)
    sec = timed(step, warmup=warmup, iters=iters, device=runtime.device)
    reserved = torch.cuda.max_memory_reserved(runtime.device) / 2**20 if runtime.device.type == "cuda" else None
    return sec, step().loss, peak_memory_mb(runtime.device), reserved


def script_flags(plan: Plan, work: Path, batch: int, compile_: bool) -> list[str]:
    """pretraining_advanced.py on plan.data (the embedded Gutenberg sample), its cache and run folder in `work`."""
    flags = ["--model", plan.model, "--batch_size", str(batch), "--device", plan.device, "--dtype", plan.dtype,
             "--compile" if compile_ else "--no-compile", "--warmup_steps", "10", "--log_every", "5",
             "--eval_every", "0", "--eval_iters", "5", "--sample_every", "0", "--no-progress",
             "--data", plan.data, "--cache_dir", str(work / "cache"), "--run_dir", str(work / "run")]
    return flags + (["--peak_tflops", str(plan.peak_tflops)] if plan.peak_tflops else [])


def logged_steps(output: str) -> list[dict]:
    rows = []
    for line in output.splitlines():
        m = LOG_LINE.match(line.strip())
        if m:
            rows.append({"step": int(m[1]), "loss": float(m[2]), "tok/s": int(m[3]), "ms": float(m[4]),
                         "mfu": float(m[5]) if m[5] else None})
    return rows


def _env() -> dict:
    """The repository first, then whatever PYTHONPATH brought (gpu_check.sh's wheels)."""
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}


def _steady(steps: list[dict]) -> dict:
    """The script's own log lines after the first interval (compilation): each already averages its
    interval; the median of them."""
    late = steps[1:] or steps
    mfus = [s["mfu"] for s in late if s["mfu"] is not None]
    return {"tokens/s": round(statistics.median(s["tok/s"] for s in late)),
            "ms/step": round(statistics.median(s["ms"] for s in late), 2),
            "MFU %": round(statistics.median(mfus), 1) if mfus else None}


def real_run(plan: Plan, batch: int, work: Path) -> dict:
    """pretraining_advanced.py as a user runs it: its own log lines give the speed."""
    script = [sys.executable, str(ROOT / "pretraining_advanced.py"), *script_flags(plan, work, batch, plan.run_compile)]
    first = subprocess.run([*script, "--max_steps", str(plan.run_steps)], cwd=work, env=_env(), capture_output=True,
                           text=True)
    print(first.stdout + first.stderr, flush=True)  # into this stage's log
    steps = logged_steps(first.stdout)
    row = {"stage": "real_run", "model": plan.model, "batch": batch, "dtype": plan.dtype, "compile": plan.run_compile,
           "rc": first.returncode}
    if first.returncode != 0 or not steps:
        return {**row, "error": (first.stderr or first.stdout)[-1500:]}
    memory = re.search(r"memory: estimated ([\d.]+) GiB per device, measured ([\d.]+) GiB \(allocated on the GPU; "
                       r"([\d.]+) GiB reserved\)", first.stdout)
    resume = [a if a != "--compile" else "--no-compile" for a in script]  # eager: the resume is what is checked
    again = subprocess.run([*resume, "--max_steps", str(plan.run_steps + 10), "--resume", "auto"], cwd=work, env=_env(),
                           capture_output=True, text=True)
    print(again.stdout + again.stderr, flush=True)
    resumed = logged_steps(again.stdout)
    return {**row, **_steady(steps), "first loss": steps[0]["loss"], "last loss": steps[-1]["loss"],
            **({"plan GiB": float(memory[1]), "peak alloc GiB": float(memory[2]), "peak reserved GiB": float(memory[3])}
               if memory else {}),
            "checkpoints": sorted(p.name for p in (work / "run").glob("ckpt_*")), "resume rc": again.returncode,
            "resumed steps": [s["step"] for s in resumed],
            "resume error": None if again.returncode == 0 else again.stderr[-1500:]}


def capped_24gb(plan: Plan) -> dict:
    """The biggest preset on a 24 GB card, simulated by capping this process's share of the GPU."""
    if plan.device == "cuda":
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, 24 * 2**30 / total))
    return measure("1558M_24GB", plan, plan.huge_model, 1, compile_=False, optimizer="galore", activation_checkpointing=True)


def run_stage(name: str, plan: Plan, batch: int, work: Path) -> dict:
    """One measurement of one stage (this process does nothing else)."""
    if name == "headline":
        return measure("headline", plan, plan.model, batch)
    if name == "real_run":
        return real_run(plan, batch, work)
    if name == "eager":
        return measure("eager", plan, plan.model, batch, compile_=False)
    if name == "explicit":
        return measure("explicit", plan, plan.model, max(1, batch // 2), compile_=False, flash=False)
    if name == "fp16":
        return measure("fp16", plan, plan.model, batch, dtype="fp16")
    if name == "galore":
        return measure("galore", plan, plan.model, batch, optimizer="galore")
    if name == "1558M_24GB":
        return capped_24gb(plan)
    return measure(name, plan, plan.big_model, max(1, batch // 2))


# ----------------------------------------------------------------------------------------------
# The orchestrator: a process per stage, a timeout each, rows appended one by one


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


def in_own_process(name: str, plan: Plan, batch: int, logs: Path, timeout_s: float) -> dict:
    """Run one stage as `bench_gpu.py --one NAME` in a new session (its whole process tree can be
    killed), its output in logs/NAME-bBATCH.log; its row, or what went wrong with the log's tail."""
    log_path = logs / f"{name}-b{batch}.log"
    row_path = logs / f"{name}-b{batch}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", name, "--batch", str(batch), "--row", str(row_path),
           "--plan", json.dumps(dataclasses.asdict(plan))]
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = f"timed out after {timeout_s:.0f} s"
    if row_path.is_file():
        return json.loads(row_path.read_text())
    tail = log_path.read_text(errors="replace")[-1500:]
    return {"stage": name, "batch": batch, "error": f"{'exit code ' if isinstance(rc, int) else ''}{rc}: {tail}",
            "log": str(log_path)}


def environment(plan: Plan) -> dict:
    row = {"stage": "environment", "torch": torch.__version__, "cuda": torch.version.cuda,
           "python": sys.version.split()[0], "device": plan.device}
    if plan.device == "cuda":
        peak = peak_flops_for(torch.device("cuda"), plan.peak_tflops, warn=print)
        row.update(gpu=torch.cuda.get_device_name(), memory_gib=round(torch.cuda.get_device_properties(0).total_memory
                                                                       / 2**30, 1),
                   peak_bf16_tflops=peak / 1e12 if peak else None,
                   flash_sdp=torch.backends.cuda.flash_sdp_enabled(), nccl=str(torch.cuda.nccl.version()))
    return row


def run_all(plan: Plan, stages: list[str], results: Results, logs: Path) -> list[dict]:
    start, best = time.monotonic(), {"batch": plan.batch_sizes[0], "tokens/s": 0}
    results.add(environment(plan))
    for name in stages:
        for batch in plan.batch_sizes if name == "headline" else [best["batch"]]:
            timeout = STAGE_TIMEOUT_S[name] * plan.timeout_scale
            elapsed = time.monotonic() - start
            if name not in ALWAYS and elapsed + timeout > plan.budget_s:
                results.add({"stage": name, "skipped": f"time budget ({elapsed:.0f} s used of {plan.budget_s:.0f})"})
                continue
            row = results.add(in_own_process(name, plan, batch, logs, timeout))
            if name == "headline" and row.get("tokens/s", 0) > best["tokens/s"]:
                best = row
    table = [r for r in results.rows if "tokens/s" in r]
    print()
    print_table([{k: r.get(k) for k in ("stage", "model", "batch", "dtype", "attention", "compile", "optimizer",
                                        "ms/step", "tokens/s", "MFU %", "peak alloc GiB", "peak reserved GiB",
                                        "plan GiB")} for r in table])
    return results.rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=gt.HelpFormatter)
    p.add_argument("--stages", default=",".join(STAGES), help="comma-separated stages to run, in this order")
    p.add_argument("--batch_sizes", default=None, help="headline batch sizes (sequences of 1024 tokens), e.g. 32,64")
    p.add_argument("--iters", type=int, default=None, help="timed steps per measurement")
    p.add_argument("--budget_s", type=float, default=None, help="skip optional stages that could end after this many s")
    p.add_argument("--peak_tflops", type=float, default=None, help="the GPU's dense bf16 peak, if the table lacks it")
    p.add_argument("--data", default=None, help="--data for the pretraining_advanced.py runs (default: the Gutenberg sample)")
    p.add_argument("--out", type=Path, default=None, help="append each result row to this JSON-lines file")
    p.add_argument("--logs", type=Path, default=None, help="each stage's whole output goes here (default: a temp folder)")
    p.add_argument("--smoke", action="store_true", help="run every stage on the CPU with tiny models (checks the script)")
    p.add_argument("--one", default=None, help=argparse.SUPPRESS)  # the orchestrator's call for one stage
    p.add_argument("--batch", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--row", type=Path, default=None, help=argparse.SUPPRESS)
    p.add_argument("--plan", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.one:
        return one(args)
    plan = SMOKE if args.smoke else Plan()
    plan = dataclasses.replace(plan, **{k: v for k, v in {
        "batch_sizes": tuple(int(b) for b in args.batch_sizes.split(",")) if args.batch_sizes else None,
        "iters": args.iters, "budget_s": args.budget_s, "data": args.data, "peak_tflops": args.peak_tflops}.items()
        if v is not None})
    stages = [s for s in args.stages.split(",") if s]
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        p.error(f"unknown stage(s) {', '.join(unknown)}; choose from {', '.join(STAGES)}")
    if plan.device == "cuda" and not torch.cuda.is_available():
        print("no CUDA device: the GPU benchmark is skipped (run it on a machine with an NVIDIA GPU, or --smoke)")
        return []
    with tempfile.TemporaryDirectory() as tmp:
        logs = args.logs or Path(tmp)
        logs.mkdir(parents=True, exist_ok=True)
        return run_all(plan, stages, Results(args.out), logs)


def one(args) -> dict:
    plan = Plan(**{**json.loads(args.plan), "batch_sizes": tuple(json.loads(args.plan)["batch_sizes"])})
    with tempfile.TemporaryDirectory() as work:
        row = run_stage(args.one, plan, args.batch, Path(work))
    args.row.write_text(json.dumps(row))
    return row


if __name__ == "__main__":
    main()
