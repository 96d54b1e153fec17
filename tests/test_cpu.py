"""CPU portability without an engine: facts from CPUID, device classes, the hook's adaptations.

Real components where a test says a feature works: CPUID on this host, qemu-user's emulated
CPUs (Debian's qemu-user-static), torch and libgomp in fresh interpreters. Synthetic CPU facts
appear only where the test is about the naming logic.
"""

from __future__ import annotations

import importlib.util
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from conftest import skip_or_fail
from hooked_venv import TEMPLATES, clean_env, make_venv

from reprobox.cpu import CPU_ENV, NUMPY_ABOVE_V3, PORTABLE_X86_64, cpu_env
from reprobox.spec import RESERVED_ENV

CPU_MODULE = TEMPLATES / "reprobox_cpu.py"
X86 = platform.machine() == "x86_64"
x86_only = pytest.mark.skipif(not X86, reason="CPUID and these pins are x86-64's")


@pytest.fixture(scope="module")
def cpu() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reprobox_cpu_under_test", CPU_MODULE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def facts(level: str, vendor: str = "intel", rcp: str = "0" * 8, **extra: Any) -> dict[str, Any]:
    flags = {
        "v1": ["sse2"],
        "v2": ["sse2", "sse3", "ssse3", "sse4_1", "sse4_2", "popcnt", "cx16", "lahf_lm"],
    }
    flags["v3"] = [*flags["v2"], "avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe"]
    flags["v4"] = [*flags["v3"], "avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl"]
    return (
        {"arch": "x86_64", "level": level, "vendor": vendor, "rcp": rcp}
        | {"flags": sorted(flags[level])}
        | extra
    )


def portable_env(level: str = "v3", numpy: bool = True) -> dict[str, str]:
    env = {"REPROBOX_CPU": "portable", **PORTABLE_X86_64}
    if numpy:
        env["NPY_DISABLE_CPU_FEATURES"] = NUMPY_ABOVE_V3
    if level != "v3":
        env |= {"ATEN_CPU_CAPABILITY": "default", "ONEDNN_MAX_CPU_ISA": "SSE41"}
        env["OPENBLAS_CORETYPE"] = "Nehalem" if level == "v2" else "Prescott"
    return env


# ---------------------------------------------------------------- the pins, host and image side


def test_image_and_host_agree_on_the_portable_pins(cpu: ModuleType) -> None:
    assert cpu.PINS["v3"] == PORTABLE_X86_64
    assert cpu.NUMPY_ABOVE_V3 == NUMPY_ABOVE_V3
    assert set(cpu.ISA_VARIABLES) == CPU_ENV - {"REPROBOX_CPU"}
    # The spec's `env` may not fight them.
    assert CPU_ENV - {"REPROBOX_CPU"} <= RESERVED_ENV


def test_cpu_env_per_setting_architecture_and_numpy() -> None:
    assert cpu_env("native", "x86_64", "2.4.6") == {"REPROBOX_CPU": "native"}
    assert cpu_env("portable", "x86_64", "2.4.6") == portable_env()
    # Older numpy names its loops differently and warns about names it does not know.
    assert cpu_env("portable", "x86_64", "2.3.5") == portable_env(numpy=False)
    assert cpu_env("portable", "x86_64", None) == portable_env(numpy=False)
    # No x86 pin in an aarch64 image (they would be invalid values there).
    assert cpu_env("portable", "aarch64", "2.4.6") == {"REPROBOX_CPU": "portable"}


# ---------------------------------------------------------------- device classes (naming logic)


def test_portable_gives_intel_and_amd_v3_hosts_one_class(cpu: ModuleType) -> None:
    env = portable_env()
    intel = cpu.device_class(env, facts("v3", "intel"))
    amd = cpu.device_class(env, facts("v3", "amd"))
    avx512 = cpu.device_class(env, facts("v4", "intel"))  # pinned down to v3: the same paths
    assert intel == amd == avx512 == "cpu-x86_64-v3-rcp00000000"


def test_native_names_vendor_and_isa(cpu: ModuleType) -> None:
    env = {"REPROBOX_CPU": "native"}
    intel = cpu.device_class(env, facts("v3", "intel"))
    amd = cpu.device_class(env, facts("v3", "amd"))
    avx512 = cpu.device_class(env, facts("v4", "intel"))
    assert len({intel, amd, avx512}) == 3
    assert intel.startswith("cpu-x86_64-v3-intel-native-")
    assert avx512.startswith("cpu-x86_64-v4-intel-native-")


