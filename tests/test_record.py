"""The reuse index: a small cache file per raw build, handled strictly and safely."""

from __future__ import annotations

from pathlib import Path

from reprobox.pipeline import ReuseIndex

IMAGE = "sha256:" + "1" * 64


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
