"""The in-image self-check, run on the host in a venv that has the seed-on-import hook.

Every way it can pass has a way it must fail next to it: another seed, a nondeterministic
workload, the hook switched off, a script that prints os.urandom.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import platform
import subprocess
import sys
import textwrap
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import pytest
from hooked_venv import SELFCHECK, clean_env, make_venv

STEPS = "8"  # enough for the chaos to show, few enough to keep each check to seconds


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv(tmp_path_factory.mktemp("selfcheck") / "venv")


def selfcheck(python: Path, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [str(python), str(SELFCHECK), *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=300,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    return done.returncode, report


@pytest.fixture(scope="module")
def baseline(venv: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    json_out = tmp_path_factory.mktemp("report") / "report.json"
    code, report = selfcheck(venv, "--steps", STEPS, "--json-out", str(json_out))
    assert code == 0, report["failures"]
    assert json.loads(json_out.read_text()) == report
    return report


def test_two_fresh_runs_match_bit_for_bit(baseline: dict[str, Any]) -> None:
    assert baseline["passed"] is True
    assert baseline["failures"] == []
    assert baseline["first_difference"] is None
    first, second = baseline["runs"]
    assert first == second
    assert len(first["losses"]) == int(STEPS)
    assert all(float.fromhex(loss) > 0 for loss in first["losses"])


def test_report_says_where_and_with_what_it_ran(baseline: dict[str, Any]) -> None:
    # No REPROBOX_CPU and no pins here: neither portable nor native, so a class of its own.
    cpu = baseline["settings"]["cpu"]
    assert cpu["arch"] == platform.machine()
    assert baseline["device_class"].startswith(f"cpu-{platform.machine()}-")
    if cpu["arch"] == "x86_64":
        assert cpu["source"] == "cpuid"
        assert f"-{cpu['vendor']}-custom-" in baseline["device_class"]
        assert baseline["device_class"].endswith(f"-rcp{cpu['rcp']}")
    assert baseline["versions"]["torch"].startswith("2.13.0")
    assert baseline["versions"]["python"] == platform.python_version()
    assert baseline["settings"]["env"]["OMP_NUM_THREADS"] == "1"
    assert baseline["settings"]["torch"]["num_threads"] == 1
    assert baseline["settings"]["hook"]["active"] is True
    assert baseline["deterministic_mode_verified"] is True
    assert baseline["probe"] == {"cpu": "raised"}


def test_fingerprint_is_the_hash_of_run_one_and_the_device_class(baseline: dict[str, Any]) -> None:
    run = baseline["runs"][0]
    evidence = {
        "losses": run["losses"],
        "state_sha256": run["state_sha256"],
        "device_class": baseline["device_class"],
    }
    text = json.dumps(evidence, sort_keys=True, separators=(",", ":"))
    assert baseline["fingerprint"] == hashlib.sha256(text.encode()).hexdigest()


def test_runs_pinned_by_the_affinity_list_run_side_by_side_on_other_cpus(
    venv: Path, baseline: dict[str, Any]
) -> None:
    allowed = sorted(os.sched_getaffinity(0))
    assert len(allowed) >= 2, "this test needs two CPUs (the project's machine has them)"
    first = str(allowed[0])
    code, report = selfcheck(venv, "--steps", STEPS, GOMP_CPU_AFFINITY=first)
    assert code == 0, report["failures"]
    # The first run as the image's user starts it; the second on a CPU the list leaves free.
    assert report["run_cpus"] == [[allowed[0]], [allowed[1]]]
    assert report["settings"]["env"]["GOMP_CPU_AFFINITY"] == first
    assert report["settings"]["hook"]["host"]["affinity"] is None
    # Placement is not numerics: the same bits as the unpinned runs.
    assert report["runs"] == baseline["runs"]
    assert report["fingerprint"] == baseline["fingerprint"]
    # With the hook off, nothing is moved: both runs on the one CPU the list names.
    _, off = selfcheck(venv, "--steps", STEPS, GOMP_CPU_AFFINITY=first, REPROBOX_DISABLE="1")
    assert off["run_cpus"] == [[allowed[0]], [allowed[0]]]


def test_a_two_thread_list_is_mapped_in_the_second_run(venv: Path) -> None:
    # Two threads on one CPU twice: unmapped on the second run's CPU, libgomp would abort there.
    allowed = sorted(os.sched_getaffinity(0))
    listed = f"{allowed[0]},{allowed[0]}"
    threads = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2"}
    code, report = selfcheck(venv, "--steps", STEPS, GOMP_CPU_AFFINITY=listed, **threads)
    assert code == 0, report["failures"]
    assert report["run_cpus"] == [[allowed[0]], [allowed[1]]]
    assert report["settings"]["torch"]["num_threads"] == 2


class _Started:
    """A stand-in for a run: the CPU mask it was started with, and whether it was killed."""

    def __init__(self, arguments: list[str], workdir: Path, label: str) -> None:
        if label == "run-2" and "--fail-second" in arguments:
            raise OSError("cannot start run-2")
        self.label, self.mask, self.killed = label, os.sched_getaffinity(0), False
        self.process = self
        _Started.made.append(self)

    made: ClassVar[list[_Started]] = []

    def kill(self) -> None:
        self.killed = True

    def wait(self) -> int:
        return -9


@pytest.fixture
def started(module: ModuleType, monkeypatch: pytest.MonkeyPatch) -> list[_Started]:
    allowed = sorted(os.sched_getaffinity(0))
    assert len(allowed) >= 2, "this test needs two CPUs (the project's machine has them)"
    hook = type(sys)("reprobox_hook")
    hook.spare_cpus = lambda: allowed[1:]  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "reprobox_hook", hook)
    monkeypatch.setattr(module, "_Child", _Started)
    _Started.made = []
    return _Started.made


def test_the_second_run_is_started_on_the_spare_cpus_and_the_mask_restored(
    module: ModuleType, started: list[_Started], tmp_path: Path
) -> None:
    before = os.sched_getaffinity(0)
    module._side_by_side(["--train"], tmp_path)
    assert [(run.label, run.mask) for run in started] == [
        ("run-1", before),
        ("run-2", before - {min(before)}),
    ]
    assert os.sched_getaffinity(0) == before


def test_a_second_run_that_cannot_start_leaves_no_first_run_behind(
    module: ModuleType, started: list[_Started], tmp_path: Path
) -> None:
    before = os.sched_getaffinity(0)
    with pytest.raises(OSError, match="cannot start run-2"):
        module._side_by_side(["--train", "--fail-second"], tmp_path)
    assert [(run.label, run.killed) for run in started] == [("run-1", True)]
    assert os.sched_getaffinity(0) == before


def test_runs_that_saw_other_settings_fail_and_say_why(module: ModuleType) -> None:
    def run(threads: int) -> dict[str, Any]:
        torch = {"num_threads": threads, "cpu_capability": "AVX2"}
        return {"device_class": "cpu-x", "settings": {"torch": torch}, "cpus": [threads]}

    assert module._placement_failures([run(1), run(1)]) == []
    assert module._placement_failures([run(1), run(2)]) == [
        "the second run, started on CPUs [2], saw thread count 2 where the first saw 1"
    ]


def test_another_seed_gives_another_fingerprint(venv: Path, baseline: dict[str, Any]) -> None:
    code, report = selfcheck(venv, "--steps", STEPS, REPROBOX_SEED="1")
    assert code == 0
    assert report["fingerprint"] != baseline["fingerprint"]
    assert report["runs"][0]["losses"][0] != baseline["runs"][0]["losses"][0]


def test_a_nondeterministic_workload_is_caught(venv: Path) -> None:
    code, report = selfcheck(venv, "--steps", STEPS, REPROBOX_SELFCHECK_CHAOS="index_put")
    assert code == 1
    assert report["passed"] is False
    difference = report["first_difference"]
    assert difference["what"] in ("loss", "final state")
    assert 1 <= difference["step"] <= int(STEPS)
    assert difference["a"] != difference["b"]
    # Deterministic mode itself was on: the chaos switched it off for its one op only.
    assert report["deterministic_mode_verified"] is True


def test_without_the_hook_deterministic_mode_is_not_verified(venv: Path) -> None:
    code, report = selfcheck(venv, "--steps", STEPS, REPROBOX_DISABLE="1")
    assert code == 1
    assert report["passed"] is False
    assert report["deterministic_mode_verified"] is False
    assert report["probe"] == {"cpu": "ran"}
    assert any("deterministic mode was asked for" in failure for failure in report["failures"])


# Seeded only by the hook; no torch, so the two runs cost a Python start-up each.
DETERMINISTIC_SCRIPT = textwrap.dedent(
    """
    import os, random, sys
    out = sys.argv[1]
    assert out == os.environ["REPROBOX_OUTPUT_DIR"]
    print("draws", random.random(), random.getrandbits(64))
    with open(os.path.join(out, "weights.bin"), "wb") as weights:
        weights.write(random.randbytes(1024))
    os.makedirs(os.path.join(out, "logs"))
    with open(os.path.join(out, "logs", "train.txt"), "w") as log:
        log.write(" ".join({"loss", "step", "lr"}))  # set order: PYTHONHASHSEED's job
    """
)


def test_a_deterministic_script_passes(venv: Path, tmp_path: Path) -> None:
    script = tmp_path / "train.py"
    script.write_text(DETERMINISTIC_SCRIPT)
    output = tmp_path / "out"
    code, report = selfcheck(venv, "--script", str(script), "--output-dir", str(output))
    assert code == 0, report["failures"]
    first, second = report["runs"]
    assert first == second
    assert sorted(first["files"]) == ["logs/train.txt", "weights.bin"]
    written = [(output / run / "weights.bin").read_bytes() for run in ("run-1", "run-2")]
    assert written[0] == written[1]
    assert report["deterministic_mode_verified"] is True


def test_a_script_that_prints_urandom_fails(venv: Path, tmp_path: Path) -> None:
    script = tmp_path / "noisy.py"
    script.write_text("import os\nprint('step 1')\nprint(os.urandom(8).hex())\n")
    code, report = selfcheck(venv, "--script", str(script), "--output-dir", str(tmp_path / "out"))
    assert code == 1
    assert report["first_difference"]["what"] == "stdout"
    assert report["first_difference"]["a"] != report["first_difference"]["b"]


def test_a_script_whose_files_differ_fails(venv: Path, tmp_path: Path) -> None:
    script = tmp_path / "files.py"
    script.write_text(
        "import os, sys\nopen(os.path.join(sys.argv[1], 'w.bin'), 'wb').write(os.urandom(8))\n"
    )
    code, report = selfcheck(venv, "--script", str(script), "--output-dir", str(tmp_path / "out"))
    assert code == 1
    assert report["first_difference"]["what"] == "file w.bin"


@pytest.mark.parametrize(
    "args",
    [
        ["--steps", "0"],
        ["--script", "train.py"],
        ["--script", "missing.py", "--output-dir", "out"],
    ],
)
def test_usage_errors_exit_2(venv: Path, tmp_path: Path, args: list[str]) -> None:
    done = subprocess.run(
        [str(venv), str(SELFCHECK), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 2
    assert "reprobox_selfcheck: error:" in done.stderr
    assert done.stdout == ""


def test_an_output_dir_already_in_use_is_refused(venv: Path, tmp_path: Path) -> None:
    (tmp_path / "out" / "run-1").mkdir(parents=True)
    (tmp_path / "out" / "run-1" / "old.txt").write_text("from before")
    (tmp_path / "train.py").write_text("print(1)\n")
    done = subprocess.run(
        [str(venv), str(SELFCHECK), "--script", "train.py", "--output-dir", "out"],
        capture_output=True,
        text=True,
        env=clean_env(),
        cwd=tmp_path,
        check=False,
    )
    assert done.returncode == 2
    assert "not empty" in done.stderr


# --------------------------------------------------------------------------- judging


@pytest.fixture(scope="module")
def module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reprobox_selfcheck", SELFCHECK)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def report_with(probe: dict[str, str], **env: str) -> dict[str, Any]:
    return {
        "failures": [],
        "first_difference": None,
        "settings": {"env": env},
        "probe": probe,
    }


def test_strict_mode_asked_for_and_only_warned_fails(module: ModuleType) -> None:
    judged = module._judge(report_with({"cpu": "warned"}))
    assert judged["passed"] is False
    assert judged["deterministic_mode_verified"] is False


def test_warn_only_asked_for_and_warned_passes(module: ModuleType) -> None:
    judged = module._judge(report_with({"cpu": "warned"}, REPROBOX_WARN_ONLY="1"))
    assert judged["passed"] is True
    assert judged["deterministic_mode_verified"] is True


def test_deterministic_mode_not_asked_for_is_not_a_failure(module: ModuleType) -> None:
    judged = module._judge(report_with({"cpu": "ran"}, REPROBOX_DETERMINISTIC="0"))
    assert judged["passed"] is True
    assert judged["deterministic_mode_verified"] is False
    asked = module._judge(report_with({"cpu": "ran"}))
    assert asked["passed"] is False


def test_a_difference_only_in_the_final_state_is_reported(module: ModuleType) -> None:
    a = {"losses": ["0x1.0p+0", "0x1.8p+0"], "state_sha256": "aa"}
    b = {"losses": ["0x1.0p+0", "0x1.8p+0"], "state_sha256": "bb"}
    assert module._first_loss_difference(a, b) == {
        "step": 2,
        "what": "final state",
        "a": "aa",
        "b": "bb",
    }
    b["losses"] = ["0x1.0p+0", "0x1.9p+0"]
    assert module._first_loss_difference(a, b)["step"] == 2
    assert module._first_loss_difference(a, a) is None
