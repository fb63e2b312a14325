"""Evaluations beside the validation loss, pluggable: each is an EvalSpec in a file of its own with its
settings as a dataclass, registered once. Its flags follow the components' rule: the field named
like the evaluation turns it on (`--hellaswag FILE`), the others are --NAME_FIELD (`--hellaswag_every`).
Both training scripts run the enabled ones every their own number of steps and at the end, on every
rank (each rank scores its share), and log their values as eval/NAME to the log line, train.log, W&B
and TensorBoard; `wt_load.py eval` runs them on any weights.

How to add an evaluation: a settings dataclass (a field named like the evaluation, an `every`), and
`build(config, runtime)` returning fn(model) -> {name: value}, on the shared scorer
(gptkit/evals/scorer.py: the task's items and its rule; batching, truncation, ranks are the scorer's);
optionally `check(config)`, which refuses bad inputs in one line before the run folder is touched;
then `register_eval(EvalSpec(...))` in its file, loaded with `--plugin FILE`.
"""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable
from dataclasses import dataclass

from gptkit.components import typed_settings
from gptkit.config import add_flags, from_args
from gptkit.errors import UserError
from gptkit.registry import Registry


@dataclass(frozen=True)
class EvalSpec:
    name: str
    config: type  # a dataclass of its settings: a field named like the evaluation turns it on
    build: Callable[[object, object], Callable]  # (config, runtime) -> fn(model) -> {name: value}
    check: Callable[[object], None] = lambda cfg: None  # its inputs, checked before any long work (UserError)
    help: str = ""

    def enabled(self, cfg) -> bool:
        return getattr(cfg, self.name) is not None

    def every(self, cfg) -> int:
        return getattr(cfg, "every", 0)  # steps between runs (0: only at the end)


EVALS: Registry[EvalSpec] = Registry("evaluation")
register_eval = EVALS.add  # register_eval(spec): one line in the evaluation's own file


def add_eval_flags(p: argparse.ArgumentParser) -> None:
    for spec in EVALS.values():
        add_flags(p.add_argument_group(f"evaluation: {spec.name}"), spec.config, prefix=spec.name)


def enabled(args: argparse.Namespace, given: set[str]) -> list[tuple[EvalSpec, object]]:
    """(spec, config) of the evaluations this command line turns on; a setting of one that is off is refused."""
    out = []
    for spec in EVALS.values():
        cfg = from_args(spec.config, args, prefix=spec.name)
        if spec.enabled(cfg):
            spec.check(cfg)
            out.append((spec, cfg))
            continue
        typed = typed_settings(spec, given)
        if typed:
            raise UserError(f"--{typed[0]} has no effect without the setting that turns the {spec.name} evaluation on "
                            f"(--{spec.name})")
    return out


def build(selected: list[tuple[EvalSpec, object]], runtime) -> list:
    from gptkit.run import Evaluation

    return [Evaluation(spec.name, spec.every(cfg), spec.build(cfg, runtime)) for spec, cfg in selected]


BUILTIN = ("gptkit.evals.hellaswag", "gptkit.evals.core")
for _module in BUILTIN:
    importlib.import_module(_module)
