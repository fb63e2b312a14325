"""What a training step reports, pluggable: each metric is a StepMetric registered by name. A metric
is either measured on the device during the step (`device`: a scalar tensor per rank; every device
metric of a step travels in the step's one all-reduce and is averaged over the ranks) or derived on
the host when the step is logged (`host`: from the step's timing and settings). Every metric goes to
the log line (in registration order), to train.log, W&B and TensorBoard (as train/NAME), and, with a
`history` key, to the run's losses.json.

How to add a metric: `register_metric(StepMetric("name", show=lambda v: f"name {v:.3f}", device=fn))`
in a file of its own, where fn(ctx: StepContext) returns a 0-d tensor; import the file once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from gptkit.registry import Registry


@dataclass
class StepContext:
    """What a device metric may look at, on each rank, after the backward pass and before the update."""
    loss: torch.Tensor  # this rank's mean loss over the step's micro-batches (0-d, fp32)
    grad_norm: torch.Tensor  # the global gradient norm before clipping (0-d)
    model: torch.nn.Module
    optimizer: object
    tokens: int  # tokens this rank trained on in the step


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
    device: Callable[[StepContext], torch.Tensor] | None = None
    host: Callable[[HostContext], float | None] | None = None
    history: str | None = None  # its list in losses.json (none if None)


STEP_METRICS: Registry[StepMetric] = Registry("step metric")
register_metric = STEP_METRICS.add  # register_metric(spec): one line in the metric's own file


def device_metrics() -> list[StepMetric]:
    return [m for m in STEP_METRICS.values() if m.device is not None]


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
