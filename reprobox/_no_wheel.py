"""Why pip found no wheel for a pin: no such version, or none for the image's Python or platform."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import PurePosixPath
from urllib.parse import unquote, urlsplit

from packaging.requirements import InvalidRequirement, Requirement
from packaging.tags import Tag
from packaging.utils import (
    InvalidSdistFilename,
    InvalidWheelFilename,
    canonicalize_name,
    parse_sdist_filename,
    parse_wheel_filename,
)
from packaging.version import InvalidVersion, Version

from reprobox._platform import Platform
from reprobox.errors import LockError

__all__ = ["explain_no_match"]

_URL = re.compile(r"(?:https?|file)://[^\s'\"<>)]+")


@dataclass(frozen=True)
class _Files:
    """The files an index lists for one version of a project."""

    wheels: tuple[frozenset[Tag], ...]
    sdist: bool
    requires_python: tuple[str, ...]


def _pin(requirement: str) -> tuple[str, str] | None:
    try:
        req = Requirement(requirement)
    except InvalidRequirement:
        return None
    specs = list(req.specifier)
    if len(specs) != 1 or specs[0].operator not in {"==", "==="}:
        return None
    return str(canonicalize_name(req.name)), specs[0].version


def _same_version(a: str, b: Version) -> bool:
    try:
        return Version(a) == b
    except InvalidVersion:
        return a == str(b)


def _files(listing: str, name: str, version: str) -> _Files:
    wheels: dict[str, frozenset[Tag]] = {}
    sdist = False
    requires_python: set[str] = set()
    for line in listing.splitlines():
        for url in _URL.findall(line):
            filename = unquote(PurePosixPath(urlsplit(url).path).name)
            try:
                wname, wversion, _, tags = parse_wheel_filename(filename)
            except InvalidWheelFilename:
                try:
                    sname, sversion = parse_sdist_filename(filename)
                except InvalidSdistFilename:
                    continue
                sdist = sdist or (sname == name and _same_version(version, sversion))
                continue
            if wname == name and _same_version(version, wversion):
                wheels[filename] = tags
                if "requires a different Python" in line:
                    requires_python.add(filename)
    return _Files(tuple(wheels.values()), sdist, tuple(sorted(requires_python)))


def _field(name: str) -> str:
    return {"torch": "torch.version", "transformers": "transformers"}.get(name, "packages")


def _no_version(
    name: str, version: str, usable: Sequence[str], indexes: Sequence[str]
) -> LockError:
    where = ", ".join(indexes) or "the configured find-links"
    release = ".".join(version.split("+", maxsplit=1)[0].split(".")[:2]) + "."
    close = [v for v in usable if v.startswith(release)] or list(usable[-10:])
    recent = ", ".join(close) if close else "none"
    return LockError(
        f"{name} has no version {version} on {where} (versions with a wheel for this image: {recent})",
        hint=f"pin a version that exists in {_field(name)}",
    )


def _python_error(name: str, version: str, target: Platform, files: _Files) -> LockError:
    pythons = sorted({tag.interpreter for tags in files.wheels for tag in tags})
    why = (
        "its Requires-Python excludes it"
        if files.requires_python
        else f"its wheels are for {', '.join(pythons)}"
    )
    return LockError(
        f"{name} {version} has no wheel for Python {target.python} ({target.abi}): {why}",
        hint=f"pin a release of {name} that ships {target.abi} wheels, in {_field(name)}, "
        "or set python (and a base that has it) to one this release supports",
    )


def _platform_error(name: str, version: str, target: Platform, files: _Files) -> LockError:
    platforms = sorted(
        {tag.platform for tags in files.wheels for tag in tags if "linux" in tag.platform}
    )
    glibc = f"glibc {target.glibc}" + (" (assumed for base.image)" if target.glibc_assumed else "")
    return LockError(
        f"{name} {version} has no wheel for Linux {target.arch} with {glibc}: its Linux wheels are "
        f"for {', '.join(platforms) or 'no Linux platform'}",
        hint=f"pin another release of {name} in {_field(name)}, or use a base with a newer glibc",
    )


def explain_no_match(
    requirement: str,
    usable: Sequence[str],
    listing: str,
    target: Platform,
    indexes: Sequence[str],
) -> LockError:
    """A LockError (exit 2) that says why `requirement` has no wheel, and what to change."""
    pin = _pin(requirement)
    if pin is None:
        return LockError(
            f"no wheel satisfies {requirement} for Python {target.python} on Linux {target.arch}",
            hint="a dependency asks for something no index has; pin that dependency in packages",
        )
    name, version = pin
    files = _files(listing, name, version)
    if not files.wheels and not files.sdist:
        return _no_version(name, version, usable, indexes)
    if not files.wheels:
        return LockError(
            f"{name} {version} is published only as source code; reprobox locks wheels only "
            "(a build at lock time would not be reproducible)",
            hint=f"pin a release of {name} that ships wheels, in {_field(name)}",
        )
    supported = target.tags()
    pythons_ok = {(t.interpreter, t.abi) for t in supported}
    if files.requires_python or not any(
        (tag.interpreter, tag.abi) in pythons_ok for tags in files.wheels for tag in tags
    ):
        return _python_error(name, version, target, files)
    return _platform_error(name, version, target, files)
