"""Local files as a data source: a file, a folder (searched recursively) or a glob, several of them
separated by commas (mixed by tokens with --data_mix). Each file is read by the FileFormat its whole
suffix names (`.jsonl.gz` is JSON lines, gzip-compressed), from an open binary stream, so compression
wraps any format: `.gz`, `.bz2`, `.xz` from the standard library, `.zst` through zstandard. Every error
names the file (and line). Hidden files and folders (.git, .token_cache) are not data. A file that is
a symlink is read where it points, and the output says so when that is outside the folder given;
symlinked folders are not entered (a loop could never end).

How to add a local format: `rows(stream, path, column, batch_size)`, a generator of lists of document
texts read from an open binary stream (`path` is for messages), and `probe(stream, path, column)`,
which fails fast reading little; then `register_format(FileFormat("name", (".suffix",), rows, probe))`
in a file loaded with `--plugin FILE`. Its compressed forms come for free.
"""
from __future__ import annotations

import bz2
import codecs
import contextlib
import glob
import gzip
import hashlib
import io
import itertools
import json
import lzma
import os
import re
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from gptkit.data.sources import DataOptions, DataSource, SourceKind, first_line, parse_mix, register_source
from gptkit.errors import UserError
from gptkit.files import no_such_path, sha256_file, walk_files
from gptkit.registry import Registry
from gptkit.tokenizer import Piece

# Local files up to this size are hashed whole for the cache's source identity; larger ones by their
# size, first and last 4 MiB and 16 evenly spaced 64 KiB samples (an edit elsewhere that keeps the
# size goes unnoticed there). A file whose size and mtime match the manifest is not hashed again.
FULL_HASH_BYTES = 64 << 20
# Memory goes to what the model sees, whatever the file: a .txt file larger than TEXT_PIECE characters
# is read in pieces of about that size, cut only where the tokenizer splits anyway (a space or a line
# break between two other characters), so the tokens equal those of the whole text. A stretch of more
# than MAX_UNCUT characters with no such place (a file of zeros, one giant "word") is refused, and so is
# a JSON line longer than MAX_JSON_LINE characters or a whole-JSON file larger than MAX_JSON_DOCUMENT.
TEXT_PIECE = 8 << 20
MAX_UNCUT = 64 << 20
MAX_JSON_LINE = 128 << 20
MAX_JSON_DOCUMENT = 512 << 20
# Where a text may be cut: before a space, or after a line break, with no other whitespace beside it
# (the pattern starts with its character so that the regex engine skips ahead to candidates fast).
SAFE_CUT = re.compile(r"[ \n](?<=\S[ \n])(?=\S)")


@dataclass(frozen=True)
class FileFormat:
    name: str
    suffixes: tuple[str, ...]  # whole suffixes, ".jsonl" or ".jsonl.gz"; the longest that ends a file name wins
    rows: Callable[[BinaryIO, str, str, int], Iterator[list[str]]]  # (stream, path, text column, batch size) -> texts
    probe: Callable[[BinaryIO, str, str], None]  # fail fast on a wrong file or column, reading little


FORMATS: Registry[FileFormat] = Registry("file format")
register_format = FORMATS.add  # register_format(FileFormat(...)): one line in the format's own file


def _zstd_open(path: str, mode: str = "rb"):
    try:
        import zstandard
    except ImportError:
        raise UserError(f"{path} is zstd-compressed: pip install zstandard (it is in requirements.txt)")
    return zstandard.open(path, mode)


COMPRESSIONS: dict[str, Callable] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open, ".zst": _zstd_open}


def format_of(path: str) -> tuple[FileFormat, str] | None:
    """(the format, the compression suffix or "") of a file name: the longest registered suffix that
    ends it, bare or followed by a compression's; None when no format claims it."""
    name = Path(path).name.lower()
    best = None
    for fmt in FORMATS.values():
        for suffix in fmt.suffixes:
            for comp in ("", *COMPRESSIONS):
                whole = suffix + comp
                if name.endswith(whole) and len(name) > len(whole) and (best is None or len(whole) > best[2]):
                    best = (fmt, comp, len(whole))
    return best[:2] if best else None


