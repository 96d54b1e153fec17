"""The lock as values, and as a requirements file that pip and uv read with --require-hashes."""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from reprobox.errors import LockError

__all__ = [
    "FORMAT",
    "GROUPS",
    "IndexSettings",
    "Lock",
    "LockedWheel",
    "format_lock",
    "parse_lock",
    "requirements_text",
]

#: The lock format this module writes and reads.
FORMAT = "1"
#: Install groups, in install order: the installer, torch and its closure, everything else.
GROUPS = ("installer", "torch", "rest")

_ENTRY = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]*)==(?P<version>\S+) \\$")
_HASH = re.compile(r"^\s+--hash=sha256:(?P<hex>[0-9a-f]{64})$")
_NOTE = re.compile(r"^\s+# (?P<key>group|file|url|size): (?P<value>\S+)$")
# A plain wheel file name: it becomes a path in build contexts, so no `/`, no leading dot.
_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*\.whl$")
_ASSUMED = " (assumed: the glibc of a base.image is not known)"
_HEADER = re.compile(r"^# (?P<key>[a-z0-9-]+): (?P<value>.*)$")


@dataclass(frozen=True)
class LockedWheel:
    """One wheel of the image: what to install, where it came from, and its sha256."""

    name: str
    version: str
    filename: str
    url: str
    sha256: str
    group: str
    #: The file's size in bytes, where the lock recorded it (a download stops there).
    size: int | None = None

    @property
    def requirement(self) -> str:
        """`name==version`, as pip reads it."""
        return f"{self.name}=={self.version}"


@dataclass(frozen=True)
class IndexSettings:
    """The indexes and link locations pip searched (credentials removed); no index URLs = --no-index."""

    index_urls: tuple[str, ...]
    find_links: tuple[str, ...] = ()


@dataclass(frozen=True)
class Lock:
    """Every wheel of an image, resolved for its platform, and the facts the resolution used."""

    spec_sha256: str
    python: str
    arch: str
    glibc: str
    platforms: tuple[str, ...]
    index: IndexSettings
    resolver: str
    installer: str
    reprobox_version: str
    wheels: tuple[LockedWheel, ...]
    torch_cuda: str | None
    torch_cudnn: str | None
    #: True where the base's glibc is not known (a `base.image`) and `glibc` is an assumption.
    glibc_assumed: bool = False

    def group(self, name: str) -> tuple[LockedWheel, ...]:
        """The wheels of one install group ('installer', 'torch' or 'rest')."""
        return tuple(w for w in self.wheels if w.group == name)

    def wheel(self, name: str) -> LockedWheel | None:
        """The locked wheel of a project (canonical name), if any."""
        return next((w for w in self.wheels if w.name == name), None)


def requirements_text(wheels: Iterable[LockedWheel]) -> str:
    """A `--require-hashes` requirements file for some wheels (e.g. one group), sorted."""
    return "".join(
        f"{w.requirement} \\\n    --hash=sha256:{w.sha256}\n"
        for w in sorted(wheels, key=lambda w: w.name)
    )


def _options(index: IndexSettings) -> list[str]:
    """pip options naming where the lock came from, so `pip install -r LOCK` looks there too."""
    urls = index.index_urls
    return [
        "--only-binary :all:",
        *(["--no-index"] if not urls else [f"--index-url {urls[0]}"]),
        *(f"--extra-index-url {url}" for url in urls[1:]),
        *(f"--find-links {link}" for link in index.find_links),
    ]


def format_lock(lock: Lock) -> str:
    """The lock file's text: header comments and pip options, then one hashed entry per wheel."""
    header = [
        "# Written by reprobox (`reprobox lock SPEC`); do not edit by hand: `reprobox lock",
        "# --relock SPEC` writes it again. pip reads it as it is, options and all:",
        "#   pip install --require-hashes --no-deps -r THIS-FILE",
        "# (uv too, given --index-strategy unsafe-best-match, pip's rule for several indexes).",
        f"# reprobox-lock: {FORMAT}",
        f"# spec-sha256: {lock.spec_sha256}",
        f"# python: {lock.python}",
        f"# arch: {lock.arch}",
        f"# glibc: {lock.glibc}" + (_ASSUMED if lock.glibc_assumed else ""),
        f"# platforms: {' '.join(lock.platforms)}",
        f"# resolver: {lock.resolver}",
        f"# installer: {lock.installer}",
        f"# torch-cuda: {lock.torch_cuda or 'none'}",
        f"# torch-cudnn: {lock.torch_cudnn or 'none'}",
        f"# reprobox: {lock.reprobox_version}",
        *_options(lock.index),
    ]
    entries = [
        f"{w.requirement} \\\n    --hash=sha256:{w.sha256}\n"
        f"    # group: {w.group}\n    # file: {w.filename}\n    # url: {w.url}\n"
        + ("" if w.size is None else f"    # size: {w.size}\n")
        for w in sorted(lock.wheels, key=lambda w: w.name)
    ]
    return "\n".join(header) + "\n\n" + "".join(entries)


