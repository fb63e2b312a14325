"""Data at scale: text sources (smollm-corpus streamed from the Hugging Face hub, or local
.txt/.jsonl/.json/.parquet files) tokenized once into a cache of uint16 shards with a JSON manifest,
then memory-mapped for training.

    cache/manifest.json     source identity, tokenizer + hash, shards with token counts and sha256,
                            documents, the train/validation split, and how far the build got
    cache/train_000000.bin  uint16 token ids, documents separated by <|endoftext|>
    cache/val_000000.bin    the held-out validation blocks (never overlapping train)

The cache owns its folder: it builds only in an empty folder or one holding its own manifest, and it
deletes only files its manifest lists. The build records its progress after every shard (the
unwritten tokens go to a carry file, then the manifest points at it), so a build killed any number of
times, at any point, resumes and finishes byte-identical to an uninterrupted one.

    python token_cache.py build --data 'corpus/*.parquet' --cache_dir data/cache --max_tokens 1e9
    python token_cache.py inspect data/cache
    python token_cache.py verify data/cache
"""

from __future__ import annotations

import signal
import sys

if __name__ == "__main__":  # Ctrl-C while torch loads: a quiet exit 130, not a traceback
    signal.signal(signal.SIGINT, lambda *_: sys.exit(130))

import argparse
import glob
import hashlib
import json
import os
import queue
import re
import threading
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import gpt_train as gt
from checkpointing import FolderLock, remove_stale_temps

SMOLLM_REPO = "HuggingFaceTB/smollm-corpus"
SMOLLM_SUBSETS = ("cosmopedia-v2", "fineweb-edu-dedup")
SMOLLM_REFUSED = {
    "python-edu": "its rows on the hub hold only Software Heritage blob ids, not code text (the files must be "
                  "fetched from Software Heritage's S3 separately); download them yourself and pass them as local "
                  "files with --data PATH",
}
MANIFEST, LOCK = "manifest.json", "cache.lock"
CACHE_VERSION = 2
# The validation split is made of whole blocks of this many tokens, taken evenly through the stream.
VAL_BLOCK_TOKENS = 4096
LOCAL_KINDS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
# Local files up to this size are hashed whole for the cache's source identity; larger ones by their
# size, first and last 4 MiB and 16 evenly spaced 64 KiB samples (an edit elsewhere that keeps the
# size goes unnoticed there). A file whose size and mtime match the manifest is not hashed again.
FULL_HASH_BYTES = 64 << 20
FEED_TOKENS = 1 << 16  # documents are fed to the shard builder in chunks of about this many tokens


# ----------------------------------------------------------------------------------------------
# Sources


@dataclass
class DataSource:
    """Where documents come from: one or more parts (hub subsets, or local file groups), mixed by
    tokens with `weights`. `identity` is what a cache records and checks."""
    kind: str  # "hub" or "local"
    parts: list  # hub subset names, or lists of local file paths (one list per part)
    weights: list[float] | None = None
    text_column: str = "text"
    names: list[str] = field(default_factory=list)  # how each part is called in messages

    def identity(self, known: dict | None = None) -> dict:
        if self.kind == "hub":
            return {"kind": "hub", "repo": SMOLLM_REPO, "subsets": self.parts, "weights": self.weights,
                    "text_column": self.text_column}
        # Files are named relative to the folder they share, so a copied or moved corpus (with its cache)
        # is the same source; what identifies a file is its content.
        paths = [Path(p).resolve() for part in self.parts for p in part]
        root = Path(os.path.commonpath([p.parent for p in paths]))
        known = {f["path"]: f for f in (known or {}).get("files", [])}
        files = []
        for p in paths:
            rel = p.relative_to(root).as_posix()
            files.append({**file_fingerprint(p, known.get(rel)), "path": rel})
        return {"kind": "local", "root": str(root), "files": files, "parts": [len(part) for part in self.parts],
                "weights": self.weights, "text_column": self.text_column}

    def describe(self) -> str:
        weights = self.weights or [1.0]
        if self.kind == "hub":
            return f"{SMOLLM_REPO}:" + "+".join(f"{s}@{w:g}" for s, w in zip(self.parts, weights))
        return " + ".join(f"{n} ({len(p)} file(s))" + (f"@{w:g}" if self.weights else "")
                          for n, p, w in zip(self.names, self.parts, weights))


