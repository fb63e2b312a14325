"""Text from a model: greedy or sampled continuation of a prompt, with a private RNG so sampling
never moves the training RNG."""

from __future__ import annotations

from collections.abc import Callable

import torch

from gptkit.model import unwrap_model
from gptkit.tokenizer import EOT_TOKEN


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    """(1, T) ids of a prompt; an empty prompt starts from <|endoftext|>, as GPT-2 does unconditionally."""
    ids = tokenizer.encode(text, allowed_special={EOT_TOKEN}) or [tokenizer.eot_token]
    return torch.tensor(ids).unsqueeze(0)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    return tokenizer.decode(token_ids.squeeze(0).tolist())


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to idx (B, T). Greedy when temperature is 0; stops early
    once every sequence produced `eos_id` (which is not appended)."""
    context_size = context_size or unwrap_model(model).cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :].float()  # only the last position predicts
        if top_k is not None and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        else:
            next_id = logits.argmax(dim=-1, keepdim=True)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def generate_and_print_sample(model, tokenizer, device, start_context: str, max_new_tokens: int = 50,
                              temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                              printer: Callable[[str], None] = print) -> str:
    """Generate from a prompt with a private RNG, so sampling never shifts the training RNG."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    try:
        idx = text_to_token_ids(start_context, tokenizer).to(device)
        out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                       eos_id=tokenizer.eot_token, generator=gen)
    finally:
        model.train(was_training)
    text = token_ids_to_text(out, tokenizer)
    printer(text.replace("\n", " "))
    return text