def known_suffixes() -> str:
    return "/".join(sorted({s for f in FORMATS.values() for s in f.suffixes}))


def open_data(path: str) -> BinaryIO:
    """The file's bytes as a stream, decompressed if its name says it is compressed."""
    fmt = format_of(path)
    comp = fmt[1] if fmt else ""
    return COMPRESSIONS[comp](path, "rb") if comp else open(path, "rb")


# ----------------------------------------------------------------------------------------------
# Finding files


def find_local_files(data: str, notes: list[str] | None = None) -> list[str]:
    """The data files of one --data part, sorted; `notes` collects what the user should know."""
    p = Path(data)
    if p.is_dir():
        files = _walk(p, notes if notes is not None else [])
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(f for f in glob.glob(data, recursive=True) if Path(f).is_file())
        if not files and not any(c in data for c in "*?["):
            raise no_such_path("--data", data, "give files, folders or globs of text, or smollm:SUBSET")
    suffixes = known_suffixes()
    if not files:
        raise UserError(f"no {suffixes} files (or their .gz/.bz2/.xz/.zst forms) found for --data {data}")
    unknown = sorted({"".join(Path(f).suffixes[-2:]) or Path(f).name for f in files if format_of(f) is None})
    if unknown:
        raise UserError(f"--data {data} names files of an unknown kind ({', '.join(unknown)}); use {suffixes}, "
                        "compressed or not (or a --plugin that registers the format)")
    return files


def _walk(folder: Path, notes: list[str]) -> list[str]:
    """Data files under a folder (see gptkit.files.walk_files for hidden files and links)."""
    files, more = walk_files(folder, lambda p: format_of(p) is not None)
    notes += more
    return files


# ----------------------------------------------------------------------------------------------
# The source kind


def claims(data: str, options: DataOptions) -> bool:
    return True  # the catch-all: asked last


def resolve(data: str, options: DataOptions) -> DataSource:
    if options.smollm_dir:
        raise UserError(f"--smollm_dir reads smollm:SUBSET data; --data {data} is local files: drop --smollm_dir, or "
                        "use --data smollm:SUBSET")
    specs = [s for s in data.split(",") if s] if "," in data and not Path(data).exists() else [data]
    notes: list[str] = []
    parts = [find_local_files(s, notes) for s in specs]
    return DataSource("local", parts, parse_mix(options.data_mix, len(parts)), options.text_column,
                      [f"{s} ({len(p)} file(s))" for s, p in zip(specs, parts)], notes)


def identity(source: DataSource, known: dict | None = None) -> dict:
    """Files are named relative to the folder they share, so a copied or moved corpus (with its
    cache) is the same source; what identifies a file is its content."""
    paths = [Path(os.path.abspath(p)) for part in source.parts for p in part]
    root = Path(os.path.commonpath([p.parent for p in paths]))
    known = {f["path"]: f for f in (known or {}).get("files", [])}
    files = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        files.append({**file_fingerprint(p, known.get(rel)), "path": rel})
    return {"kind": "local", "root": str(root), "files": files, "parts": [len(part) for part in source.parts],
            "weights": source.weights, "text_column": source.text_column}


def file_fingerprint(path, known: dict | None = None) -> dict:
    """A local file's content identity; reuses `known` (the manifest's record) when size and mtime match."""
    path = Path(path)
    st = path.stat()
    if known and known.get("bytes") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return dict(known)
    whole = st.st_size <= FULL_HASH_BYTES
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": sha256_file(path) if whole else _sampled_sha256(path, st.st_size),
            "hashed": "whole" if whole else "sampled"}


