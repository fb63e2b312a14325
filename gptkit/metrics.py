"""What a training step reports, pluggable: each metric is a StepMetric registered by name. Every metric
goes to the log line (in registration order), to train.log, W&B and TensorBoard (as train/NAME), and,
with a `history` key, to the run's losses.json.

The contract of a metric:
- `device(ctx)` runs on every rank after the backward pass, before clipping and the update; it returns
  a 0-d tensor, or a 1-D one (a value per layer, say), and stays on the device (no host sync).
  `ctx.grads()` gives the gradients as clipping leaves them, `ctx.grads(clipped=False)` as the
  backward made them (both averaged over the ranks, as DDP and FSDP reduce them); `ctx.clip_coef` is
  the factor clipping multiplies them by; `ctx.parameters()` the weights. They are local tensors: under
  FSDP each rank sees its shard of each tensor (`ctx.sharded`), never a DTensor.
- `after_update(ctx)` runs the same way after the optimizer's update: an update-to-weight ratio keeps
  what it needs in `ctx.stash` in its `device` hook and compares in this one.
- `reduce` says how the ranks' values combine: "mean" (the default), "sum", "max", or "shards": the
  sum of the ranks' parts of a statistic of sharded tensors under FSDP (a sum of squares over each
  rank's shard), the mean otherwise (where every rank holds the whole tensors). Every metric of a step
  travels in one all-reduce (a second one only for "max").
- `finish(reduced)` turns the reduced tensor (on the host) into the logged number (default: its value).
- `host(h)` is a metric computed on the host when the step is logged (tok/s, MFU), instead.
- `config`: a settings dataclass (flags --NAME_FIELD); the hooks find it in `ctx.config`.

How to add a metric: `register_metric(StepMetric("name", show=lambda v: f"name {v:.3f}", device=fn))` in
a file of its own, loaded with `--plugin FILE`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from gptkit.registry import Registry

REDUCTIONS = ("mean", "sum", "max", "shards")


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if hasattr(t, "to_local") else t


@dataclass
class StepContext:
    """What a device metric may look at, on each rank."""
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches (0-d, fp32)
    grad_norm: torch.Tensor  # the global gradient norm before clipping (0-d), the same on every rank
    model: torch.nn.Module
    optimizer: object
    tokens: int  # tokens this rank trained on in the step
    clip_coef: torch.Tensor = None  # what clipping multiplies the gradients by (0-d, at most 1)
    sharded: bool = False  # FSDP: each rank holds a shard of each parameter and gradient
    world_size: int = 1
    settings: dict = field(default_factory=dict)  # every metric's settings, by name
    config: object = None  # the settings of the metric being measured (set before each call)
    stash: dict = field(default_factory=dict)  # what a metric keeps from its device hook to its after_update hook

    def parameters(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, weights) of the plain model, local tensors (this rank's shard under FSDP)."""
        from gptkit.model import unwrap_model

        for name, p in unwrap_model(self.model).named_parameters():
            yield name, _local(p.detach())

    def grads(self, clipped: bool = True) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, gradient) of every parameter that has one, as clipping leaves it (or, with
        clipped=False, as the backward made it); local tensors (this rank's shard under FSDP)."""
        from gptkit.model import unwrap_model

        for name, p in unwrap_model(self.model).named_parameters():
            if p.grad is not None:
                g = _local(p.grad.detach())
                yield name, (g * self.clip_coef.to(g.dtype) if clipped else g)


@dataclass
class HostContext:
    """What a host metric may look at when a step is logged."""
    lr: float
    tokens_per_sec: float  # over the steps since the last log line
    ms_per_step: float  # the same
    mfu: float | None  # model FLOPs utilisation per device, when the device's peak is known


@dataclass(frozen=True)
class StepMetric:
    name: str  # the key in the step's metrics (train/NAME in W&B and TensorBoard)
    show: Callable[[float], str]  # its part of the log line
    device: Callable[[StepContext], torch.Tensor] | None = None  # before clipping and the update
    host: Callable[[HostContext], float | None] | None = None
    history: str | None = None  # its list in losses.json (none if None)
    reduce: str = "mean"  # across ranks: mean, sum, max or shards
    after_update: Callable[[StepContext], torch.Tensor] | None = None  # after the optimizer's update
    finish: Callable[[torch.Tensor], float] | None = None  # the reduced tensor -> the logged value
    config: type | None = None  # a dataclass of its own settings (flags --NAME_FIELD)

    def __post_init__(self):
        if self.reduce not in REDUCTIONS:
            from gptkit.errors import UserError

            raise UserError(f"metric {self.name!r}: reduce must be one of {', '.join(REDUCTIONS)}, got {self.reduce!r}")


STEP_METRICS: Registry[StepMetric] = Registry("step metric")
register_metric = STEP_METRICS.add  # register_metric(spec): one line in the metric's own file


def device_metrics() -> list[StepMetric]:
    return [m for m in STEP_METRICS.values() if m.device is not None]


def update_metrics() -> list[StepMetric]:
    return [m for m in STEP_METRICS.values() if m.after_update is not None]


def host_metrics() -> list[StepMetric]:
    return [m for m in STEP_METRICS.values() if m.host is not None]


def format_log_line(m: dict) -> str:
    """`step N/MAX | loss ... | lr ... | ...`: every registered metric the step has, in order."""
    parts = [f"step {m['step']:>7d}/{m['max_steps']}"]
    parts += [spec.show(m[name]) for name, spec in STEP_METRICS.items() if m.get(name) is not None]
    return " | ".join(parts)


register_metric(StepMetric("loss", lambda v: f"loss {v:.4f}", device=lambda c: c.loss, history="train_loss"))
register_metric(StepMetric("lr", lambda v: f"lr {v:.3e}", host=lambda h: h.lr, history="lr"))
register_metric(StepMetric("grad_norm", lambda v: f"grad_norm {v:.3f}", device=lambda c: c.grad_norm.float(),
                           history="grad_norm"))
register_metric(StepMetric("tokens_per_sec", lambda v: f"tok/s {v:>9.0f}", host=lambda h: h.tokens_per_sec))
register_metric(StepMetric("ms_per_step", lambda v: f"ms/step {v:>8.1f}", host=lambda h: h.ms_per_step))
register_metric(StepMetric("mfu", lambda v: f"mfu {100 * v:.1f}%", host=lambda h: h.mfu))
