"""Name -> builder tables for the parts a config picks by name (poolings, losses, ...)."""

from __future__ import annotations

import difflib
from typing import Callable, Generic, Iterator, TypeVar

from foldtune.config import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """A named table of builders; an unknown name fails with the list of valid ones."""

    def __init__(self, kind: str, config_key: str):
        self.kind = kind
        self.config_key = config_key
        self._builders: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        def add(builder: T) -> T:
            if name in self._builders:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            self._builders[name] = builder
            return builder

        return add

    def get(self, name: str) -> T:
        if name not in self._builders:
            close = difflib.get_close_matches(name, self.names(), n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            raise ConfigError(
                f"unknown {self.kind} '{name}' in '{self.config_key}'{hint}; valid: {', '.join(self.names())}"
            )
        return self._builders[name]

    def names(self) -> list[str]:
        return sorted(self._builders)

    def __contains__(self, name: object) -> bool:
        return name in self._builders

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())
