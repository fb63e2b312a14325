"""Fault injection for the tests (and benchmarks/bench_faults.py): processes killed or signalled at
exact points, so that every test of a kill, a preemption or a lost launcher is deterministic.

A plan is a dict, armed in the process it targets:
- {"after_record": N}: SIGKILL right after the token cache build's Nth progress record;
- {"in_write": N, "phase": "before_rename" | "after_rename" | "disk_full"}: at the Nth atomic rename,
  SIGKILL before or after it, or fail it as a full disk would;
- {"at_step": N, "action": A, "rank": R}: when training step N starts (on rank R only, if given),
  A is "sigterm" or "sigint" (to this process), "sigterm_launcher" (to the parent, e.g. torchrun) or
  "kill9_launcher"; the step then waits until the signal has been seen (or for the launcher to be
  gone), so the run stops after exactly step N. A "sigkill" kills this process in the middle of step N;
- {"sigint_on_import": "torch"}: SIGINT as that module starts to import;
- {"after_s": S}: SIGKILL after S seconds (only for benchmarks: it depends on speed).

`python tests/fault_driver.py SCRIPT ARGS...` runs a repository script as `python SCRIPT ARGS...`
would, with the plan in $FAULT_PLAN armed first.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DRIVER = Path(__file__).resolve().with_name("fault_driver.py")
CACHE_KW = dict(val_fraction=0.2, shard_tokens=2048, batch_docs=8, progress=False)


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


# ----------------------------------------------------------------------------------------------
# Arming a plan


def arm(plan: dict) -> None:
    if plan.get("after_record"):
        _arm_after_record(plan["after_record"])
    if plan.get("in_write"):
        _arm_in_write(plan["in_write"], plan.get("phase", "before_rename"))
    if plan.get("at_step"):
        _arm_at_step(plan["at_step"], plan["action"], plan.get("rank"))
    if plan.get("sigint_on_import"):
        _arm_on_import(plan["sigint_on_import"])
    if plan.get("after_s"):
        import threading

        threading.Timer(plan["after_s"], die).start()


def _arm_after_record(n: int) -> None:
    from gptkit.data import cache

    real, count = cache._Builder.record, {"n": 0}

    def record(self):
        real(self)
        count["n"] += 1
        if count["n"] == n:
            die()
    cache._Builder.record = record


def _arm_in_write(n: int, phase: str) -> None:
    from gptkit import files

    real, count = os.replace, {"n": 0}

    def replace(src, dst):  # atomic_write's rename: die before it, or after it (before the dir fsync)
        count["n"] += 1
        if count["n"] == n and phase == "before_rename":
            die()
        if count["n"] == n and phase == "disk_full":
            raise OSError(28, "No space left on device")  # a failure the process survives to report
        real(src, dst)
        if count["n"] == n and phase == "after_rename":
            die()
    files.os.replace = replace


def _arm_at_step(n: int, action: str, rank: int | None) -> None:
    from gptkit import loop

    real, count = loop.train_step, {"n": 0}
    if rank is not None and int(os.environ.get("RANK", "0")) != rank:
        return

    def train_step(model, optimizer, batches, runtime, grad_accum, max_grad_norm, scaler, should_stop=None, *more):
        count["n"] += 1
        if count["n"] == n:
            _act(action, should_stop)
        return real(model, optimizer, batches, runtime, grad_accum, max_grad_norm, scaler, should_stop, *more)
    loop.train_step = train_step


def _act(action: str, should_stop) -> None:
    parent = os.getppid()
    if action == "sigkill":
        die()
    elif action == "kill9_launcher":
        os.kill(parent, signal.SIGKILL)
        _wait(lambda: os.getppid() != parent and should_stop())
    else:
        sig = signal.SIGINT if action == "sigint" else signal.SIGTERM
        os.kill(parent if action == "sigterm_launcher" else os.getpid(), sig)
        _wait(should_stop)


def _wait(done, limit_s: float = 120.0) -> None:
    t0 = time.monotonic()
    while not done() and time.monotonic() - t0 < limit_s:
        time.sleep(0.01)


def _arm_on_import(module: str) -> None:
    import importlib.abc

    class Tripwire(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == module:
                sys.meta_path.remove(self)
                os.kill(os.getpid(), signal.SIGINT)
            return None
    sys.meta_path.insert(0, Tripwire())


# ----------------------------------------------------------------------------------------------
# Running a script under a plan


def run(script: str, args: list[str], plan: dict | None = None, timeout: float = 300, launcher: list[str] | None = None,
        **popen) -> subprocess.CompletedProcess | subprocess.Popen:
    """`python SCRIPT ARGS` (or `LAUNCHER... DRIVER SCRIPT ARGS`, e.g. torchrun) with `plan` armed in
    every process that runs the script. With popen keywords, the Popen is returned unwaited."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULT_PLAN": json.dumps(plan or {}), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    cmd = [*(launcher or [sys.executable]), str(DRIVER), str(ROOT / script), *map(str, args)]
    if popen:
        return subprocess.Popen(cmd, env=env, **popen)
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)


def torchrun(nproc: int = 2, *extra: str) -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), *extra]


# ----------------------------------------------------------------------------------------------
# Token cache builds, in forked children (the parent has paid for the imports once)


