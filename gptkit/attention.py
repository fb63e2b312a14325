"""Attention, pluggable: each kind is an AttentionSpec in one file, registered once, and chosen by name
(`GPTConfig.attention`, the `--attention` flag). A spec says how to build the module and what the
model's FLOP count and memory plan need to know about it; its settings (`config=`, a dataclass)
become flags --NAME_FIELD and are recorded in the checkpoint's model config.

The contract of an attention module: its constructor takes a GPTConfig; `forward(x, ctx)` maps
(B, T, C) to (B, T, C) causally, where `ctx` (an AttentionInput, or None for a plain forward) carries
each token's position, the key/value cache of generation and the padding of batched prompts.
`CausalSelfAttention` below does all of it; a variant usually subclasses it and overrides `mask`
(which keys a query may not see) or `bias` (a number added to the scores, by where the query and the
key are: ALiBi), and gets grouped-query heads, QK-norm, rotary positions, the KV cache and SDPA for
free. A position part may bring the bias itself (PositionSpec.score_bias, gptkit/parts).

How to add an attention: that module and `register_attention(AttentionSpec("name", Module, ...))` in
one file, loaded with `--plugin FILE`. Give `score_flops` if it costs other than standard causal
attention (MFU depends on it). Only specs with `hf=True` (the projections named c_attn and c_proj,
this module's maths) export to Hugging Face.
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
    return 12 * cfg.n_heads * cfg.head_dim * seq_len


def causal_extra_activation_bytes(cfg, dtype: str) -> float:
    """Bytes per token per block the backward keeps beyond the projections' inputs and outputs: none
    with SDPA (it recomputes), the (T x T) probabilities per head with the explicit softmax."""
    return 0.0 if cfg.flash else 2 * cfg.n_heads * cfg.context_length * DTYPE_BYTES[dtype]


@dataclass(frozen=True)
class AttentionSpec:
    name: str
    build: Callable[[object], nn.Module]  # GPTConfig -> module; forward (x (B, T, C), ctx) -> (B, T, C)
    help: str = ""
    score_flops: Callable[[object, int], float] = causal_score_flops
    extra_activation_bytes: Callable[[object, str], float] = causal_extra_activation_bytes
    hf: bool = False  # this module's maths and names: exports to Hugging Face
    config: type | None = None  # a dataclass of its own settings (flags --NAME_FIELD)
    kv_cache: bool = True  # its forward takes ctx.cache (CausalSelfAttention's subclasses do); else generation recomputes


ATTENTIONS: Registry[AttentionSpec] = Registry("attention", selector="attention")
register_attention = ATTENTIONS.add  # register_x(spec): one line in the component's own file
attention_spec = ATTENTIONS.spec  # the spec of a name, or one error line listing the names


# ----------------------------------------------------------------------------------------------
# What a forward pass hands every attention besides x


class LayerCache:
    """One layer's keys and values of the tokens generated so far, in preallocated (B, kv_heads,
    max_len, head_dim) tensors; `update` appends this forward's and returns all of them."""

    def __init__(self, cache: KVCache):
        self.cache, self.k, self.v = cache, None, None

    def update(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        start, end = self.cache.length, self.cache.length + k.size(2)
        if self.k is None:
            shape = (k.size(0), k.size(1), self.cache.max_len, k.size(3))
            self.k, self.v = k.new_empty(shape), v.new_empty(shape)
        self.k[:, :, start:end] = k
        self.v[:, :, start:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """Every layer's keys and values during generation: the model fills it with a prompt, then each
    new token costs one position's attention instead of the whole sequence's (GPTModel.forward
    advances `length` after each call)."""

    def __init__(self, n_layers: int, max_len: int):
        self.max_len, self.length = max_len, 0
        self.layers = [LayerCache(self) for _ in range(n_layers)]


@dataclass
class AttentionInput:
    positions: torch.Tensor  # (T,) or (B, T): each token's position (rotary and learned positions)
    cache: LayerCache | None = None  # generation: this layer's keys and values so far
    key_padding: torch.Tensor | None = None  # (B, S) True where a key is padding (left-padded batched prompts)


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention: q, k and v from one matmul (GPT-2's c_attn: the query rows,
    then the key rows, then the value rows), fewer key/value heads than query heads when
    cfg.n_kv_heads says so (GQA), QK-norm and rotary positions when the config has them, SDPA kernels
    (cfg.flash) or the explicit masked softmax (same maths, and it can return the weights)."""

    def __init__(self, cfg):
        super().__init__()
        from gptkit.parts import POSITIONS, build_norm

        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.head_dim
        self.drop_rate = cfg.drop_rate
        self.flash = cfg.flash
        q, kv = cfg.n_heads * cfg.head_dim, cfg.kv_heads * cfg.head_dim
        self.split = (q, kv, kv)
        self.c_attn = nn.Linear(cfg.emb_dim, q + 2 * kv, bias=cfg.qkv_bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(q, cfg.emb_dim, bias=cfg.bias)
        self.q_norm = build_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        self.k_norm = build_norm(cfg, cfg.head_dim) if cfg.qk_norm else None
        position = POSITIONS.spec(cfg.position)
        self.rotary = position.rotary(cfg) if position.rotary is not None else None
        self.score_bias = position.score_bias(cfg) if position.score_bias is not None else None
        self.attn_dropout = nn.Dropout(cfg.drop_rate)
        self.resid_dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, ctx: AttentionInput | None = None, return_attn: bool = False):
        B, T, _ = x.shape
        q, k, v = self.c_attn(x).split(self.split, dim=2)
        q = q.view(B, T, self.n_heads, self.head_dim)  # (B, T, heads, head_dim)
        k = k.view(B, T, self.n_kv_heads, self.head_dim)
        v = v.view(B, T, self.n_kv_heads, self.head_dim)
        if self.q_norm is not None:  # QK-norm: each head's query and key normalised (before rotary, as Qwen3)
            q, k = self.q_norm(q), self.k_norm(k)
        if self.rotary is not None:
            q, k = self.rotary(q, k, ctx.positions if ctx is not None else torch.arange(T, device=x.device))
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # (B, heads, T, head_dim)
        if ctx is not None and ctx.cache is not None:
            k, v = ctx.cache.update(k, v)  # (B, kv_heads, S, head_dim): the earlier tokens' too
        y, att = self.attend(q, k, v, ctx, return_attn)
        y = y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # heads side by side again
        y = self.resid_dropout(self.c_proj(y))
        return (y, att) if return_attn else y

    def attend(self, q, k, v, ctx: AttentionInput | None, return_attn: bool = False):
        """softmax(q k^T / sqrt(d) + bias + mask) v; (output, the weights when asked for)."""
        T, S = q.size(2), k.size(2)
        gqa = self.n_kv_heads != self.n_heads
        dropout = self.drop_rate if self.training else 0.0
        plain = (ctx is None or (ctx.cache is None and ctx.key_padding is None)) and self._plain_mask()
        if self.flash and not return_attn and plain and self.score_bias is None and self._plain_bias():
            return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, is_causal=True, enable_gqa=gqa), None
        q_idx, k_idx = torch.arange(S - T, S, device=q.device), torch.arange(S, device=q.device)
        blocked = self.mask(q_idx, k_idx)  # (T, S)
        if ctx is not None and ctx.key_padding is not None:  # padding is never seen (but by itself: no empty row)
            own = k_idx[None, :] == q_idx[:, None]
            blocked = blocked | (ctx.key_padding[:, None, None, :] & ~own)  # (B, 1, T, S)
        bias = self.bias(q_idx, k_idx)  # None, or (heads, T, S) added to the scores
        if bias is not None:  # one additive mask: the bias where a key is seen, -inf where it is not
            blocked = torch.where(blocked, float("-inf"), bias.to(q.dtype))  # (B or 1, heads, T, S)
        if self.flash and not return_attn:
            mask = ~blocked if bias is None else blocked
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, enable_gqa=gqa), None
        if gqa:
            k, v = (t.repeat_interleave(self.n_heads // self.n_kv_heads, dim=1) for t in (k, v))
        att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, heads, T, S)
        att = (att.masked_fill(blocked, float("-inf")) if bias is None else att + blocked).softmax(dim=-1)
        return self.attn_dropout(att) @ v, att

    def mask(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor:
        """(T, S) True where the query at position q_pos[i] may not see the key at k_pos[j]: the future."""
        return k_pos[None, :] > q_pos[:, None]

    def bias(self, q_pos: torch.Tensor, k_pos: torch.Tensor) -> torch.Tensor | None:
        """(heads, T, S) added to the scores q.k / sqrt(head_dim) before the mask and the softmax, or None:
        the position part's score bias (ALiBi), if it has one. Override it for a bias of your own."""
        return self.score_bias(q_pos, k_pos) if self.score_bias is not None else None

    def _plain_mask(self) -> bool:
        return type(self).mask is CausalSelfAttention.mask

    def _plain_bias(self) -> bool:
        return type(self).bias is CausalSelfAttention.bias


register_attention(AttentionSpec("causal", CausalSelfAttention, "causal multi-head attention (GQA with --n_kv_heads)",
                                 hf=True))
