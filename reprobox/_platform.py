"""The platform a lock is resolved for: the image's Python, CPU architecture and glibc."""

from __future__ import annotations

import platform
from dataclasses import dataclass

from packaging.tags import Tag, compatible_tags, cpython_tags

from reprobox.compat import debian_suite
from reprobox.spec import Spec

__all__ = ["ASSUMED_GLIBC", "Platform", "manylinux_platforms", "platform_for"]

#: glibc assumed for a `base.image`, whose glibc reprobox cannot read without pulling it.
#: 2.28 (RHEL 8, Debian 10, Ubuntu 20.04 and later all have it) admits torch's manylinux_2_28
#: wheels while refusing wheels that need a newer glibc than most CUDA images carry.
ASSUMED_GLIBC = "2.28"

# PEP 600 aliases: the legacy names of manylinux_2_5, _2_12 and _2_17.
_LEGACY = {5: "manylinux1", 12: "manylinux2010", 17: "manylinux2014"}
_LEGACY_ARCHES = {
    5: {"x86_64", "i686"},
    12: {"x86_64", "i686"},
    17: {"x86_64", "i686", "aarch64", "ppc64le", "s390x", "armv7l"},
}
_MACHINES = {"amd64": "x86_64", "x86_64": "x86_64", "arm64": "aarch64", "aarch64": "aarch64"}


def manylinux_platforms(arch: str, glibc: str) -> tuple[str, ...]:
    """Every manylinux tag a glibc `glibc` system on `arch` runs, newest first (as pip ranks them)."""
    major, minor = (int(part) for part in glibc.split(".")[:2])
    if major != 2:
        raise ValueError(f"glibc {glibc}: only glibc 2.x is known")
    oldest = 5 if arch in {"x86_64", "i686"} else 17
    tags: list[str] = []
    for version in range(minor, oldest - 1, -1):
        tags.append(f"manylinux_2_{version}_{arch}")
        if version in _LEGACY and arch in _LEGACY_ARCHES[version]:
            tags.append(f"{_LEGACY[version]}_{arch}")
    return tuple(tags)


@dataclass(frozen=True)
class Platform:
    """What a wheel must run on: CPython `python` on Linux `arch` with glibc `glibc`."""

    python: str
    arch: str
    glibc: str
    glibc_assumed: bool = False

    @property
    def abi(self) -> str:
        """The CPython ABI tag, e.g. 'cp311'."""
        return "cp" + self.python.replace(".", "")

    @property
    def platforms(self) -> tuple[str, ...]:
        """The manylinux platform tags, newest first, then plain `linux_<arch>`.

        pip accepts `linux_<arch>` on any Linux, last; PyPI refuses such uploads, but PyTorch's
        variant indexes tag their older wheels so (`torch-2.5.1+cu121-...-linux_x86_64.whl`).
        """
        return (*manylinux_platforms(self.arch, self.glibc), f"linux_{self.arch}")

    def tags(self) -> frozenset[Tag]:
        """Every wheel tag the image's interpreter accepts."""
        version = tuple(int(p) for p in self.python.split("."))
        platforms = list(self.platforms)
        return frozenset(
            [
                *cpython_tags(version, [self.abi], platforms),
                *compatible_tags(version, self.abi, platforms),
            ]
        )

    def marker_environment(self) -> dict[str, str]:
        """PEP 508 marker values of the image (not of this machine), for dependency markers."""
        full = f"{self.python}.0"
        return {
            "implementation_name": "cpython",
            "implementation_version": full,
            "os_name": "posix",
            "platform_machine": self.arch,
            "platform_python_implementation": "CPython",
            "platform_release": "",
            "platform_system": "Linux",
            "platform_version": "",
            "python_full_version": full,
            "python_version": self.python,
            "sys_platform": "linux",
        }


def host_arch() -> str:
    """This machine's architecture as wheel tags spell it: the images it builds run it."""
    machine = platform.machine().lower()
    return _MACHINES.get(machine, machine)


def platform_for(spec: Spec, arch: str | None = None) -> Platform:
    """The target of `spec`: glibc from a bootstrap suite, else `ASSUMED_GLIBC`."""
    suite = spec.base.suite
    facts = debian_suite(suite) if suite is not None else None
    if facts is not None:
        return Platform(spec.python, arch or host_arch(), facts[1])
    return Platform(spec.python, arch or host_arch(), ASSUMED_GLIBC, glibc_assumed=True)
