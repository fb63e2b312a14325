"""State on disk that a run owns: atomic files, the run folder (identity, lock), checkpoints and pruning.

A checkpoint is written and read by one object, `CheckpointState`, whose parts (model, optimizer,
data position, loss scaler, RNG of every rank, progress, run identity) each save and load themselves:
the same parts drive both directions, so nothing can be saved and then forgotten on load. The file
carries a sha256 of everything in it, checked whenever it is loaded.

A run folder belongs to one run. `run.json` names the run (an id and the settings that define it),
`run.lock` keeps a second live process out, and only this run's checkpoints are ever pruned, ordered
by the step recorded inside them. Nothing the toolkit did not write is deleted or overwritten; a run
started over (`--overwrite`) moves the old files aside instead.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import functools
import hashlib
import json
import os
import pickle
import random
import re
import shutil
import socket
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from gpt_model import ARCH_FIELDS, GPTConfig, UserError, unwrap_model

CHECKPOINT_FORMAT = "gpt-train-checkpoint/2"
LEGACY_FORMAT = "gpt-train-checkpoint/1"
RUN_FORMAT = "gpt-train-run/1"
RUN_FILE, LOCK_FILE = "run.json", "run.lock"
CKPT_RE = re.compile(r"^ckpt_(\d{8})(?:\.pt)?$")  # a file, or the folder of a sharded checkpoint
# What a run writes into its folder. A folder holding any of these but no run.json is another
# (older) run's and is refused; --overwrite moves these, and only these, aside.
RUN_OUTPUTS = (RUN_FILE, "train.log", "losses.json", "loss_plot.png", "tensorboard", "wandb")


class CheckpointError(UserError):
    pass


class RunFailure(UserError):
    """Not bad input but the environment failing mid-run (a full disk...): one line, exit code 1."""
    exit_code = 1


# ----------------------------------------------------------------------------------------------
# Files


@functools.lru_cache(maxsize=1)
def process_umask() -> int:
    """The process umask, read from /proc where it can be (os.umask can only be read by setting it,
    which races with other threads)."""
    with contextlib.suppress(OSError, ValueError):
        for line in open("/proc/self/status"):
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    old = os.umask(0o022)
    os.umask(old)
    return old


def file_mode() -> int:
    """What open() gives a new file: 0o666 less the umask."""
    return 0o666 & ~process_umask()


def dir_mode() -> int:
    """What mkdir() gives a new folder: 0o777 less the umask."""
    return 0o777 & ~process_umask()


def atomic_write(path, write: Callable) -> Path:
    """Write a file atomically: `write(f)` fills a temp file in the same directory, which is fsynced
    and renamed over `path` (then the directory is fsynced). A crash at any point leaves either the old
    file or the complete new one, never a torn one. The file gets the permissions open() would give it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), file_mode())  # mkstemp makes 0600: a shared cache or export needs more
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    fsync_dir(path.parent)
    return path


def fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):
        dfd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)


def write_json(path, obj) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def remove_stale_temps(folder: Path, names: Callable[[str], bool]) -> list[Path]:
    """Delete temp files left in `folder` by a killed writer (".NAME.<random>.tmp" as atomic_write
    makes them, or ".NAME.tmp"), for final names that `names` accepts: the caller's own files only."""
    removed = []
    for p in folder.iterdir() if folder.is_dir() else ():
        if not (p.name.startswith(".") and p.name.endswith(".tmp")) or not p.is_file():
            continue
        inner = p.name[1:-4]
        if names(inner) or names(inner.rsplit(".", 1)[0]):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def os_reason(e: OSError) -> str:
    return e.strerror or type(e).__name__


# ----------------------------------------------------------------------------------------------
# Checksums


def payload_checksum(obj) -> str:
    """sha256 over a nested state dict: tensors by dtype, shape and bytes, other values by type and
    repr, dict keys in sorted order. The same state gives the same value on any device."""
    h = hashlib.sha256()
    _feed(h, obj)
    return "sha256:" + h.hexdigest()


