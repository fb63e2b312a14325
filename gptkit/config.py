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
import re
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

from gptkit.errors import UserError, excerpt

MAX_SETTINGS_FILE = 1 << 20  # a settings file (--config, a CORE bundle's core.yaml) is read only up to 1 MiB


def setting(default, help: str, *, aliases: tuple[str, ...] = (), choices=None, check=None, metavar=None,
            const=None):
    """A dataclass field that is also a command-line flag: --NAME (plus `aliases`), its help text,
    allowed `choices`, `check` = (predicate, "what the value must be") for values given, and `const`:
    the value of the flag given without one (None: a value is required)."""
    return dataclasses.field(default=default, metadata={"help": help, "aliases": aliases, "choices": choices,
                                                        "check": check, "metavar": metavar, "const": const})


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
            if meta.get("const") is not None:
                kw.update(nargs="?", const=meta["const"])
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
    """parse_args, and the set of destinations the user gave (defaults filled in after), so that
    conflicting flags can be refused instead of one silently winning. With --config FILE (a flag of
    the parser), the file's settings come first and flags typed on the command line override them;
    both count as given (a file's default values do not)."""
    argv = list(argv) if argv is not None else sys.argv[1:]
    dests = {a.dest: a.default for a in parser._actions if a.default != argparse.SUPPRESS}  # not --help
    appended = {a.dest for a in parser._actions if isinstance(a, argparse._AppendAction)}  # start from None, not _UNSET
    ns = parser.parse_args(argv, argparse.Namespace(**{k: None if k in appended else _UNSET for k in dests}))
    given = {k for k, v in vars(ns).items() if v is not _UNSET and not (k in appended and v is None)}
    for k in appended:
        if getattr(ns, k) is None:
            setattr(ns, k, _UNSET)
    from_file = config_values(parser, ns.config) if "config" in given and ns.config else {}
    for k, default in dests.items():
        if getattr(ns, k) is _UNSET:
            setattr(ns, k, from_file.get(k, default))
    # A file's value counts as given unless it is the default (a recorded run's file lists every setting).
    return ns, given | {k for k, v in from_file.items() if v != dests.get(k)}


# ----------------------------------------------------------------------------------------------
# Settings from a file: --config FILE.toml or .yaml


