"""Quality per step: the README main job's model and data (the `small` preset on the embedded Gutenberg
books, 16 x 128 tokens a step), trained by several arms side by side: the same data, batches, seed and
validation batches, 600 cosine steps. An arm is an architecture, an optimizer and its learning rates:

- GPT-2 + AdamW at its best LR, GPT-2 + Muon (the toolkit's earlier results);
- `modern` + Muon and `llama` + Muon, each with its learning rates swept;
- ablations: each part of the modern block added alone to GPT-2 + Muon.
- (trained vocabularies on modern + Muon, in bits per byte: benchmarks/bench_vocab.py --only quality, the same job).

Prints each run's final validation loss, its parameter counts (all and non-embedding) and FLOPs per
token, its cost per step, and how many steps the best modern run needs to reach GPT-2 + AdamW's and
GPT-2 + Muon's final losses; writes the curves to a PNG for the README.

    python benchmarks/bench_quality.py                       # every arm: hours on 2 CPU cores
    python benchmarks/bench_quality.py --arms gpt2-muon0.01,modern-muon0.01-emb0.01-head0.004
    python benchmarks/bench_quality.py --cost --arms all      # only ms per step of each arm, timed alone

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
MUON = ["--optimizer", "muon"]
# name -> flags on top of the shared ones. The first of each family at its best LR comes first.
ARMS = {
    "gpt2-adamw-lr0.001": ["--lr", "1e-3"],
    "gpt2-adamw-lr0.0005": ["--lr", "5e-4"],
    "gpt2-adamw-lr0.002": ["--lr", "2e-3"],
    "gpt2-muon0.01": [*MUON, "--muon_lr", "0.01"],
    "gpt2-muon0.02": [*MUON, "--muon_lr", "0.02"],
    "modern-muon0.02-emb0.01-head0.004": ["--arch", "modern", *MUON, "--muon_lr", "0.02", "--muon_embed_lr", "0.01",
                                          "--muon_head_lr", "0.004"],
    "modern-muon0.01-emb0.01-head0.004": ["--arch", "modern", *MUON, "--muon_lr", "0.01", "--muon_embed_lr", "0.01",
                                          "--muon_head_lr", "0.004"],
    "modern-muon0.02": ["--arch", "modern", *MUON, "--muon_lr", "0.02"],
    "modern-muon0.04-emb0.01-head0.004": ["--arch", "modern", *MUON, "--muon_lr", "0.04", "--muon_embed_lr", "0.01",
                                          "--muon_head_lr", "0.004"],
    "modern-muon0.01-emb0.01-head0.004-beta0.8": ["--arch", "modern", *MUON, "--muon_lr", "0.01", "--muon_embed_lr",
                                                  "0.01", "--muon_head_lr", "0.004", "--beta1", "0.8"],
    "modern-muon0.01": ["--arch", "modern", *MUON, "--muon_lr", "0.01"],  # embedding and head at --lr
    "modern-muon0.01-emb0.03-head0.004": ["--arch", "modern", *MUON, "--muon_lr", "0.01", "--muon_embed_lr", "0.03",
                                          "--muon_head_lr", "0.004"],
    "llama-muon0.02-emb0.01-head0.004": ["--arch", "llama", *MUON, "--muon_lr", "0.02", "--muon_embed_lr", "0.01",
                                         "--muon_head_lr", "0.004"],
    "llama-muon0.01-emb0.01-head0.004": ["--arch", "llama", *MUON, "--muon_lr", "0.01", "--muon_embed_lr", "0.01",
                                         "--muon_head_lr", "0.004"],
    # Ablations: one part of the modern block on GPT-2 + Muon (its LRs: --muon_lr 0.01, --lr 1e-3).
    "gpt2-muon0.01+rotary": [*MUON, "--muon_lr", "0.01", "--position", "rotary"],
    "gpt2-muon0.01+rmsnorm": [*MUON, "--muon_lr", "0.01", "--norm", "rmsnorm", "--no-rmsnorm_affine"],
    "gpt2-muon0.01+qk_norm": [*MUON, "--muon_lr", "0.01", "--qk_norm"],
    "gpt2-muon0.01+relu2": [*MUON, "--muon_lr", "0.01", "--mlp", "relu2"],
    "gpt2-muon0.01+swiglu": [*MUON, "--muon_lr", "0.01", "--mlp", "swiglu"],
    "gpt2-muon0.01+untied": [*MUON, "--muon_lr", "0.01", "--no-tie_embeddings", "--muon_head_lr", "0.004"],
    "gpt2-muon0.01+no_bias": [*MUON, "--muon_lr", "0.01", "--no-bias", "--no-qkv_bias"],
    "gpt2-muon0.01+embed_norm": [*MUON, "--muon_lr", "0.01", "--embed_norm"],
    "gpt2-muon0.01+zero_proj": [*MUON, "--muon_lr", "0.01", "--init", "zero_proj"],
    # not a part: the embedding's LR that the modern and llama arms use (10 x --lr), alone
    "gpt2-muon0.01+embed_lr0.01": [*MUON, "--muon_lr", "0.01", "--muon_embed_lr", "0.01"],
}
DEFAULT_ARMS = ("gpt2-adamw-lr0.001", "gpt2-muon0.01", "modern-muon0.01-emb0.01-head0.004",
                "llama-muon0.01-emb0.01-head0.004")


def run(name: str, a: argparse.Namespace, work: Path) -> dict:
    """One training run; its validation curve, counts and speed."""
    flags = ["--model", "small", "--batch_size", "16", "--max_steps", str(a.steps), "--schedule", a.schedule,
             "--warmup_steps", str(a.warmup), "--lr", "1e-3", "--eval_every", str(a.eval_every), "--eval_iters",
             str(a.eval_iters), "--sample_every", "0", "--save_every", "0", "--log_every", "100", "--no-progress",
             "--dtype", a.dtype, "--seed", str(a.seed), "--run_dir", str(work / name), "--overwrite", *ARMS[name]]
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "pretraining_simple.py"), *flags], capture_output=True, text=True,
                       cwd=work)
    if r.returncode != 0:
        return {"run": name, "error": r.stderr.strip().splitlines()[-1] if r.stderr.strip() else f"rc {r.returncode}"}
    h = json.loads((work / name / "losses.json").read_text())
    ms = [float(ln.split("ms/step")[1].split("|")[0]) for ln in r.stdout.splitlines() if "ms/step" in ln]
    return {"run": name, "flags": ARMS[name], "val_step": h["val_step"], "val_loss": h["val_loss"],
            "final": h["val_loss"][-1], "minutes": round((time.perf_counter() - t0) / 60, 1),
            "ms_per_step": round(sum(ms[1:]) / max(1, len(ms[1:])), 1) if ms else None, **counts(ARMS[name])}


def counts(arm_flags: list[str]) -> dict:
    """Parameters (all, non-embedding) and training FLOPs per token of an arm's model."""
    sys.path.insert(0, str(ROOT))
    import gpt_train as gt
    import pretraining_simple

    cfg = pretraining_simple.parse_args(["--model", "small", *arm_flags]).shared.model_config
    c = gt.count_parameters_from_config(cfg)
    return {"params": c["total"], "non_embedding": c["non_embedding"], "flops_per_token": gt.flops_per_token(cfg, 128)}