def _feed(h, obj) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous().reshape(-1)
        h.update(f"T{t.dtype}{tuple(obj.shape)}".encode())
        if t.numel():
            h.update(memoryview(t.view(torch.uint8).numpy()))
    elif isinstance(obj, dict):
        h.update(b"D%d" % len(obj))
        for k in sorted(obj, key=repr):
            h.update(repr(k).encode())
            _feed(h, obj[k])
    elif isinstance(obj, (list, tuple)):
        h.update(b"L%d" % len(obj))
        for v in obj:
            _feed(h, v)
    else:
        h.update(f"{type(obj).__name__}:{obj!r}".encode())


def sha256_file(path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


# ----------------------------------------------------------------------------------------------
# RNG


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # Stored as plain values + tensors so checkpoints load with torch.load(weights_only=True).
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    # This process's GPU only, and only once CUDA is in use: get_rng_state_all() would open a context
    # on every GPU of the machine from every rank, and tie the checkpoint to the machine's GPU count.
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if isinstance(cuda, (list, tuple)):  # older checkpoints: one state per GPU of the machine
            cuda = cuda[min(torch.cuda.current_device(), len(cuda) - 1)]
        torch.cuda.set_rng_state(cuda)


# ----------------------------------------------------------------------------------------------
# The parts of a checkpoint. Each saves and loads itself; `CheckpointState` holds them by name.


class Stateful(Protocol):
    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def check_config_matches(ckpt_cfg: dict, cfg: GPTConfig, source="checkpoint") -> None:
    defaults = GPTConfig().to_dict()
    diffs = [f"{k}={ckpt_cfg.get(k, defaults[k])} (model: {getattr(cfg, k)})" for k in ARCH_FIELDS
             if ckpt_cfg.get(k, defaults[k]) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"{source} was saved from a different model config: {', '.join(diffs)}; "
                              "use the same --model and overrides as the run that wrote it")


def is_sharded(model: torch.nn.Module) -> bool:
    """Whether the model's parameters are FSDP shards (DTensors) rather than whole tensors."""
    return any(hasattr(p, "full_tensor") for p in unwrap_model(model).parameters())


class ModelPart:
    """The plain model's weights (no DDP `module.` or compile `_orig_mod.` prefixes). A sharded
    (FSDP) model gives and takes its shards, in torch.distributed.checkpoint's form."""

    def __init__(self, model: torch.nn.Module):
        self.model = model

    @property
    def sharded(self) -> bool:
        return is_sharded(self.model)

    def state_dict(self) -> dict:
        return self.dcp_state_dict() if self.sharded else unwrap_model(self.model).state_dict()

    def load_state_dict(self, state: dict) -> None:
        if self.sharded:  # a whole-tensor checkpoint into shards: every rank takes its part
            from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

            set_model_state_dict(unwrap_model(self.model), state, options=StateDictOptions(full_state_dict=True))
        else:
            unwrap_model(self.model).load_state_dict(state)

    def dcp_state_dict(self) -> dict:
        from torch.distributed.checkpoint.state_dict import get_model_state_dict

        return get_model_state_dict(unwrap_model(self.model))

    def load_dcp_state_dict(self, state: dict) -> None:
        from torch.distributed.checkpoint.state_dict import set_model_state_dict

        set_model_state_dict(unwrap_model(self.model), state)


PROJECTOR_FIELDS = ("rank", "update_proj_gap", "scale", "proj_type", "ortho_matrix")
OPTIMIZER_FLAGS = {"AdamW": "--optimizer adamw", "GaLoreAdamW": "--optimizer galore"}


class OptimizerPart:
    """The optimizer's state dict, with GaLore projector objects stored as plain dicts (so the file
    loads with torch.load(weights_only=True)) and the optimizer's kind, checked on load."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: torch.nn.Module | None = None):
        self.optimizer, self.model = optimizer, model

    @property
    def sharded(self) -> bool:
        return self.model is not None and is_sharded(self.model)

    def dcp_state_dict(self) -> dict:
        """Keyed by parameter name (any sharding can load it); the state is created if not yet there."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap_model(self.model), self.optimizer)

    def load_dcp_state_dict(self, state: dict, kind: str) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        self._check_kind(kind)
        set_optimizer_state_dict(unwrap_model(self.model), self.optimizer, state)

    def _check_kind(self, saved: str) -> None:
        if saved != self.kind:
            raise CheckpointError(f"the checkpoint was trained with {saved} ({OPTIMIZER_FLAGS.get(saved, saved)}), this "
                                  f"run uses {self.kind}; resume with the same optimizer")

    @property
    def kind(self) -> str:
        cls = type(self.optimizer)  # galore_torch's class is also called AdamW
        return "GaLoreAdamW" if cls.__module__.startswith("galore_torch") else cls.__name__

    def state_dict(self) -> dict:
        if self.sharded:
            return {**self.dcp_state_dict(), "kind": self.kind}
        sd = self.optimizer.state_dict()
        state = {}
        for k, s in sd["state"].items():
            if "projector" in s:
                s = {**s, "projector": {f: getattr(s["projector"], f) for f in PROJECTOR_FIELDS}}
            state[k] = s
        return {**sd, "state": state, "kind": self.kind}

    def load_state_dict(self, sd: dict) -> None:
        self._check_kind(sd.get("kind", self.kind))
        if self.sharded:
            raise CheckpointError("this checkpoint was written by a run without --fsdp; resume it without --fsdp "
                                  "(or start from its weights with --init_from)")
        # Projector dicts are put back by hand: load_state_dict would mangle their strings (it casts
        # every iterable in the state).
        projectors = {k: s["projector"] for k, s in sd["state"].items() if isinstance(s.get("projector"), dict)}
        state = {k: {n: v for n, v in s.items() if n != "projector"} for k, s in sd["state"].items()}
        try:
            self.optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({str(e)[:100]}); "
                                  "resume with the optimizer settings the run was started with")
        if projectors:
            self._restore_projectors(projectors)

    def _restore_projectors(self, projectors: dict) -> None:
        from galore_torch.galore_projector import GaLoreProjector

        params = [p for g in self.optimizer.param_groups for p in g["params"]]  # state dict keys index this list
        for k, d in projectors.items():
            proj = GaLoreProjector(d["rank"], update_proj_gap=d["update_proj_gap"], scale=d["scale"],
                                   proj_type=d["proj_type"])
            m = d["ortho_matrix"]
            proj.ortho_matrix = m.to(params[k].device) if torch.is_tensor(m) else m
            self.optimizer.state[params[k]]["projector"] = proj


