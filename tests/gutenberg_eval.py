"""The hand-marked Gutenberg evaluation set (tests/data/gutenberg_eval/eval.json): for each raw book,
where its body starts and ends and which of its lines are producer credits or transcriber's notes;
and the score of a cleaner on it (licence lines left, credit/note lines left, body lines lost).
The tests check the cleaner with it; benchmarks/bench_prep.py prints its table."""

import json
import re
from collections import Counter
from pathlib import Path

import prep_dataset
from gptkit.gutenberg import text as gtext

EVAL_DIR = Path(__file__).resolve().parent / "data" / "gutenberg_eval"
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
    """Indices of the lines inside the hand-marked credit/note blocks (first and last line of each,
    or just the line for a one-line block)."""
    marked = set()
    for block in entry["credit_blocks"]:
        a, b = block if len(block) == 2 else (block[0], None)
        i = _index(lines, a, start)
        if b is None:
            marked.add(i)
            continue
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


def quality(show=None) -> dict:
    """Totals over the set; `show(rows)` gets the per-book rows (a benchmark prints them)."""
    rows = [score(entry, raw, lambda r: gtext.clean_book(r)[0]) for entry, raw in eval_books()]
    before = [score(entry, raw, before_this_change) for entry, raw in eval_books()]
    if show is not None:
        show([{k: r[k] for k in ("book", "kind", "licence left", "credit/note left", "credit/note lines", "body lost",
                                 "body lines", "first ok", "last ok")} for r in rows])
    totals = {"books": len(rows), "licence left": sum(r["licence left"] for r in rows),
              "credit/note left": sum(r["credit/note left"] for r in rows),
              "credit/note left before": sum(r["credit/note left"] for r in before),
              "credit/note lines": sum(r["credit/note lines"] for r in rows),
              "body lost": sum(r["body lost"] for r in rows), "body lines": sum(r["body lines"] for r in rows),
              "first and last right": sum(r["first ok"] and r["last ok"] for r in rows)}
    if show is not None:
        print(f"\n{totals['books']} books: {totals['licence left']} licence lines left, {totals['credit/note left']} of "
              f"{totals['credit/note lines']} credit/note lines left (before this cleaning: "
              f"{totals['credit/note left before']}), {totals['body lost']} of {totals['body lines']:,} body lines lost, "
              f"first and last body line right in {totals['first and last right']}")
    return totals
