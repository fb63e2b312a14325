"""Quality per step: the README main job's model and data (the `small` preset on the embedded Gutenberg
books, 16 x 128 tokens a step), trained with each optimizer at several learning rates, side by side:
the same data, batches, seed and initial weights, and validation on the same fixed batches. Prints
each run's final validation loss and, for the best of each optimizer, how many steps Muon needs to
reach AdamW's final validation loss; writes the curves to a PNG for the README.

    python benchmarks/bench_quality.py                                   # ~1.5-2 hours on 2 CPU cores
    python benchmarks/bench_quality.py --steps 300 --adamw_lrs 1e-3 --muon_lrs 0.02

Every run is `pretraining_simple.py` itself, in a process of its own; each result is appended to
--out as soon as it is measured, and a rerun skips the runs already there.
"""

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table

ROOT = Path(__file__).resolve().parents[1]


def run(optimizer: str, lr: float, muon_lr: float | None, a: argparse.Namespace, work: Path) -> dict:
    """One training run; its validation curve."""
    name = f"{optimizer}-lr{lr:g}" + (f"-muon{muon_lr:g}" if muon_lr else "")
    flags = ["--model", "small", "--batch_size", "16", "--max_steps", str(a.steps), "--schedule", a.schedule,
             "--warmup_steps", str(a.warmup), "--lr", str(lr), "--optimizer", optimizer, "--eval_every", str(a.eval_every),
             "--eval_iters", str(a.eval_iters), "--sample_every", "0", "--save_every", "0", "--log_every", "100",
             "--no-progress", "--dtype", a.dtype, "--seed", str(a.seed), "--run_dir", str(work / name), "--overwrite"]
    if muon_lr:
        flags += ["--muon_lr", str(muon_lr)]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "pretraining_simple.py"), *flags], capture_output=True, text=True,
                       cwd=work)
    if r.returncode != 0:
        return {"run": name, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    h = json.loads((work / name / "losses.json").read_text())
    return {"run": name, "optimizer": optimizer, "lr": lr, "muon_lr": muon_lr, "val_step": h["val_step"],
            "val_loss": h["val_loss"], "final": h["val_loss"][-1], "minutes": round((time.perf_counter() - t0) / 60, 1)}


def steps_to(curve: dict, target: float) -> int | None:
    """The first evaluated step whose validation loss is at or below `target`."""
    return next((s for s, v in zip(curve["val_step"], curve["val_loss"]) if v <= target), None)


def plot(best: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6.5, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for label, c in best.items():
        lrs = f"Muon lr {c['muon_lr']:g}, AdamW lr {c['lr']:g}" if c.get("muon_lr") else f"lr {c['lr']:g}"
        ax.plot(c["val_step"][1:], c["val_loss"][1:], marker="o", ms=3, label=f"{label} ({lrs})")
    target = best["AdamW"]["final"]
    ax.axhline(target, color="grey", lw=0.8, ls="--")
    reached = steps_to(best["Muon"], target)
    if reached:
        ax.annotate(f"AdamW's final loss: Muon at step {reached}", (reached, target), xytext=(-6, -14),
                    textcoords="offset points", fontsize=8, ha="right")
    ax.set(xlabel="step", ylabel="validation loss",
           title="small preset, Gutenberg sample, 16 x 128 tokens/step, cosine LR")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--adamw_lrs", default="5e-4,1e-3,2e-3", help="AdamW learning rates to try")
    p.add_argument("--muon_lrs", default="0.005,0.01,0.02,0.04", help="Muon learning rates to try (its AdamW part at the "
                                                                "best AdamW --lr)")
    p.add_argument("--schedule", default="cosine", help="the same schedule for every run")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps")
    p.add_argument("--eval_every", type=int, default=25, help="steps between validations")
    p.add_argument("--eval_iters", type=int, default=10, help="validation batches (the same fixed ones every time)")
    p.add_argument("--dtype", default="auto", help="precision (auto: bf16 where the CPU computes it)")
    p.add_argument("--seed", type=int, default=123, help="seed of the init and the batch order")
    p.add_argument("--out", type=Path, default=Path("bench_quality.jsonl"), help="results, one run per line")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench_quality.png", help="the curves, as PNG")
    a = p.parse_args(argv)
    done = {r["run"]: r for r in map(json.loads, a.out.read_text().splitlines())} if a.out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        results = [_cached(done, "adamw", float(lr), None, a, Path(tmp)) for lr in a.adamw_lrs.split(",")]
        adamw = min((r for r in results if "final" in r), key=lambda r: r["final"])
        results += [_cached(done, "muon", adamw["lr"], float(m), a, Path(tmp)) for m in a.muon_lrs.split(",")]
    ok = [r for r in results if "final" in r]
    print_table([{k: r.get(k) for k in ("run", "final", "minutes", "error")} for r in results])
    best = {"AdamW": adamw, "Muon": min((r for r in ok if r["optimizer"] == "muon"), key=lambda r: r["final"])}
    reached = steps_to(best["Muon"], adamw["final"])
    summary = {"adamw": adamw["run"], "adamw_final": adamw["final"], "muon": best["Muon"]["run"],
               "muon_final": best["Muon"]["final"], "muon_steps_to_adamw_final": reached,
               "fraction": reached / a.steps if reached else None}
    print(json.dumps(summary, indent=2))
    a.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(best, a.plot)
    return summary


def _cached(done: dict, optimizer: str, lr: float, muon_lr, a, work: Path) -> dict:
    name = f"{optimizer}-lr{lr:g}" + (f"-muon{muon_lr:g}" if muon_lr else "")
    if name in done and "final" in done[name] and len(done[name]["val_step"]) and done[name]["val_step"][-1] == a.steps:
        return done[name]
    r = run(optimizer, lr, muon_lr, a, work)
    with open(a.out, "a") as f:
        f.write(json.dumps(r) + "\n")
    print(f"{r['run']}: final validation loss {r.get('final')} ({r.get('minutes')} min)", flush=True)
    return r


if __name__ == "__main__":
    main()
