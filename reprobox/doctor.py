"""`reprobox doctor`: can this host build (and run) what a spec asks for? One line per fact, and for
each failing line what to do.

Every look at the host goes through `Probes`, so tests can describe a GPU host without one.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from reprobox.cache import WheelCache
from reprobox.compat import driver_verdict
from reprobox.context import Context
from reprobox.engine import EngineInfo
from reprobox.errors import EXIT_MISSING, EngineError, ReproboxError
from reprobox.locked import Lock
from reprobox.lockfile import default_lock_path, read_lockfile
from reprobox.spec import Spec
from reprobox.spec_load import load_spec

__all__ = [
    "Disk",
    "DoctorResult",
    "EngineFacts",
    "Gpu",
    "Line",
    "Probes",
    "doctor",
    "probe_gpus",
]

Status = Literal["ok", "warn", "fail"]

_GB = 1e9
# Without a lock to measure, what a build needs: torch CPU wheels are ~0.2 GB, CUDA ones with the
# nvidia-* libraries ~3 GB; installed and copied between stages, about three times that.
_FALLBACK_NEED = {"cpu": 5 * _GB, "cuda": 20 * _GB}
_INSTALL_FACTOR = 3
_NVIDIA_VERSION = Path("/proc/driver/nvidia/version")
_KERNEL_MODULE = re.compile(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)")
_QUERY = ("name", "driver_version", "compute_cap")


@dataclass(frozen=True)
class Line:
    """One fact about the host: ok, a warning, or a failure with what to do."""

    name: str
    status: Status
    detail: str
    hint: str | None = None


@dataclass(frozen=True)
class EngineFacts:
    """Which engine answered, for a program to read: versions, image store, builder."""

    host: str
    version: str
    api: str
    #: "containerd" (an image's ID is its manifest digest) or "classic" (its config digest).
    store: Literal["containerd", "classic"]
    storage_driver: str
    #: The builder reprobox drives: always Docker's classic one (the SDK does not speak BuildKit).
    builder: Literal["classic"] = "classic"

    @classmethod
    def of(cls, who: EngineInfo) -> EngineFacts:
        """The facts `ping` gave."""
        return cls(
            host=who.host,
            version=who.server_version,
            api=who.api_version,
            store="containerd" if who.containerd_store else "classic",
            storage_driver=who.storage_driver,
        )


@dataclass(frozen=True)
class Gpu:
    """One NVIDIA GPU as the driver reports it."""

    name: str
    driver: str
    compute_cap: str | None = None


@dataclass(frozen=True)
class Disk:
    """Free bytes on the filesystem that holds a path, and which filesystem that is."""

    path: Path
    free: int
    device: int


def probe_gpus(
    run: Callable[[Sequence[str]], str] | None = None,
    *,
    which: Callable[[str], str | None] = shutil.which,
    proc_version: Path = _NVIDIA_VERSION,
) -> tuple[list[Gpu], str]:
    """The GPUs nvidia-smi lists (or the driver /proc names), and where they were seen."""
    runner = run or _run
    if which("nvidia-smi") is not None:
        for fields in (_QUERY, _QUERY[:2]):  # compute_cap is newer than some drivers
            argv = ["nvidia-smi", f"--query-gpu={','.join(fields)}", "--format=csv,noheader"]
            try:
                out = runner(argv)
            except (OSError, subprocess.SubprocessError):
                continue
            return [_gpu(line) for line in out.splitlines() if line.strip()], "nvidia-smi"
    try:
        text = proc_version.read_text()
    except OSError:
        return [], f"no nvidia-smi on PATH and no {proc_version}"
    match = _KERNEL_MODULE.search(text)
    if match is None:
        return [], f"{proc_version} names no driver version"
    return [Gpu("an NVIDIA GPU (nvidia-smi not on PATH)", match[1])], str(proc_version)


def _run(argv: Sequence[str]) -> str:
    return subprocess.run(list(argv), capture_output=True, text=True, check=True, timeout=30).stdout


def _gpu(line: str) -> Gpu:
    parts = [part.strip() for part in line.split(",")]
    cap = parts[2] if len(parts) > 2 and parts[2] not in {"", "[N/A]"} else None
    return Gpu(parts[0], parts[1] if len(parts) > 1 else "", cap)


def _disk(path: Path) -> Disk:
    """Free space where `path` is, or where it would be made (its nearest existing parent)."""
    probe = path
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return Disk(path, shutil.disk_usage(probe).free, probe.stat().st_dev)


@dataclass(frozen=True)
class Probes:
    """How doctor looks at the host beyond the engine; tests replace any of them."""

    which: Callable[[str], str | None] = shutil.which
    disk: Callable[[Path], Disk] = _disk
    gpus: Callable[[], tuple[list[Gpu], str]] = field(default=probe_gpus)


def _engine_lines(ctx: Context) -> tuple[list[Line], EngineInfo | None]:
    try:
        who = ctx.engine_info()
    except EngineError as err:
        return [Line("engine", "fail", err.message, err.hint)], None
    detail = f"Docker Engine {who.server_version} (API {who.api_version}, {who.arch}) at {who.host}"
    return [Line("engine", "ok", detail), _store_line(who), _builder_line()], who


def _store_line(who: EngineInfo) -> Line:
    """Which image store: it decides what the engine shows as an image's ID."""
    driver = who.storage_driver or "unknown"
    if who.containerd_store:
        detail = (
            f"containerd image store (snapshotter {driver}): the engine shows an image's manifest "
            "digest as its ID; reprobox records the config digest, the same on every store"
        )
    else:
        detail = (
            f"classic image store (graph driver {driver}): an image's ID is its config digest, "
            "what reprobox records"
        )
    return Line("store", "ok", detail)


