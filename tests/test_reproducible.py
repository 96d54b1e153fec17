"""Same spec, same lock, same image ID: two --no-cache builds made at different times, end to end."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from reprobox.docker_engine import DockerEngine
from reprobox.lockfile import read_lockfile

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "images" / "demo-cpu.yaml"


def _cli(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "reprobox", *argv],
        capture_output=True,
        text=True,
        timeout=3600,
        check=False,
    )


def _build(spec: Path, *extra: str) -> dict[str, Any]:
    result = _cli("build", str(spec), "--recipe", "--json", *extra)
    assert result.returncode == 0, result.stderr
    report: dict[str, Any] = json.loads(result.stdout)
    return report


@pytest.fixture(scope="module")
def two_builds(
    docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list[dict[str, Any]]]:
    spec = tmp_path_factory.mktemp("repro") / "spec.yaml"
    spec.write_text(DEMO.read_text())
    # Two full builds, each with no layer cache: every layer, every file, every time stamp new.
    return spec, [_build(spec, "--no-cache"), _build(spec, "--no-cache")]


def test_two_no_cache_builds_give_one_image_id(
    two_builds: tuple[Path, list[dict[str, Any]]],
) -> None:
    spec, (first, second) = two_builds
    assert first["built_id"] != second["built_id"], "the engine's own builds differ (the control)"
    assert first["content_id"] == second["content_id"]
    assert first["image_id"] == second["image_id"]
    assert first["selfcheck"]["passed"] is True, "the self-check runs on the normalised image"
    assert second["selfcheck"]["passed"] is True
    assert read_lockfile(spec.with_suffix(".lock")).image_id == first["content_id"]
    assert first["reproducible"]["matches"] is None
    assert second["reproducible"]["matches"] is True


def test_diff_names_what_differs_between_raw_builds(
    two_builds: tuple[Path, list[dict[str, Any]]],
) -> None:
    _, (first, second) = two_builds
    raw = _cli("diff", first["built_id"], second["built_id"], "--json")
    assert raw.returncode == 1, raw.stderr
    differences = json.loads(raw.stdout)["differences"]
    assert any(d["section"] == "config" and d["path"] == "created" for d in differences)
    assert any(d["section"] == "file" and d["field"] == "mtime" for d in differences)
    text = _cli("diff", first["built_id"], second["built_id"])
    assert text.returncode == 1
    assert "differences" in text.stdout
    same = _cli("diff", first["content_id"], second["content_id"])
    assert same.returncode == 0, same.stdout + same.stderr


def test_changing_one_pin_changes_the_image_id(
    two_builds: tuple[Path, list[dict[str, Any]]],
) -> None:
    spec, (first, _) = two_builds
    other = spec.parent / "other" / "spec.yaml"
    other.parent.mkdir()
    other.write_text(DEMO.read_text().replace("numpy==2.4.6", "numpy==2.4.5"))
    changed = _build(other)
    assert changed["content_id"] != first["content_id"]
    assert changed["selfcheck"]["passed"] is True


def test_a_build_that_differs_from_the_recorded_id_says_so(
    two_builds: tuple[Path, list[dict[str, Any]]],
) -> None:
    spec, (first, _) = two_builds
    lock = spec.with_suffix(".lock")
    text = lock.read_text()
    lock.write_text(text.replace(first["content_id"], "sha256:" + "0" * 64))
    try:
        report = _build(spec)
        assert report["reproducible"]["matches"] is False
        assert "reprobox diff" in report["reproducible"]["message"]
    finally:
        lock.write_text(text)
