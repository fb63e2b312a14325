"""A user's step metric, as a plugin: the largest gradient norm of any block. Each rank sums the
squares of its part of each block's gradients; reduce="shards" adds the parts up under FSDP (and
averages the identical whole values under DDP), and finish takes the root of the largest."""

from dataclasses import dataclass

import torch

from gptkit.config import setting
from gptkit.metrics import StepMetric, register_metric


@dataclass
class LayerGradMaxConfig:
    clipped: bool = setting(False, "measure the gradients as clipping leaves them (default: as the backward made them)")


def per_block_squares(ctx) -> torch.Tensor:
    sums = {}
    for name, g in ctx.grads(clipped=ctx.config.clipped):
        if name.startswith("h."):
            block = int(name.split(".")[1])
            sums[block] = sums.get(block, 0.0) + g.float().pow(2).sum()
    return torch.stack([sums[b] for b in sorted(sums)])


register_metric(StepMetric("layer_grad_max", lambda v: f"layer_grad_max {v:.4f}", device=per_block_squares,
                           reduce="shards", finish=lambda t: float(t.max().sqrt()), history="layer_grad_max",
                           config=LayerGradMaxConfig))
