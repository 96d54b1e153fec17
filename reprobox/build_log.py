"""The classic builder's JSON stream, read into step events, an image ID, or a BuildError."""

from __future__ import annotations

import re
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any, NoReturn

from reprobox.engine import BuildEvent
from reprobox.errors import BuildError

__all__ = ["BuildLog"]

_TAIL_LINES = 20
_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the builder paints a step's stderr red
# The builder's own bookkeeping lines: shown as output, kept out of a failed step's tail.
_CHATTER = re.compile(r"^( ---> |Removing intermediate container |Successfully (built|tagged) )")


class BuildLog:
    """Turns the classic builder's JSON stream into step events, an image ID, or a BuildError."""

    def __init__(self, on_event: Callable[[BuildEvent], None] | None = None) -> None:
        self._on_event = on_event
        self._step = 0
        self._total = 0
        self._instruction = ""
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._partial = ""
        self._error: BuildError | None = None
        self.image_id: str | None = None

    def feed(self, chunk: Mapping[str, Any]) -> None:
        """Take one decoded message from the build stream (an error is raised by `finish`)."""
        if "stream" in chunk:
            self._text(str(chunk["stream"]))
        aux = chunk.get("aux")
        if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
            self.image_id = aux["ID"]
        if "error" in chunk and self._error is None:
            # Kept, not raised: the caller reads the stream to its end, which frees the connection.
            self._flush()
            try:
                self.fail(str(chunk["error"]).strip())
            except BuildError as err:
                self._error = err

    def fail(self, error: str) -> NoReturn:
        """Raise the BuildError for `error`, naming the current step and its last lines."""
        if not self._step:
            raise BuildError(f"docker build failed: {error}", hint="fix the Dockerfile or context")
        raise BuildError(
            f"docker build failed at step {self._step}/{self._total}: {error}",
            step=self._instruction,
            log_tail="\n".join(self._tail),
            hint="fix the failing step; the last lines of its output are above",
        )

    def finish(self) -> str:
        """The built image's ID once the stream has ended; the BuildError if a step failed."""
        self._flush()
        if self._error is not None:
            raise self._error
        if self.image_id is None:
            self.fail("the engine reported no image ID")
        return self.image_id

    def _text(self, text: str) -> None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def _flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\r")
        match = _STEP.match(line)
        if match:
            self._step, self._total = int(match[1]), int(match[2])
            self._instruction = match[3]
            self._tail.clear()
            self._emit(BuildEvent("step", self._step, self._total, self._instruction))
            return
        if not _CHATTER.match(line):
            self._tail.append(line)
        self._emit(BuildEvent("output", self._step, self._total, line))

    def _emit(self, event: BuildEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)