def test_hosts_whose_approximations_differ_never_share_a_class(cpu: ModuleType) -> None:
    for env in (portable_env(), {"REPROBOX_CPU": "native"}):
        one = cpu.device_class(env, facts("v3", rcp="11111111"))
        other = cpu.device_class(env, facts("v3", rcp="22222222"))
        assert one != other


def test_a_host_below_v3_gets_its_own_class_once_the_pins_are_lowered(cpu: ModuleType) -> None:
    assert cpu.device_class(portable_env("v2"), facts("v2")) == "cpu-x86_64-v2-rcp00000000"
    assert cpu.device_class(portable_env("v1"), facts("v1")) == "cpu-x86_64-v1-rcp00000000"
    # v3 pins on a v2 host (the hook was off): it cannot honour them; not the v3 class.
    unlowered = cpu.device_class(portable_env("v3"), facts("v2"))
    assert "-custom-" in unlowered


def test_pins_changed_at_run_time_are_a_class_of_their_own(cpu: ModuleType) -> None:
    portable = cpu.device_class(portable_env(), facts("v3"))
    changed = cpu.device_class(portable_env() | {"MKL_CBWR": "AUTO"}, facts("v3"))
    other = cpu.device_class(portable_env() | {"MKL_CBWR": "AVX2"}, facts("v3"))
    assert len({portable, changed, other}) == 3
    assert "-custom-" in changed


def test_other_architectures_are_named_by_their_feature_list(cpu: ModuleType) -> None:
    arm = {"arch": "aarch64", "flags": ["asimd", "fp", "sve"]}
    assert cpu.device_class({"REPROBOX_CPU": "portable"}, arm).startswith("cpu-aarch64-portable-")
    assert cpu.device_class({}, arm) != cpu.device_class({}, arm | {"flags": ["asimd", "fp"]})


def test_adapt_pins_lowers_only_what_this_cpu_cannot_run(cpu: ModuleType) -> None:
    if not X86:
        pytest.skip("the pins are lowered on x86-64 only")
    env = portable_env()
    changed = cpu.adapt_pins(env, lambda: facts("v2"))
    assert env == portable_env("v2")
    assert changed["ATEN_CPU_CAPABILITY"] == ["avx2", "default"]
    for host in ("v3", "v4"):
        env = portable_env()
        assert cpu.adapt_pins(env, lambda host=host: facts(host)) == {}
        assert env == portable_env()
    chosen = portable_env() | {"MKL_CBWR": "AUTO"}  # someone's own value: theirs to keep
    assert cpu.adapt_pins(chosen, lambda: facts("v2")) == {}
    native = {"REPROBOX_CPU": "native"}
    assert cpu.adapt_pins(native, lambda: facts("v1")) == {}


# ---------------------------------------------------------------- real CPUs: this host and qemu


@x86_only
def test_cpuid_agrees_with_the_kernel_on_this_host(cpu: ModuleType) -> None:
    found = cpu.cpu_facts()
    assert found["source"] == "cpuid"
    kernel = cpu._proc_cpuinfo()
    kernel_flags = set(kernel["flags"].split())
    for flag in ("sse4_2", "popcnt", "avx", "avx2", "fma", "bmi2", "avx512f", "avx512bw"):
        assert (flag in found["flags"]) == (flag in kernel_flags), flag
    assert found["vendor_id"] == kernel["vendor_id"]
    assert len(found["rcp"]) == 8


def qemu() -> str:
    found = shutil.which("qemu-x86_64-static")
    if found is None:
        skip_or_fail("qemu-x86_64-static is not installed: run `make setup`")
    return found


def emulated(model: str, env: dict[str, str] | None = None) -> dict[str, Any]:
    done = subprocess.run(
        [qemu(), "-cpu", model, sys.executable, str(CPU_MODULE)],
        capture_output=True,
        text=True,
        env={**clean_env(), **(env or {})},
        timeout=300,
        check=True,
    )
    report: dict[str, Any] = json.loads(done.stdout)
    return report