def _sampled_sha256(path: Path, size: int) -> str:
    """The size, the first and last 4 MiB and 16 evenly spaced 64 KiB samples of a large file."""
    h = hashlib.sha256(str(size).encode())
    offsets = [0, *(size * i // 17 for i in range(1, 17)), size - (4 << 20)]
    with open(path, "rb") as f:
        for off, n in zip(offsets, [4 << 20, *[64 << 10] * 16, 4 << 20]):
            f.seek(off)
            h.update(f.read(n))
    return h.hexdigest()


def rows(source: DataSource, i: int, skip: int, batch_size: int) -> Iterator[list[str]]:
    """Rows of part i's files in order, from row `skip` on; every error names its file."""
    for path in source.parts[i]:
        with _reading(path), open_data(path) as stream:
            for batch in format_of(path)[0].rows(stream, path, source.text_column, batch_size):
                if skip >= len(batch):
                    skip -= len(batch)
                    continue
                yield batch[skip:]
                skip = 0


def probe(source: DataSource) -> None:
    for part in source.parts:
        for path in part:
            with _reading(path), open_data(path) as stream:
                format_of(path)[0].probe(stream, path, source.text_column)


@contextlib.contextmanager
def _reading(path: str):
    """Reading errors of any format as one line naming the file."""
    try:
        yield
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8")
    except (OSError, EOFError, lzma.LZMAError, zlib.error) as e:
        raise UserError(f"cannot read {path} ({getattr(e, 'strerror', None) or first_line(e)}; a damaged or "
                        "truncated compressed file?)")
    except Exception as e:
        if type(e).__name__ == "ZstdError":
            raise UserError(f"cannot read {path} ({first_line(e)}; a damaged zstd file?)")
        raise


register_source(SourceKind("local", claims, resolve, identity, rows, probe))


# ----------------------------------------------------------------------------------------------
# Formats: .txt, .json/.jsonl, .parquet


def _txt_rows(stream: BinaryIO, path: str, column: str, batch_size: int) -> Iterator[list[str]]:
    """A .txt file is one row (prep_dataset output separates books with <|endoftext|> inside); one
    larger than TEXT_PIECE characters is several `Piece` rows (each under 2 x TEXT_PIECE), cut where
    tokens split anyway."""
    decoder, text, searched, opens = codecs.getincrementaldecoder("utf-8")(), "", 1, True
    while raw := stream.read(TEXT_PIECE):
        text += decoder.decode(raw)
        if len(text) <= TEXT_PIECE:
            continue
        cut = last_safe_cut(text, searched)
        if cut is None:  # none yet: look only at what comes next
            if len(text) > MAX_UNCUT:
                raise UserError(f"{path} has a stretch of over {MAX_UNCUT >> 20} Mi characters with no space or line "
                                "break to cut it at (binary data, or one giant word?); it is not text the model can "
                                "learn from: remove it, or break it into lines")
            searched = max(1, len(text) - 2)
            continue
        yield [Piece(text[:cut], opens=opens, closes=False)]
        text, searched, opens = text[cut:], 1, False
    last = text + decoder.decode(b"", final=True)
    yield [last if opens else Piece(last, opens=False)]


def last_safe_cut(text: str, lo: int = 1) -> int | None:
    """The last place in text[lo:] (never its start) where it may be cut without changing its tokens."""
    window = 4096
    while True:
        start = max(lo, len(text) - window)
        last = None
        for last in SAFE_CUT.finditer(text, start):  # noqa: B007 (the last match is what we want)
            pass
        if last is not None:
            return last.start() if last.group() == " " else last.end()
        if start == lo:
            return None
        window *= 16


def _txt_probe(stream: BinaryIO, path: str, column: str) -> None:
    stream.read(1)


def _json_rows(stream: BinaryIO, path: str, column: str, batch_size: int) -> Iterator[list[str]]:
    """JSON lines, a JSON array of objects, or one object of columns ({"text": [...], ...})."""
    f = io.TextIOWrapper(stream, encoding="utf-8")
    head = _head_lines(f, path)  # whole lines, without seeking back: compressed streams read forward only
    start = "".join(head).lstrip()
    if start.startswith(("[", "{")) and not _first_line_parses(start):
        rest = f.read(MAX_JSON_DOCUMENT + 1)
        if len(rest) > MAX_JSON_DOCUMENT:
            raise UserError(f"{path} is one JSON document of over {MAX_JSON_DOCUMENT >> 20} Mi characters, which is "
                            "read whole; write it as JSON lines (one record per line), which is read line by line")
        yield _whole_json("".join(head) + rest, path, column)
        return
    batch = []
    for lineno, line in enumerate(itertools.chain(head, _bounded_lines(f, path)), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line")
        records = record if isinstance(record, list) else [record]  # a JSON array on one line: its items
        batch += [_text_of(r, column, path, lineno) for r in records]
        if len(batch) >= batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


def _bounded_lines(f, path: str) -> Iterator[str]:
    """The lines of a text stream, each refused in one line when longer than MAX_JSON_LINE characters."""
    while line := f.readline(MAX_JSON_LINE + 1):
        if len(line) > MAX_JSON_LINE:
            raise UserError(f"{path} has a line of over {MAX_JSON_LINE >> 20} Mi characters; a record that large is not "
                            "a document to train on (split it, or remove it)")
        yield line


def _head_lines(f, path: str, size: int = 1 << 16) -> list[str]:
    lines, n, more = [], 0, _bounded_lines(f, path)
    while n < size:
        line = next(more, "")
        if not line:
            break
        lines.append(line)
        n += len(line)
    return lines


def _whole_json(text: str, path: str, column: str) -> list[str]:
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")
    records = data if isinstance(data, list) else _columns_to_records(data, column, path)
    return [_text_of(r, column, path, i + 1) for i, r in enumerate(records)]


def _first_line_parses(head: str) -> bool:
    try:
        json.loads(head.split("\n", 1)[0])
        return True
    except json.JSONDecodeError:
        return False


def _columns_to_records(data, column: str, path: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(column), list):
        cols = ", ".join(data) if isinstance(data, dict) else type(data).__name__
        raise UserError(f"{path} has no text column '{column}' (it holds: {cols}); pass --text_column with the right name")
    return [{column: v} for v in data[column]]


def _text_of(record, column: str, path: str, where: int) -> str:
    if not isinstance(record, dict) or column not in record:
        cols = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise UserError(f"{path} has no text column '{column}' (record {where} has: {cols}); "
                        "pass --text_column with the right name")
    value = record[column]
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _json_probe(stream: BinaryIO, path: str, column: str) -> None:
    f = io.TextIOWrapper(stream, encoding="utf-8")
    first = next((ln for ln in _bounded_lines(f, path) if ln.strip()), "")
    if first.strip() and _first_line_parses(first):  # JSON lines (a whole document is checked when read)
        record = json.loads(first)
        for r in (record if isinstance(record, list) else [record])[:1]:
            _text_of(r, column, path, 1)


def _parquet_file(stream: BinaryIO, path: str, column: str):
    """A parquet file reads its footer first, then row groups anywhere: a compressed one is decompressed
    (in bounded pieces) into a temp file first, which is seekable and fast to seek (gzip's own seek
    re-reads from the start; zstd's cannot go back at all)."""
    import pyarrow.parquet as pq

    if format_of(path)[1]:
        import shutil
        import tempfile

        plain = tempfile.TemporaryFile(prefix="gptkit-parquet-")  # gone when closed, even after a kill
        shutil.copyfileobj(stream, plain, 8 << 20)
        plain.seek(0)
        stream = plain
    try:
        pf = pq.ParquetFile(stream)
    except Exception as e:
        raise UserError(f"{path} is not a readable parquet file ({first_line(e)})")
    if column not in pf.schema_arrow.names:
        raise UserError(f"{path} has no text column '{column}' (columns: {', '.join(pf.schema_arrow.names)}); "
                        "pass --text_column with the right name")
    return pf


def _parquet_rows(stream: BinaryIO, path: str, column: str, batch_size: int) -> Iterator[list[str]]:
    pf = _parquet_file(stream, path, column)
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=[column]):  # only the text column is read
            yield [t or "" for t in batch.column(0).to_pylist()]
    except Exception as e:
        raise UserError(f"{path} could not be read ({type(e).__name__}: {first_line(e)})")


def _parquet_probe(stream: BinaryIO, path: str, column: str) -> None:
    next(_parquet_rows(stream, path, column, 1), None)


# The built-in formats; their .gz, .bz2, .xz and .zst forms are read too.
register_format(FileFormat("text", (".txt",), _txt_rows, _txt_probe))
register_format(FileFormat("json", (".json", ".jsonl"), _json_rows, _json_probe))
register_format(FileFormat("parquet", (".parquet",), _parquet_rows, _parquet_probe))
