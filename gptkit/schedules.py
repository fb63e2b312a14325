"""Learning-rate schedules, pluggable: each is a function of the step and the schedule settings,
registered by name and chosen with `--schedule NAME` in both scripts. The schedule gives the LR of
the step; each parameter group runs at that LR times its `lr_scale` (1 unless an optimizer gives a
part of the model its own LR, as Muon does).

How to add a schedule: write `def lr_at(step, s: Schedule) -> float` in a file, then
`register_schedule(ScheduleSpec("name", lr_at, "what it does", uses=("warmup_steps",)))` there, and
import the file once (the built-ins are below). `uses` lists the shared settings it reads, so that a
setting it ignores is refused instead of silently doing nothing.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from gptkit.config import at_least, setting
from gptkit.errors import UserError
from gptkit.registry import Registry


@dataclass
class ScheduleConfig:
    schedule: str = setting("cosine", "learning-rate schedule (see its list of names)")
    warmup_steps: int = setting(0, "linear warmup steps, from lr/warmup_steps up to --lr", check=(at_least(0), ">= 0"))
    min_lr: float | None = setting(None, "final learning rate of a decaying schedule (default: lr / 10)",
                                   check=(at_least(0), "a finite number >= 0"))


@dataclass(frozen=True)
class Schedule:
    """What a schedule function is given: the resolved settings of this run."""
    lr: float
    min_lr: float
    warmup_steps: int
    max_steps: int
    config: object = None  # the schedule's own settings (its dataclass), if it has any


@dataclass(frozen=True)
class ScheduleSpec:
    name: str
    lr_at: Callable[[int, Schedule], float]
    help: str
    uses: tuple[str, ...] = ()  # the shared settings it reads: warmup_steps, min_lr
    config: type | None = None  # a dataclass of its own settings (flags --NAME_FIELD), given to lr_at as s.config


SCHEDULES: Registry[ScheduleSpec] = Registry("schedule", selector="schedule")
register_schedule = SCHEDULES.add  # register_x(spec): one line in the component's own file
schedule_spec = SCHEDULES.spec  # the spec of a name, or one error line listing the names


def resolve(cfg: ScheduleConfig, lr: float, max_steps: int, given: set[str] = frozenset(),
            own=None) -> tuple[ScheduleSpec, Schedule]:
    """The spec and settings of this run; a setting typed on the command line that the schedule does
    not use, or a --min_lr above --lr, is refused."""
    spec = schedule_spec(cfg.schedule)
    unused = [k for k in ("warmup_steps", "min_lr") if k in given and k not in spec.uses]
    if unused:
        raise UserError(f"--{unused[0]} has no effect with --schedule {spec.name}; drop it or pick a schedule that uses "
                        f"it ({', '.join(n for n, s in SCHEDULES.items() if unused[0] in s.uses)})")
    min_lr = cfg.min_lr if cfg.min_lr is not None else lr / 10
    if min_lr > lr:
        raise UserError(f"--min_lr {min_lr} is above --lr {lr}; a schedule decays from --lr down to --min_lr")
    if own is None and spec.config is not None:
        own = spec.config()
    return spec, Schedule(lr, min_lr, cfg.warmup_steps, max_steps, own)


def lr_function(spec: ScheduleSpec, s: Schedule) -> Callable[[int], float]:
    return lambda step: spec.lr_at(step, s)


def warmup(step: int, s: Schedule) -> float | None:
    """Linear warmup from lr/warmup_steps to lr (the LR of steps 0 .. warmup_steps - 1), else None."""
    return s.lr * (step + 1) / s.warmup_steps if step < s.warmup_steps else None


def constant(step: int, s: Schedule) -> float:
    w = warmup(step, s)
    return s.lr if w is None else w


def cosine(step: int, s: Schedule) -> float:
    """Linear warmup, then cosine decay to min_lr at max_steps."""
    w = warmup(step, s)
    if w is not None:
        return w
    if step >= s.max_steps:
        return s.min_lr
    progress = (step - s.warmup_steps) / max(1, s.max_steps - s.warmup_steps)
    return s.min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (s.lr - s.min_lr)


def cosine_lr(step: int, lr: float, min_lr: float, warmup_steps: int, max_steps: int) -> float:
    """The cosine schedule as a plain function (for plots and notebooks)."""
    return cosine(step, Schedule(lr, min_lr, warmup_steps, max_steps))


register_schedule(ScheduleSpec("constant", constant, "the same LR throughout (after any warmup)", uses=("warmup_steps",)))
register_schedule(ScheduleSpec("cosine", cosine, "warmup, then cosine decay to --min_lr", uses=("warmup_steps", "min_lr")))
