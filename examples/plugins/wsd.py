"""A user's schedule, as a plugin: warmup, stable, then a linear decay over the last fraction of the run."""

from dataclasses import dataclass

from gptkit.config import between, setting
from gptkit.schedules import ScheduleSpec, register_schedule, warmup


@dataclass
class WSDConfig:
    decay_fraction: float = setting(0.2, "share of the run spent decaying to --min_lr", check=(between(0, 1), "in (0, 1)"))


def wsd(step, s):
    w = warmup(step, s)
    if w is not None:
        return w
    decay_start = s.max_steps - round(s.config.decay_fraction * s.max_steps)
    if step < decay_start:
        return s.lr
    return s.lr + (s.min_lr - s.lr) * (step - decay_start + 1) / (s.max_steps - decay_start)


register_schedule(ScheduleSpec("wsd", wsd, "warmup, stable, linear decay", uses=("warmup_steps", "min_lr"),
                               config=WSDConfig))