@x86_only
def test_emulated_cpus_answer_cpuid_as_the_model_would(cpu: ModuleType) -> None:
    haswell, rome, nehalem = (emulated(m)["facts"] for m in ("Haswell", "EPYC-Rome", "Nehalem"))
    assert (haswell["vendor"], haswell["level"]) == ("intel", "v3")
    assert (rome["vendor"], rome["level"]) == ("amd", "v3")
    assert (nehalem["vendor"], nehalem["level"]) == ("intel", "v2")
    # qemu computes RCPPS/RSQRTPS exactly, the same for every model; a real chip uses a table.
    assert haswell["rcp"] == rome["rcp"] == nehalem["rcp"]
    assert cpu.cpu_facts()["rcp"] != haswell["rcp"]


@x86_only
def test_portable_classes_on_emulated_cpus() -> None:
    haswell = emulated("Haswell", portable_env())["device_class"]
    rome = emulated("EPYC-Rome", portable_env())["device_class"]
    assert haswell == rome
    assert haswell.startswith("cpu-x86_64-v3-rcp")
    native = [
        emulated(m, {"REPROBOX_CPU": "native"})["device_class"] for m in ("Haswell", "EPYC-Rome")
    ]
    assert native[0] != native[1]


# ---------------------------------------------------------------- the hook, in fresh interpreters


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv(tmp_path_factory.mktemp("cpu-venv") / "venv")


def run(
    python: Path | str, code: str, *prefix: str, **env: str
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*prefix, str(python), "-c", code],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=600,
        check=False,
    )


THREADS = """
import json, sys, torch, reprobox_hook
torch.manual_seed(0)
a = torch.randn(512, 512)
y = (a @ a).sum().reshape(1)  # a reduction split across the threads
print(json.dumps({"threads": torch.get_num_threads(), "bits": y.numpy().tobytes().hex(),
                  "host": reprobox_hook.state()["host"]}))
"""


