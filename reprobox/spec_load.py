"""A spec file -> a validated, frozen `Spec`: bounded YAML, every problem as one
`file:line: key.path: message` line with a did-you-mean, the combinations no torch release was
shipped for refused (from `compat`'s table), and the self-check script read by its policy.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import stat
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError

from reprobox._yaml import MAX_BYTES, dotted, load_yaml
from reprobox.compat import debian_suite, known_releases, known_suites, torch_release
from reprobox.errors import SpecError
from reprobox.spec import MAX_SCRIPT_BYTES, Spec

__all__ = ["load_spec", "parse_spec", "read_script"]


def _line_for(lines: Mapping[tuple[str | int, ...], int], path: tuple[str | int, ...]) -> int:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return 1


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Spec
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _did_you_mean(path: tuple[str | int, ...]) -> str:
    model = _model_at(path[:-1])
    if model is None:
        return ""
    known = [name for name, f in model.model_fields.items() if not f.exclude]
    close = difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known keys here: {', '.join(sorted(known))}"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(tuple(error["loc"]))
    if kind == "missing":
        return "required key is missing"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if kind.endswith("_type"):
        given = error.get("input")
        shown = repr(given)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        message = f"{message} (got {type(given).__name__} {shown})"
        if kind == "string_type" and isinstance(given, int | float) and not isinstance(given, bool):
            message += f'; put it in quotes, e.g. "{given}" (YAML reads 3.10 as the number 3.1)'
        if kind == "int_type" and isinstance(given, bool):
            message += "; YAML reads true/false as booleans, write a number"
    return message


def parse_spec(text: str, source: Path | None = None) -> Spec:
    """Parse spec YAML text; every problem becomes one `file:line: key.path: message` line."""
    where = str(source) if source is not None else "<spec>"
    data, lines = load_yaml(text, where)
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            # Union members and dict keys add their type names to the location; they mean
            # nothing to a user.
            loc = tuple(
                p
                for p in loc
                if not (
                    isinstance(p, str)
                    and (
                        "[" in p
                        or p in {"str", "int", "function-after"}
                        or p.startswith("function-")
                    )
                )
            )
            problems.append(f"{where}:{_line_for(lines, loc)}: {dotted(loc)}: {_describe(error)}")
        raise SpecError("\n".join(sorted(set(problems), key=_sort_key))) from None
    _check_compat(spec, lambda path: f"{where}:{_line_for(lines, path)}")
    digest = hashlib.sha256(text.encode()).hexdigest()
    return spec.model_copy(update={"source": source, "sha256": digest, "text": text})


def _sort_key(line: str) -> tuple[int, str]:
    parts = line.split(":")
    number = next((int(p) for p in parts[1:3] if p.isdigit()), 0)
    return number, line


def _read_spec(path: Path) -> str:
    try:
        with path.open("rb") as handle:
            data = handle.read(MAX_BYTES + 1)
    except FileNotFoundError:
        raise SpecError(
            f"{path}: no such spec file", hint="`reprobox init > spec.yaml` writes a starter"
        ) from None
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc.strerror or exc}") from None
    if len(data) > MAX_BYTES:
        raise SpecError(
            f"{path}: the spec is larger than {MAX_BYTES} bytes; reprobox reads no larger spec",
            hint="a spec is a short file of pins; move data elsewhere",
        )
    try:
        # As `read_text` reads it: universal newlines, so the hash is the same on every OS.
        return data.decode("utf-8").replace("\r\n", "\n").replace("\r", "\n")
    except UnicodeDecodeError as exc:
        raise SpecError(
            f"{path}: the spec is not UTF-8 text ({exc.reason} at byte {exc.start})"
        ) from None


def _script_error(spec_path: Path, script: str, why: str) -> SpecError:
    return SpecError(
        f"{spec_path}: selfcheck.script: {script} {why}",
        hint="the script must be a regular UTF-8 file of at most "
        f"{MAX_SCRIPT_BYTES} bytes inside the spec's folder (symlinks resolved); "
        "it is copied into the image, so nothing else may be",
    )


def read_script(spec_path: Path, script: str) -> str:
    """The self-check script's text, if the policy allows it: a regular file inside the spec's
    folder after resolving symlinks, at most MAX_SCRIPT_BYTES, UTF-8; else exit 2 saying why."""
    folder = spec_path.absolute().parent.resolve()
    try:
        resolved = (folder / script).resolve(strict=True)
    except FileNotFoundError:
        raise _script_error(
            spec_path, script, "does not exist (the path is relative to the spec)"
        ) from None
    except (OSError, RuntimeError) as exc:
        raise _script_error(spec_path, script, f"cannot be resolved ({exc})") from None
    if not resolved.is_relative_to(folder):
        raise _script_error(
            spec_path, script, f"resolves to {resolved}, outside the spec's folder {folder}"
        )
    try:
        fd = os.open(resolved, os.O_RDONLY | os.O_NOFOLLOW | getattr(os, "O_NONBLOCK", 0))
    except OSError as exc:
        raise _script_error(spec_path, script, f"cannot be opened ({exc.strerror})") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise _script_error(spec_path, script, "is not a regular file")
        if info.st_size > MAX_SCRIPT_BYTES:
            raise _script_error(spec_path, script, f"is {info.st_size} bytes, too large")
        with os.fdopen(os.dup(fd), "rb") as handle:
            data = handle.read(MAX_SCRIPT_BYTES + 1)
    finally:
        os.close(fd)
    if len(data) > MAX_SCRIPT_BYTES:
        raise _script_error(spec_path, script, "grew past the size limit while it was read")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _script_error(spec_path, script, f"is not UTF-8 text ({exc.reason})") from None


def load_spec(path: Path) -> Spec:
    """Read and validate the spec file at `path`, and the self-check script it names."""
    spec = parse_spec(_read_spec(path), path)
    if spec.selfcheck.script is not None:
        spec = spec.model_copy(update={"script_text": read_script(path, spec.selfcheck.script)})
    return spec


def _check_compat(spec: Spec, where: Callable[[tuple[str | int, ...]], str]) -> None:
    """Fail (never warn) on a combination no torch release was shipped for."""
    torch = spec.torch
    row = torch_release(torch.release)
    if row is None:
        releases = known_releases()
        raise SpecError(
            f"{where(('torch', 'version'))}: torch.version: torch {torch.version} is not a release reprobox "
            f"knows (it knows {releases[0]} to {releases[-1]})",
            hint="pick a known release, or add a row with its source to reprobox/data/compat.json",
        )
    if spec.python not in row.python:
        raise SpecError(
            f"{where(('python',))}: python: torch {torch.release} was not released for Python {spec.python}; "
            f"its wheels are for Python {', '.join(row.python)}",
            hint=f"set python to one of {', '.join(row.python)}, or pick another torch release",
        )
    if torch.is_cuda and torch.cuda not in row.cuda:
        shipped = ", ".join(("cpu", *row.cuda))
        note = f" ({row.note})" if row.note else ""
        raise SpecError(
            f"{where(('torch', 'cuda'))}: torch.cuda: torch {torch.release} was never shipped for CUDA "
            f"{torch.cuda}; known variants: {shipped}{note}",
            hint=f"set torch.cuda to one of {shipped}",
        )
    if not torch.is_cuda and torch.cudnn is not None:
        raise SpecError(
            f"{where(('torch', 'cudnn'))}: torch.cudnn: a CPU build of torch has no cuDNN",
            hint="remove torch.cudnn, or set torch.cuda to a CUDA version",
        )
    suite = spec.base.suite
    if suite is not None:
        facts = debian_suite(suite)
        if facts is None:
            known = ", ".join(known_suites())
            raise SpecError(
                f"{where(('base', 'bootstrap'))}: base.bootstrap: Debian suite {suite!r} is not one reprobox "
                f"knows ({known})",
                hint="use debian:bookworm, or base.image pinned by digest",
            )
        if facts[0] != spec.python:
            raise SpecError(
                f"{where(('python',))}: python: a debian:{suite} base has Python {facts[0]}, not {spec.python}",
                hint=f'set python to "{facts[0]}", or bootstrap a suite that has Python {spec.python}',
            )