class ScalerPart:
    """The fp16 loss scale and its growth counter ({} when loss scaling is off)."""

    def __init__(self, scaler: torch.amp.GradScaler):
        self.scaler = scaler

    def state_dict(self) -> dict:
        return self.scaler.state_dict() if self.scaler.is_enabled() else {}

    def load_state_dict(self, state: dict) -> None:
        if state and self.scaler.is_enabled():  # a bf16/fp32 checkpoint resumed in fp16 starts a fresh scale
            self.scaler.load_state_dict(state)


class RNGPart:
    """Every rank's RNG states, gathered to rank 0 on save (a collective: all ranks call state_dict)
    and handed back to each rank on load when the world size is unchanged."""

    def __init__(self, rank: int = 0, world_size: int = 1, log: Callable[[str], None] = print):
        self.rank, self.world_size, self.log = rank, world_size, log

    def state_dict(self) -> dict:
        mine = capture_rng_state()
        if self.world_size == 1:
            return {"per_rank": [mine]}
        import torch.distributed as dist

        gathered = [None] * self.world_size if self.rank == 0 else None
        dist.gather_object(mine, gathered, dst=0)
        return {"per_rank": gathered}

    def load_state_dict(self, state: dict) -> None:
        per_rank = state["per_rank"]
        if len(per_rank) == self.world_size:
            restore_rng_state(per_rank[self.rank])
        elif self.rank == 0:
            self.log(f"note: the checkpoint has RNG states for {len(per_rank)} process(es), this run has "
                     f"{self.world_size}: dropout continues from freshly seeded generators")


