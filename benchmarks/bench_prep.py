"""Throughput of prep_dataset.py on the embedded Gutenberg books: cleaning (boilerplate removal and
normalisation, 1 and 2 processes) and tokenizing the cleaned text, in MB/s.

    python benchmarks/bench_prep.py
"""

import argparse
import tempfile
import time
from pathlib import Path

from _common import print_table

import gpt_train as gt
import prep_dataset


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--repeat", type=int, default=3, help="runs per measurement (best is reported)")
    args = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        raw = Path(tmp) / "raw"
        prep_dataset.write_embedded_sample(raw, log=lambda *a: None)
        mb_in = sum(f.stat().st_size for f in raw.iterdir()) / 1e6
        for workers in (1, 2):
            best = float("inf")
            for i in range(args.repeat):
                t0 = time.perf_counter()
                summary = prep_dataset.prepare(raw, Path(tmp) / f"out{workers}_{i}", workers=workers, log=lambda *a: None)
                best = min(best, time.perf_counter() - t0)
            rows.append({"stage": f"clean + combine ({workers} process{'es' if workers > 1 else ''})",
                         "MB in": f"{mb_in:.1f}", "seconds": f"{best:.2f}", "MB/s": f"{mb_in / best:.1f}"})
        texts = [Path(f).read_text(encoding="utf-8") for f in summary["files"]]
        mb_clean = sum(len(t.encode()) for t in texts) / 1e6
        gt.get_tokenizer()  # built once, not timed
        for threads in (1, 2):
            best = float("inf")
            for _ in range(args.repeat):
                t0 = time.perf_counter()
                ids = gt.encode_documents(texts, num_threads=threads)
                best = min(best, time.perf_counter() - t0)
            rows.append({"stage": f"tokenize ({threads} thread{'s' if threads > 1 else ''})", "MB in": f"{mb_clean:.1f}",
                         "seconds": f"{best:.2f}", "MB/s": f"{mb_clean / best:.1f} ({len(ids) / best:,.0f} tok/s)"})
    print_table(rows)
    return rows


if __name__ == "__main__":
    main()
