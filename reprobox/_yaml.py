"""Spec YAML, read with bounds: PyYAML's safe loader, limited in size, aliases, depth and values.

A spec comes from someone else's repository, so reading it must not hang or exhaust memory: a
388-byte alias bomb expands exponentially under the plain safe loader, and deep nesting ends
in a RecursionError. Every limit is checked while the node tree is built, before anything is
constructed from it. Every scalar (keys included) is refused when it holds a control or
invisible character, with the line it sits on.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import yaml

from reprobox._text import unsafe_character
from reprobox.errors import SpecError

__all__ = ["MAX_ALIASES", "MAX_BYTES", "MAX_DEPTH", "MAX_VALUES", "Lines", "load_yaml"]

#: A spec larger than this is refused before it is parsed (the examples are under 2 KiB).
MAX_BYTES = 1 << 20
#: Aliases (`*name`) allowed in one spec: enough to share a list, too few to build a bomb.
MAX_ALIASES = 16
#: How deeply mappings and lists may nest (a spec needs 3).
MAX_DEPTH = 32
#: How many values (scalars, lists, mappings) a spec may expand to, aliases followed.
MAX_VALUES = 20_000

#: Key path (keys and list indexes) -> the 1-based line where it is written.
Lines = dict[tuple[str | int, ...], int]


class _LimitError(yaml.YAMLError):
    def __init__(self, message: str, line: int) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


class _BoundedLoader(yaml.SafeLoader):
    """The safe loader, counting aliases and nesting while it composes the node tree."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._aliases = 0
        self._depth = 0

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        line = event.start_mark.line + 1 if event.start_mark is not None else 1
        if isinstance(event, yaml.AliasEvent):
            self._aliases += 1
            if self._aliases > MAX_ALIASES:
                raise _LimitError(
                    f"more than {MAX_ALIASES} aliases (*name); a spec needs few, and many can "
                    "expand into an enormous document",
                    line,
                )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _LimitError(
                    f"lists and mappings nest more than {MAX_DEPTH} levels deep",
                    line,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _Walk:
    """Records each key path's line; refuses unsafe characters, odd keys, depth and size."""

    def __init__(self, where: str) -> None:
        self.where = where
        self.lines: Lines = {}
        self.values = 0

    def node(self, node: yaml.Node, path: tuple[str | int, ...], depth: int) -> None:
        self.values += 1
        line = node.start_mark.line + 1
        if self.values > MAX_VALUES:
            raise self._error(line, path, f"the spec expands to more than {MAX_VALUES} values")
        if depth > MAX_DEPTH:
            raise self._error(
                line,
                path,
                f"lists and mappings nest more than {MAX_DEPTH} levels deep "
                "(or an alias refers to a node that holds it)",
            )
        if isinstance(node, yaml.ScalarNode):
            self._scalar(node, path)
        elif isinstance(node, yaml.MappingNode):
            seen: set[str] = set()
            for key_node, value_node in node.value:
                key = self._key(key_node, path)
                if key in seen:
                    raise self._error(
                        key_node.start_mark.line + 1, (*path, key), "key given twice; keep one"
                    )
                seen.add(key)
                self.lines[(*path, key)] = key_node.start_mark.line + 1
                self.node(value_node, (*path, key), depth + 1)
        elif isinstance(node, yaml.SequenceNode):
            for index, item in enumerate(node.value):
                self.lines[(*path, index)] = item.start_mark.line + 1
                self.node(item, (*path, index), depth + 1)

    def _key(self, node: yaml.Node, path: tuple[str | int, ...]) -> str:
        if not isinstance(node, yaml.ScalarNode):
            raise self._error(
                node.start_mark.line + 1, path, "a key must be a plain word, not a list or mapping"
            )
        self._scalar(node, path)
        return str(node.value)

    def _scalar(self, node: yaml.ScalarNode, path: tuple[str | int, ...]) -> None:
        bad = unsafe_character(str(node.value))
        if bad is not None:
            raise self._error(
                node.start_mark.line + 1,
                path,
                f"{str(node.value)[:80]!r} holds a control or invisible character ({bad}); "
                "no spec value may hold one",
            )

    def _error(self, line: int, path: tuple[str | int, ...], message: str) -> SpecError:
        return SpecError(f"{self.where}:{line}: {dotted(path)}: {message}")


def dotted(path: tuple[str | int, ...]) -> str:
    """`torch.version`, `packages[2]`: a key path as a user reads it."""
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _yaml_error(exc: yaml.YAMLError, text: str, where: str) -> SpecError:
    if isinstance(exc, _LimitError):
        return SpecError(
            f"{where}:{exc.line}: the spec is refused: {exc.message}",
            hint="write the spec out plainly: reprobox reads small, shallow YAML",
        )
    mark = getattr(exc, "problem_mark", None)
    line = f":{mark.line + 1}" if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc)
    if isinstance(exc, yaml.reader.ReaderError):
        line = f":{text[: exc.position].count(chr(10)) + 1}"
        code = (
            exc.character if isinstance(exc.character, int) else ord(str(exc.character)[:1] or "?")
        )
        problem = f"it holds a character YAML does not allow (U+{code:04X})"
    return SpecError(
        f"{where}{line}: the spec is not valid YAML: {problem}",
        hint="check indentation and quoting near that line",
    )


def load_yaml(text: str, where: str) -> tuple[Mapping[str, Any], Lines]:
    """The spec's top-level mapping and its line map; a SpecError (exit 2) on anything else."""
    size = len(text.encode("utf-8", errors="surrogatepass"))
    if size > MAX_BYTES:
        raise SpecError(
            f"{where}: the spec is {size} bytes; reprobox reads specs of at most {MAX_BYTES} bytes",
            hint="a spec is a short file of pins; move data elsewhere",
        )
    try:
        loader = _BoundedLoader(text)
    except yaml.YAMLError as exc:  # the reader checks every character up front
        raise _yaml_error(exc, text, where) from None
    try:
        root = loader.get_single_node()
        if not isinstance(root, yaml.MappingNode):
            raise SpecError(
                f"{where}:1: the spec must be a YAML mapping of keys such as 'version', 'name', 'torch'"
            )
        walk = _Walk(where)
        walk.node(root, (), 0)
        data = loader.construct_document(root)
    except yaml.YAMLError as exc:
        raise _yaml_error(exc, text, where) from None
    finally:
        loader.dispose()
    if not isinstance(data, dict):
        raise SpecError(f"{where}:1: the spec must be a YAML mapping")
    return data, walk.lines
