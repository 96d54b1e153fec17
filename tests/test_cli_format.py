"""The `--json` reports are a contract with pipelines (docs/ci.md): every command's keys, pinned.

Commands run in-process on the FakeEngine (tests/test_stages.py's project: a real lock, wheels and
context), so the reports come from real typed results through the CLI's one formatter.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from test_stages import answering, project, selfcheck

from reprobox import cli
from reprobox.cli_format import report
from reprobox.doctor import DoctorResult, Line
from reprobox.engine import RunResult
from reprobox.export_import import ExportResult, ImportResult

BUILD = {
    "spec",
    "lock",
    "spec_sha256",
    "lock_sha256",
    "base",
    "built_id",
    "tags",
    "image_id",
    "content_id",
    "passed",
    "selfcheck",
    "summary",
}
FRESH_CHECK = {"passed", "fingerprint", "device_class", "first_difference", "report"}
CHECK = {
    "image",
    "passed",
    "verdict",
    "device_class",
    "fingerprint",
    "recorded",
    "recorded_classes",
    "matches_recorded",
    "first_difference",
    "settings",
    "emulated_cpu",
    "cpuset_cpus",
    "selfcheck",
    "summary",
}


@pytest.fixture
def run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    monkeypatch.setenv("REPROBOX_CACHE_DIR", str(tmp_path / "cache"))

    def run(engine: Any, *argv: str) -> tuple[int, dict[str, Any]]:
        code = cli.main([*argv, "--json"], engine=engine)
        return code, json.loads(capsys.readouterr().out)

    return run


def test_lock_and_render_reports(tmp_path: Path, run: Any) -> None:
    spec = project(tmp_path / "p")
    engine = answering(selfcheck())
    code, locked = run(engine, "lock", str(spec))
    assert code == 0
    assert set(locked) == {"lock", "pylock", "spec_sha256", "wheels", "summary"}
    assert locked["wheels"] == 4
    code, rendered = run(engine, "render", str(spec), "-o", str(tmp_path / "ctx"))
    assert code == 0
    assert set(rendered) == {"context", "tag", "lock", "cpu", "summary"}
    assert rendered["cpu"] == "portable"  # determinism.cpu, named in the report
    assert rendered["tag"].startswith("demo-fake:")
    assert engine.calls == [("tag", engine.calls[0][1])], "neither lock nor render asks the engine"


def test_build_reports_fresh_reused_and_failed(tmp_path: Path, run: Any) -> None:
    spec = project(tmp_path / "p")
    engine = answering(selfcheck())
    code, fresh = run(engine, "build", str(spec), "--recipe")
    assert code == 0
    assert set(fresh) == BUILD | {"reproducible", "seconds"}
    assert set(fresh["selfcheck"]) == FRESH_CHECK
    assert set(fresh["reproducible"]) == {"recorded", "matches", "message"}
    assert fresh["reproducible"]["matches"] is None
    code, reused = run(engine, "build", str(spec), "--recipe")
    assert code == 0
    assert reused["selfcheck"] == {
        "passed": True,
        "reused": True,
        "fingerprints": {"cpu-x86_64": "a" * 64},
    }
    assert reused["reproducible"]["matches"] is True
    code, unchecked = run(engine, "build", str(spec), "--recipe", "--no-check")
    assert (code, unchecked["selfcheck"]) == (0, None)
    failing = project(tmp_path / "q")
    code, failed = run(answering(selfcheck(passed=False)), "build", str(failing), "--recipe")
    assert code == 1
    assert set(failed) == BUILD, "a failed build reports no reproducibility and no time"
    assert failed["tags"] == []


def test_check_reports_the_recorded_fingerprint(tmp_path: Path, run: Any) -> None:
    spec = project(tmp_path / "p")
    engine = answering(selfcheck())
    _, built = run(engine, "build", str(spec), "--recipe")
    code, checked = run(engine, "check", built["tags"][0])
    assert code == 0
    assert set(checked) == CHECK
    assert (checked["matches_recorded"], checked["recorded"]) == (True, "a" * 64)
    assert checked["verdict"] == "reproduced"
    assert checked["first_difference"] is None
    assert set(checked["settings"]) == {"here", "recorded", "differences"}
    assert (checked["emulated_cpu"], checked["cpuset_cpus"]) == (None, None)


def test_check_reports_a_differing_record_with_the_settings_that_differ(
    tmp_path: Path, run: Any
) -> None:
    # Built on one host (its settings recorded with the fingerprint), checked where the runs
    # agree but give another fingerprint and saw another MKL_CBWR: exit 1, named.
    def answer(fingerprint: str, cbwr: str) -> RunResult:
        report = json.loads(selfcheck().stdout)
        report["fingerprint"] = fingerprint
        report["settings"] = {"env": {"MKL_CBWR": cbwr}, "torch": {}, "cpu": {"level": "v3"}}
        return RunResult(0, json.dumps(report), "")

    engine = answering(answer("a" * 64, "COMPATIBLE"))
    _, built = run(engine, "build", str(project(tmp_path / "p")), "--recipe")
    engine.run_handler = lambda *_: answer("b" * 64, "AUTO")
    code, checked = run(engine, "check", built["tags"][0])
    assert code == 1
    assert (checked["verdict"], checked["matches_recorded"]) == ("differs", False)
    assert checked["settings"]["recorded"]["env"] == {"MKL_CBWR": "COMPATIBLE"}
    assert checked["settings"]["differences"] == {"env.MKL_CBWR": ["COMPATIBLE", "AUTO"]}
    assert (
        "settings that differ: env.MKL_CBWR: 'COMPATIBLE' recorded, 'AUTO' here"
        in (checked["summary"])
    )
    # The same runs on a host class the image has no record for: exit 5, not a failure.
    engine.run_handler = lambda *_: RunResult(
        0, json.dumps(json.loads(answer("b" * 64, "AUTO").stdout) | {"device_class": "cpu-x"}), ""
    )
    code, unrecorded = run(engine, "check", built["tags"][0])
    assert (code, unrecorded["verdict"], unrecorded["settings"]["differences"]) == (
        5,
        "unrecorded",
        None,
    )
    assert unrecorded["recorded_classes"] == ["cpu-x86_64"]


def test_export_import_and_doctor_reports(tmp_path: Path) -> None:
    exported = ExportResult(
        tmp_path / "a.tar", 10, "sha256:" + "1" * 64, ("demo:1",), ("reprobox/spec.yaml",), {}, 1.0
    )
    assert set(report(exported)) == {
        "archive",
        "bytes",
        "image_id",
        "tags",
        "members",
        "fingerprints",
        "seconds",
        "summary",
    }
    assert report(exported)["tags"] == ["demo:1"]
    imported = ImportResult(
        tmp_path / "a.tar", ("sha256:" + "1" * 64,), (), (), True, None, {}, 1.0
    )
    assert set(report(imported)) == {
        "archive",
        "image_ids",
        "tags",
        "members",
        "reprobox_export",
        "lock_matches_label",
        "fingerprints",
        "seconds",
        "summary",
    }
    doctored = report(DoctorResult(None, (Line("gpu", "fail", "none", "get one"),)))
    assert set(doctored) == {"spec", "passed", "exit_code", "lines", "engine", "summary"}
    assert (doctored["passed"], doctored["exit_code"]) == (False, 3)
    assert doctored["lines"] == [
        {"name": "gpu", "status": "fail", "detail": "none", "hint": "get one"}
    ]