class DictPart:
    """A plain dict (the run's identity and settings): saved as is, loaded into `.loaded`."""

    def __init__(self, values: dict):
        self.values, self.loaded = values, None

    def state_dict(self) -> dict:
        return dict(self.values)

    def load_state_dict(self, state: dict) -> None:
        self.loaded = state


SHARDED_PARTS = ("model", "optimizer")  # written by torch.distributed.checkpoint in a sharded checkpoint
SHARDED_STATE, SHARDED_DONE = "state.pt", "complete.json"


class CheckpointState:
    """One checkpoint's content: named parts, each saved and loaded by itself. The file holds a header
    (format, model config, step, tokens, run id: enough to inspect, order or prune it without
    loading the rest), every part under its name, and a checksum of all of it."""

    def __init__(self, config: GPTConfig, run_id: str, **parts: Stateful):
        self.config, self.run_id, self.parts = config, run_id, parts

    def state_dict(self) -> dict:
        """Calls every part's state_dict on every rank (some parts gather across ranks)."""
        payload = {name: part.state_dict() for name, part in self.parts.items()}
        progress = payload.get("progress", {})
        return {"format": CHECKPOINT_FORMAT, "config": self.config.to_dict(), "run_id": self.run_id,
                "step": progress.get("step", 0), "tokens_seen": progress.get("tokens_seen", 0),
                "saved_at": time.time(), **payload}

    def load_state_dict(self, ckpt: dict) -> None:
        check_config_matches(ckpt["config"], self.config)
        sharded = SHARDED_PARTS if ckpt.get("sharded") else ()
        missing = [name for name in self.parts if name not in ckpt and name not in sharded]
        if missing:
            raise CheckpointError(f"the checkpoint has no {', '.join(missing)} state (a weights-only file?); "
                                  "use --init_from to start from its weights")
        if sharded:
            self._load_shards(ckpt)
        for name, part in self.parts.items():
            if name not in sharded:
                part.load_state_dict(ckpt[name])

    def _load_shards(self, ckpt: dict) -> None:
        """Model and optimizer of a sharded checkpoint, read by torch.distributed.checkpoint into this
        run's own layout: the same or another number of ranks, sharded or whole."""
        template = {name: self.parts[name].dcp_state_dict() for name in SHARDED_PARTS if name in self.parts}
        if "optimizer" in template:
            self.parts["optimizer"]._check_kind(ckpt.get("optimizer_kind", self.parts["optimizer"].kind))
        dcp_load(template, ckpt["sharded"])
        self.parts["model"].load_dcp_state_dict(template["model"])
        if "optimizer" in template:
            self.parts["optimizer"].load_dcp_state_dict(template["optimizer"], ckpt.get("optimizer_kind"))


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


def is_plain_name(name: str) -> bool:
    """A file name that stays in its folder: no separators, not '.', '..' or empty, no NUL."""
    return bool(name) and name not in (".", "..") and "/" not in name and "\\" not in name and "\0" not in name


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


def save_checkpoint(path, checkpoint: dict) -> Path:
    """Write a checkpoint dict atomically, with the checksum of its content added."""
    checkpoint = {**checkpoint, "checksum": payload_checksum(checkpoint)}
    try:
        return atomic_write(path, lambda f: torch.save(checkpoint, f))
    except OSError as e:
        hint = "free some space" if e.errno == errno.ENOSPC else "check the folder"
        raise RunFailure(f"could not write checkpoint {path} ({os_reason(e)}); {hint}, then continue with --resume auto")


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
        raise RunFailure(f"could not write checkpoint {final} ({os_reason(e)}); free some space or check the folder, "
                         "then continue with --resume auto")
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


