"""Every example under images/ is an integration test: it locks, renders, and (where no GPU is
needed) builds and passes its self-check on the real engine."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from reprobox.spec_load import load_spec

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "images").glob("*.yaml"))


def _needs_gpu(path: Path) -> bool:
    return load_spec(path).torch.is_cuda


def _cli(*argv: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reprobox", *argv],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=3600,
        check=False,
    )


def _copy(path: Path, tmp: Path) -> Path:
    target = tmp / path.name
    shutil.copy(path, target)
    script = load_spec(path).script_path
    if script is not None:
        shutil.copy(script, tmp / script.name)
    return target


@pytest.mark.network
@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_example_locks_and_renders(path: Path, tmp_path: Path) -> None:
    spec = _copy(path, tmp_path)
    result = _cli(
        "render", str(spec), "-o", str(tmp_path / "ctx"), "--no-wheels", "--json", cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    lock = spec.with_suffix(".lock").read_text()
    loaded = load_spec(spec)
    assert f"torch=={loaded.torch.version}" in lock
    assert (tmp_path / "ctx" / "Dockerfile").is_file()
    if loaded.torch.cudnn is not None:
        assert f"nvidia-cudnn-cu12=={loaded.torch.cudnn} \\" in lock


@pytest.mark.docker
@pytest.mark.parametrize("path", [p for p in EXAMPLES if not _needs_gpu(p)], ids=lambda p: p.stem)
def test_example_builds_and_passes_its_self_check(
    path: Path, tmp_path: Path, docker_engine: object
) -> None:
    spec = _copy(path, tmp_path)
    built = _cli("build", str(spec), "--json", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout)
    assert report["passed"] is True
    checked = _cli("check", report["tags"][0], "--json", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    assert json.loads(checked.stdout)["matches_recorded"] is True


@pytest.mark.gpu
@pytest.mark.parametrize("path", [p for p in EXAMPLES if _needs_gpu(p)], ids=lambda p: p.stem)
def test_cuda_example_builds_and_passes_on_a_gpu(
    path: Path, tmp_path: Path, docker_engine: object
) -> None:
    if shutil.which("nvidia-smi") is None and not Path("/proc/driver/nvidia/version").exists():
        pytest.skip("needs an NVIDIA GPU and driver: none on this machine (CI has none)")
    spec = _copy(path, tmp_path)
    built = _cli("build", str(spec), "--json", cwd=tmp_path)
    assert built.returncode == 0, built.stderr
    report = json.loads(built.stdout)
    device_class = report["selfcheck"]["device_class"]
    assert re.fullmatch(r"cuda-sm[0-9]{2,3}-[0-9]+sm", device_class)
    selfcheck = report["selfcheck"]["report"]
    gpu = selfcheck["gpu"]
    assert gpu["name"]
    assert re.fullmatch(r"[0-9]+\.[0-9]+(\.[0-9]+)?", gpu["driver"]), gpu
    assert re.fullmatch(r"[0-9]+\.[0-9]+", gpu["driver_cuda"]), gpu
    loaded = load_spec(spec)
    assert selfcheck["versions"]["cuda"] == loaded.torch.cuda
    if loaded.torch.cudnn is not None:
        major, minor, patch = loaded.torch.cudnn.split(".")[:3]
        assert selfcheck["versions"]["cudnn"] == int(major) * 10000 + int(minor) * 100 + int(patch)
    assert selfcheck["probe"] == {"cpu": "raised", "cuda": "raised"}
    assert selfcheck["deterministic_mode_verified"] is True
    checked = _cli("check", report["tags"][0], "--json", cwd=tmp_path)
    assert checked.returncode == 0, checked.stderr
    again = json.loads(checked.stdout)
    assert again["device_class"] == device_class
    assert again["matches_recorded"] is True
    assert again["fingerprint"] == report["selfcheck"]["fingerprint"]
    assert again["selfcheck"]["gpu"]["name"] == gpu["name"]
