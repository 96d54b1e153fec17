"""The one rule for every string that comes from outside: bounded, no control characters, and a
full match of the pattern that says what it may be.

Used by every spec field (as `Annotated[str, Text(...)]`) and by the render filters, so a new
field gets the same wall by writing one annotation. A pattern is matched with `re.fullmatch`,
never `re.match(...$)`: `$` also matches before a final newline, and a newline in a value is
how a value becomes a Dockerfile instruction.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from pydantic import GetCoreSchemaHandler
from pydantic_core import PydanticCustomError, core_schema

__all__ = ["MAX_LENGTH", "Text", "unsafe_character"]

#: The default bound on a string's length; fields that need more say so.
MAX_LENGTH = 256

# Control characters (C0, DEL, C1), format characters (zero-width, bidi overrides), surrogates,
# and the line and paragraph separators that Python's str.splitlines() treats as line ends.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def unsafe_character(text: str) -> str | None:
    """The first character of `text` that no value may hold, as `U+XXXX`, or None."""
    for char in text:
        if unicodedata.category(char) in _UNSAFE_CATEGORIES:
            return f"U+{ord(char):04X}"
    return None


@dataclass(frozen=True)
class Text:
    """Annotation metadata for a validated string: `Annotated[str, Text(pattern, "what it is")]`.

    A value is refused when it holds a control or invisible character, is longer than
    `max_length`, or does not fully match `pattern`. `explain` completes "... is not <explain>";
    `why`, given the value, may return a more specific message (e.g. "is a range").
    """

    pattern: str
    explain: str
    max_length: int = MAX_LENGTH
    why: Callable[[str], str | None] | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        re.compile(self.pattern)  # a broken pattern fails at import, not at a user's spec

    def check(self, value: str) -> str:
        """`value` if it passes, else a ValueError whose message says why."""
        bad = unsafe_character(value)
        if bad is not None:
            raise ValueError(
                f"{value!r} holds a control or invisible character ({bad}); such characters "
                "could change what the Dockerfile or a shell reads, so none is accepted"
            )
        if len(value) > self.max_length:
            raise ValueError(f"is {len(value)} characters long; at most {self.max_length} here")
        if re.fullmatch(self.pattern, value) is None:
            specific = self.why(value) if self.why is not None else None
            raise ValueError(specific or f"{value!r} is not {self.explain}")
        return value

    def _validate(self, value: str) -> str:
        try:
            return self.check(value)
        except ValueError as err:
            raise PydanticCustomError("text", "{reason}", {"reason": str(err)}) from None

    def __get_pydantic_core_schema__(
        self, source: Any, handler: GetCoreSchemaHandler
    ) -> core_schema.CoreSchema:
        return core_schema.no_info_after_validator_function(self._validate, handler(source))