# ----------------------------------------------------------------------------------------------
# The lock


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class FolderLock:
    """An exclusive claim on a folder: a lock file holding the holder's pid, host and start time,
    locked with flock while the holder lives (the kernel drops it when the process dies, so a lock
    left by a killed run on this host is stale at once). A lock file from another host is stale when
    its heartbeat (the file's mtime, touched every 30 s by a thread) is older than `stale_after`."""

    HEARTBEAT_S = 30.0

    def __init__(self, path: Path, what: str = "folder", stale_after: float = 300.0):
        self.path, self.what, self.stale_after = Path(path), what, stale_after
        self.fd: int | None = None
        self._stop = threading.Event()

    def acquire(self) -> FolderLock:
        for _ in range(3):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, file_mode())
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise UserError(self._held_message())
            if self._same_file(fd) and self._not_held_elsewhere(fd):
                self._claim(fd)
                return self
            os.close(fd)  # the file was replaced or removed while we opened it: try again
        raise UserError(self._held_message())

    def _same_file(self, fd: int) -> bool:
        try:
            return os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            return False

    def _not_held_elsewhere(self, fd: int) -> bool:
        """flock cannot see a holder on another host (network filesystems): trust its heartbeat."""
        info = self._read_info(fd)
        if not info or info.get("host") == socket.gethostname():
            return True
        age = time.time() - os.fstat(fd).st_mtime
        if age < self.stale_after:
            os.close(fd)
            raise UserError(self._held_message(info) + f" (it was alive {age:.0f}s ago; a lock older than "
                            f"{self.stale_after:.0f}s without a heartbeat counts as stale)")
        return True

    @staticmethod
    def _read_info(fd: int) -> dict | None:
        try:
            os.lseek(fd, 0, os.SEEK_SET)
            return json.loads(os.read(fd, 4096).decode() or "null")
        except (OSError, ValueError):
            return None

    def _claim(self, fd: int) -> None:
        info = {"pid": os.getpid(), "host": socket.gethostname(), "started": time.strftime("%Y-%m-%d %H:%M:%S")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, json.dumps(info).encode())
        os.fsync(fd)
        self.fd = fd
        threading.Thread(target=self._heartbeat, name="lock-heartbeat", daemon=True).start()

    def _heartbeat(self) -> None:
        while not self._stop.wait(self.HEARTBEAT_S):
            with contextlib.suppress(OSError):
                os.utime(self.path)

    def _held_message(self, info: dict | None = None) -> str:
        if info is None:
            with contextlib.suppress(OSError):
                fd = os.open(self.path, os.O_RDONLY)
                info = self._read_info(fd)
                os.close(fd)
        who = (f"pid {info.get('pid')} on {info.get('host')} since {info.get('started')}" if isinstance(info, dict)
               else "another process")
        return (f"{self.path.parent} is in use by {who} ({self.path} is locked); wait for that {self.what} to end, "
                f"or use another folder")

    def clear_if_stale(self) -> None:
        """Remove a lock file whose holder is gone (left by a killed process); a live holder keeps it."""
        if self.path.exists():
            with contextlib.suppress(UserError):
                self.acquire().release()

    def release(self) -> None:
        if self.fd is None:
            return
        self._stop.set()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        os.close(self.fd)  # closing drops the flock
        self.fd = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc):
        self.release()


# ----------------------------------------------------------------------------------------------
# The run folder


@dataclass
class ResumePoint:
    path: Path
    checkpoint: dict  # loaded and verified


def new_run_id() -> str:
    return uuid.uuid4().hex[:8]  # also the W&B run id: 8 characters of [a-z0-9], as W&B makes them


