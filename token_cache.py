"""Data at scale: text sources (smollm-corpus streamed from the Hugging Face hub, or local
.txt/.jsonl/.json/.parquet files, all read through `datasets`) tokenized once into a cache of uint16
shards with a JSON manifest, then memory-mapped for training.

    cache/manifest.json     source, tokenizer + hash, shards and their token counts, documents, split
    cache/train_000000.bin  uint16 token ids, documents separated by <|endoftext|>
    cache/val_000000.bin    the held-out validation blocks (never overlapping train)

Building is resumable: after every shard the manifest records how far the stream was read and what
was left over (carry_*.npz), so an interrupted build continues where it stopped and produces the
same cache as an uninterrupted one.
"""

from __future__ import annotations

import glob
import json
import queue
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

import gpt_train as gt

SMOLLM_REPO = "HuggingFaceTB/smollm-corpus"
SMOLLM_SUBSETS = ("cosmopedia-v2", "fineweb-edu-dedup")
SMOLLM_REFUSED = {
    "python-edu": "its rows on the hub hold only Software Heritage blob ids, not code text (the files must be "
                  "fetched from Software Heritage's S3 separately); download them yourself and pass them as local "
                  "files with --data PATH",
}
MANIFEST = "manifest.json"
CACHE_VERSION = 1
# The validation split is made of whole blocks of this many tokens, taken evenly through the stream.
VAL_BLOCK_TOKENS = 4096
LOCAL_BUILDERS = {".txt": "text", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}


# ----------------------------------------------------------------------------------------------
# Sources


@dataclass
class DataSource:
    """Where documents come from. `identity` is what a cache records and checks."""
    kind: str  # "hub" or "local"
    parts: list[str]  # hub subsets, or local file paths
    weights: list[float] | None = None  # hub mixes
    text_column: str = "text"
    seed: int = 0

    @property
    def identity(self) -> dict:
        if self.kind == "hub":
            return {"kind": "hub", "repo": SMOLLM_REPO, "subsets": self.parts, "weights": self.weights,
                    "text_column": self.text_column, "seed": self.seed}
        files = [{"path": str(Path(p).resolve()), "bytes": Path(p).stat().st_size} for p in self.parts]
        return {"kind": "local", "files": files, "text_column": self.text_column}

    def describe(self) -> str:
        if self.kind == "hub":
            mix = "+".join(f"{s}@{w:g}" for s, w in zip(self.parts, self.weights or [1.0] * len(self.parts)))
            return f"{SMOLLM_REPO}:{mix}"
        return f"{len(self.parts)} local file(s) starting with {self.parts[0]}"


def resolve_source(data: str, text_column: str = "text", data_mix: str | None = None, seed: int = 0) -> DataSource:
    """`smollm:SUBSET[,SUBSET...]` (weights from --data_mix) or a local file, folder or glob."""
    if data.startswith("smollm"):
        names = [s for s in data.partition(":")[2].split(",") if s] or ["cosmopedia-v2"]
        for name in names:
            if name in SMOLLM_REFUSED:
                raise gt.UserError(f"smollm-corpus subset '{name}' cannot be streamed as text: {SMOLLM_REFUSED[name]}")
            if name not in SMOLLM_SUBSETS:
                raise gt.UserError(f"smollm-corpus has no subset '{name}'; use one of {', '.join(SMOLLM_SUBSETS)} "
                                   "(e.g. --data smollm:cosmopedia-v2,fineweb-edu-dedup --data_mix 0.7,0.3)")
        weights = None
        if len(names) > 1 or data_mix:
            weights = [float(w) for w in (data_mix or ",".join(["1"] * len(names))).split(",")]
            if len(weights) != len(names) or any(w <= 0 for w in weights):
                raise gt.UserError(f"--data_mix needs one positive weight per subset ({len(names)}), got {data_mix!r}")
            weights = [w / sum(weights) for w in weights]
        return DataSource("hub", names, weights, text_column, seed)
    return DataSource("local", find_local_files(data), None, text_column, seed)


