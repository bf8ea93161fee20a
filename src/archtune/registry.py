"""One registry idiom for every extension point: families, data formats, plugins, patches,
experts implementations.

In the style of transformers' `GeneralInterface` (`ALL_ATTENTION_FUNCTIONS`,
`ALL_EXPERTS_FUNCTIONS`): a name -> object mapping, filled by one `register` call in the
extension's own file. A name registered twice, or looked up but never registered, is an error
that says which file to edit. A registry may `discover` its entries on first use (import the
modules that register), so adding an extension is adding its file.

    FORMATS = Registry("data format", "src/archtune/data/formats.py")
    FORMATS.register("alpaca", alpaca)
    FORMATS["alpaca"]          # the function
    FORMATS["alpaka"]          # KeyError: no data format 'alpaka'; known: alpaca, ... (add one in ...)
"""
from __future__ import annotations

from typing import Callable, Generic, Iterator, TypeVar

T = TypeVar("T")


class Registry(Generic[T]):
    def __init__(self, kind: str, home: str, *, discover: Callable[[], None] | None = None):
        self.kind = kind  # what an entry is, for messages: "family", "data format", ...
        self.home = home  # where entries are registered, for messages
        self._entries: dict[str, T] = {}
        self._discover = discover
        self._discovered = discover is None

    def _load(self) -> None:
        if not self._discovered:
            self._discovered = True  # first: a module being discovered may look itself up
            self._discover()

    def register(self, name: str, obj: T) -> T:
        """Add `name`; a name already registered is a KeyError (names are unique)."""
        if not isinstance(name, str) or not name:
            raise KeyError(f"a {self.kind} needs a non-empty name (registered in {self.home})")
        if name in self._entries:
            raise KeyError(f"{self.kind} {name!r} is registered twice; names must be unique (see {self.home})")
        self._entries[name] = obj
        return obj

    def __getitem__(self, name: str) -> T:
        self._load()
        try:
            return self._entries[name]
        except KeyError:
            known = ", ".join(sorted(self._entries)) or "none"
            raise KeyError(f"no {self.kind} {name!r}; known: {known} (add one in {self.home})") from None

    def get(self, name: str, default: T | None = None) -> T | None:
        self._load()
        return self._entries.get(name, default)

    def __contains__(self, name: object) -> bool:
        self._load()
        return name in self._entries

    def __iter__(self) -> Iterator[str]:
        self._load()
        return iter(list(self._entries))

    def __len__(self) -> int:
        self._load()
        return len(self._entries)

    def names(self) -> list[str]:
        return list(self)

    def items(self) -> list[tuple[str, T]]:
        self._load()
        return list(self._entries.items())

    def values(self) -> list[T]:
        return [obj for _, obj in self.items()]


__all__ = ["Registry"]
