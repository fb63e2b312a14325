"""Any Hugging Face tokenizer.json (Llama's, Qwen's, SmolLM's, Mistral's...) with the toolkit's
tokenizer surface (tiktoken's, gptkit/tokenizer.py), read by Hugging Face's `tokenizers`, which
encodes a batch on every core. Special tokens written in a text are text, never control tokens
(`encode_ordinary`); a prompt may name them (`encode(..., allowed_special=...)`).

How documents are marked comes from the folder: a tokenizer that puts a beginning-of-sequence token
before what it encodes (Llama's post-processor, `add_bos_token`) marks them with it, before each
document; else its end-of-sequence token follows each document (GPT-2, Qwen)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from gptkit.errors import UserError
from gptkit.tokenizer import Described, byte_decoder

BYTE_TOKEN = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")  # sentencepiece-style byte fallback


class HFTokenizer(Described):
    def __init__(self, folder: Path | None, files: dict[str, str]):
        from tokenizers import Tokenizer

        self.folder, self.files = folder, files
        self.name = folder.name if folder else "hf"
        self.tok = Tokenizer.from_str(files["tokenizer.json"])
        self.tok.encode_special_tokens = True  # "<|endoftext|>" in a text is text
        self.n_vocab = self.tok.get_vocab_size(with_added_tokens=True)
        self.special = {t.content: i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}
        self.documents, doc = self._documents()
        self.eot_token = self.special.get(doc) if doc in self.special else self.tok.token_to_id(doc)
        if self.eot_token is None:
            raise UserError(f"tokenizer {self.name}: its document token {doc!r} is not in its vocabulary")
        model = json.loads(files["tokenizer.json"]).get("decoder") or {}
        self.byte_level = "ByteLevel" in json.dumps(model)

    def _documents(self) -> tuple[str, str]:
        """("bos", its BOS token) or ("eos", its EOS token), from tokenizer_config.json and what the
        post-processor adds."""
        config = json.loads(self.files.get("tokenizer_config.json") or "{}")
        name = lambda v: v.get("content") if isinstance(v, dict) else v  # noqa: E731
        bos, eos = name(config.get("bos_token")), name(config.get("eos_token"))
        adds_bos = config.get("add_bos_token")
        if adds_bos is None and bos:
            adds_bos = self.tok.encode("x").ids[:1] == [self.tok.token_to_id(bos)]
        if bos and adds_bos:
            return "bos", bos
        if eos:
            return "eos", eos
        if bos:
            return "bos", bos
        raise UserError(f"tokenizer {self.name}: its tokenizer_config.json names no bos_token or eos_token, so "
                        "documents cannot be marked")

    def encode_ordinary(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def encode_ordinary_batch(self, texts: list[str], num_threads: int | None = None) -> list[list[int]]:
        return [e.ids for e in self.tok.encode_batch(texts, add_special_tokens=False)]

    def encode(self, text: str, allowed_special=frozenset(), **_) -> list[int]:
        """A prompt's ids: the special tokens named in `allowed_special` ("all": every one) are tokens."""
        allowed = set(self.special) if allowed_special == "all" else set(allowed_special) & set(self.special)
        if not allowed:
            return self.encode_ordinary(text)
        parts = re.split("(" + "|".join(map(re.escape, sorted(allowed, key=len, reverse=True))) + ")", text)
        return [i for p in parts if p for i in ([self.special[p]] if p in allowed else self.encode_ordinary(p))]

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=False)

    def token_byte_length(self, i: int) -> int:
        if i in self.special.values():
            return 0
        piece = self.tok.id_to_token(i)
        if piece is None:
            return 0
        if self.byte_level:
            table = byte_decoder()
            return sum(1 for c in piece if c in table)
        m = BYTE_TOKEN.match(piece)
        return 1 if m else len(piece.replace("\u2581", " ").encode("utf-8"))
