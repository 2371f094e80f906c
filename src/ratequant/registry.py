"""The one registry style: a named table filled by a decorator.

Quantizer designs, allocation strategies, distortion metrics, evaluation tasks and command-line commands are
each a :class:`Registry`. Adding one is one definition plus one decorator, and the shared tests pick it up by
iterating the registry::

    STRATEGIES = Registry("allocation strategy")

    @STRATEGIES.register
    class PerLayer(Strategy):
        name = "per-layer"

An entry is registered under its ``name`` attribute (or the name passed to ``register(name=...)``); looking
up an unknown name raises :class:`~ratequant.errors.RateQuantError` listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar, overload

from ratequant.errors import RateQuantError

T = TypeVar("T")


class Registry(Generic[T]):
    """Entries of one kind by name, in registration order; ``what`` names the kind in error messages."""

    def __init__(self, what: str):
        self.what = what
        self._entries: dict[str, T] = {}

    @overload
    def register(self, entry: T) -> T: ...

    @overload
    def register(self, *, name: str) -> Callable[[T], T]: ...

    def register(self, entry=None, *, name: str | None = None):
        """Decorator: ``@registry.register`` (uses ``entry.name``) or ``@registry.register(name="...")``."""

        def add(item: T) -> T:
            key = name if name is not None else getattr(item, "name", None)
            if not isinstance(key, str) or not key:
                raise TypeError(f"a {self.what} needs a non-empty string `name` to be registered")
            if key in self._entries and self._entries[key] is not item:
                raise TypeError(f"{self.what} {key!r} is registered twice")
            self._entries[key] = item
            return item

        return add if entry is None else add(entry)

    def get(self, name: str) -> T:
        """The entry called ``name``; an unknown name raises :class:`RateQuantError` naming the choices."""
        try:
            return self._entries[name]
        except (KeyError, TypeError):
            raise RateQuantError(f"unknown {self.what} {name!r}; choose one of: {', '.join(self.names())}") from None

    def names(self) -> tuple[str, ...]:
        return tuple(self._entries)

    def items(self) -> list[tuple[str, T]]:
        return list(self._entries.items())

    def __contains__(self, name: object) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"Registry({self.what!r}: {', '.join(self._entries)})"


__all__ = ["Registry"]