class RunFolder:
    """The folder one run owns. `claim()` (main rank only) locks it, checks it holds no other run,
    resolves --resume once and records the run's identity in run.json."""

    def __init__(self, directory, keep_last: int = 3, log: Callable[[str], None] = print):
        self.dir, self.keep_last, self.log = Path(directory), keep_last, log
        self.lock = FolderLock(self.dir / LOCK_FILE, what="run")
        self.run_id: str | None = None
        self.resume_point: ResumePoint | None = None

    # -- claiming -----------------------------------------------------------------------------

    def claim(self, script: str, settings: dict, resume: str | None = None, overwrite: bool = False,
              checkpoint_bytes: int = 0) -> RunFolder:
        self._make_dir()
        self.lock.acquire()
        try:
            self._claim_locked(script, settings, resume, overwrite, checkpoint_bytes)
        except BaseException:
            self.lock.release()
            raise
        return self

    def _make_dir(self) -> None:
        if self.dir.exists() and not self.dir.is_dir():
            raise UserError(f"run folder {self.dir} is a file; pick a folder with --run_dir")
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise UserError(f"cannot create run folder {self.dir} ({os_reason(e)}); pick another --run_dir")

    def _claim_locked(self, script, settings, resume, overwrite, checkpoint_bytes) -> None:
        for p in remove_stale_temps(self.dir, lambda n: bool(CKPT_RE.match(n)) or n in RUN_OUTPUTS):
            self.log(f"removed {p.name}, a temp file left by a killed run")
        self._recover_sharded_folders()
        info = self.read_info()
        if resume:
            self.resume_point = self._resolve_resume(resume, info, overwrite)
        if self.resume_point is None:
            info = self._clear_for_new_run(info, overwrite)
        self.run_id = self._run_id(info)
        self._check_space(checkpoint_bytes)
        record = {"format": RUN_FORMAT, "run_id": self.run_id, "script": script, "settings": settings,
                  "created": (info or {}).get("created", time.strftime("%Y-%m-%d %H:%M:%S"))}
        try:
            write_json(self.dir / RUN_FILE, record)  # also the probe that the folder is writable
        except OSError as e:
            raise UserError(f"cannot write to run folder {self.dir} ({os_reason(e)}); pick another --run_dir")

    def _recover_sharded_folders(self) -> None:
        """Folders a killed run left while writing or replacing a sharded checkpoint: a sealed one
        (complete.json is written last) whose final name is free takes that name; the rest of this
        run's .ckpt_*.tmp/.old folders are removed."""
        for p in sorted(self.dir.iterdir(), key=lambda p: (not p.name.endswith(".tmp"), p.name)):  # new before old
            m = re.match(r"^\.(ckpt_\d{8})\.(tmp|old)$", p.name)
            if not (m and p.is_dir()):
                continue
            final = self.dir / m[1]
            if not final.exists() and (p / SHARDED_DONE).is_file():
                os.replace(p, final)
                self.log(f"completed {final.name} from {p.name}, left by a killed run")
            else:
                shutil.rmtree(p)
                self.log(f"removed {p.name}, an unfinished checkpoint folder left by a killed run")

    def _clear_for_new_run(self, info: dict | None, overwrite: bool) -> None:
        """A new run needs a folder without another run's checkpoints (refused unless --overwrite);
        the logs of a run that never saved a checkpoint are moved aside, so they do not mix."""
        if any(CKPT_RE.match(p.name) for p in self.dir.iterdir()) and not overwrite:
            raise UserError(self._taken_message(info))
        if self._run_outputs():
            self.move_aside(info)
        return None

    def _run_id(self, info: dict | None) -> str:
        if self.resume_point is not None and self.resume_point.checkpoint.get("run_id"):
            return self.resume_point.checkpoint["run_id"]
        return (info or {}).get("run_id") or new_run_id()

    def _taken_message(self, info: dict | None) -> str:
        steps = sorted(self.checkpoint_steps())
        what = f"run {info['run_id']}" if info else "files of an earlier run"
        at = f" (checkpoints up to step {steps[-1]})" if steps else ""
        return (f"{self.dir} already holds {what}{at}; continue it with --resume auto, start this run in a new "
                "--run_dir, or add --overwrite to move its files aside")

    def _run_outputs(self) -> list[Path]:
        return [p for p in self.dir.iterdir() if p.name in RUN_OUTPUTS or CKPT_RE.match(p.name)]

    def read_info(self) -> dict | None:
        path = self.dir / RUN_FILE
        if not path.is_file():
            return None
        try:
            info = json.loads(path.read_text())
        except (OSError, ValueError):
            info = None
        if not isinstance(info, dict) or info.get("format") != RUN_FORMAT or not info.get("run_id"):
            raise UserError(f"{path} is damaged or not written by this toolkit; move it away, or pick another --run_dir")
        return info

    def _check_space(self, nbytes: int) -> None:
        free = shutil.disk_usage(self.dir).free
        if nbytes and free < 1.1 * nbytes:
            raise UserError(f"only {free / 2**30:.2f} GiB free in {self.dir}, a checkpoint of this run needs about "
                            f"{nbytes / 2**30:.2f} GiB; free some space or pick another --run_dir")

    # -- resuming -----------------------------------------------------------------------------

    def _resolve_resume(self, resume: str, info: dict | None, overwrite: bool) -> ResumePoint | None:
        if resume == "auto":
            point = self._latest_valid(info)
            if point is None:
                self.log(f"no checkpoint in {self.dir} yet: starting from scratch")
                return None
        else:
            path = Path(resume)
            point = ResumePoint(path, load_checkpoint(path))
        own = info["run_id"] if info else point.checkpoint.get("run_id")
        if info and point.checkpoint.get("run_id") not in (info["run_id"], None) and self.checkpoint_steps(own):
            if not overwrite:
                raise UserError(f"{point.path} belongs to run {point.checkpoint.get('run_id')}, {self.dir} to run "
                                f"{info['run_id']}; resume it in its own folder, or add --overwrite to move this "
                                "folder's files aside")
            self.move_aside(info)
            return point
        newer = [s for s in self.checkpoint_steps(own) if s > point.checkpoint["step"]]
        if newer:
            if not overwrite:
                raise UserError(f"{self.dir} holds newer checkpoints of this run (step {', '.join(map(str, newer))}) that "
                                f"resuming from step {point.checkpoint['step']} would overwrite; resume with --resume "
                                "auto, or add --overwrite to move the newer ones aside")
            self.move_aside(info, only=[p for s, p in self.checkpoints(own) if s > point.checkpoint["step"]])
        return point

    def latest_valid(self) -> ResumePoint | None:
        """What --resume auto picks here: the newest valid checkpoint of this folder's run."""
        return self._latest_valid(self.read_info())

    def _latest_valid(self, info: dict | None) -> ResumePoint | None:
        """The newest checkpoint of this folder's run that loads and matches its checksum. Damaged
        newer ones are named and, since training will pass their step again, renamed to *.damaged
        (kept, never deleted); when none loads, nothing is touched and the run stops."""
        own = info["run_id"] if info else None
        candidates = self.checkpoints(own, include_unreadable=True)
        damaged = []
        for _, path in reversed(candidates):
            try:
                point = ResumePoint(path, load_checkpoint(path))
            except CheckpointError as e:
                damaged.append((path, str(e)))
                continue
            for bad, why in damaged:
                os.replace(bad, bad.with_name(bad.name + ".damaged"))
                self.log(f"warning: skipping {why}; kept it as {bad.name}.damaged")
            return point
        if damaged:
            raise CheckpointError(f"no checkpoint in {self.dir} can be loaded ({len(damaged)} damaged; the newest: "
                                  f"{damaged[0][1]}); start a new --run_dir, or start over here with --overwrite "
                                  "instead of --resume")
        return None

    # -- checkpoints ----------------------------------------------------------------------------

    def path_for(self, step: int) -> Path:
        return self.dir / f"ckpt_{step:08d}.pt"

    def checkpoints(self, run_id: str | None = None, include_unreadable: bool = False) -> list[tuple[int, Path]]:
        """(step, path) of the checkpoints here, oldest first by the step recorded inside, of run
        `run_id` only when given. Files whose header cannot be read are left out (and left alone)
        unless `include_unreadable` (then ordered by the step in their name)."""
        found = []
        for p in self.dir.iterdir() if self.dir.is_dir() else ():
            if not CKPT_RE.match(p.name):
                continue
            try:
                head = checkpoint_header(p)
            except CheckpointError:
                if include_unreadable:  # in this run's folder, so presumably its own: resume names it as damaged
                    found.append((int(CKPT_RE.match(p.name).group(1)), 0.0, p))
                continue
            if run_id is None or head.get("run_id") == run_id:  # a file without a run id is nobody's to prune
                found.append((int(head["step"]), float(head.get("saved_at") or 0), p))
        return [(s, p) for s, _, p in sorted(found)]

    def checkpoint_steps(self, run_id: str | None = None) -> list[int]:
        return [s for s, _ in self.checkpoints(run_id)]

    def save(self, checkpoint: dict) -> Path:
        """Write this run's checkpoint, then (once it is durable) prune this run's older ones."""
        path = self.path_for(checkpoint["step"])
        self._make_way(path)
        path = save_checkpoint(path, checkpoint)
        self.prune(keep=path)
        return path

    def save_sharded(self, checkpoint: dict, rank: int) -> Path:
        """The same for a sharded checkpoint (a folder); every rank calls it, rank 0 prunes."""
        path = self.dir / f"ckpt_{checkpoint['step']:08d}"
        if rank == 0:
            self._make_way(path)
        path = save_sharded(path, checkpoint, rank)
        if rank == 0:
            self.prune(keep=path)
        return path

    def _make_way(self, path: Path) -> None:
        """A file or folder at a checkpoint's name that is not this run's (another run's, a weights
        file put there by hand, an unreadable one) is moved aside, never written over."""
        for other in (path, path.with_suffix("") if path.suffix == ".pt" else path.with_name(path.name + ".pt")):
            if not other.exists():
                continue
            try:
                mine = checkpoint_header(other).get("run_id") == self.run_id
            except CheckpointError:
                mine = False
            if not mine:
                self.move_aside(None, only=[other], label="not-this-run")

    def prune(self, keep: Path) -> list[Path]:
        """Keep this run's `keep_last` newest checkpoints by recorded step, `keep` (the one just
        written) always among them; other runs' files and unreadable ones are not touched."""
        if self.keep_last <= 0:
            return []
        mine = [p for _, p in self.checkpoints(self.run_id) if p != keep]
        doomed = mine[: max(0, len(mine) - (self.keep_last - 1))]
        for p in doomed:
            shutil.rmtree(p) if p.is_dir() else p.unlink(missing_ok=True)
        return doomed

    # -- moving aside ---------------------------------------------------------------------------

    def move_aside(self, info: dict | None, only: list[Path] | None = None, label: str | None = None) -> Path:
        """Move a previous run's files (or `only` these) into a new folder previous/<run>-<time>[-N]/;
        nothing is deleted or written over."""
        label = label or (info or {}).get("run_id") or "earlier"
        base = self.dir / "previous" / f"{label}-{time.strftime('%Y%m%d-%H%M%S')}"
        dest, n = base, 1
        while dest.exists():
            n += 1
            dest = base.with_name(f"{base.name}-{n}")
        dest.mkdir(parents=True)
        for p in only if only is not None else self._run_outputs():
            os.replace(p, dest / p.name)
        what = ", ".join(p.name for p in only) if only is not None else "the earlier run"
        self.log(f"moved {what} aside to {dest}")
        return dest

    def release(self) -> None:
        self.lock.release()
