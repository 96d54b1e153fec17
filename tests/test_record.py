"""The lock's recorded image ID and the reuse index: small files, handled strictly and safely."""

from __future__ import annotations

import hashlib
from pathlib import Path

from reprobox.record import ReuseIndex, lock_body, record_image_id, recorded_image_id

LOCK = """\
# reprobox-lock: 1
# spec-sha256: abc
# reprobox: 0.1.0
--only-binary :all:

numpy==2.4.6 \\
    --hash=sha256:00
"""
IMAGE = "sha256:" + "1" * 64


def test_recording_the_image_id_leaves_the_lock_hash_alone(tmp_path: Path) -> None:
    path = tmp_path / "spec.lock"
    path.write_text(LOCK)
    before = hashlib.sha256(lock_body(path.read_text()).encode()).hexdigest()
    assert recorded_image_id(LOCK) is None
    record_image_id(path, IMAGE)
    text = path.read_text()
    assert recorded_image_id(text) == IMAGE
    assert text.index("# image-id:") > text.index("# reprobox: 0.1.0")
    assert hashlib.sha256(lock_body(text).encode()).hexdigest() == before
    assert lock_body(text) == LOCK


def test_a_recorded_id_is_never_overwritten(tmp_path: Path) -> None:
    path = tmp_path / "spec.lock"
    path.write_text(LOCK)
    record_image_id(path, IMAGE)
    record_image_id(path, "sha256:" + "2" * 64)
    assert recorded_image_id(path.read_text()) == IMAGE


def test_a_malformed_image_line_is_not_taken_for_an_id() -> None:
    assert recorded_image_id(LOCK + "# image-id: sha256:xyz\n") is None


def test_reuse_index_round_trip_and_corrupt_files(tmp_path: Path) -> None:
    index = ReuseIndex(tmp_path / "builds")
    built = "sha256:" + "a" * 64
    assert index.get(built) is None
    index.put(built, {"image_id": IMAGE, "content_id": IMAGE, "checked": "yes"})
    assert index.get(built) == {"image_id": IMAGE, "content_id": IMAGE, "checked": "yes"}
    (tmp_path / "builds" / ("a" * 64 + ".json")).write_text("{not json")
    assert index.get(built) is None, "a corrupt record is a cache miss, not a crash"
    (tmp_path / "builds" / ("a" * 64 + ".json")).write_text('{"image_id": 3}')
    assert index.get(built) is None
