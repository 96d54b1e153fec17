"""`identity`: the ID each image store shows for a loaded archive, against figures measured on
Docker Engine 28.5.2 (Debian sid's docker.io) with the containerd image store and on 20.10."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import pytest

from reprobox.archive import add_image, add_layer, write_normalized_layer
from reprobox.errors import EngineError
from reprobox.identity import archive_engine_ids, loaded_as, manifest_digest

# One image, one layer holding /hello.txt ("hello\n"), loaded into both engines on 2026-11-30:
# Docker 20.10 (classic store) and 28.5.2 with the classic store showed the config digest,
# 28.5.2 with the containerd store showed the manifest digest (`docker load`, `docker inspect`).
CONFIG_ID = "sha256:65b77ee7dc38d28b011777720089d7e5707a0a96e61098b6dd906b093ddeb82c"
MANIFEST_ID = "sha256:580cd76ce4c8c055ec4ec768330881262b2bd42174a639e2d38cb4c2cb5fbf0c"
DIFF_ID = "sha256:a32826ad161414ebdd8b3ab0c346437284f32d8a9cd48dee9d718213c6ece577"


def _hello(tmp_path: Path, *, with_layers: bool = True) -> tuple[Path, bytes, int]:
    """The measured image's archive (or its config-only form); its config and layer size."""
    tmp_path.mkdir(exist_ok=True)
    root = tmp_path / "root.tar"
    with tarfile.open(root, "w") as tar:
        data = b"hello\n"
        member = tarfile.TarInfo("hello.txt")
        member.size = len(data)
        tar.addfile(member, io.BytesIO(data))
    layer = tmp_path / "layer.tar"
    diff_id = write_normalized_layer(root, layer, source_date_epoch=0)
    assert diff_id == DIFF_ID
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": ["/hello.txt"]},
            "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    archive = tmp_path / ("img.tar" if with_layers else "config-only.tar")
    with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as dest:
        if with_layers:
            with layer.open("rb") as data_file:
                add_layer(dest, diff_id, data_file, 0)
        assert add_image(dest, config, [diff_id], 0, repo_tags=["probe/x:1"]) == CONFIG_ID
    return archive, config, layer.stat().st_size


def test_the_manifest_digest_is_the_one_the_containerd_store_showed(tmp_path: Path) -> None:
    _, config, size = _hello(tmp_path)
    assert manifest_digest(config, [(DIFF_ID, size)]) == MANIFEST_ID
    # Any other size or layer is another manifest: the digest commits to both.
    assert manifest_digest(config, [(DIFF_ID, size + 1)]) != MANIFEST_ID
    assert manifest_digest(config + b" ", [(DIFF_ID, size)]) != MANIFEST_ID


def test_an_archive_maps_each_config_digest_to_its_manifest_digest(tmp_path: Path) -> None:
    archive, _, _ = _hello(tmp_path)
    assert archive_engine_ids(archive) == {CONFIG_ID: MANIFEST_ID}
    # Without its layers the sizes are unknown: no manifest digest is claimed.
    config_only, _, _ = _hello(tmp_path / "bare", with_layers=False)
    assert archive_engine_ids(config_only) == {}


def test_loaded_as_accepts_either_store_and_nothing_else(tmp_path: Path) -> None:
    archive, _, _ = _hello(tmp_path)
    assert loaded_as(archive, CONFIG_ID, [CONFIG_ID], "hello") == CONFIG_ID  # classic store
    assert loaded_as(archive, CONFIG_ID, [MANIFEST_ID], "hello") == MANIFEST_ID  # containerd
    other = "sha256:" + "e" * 64
    with pytest.raises(EngineError) as caught:
        loaded_as(archive, CONFIG_ID, [other], "hello")
    assert f"expected {CONFIG_ID} (or, on the containerd image store, {MANIFEST_ID})" in str(
        caught.value.message
    )


def test_an_unreadable_archive_is_an_engine_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.tar"
    bad.write_bytes(b"not a tar")
    with pytest.raises(EngineError):
        archive_engine_ids(bad)
