"""Optimizers, pluggable: each is an OptimizerSpec in a file of its own, registered once, chosen with
`--optimizer NAME` in both training scripts. A spec supplies everything the rest of the toolkit asks
of an optimizer: its own settings (flags --NAME_FIELD), how to build it for a model, the bytes of state
it keeps (for the memory planner and the checkpoint size), how its state is saved and loaded (plain
data only: checkpoints load with weights_only=True), and whether it works on FSDP shards.

How to add an optimizer: copy examples/plugins/lion.py (a `build(model, args, config, device)` and a
`register_optimizer(OptimizerSpec(...))` call) and load it with `--plugin FILE`; nothing in the
toolkit changes (DESIGN.md has the recipe). One that ships with the toolkit is listed in BUILTIN.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from gptkit.config import at_least, between, setting
from gptkit.registry import Registry


@dataclass
class OptimArgs:
    """The settings every optimizer shares (AdamW's, and those of the AdamW part of the others)."""
    optimizer: str = setting("adamw", "the optimizer (see the list of names and their own flags below)")
    lr: float = setting(5e-4, "(peak) learning rate", check=(lambda v: math.isfinite(v) and v > 0, "a number > 0"))
    weight_decay: float = setting(0.1, "decoupled weight decay on 2-D weights (matrices and embeddings)",
                                  check=(at_least(0), "a finite number >= 0"))
    beta1: float = setting(0.9, "AdamW beta1", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    beta2: float = setting(0.95, "AdamW beta2", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    max_grad_norm: float = setting(1.0, "clip gradients to this norm (0: no clipping; the norm is always logged)",
                                   check=(at_least(0), "a finite number >= 0 (0: no clipping)"))


def _no_extra(optimizer) -> int:
    return 0


@dataclass(frozen=True)
class OptimizerSpec:
    name: str  # --optimizer NAME; its settings are flags --NAME_FIELD
    help: str
    build: Callable[[torch.nn.Module, OptimArgs, Any, torch.device], Any]  # (model, args, config, device) -> optimizer
    state_bytes: Callable[[dict, Any], int]  # (parameter shapes by name, config) -> bytes of state after a step
    kind: str  # what checkpoints record, and a resume checks
    config: type | None = None  # a dataclass of its own settings
    fsdp: str | None = None  # None: works on FSDP shards; else why not, in one line
    saves_memory: bool = False  # the planner may suggest it when a run does not fit
    to_plain: Callable[[dict], dict] = field(default=lambda sd: sd)  # its state_dict as plain data
    load_plain: Callable[[Any, dict], None] | None = None  # restore from plain data (default: load_state_dict)
    extra_state_bytes: Callable[[Any], int] = _no_extra  # measured state not held as tensors in .state


OPTIMIZERS: Registry[OptimizerSpec] = Registry("optimizer", selector="optimizer")
register_optimizer = OPTIMIZERS.add  # register_x(spec): one line in the component's own file
optimizer_spec = OPTIMIZERS.spec  # the spec of a name, or one error line listing the names


def spec_of_kind(kind: str) -> OptimizerSpec | None:
    return next((s for s in OPTIMIZERS.values() if s.kind == kind), None)


def adamw_state_bytes(shapes: dict) -> int:
    """AdamW's two fp32 moments per element and its fp32 step counter per tensor."""
    return sum(8 * math.prod(s) + 4 for s in shapes.values())


def measured_state_bytes(optimizer, spec: OptimizerSpec | None = None) -> int:
    """Bytes of optimizer state held right now: every tensor in its state, plus what the spec counts apart."""
    total = sum(v.numel() * v.element_size() for s in optimizer.state.values() for v in s.values() if torch.is_tensor(v))
    return total + (spec.extra_state_bytes(optimizer) if spec else 0)


def decay_groups(named: list[tuple[str, torch.nn.Parameter]], weight_decay: float) -> list[dict]:
    """Weight decay on the 2-D tensors (matrices, the tied embedding and the position embedding, as
    nanoGPT), none on biases and LayerNorm gains and shifts, as in GPT-2/3 training."""
    return [{"params": [p for _, p in named if p.dim() >= 2], "weight_decay": weight_decay},
            {"params": [p for _, p in named if p.dim() < 2], "weight_decay": 0.0}]


def trainable(model: torch.nn.Module) -> list[tuple[str, torch.nn.Parameter]]:
    """(name, parameter) of the plain model's trainable parameters, tied ones once."""
    from gptkit.model import unwrap_model

    return list({n: p for n, p in unwrap_model(model).named_parameters() if p.requires_grad}.items())


def build_optimizer(model: torch.nn.Module, args: OptimArgs, config, device: torch.device):
    spec = optimizer_spec(args.optimizer)
    return spec.build(model, args, config, device)


BUILTIN = ("gptkit.optim.adamw", "gptkit.optim.galore", "gptkit.optim.muon")
__all__ = ["OptimArgs", "OptimizerSpec", "OPTIMIZERS", "register_optimizer", "optimizer_spec", "build_optimizer",
           "measured_state_bytes", "between"]


def _register_builtins() -> None:
    import importlib

    for module in BUILTIN:
        importlib.import_module(module)


_register_builtins()
