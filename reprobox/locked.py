"""The lock as values: every wheel of an image, pinned by sha256, and the facts its resolution used.

`lock.resolve` makes one, `lockfile` writes and reads it, `cache` fetches its wheels, `render`
puts them in a build context.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["GROUPS", "IndexSettings", "Lock", "LockedWheel", "requirements_text"]

#: Install groups, in install order: the installer, torch and its closure, everything else.
GROUPS = ("installer", "torch", "rest")


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
