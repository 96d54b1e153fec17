"""The GPU path without a GPU: what a CUDA image's check asks the engine for, what every way of
lacking a GPU turns into, the driver policy both the image and doctor follow, and the in-image
programs' CUDA parts on this host's CPU torch.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from fakes import FakeEngine, context
from hooked_venv import HOOK, SELFCHECK, clean_env, make_venv

from reprobox import cli
from reprobox.check import device_argv, run_selfcheck
from reprobox.cli_format import report
from reprobox.compat import nvidia_require_cuda
from reprobox.doctor import Disk, Gpu, Probes, doctor
from reprobox.engine import RunResult
from reprobox.errors import EXIT_UNRECORDED, CheckError, GpuUnavailableError
from reprobox.render import image_env
from reprobox.spec_load import load_spec

ROOT = Path(__file__).resolve().parent.parent
CUDA_SPEC = ROOT / "images" / "cuda-12.4.yaml"
NVIDIA_RUNTIME = ("nvidia", "runc")
OLD_ARGV = ["python", "/opt/reprobox/reprobox_selfcheck.py", "--steps", "4", "--device", "auto"]


def _image(engine: FakeEngine, cuda: str | None, argv: Sequence[str] = OLD_ARGV) -> str:
    labels = {"reprobox.selfcheck.argv": json.dumps(list(argv))}
    if cuda is not None:
        labels["reprobox.cuda"] = cuda
    return engine.add_image({"config": {"Labels": labels}}, "img:1")


def _report(device_class: str, *, passed: bool = True, missing: str | None = None) -> str:
    return json.dumps(
        {
            "passed": passed,
            "fingerprint": None if missing else "a" * 64,
            "device_class": None if missing else device_class,
            "first_difference": None,
            "device_missing": missing,
            "failures": [missing] if missing else [],
        }
    )


def _check(
    monkeypatch: pytest.MonkeyPatch, engine: FakeEngine, capsys: pytest.CaptureFixture[str]
) -> tuple[int, str]:
    code = cli.main(["check", "img:1"], engine=engine)
    return code, capsys.readouterr().err


def test_a_cuda_image_asks_for_the_gpu_and_no_runtime_is_exit_3(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = FakeEngine()
    _image(engine, "12.4")
    code, err = _check(monkeypatch, engine, capsys)
    assert code == 3
    (run,) = engine.runs
    assert run.gpus is True
    assert run.argv[-2:] == ("--device", "cuda")
    assert "auto" not in run.argv, "an old label's --device auto is replaced, not kept"
    assert "no NVIDIA runtime" in err
    assert "nvidia-ctk runtime configure" in err
    assert "Traceback" not in err


def test_a_cpu_image_asks_for_no_gpu_and_keeps_its_argv(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = FakeEngine(run_handler=lambda *_: RunResult(0, _report("cpu-x86_64"), ""))
    _image(engine, "cpu")
    code, _ = _check(monkeypatch, engine, capsys)
    assert code == EXIT_UNRECORDED  # the runs agree; the image recorded nothing to compare with
    (run,) = engine.runs
    assert (run.gpus, list(run.argv)) == (False, OLD_ARGV)


def test_a_self_check_that_finds_no_gpu_is_exit_3_naming_why(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = "torch 2.5.1+cu124 (CUDA 12.4) cannot use CUDA: Found no NVIDIA driver"
    answer = RunResult(3, _report("", passed=False, missing=missing), "")
    engine = FakeEngine(run_handler=lambda *_: answer)
    engine.runtimes = NVIDIA_RUNTIME
    _image(engine, "12.4")
    code, err = _check(monkeypatch, engine, capsys)
    assert code == 3
    assert "--device cuda" in err
    assert "Found no NVIDIA driver" in err


def test_a_cuda_image_never_passes_on_the_cpu(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    engine = FakeEngine(run_handler=lambda *_: RunResult(0, _report("cpu-x86_64"), ""))
    engine.runtimes = NVIDIA_RUNTIME
    _image(engine, "12.4")
    code, err = _check(monkeypatch, engine, capsys)
    assert code == 1
    assert "records no CPU fingerprint" in err
    with pytest.raises(CheckError):
        run_selfcheck(engine, "img:1", OLD_ARGV, gpus=True)


@pytest.mark.parametrize("value", [None, "cuda", "12.4\n", "12.4 ", "../12.4"])
def test_an_image_whose_cuda_label_is_missing_or_odd_is_bad_input(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], value: str | None
) -> None:
    engine = FakeEngine()
    _image(engine, value)
    code, err = _check(monkeypatch, engine, capsys)
    assert code == 2
    assert "reprobox.cuda label" in err
    assert engine.runs == [], "nothing runs in an image that cannot say what it is"


def test_device_argv_puts_a_cuda_image_on_the_gpu() -> None:
    base = ["python", "x.py", "--steps", "3"]
    assert device_argv([*base, "--device", "auto"], cuda=True) == [*base, "--device", "cuda"]
    assert device_argv([*base, "--device=cpu"], cuda=True) == [*base, "--device", "cuda"]
    assert device_argv(base, cuda=True) == [*base, "--device", "cuda"]
    assert device_argv([*base, "--device", "auto"], cuda=False) == [*base, "--device", "auto"]


# --- the driver policy: one table, both sides ------------------------------------------------------


def _toolkit_admits(require: str, *, driver: str, driver_cuda: str) -> bool:
    """NVIDIA_REQUIRE_CUDA as libnvidia-container's dsl_evaluate reads it.

    Space-separated alternatives are ORed, comma-separated conditions within one ANDed; `cuda`
    is the newest CUDA the driver supports, `driver` its version; versions compare by number,
    trailing zeros ignored.
    """
    facts = {"cuda": driver_cuda, "driver": driver}

    def number(text: str) -> tuple[int, ...]:
        parts = [int(part) for part in text.split(".")]
        while parts and parts[-1] == 0:
            parts.pop()
        return tuple(parts)

    def holds(condition: str) -> bool:
        match = re.fullmatch(r"([a-z]+)(>=|<=|!=|=|<|>)([0-9.]+)", condition)
        assert match is not None, condition
        have, want = number(facts[match[1]]), number(match[3])
        return {
            ">=": have >= want,
            "<=": have <= want,
            ">": have > want,
            "<": have < want,
            "=": have == want,
            "!=": have != want,
        }[match[2]]

    return any(
        all(holds(condition) for condition in alternative.split(",") if condition)
        for alternative in require.split(" ")
        if alternative
    )


def test_the_toolkit_grammar_is_or_between_spaces_and_and_between_commas() -> None:
    old = {"driver": "545.23.06", "driver_cuda": "12.3"}
    assert _toolkit_admits("cuda>=12.4 driver>=545", **old) is True
    assert _toolkit_admits("cuda>=12.4,driver>=545", **old) is False
    assert _toolkit_admits("cuda>=12.0", **old) is True
    assert _toolkit_admits("cuda>=12.4", **old) is False


# (the image's CUDA, the host's driver, the newest CUDA that driver supports, doctor's verdict)
DRIVERS = [
    ("12.4", "570.86.15", "12.8", "ok"),
    ("12.4", "550.54.15", "12.4", "ok"),
    ("12.4", "535.104.05", "12.2", "warn"),
    ("12.4", "525.60.13", "12.0", "warn"),
    ("12.4", "520.61.05", "11.8", "fail"),
    ("12.4", "470.82.01", "11.4", "fail"),
    ("11.8", "520.61.05", "11.8", "ok"),
    ("11.8", "470.82.01", "11.4", "warn"),
    ("11.8", "450.51.06", "11.0", "fail"),
    ("12.8", "580.65.06", "13.0", "ok"),
    ("12.8", "550.54.15", "12.4", "warn"),
]


def _spec_for(cuda: str, tmp: Path) -> Path:
    torch = {"11.8": "2.5.1", "12.4": "2.5.1", "12.8": "2.7.1"}[cuda]
    text = CUDA_SPEC.read_text().replace('"2.5.1"', f'"{torch}"').replace('"12.4"', f'"{cuda}"')
    text = "\n".join(line for line in text.splitlines() if "cudnn" not in line)
    path = tmp / f"cuda-{cuda}.yaml"
    path.write_text(text + "\n")
    return path


def _gpu_host(tmp: Path, spec: Path, driver: str) -> dict[str, Any]:
    """`reprobox doctor SPEC --json` on a faked GPU host with `driver`."""
    engine = FakeEngine()
    engine.runtimes = NVIDIA_RUNTIME
    probes = Probes(
        which=lambda name: f"/usr/bin/{name}",
        disk=lambda path: Disk(path, 10**12, 1),
        gpus=lambda: ([Gpu("NVIDIA H200", driver, "9.0")], "nvidia-smi"),
    )
    return report(doctor(context(engine, tmp / "cache"), spec, probes=probes))


@pytest.mark.parametrize(("cuda", "driver", "driver_cuda", "status"), DRIVERS)
def test_doctor_passes_warns_and_fails_exactly_where_the_toolkit_starts_the_image(
    tmp_path: Path, cuda: str, driver: str, driver_cuda: str, status: str
) -> None:
    spec = _spec_for(cuda, tmp_path)
    require = dict(image_env(load_spec(spec)))["NVIDIA_REQUIRE_CUDA"]
    assert require == nvidia_require_cuda(cuda)
    admitted = _toolkit_admits(require, driver=driver, driver_cuda=driver_cuda)
    assert admitted is (status != "fail"), f"the image's {require} and doctor's {status} disagree"
    doctor_report = _gpu_host(tmp_path, spec, driver)
    (line,) = [line for line in doctor_report["lines"] if line["name"] == "driver"]
    assert line["status"] == status, doctor_report["summary"]
    assert doctor_report["exit_code"] == (3 if status == "fail" else 0)
    if status == "fail":
        assert "refuses to start the image" in line["detail"]
        assert require in line["detail"]
    if status == "warn":
        assert "minor-version compatibility" in line["detail"]


# --- the in-image programs' CUDA parts, with this host's CPU torch ----------------------------------


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv(tmp_path_factory.mktemp("gpu") / "venv")


def _selfcheck(venv: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(venv), str(SELFCHECK), "--steps", "2", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=300,
        check=False,
    )


def test_the_self_check_told_cuda_without_a_gpu_says_so_and_exits_3(venv: Path) -> None:
    done = _selfcheck(venv, "--device", "cuda")
    assert done.returncode == 3, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is False
    assert report["fingerprint"] is None
    assert report["device_class"] is None, "never a CPU run in place of the GPU one"
    assert "is a CPU build: it has no CUDA" in report["device_missing"]
    assert report["runs"] == []


def test_the_cuda_chaos_is_refused_on_the_cpu(venv: Path) -> None:
    done = _selfcheck(venv, "--device", "cpu", REPROBOX_SELFCHECK_CHAOS="index_add")
    assert done.returncode == 2
    assert "index_add races on cuda, not cpu" in done.stderr
    unknown = _selfcheck(venv, "--device", "cpu", REPROBOX_SELFCHECK_CHAOS="bogus")
    assert unknown.returncode == 2
    assert "'index_put', 'index_add'" in unknown.stderr


def test_run_selfcheck_turns_the_missing_gpu_into_exit_3() -> None:
    missing = "torch cannot use CUDA: Found no NVIDIA driver on your system"
    answer = RunResult(3, _report("", passed=False, missing=missing), "")
    engine = FakeEngine(run_handler=lambda *_: answer)
    engine.add_image({"config": {}}, "img:1")
    with pytest.raises(GpuUnavailableError) as caught:
        run_selfcheck(engine, "img:1", OLD_ARGV)
    assert caught.value.exit_code == 3
    assert "Found no NVIDIA driver" in caught.value.message


class _StrictConfig(ModuleType):
    """Like torch._inductor.config: setting a name it does not define raises (2.5 has none)."""

    def __init__(self, **settings: Any) -> None:
        super().__init__("torch._inductor.config")
        for name, value in settings.items():
            object.__setattr__(self, name, value)

    def __setattr__(self, name: str, value: Any) -> None:
        if not hasattr(self, name):
            raise AttributeError(f"torch._inductor.config.{name} does not exist")
        super().__setattr__(name, value)


class _ReadOnlyConfig(_StrictConfig):
    def __setattr__(self, name: str, value: Any) -> None:
        raise RuntimeError("read-only")


def _hook_module(monkeypatch: pytest.MonkeyPatch) -> Any:
    # Loaded under another name and switched off, so this test process gets no import hook.
    monkeypatch.setenv("REPROBOX_DISABLE", "1")
    spec = importlib.util.spec_from_file_location("reprobox_hook_under_test", HOOK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    module._settings["deterministic"] = True
    return module


def test_the_hook_sets_inductor_determinism_only_where_it_exists(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    hook = _hook_module(monkeypatch)
    old = _StrictConfig()
    hook._guard(hook._configure_inductor, old)  # torch 2.5: no such setting
    assert hook._errors == []
    assert not hasattr(old, "deterministic")
    new = _StrictConfig(deterministic=False)
    hook._guard(hook._configure_inductor, new)
    assert new.deterministic is True
    hook._guard(hook._configure_inductor, _ReadOnlyConfig(deterministic=False))
    (error,) = hook._errors
    assert "torch.compile generates may not be deterministic" in error
    assert "unseeded" not in error, "seeding was done; only Inductor's flag was not"
    assert sys.modules.get("reprobox_hook_under_test") is None