def file_fingerprint(path, known: dict | None = None) -> dict:
    """A local file's content identity; reuses `known` (the manifest's record) when size and mtime match."""
    path = Path(path).resolve()
    st = path.stat()
    if known and known.get("bytes") == st.st_size and known.get("mtime_ns") == st.st_mtime_ns:
        return dict(known)
    whole = st.st_size <= FULL_HASH_BYTES
    return {"path": str(path), "bytes": st.st_size, "mtime_ns": st.st_mtime_ns,
            "sha256": gt.sha256_file(path) if whole else _sampled_sha256(path, st.st_size),
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


def resolve_source(data: str, text_column: str = "text", data_mix: str | None = None, seed: int = 0,
                   smollm_dir: str | None = None) -> DataSource:
    """`smollm:SUBSET[,SUBSET...]` from the hub (or from a local snapshot of it in `smollm_dir`, one
    folder per subset), or one or more local files, folders or globs separated by commas; --data_mix
    weights the parts (by tokens). `seed` is accepted for compatibility: mixing is deterministic."""
    if data.startswith("smollm:") or data == "smollm":
        return _smollm_source(data, text_column, data_mix, smollm_dir)
    specs = [s for s in data.split(",") if s] if "," in data and not Path(data).exists() else [data]
    parts = [find_local_files(s) for s in specs]
    return DataSource("local", parts, parse_mix(data_mix, len(parts)), text_column, specs)


def _smollm_source(data: str, text_column: str, data_mix: str | None, smollm_dir: str | None) -> DataSource:
    names = [s for s in data.partition(":")[2].split(",") if s] or ["cosmopedia-v2"]
    for name in names:
        if name in SMOLLM_REFUSED:
            raise gt.UserError(f"smollm-corpus subset '{name}' cannot be streamed as text: {SMOLLM_REFUSED[name]}")
        if name not in SMOLLM_SUBSETS:
            raise gt.UserError(f"smollm-corpus has no subset '{name}'; use one of {', '.join(SMOLLM_SUBSETS)} "
                               "(e.g. --data smollm:cosmopedia-v2,fineweb-edu-dedup --data_mix 0.7,0.3)")
    weights = parse_mix(data_mix, len(names))
    if not smollm_dir:
        return DataSource("hub", names, weights, text_column, names)
    folders = [Path(smollm_dir) / name for name in names]
    missing = [str(f) for f in folders if not f.is_dir()]
    if missing:
        raise gt.UserError(f"--smollm_dir {smollm_dir} has no subset folder {missing[0]}; point it at a local "
                           f"snapshot of {SMOLLM_REPO} (one folder per subset)")
    return DataSource("local", [find_local_files(str(f)) for f in folders], weights, text_column, names)


def parse_mix(data_mix: str | None, n: int) -> list[float] | None:
    if n == 1 and not data_mix:
        return None
    try:
        weights = [float(w) for w in (data_mix or ",".join(["1"] * n)).split(",")]
    except ValueError:
        weights = []
    if len(weights) != n or not all(gt.finite(w) and w > 0 for w in weights):
        raise gt.UserError(f"--data_mix needs one positive weight per subset or local part of --data ({n}), "
                           f"got {data_mix!r}")
    return [w / sum(weights) for w in weights]


def find_local_files(data: str) -> list[str]:
    p = Path(data)
    if p.is_dir():  # hidden files and folders (.git, a .token_cache) are not data
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_KINDS
                       and not any(part.startswith(".") for part in f.relative_to(p).parts))
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(f for f in glob.glob(data, recursive=True) if Path(f).is_file())
        if not files and not any(c in data for c in "*?["):
            raise gt.UserError(f"--data {data} is neither smollm:SUBSET nor an existing file, folder or glob")
    if not files:
        raise gt.UserError(f"no .txt/.json/.jsonl/.parquet files found for --data {data}")
    unknown = sorted({Path(f).suffix for f in files} - set(LOCAL_KINDS))
    if unknown:
        raise gt.UserError(f"--data {data} names files of an unknown kind ({', '.join(unknown)}); "
                           "use .txt, .json/.jsonl or .parquet")
    return files


# ----------------------------------------------------------------------------------------------
# Reading: each part yields batches of document texts, from a given row on


def open_hub_subset(subset: str):
    """The one place that touches the hub: a streaming smollm-corpus subset. Tests substitute it."""
    from datasets import load_dataset

    return load_dataset(SMOLLM_REPO, subset, split="train", streaming=True)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _hub_rows(subset: str, column: str, skip: int, batch_size: int) -> Iterator[list[str]]:
    name = f"{SMOLLM_REPO}/{subset}"
    try:
        ds = open_hub_subset(subset)
        first = next(iter(ds), None)
    except Exception as e:
        raise gt.UserError(f"could not stream {name} from the Hugging Face hub ({type(e).__name__}: {_first_line(e)}); "
                           "point --data at local .txt/.jsonl/.parquet files, or at a --cache_dir built earlier")
    if first is None:
        raise gt.UserError(f"{name} is empty: no documents to tokenize")
    if column not in first:
        raise gt.UserError(f"{name} has no text column '{column}' (columns: {', '.join(first)}); "
                           "pass --text_column with the right name")
    ds = ds.select_columns([column])
    if skip:
        ds = ds.skip(skip)
    try:
        for batch in ds.iter(batch_size=batch_size):
            yield [t or "" for t in batch[column]]
    except Exception as e:
        raise gt.UserError(f"reading {name} failed ({type(e).__name__}: {_first_line(e)}); run the same command "
                           "again to continue the build")


def _local_rows(files: list[str], column: str, skip: int, batch_size: int) -> Iterator[list[str]]:
    """Rows of local files in order, from row `skip` on; every error names its file (and line)."""
    for path in files:
        reader = {"text": _txt_rows, "json": _json_rows, "parquet": _parquet_rows}[LOCAL_KINDS[Path(path).suffix]]
        try:
            for rows in reader(path, column, batch_size):
                if skip >= len(rows):
                    skip -= len(rows)
                    continue
                yield rows[skip:]
                skip = 0
        except UnicodeDecodeError as e:
            raise gt.UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8")
        except OSError as e:
            raise gt.UserError(f"cannot read {path} ({e.strerror or _first_line(e)})")


