"""Read what a project has (requirements.txt, pyproject.toml, uv.lock, pylock.toml) as requirements.

Each reader returns the project's requirements for one environment (the image's), with the file
and line each came from, and refuses what cannot become an exact pin from an index: an editable,
a local path, a direct URL, a VCS URL (with or without a commit). `reprobox init --from` turns
the result into a spec (see `reprobox.init_from`).
"""

from __future__ import annotations

import json
import re
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from packaging.dependency_groups import DependencyGroupResolver
from packaging.markers import Environment
from packaging.pylock import (
    PackageSdist,
    PackageWheel,
    Pylock,
    PylockSelectError,
    PylockValidationError,
    is_valid_pylock_path,
)
from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag
from packaging.utils import canonicalize_name

from reprobox.errors import BadInputError

__all__ = ["Imported", "Wanted", "read_project"]

_VCS = re.compile(r"^(?:git|hg|svn|bzr)\+", re.I)
_COMMIT = re.compile(r"[@#]([0-9a-f]{40}|[0-9a-f]{64})(?:#.*)?$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(frozen=True)
class Wanted:
    """One requirement of the project, and where it was written."""

    requirement: Requirement
    where: str  # "file:line"


@dataclass(frozen=True)
class Imported:
    """What a project asks for in the image's environment, and where it said to look."""

    wanted: tuple[Wanted, ...]
    name: str | None = None  # the project's own name, where the file gives one
    index_url: str | None = None
    extra_index_urls: tuple[str, ...] = ()
    find_links: tuple[str, ...] = field(default=())


def _refuse(where: str, what: str, why: str, hint: str) -> BadInputError:
    return BadInputError(f"{where}: {what} cannot be pinned: {why}", hint=hint)


_FROM_INDEX = (
    "reprobox locks wheels from package indexes; build the wheel (`pip wheel ...`), put it in a "
    "folder named by index.find_links, and pin it as name==version"
)


def _direct(where: str, text: str) -> BadInputError:
    """A refusal for a URL or path where a `name==version` from an index must stand."""
    url = text.split(" @ ", 1)[-1].strip()
    if _VCS.match(url):
        if _COMMIT.search(url) is None:
            return _refuse(
                where,
                text,
                "a VCS URL without a commit moves with its branch",
                "pin the project as name==version from an index (or, at the least, name a commit)",
            )
        return _refuse(where, text, "a VCS URL is not a wheel on an index", _FROM_INDEX)
    if url.startswith(("file:", ".", "/", "~")) or "://" not in url:
        return _refuse(where, text, "a local path is not on any index", _FROM_INDEX)
    return _refuse(where, text, "a direct URL is not an index's wheel", _FROM_INDEX)


def _requirement(text: str, where: str) -> Requirement:
    if _CONTROL.search(text):
        raise BadInputError(f"{where}: the line holds a control character", hint="remove it")
    looks_direct = _VCS.match(text) or text.startswith(("file:", ".", "/", "~"))
    if looks_direct or re.match(r"^[a-z][a-z0-9+.-]*://", text, re.I):
        raise _direct(where, text)
    try:
        req = Requirement(text)
    except InvalidRequirement as exc:
        raise BadInputError(
            f"{where}: {text!r} is not a requirement: {exc}",
            hint="write `name==version` (or a range, which is resolved once)",
        ) from None
    if req.url is not None:
        raise _direct(where, text)
    return req


def _active(req: Requirement, env: Environment) -> bool:
    return req.marker is None or req.marker.evaluate({**env, "extra": ""})  # type: ignore[dict-item]


# --- requirements.txt -------------------------------------------------------------------------

#: Options that change nothing reprobox records: it locks wheels only, with hashes, anyway.
_IGNORED = ("--hash", "--require-hashes", "--only-binary", "--prefer-binary", "--trusted-host")


def _logical_lines(text: str) -> list[tuple[int, str]]:
    lines: list[tuple[int, str]] = []
    pending, first = "", 0
    for number, raw in enumerate(text.splitlines(), start=1):
        line = re.sub(r"(^|\s)#.*$", "", raw).rstrip()
        if not pending:
            first = number
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        joined = (pending + line).strip()
        pending = ""
        if joined:
            lines.append((first, joined))
    if pending.strip():
        lines.append((first, pending.strip()))
    return lines


def _option(line: str) -> tuple[str, str]:
    name, _, value = line.partition("=") if line.startswith("--") else ("", "", "")
    if not name or " " in name:
        name, _, value = line.partition(" ")
    return name, value.strip()


def _requirements_txt(path: Path, env: Environment, seen: set[Path]) -> Imported:
    seen.add(path.resolve())
    wanted: list[Wanted] = []
    index: str | None = None
    extra: list[str] = []
    links: list[str] = []
    for number, line in _logical_lines(_read(path)):
        where = f"{path}:{number}"
        if line.startswith("-"):
            name, value = _option(line)
            if name in {"-e", "--editable"}:
                raise _refuse(where, line, "an editable install is a local checkout", _FROM_INDEX)
            if name in {"-r", "--requirement"}:
                nested = (path.parent / value).resolve()
                if nested in seen:
                    continue
                inner = _requirements_txt(nested, env, seen)
                wanted += inner.wanted
                index = index or inner.index_url
                extra += inner.extra_index_urls
                links += inner.find_links
            elif name in {"-i", "--index-url"}:
                index = value
            elif name == "--extra-index-url":
                extra.append(value)
            elif name in {"-f", "--find-links"}:
                links.append(value)  # as written: index.find_links is relative to the spec
            elif name in {"-c", "--constraint"}:
                raise BadInputError(
                    f"{where}: {line}: a constraints file would change what resolves, unseen "
                    "in the spec",
                    hint="write the constrained versions into the requirements as pins",
                )
            elif not name.startswith(_IGNORED):
                raise BadInputError(
                    f"{where}: the option {name} is not one reprobox can carry into a spec",
                    hint="remove it (index options -i, --extra-index-url, -f are carried over)",
                )
            continue
        text = re.split(r"\s--hash[= ]", line, maxsplit=1)[0].strip()
        req = _requirement(text, where)
        if _active(req, env):
            wanted.append(Wanted(req, where))
    return Imported(tuple(wanted), None, index, tuple(extra), tuple(links))


# --- pyproject.toml ---------------------------------------------------------------------------


def _line_of(text: str, needle: str) -> int:
    index = text.find(needle)
    return 1 if index < 0 else text.count("\n", 0, index) + 1


def _named_at(path: Path, text: str, name: str) -> str:
    """`file:line` of a TOML lock's `name = "NAME"` entry."""
    match = re.search(rf"^name = {re.escape(json.dumps(name))}$", text, re.M)
    return f"{path}:{1 if match is None else text.count(chr(10), 0, match.start()) + 1}"


def _pyproject(path: Path, groups: Sequence[str], env: Environment) -> Imported:
    text = _read(path)
    data = _toml(path, text)
    project = data.get("project")
    if not isinstance(project, dict):
        raise BadInputError(
            f"{path}: has no [project] table", hint="name the project's requirements file instead"
        )
    strings: list[str] = list(project.get("dependencies", []))
    optional: Mapping[str, list[str]] = project.get("optional-dependencies", {})
    dependency_groups: Mapping[str, Any] = data.get("dependency-groups", {})
    resolver = DependencyGroupResolver(dependency_groups)
    for group in groups:
        if group in optional:
            strings += optional[group]
        elif group in dependency_groups:
            strings += [str(r) for r in resolver.resolve(group)]
        else:
            known = sorted({*optional, *dependency_groups})
            raise BadInputError(
                f"{path}: no optional dependencies or dependency group named {group!r}",
                hint=f"known: {', '.join(known) or 'none'}",
            )
    wanted = []
    for item in strings:
        where = f"{path}:{_line_of(text, item)}"
        req = _requirement(str(item), where)
        if _active(req, env):
            wanted.append(Wanted(req, where))
    name = project.get("name")
    return Imported(tuple(wanted), str(name) if isinstance(name, str) else None)


# --- uv.lock ----------------------------------------------------------------------------------


def _marker_ok(marker: object, env: Environment) -> bool:
    if not isinstance(marker, str):
        return True
    return Requirement(f"x; {marker}").marker.evaluate({**env, "extra": ""})  # type: ignore[union-attr,dict-item]


def _uv_entry(
    packages: Sequence[Mapping[str, Any]], dep: Mapping[str, Any], env: Environment
) -> Mapping[str, Any] | None:
    name = canonicalize_name(str(dep.get("name", "")))
    found = [p for p in packages if canonicalize_name(str(p.get("name", ""))) == name]
    if "version" in dep:
        found = [p for p in found if p.get("version") == dep["version"]]
    if len(found) > 1:
        found = [
            p
            for p in found
            if any(_marker_ok(m, env) for m in p.get("resolution-markers", [""]) or [""])
        ]
    return found[0] if found else None


def _uv_source(entry: Mapping[str, Any], where: str) -> None:
    """Refuse a uv.lock package that does not come from an index (git, path, URL, editable)."""
    source: Mapping[str, Any] = entry.get("source", {})
    if "registry" in source:
        return
    kind = next(iter(source), "unknown")
    if kind == "editable":
        shown = f"{entry['name']} (editable {source[kind]})"
        raise _refuse(where, shown, "an editable install is a local checkout", _FROM_INDEX)
    url = str(source.get(kind, ""))
    raise _direct(where, f"{entry['name']} @ {'git+' + url if kind == 'git' else url}")


def _uv_lock(path: Path, groups: Sequence[str], env: Environment) -> Imported:
    text = _read(path)
    data = _toml(path, text)
    packages: list[Mapping[str, Any]] = list(data.get("package", []))
    roots = [p for p in packages if {"virtual", "editable"} & set(p.get("source", {}))]
    roots = [p for p in roots if p["source"].get("virtual", p["source"].get("editable")) == "."]
    if len(roots) != 1:
        raise BadInputError(
            f"{path}: no single project at '.' in this uv.lock",
            hint="run `uv lock` in the project's directory",
        )
    root = roots[0]
    deps: list[Mapping[str, Any]] = list(root.get("dependencies", []))
    for group in groups:
        extras = root.get("optional-dependencies", {})
        dev = root.get("dev-dependencies", {})
        if group not in extras and group not in dev:
            raise BadInputError(
                f"{path}: the project has no extra or dependency group named {group!r}",
                hint=f"known: {', '.join(sorted({*extras, *dev})) or 'none'}",
            )
        deps += [*extras.get(group, []), *dev.get(group, [])]
    wanted: dict[str, Wanted] = {}
    seen: set[tuple[str, tuple[str, ...]]] = set()
    todo = list(deps)
    while todo:
        dep = todo.pop()
        if not _marker_ok(dep.get("marker"), env):
            continue
        entry = _uv_entry(packages, dep, env)
        if entry is None:
            continue
        key = f"{canonicalize_name(str(entry['name']))}=={entry['version']}"
        extras = tuple(sorted(dep.get("extra", [])))
        if (key, extras) in seen:
            continue
        seen.add((key, extras))
        where = _named_at(path, text, str(entry["name"]))
        _uv_source(entry, where)
        wanted[key] = Wanted(Requirement(key), where)
        todo += entry.get("dependencies", [])
        for extra in extras:
            todo += entry.get("optional-dependencies", {}).get(extra, [])
    root_name = root.get("name")
    return Imported(tuple(wanted[k] for k in sorted(wanted)), str(root_name) if root_name else None)


# --- pylock.toml ------------------------------------------------------------------------------


def _pylock(path: Path, groups: Sequence[str], env: Environment, tags: Sequence[Tag]) -> Imported:
    text = _read(path)
    try:
        lock = Pylock.from_dict(_toml(path, text))
    except PylockValidationError as exc:
        raise BadInputError(
            f"{path}: not a valid pylock.toml (PEP 751): {exc}",
            hint="write it again with the tool that made it",
        ) from None
    extras = [g for g in groups if g in (lock.extras or ())]
    chosen = [g for g in groups if g in (lock.dependency_groups or ())]
    unknown = sorted(set(groups) - {*extras, *chosen})
    if unknown:
        known = sorted({*(lock.extras or ()), *(lock.dependency_groups or ())})
        raise BadInputError(
            f"{path}: no extra or dependency group named {unknown[0]!r}",
            hint=f"known: {', '.join(known) or 'none'}",
        )
    try:
        selected = list(
            lock.select(
                environment=env,
                tags=tags,
                extras=extras,
                dependency_groups=chosen if groups else None,
            )
        )
    except PylockSelectError as exc:
        raise BadInputError(
            f"{path}: this lock does not cover the image's platform: {exc}",
            hint="lock the project for Linux and the spec's Python, or pass --python",
        ) from None
    wanted = []
    for package, dist in selected:
        where = _named_at(path, text, package.name)
        if not isinstance(dist, PackageWheel | PackageSdist) or package.version is None:
            raise _direct(
                where, f"{package.name} @ {getattr(dist, 'url', None) or getattr(dist, 'path', '')}"
            )
        wanted.append(Wanted(Requirement(f"{package.name}=={package.version}"), where))
    return Imported(tuple(wanted))


# --- shared -----------------------------------------------------------------------------------


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise BadInputError(f"{path}: no such file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise BadInputError(f"{path}: cannot read it: {exc}") from None


def _toml(path: Path, text: str) -> dict[str, Any]:
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadInputError(f"{path}: not valid TOML: {exc}") from None


def read_project(
    path: Path, *, groups: Sequence[str], environment: Environment, tags: Sequence[Tag]
) -> Imported:
    """The requirements `path` states for `environment` (the image's), by the file's kind.

    `pyproject.toml`, `uv.lock` and `pylock.toml` / `pylock.NAME.toml` are known by name; any
    other file is read as a pip requirements file. `groups` names optional dependencies or
    dependency groups to add.
    """
    name = path.name
    if name == "pyproject.toml":
        return _pyproject(path, groups, environment)
    if name == "uv.lock":
        return _uv_lock(path, groups, environment)
    if is_valid_pylock_path(path):
        return _pylock(path, groups, environment, tags)
    if groups:
        raise BadInputError(f"{path}: a requirements file has no groups", hint="remove --group")
    return _requirements_txt(path, environment, set())
