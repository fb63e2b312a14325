"""A registry: the named specs of one kind of component (attentions, optimizers, schedules,
evaluations). A component's file registers its spec once at import; the flags take their choices
from the registry, and a name that is not in it gets one error line listing those that are."""

from __future__ import annotations

from typing import TypeVar

from gptkit.errors import UserError

T = TypeVar("T")


class Registry(dict[str, T]):
    def __init__(self, what: str):
        super().__init__()
        self.what = what  # "optimizer", "schedule": how an error names a spec of this kind

    def add(self, spec: T) -> T:
        """Register `spec` under its `.name` (returned, so it can decorate or assign)."""
        self[spec.name] = spec
        return spec

    def spec(self, name: str) -> T:
        if name not in self:
            raise UserError(f"unknown {self.what} {name!r}; choose one of {', '.join(self)}")
        return self[name]
