"""Training a byte-level BPE tokenizer on a corpus, as nanochat's first stage does, and writing it as a
folder that the toolkit and transformers' AutoTokenizer both load and that encodes the same ids in both.

- The trainer is rustbpe (nanochat's): measured against Hugging Face's `tokenizers` on the same text at
  32,768 tokens (benchmarks/bench_tokenizer.py) it trains 2-3x faster with the same merges' compression,
  and tiktoken, which then encodes the cache, is ~4x faster than `tokenizers` here.
- The split pattern is GPT-4's with numbers in groups of at most two (nanochat found it better for small
  vocabularies than GPT-4's three).
- Ids are merge ranks (the 256 bytes first), then the special tokens; the first special token marks
  documents (before each one, "bos", as nanochat; or after each, "eos", as GPT-2).
- The folder: tokenizer.json (a byte-level BPE whose merges are recovered from the ranks: Hugging Face
  applies merges in that order, so its ids equal tiktoken's), tokenizer_config.json and
  special_tokens_map.json for transformers, and gptkit_tokenizer.json (the pattern, the document
  token, what it was trained on). Written to a temp folder and renamed into place.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator
from pathlib import Path

from gptkit.errors import UserError
from gptkit.files import dir_mode, file_mode
from gptkit.tokenizer import OWN_FILE, OWN_FORMAT, byte_decoder

SPLIT_PATTERN = (r"""'(?i:[sdmt]|ll|ve|re)|[^\r\n\p{L}\p{N}]?+\p{L}+|\p{N}{1,2}| ?[^\s\p{L}\p{N}]++[\r\n]*|\s*[\r\n]|"""
                 r"""\s+(?!\S)|\s+""")
DEFAULT_SPECIALS = ("<|bos|>",)


def train_ranks(texts: Iterable[str], vocab_size: int, pattern: str = SPLIT_PATTERN) -> dict[bytes, int]:
    """Merge ranks of a byte-level BPE of `vocab_size` ids (the 256 bytes included) trained on texts."""
    try:
        import rustbpe
    except ImportError:
        raise UserError("training a tokenizer needs rustbpe: pip install -r requirements.txt")
    trainer = rustbpe.Tokenizer()
    trainer.train_from_iterator(iter(texts), vocab_size, pattern=pattern)
    return {bytes(k): v for k, v in trainer.get_mergeable_ranks()}


def recover_merges(ranks: dict[bytes, int]) -> list[tuple[bytes, bytes]]:
    """The merge of each multi-byte token, in rank order: BPE on its bytes with the merges of lower
    rank leaves exactly two parts, and joining them is its merge."""
    merges = []
    for token, rank in sorted(ranks.items(), key=lambda kv: kv[1]):
        if len(token) > 1:
            parts = _bpe(ranks, token, rank)
            if len(parts) != 2:
                raise UserError(f"token {token!r} (rank {rank}) is not the merge of two lower-ranked tokens")
            merges.append((parts[0], parts[1]))
    return merges


def _bpe(ranks: dict[bytes, int], token: bytes, below: int) -> list[bytes]:
    parts = [bytes([b]) for b in token]
    while True:
        best = None
        for i in range(len(parts) - 1):
            r = ranks.get(parts[i] + parts[i + 1])
            if r is not None and r < below and (best is None or r < best[1]):
                best = (i, r)
        if best is None:
            return parts
        i = best[0]
        parts = parts[:i] + [parts[i] + parts[i + 1]] + parts[i + 2:]


def tokenizer_json(ranks: dict[bytes, int], specials: list[str], pattern: str, documents: str = "bos") -> str:
    """A Hugging Face tokenizer.json of the BPE: GPT-2's byte-to-character table, the split pattern,
    then byte-level without its own regex; special tokens after the ranks. A "bos" tokenizer's
    post-processor puts the document token first, as Llama's does (transformers' tokenizer(text))."""
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers, processors

    to_char = {b: c for c, b in byte_decoder().items()}
    spell = lambda bs: "".join(to_char[b] for b in bs)  # noqa: E731
    vocab = {spell(t): r for t, r in ranks.items()}
    merges = [(spell(a), spell(b)) for a, b in recover_merges(ranks)]
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(pattern), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in specials])
    if documents == "bos":
        doc = specials[0]
        tok.post_processor = processors.TemplateProcessing(single=f"{doc} $A", pair=f"{doc} $A {doc} $B",
                                                           special_tokens=[(doc, len(ranks))])
    return tok.to_str()


def write_folder(out: Path, ranks: dict[bytes, int], specials: list[str], documents: str, pattern: str,
                 trained_on: dict) -> Path:
    """The tokenizer folder (see the module's docstring), written whole or not at all."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; pick a new --out")
    doc = specials[0]
    hf_config = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": doc, "eos_token": doc, "pad_token": doc,
                 "add_bos_token": documents == "bos", "model_max_length": 1 << 20, "clean_up_tokenization_spaces": False}
    own = {"format": OWN_FORMAT, "name": out.name, "pattern": pattern, "documents": documents, "document_token": doc,
           "special_tokens": specials, "vocab_size": len(ranks) + len(specials), "trained_on": trained_on}
    files = {"tokenizer.json": tokenizer_json(ranks, specials, pattern, documents),
             "tokenizer_config.json": json.dumps(hf_config, indent=2),
             "special_tokens_map.json": json.dumps({k: doc for k in ("bos_token", "eos_token", "pad_token")}, indent=2),
             OWN_FILE: json.dumps(own, indent=2)}
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        os.chmod(tmp, dir_mode())
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
            os.chmod(tmp / name, file_mode())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def split_documents(rows: Iterator[list[str]], doc_chars: int, max_chars: int | None, every: int,
                    heldout: bool) -> Iterator[str]:
    """The corpus as the trainer and `compare` see it: each document (an <|endoftext|> inside a row
    separates documents) cut into pieces of at most `doc_chars` characters; piece k of the stream is
    held out when k % every == every - 1 (`heldout` gives those, else the others), up to `max_chars`."""
    from gptkit.tokenizer import EOT_TOKEN

    k, taken = 0, 0
    for batch in rows:
        for row in batch:
            for doc in row.split(EOT_TOKEN):
                for start in range(0, len(doc), doc_chars):
                    piece = doc[start : start + doc_chars]
                    if not piece.strip():
                        continue
                    held = every > 0 and k % every == every - 1
                    k += 1
                    if held == heldout:
                        yield piece
                        taken += len(piece)
                        if max_chars is not None and taken >= max_chars:
                            return


class Counted:
    """An iterator of texts that counts what went through it (characters, UTF-8 bytes, seconds) and
    moves a progress bar by characters."""

    def __init__(self, texts: Iterable[str], bar=None):
        self.texts, self.bar, self.chars, self.bytes, self.t0 = iter(texts), bar, 0, 0, time.perf_counter()

    def __iter__(self):
        return self

    def seconds(self) -> float:
        return time.perf_counter() - self.t0

    def __next__(self) -> str:
        text = next(self.texts)
        self.chars += len(text)
        self.bytes += len(text.encode("utf-8"))
        if self.bar is not None:
            self.bar.update(len(text))
        return text
