"""Checkpoints on disk: a whole checkpoint is one file written atomically with a sha256 of its content
inside; an FSDP checkpoint is a folder of torch.distributed.checkpoint shards, state.pt with the other
parts and complete.json (the header and a sha256 per file), sealed by one rename. Every reader takes
both forms, checks the checksums, and reads data only: torch.load(weights_only=True), and DCP's
shard index through an allowlist, so a crafted file is refused, never run."""

from __future__ import annotations

import functools
import json
import os
import pickle
import shutil
from pathlib import Path

import torch

from gptkit.checkpoint.state import CHECKPOINT_FORMAT, SHARDED_PARTS, payload_bytes, payload_checksum
from gptkit.errors import CheckpointError, RunFailure
from gptkit.files import DISK_FULL, atomic_write, disk_full, fsync_dir, is_plain_name, os_reason, sha256_file, write_json

LEGACY_FORMAT = "gpt-train-checkpoint/1"
SHARDED_STATE, SHARDED_DONE = "state.pt", "complete.json"


# ----------------------------------------------------------------------------------------------
# Reading torch.distributed.checkpoint shards without running code from the files

# The only globals a DCP `.metadata` pickle needs (plus torch's dtypes): its dataclasses, torch.Size,
# a layout and memory-format decoder, and the path the checkpoint was saved to.
DCP_METADATA_GLOBALS = frozenset({
    *(("torch.distributed.checkpoint.metadata", n) for n in (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "ChunkStorageMetadata", "BytesStorageMetadata", "_MEM_FORMAT_ENCODING")),
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch", "Size"), ("torch.serialization", "_get_layout"), ("collections", "OrderedDict"),
    ("pathlib", "PosixPath"), ("pathlib", "WindowsPath"), ("pathlib", "PurePosixPath"), ("pathlib", "PureWindowsPath"),
})


class _MetadataUnpickler(pickle.Unpickler):
    """A pickle reader that builds DCP's metadata classes and nothing else: any other global (a
    function to call, a class with side effects) is refused before it is looked up."""

    def __init__(self, file, source: Path):
        super().__init__(file)
        self.source = source

    def find_class(self, module: str, name: str):
        if (module, name) in DCP_METADATA_GLOBALS or (module == "torch" and isinstance(getattr(torch, name, None),
                                                                                         torch.dtype)):
            return super().find_class(module, name)
        raise CheckpointError(f"{self.source} is not a checkpoint this toolkit reads: its shard index asks to load "
                              f"{module}.{name}, which a checkpoint never holds (a crafted file?); it was not loaded")


@functools.cache
def _safe_dcp_classes():
    """A FileSystemReader that unpickles `.metadata` through the allowlist and opens shard files only
    inside the checkpoint's folder, and a load planner that reads non-tensor values with
    weights_only=True (DCP's own planner unpickles them with weights_only=False)."""
    from torch.distributed.checkpoint import DefaultLoadPlanner, FileSystemReader
    from torch.distributed.checkpoint._traverse import set_element
    from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

    class SafeReader(FileSystemReader):
        def read_metadata(self, *args, **kwargs) -> Metadata:
            path = Path(self._get_metadata_path(kwargs.get("rank")))
            try:
                with open(path, "rb") as f:
                    metadata = _MetadataUnpickler(f, path.parent).load()
            except CheckpointError:
                raise
            except Exception as e:
                raise CheckpointError(f"{path.parent} has a damaged shard index ({path.name}: {_first_words(e)})")
            if not isinstance(metadata, Metadata) or not isinstance(metadata.storage_data, dict):
                raise CheckpointError(f"{path.parent}: {path.name} is not a shard index")
            for info in metadata.storage_data.values():
                name = getattr(info, "relative_path", None)
                if not (isinstance(name, str) and is_plain_name(name)):
                    raise CheckpointError(f"{path.parent}: its shard index names {name!r}, not a file of the "
                                          "checkpoint's own folder; it was not loaded")
            if getattr(metadata, "storage_meta", None) is None:
                metadata.storage_meta = StorageMeta()
            metadata.storage_meta.load_id = self.load_id
            return metadata

    class SafePlanner(DefaultLoadPlanner):
        def load_bytes(self, read_item, value) -> None:
            fqn = read_item.dest_index.fqn
            try:
                obj = torch.load(value, weights_only=True)
            except Exception as e:
                raise CheckpointError(f"the value {fqn} in the checkpoint's shards is not plain data and was not loaded "
                                      f"({_first_words(e)})")
            if self.flatten_state_dict:
                set_element(self.original_state_dict, self.mappings[fqn], obj)
            else:
                self.state_dict[fqn] = obj

    return SafeReader, SafePlanner


