"""A registry: the named specs of one kind of component. Seven kinds plug in the same way: optimizers,
schedules, step metrics, block parts (attention, position, norm, MLP, init; and named sets of them,
the archs), evaluations, data sources and file formats. A component's file registers its spec once at
import; the kind's module lists its built-ins in one place (`BUILTIN`), and a user's file is loaded
with `--plugin` (gptkit/plugins.py). The flags take their choices from the registry, and a name that
is not in it gets one error line listing those that are.

A spec is a frozen dataclass with at least `name`; one that carries `config` (a settings dataclass)
gets a flag per field, named by gptkit.config.flag_name: --NAME_FIELD.
"""

from __future__ import annotations

import dataclasses
from typing import TypeVar

from gptkit.errors import UserError

T = TypeVar("T")
ALL: list[Registry] = []  # every registry, so a plugin that fails halfway can be undone (gptkit.plugins)


class Registry(dict[str, T]):
    def __init__(self, what: str, selector: str | None = None):
        super().__init__()
        self.what = what  # "optimizer", "schedule": how an error names a spec of this kind
        self.selector = selector  # the flag that chooses one (--optimizer NAME); None: every one is active
        ALL.append(self)

    def add(self, spec: T) -> T:
        """Register `spec` under its `.name` (returned, so it can decorate or assign). A name that is
        taken by another spec is refused: a plugin never replaces a built-in or another plugin."""
        old = self.get(spec.name)
        if old is not None and old is not spec:
            raise UserError(f"{self.what} {spec.name!r} is already registered; give the new one another name")
        self[spec.name] = spec
        return spec

    def remove(self, name: str) -> None:
        """Take a spec out again (tests that register one for a while)."""
        self.pop(name, None)

    def spec(self, name: str) -> T:
        if name not in self:
            hint = " (if it comes from a plugin, give --plugin FILE)" if self else ""
            raise UserError(f"unknown {self.what} {name!r}; choose one of {', '.join(self)}{hint}")
        return self[name]

    def configured(self):
        """(name, spec) of the specs that carry a settings dataclass."""
        return [(n, s) for n, s in self.items() if getattr(s, "config", None) is not None]


def settings_of(spec, values: dict | None = None):
    """An instance of a spec's settings dataclass from a dict of field values (a checkpoint's record;
    fields it lacks take their defaults, unknown ones are refused), or None when it has none."""
    config = getattr(spec, "config", None)
    if config is None:
        return None
    known = {f.name for f in dataclasses.fields(config)}
    unknown = sorted(set(values or {}) - known)
    if unknown:
        raise UserError(f"{spec.name} has no setting {unknown[0]!r} (it has {', '.join(sorted(known)) or 'none'})")
    return config(**(values or {}))
