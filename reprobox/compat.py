"""Known torch / python / CUDA / driver / Debian facts: the package's data table, read and asked.

What a spec may combine is decided by `spec_load`, from these facts; doctor and the image's
NVIDIA_REQUIRE_CUDA read the driver policy here.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from functools import cache
from importlib import resources
from typing import Any, Literal

__all__ = [
    "TRITON_BUILD_PACKAGES",
    "DriverMinimum",
    "DriverVerdict",
    "TorchRelease",
    "debian_suite",
    "driver_minimum",
    "driver_verdict",
    "known_releases",
    "known_suites",
    "nvidia_require_cuda",
    "torch_release",
]

#: What torch.compile needs at run time on CUDA: Triton compiles a small C launcher per kernel
#: with the system's C compiler against Python's headers. A CUDA bootstrap base includes them.
TRITON_BUILD_PACKAGES = ("gcc", "libc6-dev", "python3-dev")


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


@dataclass(frozen=True)
class DriverVerdict:
    """What a host's NVIDIA driver means for an image of one CUDA version."""

    status: Literal["ok", "warn", "fail"]
    detail: str
    hint: str | None = None


def nvidia_require_cuda(cuda: str) -> str:
    """The image's NVIDIA_REQUIRE_CUDA: the drivers the NVIDIA Container Toolkit may start it on.

    The toolkit reads the value with spaces as OR and commas as AND (libnvidia-container's
    dsl_evaluate); `cuda` is compared with the highest CUDA the driver supports, `driver` with
    its version. torch's wheels bring the CUDA runtime and libraries and rely on minor-version
    compatibility, so an image runs on any driver of the same CUDA major family from its
    minimum on: `cuda>=X.Y` names the CUDA it was built for (and the toolkit's refusal message
    then says to update the driver), `driver>=MIN` admits the older drivers of the family.
    `driver_verdict` is the same policy as doctor reports it: what this admits is ok or warn.
    """
    minimum = driver_minimum(cuda)
    if minimum is None:
        return f"cuda>={cuda}"
    return f"cuda>={cuda} driver>={minimum.minor_compat}"


def _version(text: str) -> tuple[int, ...] | None:
    if not re.fullmatch(r"\d+(\.\d+)*", text):
        return None
    return tuple(int(part) for part in text.split("."))


def driver_verdict(cuda: str, driver: str) -> DriverVerdict:
    """doctor's verdict on `driver` for a CUDA `cuda` image: the policy nvidia_require_cuda writes.

    ok: the driver supports the CUDA fully. warn: only through minor-version compatibility (the
    toolkit starts the image; PTX JIT is unavailable, so a GPU whose code torch does not ship
    precompiled fails, and the self-check says so). fail: the toolkit refuses to start the image.
    """
    minimum = driver_minimum(cuda)
    if minimum is None:
        return DriverVerdict(
            "warn",
            f"driver {driver}; reprobox records no minimum driver for CUDA {cuda}, so the image "
            f"asks only for NVIDIA_REQUIRE_CUDA={nvidia_require_cuda(cuda)}",
            "check NVIDIA's CUDA release notes (minimum driver table) and add the row to "
            "reprobox/data/compat.json",
        )
    have = _version(driver)
    figures = (
        f"CUDA {cuda} needs {minimum.full} for full features, {minimum.minor_compat} with "
        "minor-version compatibility"
    )
    if have is None:
        return DriverVerdict(
            "warn", f"driver version {driver!r} is not a version reprobox can compare: {figures}"
        )
    upgrade = f"install NVIDIA driver {minimum.full} or newer, or pick an older torch.cuda"
    full, compat = _version(minimum.full), _version(minimum.minor_compat)
    if full is not None and have >= full:
        return DriverVerdict("ok", f"driver {driver}: {figures}")
    if compat is not None and have >= compat:
        return DriverVerdict(
            "warn",
            f"driver {driver} runs CUDA {cuda} only through minor-version compatibility (no PTX "
            f"JIT: a GPU that torch ships no compiled code for fails): {figures}",
            upgrade,
        )
    return DriverVerdict(
        "fail",
        f"driver {driver} is too old: the NVIDIA Container Toolkit refuses to start the image "
        f"(NVIDIA_REQUIRE_CUDA={nvidia_require_cuda(cuda)}): {figures}",
        upgrade,
    )


def debian_suite(suite: str) -> tuple[str, str] | None:
    """(python version, glibc version) of a Debian suite, or None if not recorded."""
    row = _data()["debian"].get(suite)
    return None if row is None else (row["python"], row["glibc"])


def known_releases() -> tuple[str, ...]:
    """The torch minor releases the table records, oldest first."""
    return tuple(sorted(_data()["torch"], key=lambda r: tuple(int(p) for p in r.split("."))))


def known_suites() -> tuple[str, ...]:
    """The Debian suites the table records, sorted."""
    return tuple(sorted(_data()["debian"]))