def _first_words(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:120]


def dcp_load(state: dict, folder) -> None:
    """torch.distributed.checkpoint.load into `state`, reading only data: the shard index through the
    allowlist, non-tensor values with weights_only=True, shard files only from `folder` itself."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.api import CheckpointException

    reader_cls, planner_cls = _safe_dcp_classes()
    if not (Path(folder) / ".metadata").is_file():
        raise CheckpointError(f"{folder} has no shard index (.metadata); it is not a complete sharded checkpoint")
    reader_cls(str(folder)).read_metadata()  # refuses a crafted index here, with its own message
    try:
        dcp.load(state, storage_reader=reader_cls(str(folder)), planner=planner_cls())
    except CheckpointException as e:  # DCP wraps each rank's error (and is a BaseException)
        errors = [f[0] for f in e.failures.values() if isinstance(f, tuple) and f]
        ours = next((x for x in errors if isinstance(x, CheckpointError)), None)
        if ours is not None:
            raise ours from None
        why = _first_words(errors[0]) if errors else "unknown error"
        raise CheckpointError(f"the shards in {folder} cannot be read ({why})") from None
    except (OSError, RuntimeError, ValueError, KeyError, AssertionError) as e:
        raise CheckpointError(f"the shards in {folder} cannot be read ({_first_words(e)})") from None


# ----------------------------------------------------------------------------------------------
# Writing and reading


def save_checkpoint(path, checkpoint: dict) -> Path:
    """Write a checkpoint dict atomically, with the checksum of its content added. A full disk is one
    line naming the file and the space it needs."""
    checkpoint = {**checkpoint, "checksum": payload_checksum(checkpoint)}
    try:
        return atomic_write(path, lambda f: torch.save(checkpoint, f), size_hint=payload_bytes(checkpoint))
    except OSError as e:
        raise RunFailure(f"could not write checkpoint {path} ({os_reason(e)}); check the folder, then continue with "
                         "--resume auto")


def save_sharded(path, checkpoint: dict, rank: int) -> Path:
    """Write a sharded checkpoint: a folder with the model and optimizer shards of every rank
    (torch.distributed.checkpoint), state.pt with the other parts (rank 0), and complete.json last,
    holding the header and the sha256 of every file. It is written under a temp name and renamed:
    a folder without complete.json is never a checkpoint. Every rank calls this (it is collective)."""
    import torch.distributed.checkpoint as dcp

    final = Path(path)
    tmp = final.with_name(f".{final.name}.tmp")
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    _barrier()
    shards = {"model": checkpoint["model"], "optimizer": {k: v for k, v in checkpoint["optimizer"].items() if k != "kind"}}
    try:
        dcp.save(shards, checkpoint_id=str(tmp))
        _barrier()
        if rank == 0:
            _seal(final, tmp, checkpoint)
    except OSError as e:
        if e.errno in DISK_FULL:
            raise disk_full(final, e, payload_bytes(shards)) from None
        raise RunFailure(f"could not write checkpoint {final} ({os_reason(e)}); check the folder, then continue with "
                         "--resume auto")
    _barrier()
    return final


def _barrier() -> None:
    """A barrier across the process group; nothing in a single process without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def _seal(final: Path, tmp: Path, checkpoint: dict) -> None:
    rest = {k: v for k, v in checkpoint.items() if k not in SHARDED_PARTS}
    rest["optimizer_kind"] = checkpoint["optimizer"].get("kind")
    atomic_write(tmp / SHARDED_STATE, lambda f: torch.save(rest, f))
    files = {p.name: sha256_file(p) for p in sorted(tmp.iterdir()) if p.is_file()}
    header = {k: checkpoint[k] for k in ("format", "config", "run_id", "step", "tokens_seen", "saved_at")}
    write_json(tmp / SHARDED_DONE, {**header, "sharded": True, "files": files})
    old = final.with_name(f".{final.name}.old")
    if final.exists():  # the same step of an earlier timeline of this run: replaced
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    shutil.rmtree(old, ignore_errors=True)  # only once the new one is in place: a kill never leaves neither


