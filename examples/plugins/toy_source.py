"""A user's data source, as a plugin: `--data toy` generates documents from a seeded word list. Its
settings are its own flags (--toy_docs, --toy_seed); its identity records them, so a cache built
with other settings is refused."""

from dataclasses import dataclass

import numpy as np

from gptkit.config import at_least, setting
from gptkit.data.sources import DataSource, SourceKind, register_source

WORDS = "the quick brown fox jumps over a lazy dog while seven wizards box jovially".split()


@dataclass
class ToyConfig:
    docs: int = setting(200, "documents to generate", check=(at_least(1), "at least 1"))
    seed: int = setting(0, "the word list's seed", check=(at_least(0), ">= 0"))


def resolve(data, options):
    cfg = options.settings["toy"]
    return DataSource("toy", [(cfg.docs, cfg.seed)], None, "text", [f"toy ({cfg.docs} documents)"])


def rows(source, part, skip, batch_size):
    docs, seed = source.parts[part]
    rng = np.random.default_rng(seed)
    texts = [f"Toy {k}: " + " ".join(rng.choice(WORDS, size=60)) for k in range(docs)]
    for start in range(skip, docs, batch_size):
        yield texts[start : start + batch_size]


register_source(SourceKind("toy", claims=lambda data, options: data == "toy", resolve=resolve,
                           identity=lambda source, known: {"kind": "toy", "parts": source.parts},
                           rows=rows, probe=lambda source: None, config=ToyConfig))
