"""Progress for long work: live on a terminal, plain lines in CI and pipes. Always on stderr."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TextIO

from rich.console import Console
from rich.status import Status

from reprobox.engine import BuildEvent

__all__ = ["Reporter"]


class Reporter:
    """Stage headings, build steps and byte counts for a person or a log file."""

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None) -> None:
        self._stream = stream if stream is not None else sys.stderr
        if live is None:
            live = self._stream.isatty() and os.environ.get("CI", "") in {"", "false", "0"}
        self.live = live
        self._console = Console(file=self._stream, highlight=False, soft_wrap=True)
        self._status: Status | None = None
        self._title = ""
        self._last_bytes_line = 0.0

    def _plain(self, text: str) -> None:
        self._stream.write(text + "\n")
        self._stream.flush()

    @contextmanager
    def stage(self, title: str) -> Iterator[None]:
        """A named stage: a spinner on a terminal, a start and an end line elsewhere."""
        started = time.monotonic()
        self._title = title
        if self.live:
            with self._console.status(title) as status:
                self._status = status
                try:
                    yield
                finally:
                    self._status = None
            self._console.print(f"[green]✓[/green] {title} ({time.monotonic() - started:.1f} s)")
        else:
            self._plain(f"==> {title}")
            yield
            self._plain(f"    done in {time.monotonic() - started:.1f} s")

    def note(self, text: str) -> None:
        """A line worth keeping in every display."""
        if self.live:
            self._console.print(text, markup=False)
        else:
            self._plain(f"    {text}")

    def detail(self, text: str) -> None:
        """A passing line: shown in the live status, not kept; dropped in plain mode."""
        if self.live and self._status is not None:
            self._status.update(f"{self._title} · {text[-100:]}")

    def build_event(self, event: BuildEvent) -> None:
        """Engine build output: a kept line per step, passing lines for the step's output."""
        if event.kind == "step":
            self.note(f"step {event.step}/{event.total}: {event.text[:160]}")
        else:
            self.detail(event.text)

    def transfer(self, name: str, done: int, total: int | None) -> None:
        """Bytes of one file: live on a terminal, a line at most every 5 s elsewhere."""
        size = f"{done / 1e6:.1f}/{total / 1e6:.1f} MB" if total else f"{done / 1e6:.1f} MB"
        if self.live:
            self.detail(f"{name} {size}")
            return
        now = time.monotonic()
        if done == total or now - self._last_bytes_line >= 5:
            self._last_bytes_line = now
            self._plain(f"    {name}: {size}")
