"""Stage timings: the one clock of a run. ``Timings.stage(name)`` times a block and adds its seconds
to ``name`` (a stage run twice, like the guard resumed after a file round, sums), which is what
report.json's ``timings_s`` holds."""

from __future__ import annotations

import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

__all__ = ["Timings"]


class Timings(dict[str, float]):
    """Seconds by stage name, in the order the stages first ran."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.started = time.perf_counter()
        # told "<stage> ..." as each stage starts (a long run's progress on stderr); None: silent
        self.announce: Callable[[str], None] | None = None

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block and add its seconds to ``name``."""
        start = time.perf_counter()
        if self.announce is not None:
            self.announce(f"{name} ...")
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - start

    def say(self, text: str) -> None:
        """Pass ``text`` to ``announce`` (progress inside a stage), if anyone listens."""
        if self.announce is not None:
            self.announce(text)

    def elapsed(self) -> float:
        """Seconds since the run started (``total``, or a stage whose figure is written before it ends)."""
        return time.perf_counter() - self.started

    def rounded(self, digits: int = 3) -> dict[str, float]:
        """The seconds rounded for the report."""
        return {k: round(v, digits) for k, v in self.items()}
