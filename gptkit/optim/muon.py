"""Muon for the transformer blocks' matrices, AdamW for the rest (embeddings, the tied head, biases
and LayerNorms): the recipe behind the fastest public GPT-2 training runs. Muon is PyTorch's own
torch.optim.Muon (momentum, then the update orthogonalised by Newton-Schulz iterations), with the
iterations in fp32 where the device has no native bf16 (torch's always cast to bf16: emulated on most
CPUs, 20x slower than fp32 and most of a small model's step). Both parts follow the LR schedule: Muon's
groups run at --muon_lr / --lr times the scheduled LR."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from gptkit.config import above, at_least, setting
from gptkit.errors import CheckpointError, UserError
from gptkit.model import block_matrices
from gptkit.optim import OptimArgs, OptimizerSpec, adamw_state_bytes, decay_groups, register_optimizer, trainable
from gptkit.runtime import native_bf16


@dataclass
class MuonConfig:
    lr: float = setting(0.01, "Muon's peak learning rate for the blocks' matrices (the schedule scales it as it "
                              "scales --lr)", check=(above(0), "a number > 0"))
    momentum: float = setting(0.95, "Muon's momentum", check=(lambda v: 0 <= v < 1, "in [0, 1)"))
    nesterov: bool = setting(True, "Nesterov momentum for Muon")
    ns_steps: int = setting(5, "Newton-Schulz iterations per Muon update", check=(at_least(1), "at least 1"))
    weight_decay: float = setting(0.0, "Muon's decoupled weight decay (multiplied by its LR, as torch.optim.Muon does)",
                                  check=(at_least(0), "a finite number >= 0"))
    adjust_lr: str = setting("original", "how Muon scales its LR by matrix shape: original (Keller Jordan's, "
                                         "sqrt(max(1, rows/cols))) or match_rms_adamw (Moonshot's)",
                             choices=("original", "match_rms_adamw"))
    ns_dtype: str = setting("auto", "precision of the Newton-Schulz iterations: bf16 (torch.optim.Muon's), fp32, "
                                    "or auto (bf16 where the device computes bf16 natively, fp32 elsewhere)",
                            choices=("auto", "bf16", "fp32"))
    embed_lr: float | None = setting(None, "peak LR of the token (and position) embedding, in Muon's AdamW part "
                                           "(default: --lr)", check=(above(0), "a number > 0"))
    head_lr: float | None = setting(None, "peak LR of an untied output head, in Muon's AdamW part (default: --lr)",
                                    check=(above(0), "a number > 0"))


def orthogonalise(g: torch.Tensor, coefficients: tuple[float, float, float], steps: int, eps: float,
                  dtype: torch.dtype) -> torch.Tensor:
    """Newton-Schulz's quintic iteration towards the nearest semi-orthogonal matrix of g (rows, cols),
    as torch.optim.Muon computes it, in `dtype`: X <- aX + (bA + cA^2)X with A = XX^T, on the wide side."""
    a, b, c = coefficients
    x = g.to(dtype)
    wide = x.T if g.size(0) > g.size(1) else x  # (short, long): A is short x short
    wide = wide / wide.norm().clamp(min=eps)  # spectral norm <= Frobenius norm <= 1
    for _ in range(steps):
        gram = wide @ wide.T
        wide = torch.addmm(wide, torch.addmm(gram, gram, gram, beta=b, alpha=c), wide, beta=a)
    return wide.T if g.size(0) > g.size(1) else wide


class Muon(torch.optim.Muon):
    """torch.optim.Muon (same groups, state and update) whose Newton-Schulz iterations run in `ns_dtype`;
    with bf16 it is torch's own step."""

    def __init__(self, params, ns_dtype: torch.dtype, **kwargs):
        super().__init__(params, **kwargs)
        self.ns_dtype = ns_dtype

    @torch.no_grad()
    def step(self, closure=None):
        if self.ns_dtype == torch.bfloat16:
            return super().step(closure)
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        self.step_in(self.ns_dtype)
        return loss

    @torch.no_grad()
    def step_in(self, ns_dtype: torch.dtype) -> None:
        """One update with the iterations in ns_dtype (torch's step, written out)."""
        for group in self.param_groups:
            for p in (p for p in group["params"] if p.grad is not None):
                grad = p.grad
                buf = self.state[p].setdefault("momentum_buffer", torch.zeros_like(grad))
                buf.lerp_(grad, 1 - group["momentum"])
                update = grad.lerp(buf, group["momentum"]) if group["nesterov"] else buf
                update = orthogonalise(update, group["ns_coefficients"], group["ns_steps"], group["eps"], ns_dtype)
                lr = float(group["lr"])
                p.mul_(1 - lr * group["weight_decay"])
                p.add_(update.to(p.dtype), alpha=-lr * shape_ratio(group["adjust_lr_fn"], p.shape))


