"""Raw Project Gutenberg books into training text: each book cleaned in a worker process
(gptkit/gutenberg/text.py), the books combined into size-capped files separated by <|endoftext|>,
streaming (a window of books in memory), resumable after a kill (finished files are recorded, a rerun
continues after them with identical results), and published into the output folder only at the end.
`prepare_default_corpus` is the embedded sample, cleaned: what the training scripts use when given no
data. prep_dataset.py is its command line.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import math
import os
import re
import shutil
import time
import zipfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from gptkit.errors import RunFailure, UserError
from gptkit.files import DISK_FULL, FolderLock, check_writable_folder, disk_full, write_json
from gptkit.gutenberg.sources import (
    BOOK_SUFFIXES,
    BookRef,
    BookTooBig,
    catalog_reason,
    find_books,
    write_embedded_sample,
)
from gptkit.gutenberg.text import (
    clean_book,
    decode_book,
    detect_language,
    text_problem,
)
from gptkit.progress import progress_bar
from gptkit.tokenizer import EOT_TOKEN

DEFAULT_RAW_DIR = Path("data/gutenberg_raw")
DEFAULT_CLEAN_DIR = Path("data/gutenberg_clean")
STAGING, OUTPUT_MANIFEST = ".prepare", ".prep_manifest.json"  # hidden: not taken for data by token_cache
LOCK = ".prepare.lock"  # one preparation per output folder at a time
# A single book bigger than this is skipped (with a warning): the largest prose on Gutenberg is a few tens
# of MB, and a worker's memory is a few times the book's size. --max_book_mb raises it.
DEFAULT_MAX_BOOK_MB = 64


# ----------------------------------------------------------------------------------------------
# Cleaning one book (in a worker process)


@dataclass
class BookResult:
    path: str
    text: str | None = None  # cleaned text, or None when skipped
    reason: str = ""  # why it was skipped
    warnings: list[str] = field(default_factory=list)
    bytes_in: int = 0


def process_book(ref, max_book_bytes: int = DEFAULT_MAX_BOOK_MB << 20) -> BookResult:
    """Read, strip and clean one book; never raises (a problem becomes the skip reason)."""
    ref = ref if isinstance(ref, BookRef) else BookRef(str(ref))
    result = BookResult(ref.name)
    try:
        data = ref.read_bytes(max_book_bytes)
        result.bytes_in = len(data)
        if not data:
            result.reason = "empty file"
            return result
        raw, result.warnings = decode_book(data)
    except BookTooBig as e:
        result.reason = (f"{e.size / 2**20:.0f} MB, more than --max_book_mb {max_book_bytes / 2**20:g} (a book that "
                         "big is rarely prose; raise --max_book_mb to take it)")
        return result
    except (OSError, ValueError, zipfile.BadZipFile) as e:
        result.reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
        result.reason = f"unreadable: {result.reason}"
        return result
    not_text = text_problem(raw)
    if not_text:
        result.reason = not_text
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


def clean_in_parallel(refs: list[BookRef], workers: int, window: int = 32,
                      max_book_bytes: int = DEFAULT_MAX_BOOK_MB << 20) -> Iterator[BookResult]:
    """Results in the order of `refs`, from `workers` processes, a window of books at a time: only a
    window's results are ever held in memory, whatever the corpus size (and no book over the cap is
    read whole)."""
    work = functools.partial(process_book, max_book_bytes=max_book_bytes)
    if workers <= 1:
        yield from map(work, refs)
        return
    with ProcessPoolExecutor(workers) as pool:
        for i in range(0, len(refs), window * workers):
            yield from pool.map(work, refs[i : i + window * workers], chunksize=4)


# ----------------------------------------------------------------------------------------------
# Combining, streamed and resumable


class CombinedWriter:
    """Writes books into combined_1.txt, combined_2.txt, ... of at most `limit` bytes each (a bigger
    book gets a file of its own; no book is ever split), in a staging folder inside the output folder.
    After each finished file, progress.json records it and how many books it has consumed, so a run
    killed at any point resumes after the last finished file and writes the same files."""

    def __init__(self, output_dir: Path, limit: int, signature: str, log=print):
        self.output_dir, self.limit, self.log = output_dir, limit, log
        self.staging = output_dir / STAGING
        self.state = {"signature": signature, "done": 0, "files": [], "books_read": 0, "skipped": [], "warnings": [],
                      "bytes_in": 0}
        self.consumed, self.size, self.f = 0, 0, None
        self._resume_or_reset()

    def _resume_or_reset(self) -> None:
        progress = self.staging / "progress.json"
        old = read_record(progress, "files")
        if old and old.get("signature") == self.state["signature"]:
            self.state = old
            self.log(f"resuming: {old['done']:,} books already in {len(old['files'])} finished file(s)")
        elif old:  # another input: what it staged is ours and worthless now
            for entry in old["files"]:
                (self.staging / entry["name"]).unlink(missing_ok=True)
        self.staging.mkdir(parents=True, exist_ok=True)
        for p in self.staging.glob(".combined_*.tmp"):
            p.unlink()
        self.consumed = self.state["done"]

    def add(self, r: BookResult) -> None:
        data = r.text.encode("utf-8") if r.text else None
        if data is not None and self.f is not None and self.size + len(EOT_TOKEN) + len(data) > self.limit:
            self._finish_file()  # before this book is counted: it goes into the next file
        self.consumed += 1
        self.state["bytes_in"] += r.bytes_in
        self.state["warnings"] += [(r.path, w) for w in r.warnings]
        if data is None:
            self.state["skipped"].append((r.path, r.reason))
            return
        if len(data) > self.limit:
            self.log(f"note: {r.path} is {len(data) / 2**20:.1f} MB, over --max_size_mb: it gets a file of its own")
        self._write(data)
        self.state["books_read"] += 1
        if len(data) > self.limit:
            self._finish_file()  # nothing joins an oversized book

    def _write(self, data: bytes) -> None:
        path = self.staging / f".combined_{len(self.state['files']) + 1}.txt.tmp"
        try:
            if self.f is None:
                self.f = open(path, "wb")
                self.size = 0
            else:
                self.f.write(EOT_TOKEN.encode())
                self.size += len(EOT_TOKEN)
            self.f.write(data)
            self.size += len(data)
        except OSError as e:
            if e.errno in DISK_FULL:
                self._drop_partial(path)
                raise disk_full(path.with_name(path.name[1:-4]), e, self.size + len(data)) from None
            raise

    def _drop_partial(self, path: Path) -> None:
        """A file that cannot be finished: closed and removed (a rerun writes it again)."""
        with contextlib.suppress(OSError):
            self.f.close()
        self.f = None
        path.unlink(missing_ok=True)

    def _finish_file(self) -> None:
        """Make the current file final and record it, with every book counted so far as done."""
        name = f"combined_{len(self.state['files']) + 1}.txt"
        try:
            self.f.flush()
            os.fsync(self.f.fileno())
            self.f.close()
        except OSError as e:
            if e.errno in DISK_FULL:
                self._drop_partial(self.staging / f".{name}.tmp")
                raise disk_full(self.staging / name, e, self.size) from None
            raise
        self.f = None
        os.replace(self.staging / f".{name}.tmp", self.staging / name)
        self.state["files"].append({"name": name, "bytes": self.size})
        self.state["done"] = self.consumed
        write_json(self.staging / "progress.json", self.state)

    def finish(self) -> list[Path]:
        """Close the last file and move every file into the output folder, replacing the earlier run's
        (those its .prep_manifest.json lists); combined_*.txt that no manifest lists are moved aside."""
        if self.f is not None:
            self._finish_file()
        return publish(self.output_dir, self.staging, [e["name"] for e in self.state["files"]], self.state, self.log)


COMBINED_NAME_RE = re.compile(r"^combined_\d+\.txt$")


def read_record(path: Path, key: str) -> dict | None:
    """One of this tool's own records (the staging progress or the output manifest), or None if there
    is none. Its `key` list (names, or entries with a name) may name only combined_N.txt files: those are what a rerun replaces or
    deletes, so a record edited to name anything else (../x, /x) is refused, and nothing is deleted."""
    if not path.is_file():
        return None
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise UserError(f"{path} cannot be read ({getattr(e, 'strerror', None) or e}); remove it and prepare again")
    names = record.get(key) if isinstance(record, dict) else None
    names = [n.get("name") if isinstance(n, dict) else n for n in names] if isinstance(names, list) else None
    if names is None or not all(isinstance(n, str) and COMBINED_NAME_RE.match(n) for n in names):
        raise UserError(f"{path} is damaged or was edited (its '{key}' are not combined_N.txt names); nothing was "
                        f"deleted: remove {path.name} and prepare again")
    return record


def publish(output_dir: Path, staging: Path, names: list[str], state: dict, log) -> list[Path]:
    """Move the staged files into the output folder, each replacing the file of the same name, then
    remove the earlier run's files (those its manifest lists) that this run has no file for. A name
    missing from staging was moved by a publish that was killed: it is already in place. Safe to run
    again after a kill at any point, and it never deletes a file no manifest of this tool lists."""
    manifest = output_dir / OUTPUT_MANIFEST
    previous = (read_record(manifest, "files") or {}).get("files", [])
    moved_before = _published_before(output_dir, staging, names)
    _move_strangers_aside(output_dir, set(previous) | moved_before, log)
    for name in names:
        if name not in moved_before:
            os.replace(staging / name, output_dir / name)
    for name in set(previous) - set(names):
        (output_dir / name).unlink(missing_ok=True)
    write_json(manifest, {"files": names, "books_read": state["books_read"], "skipped": len(state["skipped"])})
    shutil.rmtree(staging)
    return [output_dir / n for n in names]


def _published_before(output_dir: Path, staging: Path, names: list[str]) -> set[str]:
    """The staged names a killed publish already moved into place (each must still be there)."""
    moved = {n for n in names if not (staging / n).exists()}
    for n in moved:
        if not (output_dir / n).is_file():
            raise RunFailure(f"{output_dir / n} was published by an interrupted run and is gone since; "
                             f"delete {staging} and prepare again")
    return moved


def _move_strangers_aside(output_dir: Path, ours: set[str], log) -> None:
    """combined_*.txt files no manifest of this tool lists are someone else's: moved aside, not deleted."""
    strangers = [p for p in output_dir.glob("combined_*.txt") if p.name not in ours]
    if not strangers:
        return
    aside = output_dir / f"previous-{time.strftime('%Y%m%d-%H%M%S')}"
    aside.mkdir()
    for p in strangers:
        os.replace(p, aside / p.name)
    log(f"moved {len(strangers)} combined_*.txt file(s) this tool had not recorded to {aside}")


