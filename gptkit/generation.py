"""Text from a model: greedy or sampled (temperature, top-k, top-p) continuations of one prompt or a
batch of them, with a key/value cache: the prompt is run once, then each new token costs one
position's attention over the cached keys and values instead of the whole sequence again. Prompts of
different lengths are left-padded (the padding is never attended to, and each token keeps its own
position). Sampling uses a private RNG, so it never moves the training RNG.

Past the model's context the continuation goes on from the last context_length tokens, recomputed
each step (the positions of a sequence that long were never trained), as without a cache.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptkit.attention import KVCache, attention_spec
from gptkit.model import unwrap_model
from gptkit.tokenizer import EOT_TOKEN


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """(1, T) ids of a prompt, as documents were in training: after the document token for a tokenizer
    that puts it before each document ("bos"); an empty prompt starts from the document token (GPT-2's
    <|endoftext|>, as GPT-2 does unconditionally). The document token's text in a prompt is the token."""
    doc = tokenizer.eot_token
    ids = tokenizer.encode(text, allowed_special={EOT_TOKEN, tokenizer.decode([doc])})
    if getattr(tokenizer, "documents", "eos") == "bos" and ids[:1] != [doc]:
        ids = [doc, *ids]
    return torch.tensor(ids or [doc]).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor | list, tokenizer) -> str:
    """The text of ids; the document token a "bos" tokenizer put before the prompt is not text."""
    ids = token_ids.squeeze(0).tolist() if isinstance(token_ids, torch.Tensor) else list(token_ids)
    if getattr(tokenizer, "documents", "eos") == "bos" and ids[:1] == [tokenizer.eot_token]:
        ids = ids[1:]
    return tokenizer.decode(ids)


def next_token(logits: torch.Tensor, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
    """(B, 1) ids from (B, vocab) logits: the argmax when temperature is 0, else a sample from the
    softmax at that temperature restricted to the top_k most likely tokens and to the smallest set
    whose probability reaches top_p (the most likely token always stays)."""
    logits = logits.float()
    if top_k is not None and top_k > 0:
        kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if temperature <= 0:
        return logits.argmax(dim=-1, keepdim=True)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p is not None and top_p < 1:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        outside = sorted_p.cumsum(dim=-1) - sorted_p >= top_p  # the tokens after the nucleus is full
        probs = probs.scatter(-1, order, sorted_p.masked_fill(outside, 0.0))
    return torch.multinomial(probs, 1, generator=generator)


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None, top_p: float | None = None, use_cache: bool = True,
             pad: torch.Tensor | None = None) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to idx (B, T). Greedy when temperature is 0; stops early
    once every sequence produced `eos_id` at the same step (which is not appended). `pad` (B,): how
    many of each row's first tokens are left padding. Without `use_cache` every step runs the whole
    sequence (the reference the cache is checked against)."""
    raw = unwrap_model(model)
    context_size = context_size or raw.cfg.context_length
    cache = None
    if use_cache and attention_spec(raw.cfg.attention).kv_cache and idx.size(1) < context_size:
        cache = KVCache(raw.cfg.n_layers, min(context_size, idx.size(1) + max_new_tokens))
    logits = _forward(model, idx, cache, pad, context_size)
    for _ in range(max_new_tokens):
        next_id = next_token(logits, temperature, top_k, top_p, generator)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break
        idx = torch.cat([idx, next_id], dim=1)
        if cache is not None and cache.length >= cache.max_len:
            cache = None  # the context is full: from here on, the last context_size tokens each step
        logits = _forward(model, idx if cache is None else next_id, cache, pad, context_size, idx.size(1))
    return idx


def _forward(model, idx: torch.Tensor, cache: KVCache | None, pad: torch.Tensor | None, context_size: int,
             total: int | None = None) -> torch.Tensor:
    """The next-token logits (B, vocab) of the last position: the whole (cropped) sequence without a
    cache, else the new tokens after the cached ones."""
    if cache is None:
        idx = idx[:, -context_size:]
        crop = (total or idx.size(1)) - idx.size(1)
        positions, padding = _layout(pad, crop, idx.size(1), idx.device)
        return model(idx, positions=positions, key_padding=padding)[:, -1, :]
    start = cache.length
    positions, padding = _layout(pad, 0, start + idx.size(1), idx.device)
    positions = None if positions is None else positions[:, start:]
    return model(idx, cache=cache, positions=positions, key_padding=padding)[:, -1, :]


def _layout(pad: torch.Tensor | None, crop: int, length: int, device) -> tuple:
    """Each token's position (B, length) and which keys are padding (B, length), for left-padded rows
    whose first `crop` tokens were cut (positions start again at the window, as without padding);
    (None, None) when no padding is left."""
    if pad is None:
        return None, None
    left = (pad.to(device) - crop).clamp(min=0)[:, None]
    if not bool(left.any()):
        return None, None
    index = torch.arange(length, device=device)[None, :]
    return (index - left).clamp(min=0), index < left


@torch.no_grad()
def generate_batch(model, prompts: list[list[int]], max_new_tokens: int, temperature: float = 0.0,
                   top_k: int | None = None, top_p: float | None = None, eos_id: int | None = None,
                   generator: torch.Generator | None = None, pad_id: int = 0, use_cache: bool = True) -> list[list[int]]:
    """Continuations of several prompts in one batch (left-padded), each cut at its first `eos_id`."""
    device = next(unwrap_model(model).parameters()).device
    width = max(len(p) for p in prompts)
    idx = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    for i, p in enumerate(prompts):
        idx[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
    pad = torch.tensor([width - len(p) for p in prompts])
    out = generate(model, idx.to(device), max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                   generator=generator, pad=pad if bool(pad.any()) else None, use_cache=use_cache)
    rows = []
    for row in out[:, width:].tolist():
        rows.append(row[: row.index(eos_id)] if eos_id is not None and eos_id in row else row)
    return rows


def generate_and_print_sample(model, tokenizer, device, start_context: str, max_new_tokens: int = 50,
                              temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                              printer: Callable[[str], None] = print, top_p: float | None = None) -> str:
    """Generate from a prompt with a private RNG, so sampling never shifts the training RNG."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    try:
        idx = text_to_token_ids(start_context, tokenizer).to(device)
        out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k, top_p=top_p,
                       eos_id=tokenizer.eot_token, generator=gen)
    finally:
        model.train(was_training)
    text = token_ids_to_text(out, tokenizer)
    printer(text.replace("\n", " "))
    return text
