"""The lock file, its one owner: its text (a requirements file that pip and uv read with
--require-hashes), reading and writing it, its pylock.toml sibling, and the image ID a build
records in it. The lock itself, as values, is `reprobox.locked.Lock`.

The recorded image ID sits on one header line that the lock's hash does not cover (the body is
the text without it), so recording it changes neither the lock's identity nor the image.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, replace
from pathlib import Path

from reprobox._files import write_text_atomic
from reprobox._pylock import format_pylock
from reprobox.errors import LockError
from reprobox.locked import GROUPS, IndexSettings, Lock, LockedWheel

__all__ = [
    "FORMAT",
    "LockFile",
    "default_lock_path",
    "format_lock",
    "parse_lock",
    "parse_lockfile",
    "pylock_path",
    "read_lockfile",
    "record_image_id",
    "write_lockfile",
    "write_pylock",
]

#: The lock format this module writes and reads.
FORMAT = "1"

_ENTRY = re.compile(r"^(?P<name>[a-z0-9][a-z0-9._-]*)==(?P<version>\S+) \\$")
_HASH = re.compile(r"^\s+--hash=sha256:(?P<hex>[0-9a-f]{64})$")
_NOTE = re.compile(r"^\s+# (?P<key>group|file|url|size): (?P<value>\S+)$")
# A plain wheel file name: it becomes a path in build contexts, so no `/`, no leading dot.
_FILENAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._+-]*\.whl$")
_ASSUMED = " (assumed: the glibc of a base.image is not known)"
_HEADER = re.compile(r"^# (?P<key>[a-z0-9-]+): (?P<value>.*)$")
# The image ID both routes give. `assembled-image-id` is read past: an earlier reprobox recorded
# `build --assemble`'s ID on a line of its own while its layers' order and history differed from
# the recipe's (it is never part of the lock's body, so such a lock keeps its sha256).
_IMAGE_LINE = re.compile(
    r"^# (?P<key>image-id|assembled-image-id): (?P<id>sha256:[0-9a-f]{64})\n", re.MULTILINE
)
# The recorded image ID goes right after this header line.
_AFTER = re.compile(r"^# reprobox: .*\n", re.MULTILINE)
# PEP 751: `pylock.toml`, or `pylock.<name>.toml` where the name holds no dot.
_NAME_CHARS = re.compile(r"[^A-Za-z0-9_-]+")


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


# --- the file on disk --------------------------------------------------------------------------


@dataclass(frozen=True)
class LockFile:
    """A lock file as read (or written): the parsed lock, its body, and the recorded image ID.

    `body` is the file's text without its image-id line: what the image carries and what
    `sha256` (the image's `reprobox.lock-sha256` label) is taken over.
    """

    lock: Lock
    body: str
    image_id: str | None = None
    path: Path | None = None

    @classmethod
    def of(cls, lock: Lock) -> LockFile:
        """The lock file `lock` would be, not on disk (a render or a test of it)."""
        return cls(lock, format_lock(lock))

    @property
    def sha256(self) -> str:
        """The lock's identity: the sha256 of its body."""
        return hashlib.sha256(self.body.encode()).hexdigest()


def default_lock_path(spec_path: Path) -> Path:
    """The spec's path with `.lock` in place of `.yaml` / `.yml`."""
    if spec_path.suffix in {".yaml", ".yml"}:
        return spec_path.with_suffix(".lock")
    return spec_path.with_name(spec_path.name + ".lock")


def parse_lockfile(text: str, path: Path | None = None) -> LockFile:
    """A lock file's whole text (its image-id line too) as a LockFile."""
    recorded = {match["key"]: match["id"] for match in _IMAGE_LINE.finditer(text)}
    body = _IMAGE_LINE.sub("", text)
    where = str(path) if path is not None else "<lock>"
    return LockFile(parse_lock(body, where), body, recorded.get("image-id"), path)


def read_lockfile(path: Path) -> LockFile:
    """Read and parse the lock file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise LockError(
            f"{path}: no such lock file", hint="`reprobox lock SPEC` writes it"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise LockError(f"{path}: cannot read the lock: {exc}") from exc
    return parse_lockfile(text, path)


def write_lockfile(path: Path, lock: Lock) -> LockFile:
    """Write `lock` to `path` atomically (no image ID recorded yet)."""
    written = replace(LockFile.of(lock), path=path)
    write_text_atomic(path, written.body)
    return written


def record_image_id(lockfile: LockFile, image_id: str) -> LockFile:
    """Write `image_id` into the lock's header, where it records none yet (either route: both
    give one ID); the lock as it is now."""
    if lockfile.image_id is not None or lockfile.path is None:
        return lockfile
    text = lockfile.path.read_text(encoding="utf-8")
    if parse_lockfile(text, lockfile.path).body != lockfile.body:
        return lockfile  # relocked meanwhile: this ID is not its image's
    anchor = _AFTER.search(text)
    position = anchor.end() if anchor else 0
    write_text_atomic(lockfile.path, f"{text[:position]}# image-id: {image_id}\n{text[position:]}")
    return replace(lockfile, image_id=image_id)


def pylock_path(lock_path: Path) -> Path:
    """`pylock.<name>.toml` beside the lock: `demo.lock` -> `pylock.demo.toml`.

    Dots and other characters outside letters, digits, `-` and `_` become `-`
    (`cuda-12.4.lock` -> `pylock.cuda-12-4.toml`), since PEP 751 names hold no dot.
    """
    stem = lock_path.name.removesuffix(".lock") if lock_path.suffix == ".lock" else lock_path.name
    name = _NAME_CHARS.sub("-", stem).strip("-") or "reprobox"
    return lock_path.with_name(f"pylock.{name}.toml")


def write_pylock(lock: Lock, lock_path: Path) -> Path:
    """Write the lock's `pylock.<name>.toml` beside `lock_path` (when missing or different)."""
    path = pylock_path(lock_path)
    text = format_pylock(lock, lock_path.name)
    try:
        current = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        current = None
    if current != text:
        write_text_atomic(path, text)
    return path
