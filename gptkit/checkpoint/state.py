"""What a checkpoint holds, as parts that each save and load themselves: model, optimizer, data
position, loss scaler, every rank's RNG, progress and run identity. `CheckpointState` holds them by
name and drives both directions, so nothing can be saved and then forgotten on load."""

from __future__ import annotations

import hashlib
import random
import time
from collections.abc import Callable
from typing import Protocol

import numpy as np
import torch

from gptkit.errors import CheckpointError
from gptkit.model import ARCH_FIELDS, GPTConfig, unwrap_model

CHECKPOINT_FORMAT = "gpt-train-checkpoint/2"
SHARDED_PARTS = ("model", "optimizer")  # written by torch.distributed.checkpoint in a sharded checkpoint

# ----------------------------------------------------------------------------------------------
# Checksums


def payload_checksum(obj) -> str:
    """sha256 over a nested state dict: tensors by dtype, shape and bytes, other values by type and
    repr, dict keys in sorted order. The same state gives the same value on any device."""
    h = hashlib.sha256()
    _feed(h, obj)
    return "sha256:" + h.hexdigest()


def payload_bytes(obj) -> int:
    """Bytes of tensor data in a nested state dict: about the size of its file."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(payload_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(payload_bytes(v) for v in obj)
    return 0


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
# The parts


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


class OptimizerPart:
    """The optimizer's state as plain data (its spec turns objects such as GaLore's projectors into
    dicts, so the file loads with torch.load(weights_only=True)), with the optimizer's kind, checked on
    load. `spec` is its gptkit.optim.OptimizerSpec (None: a plain torch optimizer)."""

    def __init__(self, optimizer, model: torch.nn.Module | None = None, spec=None):
        self.optimizer, self.model, self.spec = optimizer, model, spec

    @property
    def kind(self) -> str:
        return self.spec.kind if self.spec is not None else type(self.optimizer).__name__

    @property
    def sharded(self) -> bool:
        return self.model is not None and is_sharded(self.model)

    def dcp_state_dict(self) -> dict:
        """Keyed by parameter name (any sharding can load it); the state is created if not yet there."""
        from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

        return get_optimizer_state_dict(unwrap_model(self.model), self.optimizer)

    def load_dcp_state_dict(self, state: dict, kind: str) -> None:
        from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

        self.check_kind(kind)
        set_optimizer_state_dict(unwrap_model(self.model), self.optimizer, state)

    def check_kind(self, saved: str) -> None:
        self.check_kind_against(saved, self.kind)

    @staticmethod
    def check_kind_against(saved: str, kind: str) -> None:
        if saved != kind:
            from gptkit.optim import spec_of_kind

            theirs = spec_of_kind(saved)
            flag = f"--optimizer {theirs.name}" if theirs else saved
            raise CheckpointError(f"the checkpoint was trained with {saved} ({flag}), this run uses {kind}; resume "
                                  "with the same optimizer")

    def state_dict(self) -> dict:
        if self.sharded:
            return {**self.dcp_state_dict(), "kind": self.kind}
        sd = self.optimizer.state_dict()
        return {**(self.spec.to_plain(sd) if self.spec is not None else sd), "kind": self.kind}

    def load_state_dict(self, sd: dict) -> None:
        self.check_kind(sd.get("kind", self.kind))
        if self.sharded:
            raise CheckpointError("this checkpoint was written by a run without --fsdp; resume it without --fsdp "
                                  "(or start from its weights with --init_from)")
        sd = {k: v for k, v in sd.items() if k != "kind"}
        if self.spec is not None and self.spec.load_plain is not None:
            self.spec.load_plain(self.optimizer, sd)
            return
        try:
            self.optimizer.load_state_dict(sd)
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({str(e)[:100]}); "
                                  "resume with the optimizer settings the run was started with")


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
            self.parts["optimizer"].check_kind(ckpt.get("optimizer_kind", self.parts["optimizer"].kind))
        from gptkit.checkpoint.store import dcp_load

        dcp_load(template, ckpt["sharded"])
        self.parts["model"].load_dcp_state_dict(template["model"])
        if "optimizer" in template:
            self.parts["optimizer"].load_dcp_state_dict(template["optimizer"], ckpt.get("optimizer_kind"))