def find_local_files(data: str) -> list[str]:
    p = Path(data)
    if p.is_dir():
        files = sorted(str(f) for f in p.rglob("*") if f.is_file() and f.suffix in LOCAL_BUILDERS)
    elif p.is_file():
        files = [str(p)]
    else:
        files = sorted(f for f in glob.glob(data, recursive=True) if Path(f).is_file())
        if not files and not any(c in data for c in "*?["):
            raise gt.UserError(f"--data {data} is neither smollm:SUBSET nor an existing file, folder or glob")
    if not files:
        raise gt.UserError(f"no .txt/.json/.jsonl/.parquet files found for --data {data}")
    kinds = {LOCAL_BUILDERS.get(Path(f).suffix) for f in files}
    if None in kinds or len(kinds) > 1:
        raise gt.UserError(f"--data {data} must name files of one kind (.txt, .json/.jsonl or .parquet), "
                           f"found suffixes {sorted({Path(f).suffix for f in files})}")
    return files


def open_hub_subset(subset: str):
    """The one place that touches the hub: a streaming smollm-corpus subset. Tests substitute it."""
    from datasets import load_dataset

    return load_dataset(SMOLLM_REPO, subset, split="train", streaming=True)


def _first_line(e: Exception) -> str:
    return str(e).strip().splitlines()[0][:150] if str(e).strip() else ""


def _open_stream(source: DataSource):
    """A streaming `datasets.IterableDataset` with one column, `text`, for any source."""
    from datasets import interleave_datasets, load_dataset

    if source.kind == "local":
        builder = LOCAL_BUILDERS[Path(source.parts[0]).suffix]
        # Whole .txt files are documents (prep_dataset output separates books with <|endoftext|> inside).
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        try:
            ds = load_dataset(builder, data_files=source.parts, split="train", streaming=True, **kwargs)
        except StopIteration:  # the json builder's way of saying the files hold no rows
            raise gt.UserError(f"{source.describe()} is empty: no documents to tokenize")
        except Exception as e:
            raise gt.UserError(f"could not read {source.describe()} ({type(e).__name__}: {_first_line(e)})")
        streams = [(source.describe(), ds)]
    else:
        streams = []
        for subset in source.parts:
            try:
                streams.append((f"{SMOLLM_REPO}/{subset}", open_hub_subset(subset)))
            except Exception as e:
                raise gt.UserError(
                    f"could not stream {SMOLLM_REPO}/{subset} from the Hugging Face hub ({type(e).__name__}: "
                    f"{_first_line(e)}); point --data at local .txt/.jsonl/.parquet "
                    "files, or at a --cache_dir built earlier")
    column = "text" if source.kind == "local" and LOCAL_BUILDERS[Path(source.parts[0]).suffix] == "text" else source.text_column
    checked = []
    for name, ds in streams:
        try:
            first = next(iter(ds), None)
        except StopIteration:  # some builders end an empty file this way
            first = None
        except Exception as e:
            raise gt.UserError(f"could not read {name} ({type(e).__name__}: {_first_line(e)})"
                               "; check the files, or point --data at another source")
        if first is None:
            raise gt.UserError(f"{name} is empty: no documents to tokenize")
        if column not in first:
            raise gt.UserError(f"{name} has no text column '{column}' (columns: {', '.join(first)}); "
                               "pass --text_column with the right name")
        ds = ds.select_columns([column])
        checked.append(ds.rename_column(column, "text") if column != "text" else ds)
    if len(checked) == 1:
        return checked[0]
    return interleave_datasets(checked, probabilities=source.weights, seed=source.seed,
                               stopping_strategy="all_exhausted")


def iter_documents(source: DataSource, skip: int = 0, batch_size: int = 512) -> Iterator[list[str]]:
    """The source's documents after the first `skip`, in lists of `batch_size` (batched iteration is ~10x
    faster than row by row). Opening the source, and its errors, happen now, not lazily."""
    stream = _open_stream(source)
    if skip:
        stream = stream.skip(skip)
    return ([t or "" for t in batch["text"]] for batch in stream.iter(batch_size=batch_size))