def _builder_line() -> Line:
    # The Docker SDK speaks only the classic builder's API (POST /build without BuildKit's session).
    return Line(
        "builder",
        "ok",
        "the classic builder, the one the Docker SDK drives (BuildKit is not used by reprobox)",
    )


def _cached_bytes(lock: Lock, cache_root: Path) -> tuple[int, int]:
    """Bytes of the lock's wheels already in the cache, and how many are not there yet."""
    cache = WheelCache(cache_root)
    known, missing = 0, 0
    for wheel in lock.wheels:
        path = cache.path(wheel.sha256)
        if path.is_file():
            known += path.stat().st_size
        else:
            missing += 1
    return known, missing


def _lock_for(spec_path: Path | None) -> tuple[Lock | None, str]:
    if spec_path is None:
        return None, "no spec given"
    path = default_lock_path(spec_path)
    if not path.exists():
        return None, f"no lock yet at {path}"
    try:
        return read_lockfile(path).lock, str(path)
    except ReproboxError as err:
        return None, f"{path} unreadable ({err.message})"


@dataclass(frozen=True)
class _Need:
    engine: float
    cache: float
    why: str


def _needs(spec: Spec | None, lock: Lock | None, lock_note: str, cache_root: Path) -> _Need:
    kind = "cuda" if spec is not None and spec.torch.is_cuda else "cpu"
    fallback = _FALLBACK_NEED[kind]
    if lock is None:
        return _Need(fallback, fallback / _INSTALL_FACTOR, f"a fixed {kind} estimate: {lock_note}")
    known, missing = _cached_bytes(lock, cache_root)
    if missing:
        why = f"{missing} of {len(lock.wheels)} wheels not cached yet, so a fixed {kind} estimate"
        return _Need(fallback, fallback / _INSTALL_FACTOR, why)
    why = f"{_INSTALL_FACTOR} x {known / _GB:.1f} GB of locked wheels, all cached"
    return _Need(_INSTALL_FACTOR * known, 0.0, why)


def _disk_lines(probes: Probes, ctx: Context, info: EngineInfo | None, need: _Need) -> list[Line]:
    """One line per filesystem: what it must hold (engine storage, wheel cache) against its free space."""
    places: list[tuple[str, Disk, float]] = [
        ("wheel cache", probes.disk(ctx.cache.root), need.cache)
    ]
    lines = []
    if info is not None and info.root_dir and info.host.startswith("unix://"):
        places.insert(0, ("engine storage", probes.disk(Path(info.root_dir)), need.engine))
    elif info is not None:
        lines.append(
            Line("disk", "warn", f"the engine at {info.host} is remote: its disk is not measured")
        )
    for device in dict.fromkeys(disk.device for _, disk, _ in places):
        here = [(what, disk, needed) for what, disk, needed in places if disk.device == device]
        total = sum(needed for _, _, needed in here)
        free = here[0][1].free
        where = " and ".join(f"{what} {disk.path}" for what, disk, _ in here)
        detail = (
            f"{where}: {free / _GB:.1f} GB free, about {total / _GB:.1f} GB needed ({need.why})"
        )
        if free < total:
            hint = (
                f"free {(total - free) / _GB:.1f} GB there (`docker system prune` drops unused "
                "images and build cache), or point REPROBOX_CACHE_DIR at a roomier disk"
            )
            lines.append(Line("disk", "fail", detail, hint))
        else:
            lines.append(Line("disk", "ok", detail))
    return lines


