"""The lock stage: pip's report to a Lock, consistency checks, the lock file, staleness.

Unit tests replay pip runs recorded on a real machine (tests/data/pip-*.json: exit status,
output, and the --report JSON) through a fake runner; `network` tests run the real pip.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Sequence
from hashlib import sha256
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import pytest
from replay import FakeRunner, ensure_lock, resolve

from reprobox._pip import PipConfig, read_pip_config, run_pip
from reprobox._platform import manylinux_platforms, platform_for
from reprobox._pylock import format_pylock
from reprobox.errors import EXIT_BAD_INPUT, EXIT_MISSING, LockError
from reprobox.locked import IndexSettings, Lock, LockedWheel, requirements_text
from reprobox.lockfile import (
    default_lock_path,
    format_lock,
    parse_lock,
    read_lockfile,
    write_lockfile,
)
from reprobox.spec import Spec
from reprobox.spec_load import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
CPU_SPEC = ROOT / "images" / "demo-cpu.yaml"
CUDA_SPEC = ROOT / "images" / "cuda-12.4.yaml"
CUDNN_9_1_SHA = "165764f44ef8c61fcdfdfdbe769d687e06374059fbb388b6c89ecb0e28793a6f"


def _spec(
    extra: str = "", *, torch: str = "2.13.0", cuda: str = "cpu", python: str = "3.11"
) -> Spec:
    base = (
        'base: {bootstrap: "debian:bookworm"}'
        if python == "3.11"
        else "base: {image: 'nvidia/cuda:12.4.1-runtime-ubuntu22.04@sha256:" + "0" * 64 + "'}"
    )
    text = (
        f'version: 1\nname: t\n{base}\npython: "{python}"\n'
        f'torch: {{version: "{torch}", cuda: "{cuda}"}}\n{extra}'
    )
    return parse_spec(text)


def _item(
    name: str, version: str, requires: Sequence[str] = (), sha: str | None = None
) -> dict[str, Any]:
    filename = f"{name.replace('-', '_')}-{version}-py3-none-any.whl"
    info: dict[str, Any] = {"url": f"https://files.example/{filename}"}
    digest = sha256(filename.encode()).hexdigest() if sha is None else sha
    if digest:
        info["archive_info"] = {"hashes": {"sha256": digest}}
    return {
        "metadata": {"name": name, "version": version, "requires_dist": list(requires)},
        "download_info": info,
    }


def _report(*items: dict[str, Any]) -> dict[str, Any]:
    return {"version": "1", "install": [_item("pip", "26.3"), *items]}


def _ok(report: dict[str, Any], stdout: str = "") -> dict[str, Any]:
    return {"rc": 0, "stdout": stdout, "stderr": "", "report": report}


# --- the target platform -------------------------------------------------------------------


def test_manylinux_platforms_cover_the_glibc_newest_first() -> None:
    tags = manylinux_platforms("x86_64", "2.36")
    assert tags[0] == "manylinux_2_36_x86_64"
    assert tags[-1] == "manylinux1_x86_64"
    assert {"manylinux2014_x86_64", "manylinux2010_x86_64", "manylinux_2_5_x86_64"} <= set(tags)
    assert "manylinux_2_37_x86_64" not in tags
    assert tags.index("manylinux_2_28_x86_64") < tags.index("manylinux_2_17_x86_64")


def test_manylinux_platforms_of_an_older_glibc_refuse_newer_wheels() -> None:
    assert "manylinux_2_28_x86_64" not in manylinux_platforms("x86_64", "2.17")
    arm = manylinux_platforms("aarch64", "2.28")
    assert arm[-2:] == ("manylinux_2_17_aarch64", "manylinux2014_aarch64")
    assert "manylinux2014_aarch64" in arm
    assert not any("manylinux1" in t or "2010" in t for t in arm)


def test_target_takes_glibc_from_the_bootstrap_suite_or_assumes_one() -> None:
    bookworm = platform_for(load_spec(CPU_SPEC), arch="x86_64")
    assert (bookworm.glibc, bookworm.glibc_assumed, bookworm.abi) == ("2.36", False, "cp311")
    image = platform_for(_spec(python="3.12", cuda="12.4", torch="2.5.1"), arch="x86_64")
    assert (image.glibc, image.glibc_assumed, image.abi) == ("2.28", True, "cp312")


# --- resolving the examples from recorded pip runs -------------------------------------------


def test_cpu_example_locks_the_cpu_build_of_torch_for_the_image_platform() -> None:
    runner = FakeRunner.recorded("cpu")
    lock = resolve(load_spec(CPU_SPEC), runner=runner, arch="x86_64")
    torch = lock.wheel("torch")
    assert torch is not None
    assert torch.requirement == "torch==2.13.0+cpu"
    assert torch.filename == "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"
    assert lock.torch_cuda is None
    assert lock.torch_cudnn is None
    argv = runner.argvs[0]
    assert argv[-3:] == [
        "torch==2.13.0+cpu",
        "numpy==2.4.6",
        "pip==26.3",
    ]
    for flag in ("--dry-run", "--only-binary=:all:", "--ignore-installed"):
        assert flag in argv
    assert argv[argv.index("--python-version") + 1] == "3.11"
    assert argv[argv.index("--abi") + 1] == "cp311"
    platforms = [argv[i + 1] for i, a in enumerate(argv) if a == "--platform"]
    assert platforms == [*manylinux_platforms("x86_64", "2.36"), "linux_x86_64"]


def test_cpu_example_groups_torch_with_its_closure_apart_from_the_rest() -> None:
    lock = resolve(load_spec(CPU_SPEC), runner=FakeRunner.recorded("cpu"), arch="x86_64")
    groups = {w.name: w.group for w in lock.wheels}
    assert groups["pip"] == "installer"
    assert groups["numpy"] == "rest"
    # torch -> sympy -> mpmath and torch -> jinja2 -> markupsafe are torch's, however deep.
    for name in ("torch", "sympy", "mpmath", "jinja2", "markupsafe", "filelock", "setuptools"):
        assert groups[name] == "torch", name


def test_lock_records_the_spec_and_the_indexes_pip_used() -> None:
    spec = load_spec(CPU_SPEC)
    lock = resolve(spec, runner=FakeRunner.recorded("cpu"), arch="x86_64")
    assert lock.spec_sha256 == spec.sha256
    assert lock.index == IndexSettings(
        (
            "https://pypi.org/simple",
            "file:///srv/mirror/pypi/simple",
            "file:///srv/mirror/pypi-more/simple",
        ),
        ("/srv/wheels",),
    )
    assert lock.installer == "pip==26.3"


def test_pip_evaluates_markers_for_the_image_not_for_this_interpreter() -> None:
    torch = _item("torch", "2.5.1", ["nvidia-cuda-runtime-cu12==12.4.127"])
    runner = FakeRunner([_ok(_report(torch))])
    resolve(_spec(torch="2.5.1", cuda="12.4", python="3.12"), runner=runner, arch="x86_64")
    argv = runner.argvs[0]
    environment = json.loads(argv[3])
    assert environment["python_version"] == "3.12"
    assert environment["platform_machine"] == "x86_64"
    assert environment["sys_platform"] == "linux"


def test_closure_follows_markers_for_the_image_python() -> None:
    torch = _item(
        "torch",
        "2.5.1",
        ['setuptools; python_version >= "3.12"', "nvidia-cuda-runtime-cu12==12.4.127"],
    )
    report = _report(
        torch, _item("setuptools", "80.0"), _item("nvidia-cuda-runtime-cu12", "12.4.127")
    )
    lock311 = resolve(
        _spec(torch="2.5.1", cuda="12.4"), runner=FakeRunner([_ok(report)]), arch="x86_64"
    )
    lock312 = resolve(
        _spec(torch="2.5.1", cuda="12.4", python="3.12"),
        runner=FakeRunner([_ok(report)]),
        arch="x86_64",
    )
    assert {w.name: w.group for w in lock311.wheels}["setuptools"] == "rest"
    assert {w.name: w.group for w in lock312.wheels}["setuptools"] == "torch"


def test_cuda_example_pins_cudnn_with_its_hash() -> None:
    runner = FakeRunner.recorded("cuda")
    lock = resolve(load_spec(CUDA_SPEC), runner=runner, arch="x86_64")
    cudnn = lock.wheel("nvidia-cudnn-cu12")
    assert cudnn is not None
    assert (cudnn.version, cudnn.group, cudnn.sha256) == ("9.1.0.70", "torch", CUDNN_9_1_SHA)
    assert (lock.torch_cuda, lock.torch_cudnn) == ("12.4.127", "9.1.0.70")
    assert "torch===2.5.1" in runner.argvs[0]  # PyPI's build: `===` keeps a local +cpu out
    groups = {w.name: w.group for w in lock.wheels}
    assert groups["transformers"] == groups["tokenizers"] == groups["numpy"] == "rest"
    assert groups["triton"] == groups["nvidia-cublas-cu12"] == "torch"


# --- consistency: failing loudly -------------------------------------------------------------


def test_a_cudnn_torch_does_not_pin_is_an_error_naming_the_pin() -> None:
    spec = parse_spec(CUDA_SPEC.read_text().replace('cudnn: "9.1.0.70"', 'cudnn: "8.9"'))
    with pytest.raises(LockError) as err:
        resolve(spec, runner=FakeRunner.recorded("cuda"), arch="x86_64")
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "torch 2.5.1 pins cuDNN 9.1.0.70" in err.value.message
    assert 'set torch.cudnn to "9.1.0.70"' in (err.value.hint or "")


def test_the_right_cudnn_passes() -> None:
    lock = resolve(load_spec(CUDA_SPEC), runner=FakeRunner.recorded("cuda"), arch="x86_64")
    assert lock.torch_cudnn == "9.1.0.70"


def test_a_torch_built_for_another_cuda_is_an_error() -> None:
    torch = _item("torch", "2.5.1", ["nvidia-cuda-runtime-cu12==12.1.105"])
    runner = FakeRunner([_ok(_report(torch, _item("nvidia-cuda-runtime-cu12", "12.1.105")))])
    with pytest.raises(LockError) as err:
        resolve(_spec(torch="2.5.1", cuda="12.4"), runner=runner, arch="x86_64")
    assert "built for CUDA 12.1" in err.value.message
    assert err.value.hint == 'set torch.cuda to "12.1"'


def test_cuda_toolkit_pins_count_as_the_runtime() -> None:
    torch = _item(
        "torch", "2.13.0", ['cuda-toolkit[cublas,cudart]==13.0.3; platform_system == "Linux"']
    )
    runner = FakeRunner([_ok(_report(torch, _item("cuda-toolkit", "13.0.3")))])
    lock = resolve(_spec(torch="2.13.0", cuda="13.0"), runner=runner, arch="x86_64")
    assert lock.torch_cuda == "13.0.3"


def test_transformers_that_needs_a_newer_torch_through_its_extra_is_an_error() -> None:
    transformers = _item("transformers", "5.23.0", ['torch>=2.14; extra == "torch"', "numpy>=1.17"])
    runner = FakeRunner([_ok(_report(_item("torch", "2.13.0+cpu"), transformers))])
    with pytest.raises(LockError) as err:
        resolve(_spec('transformers: "5.23.0"', torch="2.13.0"), runner=runner, arch="x86_64")
    message = err.value.message
    assert "transformers 5.23.0 needs torch>=2.14" in message
    assert "'torch' extra" in message
    assert err.value.exit_code == EXIT_BAD_INPUT


def test_transformers_that_accepts_the_torch_passes_and_unrelated_extras_are_ignored() -> None:
    transformers = _item(
        "transformers", "4.46.3", ['torch; extra == "torch"', 'torch>=9; extra == "dev"']
    )
    runner = FakeRunner([_ok(_report(_item("torch", "2.13.0+cpu"), transformers))])
    lock = resolve(_spec('transformers: "4.46.3"'), runner=runner, arch="x86_64")
    assert lock.wheel("transformers") is not None


def _safetensors_report(*extra: dict[str, Any]) -> dict[str, Any]:
    # The seeds' stack: transformers 4.36.2 needs safetensors, whose 0.8.0 release asks for
    # torch>=2.4 only through its 'torch' extra.
    return _report(
        _item("torch", "2.13.0+cpu"),
        _item("transformers", "4.36.2", ["safetensors>=0.3.1", 'torch>=1.10; extra == "torch"']),
        _item("safetensors", "0.8.0", ['torch>=2.14; extra == "torch"', 'numpy; extra == "numpy"']),
        *extra,
    )


def test_an_extra_nobody_requested_does_not_count() -> None:
    runner = FakeRunner([_ok(_safetensors_report())])
    lock = resolve(_spec('transformers: "4.36.2"'), runner=runner, arch="x86_64")
    assert lock.wheel("safetensors") is not None


def test_an_extra_a_root_requests_counts() -> None:
    runner = FakeRunner([_ok(_safetensors_report())])
    spec = _spec('transformers: "4.36.2"\npackages: ["safetensors[torch]==0.8.0"]')
    with pytest.raises(LockError) as err:
        resolve(spec, runner=runner, arch="x86_64")
    assert "safetensors 0.8.0 needs torch>=2.14 (through its 'torch' extra)" in err.value.message


def test_an_extra_a_dependency_requests_counts() -> None:
    # peft -> accelerate[torch] -> torch>=2.14: the extra is asked two levels down.
    peft = _item("peft", "0.7.1", ["accelerate[torch]>=0.21"])
    accelerate = _item("accelerate", "0.25.0", ['torch>=2.14; extra == "torch"'])
    runner = FakeRunner([_ok(_report(_item("torch", "2.13.0+cpu"), peft, accelerate))])
    with pytest.raises(LockError) as err:
        resolve(_spec('packages: ["peft==0.7.1"]'), runner=runner, arch="x86_64")
    assert "accelerate 0.25.0 needs torch>=2.14 (through its 'torch' extra)" in err.value.message
    # The same graph without the extra asked for locks.
    peft = _item("peft", "0.7.1", ["accelerate>=0.21"])
    runner = FakeRunner([_ok(_report(_item("torch", "2.13.0+cpu"), peft, accelerate))])
    assert resolve(_spec('packages: ["peft==0.7.1"]'), runner=runner, arch="x86_64").wheel("peft")


def test_a_plain_torch_requirement_of_any_package_counts() -> None:
    needy = _item("needy", "1.0", ["torch>=2.14"])
    runner = FakeRunner([_ok(_report(_item("torch", "2.13.0+cpu"), needy))])
    with pytest.raises(LockError) as err:
        resolve(_spec('packages: ["needy==1.0"]'), runner=runner, arch="x86_64")
    assert "needy 1.0 needs torch>=2.14, but the spec pins torch 2.13.0+cpu" in err.value.message


def test_a_conflict_becomes_one_clear_error_naming_the_requirement() -> None:
    spec = _spec("packages: [torchvision==0.21.0]")
    with pytest.raises(LockError) as err:
        resolve(spec, runner=FakeRunner.recorded("conflict"), arch="x86_64")
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "torchvision 0.21.0 depends on torch==2.6.0" in err.value.message
    assert "never changes a pin" in err.value.message


def test_an_unknown_version_is_an_error_listing_versions_that_exist() -> None:
    runner = FakeRunner.recorded("numpy999")
    with pytest.raises(LockError) as err:
        resolve(_spec("packages: [numpy==9.9.9]"), runner=runner, arch="x86_64")
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "numpy has no version 9.9.9" in err.value.message
    assert "2.4.6" in err.value.message
    assert "pin a version that exists" in (err.value.hint or "")
    assert "-vv" in runner.argvs[1]
    assert "--no-deps" in runner.argvs[1]


def test_a_version_without_a_wheel_for_the_python_is_an_error_naming_the_fix() -> None:
    with pytest.raises(LockError) as err:
        resolve(
            _spec("packages: [numpy==1.21.0]"),
            runner=FakeRunner.recorded("numpy121"),
            arch="x86_64",
        )
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "numpy 1.21.0 has no wheel for Python 3.11 (cp311)" in err.value.message
    assert "cp39" in err.value.message
    assert "cp311 wheels" in (err.value.hint or "")


def test_an_unreachable_variant_index_is_exit_3_naming_it() -> None:
    runner = FakeRunner.recorded("variant")
    with pytest.raises(LockError) as err:
        resolve(_spec(torch="2.5.1", cuda="12.1"), runner=runner, arch="x86_64")
    assert err.value.exit_code == EXIT_MISSING
    assert "https://download.pytorch.org/whl/cu121" in err.value.message
    assert "torch==2.5.1+cu121" in runner.argvs[0]
    second = runner.argvs[1]
    extras = [second[i + 1] for i, arg in enumerate(second) if arg == "--extra-index-url"]
    assert extras[-1] == "https://download.pytorch.org/whl/cu121"
    assert "https://download.pytorch.org/whl/cu121" not in runner.argvs[0]


def test_a_variant_build_resolves_through_pytorch_s_index_when_it_answers() -> None:
    # A real pip run recorded against a stand-in for https://download.pytorch.org/whl/cu121 (that
    # index is not reachable from these machines): it served a small wheel named and tagged as
    # PyTorch's own (`linux_x86_64`) with torch 2.5.1+cu121's CUDA 12.1 pins; the nvidia wheels
    # came from PyPI. The first run, without PyTorch's index, found no +cu121 build.
    runner = FakeRunner.recorded("variant-ok")
    lock = resolve(_spec(torch="2.5.1", cuda="12.1"), runner=runner, arch="x86_64")
    torch = lock.wheel("torch")
    assert torch is not None
    assert torch.requirement == "torch==2.5.1+cu121"
    assert torch.url.startswith("https://download.pytorch.org/whl/cu121/torch-2.5.1")
    assert torch.filename == "torch-2.5.1+cu121-cp311-cp311-linux_x86_64.whl"
    assert (lock.torch_cuda, lock.torch_cudnn) == ("12.1.105", "9.1.0.70")
    assert "https://download.pytorch.org/whl/cu121" in lock.index.index_urls
    assert "https://download.pytorch.org/whl/cu121" not in runner.argvs[0]
    second = runner.argvs[1]
    extras = [second[i + 1] for i, arg in enumerate(second) if arg == "--extra-index-url"]
    assert extras[-1] == "https://download.pytorch.org/whl/cu121"
    # PyTorch tags its older variant wheels `linux_x86_64`: the image's platforms must admit it.
    platforms = [second[i + 1] for i, arg in enumerate(second) if arg == "--platform"]
    assert platforms[-1] == "linux_x86_64"
    assert "linux_x86_64" in lock.platforms
    assert {w.name: w.group for w in lock.wheels}["nvidia-cudnn-cu12"] == "torch"


def test_an_index_that_failed_is_exit_3_even_when_pip_succeeded() -> None:
    stderr = (
        "reprobox-pip: Could not fetch URL https://mirror.example/simple/torch/: connection error: "
        "timed out - skipping\n"
    )
    call = _ok(
        _report(_item("torch", "2.13.0+cpu")), "Looking in indexes: https://mirror.example/simple\n"
    )
    call["stderr"] = stderr
    with pytest.raises(LockError) as err:
        resolve(_spec(), runner=FakeRunner([call]), arch="x86_64")
    assert err.value.exit_code == EXIT_MISSING
    assert "https://mirror.example/simple" in err.value.message


def test_a_missing_project_page_on_an_extra_index_is_not_a_network_failure() -> None:
    call = _ok(_report(_item("torch", "2.13.0+cpu")))
    call["stderr"] = (
        "reprobox-pip: Could not fetch URL https://extra.example/simple/torch/: 404 Client Error: "
        "Not Found for url: https://extra.example/simple/torch/ - skipping\n"
    )
    assert resolve(_spec(), runner=FakeRunner([call]), arch="x86_64").wheel("torch") is not None


def test_credentials_never_reach_the_lock() -> None:
    item = _item("torch", "2.13.0+cpu")
    item["download_info"]["url"] = (
        "https://user:secret@mirror.example/files/torch-2.13.0+cpu-py3-none-any.whl"
    )
    stdout = "Looking in indexes: https://user:****@mirror.example/simple\n"
    lock = resolve(_spec(), runner=FakeRunner([_ok(_report(item), stdout)]), arch="x86_64")
    text = format_lock(lock)
    assert "secret" not in text
    assert "user:" not in text
    assert "--index-url https://mirror.example/simple" in text


def test_a_pip_that_ignored_the_image_markers_is_refused() -> None:
    report = _report(_item("torch", "2.13.0+cpu"))
    report["environment"] = {"python_version": "3.9", "python_full_version": "3.9.2"}
    with pytest.raises(LockError, match="evaluated dependency markers for this machine"):
        resolve(_spec(), runner=FakeRunner([_ok(report)]), arch="x86_64")


def test_an_unexplained_pip_failure_with_a_network_error_is_exit_3() -> None:
    call = {"rc": 2, "stdout": "", "stderr": "ERROR: ... NewConnectionError(...)\n", "report": None}
    with pytest.raises(LockError) as err:
        resolve(_spec(), runner=FakeRunner([call]), arch="x86_64")
    assert err.value.exit_code == EXIT_MISSING
    assert "NewConnectionError" in err.value.message


def test_a_wheel_without_a_published_hash_is_refused() -> None:
    torch = _item("torch", "2.13.0+cpu", sha="")
    with pytest.raises(LockError, match="no sha256"):
        resolve(_spec(), runner=FakeRunner([_ok(_report(torch))]), arch="x86_64")


@pytest.mark.parametrize("pin", ["torch==2.5.1", "transformers==4.46.3", "pip==25.0"])
def test_packages_may_not_pin_what_reprobox_sets(pin: str) -> None:
    with pytest.raises(LockError, match="which is set by"):
        resolve(_spec(f"packages: [{pin}]"), runner=FakeRunner([]), arch="x86_64")


def test_a_torch_version_label_that_contradicts_torch_cuda_is_refused() -> None:
    with pytest.raises(LockError, match=r"\+cu121 build"):
        resolve(_spec(torch="2.5.1+cu121", cuda="12.4"), runner=FakeRunner([]), arch="x86_64")


def test_the_spec_index_settings_go_to_pip(tmp_path: Path) -> None:
    (tmp_path / "wheels").mkdir()
    spec_file = tmp_path / "s.yaml"
    spec_file.write_text(
        CPU_SPEC.read_text()
        + "index:\n  url: https://mirror.example/simple\n  extra_urls: [https://extra.example/simple]\n"
        "  find_links: [wheels]\n"
    )
    runner = FakeRunner([_ok(_report(_item("torch", "2.13.0+cpu")))])
    resolve(load_spec(spec_file), runner=runner, arch="x86_64")
    argv = runner.argvs[0]
    assert argv[argv.index("--index-url") + 1] == "https://mirror.example/simple"
    assert argv[argv.index("--extra-index-url") + 1] == "https://extra.example/simple"
    assert argv[argv.index("--find-links") + 1] == str(tmp_path / "wheels")


# --- the lock file ---------------------------------------------------------------------------


def _cpu_lock() -> Lock:
    return resolve(load_spec(CPU_SPEC), runner=FakeRunner.recorded("cpu"), arch="x86_64")


def test_an_assumed_glibc_is_said_so_and_read_back() -> None:
    torch = _item("torch", "2.5.1", ["nvidia-cuda-runtime-cu12==12.4.127"])
    spec = _spec(torch="2.5.1", cuda="12.4", python="3.12")
    lock = resolve(spec, runner=FakeRunner([_ok(_report(torch))]), arch="x86_64")
    text = format_lock(lock)
    assert "# glibc: 2.28 (assumed: the glibc of a base.image is not known)" in text.splitlines()
    back = parse_lock(text)
    assert (back.glibc, back.glibc_assumed) == ("2.28", True)
    assert back == lock


def test_lock_file_round_trips_and_is_deterministic(tmp_path: Path) -> None:
    first, second = tmp_path / "a.lock", tmp_path / "b.lock"
    write_lockfile(first, _cpu_lock())
    write_lockfile(second, _cpu_lock())
    assert first.read_bytes() == second.read_bytes()
    assert read_lockfile(first).lock == _cpu_lock()


def test_lock_file_records_sizes_where_known_and_reads_locks_without_them() -> None:
    lock = _cpu_lock()
    sized = dataclasses.replace(
        lock, wheels=tuple(dataclasses.replace(w, size=1000 + i) for i, w in enumerate(lock.wheels))
    )
    text = format_lock(sized)
    assert "    # size: 1000" in text.splitlines()
    assert parse_lock(text) == sized
    unsized = dataclasses.replace(
        lock, wheels=tuple(dataclasses.replace(w, size=None) for w in lock.wheels)
    )
    assert "# size:" not in format_lock(unsized)
    assert all(w.size is None for w in parse_lock(format_lock(unsized)).wheels)
    with pytest.raises(LockError, match="size that is not a number"):
        parse_lock(text.replace("# size: 1000", "# size: 1e9"))


def test_lock_file_is_a_hashed_requirements_file_with_a_header() -> None:
    text = format_lock(_cpu_lock())
    lines = text.splitlines()
    assert f"# spec-sha256: {load_spec(CPU_SPEC).sha256}" in lines
    assert "--find-links /srv/wheels" in lines
    entry = lines.index("torch==2.13.0+cpu \\")
    assert (
        lines[entry + 1]
        == "    --hash=sha256:6746dbcbeb526eb61330b76b41ff1b4eb848951103a892eeb080dfa2b264667b"
    )
    assert lines[entry + 2] == "    # group: torch"
    names = [line.split("==")[0] for line in lines if line.endswith(" \\")]
    assert names == sorted(names)


def _tiny_wheel(folder: Path) -> Path:
    """A minimal valid wheel of a project `reprobox-probe` 1.0."""
    path = folder / "reprobox_probe-1.0-py3-none-any.whl"
    info = "reprobox_probe-1.0.dist-info"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("reprobox_probe.py", "")
        archive.writestr(
            f"{info}/METADATA", "Metadata-Version: 2.1\nName: reprobox-probe\nVersion: 1.0\n"
        )
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    return path


def _probe_lock(folder: Path, digest: str) -> Lock:
    wheel = LockedWheel(
        "reprobox-probe", "1.0", "reprobox_probe-1.0-py3-none-any.whl", "file:///x", digest, "rest"
    )
    return Lock(
        "0" * 64, "3.11", "x86_64", "2.36", manylinux_platforms("x86_64", "2.36"),
        IndexSettings((), (str(folder),)), "pip 26.3", "pip==26.3", "0", (wheel,), None, None,
    )  # fmt: skip


def _pip_reads(lock_file: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
         "--require-hashes", "--no-deps", "-r", str(lock_file)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def test_pip_reads_the_lock_file_options_and_hashes(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    digest = sha256(_tiny_wheel(folder).read_bytes()).hexdigest()
    good, bad = tmp_path / "good.lock", tmp_path / "bad.lock"
    write_lockfile(good, _probe_lock(folder, digest))
    write_lockfile(bad, _probe_lock(folder, "f" * 64))
    accepted = _pip_reads(good)
    assert accepted.returncode == 0, accepted.stderr
    assert "Would install reprobox-probe-1.0" in accepted.stdout
    refused = _pip_reads(bad)  # a check that can fail: a wrong hash must be refused
    assert refused.returncode != 0
    assert "DO NOT MATCH THE HASHES" in refused.stderr


def test_requirements_text_of_one_group() -> None:
    text = requirements_text(_cpu_lock().group("installer"))
    assert text == (
        "pip==26.3 \\\n    --hash=sha256:f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13\n"
    )


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("numpy==1 \\\n    --hash=sha256:" + "a" * 64 + "\n", "reprobox-lock"),
        ("garbage\n", "reprobox-lock"),
    ],
)
def test_a_file_that_is_not_a_lock_is_refused(text: str, problem: str) -> None:
    with pytest.raises(LockError, match=problem) as err:
        parse_lock(text, "x.lock")
    assert "--relock" in (err.value.hint or "")


def test_a_lock_naming_a_path_instead_of_a_wheel_file_is_refused() -> None:
    text = format_lock(_cpu_lock()).replace(
        "# file: numpy-2.4.6-cp311", "# file: ../../numpy-2.4.6-cp311"
    )
    with pytest.raises(LockError, match="no plain wheel file"):
        parse_lock(text, "x.lock")


def test_default_lock_path() -> None:
    assert default_lock_path(Path("a/demo.yaml")) == Path("a/demo.lock")
    assert default_lock_path(Path("demo.yml")) == Path("demo.lock")
    assert default_lock_path(Path("demo")) == Path("demo.lock")


# --- staleness -------------------------------------------------------------------------------


def _copy_cpu_spec(tmp_path: Path) -> Path:
    path = tmp_path / "demo.yaml"
    shutil.copyfile(CPU_SPEC, path)
    return path


def test_ensure_lock_writes_a_missing_lock_then_reuses_it(tmp_path: Path) -> None:
    spec = load_spec(_copy_cpu_spec(tmp_path))
    path = tmp_path / "demo.lock"
    first = ensure_lock(spec, path, runner=FakeRunner.recorded("cpu"))
    assert path.exists()
    again = ensure_lock(spec, path, runner=FakeRunner([]))  # no pip run allowed
    assert again == first


def test_a_changed_spec_stops_and_the_lock_is_not_rewritten(tmp_path: Path) -> None:
    spec_path = _copy_cpu_spec(tmp_path)
    path = tmp_path / "demo.lock"
    ensure_lock(load_spec(spec_path), path, runner=FakeRunner.recorded("cpu"))
    before = path.read_bytes()
    spec_path.write_text(spec_path.read_text().replace("seed: 0", "seed: 1"))
    with pytest.raises(LockError) as err:
        ensure_lock(load_spec(spec_path), path, runner=FakeRunner([]))
    assert f"the spec changed since {path} was written" in err.value.message
    assert "--relock" in err.value.message
    assert path.read_bytes() == before


def test_relock_rewrites_the_lock_for_the_changed_spec(tmp_path: Path) -> None:
    spec_path = _copy_cpu_spec(tmp_path)
    path = tmp_path / "demo.lock"
    ensure_lock(load_spec(spec_path), path, runner=FakeRunner.recorded("cpu"))
    spec_path.write_text(spec_path.read_text().replace("seed: 0", "seed: 1"))
    spec = load_spec(spec_path)
    locked = ensure_lock(spec, path, relock=True, runner=FakeRunner.recorded("cpu"))
    assert locked.lock.spec_sha256 == read_lockfile(path).lock.spec_sha256 == spec.sha256


def test_reading_a_missing_lock_says_how_to_make_it(tmp_path: Path) -> None:
    with pytest.raises(LockError, match="no such lock file"):
        read_lockfile(tmp_path / "none.lock")


# --- the real resolver (PyPI and the machine's pip configuration) ----------------------------


def _pip_platform_args(lock: Lock) -> list[str]:
    return [
        "--only-binary=:all:", "--python-version", lock.python, "--implementation", "cp",
        "--abi", "cp" + lock.python.replace(".", ""),
        *(arg for p in lock.platforms for arg in ("--platform", p)),
    ]  # fmt: skip


@pytest.mark.network
def test_network_cuda_example_pins_cudnn_9_1_0_70_with_its_hash() -> None:
    lock = resolve(load_spec(CUDA_SPEC))
    cudnn = lock.wheel("nvidia-cudnn-cu12")
    assert cudnn is not None
    assert (cudnn.version, cudnn.sha256) == ("9.1.0.70", CUDNN_9_1_SHA)
    assert f"nvidia-cudnn-cu12==9.1.0.70 \\\n    --hash=sha256:{CUDNN_9_1_SHA}" in format_lock(lock)
    assert lock.wheel("torch") is not None
    assert lock.torch_cuda == "12.4.127"


@pytest.mark.network
def test_network_cpu_example_locks_the_cpu_torch_byte_identically(tmp_path: Path) -> None:
    first, second = tmp_path / "1.lock", tmp_path / "2.lock"
    write_lockfile(first, resolve(load_spec(CPU_SPEC)))
    write_lockfile(second, resolve(load_spec(CPU_SPEC)))
    assert first.read_bytes() == second.read_bytes()
    pylocks = [format_pylock(read_lockfile(path).lock, "demo-cpu.lock") for path in (first, second)]
    assert pylocks[0] == pylocks[1]
    lock = read_lockfile(first).lock
    torch = lock.wheel("torch")
    assert torch is not None
    assert torch.requirement == "torch==2.13.0+cpu"
    # pip itself reads the lock (its own options, no machine configuration) and accepts the hashes.
    done = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--isolated", "--dry-run", "--ignore-installed",
         "--require-hashes", "--no-deps", *_pip_platform_args(lock), "-r", str(first)],
        capture_output=True, text=True, check=False, env={**os.environ, "PIP_CONFIG_FILE": os.devnull},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    assert "torch-2.13.0+cpu" in done.stdout
    # Every wheel is sized: on disk for file:// wheels, as PyPI's JSON index says for the rest.
    for wheel in lock.wheels:
        assert wheel.size is not None, wheel.name
        if wheel.url.startswith("file://"):
            assert wheel.size == Path(unquote(urlsplit(wheel.url).path)).stat().st_size
        else:
            assert wheel.size == _pypi_json_size(wheel.name, wheel.filename), wheel.name


def _pypi_json_size(name: str, filename: str) -> int:
    """The size PyPI's PEP 691 JSON index gives for one file (a second source than HEAD)."""
    import requests

    page = requests.get(
        f"https://pypi.org/simple/{name}/",
        headers={"Accept": "application/vnd.pypi.simple.v1+json"},
        timeout=60,
    ).json()
    return int(next(f["size"] for f in page["files"] if f["filename"] == filename))