# ----------------------------------------------------------------------------------------------
# Building the cache


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    gt.atomic_write(path, lambda f: f.write(tokens.astype(np.uint16).tobytes()))


@dataclass
class _Builder:
    """Routes the token stream into train/val and shards, and can snapshot itself for resuming."""
    cache_dir: Path
    manifest: dict
    shard_tokens: int
    val_every: int  # one validation block every `val_every` blocks (the first block included)
    pending: np.ndarray = field(default_factory=lambda: np.empty(0, np.uint16))  # not yet routed
    bufs: dict = field(default_factory=lambda: {"train": [], "val": []})
    buffered: dict = field(default_factory=lambda: {"train": 0, "val": 0})  # tokens in bufs, per split

    def feed(self, tokens: np.ndarray) -> None:
        self.pending = np.concatenate([self.pending, tokens]) if len(self.pending) else tokens
        # `pending` must hold exactly the unrouted tokens whenever a shard flush snapshots it.
        while len(self.pending) >= VAL_BLOCK_TOKENS:
            block, self.pending = self.pending[:VAL_BLOCK_TOKENS], self.pending[VAL_BLOCK_TOKENS:]
            self._route(block)

    def _route(self, block: np.ndarray) -> None:
        j = self.manifest["blocks_routed"]
        self.manifest["blocks_routed"] = j + 1
        split = "val" if j % self.val_every == 0 else "train"
        self.bufs[split].append(block)
        self.buffered[split] += len(block)
        if self.buffered[split] >= self.shard_tokens:
            self._flush(split, final=False)

    def _flush(self, split: str, final: bool) -> None:
        data = np.concatenate(self.bufs[split]) if self.bufs[split] else np.empty(0, np.uint16)
        while len(data) >= self.shard_tokens or (final and len(data)):
            chunk, data = data[: self.shard_tokens], data[self.shard_tokens :]
            shards = self.manifest["shards"][split]
            name = f"{split}_{len(shards):06d}.bin"
            _write_shard(self.cache_dir / name, chunk)
            shards.append({"name": name, "tokens": int(len(chunk))})
            self.bufs[split] = [data] if len(data) else []
            self.buffered[split] = len(data)
            self.save_progress()
        self.bufs[split] = [data] if len(data) else []
        self.buffered[split] = len(data)

    def finish(self) -> None:
        if len(self.pending):
            self._route(self.pending)
            self.pending = np.empty(0, np.uint16)
        self._flush("train", final=True)
        self._flush("val", final=True)
        self.manifest["complete"] = True
        self.save_progress()

    def save_progress(self) -> None:
        """Carry (unwritten tokens) first, then the manifest that points at it: a crash between the
        two leaves the previous, consistent pair. A complete cache has nothing left to carry."""
        m = self.manifest
        m["shards_written"] = len(m["shards"]["train"]) + len(m["shards"]["val"])
        carry_name = None
        if not m["complete"]:
            carry_name = f"carry_{m['shards_written']:06d}_{m['blocks_routed']}.npz"
            arrays = {k: (np.concatenate(v) if v else np.empty(0, np.uint16)) for k, v in self.bufs.items()}
            gt.atomic_write(self.cache_dir / carry_name, lambda f: np.savez(f, pending=self.pending, **arrays))
        old = m.get("carry")
        m["carry"] = carry_name
        m["train_tokens"] = sum(s["tokens"] for s in m["shards"]["train"])
        m["val_tokens"] = sum(s["tokens"] for s in m["shards"]["val"])
        gt.write_json(self.cache_dir / MANIFEST, m)
        if old and old != carry_name:
            (self.cache_dir / old).unlink(missing_ok=True)

    def restore_carry(self) -> None:
        with np.load(self.cache_dir / self.manifest["carry"]) as z:
            self.pending = z["pending"]
            self.bufs = {k: ([z[k]] if len(z[k]) else []) for k in ("train", "val")}
            self.buffered = {k: len(z[k]) for k in ("train", "val")}


