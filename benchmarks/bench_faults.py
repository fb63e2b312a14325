"""Fault injection: SIGKILL a token-cache build or a training run at many points, resume, and check that
the result is the same as without the kills (a byte-identical cache, bit-identical losses) with nothing
left behind. Prints trials run / recovered / steps lost. tests/test_run_state.py runs a few of these.

    python benchmarks/bench_faults.py                      # ~3 minutes on 2 cores
    python benchmarks/bench_faults.py --cache_builds 50 --train_kills 40

Kill points: right after a progress record (the adversarial schedule: restart, wait for the next
record, kill, ...), inside atomic writes (temp file written but not renamed; renamed but the folder
not fsynced), and at random moments (a timer).
"""

import argparse
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table

ROOT = Path(__file__).resolve().parents[1]

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


CACHE_KW = dict(val_fraction=0.2, shard_tokens=2048, batch_docs=8, progress=False)


def _arm(plan: dict) -> None:
    """In the child: SIGKILL ourselves at the planned point."""
    from gptkit import files
    from gptkit.data import cache as tc

    die = lambda: os.kill(os.getpid(), signal.SIGKILL)  # noqa: E731
    counts = {"record": 0, "write": 0}
    if plan.get("after_record"):
        real_record = tc._Builder.record

        def record(self):
            real_record(self)
            counts["record"] += 1
            if counts["record"] == plan["after_record"]:
                die()
        tc._Builder.record = record
    if plan.get("in_write"):
        real_replace, real_fsync_dir = os.replace, files.fsync_dir

        def replace(src, dst):  # atomic_write's rename: die before it, or after it (before the dir fsync)
            counts["write"] += 1
            if counts["write"] == plan["in_write"] and plan.get("phase") == "before_rename":
                die()
            if counts["write"] == plan["in_write"] and plan.get("phase") == "disk_full":
                raise OSError(28, "No space left on device")  # a failure the process survives to report
            real_replace(src, dst)
            if counts["write"] == plan["in_write"] and plan.get("phase") == "after_rename":
                die()
        files.os.replace = replace
        files.fsync_dir = real_fsync_dir
    if plan.get("after_s"):
        import threading

        threading.Timer(plan["after_s"], die).start()


def build_in_child(source_dir: Path, cache_dir: Path, plan: dict) -> int:
    """Fork, arm the kill plan, build; the child's exit status (0 done, -9 killed, else failed)."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            import token_cache as tc

            _arm(plan)
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
    got = folder_digest(cache_dir)
    return {"kills": kills, "attempts": attempts, "identical": got == reference, "files": len(got),
            "extra": sorted(set(got) - set(reference))}


def adversarial_cache_trial(source_dir: Path, cache_dir: Path, reference: dict, max_restarts: int = 400) -> dict:
    """Kill every attempt right after its first progress record, until an attempt finishes."""
    kills = attempts = 0
    while attempts < max_restarts:
        attempts += 1
        code = build_in_child(source_dir, cache_dir, {"after_record": 1})
        if code == 0:
            break
        kills += code == -signal.SIGKILL
    got = folder_digest(cache_dir)
    return {"kills": kills, "attempts": attempts, "identical": got == reference, "files": len(got),
            "extra": sorted(set(got) - set(reference))}


def random_cache_plans(rng: random.Random, n: int, timers: bool = True) -> list[dict]:
    """`n` kill points, each counted from the start of its attempt (a resumed build has less left to do).
    Without `timers` the schedule is reproducible: the same seed kills at the same points."""
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

DRIVER = """
import json, os, sys
sys.path.insert(0, {root!r}); sys.path.insert(0, {bench!r})
plan = json.loads(os.environ.get("FAULT_PLAN") or "{{}}")
import bench_faults, pretraining_advanced as adv, gpt_train as gt
if plan.get("in_write"):
    bench_faults._arm(plan)
if plan.get("after_s"):
    bench_faults._arm({{"after_s": plan["after_s"]}})
