"""AdamW: GPT-2/3's optimizer, with weight decay on the 2-D weights only, fused on a GPU."""

from __future__ import annotations

import torch

from gptkit.optim import OptimArgs, OptimizerSpec, adamw_state_bytes, decay_groups, register_optimizer, trainable


def make_adamw(model: torch.nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
               device: torch.device | None = None) -> torch.optim.AdamW:
    # One kernel for all parameters: faster on a GPU. Not with FSDP's CPU offload (parameters on the host).
    fused = device is not None and device.type == "cuda" and all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(decay_groups(trainable(model), weight_decay), lr=lr, betas=betas, fused=fused or None)


def build(model: torch.nn.Module, args: OptimArgs, config, device: torch.device) -> torch.optim.AdamW:
    return make_adamw(model, args.lr, args.weight_decay, (args.beta1, args.beta2), device)


register_optimizer(OptimizerSpec("adamw", "AdamW (betas --beta1/--beta2)", build,
                                 lambda shapes, config: adamw_state_bytes(shapes), kind="AdamW"))
