"""Evaluations beside the validation loss, pluggable: each is an EvalSpec in a file of its own with
its settings as a dataclass (its flags), registered once. A training run runs the enabled ones every
their own number of steps and at the end, on every rank (each rank scores its share), and logs their
values as eval/NAME to the log line, train.log, W&B and TensorBoard.

How to add an evaluation: a config dataclass, `enabled(config)`, and `build(config, runtime)`
returning fn(model) -> {name: value} (and, optionally, `check(config)` for its inputs, run before the
run folder is touched); `register_eval(EvalSpec(...))` in its file, and the file in BUILTIN below.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from gptkit.config import add_flags, from_args
from gptkit.errors import UserError
from gptkit.registry import Registry


@dataclass(frozen=True)
class EvalSpec:
    name: str
    config: type  # a dataclass of its settings (their flags); one field turns it on
    enabled: Callable[[object], bool]
    every: Callable[[object], int]  # steps between runs (0: only at the end)
    build: Callable[[object, object], Callable]  # (config, runtime) -> fn(model) -> {name: value}
    check: Callable[[object], None] = lambda cfg: None  # its inputs, checked before any long work (UserError)


EVALS: Registry[EvalSpec] = Registry("evaluation")
register_eval = EVALS.add  # register_eval(spec): one line in the evaluation's own file


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    for spec in EVALS.values():
        add_flags(p.add_argument_group(f"evaluation: {spec.name}"), spec.config)


def enabled(args: argparse.Namespace, given: set[str]) -> list[tuple[EvalSpec, object]]:
    """(spec, config) of the evaluations this command line turns on; a setting of one that is off is refused."""
    out = []
    for spec in EVALS.values():
        cfg = from_args(spec.config, args)
        if spec.enabled(cfg):
            spec.check(cfg)
            out.append((spec, cfg))
            continue
        typed = [f.name for f in dataclasses.fields(spec.config) if f.name in given]
        if typed:
            raise UserError(f"--{typed[0]} has no effect without the setting that turns the {spec.name} evaluation on "
                            f"(--{dataclasses.fields(spec.config)[0].name})")
    return out


def build(selected: list[tuple[EvalSpec, object]], runtime) -> list:
    from gptkit.run import Evaluation

    return [Evaluation(spec.name, spec.every(cfg), spec.build(cfg, runtime)) for spec, cfg in selected]


BUILTIN = ("gptkit.evals.hellaswag",)
for _module in BUILTIN:
    importlib.import_module(_module)