@pytest.mark.network
def test_network_mismatched_cudnn_fails_naming_the_pin() -> None:
    spec = parse_spec(CUDA_SPEC.read_text().replace('cudnn: "9.1.0.70"', 'cudnn: "8.9"'))
    with pytest.raises(LockError) as err:
        resolve(spec)
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "torch 2.5.1 pins cuDNN 9.1.0.70" in err.value.message
    assert 'set torch.cudnn to "9.1.0.70"' in (err.value.hint or "")


@pytest.mark.network
def test_network_unknown_torch_version_fails_naming_versions_that_exist() -> None:
    with pytest.raises(LockError) as err:
        resolve(_spec(torch="2.5.9", cuda="12.4"))
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "torch has no version 2.5.9" in err.value.message
    assert "2.5.1" in err.value.message
    assert "torch.version" in (err.value.hint or "")


@pytest.mark.network
def test_network_a_python_the_wheel_does_not_support_fails_naming_the_fix() -> None:
    with pytest.raises(LockError) as err:
        resolve(_spec("packages: [numpy==1.21.0]"))
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "numpy 1.21.0 has no wheel for Python 3.11" in err.value.message
    assert "cp311 wheels" in (err.value.hint or "")


@pytest.mark.network
def test_network_markers_follow_the_image_python() -> None:
    # torch 2.5.1 needs setuptools only from Python 3.12 on; the host's Python must not decide.
    lock = resolve(_spec(torch="2.5.1", cuda="12.4", python="3.12"))
    setuptools = lock.wheel("setuptools")
    assert setuptools is not None
    assert setuptools.group == "torch"
    assert lock.python == "3.12"
    assert lock.glibc == "2.28"


