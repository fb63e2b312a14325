"""Rotary position embeddings (RoPE, Su et al. 2021): each head's queries and keys are rotated by an
angle proportional to their position, pair by pair, so their dot product depends on the distance
between the two tokens only. Pairs are (i, i + head_dim/2), as Llama and Hugging Face's
`rotate_half` have them, so weights export without a permutation."""

from dataclasses import dataclass

import torch
import torch.nn as nn

from gptkit.config import above, setting
from gptkit.parts import POSITIONS, PositionSpec, part_settings, register_position


@dataclass
class RotaryConfig:
    base: float = setting(10000.0, "rotary base: the wavelength of the slowest pair is 2 pi x base (Llama: 10000, "
                                   "Llama 3: 500000)", check=(above(1), "a number > 1"))


class Rotary(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        hd = cfg.head_dim
        base = part_settings(cfg, POSITIONS, "rotary").base
        # (head_dim / 2,) angular frequencies; not saved in checkpoints (a function of the config).
        self.register_buffer("inv_freq", 1.0 / base ** (torch.arange(0, hd, 2, dtype=torch.float32) / hd),
                             persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor):
        # q (B, T, heads, hd), k (B, T, kv_heads, hd); positions (T,) or (B, T)
        angles = positions.float()[..., None] * self.inv_freq.float()  # (..., T, hd/2)
        angles = torch.cat((angles, angles), dim=-1)[..., None, :]  # (..., T, 1, hd): broadcast over heads
        cos, sin = angles.cos(), angles.sin()
        return _rotate(q, cos, sin), _rotate(k, cos, sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return (x * cos.to(x.dtype) + torch.cat((-x2, x1), dim=-1) * sin.to(x.dtype)).type_as(x)


register_position(PositionSpec("rotary", "rotary embeddings on each head's queries and keys (no position table)",
                               rotary=Rotary, config=RotaryConfig))
