"""Typed settings from the command line: each component declares its settings as a dataclass whose
fields carry their help, their flag aliases and their range check, and the command line is parsed
once into those dataclasses. One field is one flag is one name.

    @dataclass
    class ScheduleConfig:
        warmup_steps: int = setting(0, "linear warmup steps", check=(at_least(0), ">= 0"))

    add_flags(parser.add_argument_group("schedule"), ScheduleConfig)
    args, given = parse(parser, argv)          # `given`: the flags the user actually typed
    schedule = from_args(ScheduleConfig, args)  # checked: one `error:` line for a value out of range
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import types
import typing
from collections.abc import Callable
from pathlib import Path

from gptkit.errors import UserError


def setting(default, help: str, *, aliases: tuple[str, ...] = (), choices=None, check=None, metavar=None):
    """A dataclass field that is also a command-line flag: --NAME (plus `aliases`), its help text,
    allowed `choices`, and `check` = (predicate, "what the value must be") for values given."""
    return dataclasses.field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices,
                                                        "check": check, "metavar": metavar})


def finite(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def at_least(lo) -> Callable[[float], bool]:
    return lambda v: finite(v) and v >= lo


def above(lo) -> Callable[[float], bool]:
    return lambda v: finite(v) and v > lo


def between(lo, hi) -> Callable[[float], bool]:
    """lo < v < hi."""
    return lambda v: finite(v) and lo < v < hi


def _base_type(hint):
    """int, float, str, Path or bool from an annotation such as `int | None`."""
    args = typing.get_args(hint) if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else ()
    return next((a for a in args if a is not type(None)), hint) if args else hint


def flag_name(prefix: str, field: str) -> str:
    """The one naming rule of a component's settings: --NAME_FIELD (`--muon_lr`, `--rotary_base`),
    and a field named like the component itself is --NAME (`--hellaswag FILE` turns it on)."""
    return field if not prefix or field == prefix else f"{prefix}_{field}"


def flags_of(cls, prefix: str = "") -> list[str]:
    """The flag destinations of a settings dataclass (see flag_name)."""
    return [flag_name(prefix, f.name) for f in dataclasses.fields(cls) if "help" in f.metadata]


def add_flags(group, cls, prefix: str = "", **defaults) -> None:
    """A flag per field of dataclass `cls` (named --PREFIX_FIELD when `prefix` is given), with the
    field's help; `defaults` override the field defaults (per-script defaults)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if "help" not in meta:
            continue
        kind = _base_type(hints[f.name])
        name = flag_name(prefix, f.name)
        kw = {"dest": name, "default": defaults.get(f.name, f.default), "help": meta["help"]}
        if kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        else:
            kw.update(type=kind if kind in (int, float, Path) else str, choices=meta["choices"], metavar=meta["metavar"])
        try:
            group.add_argument(f"--{name}", *meta["aliases"], **kw)
        except argparse.ArgumentError:
            raise UserError(f"two settings claim the flag --{name} (the second: {cls.__name__}.{f.name}); rename the "
                            "component or the setting") from None


def from_args(cls, args: argparse.Namespace, prefix: str = "", **extra):
    """An instance of `cls` from the parsed flags (checked), plus `extra` fields that are not flags."""
    values = {f.name: getattr(args, flag_name(prefix, f.name)) for f in dataclasses.fields(cls) if "help" in f.metadata}
    obj = cls(**values, **extra)
    check(obj, prefix)
    return obj


def check(obj, prefix: str = "") -> None:
    """Every field's range check: one error line naming the flag, the value and what it must be."""
    for f in dataclasses.fields(obj):
        rule = f.metadata.get("check")
        value = getattr(obj, f.name)
        if rule is not None and value is not None and not rule[0](value):
            raise UserError(f"--{flag_name(prefix, f.name)} must be {rule[1]}, got {value}")


_UNSET = object()


def parse(parser: argparse.ArgumentParser, argv=None) -> tuple[argparse.Namespace, set[str]]:
    """parse_args, and the set of destinations the user gave on the command line (defaults filled in
    after), so that conflicting flags can be refused instead of one silently winning."""
    dests = {a.dest: a.default for a in parser._actions if a.default != argparse.SUPPRESS}  # not --help
    ns = parser.parse_args(argv, argparse.Namespace(**dict.fromkeys(dests, _UNSET)))
    given = {k for k, v in vars(ns).items() if v is not _UNSET}
    for k, default in dests.items():
        if getattr(ns, k) is _UNSET:
            setattr(ns, k, default)
    return ns, given


def refuse_together(given: set[str], *pairs: tuple[str, str, str]) -> None:
    """(a, b, why) for flags that contradict each other: refused when both were typed."""
    for a, b, why in pairs:
        if a in given and b in given:
            raise UserError(f"--{a} and --{b} cannot be used together: {why}")


class HelpFormatter(argparse.RawDescriptionHelpFormatter, argparse.ArgumentDefaultsHelpFormatter):
    """--help keeps the module docstring's lines and shows each flag's default once: not for flags
    whose default is None (their help says what happens) or whose help already names its default."""

    def _get_help_string(self, action):
        if action.default is None or "default" in (action.help or "") or isinstance(action.default, bool):
            return action.help
        return super()._get_help_string(action)
