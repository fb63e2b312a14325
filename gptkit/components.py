"""Components' own settings on the command line, the same way for every kind: a spec that carries a
settings dataclass (`config=`) gets a flag per field, --NAME_FIELD (gptkit.config.flag_name), in a
group of its own; a setting typed for a component that this run does not use is refused in one line,
not silently ignored; and the chosen component's settings are read back checked."""

from __future__ import annotations

import argparse

from gptkit.config import add_flags, flags_of, from_args
from gptkit.errors import UserError
from gptkit.registry import Registry


def add_component_flags(p: argparse.ArgumentParser, registry: Registry, **defaults) -> None:
    """A group of flags per configured spec of `registry` ("--optimizer muon", "--position rotary")."""
    for name, spec in registry.configured():
        title = f"--{registry.selector} {name}" if registry.selector else f"{registry.what} {name}"
        add_flags(p.add_argument_group(title), spec.config, prefix=name, **defaults.get(name, {}))


def set_choices(p: argparse.ArgumentParser, dest: str, registry: Registry) -> None:
    """The choices of a selector flag (--optimizer, --position, ...) are the registry's names."""
    action = next(a for a in p._actions if a.dest == dest)
    action.choices = list(registry)
    action.help = f"{action.help}: {', '.join(registry)}"


def typed_settings(spec, given: set[str]) -> list[str]:
    """The flags of `spec`'s settings that were typed (or set in a --config file)."""
    return [d for d in flags_of(spec.config, spec.name) if d in given] if spec.config is not None else []


def refuse_unselected(registry: Registry, chosen: set[str] | str, given: set[str]) -> None:
    """One error line for a setting of a component that this run does not use."""
    chosen = {chosen} if isinstance(chosen, str) else set(chosen)
    for name, spec in registry.configured():
        typed = typed_settings(spec, given) if name not in chosen else []
        if typed:
            using = " and ".join(f"--{registry.selector} {c}" for c in sorted(chosen)) if registry.selector else "others"
            raise UserError(f"--{typed[0]} is a setting of --{registry.selector} {name}; this run uses {using}"
                            if registry.selector else f"--{typed[0]} is a setting of {registry.what} {name}, "
                                                      "which this run does not use")


def settings(spec, args: argparse.Namespace):
    """The chosen spec's settings from the parsed flags, checked (None when it has none)."""
    return from_args(spec.config, args, prefix=spec.name) if spec.config is not None else None
