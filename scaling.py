"""Scaling laws in one command: plan a sweep of model sizes (--depth) over compute budgets, run it (each
run a normal, resumable run folder of pretraining_simple.py), fit the laws, predict a larger run and
check the prediction.

    python scaling.py plan --depths 2,3,4,5,6 --budgets 3e12,1e13,3e13 --out sweeps/gut [training flags]
    python scaling.py run sweeps/gut                      # a killed sweep continues where it stopped
    python scaling.py fit sweeps/gut [--json]             # isoFLOP parabolas, E + A/N^a + B/D^b and Kaplan's law
    python scaling.py predict sweeps/gut 1.2e14 [--run]   # the compute-optimal depth, steps and bits per byte

The training flags after --out are the recipe, the same for every run (the Gutenberg books and the
tokenizer by default as pretraining_simple.py takes them); --depth sets the size, and the learning rates
and weight decay follow it by stated rules (--ref_width): AdamW's LRs (and Muon's embedding and head
LRs) times sqrt(ref_width / width), Muon's matrix LR unchanged (its updates are normalised per matrix),
weight decay times (ref_width / width)^2, as nanochat scales them. The batch is the recipe's, the same
for every run: its budget sets each run's steps, steps = budget / (FLOPs per token x tokens per step),
with the FLOPs counted as the toolkit counts them (attention included). A run that would take fewer
than --min_steps steps, or more than one pass over the training tokens, is dropped with the reason.

`run` executes the plan here, one run after another (--jobs N: N at once, the cores or the GPUs shared
out), or submits each run through submitit (--executor slurm, or local: submitit's local executor).
`fit` refuses runs of another recipe in one line: a fit never mixes recipes. It fits two parametric
forms (Chinchilla's approach 3 and Kaplan's (P/N^a + Q/D)^alpha_D), each with bootstrap intervals and a
leave-one-out error; `predict` uses the form that predicts left-out runs better.
"""

from gptkit.cli import quiet_interrupt_while_importing

if __name__ == "__main__":
    quiet_interrupt_while_importing()

import argparse
import json
import math
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from gptkit.cli import run_cli
from gptkit.errors import UserError
from gptkit.files import make_folder, write_json

ROOT = Path(__file__).resolve().parent
NOT_RECIPE = ("progress", "resume", "overwrite", "check")  # how a run was started, not what it trained
PLAN, FORMAT = "plan.json", "gptkit-scaling-plan/1"
SCALED = ("lr", "muon_embed_lr", "muon_head_lr")  # x sqrt(ref_width / width)
FIXED = ("depth", "max_steps", "run_dir", "eval_every", "eval_iters", "save_every", "log_every", "sample_every",
         "progress", "overwrite", "resume", *SCALED, "weight_decay")  # set per run by the plan


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    sub = p.add_subparsers(dest="command", required=True)
    pl = sub.add_parser("plan", help="a grid of depths x FLOP budgets with the recipe's flags", allow_abbrev=False)
    pl.add_argument("--depths", required=True, help="comma-separated depths, e.g. 2,3,4")
    pl.add_argument("--budgets", required=True, help="comma-separated training FLOP budgets, e.g. 1e12,3e12")
    pl.add_argument("--out", type=Path, required=True, help="the sweep's folder (new, or this plan's own)")
    pl.add_argument("--ref_width", type=int, default=768, help="the width the recipe's LRs and weight decay are for")
    pl.add_argument("--min_steps", type=int, default=20, help="runs of fewer steps are dropped")
    pl.add_argument("--eval_iters", type=int, default=200, help="validation batches of each run's final bits per byte")
    r = sub.add_parser("run", help="run the plan's runs that are not finished")
    r.add_argument("sweep", type=Path, help="the sweep's folder")
    r.add_argument("--jobs", type=int, default=1, help="runs at once (the cores, or the GPUs, shared out)")
    r.add_argument("--executor", choices=("here", "local", "slurm"), default="here",
                   help="here: subprocesses of this one; local or slurm: submitit's executors")
    r.add_argument("--slurm_partition", default=None, help="with --executor slurm: the partition")
    r.add_argument("--timeout_min", type=int, default=240, help="with submitit: each job's time limit")
    f = sub.add_parser("fit", help="fit the laws on the finished runs, print and plot them")
    f.add_argument("sweep", type=Path, help="the sweep's folder")
    f.add_argument("--json", action="store_true", help="machine-readable output")
    f.add_argument("--bootstrap", type=int, default=200, help="resampled fits for the intervals")
    pr = sub.add_parser("predict", help="the compute-optimal run at a budget, and its predicted bits per byte")
    pr.add_argument("sweep", type=Path, help="the sweep's folder")
    pr.add_argument("budget", type=float, help="training FLOPs")
    pr.add_argument("--run", action="store_true", help="train the predicted run and report predicted against measured")
    pr.add_argument("--max_depth", type=int, default=64, help="the largest depth considered")
    return p


