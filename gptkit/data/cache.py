"""The token cache: a source tokenized once into uint16 (uint32 past 65,536 ids) shards with a JSON manifest, then
memory-mapped for training.

    cache/manifest.json     source identity, tokenizer + hash, shards with token counts and sha256,
                            documents, the train/validation split, and how far the build got
    cache/train_000000.bin  token ids (the manifest's dtype), documents marked as the tokenizer declares
    cache/val_000000.bin    the held-out validation blocks (never overlapping train)

The cache owns its folder: it builds only in an empty folder or one holding its own manifest, and it
deletes only files its manifest lists (names it checks are its own). The build records its progress
after every shard (the unwritten tokens go to a carry file, then the manifest points at it), so a
build killed any number of times, at any point, resumes and finishes byte-identical to an
uninterrupted one. Validation is every k-th block of 4,096 tokens (k = round(1 / val_fraction)).
"""

from __future__ import annotations

import hashlib
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from gptkit.data.sources import DataSource, Mixer, first_line
from gptkit.errors import UserError
from gptkit.files import FolderLock, atomic_write, make_folder, remove_stale_temps, write_json
from gptkit.progress import progress_bar
from gptkit.tokenizer import get_tokenizer, tokenizer_fingerprint

MANIFEST, LOCK = "manifest.json", "cache.lock"
CACHE_VERSION = 2
# The validation split is made of whole blocks of this many tokens, taken evenly through the stream.
VAL_BLOCK_TOKENS = 4096
FEED_TOKENS = 1 << 16  # documents are fed to the shard builder in chunks of about this many tokens


# ----------------------------------------------------------------------------------------------
# Building


def _write_shard(path: Path, tokens: np.ndarray) -> None:
    """The ids as they are typed (the manifest's dtype: uint16, or uint32)."""
    atomic_write(path, lambda f: f.write(tokens.tobytes()), size_hint=tokens.nbytes)


def _dtype(manifest: dict | None = None) -> np.dtype:
    """The ids' type: what the manifest says (uint16 for every older cache), else the tokenizer's."""
    return np.dtype((manifest or {}).get("dtype") or get_tokenizer().dtype)


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
            chunk = chunk.astype(_dtype(self.manifest))
            _write_shard(self.cache_dir / name, chunk)
            self.manifest["shards"][split].append({"name": name, "tokens": int(len(chunk)),
                                                   "sha256": hashlib.sha256(chunk.tobytes()).hexdigest()})
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
            atomic_write(self.cache_dir / carry, lambda f: np.savez(f, pending=self.pending, **arrays))
        m["records"] += 1
        m["carry"] = carry
        # The next names, and the old carry (deleted just below): a kill leaves nothing the manifest does not name.
        m["reserved"] = sorted({*([] if m["complete"] else _names(m).values()), *([old] if old and old != carry else [])})
        write_json(self.cache_dir / MANIFEST, m)
        if old and old != carry:
            (self.cache_dir / old).unlink(missing_ok=True)
            if m["complete"]:  # the finished cache reserves nothing (a kill before this: _tidy_complete)
                m["reserved"] = []
                write_json(self.cache_dir / MANIFEST, m)

    def restore_carry(self) -> None:
        path = self.cache_dir / self.manifest["carry"]
        try:
            with np.load(path) as z:
                self.pending = z["pending"]
                self.bufs = {k: ([z[k]] if len(z[k]) else []) for k in ("train", "val")}
                self.buffered = {k: len(z[k]) for k in ("train", "val")}
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"the interrupted build in {self.cache_dir} cannot continue: its carry file {path.name} is "
                               f"missing or damaged ({first_line(e)}); delete {self.cache_dir} to rebuild the cache")


