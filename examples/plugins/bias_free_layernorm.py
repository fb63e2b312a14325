"""A user's norm, as a plugin: LayerNorm with a gain and no bias (as in OLMo and PaLM), chosen with
--norm layernorm_nobias; its eps is a setting, --layernorm_nobias_eps, recorded in the checkpoint's
model config. The norm is used wherever the block has one (before attention and the MLP, the final
norm, and each head's queries and keys with --qk_norm).

Copy it and edit it: a NormSpec's `build(cfg, width)` makes a module that normalises the last
dimension, of size `width` (emb_dim, or head_dim for QK-norm); read your settings with part_settings.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.config import above, setting
from gptkit.parts import NORMS, NormSpec, part_settings, register_norm


@dataclass
class NoBiasConfig:
    eps: float = setting(1e-5, "added to the variance", check=(above(0), "a number > 0"))


class BiasFreeLayerNorm(nn.Module):
    def __init__(self, cfg, width: int):
        super().__init__()
        self.eps = part_settings(cfg, NORMS, "layernorm_nobias").eps  # as the checkpoint's model config records it
        self.weight = nn.Parameter(torch.ones(width))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.size(-1),), self.weight, None, self.eps)


register_norm(NormSpec("layernorm_nobias", BiasFreeLayerNorm, "LayerNorm with a gain and no bias",
                       config=NoBiasConfig))