def _new_manifest(source: DataSource, max_tokens, val_fraction, shard_tokens) -> dict:
    return {
        "version": CACHE_VERSION,
        "source": source.identity,
        "source_description": source.describe(),
        "max_tokens": max_tokens,
        "val_fraction": val_fraction,
        "tokenizer": "gpt2",
        "tokenizer_hash": gt.tokenizer_fingerprint(),
        "dtype": "uint16",
        "shard_tokens": shard_tokens,
        "val_block_tokens": VAL_BLOCK_TOKENS,
        "rows_read": 0,  # rows of the stream consumed: where a resumed build continues
        "documents": 0,  # documents tokenized (<|endoftext|>-separated)
        "tokens_consumed": 0,
        "blocks_routed": 0,
        "shards_written": 0,
        "shards": {"train": [], "val": []},
        "train_tokens": 0,
        "val_tokens": 0,
        "carry": None,
        "complete": False,
    }


def read_manifest(cache_dir: Path) -> dict | None:
    path = Path(cache_dir) / MANIFEST
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise gt.UserError(f"{path} is not valid JSON: the cache is damaged; delete {cache_dir} to rebuild it")


def check_manifest(m: dict, cache_dir: Path, source: DataSource | None = None, max_tokens=None,
                   val_fraction=None) -> None:
    """Refuse a cache made with another tokenizer, from another source or with other split settings."""
    if m.get("version") != CACHE_VERSION:
        raise gt.UserError(f"the cache in {cache_dir} has format version {m.get('version')}, this toolkit "
                           f"reads {CACHE_VERSION}; rebuild it in a new --cache_dir")
    if m.get("tokenizer") != "gpt2" or m.get("tokenizer_hash") != gt.tokenizer_fingerprint():
        raise gt.UserError(f"the cache in {cache_dir} was tokenized with another tokenizer "
                           f"({m.get('tokenizer')}, hash {m.get('tokenizer_hash')}); use a new --cache_dir")
    if source is not None and m.get("source") != source.identity:
        raise gt.UserError(f"the cache in {cache_dir} was built from {m.get('source_description')}, not from "
                           f"{source.describe()}; use another --cache_dir for this source")
    for key, want in (("max_tokens", max_tokens), ("val_fraction", val_fraction)):
        if want is not None and m.get(key) != want:
            raise gt.UserError(f"the cache in {cache_dir} was built with {key}={m.get(key)}, this run asks for "
                               f"{want}; use the same setting or another --cache_dir")


