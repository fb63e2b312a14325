"""HellaSwag, scored exactly as lm-evaluation-harness's `hellaswag` task scores it (0-shot), so the
numbers compare with published GPT-2 figures:

- the query is preprocess(activity_label + ": " + ctx_a + " " + ctx_b.capitalize()), each of the four
  choices preprocess(ending), where preprocess strips, turns " [title]" into ". ", removes [...] spans
  and collapses double spaces;
- each choice is scored as the continuation " " + choice after the query: the sum of its tokens' log
  probabilities, with the pair split as lm-eval splits it (trailing spaces of the context move to the
  continuation; the whole string is encoded, and the continuation is what follows the context's tokens);
- an input longer than the model's context keeps its last tokens;
- acc is the argmax of the log-likelihoods, acc_norm the argmax of log-likelihood / len(choice) in
  characters (ties to the first).

The data is the official validation file, hellaswag_val.jsonl (10,042 items), from the HellaSwag
project's repository (HELLASWAG_URL). The four endings of several items go through the model in one
batch, and under several processes each rank scores its share (all ranks run the same number of
batches, so sharded models stay in step).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from gptkit.config import at_least, setting
from gptkit.errors import UserError
from gptkit.evals import EvalSpec, register_eval
from gptkit.tokenizer import get_tokenizer

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


@dataclass
class HellaSwagConfig:
    hellaswag: Path | None = setting(None, "HellaSwag's validation file (hellaswag_val.jsonl): score the model on it, "
                                           "as lm-evaluation-harness does, logged as eval/hellaswag and "
                                           "eval/hellaswag_norm")
    hellaswag_every: int = setting(0, "HellaSwag every N steps (0: only at the end)", check=(at_least(0), ">= 0"))
    hellaswag_limit: int | None = setting(None, "score only the first N items (default: all)",
                                          check=(at_least(1), "at least 1"))


@dataclass
class Item:
    query: str
    choices: list[str]
    label: int


def preprocess(text: str) -> str:
    text = text.strip()
    text = text.replace(" [title]", ". ")  # the brackets are artefacts of the WikiHow part
    text = re.sub("\\[.*?\\]", "", text)
    return text.replace("  ", " ")


def item_of(doc: dict) -> Item:
    ctx = doc["ctx_a"] + " " + doc["ctx_b"].capitalize()
    return Item(preprocess(doc["activity_label"] + ": " + ctx), [preprocess(e) for e in doc["endings"]], int(doc["label"]))


def read_items(path, limit: int | None = None) -> list[Item]:
    """The items of a hellaswag_*.jsonl file (the first `limit`); one error line names a bad line."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--hellaswag {path} is not a file; get hellaswag_val.jsonl from {HELLASWAG_URL}")
    items = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(items) >= limit:
                break
            if line.strip():
                items.append(_parse(line, path, lineno))
    if not items:
        raise UserError(f"--hellaswag {path} holds no items")
    return items


def _parse(line: str, path: Path, lineno: int) -> Item:
    try:
        doc = json.loads(line)
    except json.JSONDecodeError as e:
        raise UserError(f"{path} line {lineno} is not valid JSON ({e.msg}); is it HellaSwag's .jsonl file?")
    missing = [k for k in FIELDS if not isinstance(doc, dict) or k not in doc]
    if missing:
        raise UserError(f"{path} line {lineno} has no {', '.join(missing)}; it is not a HellaSwag item (fields "
                        f"{', '.join(FIELDS)})")
    item = item_of(doc)
    if len(item.choices) < 2 or not 0 <= item.label < len(item.choices):
        raise UserError(f"{path} line {lineno}: label {doc['label']} does not pick one of its {len(item.choices)} endings")
    return item


def encode_pair(context: str, continuation: str, tokenizer) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode_ordinary(context + continuation)
    ctx = tokenizer.encode_ordinary(context)
    return ctx, whole[len(ctx):]


def requests(item: Item, tokenizer, max_length: int) -> list[tuple[list[int], list[int]]]:
    """Per choice: the model's input (the last at most max_length tokens of context + continuation,
    less the final one) and the continuation's tokens, which its last positions predict."""
    out = []
    for choice in item.choices:
        ctx, cont = encode_pair(item.query, " " + choice, tokenizer)
        out.append(((ctx + cont)[-(max_length + 1):][:-1], cont))
    return out


