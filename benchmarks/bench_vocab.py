"""Vocabularies of one's own, measured on this machine (the README's tokenizer figures):

1. compression: BPE tokenizers of 4,096 to 32,768 ids trained (tokenizer.py train) on the embedded
   Gutenberg books' training pieces, in bytes per token on the held-out pieces, against GPT-2's;
2. training speed: MB of text per second of the two trainers (rustbpe, Hugging Face's tokenizers) on the
   same text at 32,768 ids, and the encoders' speed (tiktoken, tokenizers) on the same tokenizer;
3. quality per second: the README main job (`small` preset, 16 x 128 tokens a step, cosine steps) with
   the modern + Muon recipe, once per vocabulary, compared in validation bits per byte against training
   time (steps x ms/step timed alone, evaluations excluded): the GPT-2-vocabulary arm for --steps, each
   trained vocabulary for as many steps as fit in that arm's time (its cosine schedule as long), and how
   soon each reaches the GPT-2 arm's final.

    python benchmarks/bench_vocab.py --steps 200          # all three: about 2 hours on 2 CPU cores (Zen 1)
    python benchmarks/bench_vocab.py --only compression,speed
    python benchmarks/bench_vocab.py --jobs 2             # quality arms two at a time, one thread each

Training runs are pretraining_simple.py itself, in processes of their own; each result is appended to
--out when measured, and a rerun skips what is there. The validation bits per byte of each arm are on
its own cache's held-out blocks (every 10th block of 4,096 tokens: about the same 10% of the books, cut
at other places for other vocabularies).
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from _common import print_table

ROOT = Path(__file__).resolve().parents[1]
SIZES = (4096, 8192, 16384, 32768)
RECIPE = ["--arch", "modern", "--optimizer", "muon", "--muon_lr", "0.01", "--muon_embed_lr", "0.01", "--muon_head_lr",
          "0.004"]


def tokenizers(work: Path, sizes=SIZES) -> dict[str, str]:
    """gpt2 and a trained tokenizer per size (trained once, kept in `work`)."""
    out = {"gpt2": "gpt2"}
    for n in sizes:
        folder = work / f"gutenberg-{n}"
        if not folder.is_dir():
            subprocess.run([sys.executable, str(ROOT / "tokenizer.py"), "train", "--data", "gutenberg", "--vocab_size",
                            str(n), "--out", str(folder), "--no-progress"], check=True, cwd=work)
        out[f"bpe-{n}"] = str(folder)
    return out


def compression(toks: dict[str, str], work: Path) -> list[dict]:
    sys.path.insert(0, str(ROOT))
    import tokenizer as cli

    table = cli.main(["compare", *toks.values(), "--data", "gutenberg", "--plot", str(work / "compare.png")])["table"]
    base = next(iter(table["gpt2"].values()))["bytes_per_token"]
    rows = []
    for name, path in toks.items():
        bpt = next(iter(table[path].values()))["bytes_per_token"]
        rows.append({"tokenizer": name, "bytes_per_token": round(bpt, 3), "vs gpt2": f"{100 * (bpt / base - 1):+.1f}%"})
    return rows


def speed(work: Path) -> list[dict]:
    """rustbpe and tokenizers trained on the same pieces at 32,768 ids; tiktoken and tokenizers encoding."""
    sys.path.insert(0, str(ROOT))
    import tokenizer as cli
    from gptkit.tokenizer import load_tokenizer
    from gptkit.tokenizer_train import SPLIT_PATTERN, split_documents, train_ranks

    c = argparse.Namespace(data="gutenberg", text_column="text", max_chars=None, doc_chars=10_000, heldout_every=10)
    pieces = list(split_documents(cli.corpus_rows(c, argparse.Namespace()), 10_000, None, 10, False))
    mb = sum(len(p.encode()) for p in pieces) / 1e6
    t0 = time.perf_counter()
    train_ranks(pieces, 32768 - 1, SPLIT_PATTERN)
    t_rust = time.perf_counter() - t0
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers, trainers

    hf = Tokenizer(models.BPE())
    hf.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(SPLIT_PATTERN), behavior="isolated"),
                                                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    t0 = time.perf_counter()
    hf.train_from_iterator(pieces, trainers.BpeTrainer(vocab_size=32768, special_tokens=["<|bos|>"], show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    t_hf = time.perf_counter() - t0
    ours = load_tokenizer(work / "gutenberg-32768")
    from gptkit.tokenizer import TOKENIZERS

    via_hf = TOKENIZERS["hf"].load(None, ours.files)
    enc = {}
    for name, tok in (("tiktoken", ours), ("tokenizers", via_hf)):
        t0 = time.perf_counter()
        tok.encode_ordinary_batch(pieces, num_threads=os.cpu_count())
        enc[name] = mb / (time.perf_counter() - t0)
    return [{"library": "rustbpe (encoding: tiktoken)", "train MB/s": round(mb / t_rust, 2),
             "encode MB/s": round(enc["tiktoken"], 2)},
            {"library": "tokenizers", "train MB/s": round(mb / t_hf, 2), "encode MB/s": round(enc["tokenizers"], 2)}]


def run_arm(name: str, tok: str, steps: int, a, work: Path) -> dict:
    run_dir = work / "runs" / f"{name}-{steps}"
    flags = ["--model", "small", "--batch_size", "16", "--max_steps", str(steps), "--schedule", "cosine",
             "--warmup_steps", "30", "--lr", "1e-3", "--eval_every", "25", "--eval_iters", "10", "--sample_every", "0",
             "--save_every", "0", "--log_every", "100", "--no-progress", "--dtype", a.dtype, "--seed", "123",
             "--run_dir", str(run_dir), "--overwrite", "--tokenizer", tok, *RECIPE]
    env = {**os.environ, "OMP_NUM_THREADS": str(a.threads)}
    t0 = time.perf_counter()
    r = subprocess.run([sys.executable, str(ROOT / "pretraining_simple.py"), *flags], capture_output=True, text=True,
                       cwd=work, env=env)
    if r.returncode != 0:
        return {"run": name, "error": (r.stderr.strip().splitlines() or [f"rc {r.returncode}"])[-1]}
    h = json.loads((run_dir / "losses.json").read_text())
    model = next((ln for ln in r.stdout.splitlines() if ln.startswith("model:")), "")
    return {"run": name, "tokenizer": tok, "val_step": h["val_step"], "val_bpb": h["val_bpb"], "final_bpb": h["val_bpb"][-1],
            "model": model.split("|")[0].strip(), "minutes": round((time.perf_counter() - t0) / 60, 1)}


def cost(toks: dict[str, str], a, work: Path) -> dict[str, float]:
    """ms per training step of each arm, timed alone with every core (steps 6-20 of a short run; kept in
    WORK/cost.json): the time axis of the quality comparison, free of what else the machine did while
    the curves were made."""
    path = work / "cost.json"
    out = json.loads(path.read_text()) if path.exists() else {}
    for name, tok in toks.items():
        if out.get(name):
            continue
        flags = ["--model", "small", "--batch_size", "16", "--max_steps", "20", "--lr", "1e-3", "--eval_every", "0",
                 "--eval_iters", "1", "--sample_every", "0", "--save_every", "0", "--log_every", "5", "--no-progress",
                 "--dtype", a.dtype, "--run_dir", str(work / "cost" / name), "--overwrite", "--tokenizer", tok, *RECIPE]
        r = subprocess.run([sys.executable, str(ROOT / "pretraining_simple.py"), *flags], capture_output=True, text=True,
                           cwd=work)
        ms = [float(ln.split("ms/step")[1].split("|")[0]) for ln in r.stdout.splitlines() if "ms/step" in ln]
        out[name] = round(sum(ms[1:]) / len(ms[1:]), 1) if len(ms) > 1 else None
        print(f"{name}: {out[name]} ms/step alone", flush=True)
        path.write_text(json.dumps(out, indent=1))
    return out


def quality(toks: dict[str, str], a, work: Path) -> list[dict]:
    """Each arm trained (GPT-2's for --steps; with --equal_time each trained vocabulary for as many steps as
    fit in the GPT-2 arm's training time), then: when each reaches the GPT-2 arm's final bits per byte."""
    alone = cost(toks, a, work)
    steps = {n: a.steps if n == "gpt2" or not a.equal_time else round(a.steps * alone["gpt2"] / alone[n]) for n in toks}
    done = {}
    for r in map(json.loads, a.out.read_text().splitlines() if a.out.exists() else []):
        if "final_bpb" in r:
            done[(r["run"], r["val_step"][-1])] = r
    todo = [n for n in toks if (n, steps[n]) not in done]

    def one(name):
        r = run_arm(name, toks[name], steps[name], a, work)
        with open(a.out, "a") as f:
            f.write(json.dumps(r) + "\n")
        print(f"{name}: final val bpb {r.get('final_bpb')} ({r.get('minutes')} min) {r.get('error', '')}", flush=True)
        return r
    with ThreadPoolExecutor(a.jobs) as pool:
        errors = [r for r in pool.map(one, todo) if "final_bpb" not in r]
    for r in map(json.loads, a.out.read_text().splitlines()):
        if "final_bpb" in r:
            done[(r["run"], r["val_step"][-1])] = r
    base = done.get(("gpt2", steps["gpt2"]))
    rows = [{"arm": r["run"], "error": r.get("error")} for r in errors]
    base_ms = base["val_step"][-1] * alone["gpt2"] if base else None  # the GPT-2 arm's training time
    for n in toks:
        r = done.get((n, steps[n]))
        if r is None:
            continue
        reach = next((s for s, v in zip(r["val_step"], r["val_bpb"]) if base and v <= base["final_bpb"]), None)
        rows.append({"arm": n, "model": r["model"].removeprefix("model: "), "ms/step": alone[n], "steps": steps[n],
                     "final val bpb": round(r["final_bpb"], 4), "step to gpt2's final": reach,
                     "time to gpt2's final": f"{reach * alone[n] / base_ms:.0%}" if reach and base else None})
    return rows


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--only", default="compression,speed,quality", help="which parts to run")
    p.add_argument("--work", type=Path, default=Path("bench_vocab"), help="tokenizers, runs and results go here")
    p.add_argument("--out", type=Path, default=None, help="quality results, one run per line (default: WORK/quality.jsonl)")
    p.add_argument("--steps", type=int, default=600, help="optimizer steps per quality run")
    p.add_argument("--quality_sizes", default="4096,8192,32768", help="the trained vocabularies of the quality arms")
    p.add_argument("--jobs", type=int, default=1, help="quality runs at once")
    p.add_argument("--threads", type=int, default=0, help="threads per run (default: cores / jobs)")
    p.add_argument("--dtype", default="auto", help="precision (auto: bf16 where the CPU computes it)")
    p.add_argument("--equal_time", action=argparse.BooleanOptionalAction, default=True,
                   help="train each trained vocabulary for the GPT-2 arm's time (else: for --steps, as GPT-2's)")
    a = p.parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    a.work = a.work.resolve()
    a.out = a.out or a.work / "quality.jsonl"
    a.threads = a.threads or max(1, (os.cpu_count() or 1) // a.jobs)
    parts, out = a.only.split(","), {}
    toks = tokenizers(a.work)
    arms = tokenizers(a.work, [int(v) for v in a.quality_sizes.split(",")])
    for part, fn in (("compression", lambda: compression(toks, a.work)), ("speed", lambda: speed(a.work)),
                     ("quality", lambda: quality(arms, a, a.work))):
        if part in parts:
            out[part] = fn()
            print_table(out[part])
    print(json.dumps(out, indent=2, default=str))
    return out


if __name__ == "__main__":
    main()