def _tool_line(probes: Probes, spec: Spec | None) -> Line:
    found = probes.which("mmdebstrap")
    if found is not None:
        return Line("mmdebstrap", "ok", f"mmdebstrap at {found} (makes base.bootstrap images)")
    needed = spec is None or spec.base.suite is not None
    hint = "`apt-get install mmdebstrap` (or `make setup`); a spec with base.image needs none"
    if spec is not None and spec.base.suite is not None:
        return Line("mmdebstrap", "fail", "mmdebstrap is missing; base.bootstrap needs it", hint)
    return Line(
        "mmdebstrap",
        "warn" if needed else "ok",
        "mmdebstrap is missing (only base.bootstrap specs need it)",
        hint if needed else None,
    )


def _gpu_lines(probes: Probes, spec: Spec | None, info: EngineInfo | None) -> list[Line]:
    cuda = spec.torch.cuda if spec is not None and spec.torch.is_cuda else None
    gpus, where = probes.gpus()
    if not gpus:
        if cuda is None:
            return [Line("gpu", "ok", f"no NVIDIA GPU ({where}): CPU specs only")]
        return [
            Line(
                "gpu",
                "fail",
                f"the spec asks for CUDA {cuda}, and this host shows no NVIDIA GPU or driver ({where})",
                "run on a machine with an NVIDIA GPU and its driver installed (nvidia-smi must work), "
                "or set torch.cuda: cpu",
            )
        ]
    shown = "; ".join(
        f"{gpu.name}, driver {gpu.driver}"
        + (f", compute capability {gpu.compute_cap}" if gpu.compute_cap else "")
        for gpu in gpus
    )
    lines = [Line("gpu", "ok", f"{len(gpus)} GPU(s) from {where}: {shown}")]
    if cuda is not None:
        lines.append(_driver_line(cuda, gpus[0].driver))
    lines.append(_runtime_line(probes, info, needed=cuda is not None))
    return lines


def _driver_line(cuda: str, driver: str) -> Line:
    # The one policy (compat) that also writes the image's NVIDIA_REQUIRE_CUDA.
    verdict = driver_verdict(cuda, driver)
    return Line("driver", verdict.status, verdict.detail, verdict.hint)


def _runtime_line(probes: Probes, info: EngineInfo | None, *, needed: bool) -> Line:
    runtimes = sorted(info.runtimes) if info is not None else []
    hook = probes.which("nvidia-container-runtime-hook") or probes.which("nvidia-container-cli")
    if "nvidia" in runtimes or hook is not None:
        where = "the engine's nvidia runtime" if "nvidia" in runtimes else hook
        return Line("runtime", "ok", f"containers can reach the GPU through {where}")
    return Line(
        "runtime",
        "fail" if needed else "warn",
        f"the engine has no nvidia runtime (runtimes: {', '.join(runtimes) or 'unknown'}) and no "
        "nvidia-container-runtime-hook is on PATH: containers cannot see the GPU",
        "install NVIDIA Container Toolkit, run `nvidia-ctk runtime configure --runtime=docker` "
        "and restart dockerd",
    )


@dataclass(frozen=True)
class DoctorResult:
    """`reprobox doctor [SPEC]`: one line per fact about this host."""

    spec: Path | None
    lines: tuple[Line, ...]
    #: The engine that answered (None: none did).
    engine: EngineFacts | None = None

    @property
    def passed(self) -> bool:
        """No line failed."""
        return not any(line.status == "fail" for line in self.lines)

    @property
    def exit_code(self) -> int:
        """0, or 3 when the host lacks what the spec needs."""
        return 0 if self.passed else EXIT_MISSING


def doctor(
    ctx: Context, spec_path: Path | None = None, *, probes: Probes | None = None
) -> DoctorResult:
    """`reprobox doctor [SPEC]`: what this host has, against what the spec needs."""
    probes = probes or Probes()
    spec = load_spec(spec_path) if spec_path is not None else None
    lines, info = _engine_lines(ctx)
    lock, lock_note = _lock_for(spec_path)
    lines += _disk_lines(probes, ctx, info, _needs(spec, lock, lock_note, ctx.cache.root))
    lines.append(_tool_line(probes, spec))
    lines += _gpu_lines(probes, spec, info)
    facts = EngineFacts.of(info) if info is not None else None
    return DoctorResult(spec_path, tuple(lines), facts)