def _txt_rows(path: str, column: str, batch_size: int) -> Iterator[list[str]]:
    # A whole .txt file is one row (prep_dataset output separates books with <|endoftext|> inside).
    yield [Path(path).read_text(encoding="utf-8")]


def _json_rows(path: str, column: str, batch_size: int) -> Iterator[list[str]]:
    """JSON lines, a JSON array of objects, or one object of columns ({"text": [...], ...})."""
    with open(path, encoding="utf-8") as f:
        head = f.read(1 << 16).lstrip()
        f.seek(0)
        if head.startswith(("[", "{")) and not _first_line_parses(head):
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise gt.UserError(f"{path} is not valid JSON ({e.msg} at line {e.lineno})")
            records = data if isinstance(data, list) else _columns_to_records(data, column, path)
            yield [_text_of(r, column, path, i + 1) for i, r in enumerate(records)]
            return
        rows = []
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise gt.UserError(f"{path} line {lineno} is not valid JSON ({e.msg}); fix or remove that line")
            rows.append(_text_of(record, column, path, lineno))
            if len(rows) == batch_size:
                yield rows
                rows = []
        if rows:
            yield rows


def _first_line_parses(head: str) -> bool:
    try:
        json.loads(head.split("\n", 1)[0])
        return True
    except json.JSONDecodeError:
        return False


def _columns_to_records(data, column: str, path: str) -> list:
    if not isinstance(data, dict) or not isinstance(data.get(column), list):
        cols = ", ".join(data) if isinstance(data, dict) else type(data).__name__
        raise gt.UserError(f"{path} has no text column '{column}' (it holds: {cols}); pass --text_column with the right name")
    return [{column: v} for v in data[column]]


def _text_of(record, column: str, path: str, where: int) -> str:
    if not isinstance(record, dict) or column not in record:
        cols = ", ".join(record) if isinstance(record, dict) else type(record).__name__
        raise gt.UserError(f"{path} has no text column '{column}' (record {where} has: {cols}); "
                           "pass --text_column with the right name")
    value = record[column]
    return value if isinstance(value, str) else ("" if value is None else str(value))


def _parquet_rows(path: str, column: str, batch_size: int) -> Iterator[list[str]]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise gt.UserError(f"{path} is not a readable parquet file ({_first_line(e)})")
    if column not in pf.schema_arrow.names:
        raise gt.UserError(f"{path} has no text column '{column}' (columns: {', '.join(pf.schema_arrow.names)}); "
                           "pass --text_column with the right name")
    try:
        for batch in pf.iter_batches(batch_size=batch_size, columns=[column]):  # only the text column is read
            yield [t or "" for t in batch.column(0).to_pylist()]
    except Exception as e:
        raise gt.UserError(f"{path} could not be read ({type(e).__name__}: {_first_line(e)})")


def probe_source(source: DataSource) -> None:
    """Open every part and check its text column before a cache folder is made: a wrong --data or
    --text_column fails at once, naming the file, and leaves nothing behind."""
    for part in source.parts:
        if source.kind == "hub":
            rows = _hub_rows(part, source.text_column, 0, 1)
            next(rows, None)
            rows.close()
            continue
        for path in part:
            _probe_local(path, source.text_column)


def _probe_local(path: str, column: str) -> None:
    kind = LOCAL_KINDS[Path(path).suffix]
    try:
        if kind == "parquet":
            next(_parquet_rows(path, column, 1), None)
        elif kind == "json":
            with open(path, encoding="utf-8") as f:
                first = next((ln for ln in f if ln.strip()), "")
            if first.strip() and _first_line_parses(first):  # JSON lines (a whole document is checked when read)
                _text_of(json.loads(first), column, path, 1)
        else:
            with open(path, "rb") as f:
                f.read(1)
    except UnicodeDecodeError as e:
        raise gt.UserError(f"{path} is not UTF-8 text (byte {e.start}); convert it to UTF-8")
    except OSError as e:
        raise gt.UserError(f"cannot read {path} ({e.strerror or _first_line(e)})")


def part_rows(source: DataSource, i: int, skip: int = 0, batch_size: int = 512) -> Iterator[list[str]]:
    if source.kind == "hub":
        return _hub_rows(source.parts[i], source.text_column, skip, batch_size)
    return _local_rows(source.parts[i], source.text_column, skip, batch_size)


def encode_rows(rows: list[str], tokenizer, num_threads: int | None = None) -> list[np.ndarray]:
    """Each row's token ids, every document in it followed by <|endoftext|> (as encode_documents)."""
    pieces = [[d for d in r.split(gt.EOT_TOKEN) if d] for r in rows]
    flat = tokenizer.encode_ordinary_batch([d for p in pieces for d in p], num_threads=num_threads or os.cpu_count() or 1)
    eot, out, k = tokenizer.eot_token, [], 0
    for p in pieces:
        docs = flat[k : k + len(p)]
        k += len(p)
        ids = np.empty(sum(len(d) + 1 for d in docs), dtype=np.uint16)
        j = 0
        for d in docs:
            ids[j : j + len(d)] = d
            ids[j + len(d)] = eot
            j += len(d) + 1
        out.append(ids)
    return out