def test_an_affinity_list_naming_missing_cpus_is_mapped_and_the_thread_count_kept(
    venv: Path,
) -> None:
    online = os.cpu_count() or 1
    threads = online + 2  # more threads than CPUs, and an affinity list naming CPUs not there
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    missing = {**env, "GOMP_CPU_AFFINITY": f"0-{threads - 1}"}
    done = run(venv, THREADS, **missing)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["threads"] == threads
    allowed = sorted(os.sched_getaffinity(0))
    placed = ",".join(str(allowed[n % len(allowed)]) for n in range(threads))
    assert result["host"]["affinity"] == {
        "asked": f"0-{threads - 1}",
        "allowed": allowed,
        "set": placed,
    }
    # MKL_DYNAMIC is not FALSE here: torch alone would use fewer threads; the hook put it back.
    assert result["host"]["threads"]["set"] == threads
    # Placement is not numerics: the same bits as with an affinity list that fits.
    fits = run(venv, THREADS, **env, GOMP_CPU_AFFINITY=placed)
    assert fits.returncode == 0, fits.stderr
    assert json.loads(fits.stdout)["bits"] == result["bits"]
    # And the thread count is numerics: one thread gives other bits.
    one = run(venv, THREADS, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    assert json.loads(one.stdout)["bits"] != result["bits"]


def test_without_the_hook_libgomp_aborts_on_such_a_list(venv: Path) -> None:
    threads = (os.cpu_count() or 1) + 2
    code = "import torch; torch.set_num_threads(%d); print(torch.ones(64, 64).mm(torch.ones(64, 64)).sum())"
    done = run(
        venv,
        code % threads,
        REPROBOX_DISABLE="1",
        OMP_NUM_THREADS=str(threads),
        GOMP_CPU_AFFINITY=f"0-{threads - 1}",
    )
    assert done.returncode != 0
    assert "Thread creation failed" in done.stderr


SPARE = "import json, reprobox_hook; print(json.dumps(reprobox_hook.spare_cpus()))"
# After start-up (the hook has mapped nothing), each case's CPUs, list and thread count.
SPARE_CASES = """
import json, os, reprobox_hook
found = []
for allowed, listed, threads in json.loads(os.environ["CASES"]):
    os.sched_getaffinity = lambda pid, allowed=allowed: set(allowed)
    os.environ.update(GOMP_CPU_AFFINITY=listed, OMP_NUM_THREADS=threads)
    found.append(reprobox_hook.spare_cpus())
print(json.dumps(found))
"""
CASES = [
    ([0, 1, 2, 3, 4, 5, 6, 7], "0-3", "4"),  # a range
    ([0, 1, 2, 3, 4, 5, 6, 7], "0,0 1", "3"),  # repeats count once
    ([0, 1, 2, 3, 4], "0-4:2", "3"),  # a stride: 0, 2, 4 named, 1 and 3 left: too few
    ([0, 1, 2, 3], "1", ""),  # no thread count: MKL would size it from the CPUs
    ([0, 1, 2, 3], "1", "x"),
    ([0, 1, 2, 3], "", "1"),  # nothing pinned
    ([0, 1, 2, 3], "0-3", "4"),  # nothing left
]


def test_spare_cpus_are_those_the_affinity_list_leaves_out_while_the_hook_is_on(
    venv: Path,
) -> None:
    def found(code: str, **env: str) -> Any:
        done = run(venv, code, **env)
        assert done.returncode == 0, done.stderr
        return json.loads(done.stdout)

    cases = json.dumps(CASES)
    assert found(SPARE_CASES, CASES=cases) == [[4, 5, 6, 7], [2, 3, 4, 5, 6, 7], [], [], [], [], []]
    # With the hook off, never: libgomp would abort on the CPUs the list names.
    assert found(SPARE_CASES, CASES=cases, REPROBOX_DISABLE="1") == [[]] * len(CASES)
    # And this host's own CPUs, as the self-check's parent asks.
    allowed = sorted(os.sched_getaffinity(0))
    assert len(allowed) >= 2, "this test needs two CPUs (the project's machine has them)"
    assert found(SPARE, GOMP_CPU_AFFINITY=str(allowed[0])) == allowed[1:]


PINS_SEEN = """
import json, os, reprobox_hook, torch
print(json.dumps({"host": reprobox_hook.state()["host"], "capability": torch.backends.cpu.get_cpu_capability(),
                  "env": {k: os.environ.get(k) for k in ("ATEN_CPU_CAPABILITY", "ONEDNN_MAX_CPU_ISA", "OPENBLAS_CORETYPE")},
                  "sum": float(torch.nn.functional.conv2d(torch.ones(1, 1, 8, 8), torch.ones(1, 1, 3, 3)).sum())}))
"""


@x86_only
def test_on_an_emulated_cpu_without_avx2_the_hook_lowers_the_pins(venv: Path) -> None:
    env = portable_env()
    done = run(venv, PINS_SEEN, qemu(), "-cpu", "Nehalem", **env)
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(done.stdout)
    assert result["capability"] == "DEFAULT"
    assert result["env"] == {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "OPENBLAS_CORETYPE": "Nehalem",
    }
    assert result["host"]["cpu"]["level"] == "v2"
    assert result["host"]["cpu"]["lowered"]["ATEN_CPU_CAPABILITY"] == ["avx2", "default"]
    # Without the hook, the same pins kill the process with SIGILL.
    dead = run(venv, PINS_SEEN, qemu(), "-cpu", "Nehalem", **env, REPROBOX_DISABLE="1")
    assert dead.returncode != 0
    assert "Illegal instruction" in dead.stderr


# ---------------------------------------------------------------- check's report of differences


def test_settings_differences_name_each_key_that_differs() -> None:
    from reprobox.check import settings_seen
    from reprobox.compare import settings_differences

    report = {
        "settings": {
            "env": {"MKL_CBWR": "COMPATIBLE", "OMP_NUM_THREADS": "4"},
            "torch": {"num_threads": 4},
            "cpu": {"vendor": "intel", "rcp": "b42f5b26"},
            "hook": {"host": {"affinity": None}, "lineage": []},
        }
    }
    recorded = settings_seen(report)
    assert recorded["hook_host"] == {"affinity": None}
    assert settings_differences(recorded, recorded) == {}
    here = settings_seen(report)
    here["env"] = {"MKL_CBWR": "AUTO", "OMP_NUM_THREADS": "4"}
    here["cpu"] = {"vendor": "amd", "rcp": "b42f5b26", "extra": 1}
    assert settings_differences(recorded, here) == {
        "cpu.extra": [None, 1],
        "cpu.vendor": ["intel", "amd"],
        "env.MKL_CBWR": ["COMPATIBLE", "AUTO"],
    }
