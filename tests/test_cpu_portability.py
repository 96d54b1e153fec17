"""The proof travels: `reprobox check` on other CPUs (qemu-user) and on fewer CPUs (a cpuset).

One small spec (the demo's packages, threads: 4 on GOMP_CPU_AFFINITY "0-3", 2 steps) is built
twice on the real engine, portable (the default) and native, and checked on emulated CPUs:
Intel Haswell and AMD EPYC-Rome (AVX2), Nehalem (no AVX2). Every check's class and fingerprint
is collected; the last test holds that no class ever carried two fingerprints. An emulated
self-check costs about 45 s of CPU time (measured on this project's machine).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli import Cli, reprobox
from engine_admin import add_labels, remove_image
from test_cpu import qemu

from reprobox.docker_engine import DockerEngine

pytestmark = [pytest.mark.docker, pytest.mark.network]

DEMO = Path(__file__).resolve().parent.parent / "images" / "demo-cpu.yaml"
SMALL = {
    "name: demo-cpu": "name: cpu-portability",
    "threads: 1                        # OMP_NUM_THREADS, MKL_NUM_THREADS": "threads: 4",
    'gomp_cpu_affinity: "0"            # GOMP_CPU_AFFINITY': 'gomp_cpu_affinity: "0-3"',
    "steps: 20": "steps: 2",
}

#: device class -> every fingerprint seen for it, across all checks in this module.
SEEN: defaultdict[str, set[str]] = defaultdict(set)


@dataclass(frozen=True)
class Image:
    tag: str
    device_class: str
    fingerprint: str


def build(tmp: Path, name: str, cpu: str) -> Image:
    text = DEMO.read_text()
    for old, new in SMALL.items():
        assert old in text, old
        text = text.replace(old, new)
    text = text.replace(
        "deterministic_algorithms: true", f"deterministic_algorithms: true\n  cpu: {cpu}"
    )
    spec = tmp / name / "spec.yaml"
    spec.parent.mkdir()
    spec.write_text(text)
    built = reprobox("build", str(spec), "--json")
    assert built.code == 0, built.stderr[-3000:]
    report = built.json()
    check = report["selfcheck"]
    SEEN[check["device_class"]].add(check["fingerprint"])
    return Image(report["tags"][0], check["device_class"], check["fingerprint"])


@pytest.fixture(scope="module")
def portable(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(tmp_path_factory.mktemp("cpu"), "portable", "portable")


@pytest.fixture(scope="module")
def native(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Image:
    return build(tmp_path_factory.mktemp("cpu"), "native", "native")


def check(image: str, *options: str) -> tuple[Cli, dict[str, Any]]:
    done = reprobox("check", image, *options, "--json")
    assert done.code in (0, 1, 5), done.stderr[-3000:]
    report: dict[str, Any] = done.json()
    assert report["selfcheck"]["passed"] is True  # the two runs agree wherever they ran
    SEEN[report["device_class"]].add(report["fingerprint"])
    return done, report


# ---------------------------------------------------------------- fewer CPUs than the spec names


def test_threads_4_on_cpus_0_3_reproduces_on_one_cpu(portable: Image) -> None:
    done, report = check(portable.tag, "--cpuset-cpus", "0")
    assert done.code == 0
    assert report["verdict"] == "reproduced"
    assert (report["device_class"], report["fingerprint"]) == (
        portable.device_class,
        portable.fingerprint,
    )
    seen = report["selfcheck"]["settings"]
    assert seen["torch"]["num_threads"] == 4  # the count is kept: it decides the bits
    assert seen["env"]["GOMP_CPU_AFFINITY"] == "0,0,0,0"  # placement adapts
    assert seen["hook"]["host"]["affinity"]["asked"] == "0-3"


def test_without_the_hook_that_cpuset_aborts_libgomp(
    portable: Image, docker_engine: DockerEngine
) -> None:
    code = "import torch; print(torch.ones(256, 256).mm(torch.ones(256, 256)).sum())"
    argv = ["python", "-c", code]
    off = docker_engine.run(
        portable.tag, argv, env={"REPROBOX_DISABLE": "1"}, cpuset_cpus="0", timeout_s=300
    )
    assert off.exit_code != 0
    assert "Thread creation failed" in off.stderr
    on = docker_engine.run(portable.tag, argv, cpuset_cpus="0", timeout_s=300)
    assert on.exit_code == 0, on.stderr


# ---------------------------------------------------------------- other CPUs, emulated


def test_portable_intel_and_amd_share_one_class_and_one_fingerprint(
    portable: Image, docker_engine: DockerEngine
) -> None:
    qemu()
    done, haswell = check(portable.tag, "--emulate-cpu", "Haswell")
    # Not this host's class: qemu's exact RCPPS/RSQRTPS are not this chip's tables.
    assert done.code == 5, done.stdout
    assert haswell["verdict"] == "unrecorded"
    assert haswell["device_class"].startswith("cpu-x86_64-v3-rcp")
    assert haswell["device_class"] != portable.device_class
    assert haswell["recorded_classes"] == [portable.device_class]
    assert haswell["selfcheck"]["settings"]["cpu"]["vendor"] == "intel"
    # A colleague records Haswell's result in the image; an AMD EPYC-Rome then reproduces it.
    trace = json.dumps(haswell["selfcheck"]["runs"][0], sort_keys=True, separators=(",", ":"))
    recorded = add_labels(
        docker_engine,
        portable.tag,
        {
            f"reprobox.fingerprint.{haswell['device_class']}": haswell["fingerprint"],
            f"reprobox.trace.{haswell['device_class']}": trace,
        },
    )
    try:
        done, rome = check(recorded, "--emulate-cpu", "EPYC-Rome")
        assert rome["selfcheck"]["settings"]["cpu"]["vendor"] == "amd"
        assert (rome["device_class"], rome["fingerprint"]) == (
            haswell["device_class"],
            haswell["fingerprint"],
        )
        assert done.code == 0, done.stdout
        assert rome["verdict"] == "reproduced"
    finally:
        remove_image(docker_engine, recorded, force=True)


def test_a_cpu_without_avx2_gets_its_own_class_and_no_false_failure(portable: Image) -> None:
    done, nehalem = check(portable.tag, "--emulate-cpu", "Nehalem")
    assert done.code == 5, done.stdout
    assert nehalem["device_class"].startswith("cpu-x86_64-v2-rcp")
    host = nehalem["selfcheck"]["settings"]["hook"]["host"]["cpu"]
    assert host["level"] == "v2"
    assert host["lowered"]["ATEN_CPU_CAPABILITY"] == ["avx2", "default"]
    assert nehalem["selfcheck"]["settings"]["torch"]["cpu_capability"] == "DEFAULT"
    assert "neither a failure nor a proof" in nehalem["summary"]


def test_native_gives_intel_and_amd_their_own_classes_not_a_false_failure(native: Image) -> None:
    assert "-native-" in native.device_class
    classes = {}
    for model in ("Haswell", "EPYC-Rome"):
        done, report = check(native.tag, "--emulate-cpu", model)
        assert done.code == 5, done.stdout
        assert report["verdict"] == "unrecorded"
        classes[model] = report["device_class"]
    assert classes["Haswell"].startswith("cpu-x86_64-v3-intel-native-")
    assert classes["EPYC-Rome"].startswith("cpu-x86_64-v3-amd-native-")
    assert native.device_class not in classes.values()


def test_no_class_ever_carried_two_fingerprints() -> None:
    # Runs after the checks above (file order); each added what it saw.
    if len(SEEN) < 5:
        pytest.skip(f"run it with the checks above (it has seen only {dict(SEEN)})")
    shared = {cls: fps for cls, fps in SEEN.items() if len(fps) > 1}
    assert shared == {}


# ---------------------------------------------------------------- bad options


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (("--emulate-cpu", "Pentium-9000"), "knows no such CPU model"),
        (("--emulate-cpu", "Haswell;true"), "knows no such CPU model"),
        (("--cpuset-cpus", "0;true"), "is not a CPU list"),
    ],
)
def test_bad_emulation_options_are_bad_input(
    portable: Image, options: tuple[str, ...], message: str
) -> None:
    done = reprobox("check", portable.tag, *options)
    assert done.code == 2, done.stderr
    assert message in done.stderr


def test_missing_qemu_is_a_missing_tool(portable: Image, tmp_path: Path) -> None:
    done = reprobox("check", portable.tag, "--emulate-cpu", "Haswell", env={"PATH": str(tmp_path)})
    assert done.code == 3, done.stderr
    assert "qemu-user-static" in done.stderr