# --- the user's pip configuration -------------------------------------------------------------

_PIP_CONFIG_LIST = """\
global.cert='/etc/ssl/certs/ca-certificates.crt'
global.constraint='/etc/xdg/pip/constraints.txt'
global.extra-index-url='file:///srv/a/simple file:///srv/b/simple'
global.find-links='/srv/wheels'
global.index-url='https://mirror.example/simple'
install.pre='true'
:env:.find-links='/srv/env-wheels'
:env:.disable-pip-version-check='1'
:env:.trusted-host='mirror.example other.example'
"""


def test_pip_config_gives_locations_and_network_settings_and_names_what_it_ignores() -> None:
    config = read_pip_config(_PIP_CONFIG_LIST)
    assert config.locations == (
        "--extra-index-url", "file:///srv/a/simple", "--extra-index-url", "file:///srv/b/simple",
        "--find-links", "/srv/env-wheels",  # PIP_FIND_LINKS overrides the file's
        "--index-url", "https://mirror.example/simple",
    )  # fmt: skip
    assert config.network == (
        "--cert", "/etc/ssl/certs/ca-certificates.crt",
        "--trusted-host", "mirror.example", "--trusted-host", "other.example",
    )  # fmt: skip
    assert config.ignored == ("constraint", "pre")


def test_the_spec_index_replaces_the_pip_config_locations_but_keeps_its_network_settings() -> None:
    config = read_pip_config(_PIP_CONFIG_LIST)
    notes: list[str] = []
    runner = FakeRunner([_ok(_report(_item("torch", "2.13.0+cpu")))])
    resolve(_spec(), runner=runner, arch="x86_64", pip_config=config, on_note=notes.append)
    assert "/srv/env-wheels" in runner.argvs[0]
    assert notes == [
        "ignored from pip's configuration (they would change what the lock chooses): constraint, pre"
    ]
    own = _spec("index: {url: 'https://own.example/simple'}")
    runner = FakeRunner([_ok(_report(_item("torch", "2.13.0+cpu")))])
    resolve(own, runner=runner, arch="x86_64", pip_config=config)
    argv = runner.argvs[0]
    assert argv[argv.index("--index-url") + 1] == "https://own.example/simple"
    assert "/srv/env-wheels" not in argv
    assert "file:///srv/a/simple" not in argv
    assert argv[argv.index("--cert") + 1] == "/etc/ssl/certs/ca-certificates.crt"