class Mixer:
    """Tokenized rows from all parts, mixed by tokens: the next row always comes from the part
    furthest below its share (ties to the first), so each part's token share stays within one
    document of its weight. A part that runs out drops out and the others share its weight. The
    order depends only on the data, so hub and local copies of the same rows mix identically."""

    def __init__(self, source: DataSource, rows_done: list[int], tokens_done: list[int], batch_docs: int = 512,
                 num_threads: int | None = None):
        self.weights = source.weights or [1.0]
        self.tokens = list(tokens_done)
        self.readers = [_prefetch(part_rows(source, i, rows_done[i], batch_docs)) for i in range(len(source.parts))]
        self.ready: list[deque] = [deque() for _ in self.readers]
        self.live = [True] * len(self.readers)
        self.tokenizer, self.num_threads = gt.get_tokenizer(), num_threads

    def next(self) -> tuple[int, np.ndarray] | None:
        """(part, token ids of its next row), or None when every part is exhausted."""
        while any(self.live):
            total = sum(self.tokens)
            i = max((j for j in range(len(self.live)) if self.live[j]),
                    key=lambda j: (self.weights[j] * total - self.tokens[j], -j))
            if not self.ready[i]:
                batch = next(self.readers[i], None)
                if batch is None:
                    self.live[i] = False
                    continue
                self.ready[i].extend(encode_rows(batch, self.tokenizer, self.num_threads))
            ids = self.ready[i].popleft()
            self.tokens[i] += len(ids)
            return i, ids
        return None

    def close(self) -> None:
        for r in self.readers:
            r.close()


def iter_documents(source: DataSource, batch_size: int = 512) -> Iterator[list[str]]:
    """The source's documents in mixed order, in lists of `batch_size` (for looking at a source)."""
    mixer = Mixer(source, [0] * len(source.parts), [0] * len(source.parts), batch_size)
    tok = mixer.tokenizer
    try:
        batch = []
        while (item := mixer.next()) is not None:
            batch.append(tok.decode(item[1][:-1].tolist()))
            if len(batch) == batch_size:
                yield batch
                batch = []
        if batch:
            yield batch
    finally:
        mixer.close()


def _prefetch(iterator: Iterator, depth: int = 2) -> Iterator:
    """Produce items in a background thread, so reading and parsing the next batch of documents
    overlaps with tokenizing this one (tiktoken releases the GIL). Errors surface in the consumer;
    closing the consumer (e.g. once --max_tokens is reached) stops the producer and its stream."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    end, stop = object(), threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def produce():
        try:
            for item in iterator:
                if not put(item):
                    return
        except BaseException as e:  # handed to the consumer, raised there
            put(e)
        put(end)

    threading.Thread(target=produce, name="token-cache-reader", daemon=True).start()
    try:
        while (item := q.get()) is not end:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


# ----------------------------------------------------------------------------------------------
# Building the cache


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    gt.atomic_write(path, lambda f: f.write(tokens.astype(np.uint16).tobytes()))


def _names(manifest: dict) -> dict:
    """The file names the build may write before its next record: reserved in the manifest first,
    so a file left by a kill is known to be the cache's own."""
    s = manifest["shards"]
    return {"train": f"train_{len(s['train']):06d}.bin", "val": f"val_{len(s['val']):06d}.bin",
            "carry": f"carry_{manifest['records'] + 1:06d}.npz"}


