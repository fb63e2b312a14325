"""The scorer every evaluation shares: a task gives each item's requests (token sequences with the
continuation to score) and a rule that judges an item from its scored requests; the scorer does the
rest, the same way for every task:

- truncation to the model's context, keeping the last tokens (as lm-evaluation-harness does, keeping
  context + 1 tokens and feeding all but the last; or as nanochat's CORE does, keeping context tokens);
- batching: the rows of several items right-padded into one forward pass (a causal model's logits at a
  position do not see the padding after it), at most `tokens_per_pass` padded tokens a pass;
- per request: the summed log-probability of the continuation, its mean loss, and whether greedy
  decoding reproduces every continuation token;
- sharding: rank r judges items r, r + world, ...; every rank runs the same number of forward passes
  (a sharded model's ranks must stay in step), and the per-item results are summed across ranks, so
  1 and N ranks give the same values.

How to add a multiple-choice or last-word task: read its items, turn each into `Item(requests, judge)`
(gptkit/evals/hellaswag.py and core.py are two), and register an EvalSpec (gptkit/evals/__init__.py).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class Request:
    tokens: list[int]  # the whole sequence: context, then the continuation
    start: int  # tokens[start:end] is the continuation scored
    end: int | None = None  # default: len(tokens)


@dataclass
class Scored:
    logprob: float  # the continuation's summed log-probability
    mean_loss: float  # its mean loss (nan when truncation left no continuation token)
    n: int  # the continuation tokens scored
    greedy: bool  # the model's argmax reproduces every continuation token


@dataclass
class Item:
    requests: list[Request]
    judge: Callable[[list[Scored]], dict[str, float]]  # the item's values (acc: 1.0 or 0.0, ...)


WINDOWS = {"lm-eval": (1, True), "nanochat": (0, False)}


def tails(texts: list[str], max_tokens: int) -> list[str]:
    """The ends of texts that share their beginning (one item's prompts), cut at the same place: long
    enough to hold their last `max_tokens` tokens, where a word starts, so those tokens come out as
    from the whole texts (GPT-2's BPE never merges across that boundary) and a huge field costs memory
    for what the model will see only."""
    budget = 64 * (max_tokens + 1) + 1024  # characters: far more than max_tokens tokens ever take
    shortest = min(len(t) for t in texts)
    if shortest <= budget:
        return list(texts)
    cut = shortest - budget
    space = re.search(r"\s", texts[0][cut:])
    cut += space.start() if space else 0
    return [t[cut:] for t in texts]


def tail(text: str, max_tokens: int) -> str:
    return tails([text], max_tokens)[0]  # (tokens kept beyond the context, drop the last)


def fit(r: Request, max_length: int, window: str) -> tuple[list[int], int, list[int]]:
    """(model input, the position predicting the first target, the targets) of a request truncated to
    the model's context: the last tokens are kept; a continuation cut at its start keeps what remains."""
    extra, drop_last = WINDOWS[window]
    end = len(r.tokens) if r.end is None else r.end
    kept = r.tokens[:end][-(max_length + extra):]
    start = max(1, r.start - (end - len(kept)))
    return (kept[:-1] if drop_last else kept), start - 1, kept[start:]


@torch.no_grad()
def score(model, items: list[Item], device, autocast=None, rank: int = 0, world_size: int = 1,
          max_length: int | None = None, window: str = "lm-eval", tokens_per_pass: int = 4096,
          items_per_pass: int | None = None) -> dict:
    """The mean of each value the judges return over `items`, "n", and "per_item" (each item's values,
    in order, the same on every rank)."""
    from gptkit.model import unwrap_model

    max_length = max_length or unwrap_model(model).cfg.context_length
    fitted = [[fit(r, max_length, window) for r in item.requests] for item in items]
    plans = [_passes(fitted, list(range(r, len(items), world_size)), tokens_per_pass, items_per_pass)
             for r in range(world_size)]
    mine, most = plans[rank], max(len(p) for p in plans)
    was_training = model.training
    model.eval()
    values: dict[int, dict] = {}
    try:
        for k in range(most):  # every rank the same number of passes; one with nothing left repeats a small one
            chunk = mine[k] if k < len(mine) else [0]
            scored = _forward(model, [f for i in chunk for f in fitted[i]], device, autocast)
            if k < len(mine):
                for i in chunk:
                    values[i] = items[i].judge(scored[: len(fitted[i])])
                    scored = scored[len(fitted[i]) :]
    finally:
        model.train(was_training)
    return _gather(values, len(items), device, world_size)


@torch.no_grad()
def score_requests(model, requests: list[Request], device, max_length: int, window: str = "lm-eval",
                   autocast=None) -> list[Scored]:
    """Each request scored in one forward pass (a look at the numbers behind a judge)."""
    was_training = model.training
    model.eval()
    try:
        return _forward(model, [fit(r, max_length, window) for r in requests], device, autocast)
    finally:
        model.train(was_training)


def _passes(fitted: list, indices: list[int], tokens_per_pass: int, items_per_pass: int | None) -> list[list[int]]:
    """Items grouped into forward passes of at most `tokens_per_pass` padded tokens and `items_per_pass`
    items (an item is never split; an item bigger than that is a pass of its own)."""
    passes, current, rows, width = [], [], 0, 0
    for i in indices:
        r, w = len(fitted[i]), max(len(f[0]) for f in fitted[i])
        full = items_per_pass is not None and len(current) >= items_per_pass
        if current and (full or (rows + r) * max(width, w) > tokens_per_pass):
            passes.append(current)
            current, rows, width = [], 0, 0
        current.append(i)
        rows, width = rows + r, max(width, w)
    return passes + ([current] if current else [])


def _forward(model, fitted: list[tuple[list[int], int, list[int]]], device, autocast) -> list[Scored]:
    width = max(len(inp) for inp, _, _ in fitted)
    x = torch.zeros((len(fitted), width), dtype=torch.long)  # right-padded (a causal model never reads it)
    for i, (inp, _, _) in enumerate(fitted):
        x[i, : len(inp)] = torch.tensor(inp, dtype=torch.long)
    with autocast or contextlib.nullcontext():
        logits = model(x.to(device))  # (rows, width, vocab)
    out = []
    for i, (_, first, targets) in enumerate(fitted):
        t = torch.tensor(targets, dtype=torch.long, device=logits.device)
        row = logits[i, first : first + len(targets)].float()  # the positions that predict the targets
        losses = F.cross_entropy(row, t, reduction="none")
        greedy = bool((row.argmax(dim=-1) == t).all()) if len(targets) else True
        out.append(Scored(-float(losses.sum()), float(losses.mean()) if len(targets) else float("nan"),
                          len(targets), greedy))
    return out


def _gather(values: dict[int, dict], n: int, device, world_size: int) -> dict:
    """Every item's values summed across ranks (each item is judged by one rank), then their means."""
    names = sorted({k for v in values.values() for k in v}) if values else []
    if world_size > 1:
        import torch.distributed as dist

        box = [names]
        dist.broadcast_object_list(box, src=0)
        names = box[0]
    table = torch.zeros(n, len(names), dtype=torch.float64)
    for i, v in values.items():
        table[i] = torch.tensor([float(v[k]) for k in names], dtype=torch.float64)
    if world_size > 1:
        import torch.distributed as dist

        t = table.to(device)
        dist.all_reduce(t)
        table = t.cpu()
    means = table.mean(dim=0).tolist() if n else [float("nan")] * len(names)
    return {**dict(zip(names, means)), "n": n, "per_item": [dict(zip(names, row)) for row in table.tolist()]}