def _read_sharded(path: Path, verify: bool) -> dict:
    done = path / SHARDED_DONE
    try:
        header = json.loads(done.read_text())
    except (OSError, ValueError):
        raise CheckpointError(f"{path} is not a complete sharded checkpoint (no readable {SHARDED_DONE})")
    if verify:
        for name, digest in header.get("files", {}).items():
            if not (is_plain_name(name) and (path / name).is_file()) or sha256_file(path / name) != digest:
                raise CheckpointError(f"checkpoint {path} is damaged: {name} does not match the checksum it was "
                                      "written with")
        _safe_dcp_classes()[0](str(path)).read_metadata()  # a crafted shard index is refused before any work
    try:
        rest = torch.load(path / SHARDED_STATE, map_location="cpu", weights_only=True)
    except Exception as e:
        raise CheckpointError(f"checkpoint {path} is corrupt ({SHARDED_STATE}: {str(e).strip()[:100]})")
    return {**rest, **{k: v for k, v in header.items() if k != "files"}, "sharded": str(path)}


def _read(path: Path, mmap: bool, verify: bool = False) -> dict:
    if path.is_dir():
        return _read_sharded(path, verify)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist" if not path.exists() else f"{path} is not a file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be read ({first[:120]})")
    fmt = ckpt.get("format") if isinstance(ckpt, dict) else None
    if fmt not in (CHECKPOINT_FORMAT, LEGACY_FORMAT) or not isinstance(ckpt.get("config"), dict) or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this toolkit (no '{CHECKPOINT_FORMAT}' header "
                              "with a config and weights)")
    return ckpt if fmt == CHECKPOINT_FORMAT else upgrade_legacy(ckpt)


def checkpoint_header(path) -> dict:
    """A checkpoint's header (format, config, run id, step, tokens, time): cheap, not verified."""
    path = Path(path)
    if path.is_dir():
        try:
            return json.loads((path / SHARDED_DONE).read_text())
        except (OSError, ValueError):
            raise CheckpointError(f"{path} is not a complete sharded checkpoint (no readable {SHARDED_DONE})")
    return _read(path, mmap=True)


def peek_checkpoint(path) -> dict:
    """A checkpoint's header and parts without reading tensor data (memory-mapped, not verified)."""
    return _read(Path(path), mmap=True)


def load_checkpoint(path, mmap: bool = True) -> dict:
    """Load a checkpoint and verify its checksum. With mmap the tensors are mapped from the file and
    read once, while being checked (and again from the page cache when copied into place). A sharded
    checkpoint's files are all checked; its shards are read later, into the run's own layout."""
    path = Path(path)
    ckpt = _read(path, mmap, verify=True)
    expected = ckpt.pop("checksum", None)
    if expected is not None and payload_checksum(ckpt) != expected:
        raise CheckpointError(f"checkpoint {path} is damaged: its content does not match the checksum it was written "
                              "with")
    return ckpt


def upgrade_legacy(ckpt: dict) -> dict:
    """A checkpoint of format 1 (before run identities and checksums) in today's layout."""
    extra = ckpt.get("extra") or {}
    rngs = ckpt.get("rng_per_rank") or ([ckpt["rng"]] if "rng" in ckpt else None)
    out = {"format": CHECKPOINT_FORMAT, "config": ckpt["config"], "run_id": extra.get("wandb_run_id"),
           "step": ckpt.get("step", 0), "tokens_seen": ckpt.get("tokens_seen", 0), "saved_at": 0.0,
           "model": ckpt["model"], "run": {k: v for k, v in extra.items() if k != "wandb_run_id"},
           "progress": {"step": ckpt.get("step", 0), "tokens_seen": ckpt.get("tokens_seen", 0),
                        "history": ckpt.get("history")}}
    if ckpt.get("optimizer") is not None:
        kind = {"adamw": "AdamW", "galore": "GaLoreAdamW"}.get(extra.get("optimizer", "adamw"), "AdamW")
        out["optimizer"] = {**ckpt["optimizer"], "kind": kind}
    if ckpt.get("data") is not None:
        out["data"] = ckpt["data"]
    if rngs:
        out["rng"] = {"per_rank": rngs}
    out["scaler"] = ckpt.get("scaler") or {}
    return out
