"""Values into a Dockerfile: quoted where the Dockerfile can quote them, refused where it cannot,
so that no value, whatever it holds, adds an instruction. The render's Jinja filters.

The spec and lock readers refuse control characters already; these are the second wall.
"""

from __future__ import annotations

import re
import shlex

from reprobox._text import unsafe_character
from reprobox.errors import BadInputError

__all__ = ["dockerfile_key", "dockerfile_quote", "from_reference", "shell_word"]

# What FROM may name: an image ID, a reference pinned by digest, a stage or a plain name:tag.
_FROM = re.compile(
    r"sha256:[0-9a-f]{64}"
    r"|[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
)
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,255}")
_KEY = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]{0,255}")


def _inert(text: str, where: str) -> None:
    bad = unsafe_character(text)
    if bad is not None:
        # The spec and lock readers refuse these already; this is the second wall, not the first.
        raise BadInputError(
            f"refusing to render {text[:80]!r} into the Dockerfile's {where}: it holds {bad}",
            hint="this value should have been refused when it was read; please report it",
        )


def dockerfile_quote(value: object) -> str:
    """Quote a value for ENV/LABEL so the builder reads it back literally and it adds nothing."""
    text = str(value)
    _inert(text, "ENV/LABEL value")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def _unquotable(value: object, pattern: re.Pattern[str], where: str) -> str:
    """A value the Dockerfile cannot quote: used as it is only where it fully matches `pattern`."""
    text = str(value)
    _inert(text, where)
    if pattern.fullmatch(text) is None:
        raise BadInputError(f"refusing to render {text!r} into the Dockerfile's {where}")
    return text


def dockerfile_key(value: object) -> str:
    """An ENV or LABEL key, which the Dockerfile cannot quote: refused unless it is a plain word."""
    return _unquotable(value, _KEY, "ENV/LABEL key")


def shell_word(value: object) -> str:
    """One word of a RUN line's shell command, quoted so the shell reads it as one literal word."""
    text = str(value)
    _inert(text, "RUN line")
    if not text or text.startswith("-"):
        raise BadInputError(f"refusing to render {text!r} as an argument of a RUN line")
    return shlex.quote(text)


def from_reference(value: object) -> str:
    """What FROM names, which the Dockerfile cannot quote: an image ID, a pinned reference, a stage."""
    return _unquotable(value, _FROM, "FROM line")
