"""A newcomer's tokenizer backend, from DESIGN.md: every UTF-8 byte is an id (0-255), and 256 marks
documents (after each, as GPT-2's end-of-text). A folder holding bytes_tokenizer.json is claimed."""
import json

from gptkit.tokenizer import Described, TokenizerSpec, register_tokenizer

MARK = "<|endoftext|>"


class ByteTokenizer(Described):
    def __init__(self, folder, files):
        self.folder, self.files = folder, files
        self.name = json.loads(files["bytes_tokenizer.json"]).get("name", "bytes")
        self.documents, self.eot_token, self.n_vocab, self.special = "eos", 256, 257, {MARK: 256}

    def encode_ordinary(self, text):
        return list(text.encode("utf-8"))

    def encode_ordinary_batch(self, texts, num_threads=None):
        return [self.encode_ordinary(t) for t in texts]

    def encode(self, text, allowed_special=frozenset(), **_):
        if MARK not in allowed_special and allowed_special != "all":
            return self.encode_ordinary(text)
        out = []
        for k, part in enumerate(text.split(MARK)):
            out += ([256] if k else []) + self.encode_ordinary(part)
        return out

    def decode(self, ids):
        return b"".join(MARK.encode() if i == 256 else bytes([i]) for i in ids).decode("utf-8", errors="replace")

    def token_byte_length(self, i):
        return 0 if i == 256 else 1


register_tokenizer(TokenizerSpec("bytes", lambda folder: (folder / "bytes_tokenizer.json").is_file(), ByteTokenizer,
                                 "one id per UTF-8 byte", files=("bytes_tokenizer.json",)))