def step_cost(names: list[str], steps: int = 12, dtype: str = "auto") -> list[dict]:
    """ms per training step of each arm's model and optimizer (the main job's batch, 16 x 128), timed
    alone over `steps` steps after 3 untimed ones: what each part costs on this machine."""
    import torch
    from _common import gt, make_train_step

    import pretraining_simple

    rows = []
    runtime = gt.setup_runtime("cpu", dtype)
    for name in names:
        s = pretraining_simple.parse_args(["--model", "small", *ARMS[name]]).shared
        spec = s.optim.optimizer

        def optimizer(model, s=s):
            from gptkit.optim import build_optimizer

            return build_optimizer(model, s.optim, s.optimizer_config, torch.device("cpu"))
        step, _, _ = make_train_step(s.model_config, 16, runtime, steps + 3, optimizer=optimizer)
        for _ in range(3):
            step()
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        rows.append({"run": name, "optimizer": spec, "ms_per_step": round(1000 * (time.perf_counter() - t0) / steps, 1)})
    return rows


def steps_to(curve: dict, target: float) -> int | None:
    """The first evaluated step whose validation loss is at or below `target`."""
    return next((s for s, v in zip(curve["val_step"], curve["val_loss"]) if v <= target), None)


def plot(curves: dict, ablations: list[dict], path: Path) -> None:
    """Left: the best run of each family. Right: each part added alone to GPT-2 + Muon."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4.8))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2, sharey=True)
    panels = ((left, list(curves.items()), "the best run of each family"),
              (right, [("GPT-2 + Muon", curves.get("GPT-2 + Muon"))] + [(r["run"].split("+", 1)[1], r) for r in ablations],
               "one part added to GPT-2 + Muon"))
    for ax, lines, title in panels:
        for label, c in lines:
            if c:
                ax.plot(c["val_step"][1:], c["val_loss"][1:], marker="o", ms=2, lw=1, label=f"{label}: {c['final']:.3f}")
        for label in ("GPT-2 + AdamW", "GPT-2 + Muon"):
            if label in curves:
                ax.axhline(curves[label]["final"], color="grey", lw=0.7, ls="--")
        ax.set(xlabel="step", title=title)
        ax.legend(fontsize=7)
    left.set_ylabel("validation loss")
    fig.suptitle("small preset, embedded Gutenberg books, 16 x 128 tokens a step, 600 cosine steps", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def ablation_rows(results: list[dict], baseline: dict | None, adamw: dict | None) -> list[dict]:
    """Each "+part" arm beside GPT-2 + Muon: its final loss, the difference, and its counts."""
    rows = []
    for r in results:
        if "+" in r["run"] and "final" in r:
            row = {"part": r["run"].split("+", 1)[1], "final": round(r["final"], 3),
                   "vs GPT-2 + Muon": round(r["final"] - baseline["final"], 3) if baseline else None,
                   "steps to AdamW's final": steps_to(r, adamw["final"]) if adamw else None}
            rows.append({**row, **{k: r[k] for k in ("params", "non_embedding", "flops_per_token")}})
    return rows


def best(results: list[dict], prefix: str) -> dict | None:
    ok = [r for r in results if "final" in r and r["run"].startswith(prefix) and "+" not in r["run"]]
    return min(ok, key=lambda r: r["final"]) if ok else None


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default=",".join(DEFAULT_ARMS), help=f"arms to run (all: {','.join(ARMS)}) or 'all'")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per run")
    p.add_argument("--schedule", default="cosine", help="the same schedule for every run")
    p.add_argument("--warmup", type=int, default=30, help="warmup steps")
    p.add_argument("--eval_every", type=int, default=25, help="steps between validations")
    p.add_argument("--eval_iters", type=int, default=10, help="validation batches (the same fixed ones every time)")
    p.add_argument("--dtype", default="auto", help="precision (auto: bf16 where the CPU computes it)")
    p.add_argument("--seed", type=int, default=123, help="seed of the init and the batch order")
    p.add_argument("--out", type=Path, default=Path("bench_quality.jsonl"), help="results, one run per line")
    p.add_argument("--plot", type=Path, default=ROOT / "docs" / "bench_quality.png", help="the curves, as PNG")
    p.add_argument("--cost", action="store_true", help="only time a training step of each arm (no training runs)")
    a = p.parse_args(argv)
    names = list(ARMS) if a.arms == "all" else a.arms.split(",")
    if a.cost:
        rows = step_cost(names, dtype=a.dtype)
        print_table(rows)
        return {"cost": rows}
    done = {r["run"]: r for r in map(json.loads, a.out.read_text().splitlines())} if a.out.exists() else {}
    with tempfile.TemporaryDirectory() as tmp:
        results = [_cached(done, name, a, Path(tmp)) for name in names]
    results += [r for n, r in done.items() if n not in names and "final" in r]
    print_table([{k: r.get(k) for k in ("run", "final", "params", "non_embedding", "flops_per_token", "ms_per_step",
                                        "error")} for r in results])
    curves = {label: c for label, c in (("GPT-2 + AdamW", best(results, "gpt2-adamw")),
                                        ("GPT-2 + Muon", best(results, "gpt2-muon")),
                                        ("modern + Muon", best(results, "modern-muon")),
                                        ("llama + Muon", best(results, "llama-muon"))) if c}
    summary = {label: {"run": c["run"], "final": c["final"]} for label, c in curves.items()}
    for label, c in curves.items():
        for target in ("GPT-2 + AdamW", "GPT-2 + Muon"):
            if target in curves and label != target:
                s = steps_to(c, curves[target]["final"])
                summary[label][f"steps to {target}'s final"] = s
                summary[label][f"fraction of {target}'s steps"] = round(s / a.steps, 3) if s else None
    ablations = [r for r in results if "+" in r["run"] and "final" in r]
    rows = ablation_rows(ablations, curves.get("GPT-2 + Muon"), curves.get("GPT-2 + AdamW"))
    if rows:
        print_table(rows)
    print(json.dumps(summary, indent=2))
    a.plot.parent.mkdir(parents=True, exist_ok=True)
    plot(curves, ablations, a.plot)
    return {**summary, "ablations": rows}


def _cached(done: dict, name: str, a, work: Path) -> dict:
    if name not in ARMS:
        raise SystemExit(f"unknown arm {name!r}; choose from {', '.join(ARMS)}")
    r = done.get(name)
    if r and "final" in r and r["val_step"] and r["val_step"][-1] == a.steps:
        return r
    r = run(name, a, work)
    with open(a.out, "a") as f:
        f.write(json.dumps(r) + "\n")
    print(f"{r['run']}: final validation loss {r.get('final')} ({r.get('minutes')} min)", flush=True)
    return r


if __name__ == "__main__":
    main()
