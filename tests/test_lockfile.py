"""The lock file on disk: read once, written atomically, the image ID recorded outside its hash."""

from __future__ import annotations

from pathlib import Path

import pytest
from test_render import fake_lock

from reprobox.errors import LockError
from reprobox.lockfile import (
    LockFile,
    format_lock,
    parse_lockfile,
    read_lockfile,
    record_image_id,
    write_lockfile,
)
from reprobox.spec_load import load_spec

ROOT = Path(__file__).resolve().parent.parent
IMAGE = "sha256:" + "1" * 64


def _written(tmp_path: Path) -> LockFile:
    lock = fake_lock(load_spec(ROOT / "images" / "demo-cpu.yaml"))
    return write_lockfile(tmp_path / "spec.lock", lock)


def test_recording_the_image_id_leaves_the_lock_hash_alone(tmp_path: Path) -> None:
    written = _written(tmp_path)
    path = tmp_path / "spec.lock"
    assert path.read_text() == written.body == format_lock(written.lock)
    before = written.sha256
    assert read_lockfile(path).image_id is None
    recorded = record_image_id(read_lockfile(path), IMAGE)
    text = path.read_text()
    again = read_lockfile(path)
    assert again.image_id == recorded.image_id == IMAGE
    assert text.index("# image-id:") > text.index("# reprobox: 0.1.0")
    assert again.sha256 == before
    assert again.body == written.body
    assert again.lock == written.lock


def test_a_recorded_id_is_never_overwritten(tmp_path: Path) -> None:
    _written(tmp_path)
    path = tmp_path / "spec.lock"
    record_image_id(read_lockfile(path), IMAGE)
    record_image_id(read_lockfile(path), "sha256:" + "2" * 64)
    assert read_lockfile(path).image_id == IMAGE


def test_a_malformed_image_line_is_not_taken_for_an_id(tmp_path: Path) -> None:
    body = _written(tmp_path).body
    bad = body.replace("# reprobox: 0.1.0\n", "# reprobox: 0.1.0\n# image-id: sha256:xyz\n")
    assert bad != body
    assert parse_lockfile(bad).image_id is None


def test_a_lock_that_is_not_one_is_a_lock_error(tmp_path: Path) -> None:
    path = tmp_path / "spec.lock"
    path.write_text("# reprobox-lock: 1\n# spec-sha256: abc\n")
    with pytest.raises(LockError, match="not a lock this reprobox wrote"):
        read_lockfile(path)


def test_an_earlier_assembled_image_id_line_is_read_past_and_keeps_the_locks_identity(
    tmp_path: Path,
) -> None:
    """Before both routes gave one ID, `build --assemble` recorded its own line: such a lock
    keeps its body and sha256, and either route records and compares `# image-id:`."""
    written = _written(tmp_path)
    path = tmp_path / "spec.lock"
    text = path.read_text()
    old = "# assembled-image-id: sha256:" + "3" * 64 + "\n"
    path.write_text(text.replace("# reprobox: 0.1.0\n", "# reprobox: 0.1.0\n" + old))
    before = read_lockfile(path)
    assert (before.image_id, before.body, before.sha256) == (None, written.body, written.sha256)
    record_image_id(before, IMAGE)
    record_image_id(read_lockfile(path), "sha256:" + "4" * 64)  # never moved
    again = read_lockfile(path)
    assert again.image_id == IMAGE
    assert again.sha256 == written.sha256
    assert again.body == written.body
