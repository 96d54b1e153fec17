"""A CUDA image end to end on a host without a GPU (this one, CI): it builds, it is never proven
on the CPU, and everything that needs the GPU stops with exit 3 saying what is missing.

One real CUDA build of tests/cuda/cuda-small.yaml (torch 2.5.1 with CUDA 12.4 from PyPI's nvidia-*
wheels, about 3 GB of wheels, a 5.6 GB image) by the default route (assembled from the wheels:
the recipe's image) is shared by every test here. Cold: a few minutes (download, layers, load).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli import Cli, reprobox
from conftest import images_removed_after, skip_or_fail
from registry import REGISTRY_BINARY, LocalRegistry, docker_config

from reprobox.check import device_argv, gpu_probe_argv, run_selfcheck, selfcheck_argv
from reprobox.docker_engine import DockerEngine
from reprobox.errors import GpuUnavailableError
from reprobox.spec_load import load_spec

pytestmark = [pytest.mark.docker, pytest.mark.network]

SPEC = Path(__file__).resolve().parent / "cuda" / "cuda-small.yaml"
USER, PASSWORD = "ci-bot", "pw-cuda-s3cret"


def _host_has_a_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia/version").exists()


@dataclass(frozen=True)
class CudaBuild:
    spec: Path
    checked: Cli  # `reprobox build SPEC`: makes and loads the image, then needs the GPU
    unchecked: Cli  # `reprobox build SPEC --no-check --json` right after it

    @property
    def tag(self) -> str:
        tag: str = self.unchecked.json()["tags"][0]
        return tag


@pytest.fixture(scope="module")
def cuda(
    docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[CudaBuild]:
    """The build every test here shares; its images (the install stages, the image and its
    normalised copy: GBs each) go when the module ends, not the session."""
    if _host_has_a_gpu():
        pytest.skip("this host has an NVIDIA GPU: test_examples' gpu test proves CUDA images here")
    spec = tmp_path_factory.mktemp("cuda") / SPEC.name
    shutil.copy(SPEC, spec)
    with images_removed_after():
        checked = reprobox("build", spec)
        unchecked = reprobox("build", spec, "--no-check", "--json")
        assert unchecked.code == 0, unchecked.stderr
        yield CudaBuild(spec, checked, unchecked)


def _labels(engine: DockerEngine, ref: str) -> dict[str, str]:
    return dict(engine.inspect_image(ref).labels)


def test_a_checked_build_stops_with_exit_3_saying_a_gpu_is_needed_and_how(cuda: CudaBuild) -> None:
    result = cuda.checked
    assert result.code == 3, result.stderr
    assert "a CUDA image's self-check needs a GPU" in result.stderr
    assert "built and normalised sha256:" in result.stderr
    assert "no NVIDIA runtime" in result.stderr
    hint = result.stderr.split("hint:", 1)[1]
    for step in ("--no-check", "reprobox check IMAGE", "nvidia-ctk runtime configure"):
        assert step in hint
    assert "Traceback" not in result.stderr
    assert result.stdout == ""


def test_no_check_builds_in_seconds_and_the_image_carries_no_fingerprint(
    cuda: CudaBuild, docker_engine: DockerEngine
) -> None:
    report = cuda.unchecked.json()
    assert report["selfcheck"] is None
    assert "unchanged since its last build" in report["summary"], "the checked build is reused"
    assert "==> write" not in cuda.unchecked.stderr, "no layer written again"
    assert "load (" not in cuda.unchecked.stderr, "nor sent to the engine"
    labels = _labels(docker_engine, cuda.tag)
    assert not [key for key in labels if key.startswith("reprobox.fingerprint.")]
    assert labels["reprobox.cuda"] == "12.4"
    argv = json.loads(labels["reprobox.selfcheck.argv"])
    assert argv[-2:] == ["--device", "cuda"]


def test_no_image_of_this_build_carries_a_cpu_fingerprint(
    cuda: CudaBuild, docker_engine: DockerEngine
) -> None:
    report = cuda.unchecked.json()
    for ref in (report["image_id"], report["content_id"], cuda.tag):
        assert not [k for k in _labels(docker_engine, ref) if k.startswith("reprobox.fingerprint")]


def test_check_exits_3_naming_the_missing_nvidia_runtime(cuda: CudaBuild) -> None:
    result = reprobox("check", cuda.tag)
    assert result.code == 3, result.stderr
    assert "cannot give containers a GPU: it has no NVIDIA runtime" in result.stderr
    assert "nvidia-ctk runtime configure --runtime=docker" in result.stderr
    assert "Traceback" not in result.stderr


def test_the_self_check_without_a_gpu_reports_it_and_trains_nowhere(
    cuda: CudaBuild, docker_engine: DockerEngine
) -> None:
    argv = device_argv(selfcheck_argv(load_spec(cuda.spec)), cuda=True)
    raw = docker_engine.run(cuda.tag, argv, timeout_s=300)  # no GPU asked for: none to find
    assert raw.exit_code == 3, raw.stderr
    report = json.loads(raw.stdout)
    assert report["device_class"] is None
    assert report["fingerprint"] is None
    assert "torch 2.5.1+cu124 (CUDA 12.4) cannot use CUDA" in report["device_missing"]
    with pytest.raises(GpuUnavailableError, match="found none usable"):
        run_selfcheck(docker_engine, cuda.tag, argv)
    # The negative control: the same image does train when told to use the CPU (one step).
    on_cpu = docker_engine.run(cuda.tag, [*gpu_probe_argv()[:-1], "cpu"], timeout_s=600)
    assert on_cpu.exit_code == 0, on_cpu.stderr
    assert json.loads(on_cpu.stdout)["device_class"].startswith("cpu-")


@pytest.mark.parametrize("code", ["import torch", "import torch._inductor.config"])
def test_importing_torch_prints_nothing(
    cuda: CudaBuild, docker_engine: DockerEngine, code: str
) -> None:
    quiet = docker_engine.run(cuda.tag, ["python", "-c", code], timeout_s=120)
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, "", "")
    # The negative control: a hook warning would show here.
    noisy = docker_engine.run(
        cuda.tag, ["python", "-c", code], env={"REPROBOX_SEED": "x"}, timeout_s=120
    )
    assert "reprobox_hook: warning" in noisy.stderr


def test_the_hook_applied_everything_and_reports_no_error(
    cuda: CudaBuild, docker_engine: DockerEngine
) -> None:
    argv = ["python", "-m", "reprobox_hook", "--report", "--import", "torch._inductor.config"]
    done = docker_engine.run(cuda.tag, argv, timeout_s=120)
    assert done.exit_code == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["errors"] == []
    assert report["torch"]["deterministic_algorithms"] is True
    assert report["torch_now"]["cudnn_deterministic"] is True
    assert report["torch_now"]["inductor_deterministic"] is None, "torch 2.5 has no such flag"
    assert report["seeded"]["torch"] == 7


def test_the_image_holds_what_torch_compile_needs_on_cuda(
    cuda: CudaBuild, docker_engine: DockerEngine
) -> None:
    # Triton compiles a C launcher per kernel with the system's C compiler and Python's headers.
    script = (
        "inc=$(python -c \"import sysconfig; print(sysconfig.get_paths()['include'])\") && "
        'printf "#include <Python.h>\\nint main(void) { return Py_IsInitialized(); }\\n" > /tmp/l.c'
        ' && gcc -I"$inc" -c /tmp/l.c -o /tmp/l.o && echo compiled'
    )
    done = docker_engine.run(cuda.tag, ["sh", "-c", script], timeout_s=120)
    assert (done.exit_code, done.stdout.strip()) == (0, "compiled"), done.stderr


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    if shutil.which(REGISTRY_BINARY) is None or shutil.which("htpasswd") is None:
        skip_or_fail("docker-registry or htpasswd is missing: run `make setup`")
    running = LocalRegistry.start_in(tmp_path_factory.mktemp("registry"), USER, PASSWORD)
    yield running
    running.stop()


def test_publish_refuses_the_unproven_image(
    cuda: CudaBuild, registry: LocalRegistry, tmp_path: Path
) -> None:
    config = docker_config(tmp_path / "docker", registry.address, USER, PASSWORD)
    before = registry.blob_count()
    result = reprobox(
        "publish",
        cuda.spec,
        "--to",
        f"{registry.address}/team/cuda",
        "--json",
        env={"DOCKER_CONFIG": str(config)},
    )
    assert result.code == 3, result.stderr
    report = result.json()
    assert (report["passed"], report["verified"], report["digest"]) == (False, False, None)
    assert "needs a GPU" in report["unverified_reason"]
    assert "--allow-unverified" in report["summary"]
    assert registry.blob_count() == before, "nothing was pushed"
    # The build inside publish found the unproven image from before: it asked for a GPU in
    # seconds instead of normalising 5.6 GB again.
    assert "is there a GPU for the self-check?" in result.stderr
    assert "==> normalize" not in result.stderr
    # --allow-unverified pushes (the unit tests in test_publish.py show it and its report);
    # pushing 5.6 GB to the local registry here would cost minutes of CI for nothing new.
