"""Data pipeline throughput: tokenizing into the shard cache (1 vs 2 threads) against plain tiktoken
`encode_ordinary_batch` with the same thread count on the same documents (the limit on these cores),
and the memmap batch sampler's tokens/s against what a 124M training step consumes on this machine.

    python benchmarks/bench_data.py                  # ~30 MB of generated jsonl documents
"""

import argparse
import json
import tempfile
import time
from pathlib import Path

from _common import print_table

import torch

import gpt_train as gt
import prep_dataset
import token_cache


def write_corpus(path: Path, mb: float) -> list[str]:
    """jsonl documents cut from the embedded books (real English prose), repeated to `mb` megabytes."""
    text = "\n".join(prep_dataset.embedded_books())
    paragraphs = [p for p in text.split("\n\n") if len(p) > 200]
    docs, size, i = [], 0, 0
    while size < mb * 1e6:
        doc = "\n\n".join(paragraphs[i % len(paragraphs) : i % len(paragraphs) + 8])
        docs.append(doc)
        size += len(doc.encode())
        i += 8
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps({"text": d}) + "\n")
    return docs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--mb", type=float, default=30.0, help="size of the generated corpus")
    p.add_argument("--step_batch", type=int, default=2, help="batch of the 124M step to compare the loader with")
    p.add_argument("--step_context", type=int, default=256, help="context of that step")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        docs = write_corpus(tmp / "corpus.jsonl", args.mb)
        mb = sum(len(d.encode()) for d in docs) / 1e6
        tok = gt.get_tokenizer()
        limit = {}
        for threads in (1, 2):
            t0 = time.perf_counter()
            n = sum(len(e) for e in tok.encode_ordinary_batch(docs, num_threads=threads))
            dt = time.perf_counter() - t0
            limit[threads] = n / dt
            rows.append({"what": f"plain tiktoken encode_ordinary_batch, {threads} thread(s)", "MB/s": f"{mb / dt:.1f}",
                         "tokens/s": f"{n / dt:,.0f}", "vs plain tiktoken": "limit"})
        src = token_cache.resolve_source(str(tmp / "corpus.jsonl"))
        # One-time costs (the tokenizer, imports) are not throughput.
        token_cache.build_cache(src, tmp / "warmup", max_tokens=10_000, progress=False, log=lambda *a: None)
        for threads in (1, 2):
            t0 = time.perf_counter()
            m = token_cache.build_cache(src, tmp / f"cache{threads}", num_threads=threads, progress=False,
                                        shard_tokens=2_000_000, log=lambda *a: None)
            dt = time.perf_counter() - t0
            rate = m["tokens_consumed"] / dt
            rows.append({"what": f"build_cache (read + tokenize + shards), {threads} thread(s)", "MB/s": f"{mb / dt:.1f}",
                         "tokens/s": f"{rate:,.0f}", "vs plain tiktoken": f"{rate / limit[threads]:.0%}"})
        cache = token_cache.load_cache(tmp / "cache2", src)
        ds = gt.TokenWindowDataset(cache.train, 1024)
        sampler = gt.BatchSampler(ds, 32, seed=0)
        sampler.next()
        t0, n = time.perf_counter(), 0
        while time.perf_counter() - t0 < 3.0:
            x, _ = sampler.next()
            n += x.numel()
        loader_rate = n / (time.perf_counter() - t0)
        rows.append({"what": "BatchSampler over memmapped shards (32 x 1024 batches)", "MB/s": "",
                     "tokens/s": f"{loader_rate:,.0f}", "vs plain tiktoken": ""})
    # What one 124M training step consumes on this machine.
    runtime = gt.setup_runtime("cpu")
    model = gt.GPTModel(gt.get_config("124M", context_length=args.step_context))
    opt = gt.make_adamw(model, 3e-4)
    x = torch.randint(0, 50257, (args.step_batch, args.step_context + 1))
    for i in range(3):
        if i == 1:
            t0 = time.perf_counter()
        gt.calc_loss_batch(x[:, :-1], x[:, 1:], model, runtime.device).backward()
        opt.step()
        opt.zero_grad()
    step_rate = args.step_batch * args.step_context * 2 / (time.perf_counter() - t0)
    rows.append({"what": f"124M training step on CPU ({args.step_batch} x {args.step_context})", "MB/s": "",
                 "tokens/s": f"{step_rate:,.0f}", "vs plain tiktoken": ""})
    print_table(rows)
    print(f"\nloader serves {loader_rate / step_rate:,.0f}x what the 124M step consumes (target >= 50x)")
    return rows


if __name__ == "__main__":
    main()
