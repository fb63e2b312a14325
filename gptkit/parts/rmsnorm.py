"""RMSNorm (Zhang & Sennrich 2019): scale to unit root-mean-square, no centring; with a learned gain
(Llama, Qwen) or without (nanochat: `--no-rmsnorm_affine`)."""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.config import between, setting
from gptkit.parts import NORMS, NormSpec, part_settings, register_norm


@dataclass
class RMSNormConfig:
    affine: bool = setting(True, "RMSNorm with a learned gain per channel (--no-rmsnorm_affine: none, as nanochat)")
    eps: float = setting(1e-6, "added to the mean square before the root", check=(between(0, 1), "between 0 and 1"))


class RMSNorm(nn.Module):
    def __init__(self, width: int, eps: float, affine: bool):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(width)) if affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (x.size(-1),), self.weight, self.eps)


def rmsnorm(cfg, width: int) -> nn.Module:
    s = part_settings(cfg, NORMS, "rmsnorm")
    return RMSNorm(width, s.eps, s.affine)


register_norm(NormSpec("rmsnorm", rmsnorm, "RMSNorm (root-mean-square scaling, no centring)", config=RMSNormConfig))
