"""HellaSwag-format items made from real prose (the embedded Gutenberg books), for tests: the fields
of hellaswag_val.jsonl (ind, activity_label, ctx_a, ctx_b, ctx, endings, label, split, ...), with the
artefacts the real file has: WikiHow's [title] and [step] markers, double spaces, an empty ctx_b,
lower-case starts that .capitalize() changes."""

import json
import random
import re
from pathlib import Path

LABELS = ["Reading a novel", "Personal Care and Style", "Family Life", "Travel", "Food and Entertaining"]


def sentences(text: str) -> list[str]:
    flat = re.sub(r"\s+", " ", text)
    return [s.strip() for s in re.split(r"(?<=[.!?])\s+", flat) if 40 <= len(s.strip()) <= 200]


def items(text: str, n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pool = sentences(text)
    out = []
    for k in range(n):
        i = rng.randrange(len(pool) - 2)
        words = pool[i + 1].split()
        cut = rng.randint(1, max(1, min(6, len(words) - 2)))
        ctx_b = " ".join(words[:cut])
        ctx_b = ctx_b[0].lower() + ctx_b[1:] if k % 3 else ctx_b
        true = " ".join(words[cut:])
        others = [" ".join(pool[j].split()[cut:]) or pool[j] for j in rng.sample(range(len(pool)), 3)]
        label = rng.randrange(4)
        endings = others[:label] + [true] + others[label:]
        ctx_a = pool[i]
        if k % 5 == 0:  # WikiHow's markers
            ctx_a = f"[header] How to read {ctx_a.split()[0].lower()} [title] {ctx_a}"
            endings = [f"[step] {e}" for e in endings]
        if k % 7 == 0:
            ctx_a = ctx_a.replace(" ", "  ", 1)
        if k % 11 == 0:
            ctx_b, endings = "", [f"{ctx_b} {e}" for e in endings]
        out.append({"ind": k, "activity_label": rng.choice(LABELS), "ctx_a": ctx_a, "ctx_b": ctx_b,
                    "ctx": f"{ctx_a} {ctx_b}".strip(), "endings": endings, "source_id": f"gutenberg~{i}",
                    "split": "val", "split_type": "indomain" if k % 2 else "zeroshot", "label": label})
    return out


def write(path: Path, text: str, n: int, seed: int = 0) -> Path:
    path.write_text("".join(json.dumps(d) + "\n" for d in items(text, n, seed)))
    return path
