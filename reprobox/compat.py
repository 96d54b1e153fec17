"""Known torch / python / CUDA / driver facts, from the package's data file, checked on load."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any

from reprobox.errors import SpecError

if TYPE_CHECKING:
    from reprobox.spec import Spec

__all__ = [
    "DriverMinimum",
    "TorchRelease",
    "check_spec",
    "debian_suite",
    "driver_minimum",
    "torch_release",
]


@dataclass(frozen=True)
class TorchRelease:
    """What one torch minor release was shipped for."""

    release: str
    python: tuple[str, ...]
    cuda: tuple[str, ...]
    pypi_cuda: str | None
    note: str


@dataclass(frozen=True)
class DriverMinimum:
    """The oldest NVIDIA driver for a CUDA version: full features, and with minor-version compatibility."""

    cuda: str
    full: str
    minor_compat: str


@cache
def _data() -> dict[str, Any]:
    text = resources.files("reprobox.data").joinpath("compat.json").read_text(encoding="utf-8")
    data: dict[str, Any] = json.loads(text)
    return data


def torch_release(release: str) -> TorchRelease | None:
    """The recorded facts for a torch minor release ('2.5'), or None if not recorded."""
    row = _data()["torch"].get(release)
    if row is None:
        return None
    return TorchRelease(
        release, tuple(row["python"]), tuple(row["cuda"]), row["pypi_cuda"], row.get("note", "")
    )


def driver_minimum(cuda: str) -> DriverMinimum | None:
    """Minimum driver for a CUDA version ('12.4'), or None if not recorded."""
    row = _data()["driver"].get(cuda)
    return None if row is None else DriverMinimum(cuda, row["full"], row["minor_compat"])


def debian_suite(suite: str) -> tuple[str, str] | None:
    """(python version, glibc version) of a Debian suite, or None if not recorded."""
    row = _data()["debian"].get(suite)
    return None if row is None else (row["python"], row["glibc"])


def _known_releases() -> str:
    releases = sorted(_data()["torch"], key=lambda r: tuple(int(p) for p in r.split(".")))
    return f"{releases[0]} to {releases[-1]}"


def check_spec(spec: Spec, where: Callable[[tuple[str | int, ...]], str]) -> None:
    """Fail (never warn) on a combination no torch release was shipped for."""
    torch = spec.torch
    row = torch_release(torch.release)
    if row is None:
        raise SpecError(
            f"{where(('torch', 'version'))}: torch.version: torch {torch.version} is not a release reprobox "
            f"knows (it knows {_known_releases()})",
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
            known = ", ".join(sorted(_data()["debian"]))
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