def build_cache(source: DataSource, cache_dir, *, max_tokens: int | None = None, val_fraction: float = 0.01,
                shard_tokens: int = 100_000_000, batch_docs: int = 512, num_threads: int | None = None,
                progress: bool = True, log=print) -> dict:
    """Tokenize `source` into `cache_dir`, resuming a build that was interrupted. Returns the manifest."""
    cache_dir = Path(cache_dir)
    if not 0 < val_fraction < 1:
        raise gt.UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    cache_dir.mkdir(parents=True, exist_ok=True)
    manifest = read_manifest(cache_dir)
    if manifest is not None:
        check_manifest(manifest, cache_dir, source, max_tokens, val_fraction)
        if manifest["complete"]:
            return manifest
        log(f"resuming the cache build in {cache_dir}: {manifest['documents']:,} documents, "
            f"{manifest['tokens_consumed']:,} tokens done")
    else:
        manifest = _new_manifest(source, max_tokens, val_fraction, shard_tokens)
    builder = _Builder(cache_dir, manifest, manifest["shard_tokens"], max(1, round(1 / val_fraction)))
    if manifest["carry"]:
        builder.restore_carry()
    _remove_unlisted_shards(cache_dir, manifest)

    tokenizer = gt.get_tokenizer()
    batches = _prefetch(iter_documents(source, skip=manifest["rows_read"], batch_size=batch_docs))
    bar = None
    if progress:
        bar = gt.progress_bar(total=max_tokens, initial=manifest["tokens_consumed"], unit="tok", unit_scale=True,
                              desc="tokenizing", dynamic_ncols=True)
    t0, bytes_read, tokens_new = time.perf_counter(), 0, 0
    done = max_tokens is not None and manifest["tokens_consumed"] >= max_tokens
    while not done:
        batch = next(batches, None)
        if batch is None:
            break
        ids = gt.encode_documents(batch, tokenizer, num_threads=num_threads)
        manifest["rows_read"] += len(batch)
        if max_tokens is not None and manifest["tokens_consumed"] + len(ids) >= max_tokens:
            ids = ids[: max_tokens - manifest["tokens_consumed"]]
            done = True
        manifest["documents"] += int(np.count_nonzero(ids == tokenizer.eot_token))
        manifest["tokens_consumed"] += len(ids)
        bytes_read += sum(len(d.encode("utf-8")) for d in batch)
        tokens_new += len(ids)
        builder.feed(ids)
        if bar is not None:
            dt = max(time.perf_counter() - t0, 1e-9)
            bar.update(len(ids))
            bar.set_postfix(MB_s=f"{bytes_read / dt / 1e6:.1f}", tok_s=f"{tokens_new / dt:,.0f}")
    batches.close()  # stops the reader thread when --max_tokens ended the stream early
    if bar is not None:
        bar.close()
    builder.finish()
    if manifest["train_tokens"] == 0:
        raise gt.UserError(f"{source.describe()} gave {manifest['tokens_consumed']} tokens, too few for a training "
                           f"split (validation takes the first {VAL_BLOCK_TOKENS} tokens); use more text")
    log(f"cache {cache_dir}: {manifest['documents']:,} documents, {manifest['train_tokens']:,} train + "
        f"{manifest['val_tokens']:,} val tokens in {manifest['shards_written']} shard(s)")
    return manifest


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


def _remove_unlisted_shards(cache_dir: Path, manifest: dict) -> None:
    """A shard written after the last manifest update is not trusted: it is rewritten on resume."""
    listed = {s["name"] for split in ("train", "val") for s in manifest["shards"][split]}
    listed.add(manifest["carry"])
    for f in [*cache_dir.glob("*_*.bin"), *cache_dir.glob("carry_*.npz"), *cache_dir.glob(".*.tmp*")]:
        if f.name not in listed:
            f.unlink()


# ----------------------------------------------------------------------------------------------
# Loading


@dataclass
class TokenCache:
    manifest: dict
    train: list[np.ndarray]
    val: list[np.ndarray]


def load_cache(cache_dir, source: DataSource | None = None) -> TokenCache:
    """Memory-map a complete cache, checking each shard's size against the manifest."""
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
            size = path.stat().st_size if path.exists() else -1
            if size != 2 * s["tokens"]:
                raise gt.UserError(f"shard {path} is truncated or corrupt: {max(size, 0)} bytes on disk, the manifest "
                                   f"says {s['tokens']} tokens ({2 * s['tokens']} bytes); delete {cache_dir} to rebuild")
            arrays.append(np.memmap(path, dtype=np.uint16, mode="r"))
        out[split] = arrays
    return TokenCache(m, out["train"], out["val"])


def prepare_data(data: str, cache_dir, *, text_column="text", data_mix=None, seed=0, max_tokens=None,
                 val_fraction=0.01, shard_tokens=100_000_000, progress=True, is_main=True, barrier=None,
                 log=print) -> TokenCache:
    """Resolve a --data source, build its cache if needed (main rank only) and memory-map it."""
    source = resolve_source(data, text_column, data_mix, seed)
    if is_main:
        build_cache(source, cache_dir, max_tokens=max_tokens, val_fraction=val_fraction, shard_tokens=shard_tokens,
                    progress=progress, log=log)
    if barrier is not None:
        barrier()  # other ranks wait for the cache before mapping it
    return load_cache(cache_dir, source)