@dataclass
class _Builder:
    """Routes the token stream into train/val blocks and shards, and records its progress."""
    cache_dir: Path
    manifest: dict
    val_every: int  # one validation block every `val_every` blocks (the first block included)
    pending: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint16))  # not yet routed
    bufs: dict = field(default_factory=lambda: {"train": [], "val": []})
    buffered: dict = field(default_factory=lambda: {"train": 0, "val": 0})  # tokens in bufs, per split

    def feed(self, tokens: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, tokens]) if len(self.pending) else tokens
        # `pending` holds exactly the unrouted tokens whenever a shard write records progress.
        while len(self.pending) >= VAL_BLOCK_TOKENS:
            block, self.pending = self.pending[:VAL_BLOCK_TOKENS], self.pending[VAL_BLOCK_TOKENS:]
            self._route(block)

    def _route(self, block: np.ndarray) -> None:
        j = self.manifest["blocks_routed"]
        self.manifest["blocks_routed"] = j + 1
        split = "val" if j % self.val_every == 0 else "train"
        self.bufs[split].append(block)
        self.buffered[split] += len(block)
        if self.buffered[split] >= self.manifest["shard_tokens"]:
            self._flush(split, final=False)

    def _flush(self, split: str, final: bool) -> None:
        size = self.manifest["shard_tokens"]
        data = np.concatenate(self.bufs[split]) if self.bufs[split] else np.empty(0, np.uint16)
        while len(data) >= size or (final and len(data)):
            chunk, data = data[:size], data[size:]
            name = _names(self.manifest)[split]
            _write_shard(self.cache_dir / name, chunk)
            self.manifest["shards"][split].append({"name": name, "tokens": int(len(chunk)),
                                                   "sha256": hashlib.sha256(chunk.astype(np.uint16).tobytes()).hexdigest()})
            self.bufs[split], self.buffered[split] = ([data] if len(data) else []), len(data)
            self.record()

    def finish(self) -> None:
        self.feed(np.empty(0, np.uint16))  # whole blocks first: a restored carry can hold many
        # The last, short block: taken out of `pending` before routing it, so a record made while
        # routing it does not carry it twice.
        tail, self.pending = self.pending, np.empty(0, np.uint16)
        if len(tail):
            self._route(tail)
        self._flush("train", final=True)
        self._flush("val", final=True)
        self.manifest["complete"] = True
        self.record()

    def record(self) -> None:
        """Carry file (unwritten tokens) first, then the manifest that points at it and reserves the
        next names; the old carry goes last. A kill between any two leaves a consistent pair."""
        m = self.manifest
        m["shards_written"] = len(m["shards"]["train"]) + len(m["shards"]["val"])
        m["train_tokens"] = sum(s["tokens"] for s in m["shards"]["train"])
        m["val_tokens"] = sum(s["tokens"] for s in m["shards"]["val"])
        old, carry = m.get("carry"), None
        if not m["complete"]:
            carry = _names(m)["carry"]
            arrays = {k: (np.concatenate(v) if v else np.empty(0, np.uint16)) for k, v in self.bufs.items()}
            gt.atomic_write(self.cache_dir / carry, lambda f: np.savez(f, pending=self.pending, **arrays))
        m["records"] += 1
        m["carry"] = carry
        # The next names, and the old carry (deleted just below): a kill leaves nothing the manifest does not name.
        m["reserved"] = sorted({*([] if m["complete"] else _names(m).values()), *([old] if old and old != carry else [])})
        gt.write_json(self.cache_dir / MANIFEST, m)
        if old and old != carry:
            (self.cache_dir / old).unlink(missing_ok=True)
            if m["complete"]:  # the finished cache reserves nothing (a kill before this: _tidy_complete)
                m["reserved"] = []
                gt.write_json(self.cache_dir / MANIFEST, m)

    def restore_carry(self) -> None:
        path = self.cache_dir / self.manifest["carry"]
        try:
            with np.load(path) as z:
                self.pending = z["pending"]
                self.bufs = {k: ([z[k]] if len(z[k]) else []) for k in ("train", "val")}
                self.buffered = {k: len(z[k]) for k in ("train", "val")}
        except (OSError, ValueError, KeyError) as e:
            raise gt.UserError(f"the interrupted build in {self.cache_dir} cannot continue: its carry file {path.name} is "
                               f"missing or damaged ({_first_line(e)}); delete {self.cache_dir} to rebuild the cache")


def _new_manifest(source: DataSource, identity: dict, max_tokens, val_fraction, shard_tokens) -> dict:
    return {
        "version": CACHE_VERSION,
        "source": identity,
        "source_description": source.describe(),
        "max_tokens": max_tokens,
        "val_fraction": val_fraction,
        "tokenizer": "gpt2",
        "tokenizer_hash": gt.tokenizer_fingerprint(),
        "dtype": "uint16",
        "shard_tokens": shard_tokens,
        "val_block_tokens": VAL_BLOCK_TOKENS,
        "rows_read": 0,  # rows consumed from the source (all parts)
        "rows_by_part": [0] * len(source.parts),  # where each part continues after an interruption
        "tokens_by_part": [0] * len(source.parts),
        "documents": 0,  # documents tokenized (<|endoftext|>-separated)
        "tokens_consumed": 0,
        "blocks_routed": 0,
        "records": 0,
        "shards_written": 0,
        "shards": {"train": [], "val": []},
        "train_tokens": 0,
        "val_tokens": 0,
        "carry": None,
        "reserved": [],
        "complete": False,
    }


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        m = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, OSError):
        m = None
    if not isinstance(m, dict) or "version" not in m:
        raise gt.UserError(f"{path} is damaged or not a token cache manifest; delete {cache_dir} to rebuild the cache")
    if m.get("version") == CACHE_VERSION:
        problem = manifest_problem(m)
        if problem:
            raise gt.UserError(f"{path} is damaged or was edited ({problem}); nothing was read or deleted: delete "
                               f"{cache_dir} to rebuild the cache")
    return m


# The only file names a manifest may hold: the cache's own shards and carry files, in its own folder.
SHARD_NAME_RE = {"train": re.compile(r"^train_\d{6}\.bin$"), "val": re.compile(r"^val_\d{6}\.bin$")}
CARRY_NAME_RE = re.compile(r"^carry_\d{6}\.npz$")
OWN_NAME_RE = re.compile(r"^(?:train_\d{6}\.bin|val_\d{6}\.bin|carry_\d{6}\.npz)$")


