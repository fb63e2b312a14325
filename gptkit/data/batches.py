"""Batches from token streams: windows of a context length cut from memory-mapped shards, and the
BatchSampler whose batches depend only on (seed, position), so DDP ranks never share a window and a
resumed run sees exactly the batches it would have seen."""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from gptkit.errors import CheckpointError, UserError
from gptkit.tokenizer import EOT_TOKEN, get_tokenizer


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