def read_config_file(path) -> dict:
    """The settings of a TOML or YAML file, flat: a table [NAME] holds a component's settings, so
    `[muon] lr = 0.02` is `muon_lr = 0.02` (the flags' own naming rule, gptkit.config.flag_name)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"--config {path}: no such file")
    if path.suffix not in (".toml", ".yaml", ".yml"):
        raise UserError(f"--config {path}: use a .toml or .yaml file")
    data = read_settings_file(path, f"--config {path}")
    if data is None and path.suffix != ".toml":
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"--config {path} holds {type(data).__name__}, not a table of settings")
    flat = {}
    for key, value in data.items():
        if isinstance(value, dict):
            for field, v in value.items():
                flat[flag_name(str(key), str(field))] = v
        else:
            flat[str(key)] = value
    return flat


def read_settings_file(path: Path, what: str):
    """A small TOML or YAML file's data, read safely: at most MAX_SETTINGS_FILE bytes; YAML without
    aliases (a 1 KB file of nested aliases expands to gigabytes) and with numbers as people write them
    (`1e-3` is a number, as in YAML 1.2 and TOML). Every problem is one line naming `what`."""
    with open(path, "rb") as f:
        text = f.read(MAX_SETTINGS_FILE + 1)
    if len(text) > MAX_SETTINGS_FILE:
        raise UserError(f"{what} is larger than {MAX_SETTINGS_FILE >> 20} MiB; a settings file is a few lines")
    try:
        if path.suffix == ".toml":
            import tomllib

            return tomllib.loads(text.decode("utf-8"))
        import yaml

        return yaml.load(text, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader, without aliases)
    except Exception as e:
        kind = "TOML" if path.suffix == ".toml" else "YAML"
        raise UserError(f"{what} is not valid {kind} ({str(e).strip().splitlines()[0][:120]})")


# YAML 1.2's floats: PyYAML (YAML 1.1) reads 1e-3 as a string, since it wants a dot.
YAML_FLOAT = re.compile(r"^[-+]?(?:[0-9][0-9_]*(?:\.[0-9_]*)?|\.[0-9_]+)[eE][-+]?[0-9]+$")


def _yaml_loader():
    import yaml

    class SettingsLoader(yaml.SafeLoader):
        def compose_node(self, parent, index):
            if self.check_event(yaml.AliasEvent):
                mark = self.peek_event().start_mark
                raise yaml.YAMLError(f"line {mark.line + 1}: aliases (*name) are not accepted in a settings file; "
                                     "write the value out")
            return super().compose_node(parent, index)

    SettingsLoader.add_implicit_resolver("tag:yaml.org,2002:float", YAML_FLOAT, list("-+0123456789."))
    return SettingsLoader


def config_values(parser: argparse.ArgumentParser, path) -> dict:
    """A --config file's settings as parsed values, each checked as its flag would be; an unknown key
    is one error line naming the key and the file."""
    actions = {a.dest: a for a in parser._actions if a.default != argparse.SUPPRESS}
    out = {}
    for key, value in read_config_file(path).items():
        dest = key.replace("-", "_")
        if dest not in actions or dest == "config":
            raise UserError(f"--config {path}: unknown setting {excerpt(key)} (there is no flag --{excerpt(dest)[1:-1]})")
        out[dest] = _typed(actions[dest], value, f"--config {path}: {key}")
    return out


def _typed(action: argparse.Action, value, where: str):
    """A file's value as the flag would have parsed it: its type, its choices, lists for repeatable flags."""
    if isinstance(action, argparse._AppendAction):
        values = value if isinstance(value, list) else [value]
        return [_typed_one(action, v, where) for v in values]
    if isinstance(action, (argparse.BooleanOptionalAction, argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if value is not None and not isinstance(value, bool):
            raise UserError(f"{where} must be true or false, got {excerpt(value)}")
        return value
    return _typed_one(action, value, where)


def _typed_one(action: argparse.Action, value, where: str):
    if value is None:
        return None
    kind = action.type
    ok = {int: lambda v: isinstance(v, int) and not isinstance(v, bool),
          float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool)}.get(kind, lambda v: isinstance(v, str))
    if not ok(value):
        what = {int: "a whole number", float: "a number"}.get(kind, "a string")
        raise UserError(f"{where} must be {what}, got {excerpt(value)}")
    value = kind(value) if kind in (int, float, Path) else value
    if action.choices is not None and value not in action.choices:
        raise UserError(f"{where} must be one of {', '.join(map(str, action.choices))}, got {excerpt(value)}")
    return value


def write_config_file(path, settings: dict, header: str = "") -> Path:
    """A TOML or YAML file (by suffix) of flat settings, that --config reads back to the same values.
    None values are left out (the flag's default is None)."""
    from gptkit.files import atomic_write

    path = Path(path)
    items = {k: (str(v) if isinstance(v, Path) else v) for k, v in sorted(settings.items()) if v is not None}
    if path.suffix in (".yaml", ".yml"):
        import yaml

        body = yaml.safe_dump(items, sort_keys=True)
    elif path.suffix == ".toml":
        body = "".join(f"{k} = {_toml(v)}\n" for k, v in items.items())
    else:
        raise UserError(f"{path}: write a .toml or .yaml file")
    text = "".join(f"# {line}\n" for line in header.splitlines()) + body
    return atomic_write(path, lambda f: f.write(text.encode("utf-8")))


def _toml(v) -> str:
    import json

    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        if not math.isfinite(v):
            raise UserError(f"a setting of {v} cannot be written to TOML")
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return json.dumps(str(v))  # a TOML basic string: JSON's escapes are TOML's


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