def _count(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def manifest_problem(m: dict) -> str | None:
    """What makes a manifest unusable, in words, or None. Every name it holds must be one of the
    cache's own file names (a name like ../x or /x would have the build delete a stranger's file),
    and its counts must add up (a complete cache has train shards holding every token it counts)."""
    shards = m.get("shards")
    if not (isinstance(shards, dict) and all(isinstance(shards.get(k), list) for k in ("train", "val"))):
        return "'shards' must hold a 'train' and a 'val' list"
    for split, entries in ((k, shards[k]) for k in ("train", "val")):
        for e in entries:
            if not (isinstance(e, dict) and isinstance(e.get("name"), str) and SHARD_NAME_RE[split].match(e["name"])
                    and _count(e.get("tokens"))):
                return f"a {split} shard entry {str(e)[:80]!r} is not a {split}_NNNNNN.bin name with a token count"
    names = m.get("reserved", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and OWN_NAME_RE.match(n) for n in names):
        return f"'reserved' holds {str(names)[:80]!r}, not only the cache's own file names"
    carry = m.get("carry")
    if carry is not None and not (isinstance(carry, str) and CARRY_NAME_RE.match(carry)):
        return f"'carry' is {str(carry)[:80]!r}, not a carry_NNNNNN.npz name"
    for key in ("train_tokens", "val_tokens", "tokens_consumed", "documents"):
        if not _count(m.get(key)):
            return f"'{key}' is {m.get(key)!r}, not a count"
    for split in ("train", "val"):
        if sum(e["tokens"] for e in shards[split]) != m[f"{split}_tokens"]:
            return f"its {split} shards hold {sum(e['tokens'] for e in shards[split])} tokens, it counts {m[f'{split}_tokens']}"
    if m.get("complete") is True:
        held = m["train_tokens"] + m["val_tokens"]
        if held != m["tokens_consumed"]:
            return f"it is marked complete but its shards hold {held} of the {m['tokens_consumed']} tokens it read"
        if not shards["train"] and held > VAL_BLOCK_TOKENS:  # a corpus of one block has no train split at all
            return f"it is marked complete but lists no train shard for {held} tokens"
    return None


def identity_changes(old: dict, new: dict) -> list[str]:
    """What differs between two source identities, in words."""
    if old.get("kind") != new.get("kind"):
        return [f"the source was {old.get('kind')} data, now {new.get('kind')}"]
    changes = [f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in ("repo", "subsets", "weights", "text_column",
                                                                      "parts") if old.get(k) != new.get(k)]
    before = {f["path"]: f for f in old.get("files", [])}
    after = {f["path"]: f for f in new.get("files", [])}
    changes += [f"{p} is new" for p in after if p not in before]
    changes += [f"{p} is gone" for p in before if p not in after]
    for p in after.keys() & before.keys():
        a, b = before[p], after[p]
        if a.get("bytes") != b.get("bytes"):
            changes.append(f"{p} changed size ({a.get('bytes')} -> {b.get('bytes')} bytes)")
        elif a.get("sha256") != b.get("sha256"):
            changes.append(f"{p} changed content (same size, sha256 differs)")
    return changes


def check_manifest(m: dict, cache_dir: Path, source: DataSource | None = None, max_tokens=None,
                   val_fraction=None) -> None:
    """Refuse a cache made with another tokenizer, from another source or with other split settings."""
    if m.get("version") != CACHE_VERSION:
        raise gt.UserError(f"the cache in {cache_dir} has format version {m.get('version')}, this toolkit "
                           f"reads {CACHE_VERSION}; rebuild it in a new --cache_dir")
    if m.get("tokenizer") != "gpt2" or m.get("tokenizer_hash") != gt.tokenizer_fingerprint():
        raise gt.UserError(f"the cache in {cache_dir} was tokenized with another tokenizer "
                           f"({m.get('tokenizer')}, hash {m.get('tokenizer_hash')}); use a new --cache_dir")
    if source is not None:
        changes = identity_changes(m.get("source", {}), source.identity(m.get("source")))
        if changes:
            more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
            raise gt.UserError(f"the cache in {cache_dir} was built from {m.get('source_description')}, not from "
                               f"{source.describe()} as it is now ({'; '.join(changes[:3])}{more}); use another "
                               "--cache_dir for this data")
    for key, want in (("max_tokens", max_tokens), ("val_fraction", val_fraction)):
        if want is not None and m.get(key) != want:
            raise gt.UserError(f"the cache in {cache_dir} was built with {key}={m.get(key)}, this run asks for "
                               f"{want}; use the same setting or another --cache_dir")


def _claim_folder(cache_dir: Path) -> dict | None:
    """The folder's manifest, or None for an empty (new) folder; a folder holding anything else is
    not the cache's and is refused before a byte is written."""
    if cache_dir.exists() and not cache_dir.is_dir():
        raise gt.UserError(f"--cache_dir {cache_dir} is a file; pick a folder")
    try:
        cache_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise gt.UserError(f"cannot create --cache_dir {cache_dir} ({e.strerror})")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        others = [p.name for p in cache_dir.iterdir() if p.name != LOCK and not (p.name.startswith(f".{MANIFEST}.")
                                                                                  and p.name.endswith(".tmp"))]
        if others:
            raise gt.UserError(f"--cache_dir {cache_dir} is not empty and holds no token cache ({MANIFEST} is missing; "
                               f"found {', '.join(sorted(others)[:3])}); use an empty or new folder")
    return manifest


def _clean_leftovers(cache_dir: Path, manifest: dict) -> None:
    """Remove what a killed build wrote after its last record: only names the manifest reserved, and
    temp files of names it lists or reserved."""
    listed = {s["name"] for split in ("train", "val") for s in manifest["shards"][split]}
    own = listed | set(manifest.get("reserved", [])) | {MANIFEST} | ({manifest["carry"]} if manifest["carry"] else set())
    for name in manifest.get("reserved", []):
        (cache_dir / name).unlink(missing_ok=True)
    remove_stale_temps(cache_dir, lambda n: n in own)


def _tidy_complete(cache_dir: Path) -> None:
    """A build killed right after its last record leaves the previous carry file, which the complete
    manifest still reserves: remove it and the reservation (under the build lock; if another process
    holds it, the next start does this)."""
    lock = FolderLock(cache_dir / LOCK, what="cache build")
    try:
        lock.acquire()
    except gt.UserError:
        return
    try:
        m = read_manifest(cache_dir)
        if m is not None and m.get("complete") and m.get("reserved"):
            for name in m["reserved"]:
                (cache_dir / name).unlink(missing_ok=True)
            m["reserved"] = []
            gt.write_json(cache_dir / MANIFEST, m)
    finally:
        lock.release()


def build_cache(source: DataSource, cache_dir, *, max_tokens: int | None = None, val_fraction: float = 0.01,
                shard_tokens: int = 100_000_000, batch_docs: int = 512, num_threads: int | None = None,
                progress: bool = True, log=print) -> dict:
    """Tokenize `source` into `cache_dir`, resuming a build that was interrupted. Returns the manifest."""
    cache_dir = Path(cache_dir)
    if not 0 < val_fraction < 1:
        raise gt.UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    existing = read_manifest(cache_dir)
    if existing is None or not existing.get("complete"):
        probe_source(source)  # before the folder is made: a bad source leaves nothing behind
    manifest = _claim_folder(cache_dir)
    if manifest is not None and manifest.get("complete"):
        check_manifest(manifest, cache_dir, source, max_tokens, val_fraction)
        if manifest.get("reserved"):
            _tidy_complete(cache_dir)
        FolderLock(cache_dir / LOCK).clear_if_stale()  # a build killed right after finishing leaves its lock file
        return manifest
    with FolderLock(cache_dir / LOCK, what="cache build"):
        manifest = read_manifest(cache_dir)  # again, under the lock
        if manifest is None:
            manifest = _new_manifest(source, source.identity(), max_tokens, val_fraction, shard_tokens)
            manifest["reserved"] = sorted(_names(manifest).values())
            gt.write_json(cache_dir / MANIFEST, manifest)
        else:
            manifest = _resume_or_restart(manifest, cache_dir, source, max_tokens, val_fraction, shard_tokens, log)
            if manifest["complete"]:
                return manifest
        _clean_leftovers(cache_dir, manifest)
        builder = _Builder(cache_dir, manifest, max(1, round(1 / val_fraction)))
        if manifest["carry"]:
            builder.restore_carry()
        _tokenize(source, builder, max_tokens, batch_docs, num_threads, progress)
        builder.finish()
    if manifest["train_tokens"] == 0:
        raise gt.UserError(f"{source.describe()} gave {manifest['tokens_consumed']} tokens, too few for a training "
                           f"split (validation takes the first {VAL_BLOCK_TOKENS} tokens); use more text")
    log(f"cache {cache_dir}: {manifest['documents']:,} documents, {manifest['train_tokens']:,} train + "
        f"{manifest['val_tokens']:,} val tokens in {manifest['shards_written']} shard(s)")
    return manifest


def _resume_or_restart(manifest: dict, cache_dir: Path, source: DataSource, max_tokens, val_fraction, shard_tokens,
                       log) -> dict:
    """An interrupted build continues when its source and settings are unchanged. If they changed, the
    unfinished cache is worth nothing: its own files (those the manifest lists) are removed and the
    build starts over. A complete cache is never removed (check_manifest refuses it instead)."""
    try:
        check_manifest(manifest, cache_dir, source, max_tokens, val_fraction)
    except gt.UserError as e:
        if manifest.get("complete") or manifest.get("version") != CACHE_VERSION:
            raise
        log(f"the interrupted cache build in {cache_dir} was for other data or settings ({e}); starting it over")
        listed = [s["name"] for split in ("train", "val") for s in manifest["shards"][split]]
        for name in [*listed, *manifest.get("reserved", []), *([manifest["carry"]] if manifest["carry"] else [])]:
            (cache_dir / name).unlink(missing_ok=True)
        fresh = _new_manifest(source, source.identity(), max_tokens, val_fraction, shard_tokens)
        fresh["reserved"] = sorted(_names(fresh).values())
        gt.write_json(cache_dir / MANIFEST, fresh)
        return fresh
    if not manifest["complete"]:
        log(f"resuming the cache build in {cache_dir}: {manifest['documents']:,} documents, "
            f"{manifest['tokens_consumed']:,} tokens done")
    return manifest


def _tokenize(source: DataSource, builder: _Builder, max_tokens, batch_docs, num_threads, progress) -> None:
    """Feed the mixed, tokenized rows to the builder in chunks of whole rows, counting where each
    part is before the chunk is fed (a record made while feeding it holds the rest as `pending`)."""
    m = builder.manifest
    mixer = Mixer(source, m["rows_by_part"], m["tokens_by_part"], batch_docs, num_threads)
    bar = gt.progress_bar(total=max_tokens, initial=m["tokens_consumed"], unit="tok", desc="tokenizing") if progress else None
    t0, new, done = time.perf_counter(), 0, max_tokens is not None and m["tokens_consumed"] >= max_tokens
    try:
        while not done:
            chunk, n = [], 0
            while n < FEED_TOKENS and not done:
                item = mixer.next()
                if item is None:
                    done = True
                    break
                part, ids = item
                if max_tokens is not None and m["tokens_consumed"] + n + len(ids) >= max_tokens:
                    ids, done = ids[: max_tokens - m["tokens_consumed"] - n], True
                m["rows_by_part"][part] += 1
                m["tokens_by_part"][part] += len(ids)
                chunk.append(ids)
                n += len(ids)
            if not chunk:
                break
            ids = np.concatenate(chunk)
            m["rows_read"] = sum(m["rows_by_part"])
            m["documents"] += int(np.count_nonzero(ids == gt.get_tokenizer().eot_token))
            m["tokens_consumed"] += len(ids)
            builder.feed(ids)
            new += len(ids)
            if bar is not None:
                bar.update(len(ids))
                bar.set_postfix(tok_s=f"{new / max(time.perf_counter() - t0, 1e-9):,.0f}")
    finally:
        mixer.close()  # stops the reader threads when --max_tokens ended the stream early
        if bar is not None:
            bar.close()


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass
class TokenCache:
    manifest: dict
    train: list[np.ndarray]
    val: list[np.ndarray]


def verify_shard(path: Path, entry: dict, vocab_size: int = 50257) -> None:
    """A shard's size, sha256 and ids checked against its manifest entry: one error line naming it."""
    size = path.stat().st_size if path.exists() else -1
    if size != 2 * entry["tokens"]:
        raise gt.UserError(f"shard {path} is truncated or corrupt: {max(size, 0)} bytes on disk, the manifest "
                           f"says {entry['tokens']} tokens ({2 * entry['tokens']} bytes); delete {path.parent} to rebuild")
    h, top = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            top = max(top, int(np.frombuffer(block, dtype=np.uint16).max(initial=0)))
    if top >= vocab_size:
        raise gt.UserError(f"shard {path} holds token id {top}, beyond the vocabulary ({vocab_size}); the cache is "
                           f"damaged: delete {path.parent} to rebuild")
    if entry.get("sha256") and h.hexdigest() != entry["sha256"]:
        raise gt.UserError(f"shard {path} is corrupt: its sha256 does not match the manifest; delete {path.parent} "
                           "to rebuild")


def load_cache(cache_dir, source: DataSource | None = None, verify: bool = True) -> TokenCache:
    """Memory-map a complete cache. Every shard's size is checked; with `verify` also its sha256 and
    that its ids fit the vocabulary (one read of the cache)."""
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    if m is None:
        raise gt.UserError(f"no token cache in {cache_dir} (no {MANIFEST}); build one with --prepare_only")
    check_manifest(m, cache_dir, source)
    if not m["complete"]:
        raise gt.UserError(f"the token cache in {cache_dir} is incomplete (its build was interrupted); run the same "
                           "command again to resume building it")
    out = {}
    for split in ("train", "val"):
        arrays = []
        for s in m["shards"][split]:
            path = cache_dir / s["name"]
            if verify:
                verify_shard(path, s)
            elif not path.exists() or path.stat().st_size != 2 * s["tokens"]:
                verify_shard(path, s)  # names the problem
            arrays.append(np.memmap(path, dtype=np.uint16, mode="r"))
        out[split] = arrays
    return TokenCache(m, out["train"], out["val"])


# ----------------------------------------------------------------------------------------------
# CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=gt.HelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    b = sub.add_parser("build", help="tokenize a source into a cache folder (resumes an interrupted build)")
    b.add_argument("--data", required=True, help="smollm:SUBSET[,SUBSET] or local files, folders or globs (comma-separated)")
    b.add_argument("--cache_dir", type=Path, required=True, help="the cache folder (new, empty, or this cache's own)")
    b.add_argument("--text_column", default="text", help="column holding the text in json/parquet data")
    b.add_argument("--data_mix", default=None, help="token weights of the parts of --data, e.g. 0.7,0.3")
    b.add_argument("--smollm_dir", default=None, help="a local snapshot of smollm-corpus to read smollm:SUBSET from")
    b.add_argument("--max_tokens", type=float, default=None, help="cap on tokens taken from the source")
    b.add_argument("--val_fraction", type=float, default=0.01, help="share of the stream held out for validation")
    b.add_argument("--shard_tokens", type=int, default=100_000_000, help="tokens per shard")
    b.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="show progress")
    for name, what in (("inspect", "print what a cache holds"), ("verify", "check every shard's sha256 and ids")):
        s = sub.add_parser(name, help=what)
        s.add_argument("cache_dir", type=Path, help="a token cache folder")
    return p


def main(argv=None) -> dict:
    args = build_parser().parse_args(argv)
    if args.command == "build":
        for name, ok in (("max_tokens", lambda v: v is None or (gt.finite(v) and v >= 1)),
                         ("shard_tokens", lambda v: v >= VAL_BLOCK_TOKENS)):
            if not ok(getattr(args, name)):
                raise gt.UserError(f"--{name} is out of range: {getattr(args, name)}")
        source = resolve_source(args.data, args.text_column, args.data_mix, smollm_dir=args.smollm_dir)
        return build_cache(source, args.cache_dir, max_tokens=int(args.max_tokens) if args.max_tokens else None,
                           val_fraction=args.val_fraction, shard_tokens=args.shard_tokens, progress=args.progress)
    cache = load_cache(args.cache_dir, verify=args.command == "verify")
    m = cache.manifest
    summary = {k: m[k] for k in ("source_description", "documents", "train_tokens", "val_tokens", "shards_written",
                                 "val_fraction", "max_tokens")}
    summary["verified"] = args.command == "verify"
    print(json.dumps(summary, indent=2))
    return summary


if __name__ == "__main__":
    gt.run_cli(main)