@torch.no_grad()
def loglikelihoods(model, reqs: list[tuple[list[int], list[int]]], device, autocast=None) -> list[float]:
    """Summed log-probabilities of each request's continuation, the requests right-padded into one batch
    (a causal model's logits at a position do not see the padding after it)."""
    width = max(len(inp) for inp, _ in reqs)
    x = torch.zeros(len(reqs), width, dtype=torch.long)
    for i, (inp, _) in enumerate(reqs):
        x[i, : len(inp)] = torch.tensor(inp)
    with autocast or contextlib.nullcontext():
        logits = model(x.to(device))  # (B, width, vocab)
    out = []
    for i, (inp, cont) in enumerate(reqs):
        cont = cont[-len(inp):]  # a continuation longer than the window: the tokens the window predicts
        logp = F.log_softmax(logits[i, len(inp) - len(cont) : len(inp)].float(), dim=-1)
        out.append(float(logp.gather(1, torch.tensor(cont, device=logp.device)[:, None]).sum()))
    return out


def choose(lls: list[float], item: Item) -> tuple[bool, bool]:
    """(acc, acc_norm) of one item: the argmax of the log-likelihoods, and of them per character."""
    ll = np.array(lls)
    lengths = np.array([float(len(c)) for c in item.choices])
    return int(np.argmax(ll)) == item.label, int(np.argmax(ll / lengths)) == item.label


def score(model, items: list[Item], device, autocast=None, rank: int = 0, world_size: int = 1,
          items_per_batch: int = 8, max_length: int | None = None) -> dict:
    """acc, acc_norm and n over `items`; each rank scores items rank, rank + world_size, ... and the
    counts are all-reduced. Every rank runs the same number of forward passes."""
    from gptkit.model import unwrap_model

    tokenizer = get_tokenizer()
    max_length = max_length or unwrap_model(model).cfg.context_length
    mine = items[rank::world_size]
    batches = math.ceil(math.ceil(len(items) / world_size) / items_per_batch)
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, dtype=torch.float64)  # acc, acc_norm, n
    try:
        for b in range(batches):
            chunk = mine[b * items_per_batch : (b + 1) * items_per_batch]
            if chunk:
                counts += _score_chunk(model, chunk, tokenizer, max_length, device, autocast)
            else:  # nothing left here: a forward pass all the same, so sharded ranks stay in step
                _score_chunk(model, items[:1], tokenizer, max_length, device, autocast)
    finally:
        model.train(was_training)
    if world_size > 1:
        import torch.distributed as dist

        t = counts.to(device)
        dist.all_reduce(t)
        counts = t.cpu()
    acc, norm, n = counts.tolist()
    return {"acc": acc / n, "acc_norm": norm / n, "n": int(n)}


def _score_chunk(model, chunk: list[Item], tokenizer, max_length: int, device, autocast) -> torch.Tensor:
    reqs = [r for item in chunk for r in requests(item, tokenizer, max_length)]
    lls = loglikelihoods(model, reqs, device, autocast)
    counts, k = torch.zeros(3, dtype=torch.float64), 0
    for item in chunk:
        acc, norm = choose(lls[k : k + len(item.choices)], item)
        k += len(item.choices)
        counts += torch.tensor([float(acc), float(norm), 1.0], dtype=torch.float64)
    return counts


# ----------------------------------------------------------------------------------------------
# In training


def enabled(cfg: HellaSwagConfig) -> bool:
    return cfg.hellaswag is not None


def build(cfg: HellaSwagConfig, runtime):
    items = read_items(cfg.hellaswag, cfg.hellaswag_limit)  # read once, before training starts

    def run(model) -> dict:
        r = score(model, items, runtime.device, runtime.autocast(), runtime.rank, runtime.world_size)
        return {"hellaswag": r["acc"], "hellaswag_norm": r["acc_norm"]}
    return run


def check(cfg: HellaSwagConfig) -> None:
    read_items(cfg.hellaswag, cfg.hellaswag_limit)  # a missing or malformed file: one line, before any work


register_eval(EvalSpec("hellaswag", HellaSwagConfig, enabled, lambda cfg: cfg.hellaswag_every, build, check))