gt.run_cli(lambda: adv.main(sys.argv[1:]))
"""


def train_flags(corpus: Path, cache: Path, run_dir: Path, steps: int) -> list[str]:
    return ["--data", str(corpus), "--cache_dir", str(cache), "--val_fraction", "0.2", "--model", "debug",
            "--batch_size", "4", "--warmup_steps", "3", "--lr", "2e-3", "--eval_iters", "2", "--eval_every", "5",
            "--no-progress", "--log_every", "1", "--seed", "5", "--drop_rate", "0.1", "--save_every", "3",
            "--keep_last", "2", "--max_steps", str(steps), "--run_dir", str(run_dir), "--device", "cpu",
            "--dtype", "fp32"]


def run_driver(flags: list[str], plan: dict, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "FAULT_PLAN": json.dumps(plan), "OMP_NUM_THREADS": "1",
           "PYTHONUNBUFFERED": "1"}
    code = DRIVER.format(root=str(ROOT), bench=str(ROOT / "benchmarks"))
    return subprocess.run([sys.executable, "-c", code, *flags], env=env, capture_output=True, text=True, timeout=timeout)


def leftovers(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.iterdir() if p.name.endswith((".tmp", ".lock", ".damaged")))


def training_trial(corpus: Path, work: Path, reference: list[float], plans: list[dict], steps: int) -> dict:
    """Run with each kill plan, then `--resume auto` without kills until the run finishes; the loss
    history must equal the uninterrupted run's bit for bit, and nothing may be left behind."""
    run_dir = work / "run"
    flags = train_flags(corpus, work / "cache", run_dir, steps)
    kills, lost, last_step = 0, 0, 0
    for i, plan in enumerate(plans):
        r = run_driver(flags + (["--resume", "auto"] if i else []), plan)
        if r.returncode == -signal.SIGKILL:
            kills += 1
            logged = [int(ln.split()[1].split("/")[0]) for ln in r.stdout.splitlines() if ln.startswith("step ")]
            reached = max(logged, default=last_step)
            saved = max((int(p.stem[5:]) for p in run_dir.glob("ckpt_*.pt")), default=0)
            lost += max(0, reached - saved)
            last_step = saved
        elif r.returncode != 0:
            raise AssertionError(f"run failed ({r.returncode}):\n{r.stderr[-3000:]}")
        else:
            break
    for _ in range(5):
        r = run_driver(flags + ["--resume", "auto"], {})
        if r.returncode == 0:
            break
    history = json.loads((run_dir / "losses.json").read_text())["train_loss"]
    return {"kills": kills, "recovered": history == reference and r.returncode == 0, "steps_lost": lost,
            "leftovers": leftovers(run_dir)}


def random_training_plans(rng: random.Random, n: int) -> list[dict]:
    plans = []
    for _ in range(n):
        if rng.random() < 0.5:  # inside a write: the checkpoint, losses.json, run.json or the plot
            plans.append({"in_write": rng.randint(1, 6), "phase": rng.choice(["before_rename", "after_rename"])})
        else:
            plans.append({"after_s": rng.uniform(0.2, 3.0)})  # from the end of the imports
    return plans


# ----------------------------------------------------------------------------------------------


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache_builds", type=int, default=30, help="cache builds with random kills")
    p.add_argument("--kills_per_build", type=int, default=4, help="kills in each of those builds")
    p.add_argument("--train_trials", type=int, default=4, help="training runs with random kills")
    p.add_argument("--train_kills", type=int, default=5, help="kills in each training run")
    p.add_argument("--seed", type=int, default=0, help="random seed of the kill schedule")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        corpus = make_corpus(tmp / "corpus")
        import token_cache as tc

        t0 = time.perf_counter()
        m = tc.build_cache(tc.resolve_source(str(corpus)), tmp / "reference", log=lambda *a: None, **CACHE_KW)
        reference = folder_digest(tmp / "reference")
        records = m["records"]
        rows = []
        adv = adversarial_cache_trial(corpus, tmp / "adversarial", reference)
        rows.append({"trial": "cache: kill after each record", "builds": 1, "kills": adv["kills"],
                     "recovered": int(adv["identical"]), "extra files": len(adv["extra"])})
        results = [cache_trial(corpus, tmp / f"c{i}", reference,
                               random_cache_plans(rng, args.kills_per_build))
                   for i in range(args.cache_builds)]
        rows.append({"trial": "cache: random kill points", "builds": len(results),
                     "kills": sum(r["kills"] for r in results), "recovered": sum(r["identical"] for r in results),
                     "extra files": sum(len(r["extra"]) for r in results)})
        print(f"cache: {records} records per build, {time.perf_counter() - t0:.0f}s")
        steps = 24
        ref = run_driver(train_flags(corpus, tmp / "cache", tmp / "ref_run", steps), {})
        assert ref.returncode == 0, ref.stderr[-2000:]
        ref_losses = json.loads((tmp / "ref_run" / "losses.json").read_text())["train_loss"]
        trials = [training_trial(corpus, tmp / f"t{i}", ref_losses, random_training_plans(rng, args.train_kills), steps)
                  for i in range(args.train_trials)]
        rows.append({"trial": "training: random kill points", "builds": len(trials),
                     "kills": sum(t["kills"] for t in trials), "recovered": sum(t["recovered"] for t in trials),
                     "extra files": sum(len(t["leftovers"]) for t in trials)})
        print_table(rows)
        print(f"training steps lost to kills (redone after resume): {sum(t['steps_lost'] for t in trials)} "
              f"over {sum(t['kills'] for t in trials)} kills, checkpoints every 3 steps")
    return rows


if __name__ == "__main__":
    main()