# ----------------------------------------------------------------------------------------------
# The pipeline


@dataclass
class Selection:
    """Which books a run takes: the catalog and its language/type rules."""
    catalog: dict[int, dict] | None = None
    languages: tuple[str, ...] = ("en",)
    types: tuple[str, ...] = ("Text",)

    def reason(self, bid: int | None) -> str | None:
        return catalog_reason(self.catalog.get(bid) if self.catalog and bid is not None else None,
                              self.languages, self.types)


def check_prepare_inputs(data_dir: Path, max_size_mb: float, workers: int | None, output_dir: Path | None = None,
                         max_book_mb: float = DEFAULT_MAX_BOOK_MB) -> None:
    if not data_dir.exists():
        raise UserError(f"--data_dir {data_dir} does not exist; pass --sample to fill it with the embedded books, "
                        "or --download to fetch books into it")
    if not data_dir.is_dir():
        raise UserError(f"--data_dir {data_dir} is not a directory")
    for name, value in (("max_size_mb", max_size_mb), ("max_book_mb", max_book_mb)):
        if not (math.isfinite(value) and value > 0):
            raise UserError(f"--{name} must be a positive number, got {value}")
    if workers is not None and workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if output_dir is not None:
        check_output_dir(output_dir)


def check_output_dir(output_dir: Path) -> None:
    check_writable_folder(output_dir, "--output_dir", "pick a writable folder for the combined files")


