"""prep_dataset.py measured: cleaning quality on a hand-marked evaluation set of raw Gutenberg files,
and throughput on a synthetic mirror made of copies of real books (MB/s per core and with all cores,
peak memory, against plain tiktoken's tokenization speed on the same text).

    python benchmarks/bench_prep.py --quality            # the evaluation set only (seconds)
    python benchmarks/bench_prep.py --mirror_mb 2048     # + a 2 GB mirror (minutes)
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import print_table

import gpt_train as gt
from gptkit.gutenberg import text as gtext
import prep_dataset

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import gutenberg_eval  # noqa: E402


# ----------------------------------------------------------------------------------------------
# Throughput on a synthetic mirror


def make_mirror(root: Path, mb: float) -> tuple[int, int]:
    """A Gutenberg-mirror-like tree (1/2/3/12345/12345-0.txt, plus -8.txt/.zip duplicates of some
    books) of copies of the embedded real books, `mb` megabytes of unique books. Returns (books, files)."""
    import zipfile

    books = prep_dataset.split_gutenberg_bundle(prep_dataset.embedded_sample_path().read_text(encoding="utf-8"))
    size, n, files = 0, 0, 0
    while size < mb * 1e6:
        book_id = 10000 + n
        text = books[n % len(books)].replace(f"#{gtext.EBOOK_ID_RE.search(books[n % len(books)]).group(1)}]", f"#{book_id}]")
        folder = root.joinpath(*str(book_id)[:-1], str(book_id))
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{book_id}-0.txt").write_text(text, encoding="utf-8")
        files += 1
        if n % 3 == 0:  # the same book again, as an 8-bit file and zipped: duplicates to drop
            (folder / f"{book_id}-8.txt").write_bytes(text.encode("cp1252", errors="replace"))
            with zipfile.ZipFile(folder / f"{book_id}.zip", "w") as z:
                z.writestr(f"{book_id}.txt", text.encode("ascii", errors="replace"))
            files += 2
        size += len(text.encode())
        n += 1
    return n, files


def throughput(mb: float, workers_list=(1, 2)) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        books, files = make_mirror(tmp / "mirror", mb)
        mb_in = sum(f.stat().st_size for f in (tmp / "mirror").rglob("*-0.txt")) / 1e6
        print(f"synthetic mirror: {books} books, {files} files, {mb_in:,.0f} MB of unique books")
        for workers in workers_list:
            out = tmp / f"out{workers}"
            # A fresh process per run: its peak resident memory is the run's own.
            code = (f"import sys, json, time, resource; sys.path.insert(0, {str(Path(__file__).resolve().parents[1])!r}); "
                    f"import prep_dataset; t = time.perf_counter(); "
                    f"s = prep_dataset.prepare(prep_dataset.Path({str(tmp / 'mirror')!r}), prep_dataset.Path({str(out)!r}), "
                    f"workers={workers}, log=lambda *a: None, progress=False); "
                    f"print(json.dumps({{'s': time.perf_counter() - t, 'dup': s['duplicates_dropped'], "
                    f"'books': s['books_read'], 'rss': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, "
                    f"'child_rss': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}}))")
            r = json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                                          check=True).stdout.strip().splitlines()[-1])
            rows.append({"stage": f"prepare, {workers} process(es)", "MB in": f"{mb_in:,.0f}", "seconds": f"{r['s']:.1f}",
                         "MB/s": f"{mb_in / r['s']:.1f}", "MB/s per core": f"{mb_in / r['s'] / workers:.1f}",
                         "peak RSS MB (main / largest worker)": f"{r['rss'] / 1024:,.0f} / {r['child_rss'] / 1024:,.0f}",
                         "books / duplicates dropped": f"{r['books']} / {r['dup']}"})
            print(rows[-1], flush=True)
        text = (tmp / "out1" / "combined_1.txt").read_text(encoding="utf-8")[:50_000_000]
        shutil.rmtree(tmp / "mirror")
    gt.get_tokenizer()
    for threads in (1, 2):
        t0 = time.perf_counter()
        ids = gt.encode_documents([text], num_threads=threads)
        dt = time.perf_counter() - t0
        rows.append({"stage": f"plain tiktoken, {threads} thread(s)", "MB in": f"{len(text.encode()) / 1e6:,.0f}",
                     "seconds": f"{dt:.1f}", "MB/s": f"{len(text.encode()) / 1e6 / dt:.1f}",
                     "MB/s per core": f"{len(text.encode()) / 1e6 / dt / threads:.1f}",
                     "peak RSS MB (main / largest worker)": "", "books / duplicates dropped": f"{len(ids):,} tokens"})
    print_table(rows)
    return rows


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quality", action="store_true", help="only the cleaning quality on the evaluation set")
    p.add_argument("--mirror_mb", type=float, default=300.0, help="megabytes of unique books in the synthetic mirror")
    args = p.parse_args(argv)
    totals = gutenberg_eval.quality(show=print_table)
    if not args.quality:
        print()
        throughput(args.mirror_mb)
    return totals


if __name__ == "__main__":
    main()