def test_pip_runs_isolated_from_its_configuration(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The resolver's own environment: no PIP_* variable of the caller, no configuration file.
    monkeypatch.setenv("PIP_CONSTRAINT", "/nonexistent/constraints.txt")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(tmp_path / "pip.conf"))
    probe = "import json, os; print(json.dumps({k: v for k, v in os.environ.items() if k.startswith('PIP_')}))"
    result = run_pip([sys.executable, "-c", probe], {})
    assert json.loads(result.stdout) == {"PIP_CONFIG_FILE": os.devnull}


@pytest.mark.network
def test_network_a_global_constraints_file_does_not_reach_the_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A machine-wide cap like the one on this project's machines (`torch<=2.14.1`), made
    # stricter so it would bite: with it honoured, torch 2.5.1 could not lock at all.
    constraints = tmp_path / "constraints.txt"
    constraints.write_text("torch<=2.0\nnumpy<1\n", encoding="utf-8")
    host = read_pip_config()
    conf = tmp_path / "pip.conf"
    conf.write_text(f"[global]\nconstraint = {constraints}\n", encoding="utf-8")
    monkeypatch.setenv("PIP_CONFIG_FILE", str(conf))
    monkeypatch.setenv("PIP_CONSTRAINT", str(constraints))
    config = read_pip_config()
    assert "constraint" in config.ignored
    # The locations the host had come from its files, which PIP_CONFIG_FILE now hides.
    config = PipConfig(host.locations, host.network, config.ignored)
    lock = resolve(_spec(torch="2.5.1", cuda="12.4"), pip_config=config)
    torch = lock.wheel("torch")
    assert torch is not None
    assert torch.version == "2.5.1"
