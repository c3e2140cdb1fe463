"""How long work reports progress: the library calls a Reporter; the CLI draws it with rich."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Protocol


class Reporter(Protocol):
    def stage(self, name: str, total: int | None = None) -> contextlib.AbstractContextManager[Callable[[int], None]]:
        """A context for one stage; the yielded callable advances it by n units of ``total``."""
        ...

    def note(self, message: str) -> None:
        """Something the user should read (a skipped step, a fallback)."""
        ...


class NullReporter:
    """Reports nothing: the library default."""

    def __init__(self) -> None:
        self.notes: list[str] = []

    @contextlib.contextmanager
    def stage(self, name: str, total: int | None = None) -> Iterator[Callable[[int], None]]:
        yield lambda n=1: None

    def note(self, message: str) -> None:
        self.notes.append(message)
