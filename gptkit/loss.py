"""The loss, and evaluation with it: mean cross-entropy in fp32 (with a lean CPU backward, and one
compiled function on GPUs), summed losses of a loader split across ranks, and the train/validation
losses of a run, token-weighted so any world size gives the same value for the same batches."""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from gptkit.errors import UserError
from gptkit.tokenizer import token_byte_lengths


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


def loss_sums(data_loader, model, device, num_batches: int | None = None, autocast=None, rank: int = 0,
              world_size: int = 1, bytes_too: bool = False) -> tuple:
    """(summed loss, tokens) over this rank's share of the first `num_batches` batches: each batch is
    cut into world_size slices and rank r takes slice r, so the ranks split the work and their sums
    add up to what one process gets from the same batches. With `bytes_too`, also (summed loss over
    the targets that stand for text, their UTF-8 bytes): what bits per byte divide."""
    n = len(data_loader) if num_batches is None else min(num_batches, len(data_loader))
    if n == 0:
        raise _empty_loader_error()
    total, count, text_loss, nbytes = 0.0, 0, 0.0, 0
    lengths = torch.from_numpy(token_byte_lengths()).to(device) if bytes_too else None
    with autocast or contextlib.nullcontext():
        for i, (x, y) in enumerate(data_loader):
            if i >= n:
                break
            x, y = x.tensor_split(world_size)[rank], y.tensor_split(world_size)[rank]
            if not len(x):
                continue
            losses = calc_loss_batch(x, y, model, device, reduction="none")  # (B*T,)
            total += losses.sum().item()
            count += y.numel()
            if lengths is not None:
                b = lengths[y.to(device).flatten()]
                text_loss += losses[b > 0].sum().item()
                nbytes += int(b.sum().item())
    return (total, count, text_loss, nbytes) if bytes_too else (total, count)


def bits_per_byte(loss_sum: float, nbytes: int) -> float:
    """Summed loss (nats) over target tokens / (ln 2 x their UTF-8 bytes): a tokenizer-free measure.
    <|endoftext|> targets stand for no text: they count in neither sum (as nanochat's bpb)."""
    return loss_sum / (math.log(2) * nbytes) if nbytes else float("nan")


@torch.no_grad()
def evaluate_model(model, train_loader, val_loader, device, eval_iter: int, autocast=None, runtime=None,
                   with_bpb: bool = False):
    """(train loss, val loss) over `eval_iter` batches each, token-weighted (and the validation bits
    per byte with `with_bpb`). Under several processes the loaders hold global batches (per-device
    batch x world size), each rank evaluates its slice and the sums are all-reduced: the same global
    batch gives the same value for any world size."""
    was_training = model.training
    model.eval()
    rank, world = (runtime.rank, runtime.world_size) if runtime else (0, 1)
    try:
        sums = list(loss_sums(train_loader, model, device, eval_iter, autocast, rank, world)) if train_loader else [0.0, 0]
        sums += loss_sums(val_loader, model, device, eval_iter, autocast, rank, world, bytes_too=True)
        if world > 1:
            import torch.distributed as dist

            t = torch.tensor(sums, dtype=torch.float64, device=runtime.device)
            dist.all_reduce(t)
            sums = t.tolist()
    finally:
        model.train(was_training)
    train_loss = sums[0] / sums[1] if train_loader is not None else None
    out = (train_loss, sums[2] / sums[3])
    return (*out, bits_per_byte(sums[4], int(sums[5]))) if with_bpb else out
