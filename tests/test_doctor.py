"""`reprobox doctor`: each line on a faked host (a GPU host among them), then on this real one."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pytest
from fakes import FakeEngine, context

from reprobox.cache import WheelCache
from reprobox.cli_format import report, text
from reprobox.context import Context
from reprobox.doctor import Disk, Gpu, Probes, doctor, probe_gpus
from reprobox.engine import EngineInfo
from reprobox.locked import IndexSettings, Lock, LockedWheel
from reprobox.lockfile import default_lock_path, write_lockfile
from reprobox.spec_load import load_spec

ROOT = Path(__file__).resolve().parent.parent
CPU_SPEC = ROOT / "images" / "demo-cpu.yaml"
CUDA_SPEC = ROOT / "images" / "cuda-12.4.yaml"  # CUDA 12.4: 550.54.15 full, 525.60.13 minor-compat
H100 = Gpu("NVIDIA H100 80GB HBM3", "550.54.15", "9.0")
NVIDIA_RUNTIME = ("nvidia", "runc")


class LocalFakeEngine(FakeEngine):
    """A fake that answers on a local socket, so doctor measures its storage disk."""

    def ping(self) -> EngineInfo:
        return replace(super().ping(), host="unix:///var/run/docker.sock")


@dataclass(frozen=True)
class _Host:
    """A faked host: the context doctor is given (engine, cache) and its other probes."""

    ctx: Context
    probes: Probes


def _probes(
    tmp_path: Path,
    *,
    engine: FakeEngine | None = None,
    gpus: list[Gpu] | None = None,
    free: float = 100e9,
    tools: tuple[str, ...] = ("mmdebstrap",),
) -> _Host:
    probes = Probes(
        which=lambda name: f"/usr/bin/{name}" if name in tools else None,
        disk=lambda path: Disk(path, int(free), 1),
        gpus=lambda: (list(gpus or []), "nvidia-smi" if gpus else "no nvidia-smi on PATH"),
    )
    return _Host(context(engine or LocalFakeEngine(), tmp_path / "cache"), probes)


def _doctor(spec: Path | None, host: _Host) -> dict[str, Any]:
    """`reprobox doctor --json`'s report on the faked host."""
    return report(doctor(host.ctx, spec, probes=host.probes))


def _line(report: dict[str, Any], name: str) -> dict[str, Any]:
    found = [line for line in report["lines"] if line["name"] == name]
    assert len(found) == 1, report["summary"]
    line: dict[str, Any] = found[0]
    return line


def _gpu_engine() -> FakeEngine:
    engine = LocalFakeEngine()
    engine.runtimes = NVIDIA_RUNTIME
    return engine


def test_a_cpu_spec_on_a_host_without_gpu_passes(tmp_path: Path) -> None:
    report = _doctor(CPU_SPEC, _probes(tmp_path))
    assert report["exit_code"] == 0, report["summary"]
    assert "CPU specs only" in _line(report, "gpu")["detail"]
    assert "Docker Engine 20.10.24" in _line(report, "engine")["detail"]


def test_doctor_names_the_engine_store_and_builder(tmp_path: Path) -> None:
    """Text and JSON say which store (it decides what the engine shows as an ID) and builder."""
    classic = _doctor(None, _probes(tmp_path))
    assert "classic image store (graph driver overlay2)" in _line(classic, "store")["detail"]
    assert "BuildKit is not used by reprobox" in _line(classic, "builder")["detail"]
    assert classic["engine"] == {
        "host": "unix:///var/run/docker.sock",
        "version": "20.10.24",
        "api": "1.41",
        "store": "classic",
        "storage_driver": "overlay2",
        "builder": "classic",
    }
    engine = LocalFakeEngine()
    engine.containerd_store = True
    host = _probes(tmp_path, engine=engine)
    modern = _doctor(None, host)
    assert "containerd image store (snapshotter overlayfs)" in _line(modern, "store")["detail"]
    assert modern["engine"]["store"] == "containerd"
    shown = text(doctor(host.ctx, None, probes=host.probes))
    assert "OK    store      containerd image store" in shown
    assert "OK    builder    the classic builder" in shown
    assert _doctor(None, _probes(tmp_path, engine=FakeEngine(alive=False)))["engine"] is None


def test_a_cuda_spec_without_gpu_fails_and_says_what_to_do(tmp_path: Path) -> None:
    report = _doctor(CUDA_SPEC, _probes(tmp_path))
    assert report["exit_code"] == 3
    gpu = _line(report, "gpu")
    assert gpu["status"] == "fail"
    assert "CUDA 12.4" in gpu["detail"]
    assert "nvidia-smi" in gpu["hint"]
    assert "FAIL  gpu" in report["summary"]


def test_a_gpu_host_with_a_recent_driver_passes_a_cuda_spec(tmp_path: Path) -> None:
    # Every driver verdict, against the image's NVIDIA_REQUIRE_CUDA: tests/test_gpu.py.
    report = _doctor(CUDA_SPEC, _probes(tmp_path, engine=_gpu_engine(), gpus=[H100]))
    assert report["exit_code"] == 0, report["summary"]
    assert _line(report, "driver")["status"] == "ok"
    assert "550.54.15" in _line(report, "driver")["detail"]
    assert _line(report, "gpu")["status"] == "ok"
    assert "compute capability 9.0" in _line(report, "gpu")["detail"]


def test_a_gpu_the_engine_cannot_hand_to_containers_fails_a_cuda_spec(tmp_path: Path) -> None:
    report = _doctor(CUDA_SPEC, _probes(tmp_path, gpus=[H100]))
    runtime = _line(report, "runtime")
    assert runtime["status"] == "fail"
    assert "nvidia-ctk runtime configure" in runtime["hint"]
    assert report["exit_code"] == 3
    hooked = _probes(tmp_path, gpus=[H100], tools=("mmdebstrap", "nvidia-container-runtime-hook"))
    assert _doctor(CUDA_SPEC, hooked)["exit_code"] == 0


