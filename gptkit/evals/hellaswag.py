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
batches, so sharded models stay in step): the shared scorer, gptkit/evals/scorer.py, does all of that.
"""

from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptkit.config import at_least, setting
from gptkit.errors import UserError
from gptkit.evals import EvalSpec, register_eval, scorer
from gptkit.evals.scorer import Item as ScorerItem
from gptkit.evals.scorer import Request, Scored, tail
from gptkit.tokenizer import get_tokenizer

HELLASWAG_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl"
FIELDS = ("activity_label", "ctx_a", "ctx_b", "endings", "label")


@dataclass
class HellaSwagConfig:
    hellaswag: Path | None = setting(None, "HellaSwag's validation file (hellaswag_val.jsonl): score the model on it, "
                                           "as lm-evaluation-harness does, logged as eval/hellaswag and "
                                           "eval/hellaswag_norm")
    every: int = setting(0, "HellaSwag every N steps (0: only at the end)", check=(at_least(0), ">= 0"))
    limit: int | None = setting(None, "score only the first N items (default: all)", check=(at_least(1), "at least 1"))


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
    with open(path, encoding="utf-8", errors="strict") as f:
        try:
            for lineno, line in enumerate(f, 1):
                if limit is not None and len(items) >= limit:
                    break
                if line.strip():
                    items.append(_parse(line, path, lineno))
        except UnicodeDecodeError as e:
            raise UserError(f"{path} is not UTF-8 text (byte {e.start} of a line after line {len(items)})")
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
    for k in ("activity_label", "ctx_a", "ctx_b"):
        if not isinstance(doc[k], str):
            raise UserError(f"{path} line {lineno}: {k} is {_kind(doc[k])}, not text")
    endings = doc["endings"]
    if not isinstance(endings, list) or not all(isinstance(e, str) for e in endings):
        raise UserError(f"{path} line {lineno}: endings is {_kind(endings)}, not a list of texts")
    label = doc["label"]
    if isinstance(label, bool) or not (isinstance(label, int) or (isinstance(label, str) and label.strip().isdigit())):
        raise UserError(f"{path} line {lineno}: label {label!r} is not a whole number (the index of the right ending)")
    item = item_of(doc)
    if len(item.choices) < 2 or not 0 <= item.label < len(item.choices):
        raise UserError(f"{path} line {lineno}: label {doc['label']} does not pick one of its {len(item.choices)} endings")
    return item


def _kind(v) -> str:
    return "null" if v is None else f"a {type(v).__name__}" if not isinstance(v, list) else "a list with non-text entries"


def encode_pair(context: str, continuation: str, tokenizer) -> tuple[list[int], list[int]]:
    """(context tokens, continuation tokens) as lm-evaluation-harness splits them."""
    n_spaces = len(context) - len(context.rstrip())
    if n_spaces > 0:
        continuation = context[-n_spaces:] + continuation
        context = context[:-n_spaces]
    whole = tokenizer.encode_ordinary(context + continuation)
    ctx = tokenizer.encode_ordinary(context)
    return ctx, whole[len(ctx):]


def requests(item: Item, tokenizer, max_length: int) -> list[Request]:
    """Per choice: the context and the continuation " " + choice as lm-eval splits them."""
    query = tail(item.query, max_length)
    out = []
    for choice in item.choices:
        ctx, cont = encode_pair(query, " " + tail(choice, max_length), tokenizer)
        out.append(Request(ctx + cont, len(ctx)))
    return out


def judge(item: Item, scored: list[Scored]) -> dict[str, float]:
    """acc: the argmax of the log-likelihoods; acc_norm: of them per character of the choice (ties to
    the first, as numpy's argmax)."""
    ll = np.array([s.logprob for s in scored])
    lengths = np.array([float(len(c)) for c in item.choices])
    return {"acc": float(int(np.argmax(ll)) == item.label), "acc_norm": float(int(np.argmax(ll / lengths)) == item.label)}


def score(model, items: list[Item], device, autocast=None, rank: int = 0, world_size: int = 1,
          items_per_batch: int = 8, max_length: int | None = None) -> dict:
    """acc, acc_norm and n over `items`, on the shared scorer (lm-eval's truncation), split across ranks."""
    from gptkit.model import unwrap_model

    tokenizer = get_tokenizer()
    max_length = max_length or unwrap_model(model).cfg.context_length
    tasks = [ScorerItem(requests(it, tokenizer, max_length), functools.partial(judge, it)) for it in items]
    r = scorer.score(model, tasks, device, autocast, rank, world_size, max_length, window="lm-eval",
                     items_per_pass=items_per_batch)
    return {"acc": r["acc"], "acc_norm": r["acc_norm"], "n": r["n"], "per_item": r["per_item"]}


# ----------------------------------------------------------------------------------------------
# In training


def build(cfg: HellaSwagConfig, runtime):
    items = read_items(cfg.hellaswag, cfg.limit)  # read once, before training starts

    def run(model) -> dict:
        r = score(model, items, runtime.device, runtime.autocast(), runtime.rank, runtime.world_size)
        return {"hellaswag": r["acc"], "hellaswag_norm": r["acc_norm"]}
    return run


def check(cfg: HellaSwagConfig) -> None:
    read_items(cfg.hellaswag, cfg.limit)  # a missing or malformed file: one line, before any work


register_eval(EvalSpec("hellaswag", HellaSwagConfig, build, check, "HellaSwag, as lm-evaluation-harness scores it"))
