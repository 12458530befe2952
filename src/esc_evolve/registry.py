"""Named registries, in the style of lm-evaluation-harness's `api/registry.py`.

Metrics, generation backends and judge backends are each a `Registry`: configs select an entry by name, and a
project adds its own with `@REGISTRY.register("name")` without touching esc-evolve.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar

from esc_evolve.errors import ConfigError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries by name. `what` names an entry in messages ("generation backend"), `setting` the config key that
    selects one; `load` imports the module that registers the built-in entries, on the first lookup."""

    def __init__(self, what: str, setting: str, load: Callable[[], object] | None = None) -> None:
        self.what = what
        self.setting = setting
        self.entries: dict[str, T] = {}
        self._load = load

    def register(self, name: str) -> Callable[[T], T]:
        def decorate(entry: T) -> T:
            if name in self.entries:
                raise ValueError(f"{self.what} {name!r} registered twice")
            self.entries[name] = entry
            return entry

        return decorate

    def get(self, name: str) -> T:
        """The entry `name`; a ConfigError naming the setting and the registered names when there is none."""
        if name not in self.names():
            raise ConfigError(f"unknown {self.what} {name!r} ({self.setting}); registered: {', '.join(self.names())}")
        return self.entries[name]

    def names(self) -> list[str]:
        if self._load is not None:
            self._load()
        return sorted(self.entries)