def _signature(refs: list[BookRef], max_size_mb, selection: Selection) -> str:
    """What a resumed run must agree on: the books (by name and size) and the settings."""
    h = hashlib.sha256(json.dumps([max_size_mb, selection.languages, selection.types, 2]).encode())
    for ref in refs:
        h.update(f"{ref.name}\0{ref.size()}\n".encode())
    return h.hexdigest()


def prepare(data_dir: Path, output_dir: Path, max_size_mb: float = 500.0, workers: int | None = None,
            log=print, selection: Selection | None = None, progress: bool = True,
            max_book_mb: float = DEFAULT_MAX_BOOK_MB) -> dict:
    """Clean and combine every book under data_dir (one per Gutenberg id, filtered by the catalog);
    returns the summary. Streams, resumes an interrupted run of the same inputs, and holds the output
    folder's lock while it works (a second preparation into it is refused)."""
    check_prepare_inputs(data_dir, max_size_mb, workers, output_dir, max_book_mb)
    output_dir.mkdir(parents=True, exist_ok=True)
    with FolderLock(output_dir / LOCK, what="preparation"):
        return _prepare_locked(data_dir, output_dir, max_size_mb, workers, log, selection or Selection(), progress,
                               max_book_mb)


def _prepare_locked(data_dir, output_dir, max_size_mb, workers, log, selection: Selection, progress, max_book_mb):
    ruled_out: list[tuple[str, str]] = []

    def wanted(bid: int) -> bool:
        why = selection.reason(bid)
        if why:
            ruled_out.append((f"book {bid}", why))
        return why is None

    notes: list[str] = []
    refs, duplicates = find_books(data_dir, exclude=output_dir, wanted=wanted, notes=notes)
    for note in notes:
        log(note)
    if not refs and not ruled_out:
        raise UserError(f"no book files ({', '.join(BOOK_SUFFIXES)} or .zip) found under {data_dir}")
    ruled_out = sorted(set(ruled_out))
    writer = CombinedWriter(output_dir, int(max_size_mb * 1024 * 1024),
                            _signature(refs, max_size_mb if max_book_mb == DEFAULT_MAX_BOOK_MB else [max_size_mb, max_book_mb],
                                       selection), log)
    todo = refs[writer.state["done"] :]
    bar = progress_bar(total=len(refs), initial=len(refs) - len(todo), desc="cleaning", unit="book") if progress else None
    try:
        for result in clean_in_parallel(todo, workers or min(len(todo), os.cpu_count() or 1) or 1,
                                        max_book_bytes=int(max_book_mb * 2**20)):
            writer.add(result)
            if bar is not None:
                bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return _summarize(writer, refs, duplicates, ruled_out, data_dir, output_dir, log)


