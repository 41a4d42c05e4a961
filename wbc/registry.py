"""Name -> factory registries (backbones, losses, views, degradations), filled by a decorator."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Generic, TypeVar

from wbc.errors import WbcError

F = TypeVar("F", bound=Callable[..., Any])


class Registry(Generic[F]):
    """A dict of named factories whose lookup fails with the list of known names."""

    def __init__(self, kind: str):
        self.kind = kind
        self._items: dict[str, F] = {}

    def register(self, name: str) -> Callable[[F], F]:
        def deco(fn: F) -> F:
            if name in self._items:
                raise ValueError(f"{self.kind} {name!r} registered twice")
            self._items[name] = fn
            return fn

        return deco

    def get(self, name: str) -> F:
        if name not in self._items:
            raise WbcError(f"unknown {self.kind} {name!r}; choose from {', '.join(self.names())}")
        return self._items[name]

    def names(self) -> list[str]:
        return list(self._items)

    def __contains__(self, name: str) -> bool:
        return name in self._items
