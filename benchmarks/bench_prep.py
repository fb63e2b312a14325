"""prep_dataset.py measured: cleaning quality on a hand-marked evaluation set of raw Gutenberg files,
and throughput on a synthetic mirror made of copies of real books (MB/s per core and with all cores,
peak memory, against plain tiktoken's tokenization speed on the same text).

    python benchmarks/bench_prep.py --quality            # the evaluation set only (seconds)
    python benchmarks/bench_prep.py --mirror_mb 2048     # + a 2 GB mirror (minutes)
"""

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

from _common import print_table

import gpt_train as gt
import gutenberg_text as gtext
import prep_dataset

EVAL_DIR = Path(__file__).resolve().parents[1] / "tests" / "data" / "gutenberg_eval"
LICENCE_LINE_RE = re.compile(r"project gutenberg|gutenberg\.(?:org|net)|small print|full licen[cs]e|literary archive|"
                             r"gutenberg-tm", re.I)


def eval_books() -> list[tuple[dict, str]]:
    """(annotation, raw text) of every book of the evaluation set."""
    spec = json.loads((EVAL_DIR / "eval.json").read_text(encoding="utf-8"))
    embedded = {}
    for book in prep_dataset.split_gutenberg_bundle(prep_dataset.embedded_sample_path().read_text(encoding="utf-8")):
        m = gtext.EBOOK_ID_RE.search(book)
        embedded[m.group(1)] = book
    out = []
    for entry in spec["books"]:
        src = entry["source"]
        raw = embedded[src.split(":")[1]] if src.startswith("embedded:") else (EVAL_DIR / src).read_text(encoding="utf-8")
        out.append((entry, raw))
    return out


def _after_start(lines: list[str]) -> int:
    for i, line in enumerate(lines):
        if gtext.START_RE.match(line) or gtext.SMALL_PRINT_END_RE.match(line):
            return i + 1
    return 0


def _index(lines: list[str], text: str, start: int, last: bool = False) -> int:
    """The line that is `text` (the first after `start`), or for `last` the last line ending with it."""
    hits = [i for i in range(start, len(lines))
            if lines[i].strip() == text.strip() or (last and lines[i].strip().endswith(text.strip()))]
    if not hits:
        raise ValueError(f"{text!r} is not in the book")
    return hits[-1] if last else hits[0]


def _credit_lines(entry: dict, lines: list[str], start: int) -> set[int]:
    """Indices of the lines inside the hand-marked credit/note blocks (first and last line of each)."""
    marked = set()
    for a, b in entry["credit_blocks"]:
        i = _index(lines, a, start)
        j = _index(lines, b, i + 1 if a == b and lines.count(a) > 1 else i)
        marked.update(range(i, j + 1))
    return marked


def score(entry: dict, raw: str, clean) -> dict:
    """Licence lines left, credit/note lines left, body lines lost, and whether the first and last
    body lines are right, for one book cleaned by `clean(raw) -> text`."""
    lines = gtext.normalize_text(raw).splitlines()
    start = _after_start(lines)
    marked = _credit_lines(entry, lines, start)
    first, last = _index(lines, entry["first"], start), _index(lines, entry["last"], start, last=True)
    body = Counter(lines[i].strip() for i in range(first, last + 1) if i not in marked and lines[i].strip())
    credits = {lines[i].strip() for i in marked if lines[i].strip()}
    out = [ln for ln in clean(raw).splitlines() if ln.strip()]
    got = Counter(ln.strip() for ln in out)
    return {"book": entry["source"], "era": entry["era"], "kind": entry["kind"],
            "licence left": sum(bool(LICENCE_LINE_RE.search(ln)) for ln in out),
            "credit/note left": sum(n for ln, n in got.items() if ln in credits),
            "credit/note lines": sum(1 for i in marked if lines[i].strip()),
            "body lost": sum((body - got).values()), "body lines": sum(body.values()),
            "first ok": out[0].strip() == entry["first"].strip() if out else False,
            "last ok": out[-1].strip().endswith(entry["last"].strip()) if out else False}


def before_this_change(raw: str) -> str:
    """What cleaning did before credits and notes were removed: header/footer/licence only."""
    return gtext.normalize_text(gtext.strip_gutenberg(raw)[0])


def quality() -> dict:
    rows = [score(entry, raw, lambda r: gtext.clean_book(r)[0]) for entry, raw in eval_books()]
    before = [score(entry, raw, before_this_change) for entry, raw in eval_books()]
    print_table([{k: r[k] for k in ("book", "kind", "licence left", "credit/note left", "credit/note lines", "body lost",
                                    "body lines", "first ok", "last ok")} for r in rows])
    totals = {"books": len(rows), "licence left": sum(r["licence left"] for r in rows),
              "credit/note left": sum(r["credit/note left"] for r in rows),
              "credit/note left before": sum(r["credit/note left"] for r in before),
              "credit/note lines": sum(r["credit/note lines"] for r in rows),
              "body lost": sum(r["body lost"] for r in rows), "body lines": sum(r["body lines"] for r in rows),
              "first and last right": sum(r["first ok"] and r["last ok"] for r in rows)}
    print(f"\n{totals['books']} books: {totals['licence left']} licence lines left, {totals['credit/note left']} of "
          f"{totals['credit/note lines']} credit/note lines left (before this cleaning: "
          f"{totals['credit/note left before']}), {totals['body lost']} of {totals['body lines']:,} body lines lost, "
          f"first and last body line right in {totals['first and last right']}")
    return totals


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
    totals = quality()
    if not args.quality:
        print()
        throughput(args.mirror_mb)
    return totals


if __name__ == "__main__":
    main()