def make_corpus(folder: Path, n_docs: int = 300, seed: int = 0) -> Path:
    """Two jsonl files of varied documents (the second one's rows continue the first's)."""
    rng = random.Random(seed)
    words = "the quick brown fox jumps over a lazy dog while seven wizards box jovially near old towns".split()
    folder.mkdir(parents=True, exist_ok=True)
    for part in range(2):
        with open(folder / f"part{part}.jsonl", "w") as f:
            for i in range(n_docs // 2):
                doc = f"Document {part}-{i}: " + " ".join(rng.choice(words) for _ in range(rng.randint(20, 160)))
                f.write(json.dumps({"text": doc}) + "\n")
    return folder


def build_in_child(source_dir: Path, cache_dir: Path, plan: dict) -> int:
    """Fork, arm the kill plan, build; the child's exit status (0 done, -9 killed, else failed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import token_cache as tc

            arm(plan)
            tc.build_cache(tc.resolve_source(str(source_dir)), cache_dir, log=lambda *a: None, **CACHE_KW)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    return -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)


def folder_digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir()) if p.is_file()}


def cache_trial(source_dir: Path, cache_dir: Path, reference: dict, plans: list[dict], max_restarts: int = 400) -> dict:
    """Build with the given kill plans, one per attempt, then without kills until done. The cache must
    equal the reference byte for byte, with no other file in the folder."""
    kills, attempts = 0, 0
    for plan in plans:
        attempts += 1
        code = build_in_child(source_dir, cache_dir, plan)
        kills += code == -signal.SIGKILL
        if code == 0:
            break
    while attempts < max_restarts:
        attempts += 1
        if build_in_child(source_dir, cache_dir, {}) == 0:
            break
    return _cache_result(cache_dir, reference, kills, attempts)


def adversarial_cache_trial(source_dir: Path, cache_dir: Path, reference: dict, max_restarts: int = 400) -> dict:
    """Kill every attempt right after its first progress record, until an attempt finishes."""
    kills = attempts = 0
    while attempts < max_restarts:
        attempts += 1
        code = build_in_child(source_dir, cache_dir, {"after_record": 1})
        if code == 0:
            break
        kills += code == -signal.SIGKILL
    return _cache_result(cache_dir, reference, kills, attempts)


def _cache_result(cache_dir: Path, reference: dict, kills: int, attempts: int) -> dict:
    got = folder_digest(cache_dir)
    return {"kills": kills, "attempts": attempts, "identical": got == reference, "files": len(got),
            "extra": sorted(set(got) - set(reference))}


def random_cache_plans(rng: random.Random, n: int, timers: bool = False) -> list[dict]:
    """`n` kill points, each counted from the start of its attempt (a resumed build has less left to do).
    Without `timers` (as in the tests) the schedule is exact: the same seed kills at the same points."""
    plans = []
    for _ in range(n):
        kind = rng.choice(["after_record", "before_rename", "after_rename", *(["timer"] if timers else [])])
        if kind == "after_record":
            plans.append({"after_record": rng.randint(1, 4)})
        elif kind == "timer":
            plans.append({"after_s": rng.uniform(0.0, 0.1)})
        else:
            plans.append({"in_write": rng.randint(1, 8), "phase": kind})
    return plans


# ----------------------------------------------------------------------------------------------
# Training runs, in subprocesses (torch's thread pools are not fork-safe)


def train_flags(corpus: Path, cache: Path, run_dir: Path, steps: int) -> list[str]:
    return ["--data", str(corpus), "--cache_dir", str(cache), "--val_fraction", "0.2", "--model", "debug",
            "--batch_size", "4", "--warmup_steps", "3", "--lr", "2e-3", "--eval_iters", "2", "--eval_every", "5",
            "--no-progress", "--log_every", "1", "--seed", "5", "--drop_rate", "0.1", "--save_every", "3",
            "--keep_last", "2", "--max_steps", str(steps), "--run_dir", str(run_dir), "--device", "cpu",
            "--dtype", "fp32"]


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".lock", ".damaged")))


def training_trial(corpus: Path, work: Path, reference: list[float], plans: list[dict], steps: int) -> dict:
    """Run with each kill plan, then `--resume auto` without kills until the run finishes; the loss
    history must equal the uninterrupted run's bit for bit, and nothing may be left behind."""
    run_dir = work / "run"
    flags = train_flags(corpus, work / "cache", run_dir, steps)
    kills, lost, last_step = 0, 0, 0
    for i, plan in enumerate(plans):
        r = run("pretraining_advanced.py", flags + (["--resume", "auto"] if i else []), plan)
        if r.returncode == -signal.SIGKILL:
            kills += 1
            logged = [int(ln.split()[1].split("/")[0]) for ln in r.stdout.splitlines() if ln.startswith("step ")]
            saved = max((int(p.stem[5:]) for p in run_dir.glob("ckpt_*.pt")), default=0)
            lost += max(0, max(logged, default=last_step) - saved)
            last_step = saved
        elif r.returncode != 0:
            raise AssertionError(f"run failed ({r.returncode}):\n{r.stderr[-3000:]}")
        else:
            break
    for _ in range(5):
        r = run("pretraining_advanced.py", flags + ["--resume", "auto"])
        if r.returncode == 0:
            break
    history = json.loads((run_dir / "losses.json").read_text())["train_loss"]
    return {"kills": kills, "recovered": history == reference and r.returncode == 0, "steps_lost": lost,
            "leftovers": leftovers(run_dir)}


def random_training_plans(rng: random.Random, n: int, steps: int, timers: bool = False) -> list[dict]:
    """Kills inside a write (a checkpoint, losses.json, run.json or the plot) or in the middle of a step."""
    plans = []
    for _ in range(n):
        if timers and rng.random() < 0.3:
            plans.append({"after_s": rng.uniform(0.2, 3.0)})
        elif rng.random() < 0.5:
            plans.append({"in_write": rng.randint(1, 6), "phase": rng.choice(["before_rename", "after_rename"])})
        else:
            plans.append({"at_step": rng.randint(1, steps), "action": "sigkill"})
    return plans
