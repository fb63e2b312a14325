"""GPT-2's MLP: widen 4x, tanh-approximated GELU, project back."""

import torch.nn as nn

from gptkit.parts import MLPSpec, register_mlp


class GeluMLP(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim, bias=cfg.bias)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim, bias=cfg.bias)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


register_mlp(MLPSpec("gelu", GeluMLP, "GPT-2's 4x MLP with tanh GELU"))