# ----------------------------------------------------------------------------------------------
# plan


def numbers(text: str, kind, what: str) -> list:
    try:
        values = [kind(float(v)) if kind is int else kind(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise UserError(f"--{what} {text!r}: give comma-separated numbers")
    if not values:
        raise UserError(f"--{what} is empty: the grid needs at least one value")
    if any(not math.isfinite(v) or v <= 0 for v in values):
        raise UserError(f"--{what} {text!r}: every value must be a positive number")
    return sorted(set(values))


def recipe_at(recipe: list[str], depth: int, ref_width: int, steps: int, run_dir: Path, eval_iters: int):
    """The flags of one run: the recipe, its size, its LRs and weight decay scaled to its width."""
    import pretraining_simple as simple
    from gptkit.args import depth_sizes

    base = simple.parse_args([*recipe, "--depth", str(depth)])
    width, args = depth_sizes(depth)["emb_dim"], base.args
    scale = {k: getattr(args, k) * math.sqrt(ref_width / width) for k in SCALED if getattr(args, k, None) is not None}
    scale["weight_decay"] = args.weight_decay * (ref_width / width) ** 2
    flags = [*_without(recipe, FIXED), "--depth", str(depth), "--max_steps", str(steps), "--run_dir", str(run_dir),
             "--eval_every", "0", "--eval_iters", str(eval_iters), "--save_every", "0", "--log_every", "50",
             "--sample_every", "0", "--no-progress", *[a for k, v in scale.items() for a in (f"--{k}", repr(v))]]
    return flags, simple.parse_args(flags)


def _without(argv: list[str], names) -> list[str]:
    """argv without the flags `names` (and their values) the plan sets itself."""
    out, skip = [], False
    flags = {f"--{n}" for n in names} | {f"--no-{n}" for n in names}
    for a in argv:
        if skip:
            skip = False
            continue
        key = a.split("=", 1)[0]
        if key in flags:
            skip = "=" not in a and not key.startswith("--no-") and key not in ("--overwrite", "--progress")
            continue
        out.append(a)
    return out


def plan(args, recipe: list[str]) -> dict:
    import gpt_train as gt
    import pretraining_simple as simple

    depths, budgets = numbers(args.depths, int, "depths"), numbers(args.budgets, float, "budgets")
    out = args.out
    if (out / PLAN).exists() or (out.exists() and any(out.iterdir())):
        raise UserError(f"{out} already holds a sweep or other files; plan into a new --out folder")
    base = simple.parse_args(recipe)  # bad recipe flags: one line, before anything is written
    _grid(recipe, depths, budgets, args, None, out)  # a grid of runs too short: refused before the data is read
    train_tokens = _train_tokens(base)
    runs, dropped = _grid(recipe, depths, budgets, args, train_tokens, out)
    make_folder(out, "--out", "pick another folder")
    record = {"format": FORMAT, "recipe": recipe, "ref_width": args.ref_width, "train_tokens": train_tokens,
              "tokenizer": gt.get_tokenizer().name, "runs": runs, "dropped": dropped}
    write_json(out / PLAN, record)
    _print_plan(record)
    return record


def _grid(recipe, depths, budgets, args, train_tokens, out) -> tuple[list, list]:
    """(runs, dropped) of the grid; one line when every run is dropped."""
    runs, dropped = [], []
    for depth in depths:
        for budget in budgets:
            entry = _entry(recipe, depth, budget, args, train_tokens, out)
            (runs if "reason" not in entry else dropped).append(entry)
    if not runs:
        raise UserError("every run of the grid was dropped (" + "; ".join(f"depth {d['depth']} at {d['budget']:.2g}: "
                        f"{d['reason']}" for d in dropped[:3]) + "); raise the budgets or lower the depths")
    return runs, dropped


def _train_tokens(s) -> int:
    import pretraining_simple as simple

    train, _, _ = simple.load_corpus(s.data.data_dir, s.data.val_fraction, s.shared.model_config.context_length,
                                     s.data.cache_dir, progress=s.shared.log.progress)
    return train.num_tokens()


def _entry(recipe, depth, budget, args, train_tokens, out) -> dict:
    import gpt_train as gt

    name = f"d{depth}-c{budget:.3g}".replace("+", "")
    flags, s = recipe_at(recipe, depth, args.ref_width, 1, out / "runs" / name, args.eval_iters)
    cfg, b = s.shared.model_config, s.shared.batch
    tokens_per_step = b.batch_size * cfg.context_length * b.grad_accum
    fpt = gt.flops_per_token(cfg, cfg.context_length)
    steps = int(budget // (fpt * tokens_per_step))
    entry = {"name": name, "depth": depth, "budget": budget, "steps": steps, "tokens": steps * tokens_per_step,
             "params": gt.count_parameters_from_config(cfg)["total"], "flops_per_token": fpt}
    if steps < args.min_steps:
        return {**entry, "reason": f"{steps} steps, fewer than --min_steps {args.min_steps}"}
    if train_tokens is not None and steps * tokens_per_step > train_tokens:
        return {**entry, "reason": f"{steps * tokens_per_step:,} tokens, more than one pass over the {train_tokens:,} "
                                   "training tokens"}
    flags[flags.index("--max_steps") + 1] = str(steps)  # the same run, its steps now known: no second parse
    entry["flags"] = flags
    return entry


def _print_plan(record: dict) -> None:
    print(f"{len(record['runs'])} runs, {sum(r['budget'] for r in record['runs']):.3g} FLOPs in all "
          f"({record['train_tokens']:,} training tokens, tokenizer {record['tokenizer']}):")
    for r in record["runs"]:
        print(f"  {r['name']:<14} depth {r['depth']:>2} | {r['params'] / 1e6:7.2f}M params | {r['steps']:>6} steps | "
              f"{r['tokens'] / r['params']:6.2g} tokens/param")
    for d in record["dropped"]:
        print(f"  dropped depth {d['depth']} at {d['budget']:.3g} FLOPs: {d['reason']}")


# ----------------------------------------------------------------------------------------------
# run


def read_plan(sweep: Path) -> dict:
    path = sweep / PLAN
    if not path.is_file():
        raise UserError(f"{sweep} holds no {PLAN}; make one with `scaling.py plan ... --out {sweep}`")
    record = json.loads(path.read_text())
    if record.get("format") != FORMAT:
        raise UserError(f"{path} is not a plan written by scaling.py")
    return record


def finished(run_dir: Path) -> dict | None:
    """The final validation bits per byte and the settings of a finished run, or None."""
    try:
        info = json.loads((run_dir / "run.json").read_text())
        h = json.loads((run_dir / "losses.json").read_text())
    except (OSError, ValueError):
        return None
    if (info.get("status") or {}).get("state") != "finished" or not h.get("val_bpb"):
        return None
    return {"bpb": h["val_bpb"][-1], "settings": info.get("settings") or {}, "step": h["step"][-1] if h["step"] else 0}


def train_one(flags: list[str], threads: int | None = None, device: str | None = None) -> int:
    """One run, as a user would start it (resumed when its folder holds a checkpoint): the exit code."""
    run_dir = Path(flags[flags.index("--run_dir") + 1])
    resume = ["--resume", "auto"] if run_dir.is_dir() and any(run_dir.glob("ckpt_*")) else []
    env = {**os.environ, **({"OMP_NUM_THREADS": str(threads)} if threads else {}),
           **({"CUDA_VISIBLE_DEVICES": device} if device is not None else {})}
    log = open(run_dir.parent / f"{run_dir.name}.log", "a") if run_dir.parent.is_dir() else None
    try:
        return subprocess.run([sys.executable, str(ROOT / "pretraining_simple.py"), *flags, *resume], env=env,
                              stdout=log, stderr=subprocess.STDOUT if log else None).returncode
    finally:
        if log:
            log.close()


def run(args) -> dict:
    record = read_plan(args.sweep)
    todo = [r for r in record["runs"] if finished(Path(_flag(r["flags"], "run_dir"))) is None]
    (args.sweep / "runs").mkdir(exist_ok=True)
    print(f"{len(record['runs']) - len(todo)} of {len(record['runs'])} runs finished; {len(todo)} to run")
    codes = _execute(todo, args)
    failed = [r["name"] for r, c in zip(todo, codes) if c != 0]
    for name in failed:
        print(f"run {name} failed: see {args.sweep / 'runs' / (name + '.log')}")
    return {"ran": len(todo), "failed": failed, "exit_code": 1 if failed else 0}


def _execute(todo: list[dict], args) -> list[int]:
    if args.executor != "here":
        return _submitit(todo, args)
    gpus = _gpus()
    threads = max(1, (os.cpu_count() or 1) // args.jobs) if not gpus else None

    def one(k_run):
        k, r = k_run
        return train_one(r["flags"], threads, str(k % len(gpus)) if gpus else None)
    with ThreadPoolExecutor(args.jobs) as pool:
        return list(pool.map(one, enumerate(todo)))


def _gpus() -> list[int]:
    try:
        import torch

        return list(range(torch.cuda.device_count()))
    except Exception:
        return []


def _submitit(todo: list[dict], args) -> list[int]:
    try:
        import submitit
    except ImportError:
        raise UserError("--executor local/slurm needs submitit: pip install -r requirements.txt")
    folder = args.sweep / "submitit"
    if args.executor == "slurm":
        ex = submitit.AutoExecutor(folder=folder, cluster="slurm")
        ex.update_parameters(timeout_min=args.timeout_min, slurm_partition=args.slurm_partition)
    else:
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=args.timeout_min)
    jobs = [ex.submit(train_one, r["flags"]) for r in todo]
    return [job.result() for job in jobs]


def _flag(flags: list[str], name: str) -> str:
    return flags[flags.index(f"--{name}") + 1]


# ----------------------------------------------------------------------------------------------
# fit and predict


def results(sweep: Path) -> tuple[dict, list[dict]]:
    """The plan and its finished runs; a run whose recorded settings are not the plan's is refused."""
    import pretraining_simple as simple

    record, out = read_plan(sweep), []
    for r in record["runs"]:
        done = finished(Path(_flag(r["flags"], "run_dir")))
        if done is None:
            continue
        expected = {k: v for k, v in vars(simple.parse_args(r["flags"]).args).items()}
        got = done["settings"]  # the settings both know (a plugin loaded here adds flags the run did not have)
        diff = sorted(k for k in expected if k in got and k not in NOT_RECIPE and str(got[k]) != str(expected[k]))
        if diff:
            raise UserError(f"run {r['name']} in {sweep} was trained with other settings than the plan's ({diff[0]}="
                            f"{str(got.get(diff[0]))[:40]}, the plan says {str(expected[diff[0]])[:40]}); a fit never "
                            "mixes recipes: move it out of the sweep, or plan a sweep of its own")
        out.append({**r, "bpb": done["bpb"], "flops": r["tokens"] * r["flops_per_token"]})
    return record, out


def fit(args) -> dict:
    from gptkit import scaling as S

    record, runs = results(args.sweep)
    if len(runs) < 5:
        raise UserError(f"{len(runs)} finished runs in {args.sweep}: a fit of L(N, D) needs at least 5 (run "
                        "`scaling.py run` first)")
    n, d, loss = [r["params"] for r in runs], [r["tokens"] for r in runs], [r["bpb"] for r in runs]
    kappa = sum(r["flops_per_token"] / r["params"] for r in runs) / len(runs)
    budgets = sorted({r["budget"] for r in runs})
    chosen, laws, loo = chosen_law(runs)
    out = {"law": vars(laws["chinchilla"]), "kappa": kappa, "runs": len(runs), "loo_error": loo, "chosen": chosen,
           "approach3": _parametric(laws["chinchilla"], S.bootstrap(n, d, loss, args.bootstrap), budgets, kappa),
           **_approach2(runs, budgets, kappa)}
    if "kaplan" in laws:
        out["kaplan"] = {"law": vars(laws["kaplan"]), **_parametric(
            laws["kaplan"], S.bootstrap(n, d, loss, args.bootstrap, fit=S.fit_kaplan), budgets, kappa)}
    _print_fit(out, args.json)
    out["plot"] = str(_plot(runs, laws[chosen], kappa, out, args.sweep / "scaling.png"))
    write_json(args.sweep / "fit.json", out)
    return out


def chosen_law(runs: list[dict]) -> tuple[str, dict, dict]:
    """Both parametric forms fitted to the runs, and the one that predicts a left-out run better (its
    leave-one-out error): (its name, {form: law}, {form: error}). One line when neither makes a law."""
    from gptkit import scaling as S

    n, d, loss = [r["params"] for r in runs], [r["tokens"] for r in runs], [r["bpb"] for r in runs]
    laws, loo = {}, {}
    for name, fit_form in S.FORMS.items():
        try:
            laws[name] = fit_form(n, d, loss)
        except ValueError:
            continue
        loo[name] = S.loo_error(fit_form, n, d, loss)
    if "chinchilla" not in laws:
        raise UserError(f"the {len(runs)} finished runs do not make a law L(N, D) = E + A/N^alpha + B/D^beta with "
                        "positive A and B (too few sizes and budgets, or too noisy); add depths or budgets")
    return min(loo, key=loo.get), laws, loo


def _parametric(law, laws, budgets, kappa) -> dict:
    from gptkit import scaling as S

    a, b = law.exponents
    ab = [x.exponents for x in laws]
    per_budget = []
    for c in budgets:
        n_opt, d_opt = law.optimum(c, kappa)
        ratios = [x.optimum(c, kappa)[1] / x.optimum(c, kappa)[0] for x in laws]
        per_budget.append({"budget": c, "N_opt": n_opt, "D_opt": d_opt, "tokens_per_param": d_opt / n_opt,
                           "tokens_per_param_90": S.interval(ratios), "bpb": law(n_opt, d_opt)})
    out = {"a": a, "b": b, "a_90": S.interval([x[0] for x in ab]), "b_90": S.interval([x[1] for x in ab]),
           "per_budget": per_budget}
    for exponent in ("alpha", "beta", "alpha_d"):
        if hasattr(law, exponent):
            out[f"{exponent}_90"] = S.interval([getattr(x, exponent) for x in laws])
    return out


def _approach2(runs, budgets, kappa) -> dict:
    from gptkit import scaling as S

    optima = []
    for c in budgets:
        v = S.isoflop([(r["params"], r["bpb"]) for r in runs if r["budget"] == c])
        if v:
            optima.append({"budget": c, "N_opt": v[0], "bpb": v[1], "tokens_per_param": c / (kappa * v[0] ** 2)})
    fit = S.power_fit([o["budget"] for o in optima], [o["N_opt"] for o in optima]) if len(optima) >= 2 else None
    return {"approach2": {"per_budget": optima, "a": fit[1] if fit else None, "b": 1 - fit[1] if fit else None}}


def _print_fit(out: dict, as_json: bool) -> None:
    if as_json:
        print(json.dumps(out, indent=2, default=str))
        return
    law, a2, loo = out["law"], out["approach2"], out["loo_error"]
    print(f"approach 3: L(N, D) = {law['E']:.3f} + {law['A']:.4g} / N^{law['alpha']:.3f} + {law['B']:.4g} / "
          f"D^{law['beta']:.3f} ({out['runs']} runs; bits per byte; leave-one-out error {100 * loo['chinchilla']:.2f}%)")
    _print_parametric(out["approach3"])
    if "kaplan" in out:
        k = out["kaplan"]["law"]
        print(f"Kaplan: L(N, D) = ({k['P']:.4g} / N^{k['a']:.3f} + {k['Q']:.4g} / D)^{k['alpha_d']:.3f} (leave-one-out error "
              f"{100 * loo['kaplan']:.2f}%)")
        _print_parametric(out["kaplan"])
    if a2["a"] is not None:
        print(f"approach 2: N_opt ~ C^{a2['a']:.3f}, D_opt ~ C^{a2['b']:.3f} (isoFLOP vertices of {len(a2['per_budget'])} "
              "budgets)")
    print(f"predict uses the {out['chosen']} form (the lower leave-one-out error)")
    print("Chinchilla: a = b = 0.5, 20 tokens/param; nanochat: a 0.54, b 0.49, ~10.5 tokens/param")


def _print_parametric(fit: dict) -> None:
    print(f"  N_opt ~ C^{fit['a']:.3f} (90%: {fit['a_90'][0]:.3f}-{fit['a_90'][1]:.3f}), D_opt ~ C^{fit['b']:.3f} "
          f"(90%: {fit['b_90'][0]:.3f}-{fit['b_90'][1]:.3f})")
    for p in fit["per_budget"]:
        lo, hi = p["tokens_per_param_90"]
        print(f"  C {p['budget']:.3g}: N_opt {p['N_opt'] / 1e6:.2f}M, D_opt {p['D_opt'] / 1e6:.2f}M tokens, "
              f"{p['tokens_per_param']:.2g} tokens/param (90%: {lo:.2g}-{hi:.2g}), bpb {p['bpb']:.4f}")


def _plot(runs, law, kappa, out, path: Path) -> Path:
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from gptkit.files import atomic_write

    fig = Figure(figsize=(7, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for c in sorted({r["budget"] for r in runs}):
        pts = sorted((r["params"], r["bpb"]) for r in runs if r["budget"] == c)
        line, = ax.plot([p[0] for p in pts], [p[1] for p in pts], "o-", ms=4, label=f"C = {c:.2g}")
        ns = [pts[0][0] * (pts[-1][0] / pts[0][0]) ** (i / 40) for i in range(41)]
        ax.plot(ns, [law(x, c / (kappa * x)) for x in ns], "--", lw=0.8, color=line.get_color())
        n_opt, d_opt = law.optimum(c, kappa)
        ax.plot([n_opt], [law(n_opt, d_opt)], "*", ms=12, color=line.get_color())
    ax.set(xscale="log", xlabel="parameters", ylabel="validation bits per byte",
           title=f"isoFLOP curves: runs (o), the {out['chosen']} law (--), its optimum (*)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


def predict(args) -> dict:
    """The depth whose run at this budget the law says is best among those that stay within one pass over
    the training tokens (the regime the sweep measured; the toolkit's own counts of parameters, FLOPs
    per token and steps at each depth), its steps and predicted bits per byte; with --run, trained."""
    record, runs = results(args.sweep)
    if len(runs) < 5:
        raise UserError(f"{len(runs)} finished runs in {args.sweep}: fit at least 5 before predicting")
    chosen, laws, _ = chosen_law(runs)
    options = _depth_options(record, args.budget, args.max_depth, laws[chosen])
    if not options:
        raise UserError(f"a budget of {args.budget:.3g} FLOPs is less than one step of the smallest model")
    fits = [o for o in options if o["tokens"] <= record["train_tokens"]]
    if not fits:
        raise UserError(f"at {args.budget:.3g} FLOPs every depth up to {args.max_depth} needs more than one pass over the "
                        f"{record['train_tokens']:,} training tokens; predict a smaller budget, or raise --max_depth")
    best, free = min(fits, key=lambda o: o["predicted_bpb"]), min(options, key=lambda o: o["predicted_bpb"])
    best["law"] = chosen
    print(f"at {args.budget:.3g} FLOPs: depth {best['depth']} ({best['params'] / 1e6:.2f}M params), {best['steps']} steps "
          f"({best['tokens'] / best['params']:.2g} tokens/param), predicted bpb {best['predicted_bpb']:.4f} ({chosen} law)")
    if free is not best:
        print(f"  (the law prefers depth {free['depth']}, {free['predicted_bpb']:.4f} bpb, but its {free['tokens']:,} tokens "
              f"are more than one pass over the {record['train_tokens']:,} training tokens: repeated data is outside the "
              "law)")
    if args.run:
        best.update(_check_prediction(record, best, args))
    return best


def _depth_options(record: dict, budget: float, max_depth: int, law) -> list[dict]:
    """Each depth's run at this budget (while one step fits it): size, steps, tokens, predicted bpb."""
    import gpt_train as gt

    options = []
    for depth in range(1, max_depth + 1):
        s = recipe_at(record["recipe"], depth, record["ref_width"], 1, Path("x"), 1)[1]
        cfg, b = s.shared.model_config, s.shared.batch
        tps = b.batch_size * cfg.context_length * b.grad_accum
        steps = int(budget // (gt.flops_per_token(cfg, cfg.context_length) * tps))
        if steps < 1:
            break
        n = gt.count_parameters_from_config(cfg)["total"]
        options.append({"depth": depth, "steps": steps, "params": n, "tokens": steps * tps,
                        "predicted_bpb": law(n, steps * tps)})
    return options


def _check_prediction(record, best, args) -> dict:
    name = f"predict-d{best['depth']}-c{args.budget:.3g}".replace("+", "")
    eval_iters = int(_flag(record["runs"][0]["flags"], "eval_iters"))  # measured as the sweep's runs were
    flags = recipe_at(record["recipe"], best["depth"], record["ref_width"], best["steps"], args.sweep / name, eval_iters)[0]
    if finished(args.sweep / name) is None and train_one(flags) != 0:
        raise UserError(f"the predicted run failed; see {args.sweep / (name + '.log')}")
    measured = finished(args.sweep / name)["bpb"]
    error = (best["predicted_bpb"] - measured) / measured
    print(f"measured bpb {measured:.4f}: the prediction is off by {100 * error:+.2f}%")
    return {"measured_bpb": measured, "error": error, "run_dir": str(args.sweep / name)}


def main(argv=None) -> dict:
    argv = list(sys.argv[1:] if argv is None else argv)
    recipe = []
    if argv and argv[0] == "plan" and "--" in argv:  # plan ... -- [training flags]: also accepted
        i = argv.index("--")
        argv, recipe = argv[:i], argv[i + 1:]
    args, rest = build_parser().parse_known_args(argv)
    if args.command != "plan" and rest:
        raise UserError(f"unknown arguments for {args.command}: {' '.join(rest)[:80]}")
    return {"plan": lambda: plan(args, [*rest, *recipe]), "run": lambda: run(args), "fit": lambda: fit(args),
            "predict": lambda: predict(args)}[args.command]()


if __name__ == "__main__":
    run_cli(main)
