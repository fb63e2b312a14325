"""Attention, pluggable: each kind is an AttentionSpec in one file, registered once, and chosen by name
(`GPTConfig.attention`, the `--attention` flag). A spec says how to build the module and what the
model's FLOP count and memory plan need to know about it.

How to add an attention: write a module whose constructor takes a GPTConfig and whose forward maps
(B, T, C) to (B, T, C) causally, then `register_attention(AttentionSpec("mine", MyAttention, ...))`
in its file and import that file once (the built-ins are imported at the bottom of this one). Give
`score_flops` if its attention costs other than standard causal attention, or MFU figures will be
wrong. Only specs with `hf_gpt2=True` (the projections named c_attn and c_proj, GPT-2's maths) export
to Hugging Face's GPT-2 format.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from gptkit.registry import Registry

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def causal_score_flops(cfg, seq_len: int) -> float:
    """Training FLOPs per token per layer of the attention scores and their weighted sum (forward and
    backward): 2 matmuls of T x head_dim per head, x 3 for the backward, x 2 for multiply-add."""
    return 12 * cfg.emb_dim * seq_len


def causal_extra_activation_bytes(cfg, dtype: str) -> float:
    """Bytes per token per block the backward keeps beyond the projections' inputs and outputs: none
    with SDPA (it recomputes), the (T x T) probabilities per head with the explicit softmax."""
    return 0.0 if cfg.flash else 2 * cfg.n_heads * cfg.context_length * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    build: Callable[[object], nn.Module]  # GPTConfig -> module; forward (B, T, C) -> (B, T, C)
    help: str = ""
    score_flops: Callable[[object, int], float] = causal_score_flops
    extra_activation_bytes: Callable[[object, str], float] = causal_extra_activation_bytes
    hf_gpt2: bool = False  # same maths and names as GPT-2's attention: exports to Hugging Face


ATTENTIONS: Registry[AttentionSpec] = Registry("attention")
register_attention = ATTENTIONS.add  # register_x(spec): one line in the component's own file
attention_spec = ATTENTIONS.spec  # the spec of a name, or one error line listing the names


class CausalSelfAttention(nn.Module):
    """GPT-2's multi-head causal self-attention: q, k and v from one matmul, SDPA kernels
    (cfg.flash) or the explicit masked softmax (same maths, and it can return the weights)."""

    def __init__(self, cfg):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.flash = cfg.flash
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_dropout = nn.Dropout(cfg.drop_rate)
        self.resid_dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = None
        if self.flash and not return_attn:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.drop_rate if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T)
            att = att.masked_fill(self.mask(T, x.device), float("-inf")).softmax(dim=-1)
            y = self.attn_dropout(att) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        y = self.resid_dropout(self.c_proj(y))
        return (y, att) if return_attn else y

    def mask(self, T: int, device) -> torch.Tensor:
        """True where a query may not look: the future."""
        return torch.ones(T, T, dtype=torch.bool, device=device).triu(1)


register_attention(AttentionSpec("causal", CausalSelfAttention, "GPT-2's causal multi-head attention", hf_gpt2=True))
