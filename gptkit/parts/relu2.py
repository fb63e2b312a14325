"""The squared-ReLU MLP (So et al. 2021, Primer; nanochat and modded-nanogpt): widen 4x, relu(x)^2,
project back. Cheaper than GELU and, at GPT-2 scale, trains at least as well."""

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.parts import MLPSpec, register_mlp


class ReLU2MLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim, bias=cfg.bias)
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.c_proj(F.relu(self.c_fc(x)).square()))


register_mlp(MLPSpec("relu2", ReLU2MLP, "4x MLP with squared ReLU (nanochat)"))
