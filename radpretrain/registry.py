"""Small explicit registries filled by decorators, with "did you mean" errors for unknown names."""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from radpretrain.errors import ConfigError

T = TypeVar("T")


def did_you_mean(name: str, known: list[str] | tuple[str, ...]) -> str:
    """Return ' Did you mean 'x'?' for the closest known name, or an empty string."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    return f" Did you mean '{close[0]}'?" if close else ""


class Registry(Generic[T]):
    """A named table of constructors; `kind` is used in error messages ("task", "strategy" ...)."""

    def __init__(self, kind: str) -> None:
        self.kind = kind
        self._entries: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(obj: T) -> T:
            if name in self._entries:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._entries[name] = obj
            return obj

        return add

    def get(self, name: str) -> T:
        if name not in self._entries:
            known = sorted(self._entries)
            raise ConfigError(f"Unknown {self.kind} '{name}'.{did_you_mean(name, known)} Known: {', '.join(known)}")
        return self._entries[name]

    def names(self) -> list[str]:
        return sorted(self._entries)

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
