"""Scaling laws on this machine (the README's figures): a sweep of depths x FLOP budgets on the embedded
Gutenberg books with a trained 4,096-token vocabulary and the modern + Muon recipe, its fit, a run at 4x
the largest budget predicted and then trained, and whether the depth rules keep the best LR across depths.

1. sweep: `scaling.py plan` (depths 1-5 x budgets 3e11, 1e12, 3e12; runs of fewer than 40 steps or more
   than one pass over the training tokens dropped) and `scaling.py run`, timed;
2. fit: `scaling.py fit` (exponents and tokens per parameter with bootstrap intervals);
3. prediction: `scaling.py predict SWEEP 1.2e13 --run`: predicted against measured bits per byte;
4. LR transfer: the recipe's four learning rates times 0.5, 1, 2 and 4 at depths 1 and 3 at 1e12 FLOPs,
   each a sweep of its own, and depth 1 again at depth 3's steps: is the best multiplier the same at
   both depths, at equal budgets and at equal steps?

    python benchmarks/bench_scaling.py --work /tmp/scaling          # about an hour on 2 CPU cores
    python benchmarks/bench_scaling.py --work /tmp/scaling --only lr

The tokenizer is trained once into --work (or given by --tokenizer); every part skips the runs that
are already finished there, so a rerun continues.
"""

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from _common import print_table

ROOT = Path(__file__).resolve().parents[1]
LRS = (("lr", 1e-3), ("muon_lr", 0.01), ("muon_embed_lr", 0.01), ("muon_head_lr", 0.004))  # tuned at width 256


def recipe(tok: str, mult: float = 1.0) -> list[str]:
    lrs = [a for k, v in LRS for a in (f"--{k}", f"{v * mult:g}")]
    return ["--tokenizer", tok, "--arch", "modern", "--optimizer", "muon", "--batch_size", "8", "--schedule", "cosine",
            "--warmup_steps", "5", *lrs]


def plan_and_run(scaling, folder: Path, depths: str, budgets: str, rec: list[str], jobs: int) -> float:
    """Plans the sweep (once) and runs what is unfinished: seconds spent running."""
    if not (folder / "plan.json").exists():
        scaling.main(["plan", "--depths", depths, "--budgets", budgets, "--out", str(folder), "--ref_width", "256",
                      "--eval_iters", "100", "--min_steps", "40", *rec])
    t0 = time.perf_counter()
    scaling.main(["run", str(folder), "--jobs", str(jobs)])
    return time.perf_counter() - t0


def lr_transfer(scaling, a, tok: str) -> list[dict]:
    """Per LR multiplier: each depth's bpb at the budget, and the smallest depth's at the largest depth's
    steps (equal steps: the width rule alone, without the run-length difference a budget brings)."""
    rows = []
    for mult in a.lr_mults:
        folder = a.work / f"lr-x{mult:g}"
        plan_and_run(scaling, folder, a.lr_depths, a.lr_budget, recipe(tok, mult), a.jobs)
        _, runs = scaling.results(folder)
        small, big = min(runs, key=lambda r: r["depth"]), max(runs, key=lambda r: r["depth"])
        run_dir = folder / "equal-steps" / f"d{small['depth']}-{big['steps']}steps"
        flags = list(small["flags"])
        flags[flags.index("--max_steps") + 1] = str(big["steps"])
        flags[flags.index("--run_dir") + 1] = str(run_dir)
        run_dir.parent.mkdir(exist_ok=True)
        done = scaling.finished(run_dir)
        if done is None and scaling.train_one(flags) == 0:
            done = scaling.finished(run_dir)
        rows.append({"LR x": mult, **{f"depth {r['depth']} bpb": round(r["bpb"], 4) for r in runs},
                     f"depth {small['depth']} at {big['steps']} steps": round(done["bpb"], 4) if done else None})
    for col in [k for k in rows[0] if k.startswith("depth")]:
        best = min(rows, key=lambda r: r[col] if r[col] is not None else float("inf"))
        best[col] = f"{best[col]} *"
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, default=Path("bench_scaling"), help="sweeps, runs and the tokenizer go here")
    p.add_argument("--only", default="sweep,fit,predict,lr", help="which parts to run")
    p.add_argument("--tokenizer", default=None, help="a tokenizer folder (default: train 4,096 ids on the books)")
    p.add_argument("--depths", default="1,2,3,4,5", help="the sweep's depths")
    p.add_argument("--budgets", default="3e11,1e12,3e12", help="the sweep's training FLOP budgets")
    p.add_argument("--predict", type=float, default=1.2e13, help="the budget predicted and trained (4x the largest)")
    p.add_argument("--lr_mults", type=lambda s: [float(v) for v in s.split(",")], default=[0.5, 1, 2, 4],
                   help="LR multipliers of the transfer check")
    p.add_argument("--lr_depths", default="1,3", help="depths of the LR transfer check")
    p.add_argument("--lr_budget", default="1e12", help="budget of the LR transfer check")
    p.add_argument("--jobs", type=int, default=1, help="runs at once")
    a = p.parse_args(argv)
    a.work = a.work.resolve()
    a.work.mkdir(parents=True, exist_ok=True)
    sys.path.insert(0, str(ROOT))
    import scaling

    tok = a.tokenizer or str(a.work / "gutenberg-4096")
    if not Path(tok).is_dir():
        subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), "train", "--data", "gutenberg", "--vocab_size",
                        "4096", "--out", tok, "--no-progress"], check=True, cwd=a.work)
    parts, out, sweep = a.only.split(","), {}, a.work / "sweep"
    if "sweep" in parts:
        out["sweep_seconds"] = round(plan_and_run(scaling, sweep, a.depths, a.budgets, recipe(tok), a.jobs))
        print(f"sweep: {out['sweep_seconds'] / 60:.1f} min of running")
    if "fit" in parts:
        out["fit"] = scaling.main(["fit", str(sweep)])
    if "predict" in parts:
        out["predict"] = scaling.main(["predict", str(sweep), repr(a.predict), "--run"])
    if "lr" in parts:
        out["lr"] = lr_transfer(scaling, a, tok)
        print_table(out["lr"])
    print(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
