"""GPT-2's LayerNorm: centre, scale to unit variance, then a learned gain (and shift, with biases on)."""

import torch.nn as nn

from gptkit.parts import NormSpec, register_norm


def layernorm(cfg, width: int) -> nn.Module:
    return nn.LayerNorm(width, eps=1e-5, bias=cfg.bias)


register_norm(NormSpec("layernorm", layernorm, "LayerNorm with a learned gain (and shift when --bias)"))