def _new_manifest(source: DataSource, identity: dict, max_tokens, val_fraction, shard_tokens) -> dict:
    return {
        "version": CACHE_VERSION,
        "source": identity,
        "source_description": source.describe(),
        "max_tokens": max_tokens,
        "val_fraction": val_fraction,
        "tokenizer": get_tokenizer().name,
        "tokenizer_hash": tokenizer_fingerprint(),
        "dtype": get_tokenizer().dtype,  # uint16 while the ids fit, else uint32
        "vocab_size": get_tokenizer().n_vocab,
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
        raise UserError(f"{path} is damaged or not a token cache manifest; delete {cache_dir} to rebuild the cache")
    if m.get("version") == CACHE_VERSION:
        problem = manifest_problem(m)
        if problem:
            raise UserError(f"{path} is damaged or was edited ({problem}); nothing was read or deleted: delete "
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
    return _shards_problem(m.get("shards")) or _names_problem(m) or _counts_problem(m)


def _shards_problem(shards) -> str | None:
    if not (isinstance(shards, dict) and all(isinstance(shards.get(k), list) for k in ("train", "val"))):
        return "'shards' must hold a 'train' and a 'val' list"
    for split in ("train", "val"):
        for e in shards[split]:
            if not (isinstance(e, dict) and isinstance(e.get("name"), str) and SHARD_NAME_RE[split].match(e["name"])
                    and _count(e.get("tokens"))):
                return f"a {split} shard entry {str(e)[:80]!r} is not a {split}_NNNNNN.bin name with a token count"
    return None


def _names_problem(m: dict) -> str | None:
    names = m.get("reserved", [])
    if not isinstance(names, list) or not all(isinstance(n, str) and OWN_NAME_RE.match(n) for n in names):
        return f"'reserved' holds {str(names)[:80]!r}, not only the cache's own file names"
    carry = m.get("carry")
    if carry is not None and not (isinstance(carry, str) and CARRY_NAME_RE.match(carry)):
        return f"'carry' is {str(carry)[:80]!r}, not a carry_NNNNNN.npz name"
    return None


def _counts_problem(m: dict) -> str | None:
    bad = next((k for k in ("train_tokens", "val_tokens", "tokens_consumed", "documents") if not _count(m.get(k))), None)
    if bad:
        return f"'{bad}' is {m.get(bad)!r}, not a count"
    for split in ("train", "val"):
        held = sum(e["tokens"] for e in m["shards"][split])
        if held != m[f"{split}_tokens"]:
            return f"its {split} shards hold {held} tokens, it counts {m[f'{split}_tokens']}"
    held = m["train_tokens"] + m["val_tokens"]
    if m.get("complete") is True and held != m["tokens_consumed"]:
        return f"it is marked complete but its shards hold {held} of the {m['tokens_consumed']} tokens it read"
    if m.get("complete") is True and not m["shards"]["train"] and held > VAL_BLOCK_TOKENS:
        return f"it is marked complete but lists no train shard for {held} tokens"  # (one block of text has none)
    return None


def identity_changes(old: dict, new: dict) -> list[str]:
    """What differs between two source identities, in words: every setting a kind records (not where
    the files sit: a moved corpus is the same source), and each file by content."""
    if old.get("kind") != new.get("kind"):
        return [f"the source was {old.get('kind')} data, now {new.get('kind')}"]
    keys = sorted((old.keys() | new.keys()) - {"kind", "files", "root"})
    changes = [f"{k} was {old.get(k)!r}, now {new.get(k)!r}" for k in keys if old.get(k) != new.get(k)]
    return changes + _file_changes({f["path"]: f for f in old.get("files", [])},
                                   {f["path"]: f for f in new.get("files", [])})


def _file_changes(before: dict, after: dict) -> list[str]:
    changes = [f"{p} is new" for p in after if p not in before] + [f"{p} is gone" for p in before if p not in after]
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
        raise UserError(f"the cache in {cache_dir} has format version {m.get('version')}, this toolkit "
                           f"reads {CACHE_VERSION}; rebuild it in a new --cache_dir")
    if m.get("tokenizer_hash") != tokenizer_fingerprint():
        raise UserError(f"the cache in {cache_dir} was tokenized with another tokenizer ({m.get('tokenizer')}, hash "
                        f"{m.get('tokenizer_hash')}; this run's is {get_tokenizer().name}, hash {tokenizer_fingerprint()}); "
                        "use a new --cache_dir")
    if source is not None:
        changes = identity_changes(m.get("source", {}), source.identity(m.get("source")))
        if changes:
            more = f" (and {len(changes) - 3} more)" if len(changes) > 3 else ""
            raise UserError(f"the cache in {cache_dir} was built from {m.get('source_description')}, not from "
                               f"{source.describe()} as it is now ({'; '.join(changes[:3])}{more}); use another "
                               "--cache_dir for this data")
    for key, want in (("max_tokens", max_tokens), ("val_fraction", val_fraction)):
        if want is not None and m.get(key) != want:
            raise UserError(f"the cache in {cache_dir} was built with {key}={m.get(key)}, this run asks for "
                               f"{want}; use the same setting or another --cache_dir")


def _claim_folder(cache_dir: Path) -> dict | None:
    """The folder's manifest, or None for an empty (new) folder; a folder holding anything else is
    not the cache's and is refused before a byte is written."""
    make_folder(cache_dir, "--cache_dir", "pick another folder with --cache_dir")
    manifest = read_manifest(cache_dir)
    if manifest is None:
        others = [p.name for p in cache_dir.iterdir() if p.name != LOCK and not (p.name.startswith(f".{MANIFEST}.")
                                                                                  and p.name.endswith(".tmp"))]
        if others:
            raise UserError(f"--cache_dir {cache_dir} is not empty and holds no token cache ({MANIFEST} is missing; "
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
    except UserError:
        return
    try:
        m = read_manifest(cache_dir)
        if m is not None and m.get("complete") and m.get("reserved"):
            for name in m["reserved"]:
                (cache_dir / name).unlink(missing_ok=True)
            m["reserved"] = []
            write_json(cache_dir / MANIFEST, m)
    finally:
        lock.release()


def build_cache(source: DataSource, cache_dir, *, max_tokens: int | None = None, val_fraction: float = 0.01,
                shard_tokens: int = 100_000_000, batch_docs: int = 512, num_threads: int | None = None,
                progress: bool = True, log=print) -> dict:
    """Tokenize `source` into `cache_dir`, resuming a build that was interrupted. Returns the manifest."""
    cache_dir = Path(cache_dir)
    if not 0 < val_fraction < 1:
        raise UserError(f"--val_fraction must be between 0 and 1, got {val_fraction}")
    for note in source.notes:
        log(note)
    existing = read_manifest(cache_dir)
    if existing is None or not existing.get("complete"):
        source.probe()  # before the folder is made: a bad source leaves nothing behind
    manifest = _claim_folder(cache_dir)
    if manifest is not None and manifest.get("complete"):
        return _reuse(manifest, cache_dir, source, max_tokens, val_fraction)
    with FolderLock(cache_dir / LOCK, what="cache build"):
        manifest = read_manifest(cache_dir)  # again, under the lock
        if manifest is None:
            manifest = _new_manifest(source, source.identity(), max_tokens, val_fraction, shard_tokens)
            manifest["reserved"] = sorted(_names(manifest).values())
            write_json(cache_dir / MANIFEST, manifest)
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
        raise UserError(f"{source.describe()} gave {manifest['tokens_consumed']} tokens, too few for a training "
                        f"split (validation takes the first {VAL_BLOCK_TOKENS} tokens); use more text")
    log(f"cache {cache_dir}: {manifest['documents']:,} documents, {manifest['train_tokens']:,} train + "
        f"{manifest['val_tokens']:,} val tokens in {manifest['shards_written']} shard(s)")
    return manifest


def _reuse(manifest: dict, cache_dir: Path, source: DataSource, max_tokens, val_fraction) -> dict:
    """A complete cache of this source and these settings, tidied of what a kill right after its last
    record left."""
    check_manifest(manifest, cache_dir, source, max_tokens, val_fraction)
    if manifest.get("reserved"):
        _tidy_complete(cache_dir)
    FolderLock(cache_dir / LOCK).clear_if_stale()  # a build killed right after finishing leaves its lock file
    return manifest


def _resume_or_restart(manifest: dict, cache_dir: Path, source: DataSource, max_tokens, val_fraction, shard_tokens,
                       log) -> dict:
    """An interrupted build continues when its source and settings are unchanged. If they changed, the
    unfinished cache is worth nothing: its own files (those the manifest lists) are removed and the
    build starts over. A complete cache is never removed (check_manifest refuses it instead)."""
    try:
        check_manifest(manifest, cache_dir, source, max_tokens, val_fraction)
    except UserError as e:
        if manifest.get("complete") or manifest.get("version") != CACHE_VERSION:
            raise
        log(f"the interrupted cache build in {cache_dir} was for other data or settings ({e}); starting it over")
        listed = [s["name"] for split in ("train", "val") for s in manifest["shards"][split]]
        for name in [*listed, *manifest.get("reserved", []), *([manifest["carry"]] if manifest["carry"] else [])]:
            (cache_dir / name).unlink(missing_ok=True)
        fresh = _new_manifest(source, source.identity(), max_tokens, val_fraction, shard_tokens)
        fresh["reserved"] = sorted(_names(fresh).values())
        write_json(cache_dir / MANIFEST, fresh)
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
    bar = progress_bar(total=max_tokens, initial=m["tokens_consumed"], unit="tok", desc="tokenizing") if progress else None
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
            m["documents"] += int(np.count_nonzero(ids == get_tokenizer().eot_token))
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


def verify_shard(path: Path, entry: dict, vocab_size: int | None = None, dtype: str = "uint16") -> None:
    """A shard's size, sha256 and ids (below `vocab_size`, default the tokenizer's) checked against its
    manifest entry: one error line naming it."""
    vocab_size = vocab_size or get_tokenizer().n_vocab
    width = np.dtype(dtype).itemsize
    size = path.stat().st_size if path.exists() else -1
    if size != width * entry["tokens"]:
        raise UserError(f"shard {path} is truncated or corrupt: {max(size, 0)} bytes on disk, the manifest "
                        f"says {entry['tokens']} tokens ({width * entry['tokens']} bytes); delete {path.parent} to rebuild")
    h, top = hashlib.sha256(), 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
            top = max(top, int(np.frombuffer(block, dtype=dtype).max(initial=0)))
    if top >= vocab_size:
        raise UserError(f"shard {path} holds token id {top}, beyond the vocabulary ({vocab_size}); the cache is "
                           f"damaged: delete {path.parent} to rebuild")
    if entry.get("sha256") and h.hexdigest() != entry["sha256"]:
        raise UserError(f"shard {path} is corrupt: its sha256 does not match the manifest; delete {path.parent} "
                           "to rebuild")


def load_cache(cache_dir, source: DataSource | None = None, verify: bool = True, any_tokenizer: bool = False) -> TokenCache:
    """Memory-map a complete cache. Every shard's size is checked; with `verify` also its sha256 and
    that its ids fit the vocabulary (one read of the cache). `any_tokenizer`: a look at a cache of any
    tokenizer (token_cache.py inspect and verify), not a run's."""
    cache_dir = Path(cache_dir)
    m = read_manifest(cache_dir)
    if m is None:
        raise UserError(f"no token cache in {cache_dir} (no {MANIFEST}); build one with --prepare_only")
    if not any_tokenizer:
        check_manifest(m, cache_dir, source)
    if not m["complete"]:
        raise UserError(f"the token cache in {cache_dir} is incomplete (its build was interrupted); run the same "
                           "command again to resume building it")
    out = {}
    for split in ("train", "val"):
        arrays = []
        for s in m["shards"][split]:
            path, dtype = cache_dir / s["name"], _dtype(m)
            vocab = m.get("vocab_size", 50257)  # recorded since caches of other tokenizers exist; GPT-2's before
            if verify:
                verify_shard(path, s, vocab, dtype.name)
            elif not path.exists() or path.stat().st_size != dtype.itemsize * s["tokens"]:
                verify_shard(path, s, vocab, dtype.name)  # names the problem
            arrays.append(np.memmap(path, dtype=dtype, mode="r"))
        out[split] = arrays
    return TokenCache(m, out["train"], out["val"])