def _stale(where: str, problem: str) -> LockError:
    return LockError(
        f"{where}: {problem}; it is not a lock this reprobox wrote",
        hint="write it again with `reprobox lock --relock SPEC`",
    )


def _header(lines: list[str], where: str) -> dict[str, list[str]]:
    fields: dict[str, list[str]] = {}
    for line in lines:
        match = _HEADER.match(line)
        if match:
            fields.setdefault(match["key"], []).append(match["value"].strip())
    if fields.get("reprobox-lock") != [FORMAT]:
        raise _stale(where, f"no `# reprobox-lock: {FORMAT}` header line")
    for key in ("spec-sha256", "python", "arch", "glibc", "platforms", "resolver", "installer"):
        if len(fields.get(key, [])) != 1:
            raise _stale(where, f"the header has no single `# {key}:` line")
    return fields


def _entries(lines: list[str], where: str) -> tuple[LockedWheel, ...]:
    wheels: list[LockedWheel] = []
    index = 0
    while index < len(lines):
        match = _ENTRY.match(lines[index])
        if match is None:
            if lines[index].strip() and not lines[index].startswith(("#", "--")):
                raise _stale(where, f"line {index + 1} is not a `name==version \\` entry")
            index += 1
            continue
        digest = _HASH.match(lines[index + 1]) if index + 1 < len(lines) else None
        notes: dict[str, str] = {}
        end = index + 2
        while end < len(lines) and (note := _NOTE.match(lines[end])) and note["key"] not in notes:
            notes[note["key"]] = note["value"]
            end += 1
        if (
            digest is None
            or not {"group", "file", "url"} <= set(notes)
            or notes["group"] not in GROUPS
        ):
            raise _stale(where, f"the entry at line {index + 1} lacks its hash, group, file or url")
        if not _FILENAME.match(notes["file"]):
            raise _stale(where, f"the entry at line {index + 1} names no plain wheel file")
        size = notes.get("size")
        if size is not None and not size.isdecimal():
            raise _stale(where, f"the entry at line {index + 1} has a size that is not a number")
        wheels.append(
            LockedWheel(
                match["name"],
                match["version"],
                notes["file"],
                notes["url"],
                digest["hex"],
                notes["group"],
                None if size is None else int(size),
            )
        )
        index = end
    return tuple(wheels)


def _index(lines: list[str]) -> IndexSettings:
    options = [line.partition(" ")[::2] for line in lines if line.startswith("--")]

    def values(option: str) -> list[str]:
        return [value.strip() for key, value in options if key == option]

    urls = values("--index-url") + values("--extra-index-url")
    return IndexSettings(tuple(urls), tuple(values("--find-links")))


def parse_lock(text: str, where: str = "<lock>") -> Lock:
    """Read a lock file's text back into the `Lock` that `format_lock` wrote."""
    lines = text.splitlines()
    fields = _header(lines, where)

    def one(key: str) -> str:
        return fields[key][0]

    def optional(key: str) -> str | None:
        value = fields.get(key, ["none"])[0]
        return None if value == "none" else value

    return Lock(
        spec_sha256=one("spec-sha256"),
        python=one("python"),
        arch=one("arch"),
        glibc=one("glibc").split()[0],
        platforms=tuple(one("platforms").split()),
        index=_index(lines),
        resolver=one("resolver"),
        installer=one("installer"),
        reprobox_version=fields.get("reprobox", [""])[0],
        wheels=_entries(lines, where),
        torch_cuda=optional("torch-cuda"),
        torch_cudnn=optional("torch-cudnn"),
        glibc_assumed=one("glibc").endswith(_ASSUMED),
    )
