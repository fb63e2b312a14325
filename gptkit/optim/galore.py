"""GaLore-AdamW: AdamW whose moments for the transformer blocks' matrices live in a low-rank
projection of the gradient (galore-torch), for training with less optimizer memory. Projects whole
matrices, so it cannot run on FSDP shards."""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch

from gptkit.config import above, at_least, setting
from gptkit.errors import CheckpointError, UserError
from gptkit.model import block_matrices
from gptkit.optim import OptimArgs, OptimizerSpec, register_optimizer, trainable

PROJECTOR_FIELDS = ("rank", "update_proj_gap", "scale", "proj_type", "ortho_matrix")


@dataclass
class GaLoreConfig:
    rank: int = setting(128, "GaLore projection rank", check=(at_least(1), "at least 1"))
    update_proj_gap: int = setting(200, "steps between GaLore projector updates", check=(at_least(1), "at least 1"))
    scale: float = setting(0.25, "GaLore update scale", check=(above(0), "a finite number > 0"))
    proj_type: str = setting("std", "GaLore projection type", choices=("std", "reverse_std", "left", "right", "full"))


def build(model: torch.nn.Module, args: OptimArgs, config: GaLoreConfig, device: torch.device):
    logging.getLogger("bitsandbytes").setLevel(logging.ERROR)  # galore-torch imports it; its CPU notice is noise
    try:
        from galore_torch import GaLoreAdamW
    except ImportError as e:
        raise UserError(f"--optimizer galore needs the galore-torch package ({e}); pip install -r requirements.txt")
    named = trainable(model)
    projected = {id(p) for _, p in block_matrices(named)}
    rest = [(n, p) for n, p in named if id(p) not in projected]
    groups = [
        {"params": [p for _, p in rest if p.dim() >= 2], "weight_decay": args.weight_decay},
        {"params": [p for _, p in rest if p.dim() < 2], "weight_decay": 0.0},
        {"params": [p for _, p in named if id(p) in projected], "weight_decay": args.weight_decay, "rank": config.rank,
         "update_proj_gap": config.update_proj_gap, "scale": config.scale, "proj_type": config.proj_type},
    ]
    return GaLoreAdamW(groups, lr=args.lr, betas=(args.beta1, args.beta2), no_deprecation_warning=True)


def projected_state_numel(shape: tuple[int, ...], rank: int) -> int:
    """Floats GaLore keeps for one projected (m, n) matrix: the projector, and Adam's two moments of
    the projected gradient (galore_torch's 'std' projection: from the right when m >= n)."""
    m, n = shape
    r = min(rank, m, n)
    return r * n + 2 * m * r if m >= n else m * r + 2 * r * n


def state_bytes(shapes: dict, config: GaLoreConfig | None) -> int:
    """Projected state for the blocks' matrices (its step counters are Python ints); AdamW-like moments
    for the rest."""
    rank = config.rank if config else 128
    matrices = {n for n, _ in block_matrices((n, torch.empty(s, device="meta")) for n, s in shapes.items())}
    return sum(4 * projected_state_numel(s, rank) if n in matrices else 8 * math.prod(s) for n, s in shapes.items())


def to_plain(sd: dict) -> dict:
    """Projector objects as plain dicts, so the checkpoint loads with torch.load(weights_only=True)."""
    state = {}
    for k, s in sd["state"].items():
        if "projector" in s:
            s = {**s, "projector": {f: getattr(s["projector"], f) for f in PROJECTOR_FIELDS}}
        state[k] = s
    return {**sd, "state": state}


def load_plain(optimizer, sd: dict) -> None:
    """Projector dicts are put back by hand: load_state_dict would mangle their strings (it casts
    every iterable in the state)."""
    from galore_torch.galore_projector import GaLoreProjector

    projectors = {k: s["projector"] for k, s in sd["state"].items() if isinstance(s.get("projector"), dict)}
    state = {k: {n: v for n, v in s.items() if n != "projector"} for k, s in sd["state"].items()}
    try:
        optimizer.load_state_dict({"state": state, "param_groups": sd["param_groups"]})
    except (ValueError, KeyError, RuntimeError) as e:
        raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({str(e)[:100]}); "
                              "resume with the optimizer settings the run was started with")
    params = [p for g in optimizer.param_groups for p in g["params"]]  # state dict keys index this list
    for k, d in projectors.items():
        proj = GaLoreProjector(d["rank"], update_proj_gap=d["update_proj_gap"], scale=d["scale"], proj_type=d["proj_type"])
        m = d["ortho_matrix"]
        proj.ortho_matrix = m.to(params[k].device) if torch.is_tensor(m) else m
        optimizer.state[params[k]]["projector"] = proj


def projector_bytes(optimizer) -> int:
    total = 0
    for s in optimizer.state.values():
        proj = s.get("projector")
        if proj is not None and getattr(proj, "ortho_matrix", None) is not None:
            total += proj.ortho_matrix.numel() * proj.ortho_matrix.element_size()
    return total


register_optimizer(OptimizerSpec(
    "galore", "GaLore-AdamW: low-rank projected moments for the blocks' matrices (less memory)", build, state_bytes,
    kind="GaLoreAdamW", config=GaLoreConfig, saves_memory=True, to_plain=to_plain, load_plain=load_plain,
    extra_state_bytes=projector_bytes,
    fsdp="--optimizer galore cannot run on sharded parameters (it projects whole matrices); use --fsdp with adamw, "
         "or GaLore with --activation_checkpointing and bf16 on one GPU"))