def _summarize(writer: CombinedWriter, refs, duplicates, ruled_out, data_dir, output_dir, log) -> dict:
    state = writer.state
    summary = {"books_read": state["books_read"], "skipped": [tuple(s) for s in [*ruled_out, *state["skipped"]]],
               "warnings": [tuple(w) for w in state["warnings"]], "bytes_in": state["bytes_in"], "bytes_out": 0,
               "files": [], "duplicates_dropped": duplicates}
    for path, w in summary["warnings"][:50]:
        log(f"warning: {path}: {w}")
    for path, reason in summary["skipped"][:50]:
        log(f"skipped: {path}: {reason}")
    if not state["books_read"]:
        shutil.rmtree(writer.staging, ignore_errors=True)  # nothing to resume: leave the output folder as it was
        raise UserError(f"none of the {len(refs)} files under {data_dir} gave usable English text (see 'skipped' above)")
    files = writer.finish()
    summary["files"] = [str(f) for f in files]
    summary["bytes_out"] = sum(f.stat().st_size for f in files)
    log(f"summary: {summary['books_read']} books read, {len(summary['skipped'])} skipped, {duplicates} duplicate "
        f"copies dropped, {summary['bytes_in'] / 2**20:.2f} MB in, {summary['bytes_out'] / 2**20:.2f} MB out, "
        f"{len(files)} file(s) in {output_dir}")
    return summary


def prepare_default_corpus(output_dir: Path = DEFAULT_CLEAN_DIR, raw_dir: Path = DEFAULT_RAW_DIR, log=print) -> list[Path]:
    """The embedded sample, cleaned and combined; reuses earlier output when present."""
    existing = sorted(output_dir.glob("combined_*.txt"))
    if existing and not (output_dir / STAGING).exists():
        return existing
    write_embedded_sample(raw_dir, log=log)
    return [Path(f) for f in prepare(raw_dir, output_dir, log=log)["files"]]