def shape_ratio(adjust: str | None, shape) -> float:
    """torch.optim.Muon's LR factor for a (rows, cols) matrix: Keller Jordan's sqrt(max(1, rows/cols)) or
    Moonshot's 0.2 sqrt(max(rows, cols))."""
    rows, cols = shape[:2]
    return 0.2 * math.sqrt(max(rows, cols)) if adjust == "match_rms_adamw" else math.sqrt(max(1, rows / cols))


class OptimizerChain:
    """Several torch optimizers stepped as one, over disjoint parameters: their param_groups and state
    are seen together (the LR schedule, gradient scaling and clipping work on them as on one optimizer)
    and their state dicts are saved and loaded side by side under their names."""

    def __init__(self, **optimizers: torch.optim.Optimizer):
        self.optimizers = optimizers

    @property
    def param_groups(self) -> list[dict]:
        return [g for o in self.optimizers.values() for g in o.param_groups]

    @property
    def state(self) -> dict:
        """Every part's per-parameter state, read together (a merged copy: write through the parts)."""
        merged = {}
        for o in self.optimizers.values():
            merged.update(o.state)
        return merged

    def step(self, closure=None) -> None:
        for o in self.optimizers.values():
            o.step()

    def zero_grad(self, set_to_none: bool = True) -> None:
        for o in self.optimizers.values():
            o.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict:
        return {name: o.state_dict() for name, o in self.optimizers.items()}

    def load_state_dict(self, sd: dict) -> None:
        missing = [name for name in self.optimizers if name not in sd]
        if missing:
            raise CheckpointError(f"the checkpoint's optimizer state has no {', '.join(missing)} part; resume with the "
                                  "optimizer the run was started with")
        for name, o in self.optimizers.items():
            try:
                o.load_state_dict(sd[name])
            except (ValueError, KeyError, RuntimeError) as e:
                raise CheckpointError(f"the checkpoint's {name} state does not fit this optimizer ({str(e)[:100]}); "
                                      "resume with the optimizer settings the run was started with")


def build(model: torch.nn.Module, args: OptimArgs, config: MuonConfig, device: torch.device) -> OptimizerChain:
    named = trainable(model)
    matrices = block_matrices(named)
    ids = {id(p) for _, p in matrices}
    if not matrices:
        raise UserError("--optimizer muon found no matrices in the transformer blocks to optimise")
    native = native_bf16(device)
    ns_dtype = torch.bfloat16 if config.ns_dtype == "bf16" or (config.ns_dtype == "auto" and native) else torch.float32
    muon = Muon([p for _, p in matrices], ns_dtype, lr=config.lr, weight_decay=config.weight_decay,
                            momentum=config.momentum, nesterov=config.nesterov, ns_steps=config.ns_steps,
                            adjust_lr_fn=config.adjust_lr)
    for g in muon.param_groups:
        g["lr_scale"] = config.lr / args.lr  # the schedule sets lr = scheduled lr x lr_scale
    fused = device.type == "cuda" and all(p.device.type == "cuda" for _, p in named)
    adamw = torch.optim.AdamW(adamw_groups([(n, p) for n, p in named if id(p) not in ids], args, config),
                              lr=args.lr, betas=(args.beta1, args.beta2), fused=fused or None)
    return OptimizerChain(muon=muon, adamw=adamw)


EMBEDDINGS = ("wte.weight", "wpe.weight")


def adamw_groups(named: list, args: OptimArgs, config: MuonConfig) -> list[dict]:
    """The AdamW part's groups: the embeddings at --muon_embed_lr and an untied head at --muon_head_lr
    when given (each a group with its lr_scale), the rest with decay on matrices only, at --lr."""
    groups = []
    for names, lr in ((EMBEDDINGS, config.embed_lr), (("lm_head.weight",), config.head_lr)):
        chosen = [p for n, p in named if n in names] if lr is not None else []
        if chosen:
            groups.append({"params": chosen, "weight_decay": args.weight_decay, "lr": lr, "lr_scale": lr / args.lr})
            named = [(n, p) for n, p in named if n not in names]
    return groups + decay_groups(named, args.weight_decay)


def state_bytes(shapes: dict, config) -> int:
    """One fp32 momentum buffer per Muon matrix; AdamW's state for everything else."""
    matrices = {n for n, _ in block_matrices((n, torch.empty(s, device="meta")) for n, s in shapes.items())}
    return (sum(4 * math.prod(s) for n, s in shapes.items() if n in matrices)
            + adamw_state_bytes({n: s for n, s in shapes.items() if n not in matrices}))


register_optimizer(OptimizerSpec(
    "muon", "Muon (torch.optim.Muon) on the blocks' matrices, AdamW on embeddings, head, biases and LayerNorms",
    build, state_bytes, kind="Muon+AdamW", config=MuonConfig,
    fsdp="--optimizer muon orthogonalises whole matrices and cannot run on FSDP shards; use DDP (torchrun without "
         "--fsdp), or --optimizer adamw with --fsdp"))
