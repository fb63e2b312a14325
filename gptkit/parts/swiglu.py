"""The SwiGLU MLP (Shazeer 2020; Llama, Qwen): silu(gate(x)) * up(x), projected back. Two input
matrices, so the hidden width defaults to 8/3 x emb_dim (rounded up to a multiple of 64) to keep
the parameters and FLOPs of GPT-2's 4x MLP. `c_fc` holds the gate's rows and then the up rows."""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.config import at_least, setting
from gptkit.parts import MLPS, MLPSpec, part_settings, register_mlp


@dataclass
class SwiGLUConfig:
    hidden: int | None = setting(None, "SwiGLU's hidden width (default: 8/3 x emb_dim rounded up to a multiple of 64)",
                                 check=(at_least(1), "at least 1"))


def hidden_width(cfg) -> int:
    h = part_settings(cfg, MLPS, "swiglu").hidden
    return h or 64 * math.ceil(8 * cfg.emb_dim / 3 / 64)


class SwiGLU(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.hidden = hidden_width(cfg)
        self.c_fc = nn.Linear(cfg.emb_dim, 2 * self.hidden, bias=cfg.bias)  # [gate; up]
        self.c_proj = nn.Linear(self.hidden, cfg.emb_dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.c_fc(x).split(self.hidden, dim=-1)
        return self.dropout(self.c_proj(F.silu(gate) * up))


register_mlp(MLPSpec("swiglu", SwiGLU, "SwiGLU gated MLP (Llama)", config=SwiGLUConfig,
                     activation_floats=lambda cfg: 4 * hidden_width(cfg)))
