"""A user's evaluation, as a plugin: LAMBADA-style last-word prediction. A passage's last word is the
continuation; the model is right when greedy decoding reproduces all its tokens. Only the data reading
and the rule are here: batching, truncation, ranks and the reduction are the shared scorer's."""

import json
from dataclasses import dataclass
from pathlib import Path

from gptkit.config import at_least, setting
from gptkit.errors import UserError
from gptkit.evals import EvalSpec, register_eval, scorer
from gptkit.tokenizer import EOT_ID, get_tokenizer


@dataclass
class LambadaConfig:
    lambada: Path | None = setting(None, "a JSONL file of {\"text\": passage}: predict each passage's last word")
    every: int = setting(0, "every N steps (0: only at the end)", check=(at_least(0), ">= 0"))
    limit: int | None = setting(None, "the first N passages only", check=(at_least(1), "at least 1"))


def read(cfg: LambadaConfig) -> list[str]:
    if not cfg.lambada.is_file():
        raise UserError(f"--lambada {cfg.lambada} is not a file")
    texts = [json.loads(line)["text"] for line in cfg.lambada.read_text().splitlines() if line.strip()]
    return texts[: cfg.limit] if cfg.limit else texts


def items(texts: list[str]) -> list[scorer.Item]:
    tok, out = get_tokenizer(), []
    for text in texts:
        context, word = text.rsplit(" ", 1)
        ctx = [EOT_ID] + tok.encode_ordinary(context)
        out.append(scorer.Item([scorer.Request(ctx + tok.encode_ordinary(" " + word), len(ctx))],
                               lambda s: {"lambada": float(s[0].greedy)}))
    return out


def build(cfg: LambadaConfig, runtime):
    passages = items(read(cfg))
    return lambda model: {"lambada": scorer.score(model, passages, runtime.device, runtime.autocast(), runtime.rank,
                                                  runtime.world_size, window="nanochat")["lambada"]}


register_eval(EvalSpec("lambada", LambadaConfig, build, check=read))
