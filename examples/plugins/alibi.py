"""A user's position part, as a plugin: ALiBi (Press et al. 2022). No position table and no rotation:
each head adds -slope x distance to its attention scores, with slopes 2^(-8/heads), 2^(-16/heads), ...
The attention (gptkit/attention.py CausalSelfAttention) adds a position part's `score_bias` to
q.k / sqrt(head_dim) before the causal mask and the softmax, on every path: training, evaluation,
and generation with the KV cache. Choose it with --position alibi; it has no settings.

Copy it and edit it: a PositionSpec has `embedding` (a module added to the token embedding: learned
tables), `rotary` (a module applied to each head's queries and keys) and `score_bias` (this one); a
part uses one of them.
"""

import torch
import torch.nn as nn

from gptkit.parts import PositionSpec, register_position


class ALiBi(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        slopes = 2.0 ** (-8.0 * torch.arange(1, cfg.n_heads + 1, dtype=torch.float32) / cfg.n_heads)
        self.register_buffer("slopes", slopes, persistent=False)  # (heads,): a function of the config, not saved

    def forward(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        distance = (q_pos[:, None] - k_pos[None, :]).clamp(min=0).float()  # (T, S); the future is masked anyway
        return -self.slopes[:, None, None] * distance  # (heads, T, S)


register_position(PositionSpec("alibi", "ALiBi: a per-head linear penalty on the distance, no position table",
                               score_bias=ALiBi))