def test_no_engine_is_exit_3_with_the_engine_hint(tmp_path: Path) -> None:
    report = _doctor(CPU_SPEC, _probes(tmp_path, engine=FakeEngine(alive=False)))
    engine = _line(report, "engine")
    assert engine["status"] == "fail"
    assert engine["hint"]
    assert report["exit_code"] == 3


def test_bootstrap_needs_mmdebstrap_only_when_the_spec_bootstraps(tmp_path: Path) -> None:
    report = _doctor(CPU_SPEC, _probes(tmp_path, tools=()))
    assert _line(report, "mmdebstrap")["status"] == "fail"
    assert "apt-get install mmdebstrap" in _line(report, "mmdebstrap")["hint"]
    assert report["exit_code"] == 3
    assert _doctor(None, _probes(tmp_path, tools=()))["exit_code"] == 0  # only a warning


def _locked_spec(tmp_path: Path, sizes: list[int]) -> Path:
    """The CPU spec beside a lock of `sizes`-byte wheels, all in the probes' cache."""
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(CPU_SPEC.read_text())
    cache = WheelCache(tmp_path / "cache")
    wheels = []
    for number, size in enumerate(sizes):
        sha = f"{number:064x}"
        path = cache.path(sha)
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("wb") as handle:
            handle.truncate(size)  # sparse: the size is what counts
        wheels.append(
            LockedWheel(
                f"p{number}", "1", f"p{number}-1-py3-none-any.whl", "https://x/p", sha, "rest"
            )
        )
    lock = Lock(
        spec_sha256=load_spec(spec_path).sha256,
        python="3.11",
        arch="x86_64",
        glibc="2.36",
        platforms=("manylinux_2_28_x86_64",),
        index=IndexSettings(()),
        resolver="pip 26.3",
        installer="pip 26.3",
        reprobox_version="0.1.0",
        wheels=tuple(wheels),
        torch_cuda=None,
        torch_cudnn=None,
    )
    write_lockfile(default_lock_path(spec_path), lock)
    return spec_path


def test_disk_need_is_three_times_the_locked_wheels_and_short_disk_fails(tmp_path: Path) -> None:
    spec_path = _locked_spec(tmp_path, [1_000_000_000, 500_000_000])
    roomy = _doctor(spec_path, _probes(tmp_path, free=10e9))
    disk = _line(roomy, "disk")
    assert disk["status"] == "ok"
    assert "about 4.5 GB needed" in disk["detail"]
    assert "3 x 1.5 GB of locked wheels" in disk["detail"]
    short = _doctor(spec_path, _probes(tmp_path, free=2e9))
    assert _line(short, "disk")["status"] == "fail"
    assert "free 2.5 GB" in _line(short, "disk")["hint"]
    assert short["exit_code"] == 3


def test_without_a_lock_the_fixed_estimate_is_named(tmp_path: Path) -> None:
    report = _doctor(None, _probes(tmp_path))
    disk = _line(report, "disk")
    assert "engine storage /var/lib/docker and wheel cache" in disk["detail"]
    assert "a fixed cpu estimate: no spec given" in disk["detail"]
    remote = _doctor(None, _probes(tmp_path, engine=FakeEngine()))
    assert "is remote: its disk is not measured" in remote["summary"]


def test_probe_gpus_reads_nvidia_smi_and_falls_back_to_proc(tmp_path: Path) -> None:
    def smi(argv: Any) -> str:
        assert "--format=csv,noheader" in argv
        return "NVIDIA H100 80GB HBM3, 550.54.15, 9.0\nNVIDIA H100 80GB HBM3, 550.54.15, 9.0\n"

    gpus, where = probe_gpus(smi, which=lambda _: "/usr/bin/nvidia-smi")
    assert gpus == [H100, H100]
    assert where == "nvidia-smi"

    proc = tmp_path / "version"
    proc.write_text(
        "NVRM version: NVIDIA UNIX x86_64 Kernel Module  535.104.05  Sat Aug 19 01:15:15 UTC 2023\n"
    )
    gpus, where = probe_gpus(smi, which=lambda _: None, proc_version=proc)
    assert [gpu.driver for gpu in gpus] == ["535.104.05"]
    assert probe_gpus(smi, which=lambda _: None, proc_version=tmp_path / "absent")[0] == []


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reprobox", "doctor", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.mark.docker
@pytest.mark.usefixtures("docker_engine")
def test_doctor_on_this_host() -> None:
    """The CPU example passes here; the CUDA one passes only where a GPU and driver are."""
    cpu = _cli(str(CPU_SPEC))
    assert cpu.returncode == 0, cpu.stdout + cpu.stderr
    assert cpu.stdout.startswith("OK    engine     Docker Engine")
    assert "OK    builder    the classic builder" in cpu.stdout
    facts = json.loads(_cli("--json").stdout)["engine"]
    assert facts["store"] == ("containerd" if "containerd image store" in cpu.stdout else "classic")
    assert facts["version"] in cpu.stdout
    assert (facts["builder"], facts["api"].count(".")) == ("classic", 1)
    cuda = _cli(str(CUDA_SPEC), "--json")
    gpus, _ = probe_gpus()
    if gpus:
        assert '"name": "driver"' in cuda.stdout
    else:
        assert cuda.returncode == 3, cuda.stdout + cuda.stderr
        assert "this host shows no NVIDIA GPU or driver" in cuda.stdout
