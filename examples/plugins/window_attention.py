"""A user's attention, as a plugin: causal attention where each position sees only the last `size`
positions (sliding window). Its setting is its own flag, --window_size, and is recorded in the
checkpoint's model config."""

from dataclasses import dataclass

from gptkit.attention import ATTENTIONS, AttentionSpec, CausalSelfAttention, register_attention
from gptkit.config import at_least, setting
from gptkit.parts import part_settings


@dataclass
class WindowConfig:
    size: int = setting(4, "positions each query sees (itself included)", check=(at_least(1), "at least 1"))


class WindowAttention(CausalSelfAttention):
    def __init__(self, cfg):
        super().__init__(cfg)
        self.size = part_settings(cfg, ATTENTIONS, "window").size  # as the checkpoint's model config records it

    def mask(self, q_pos, k_pos):
        return (k_pos[None, :] > q_pos[:, None]) | (k_pos[None, :] <= q_pos[:, None] - self.size)


def score_flops(cfg, seq_len):
    return 12 * cfg.emb_dim * min(part_settings(cfg, ATTENTIONS, "window").size, seq_len)


register_attention(AttentionSpec("window", WindowAttention, "causal, each position sees the last --window_size",
                                 score_flops=score_flops, config=WindowConfig))
