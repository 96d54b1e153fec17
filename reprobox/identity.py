"""What an image is called: the config digest reprobox records, and the ID each image store shows.

reprobox names an image by its config digest, the sha256 of its config bytes: the config lists
every layer's diff ID, so the digest is a pure function of what the image holds, whatever engine
holds it. The classic image store (Docker Engine's graph drivers) shows that digest as the image
ID. The containerd image store shows the digest of the image's manifest instead; for a loaded
docker-archive it makes that manifest itself, and deterministically: the compact docker v2
manifest of the config and the uncompressed layers (`manifest_digest`). Since that manifest
holds the config digest, accepting it as the loaded ID is as strict as accepting the config
digest: both name exactly this config.
"""

from __future__ import annotations

import hashlib
import json
import tarfile
from collections.abc import Sequence
from pathlib import Path

from reprobox.archive import (
    MAX_CONFIG_BYTES,
    index_members,
    manifest_entries,
    read_image,
    read_member,
)
from reprobox.errors import EngineError

__all__ = ["archive_engine_ids", "loaded_as", "manifest_digest"]

_MANIFEST_V2 = "application/vnd.docker.distribution.manifest.v2+json"
_CONFIG_V1 = "application/vnd.docker.container.image.v1+json"
_LAYER_TAR = "application/vnd.docker.image.rootfs.diff.tar"


def manifest_digest(config: bytes, layers: Sequence[tuple[str, int]]) -> str:
    """The digest of the manifest the containerd store makes for a loaded image.

    `layers` are (diff ID, bytes of the uncompressed layer tar), bottom first.
    """
    manifest = {
        "schemaVersion": 2,
        "mediaType": _MANIFEST_V2,
        "config": {
            "mediaType": _CONFIG_V1,
            "digest": "sha256:" + hashlib.sha256(config).hexdigest(),
            "size": len(config),
        },
        "layers": [
            {"mediaType": _LAYER_TAR, "digest": diff_id, "size": size} for diff_id, size in layers
        ],
    }
    blob = json.dumps(manifest, separators=(",", ":")).encode()
    return "sha256:" + hashlib.sha256(blob).hexdigest()


def archive_engine_ids(archive: Path) -> dict[str, str]:
    """Config digest -> manifest digest of each image of a docker-archive that holds its layers.

    An image whose layers the archive lacks (a config-only archive whose layers the engine
    already holds) has no entry: its manifest needs the layers' sizes.
    """
    found: dict[str, str] = {}
    try:
        with tarfile.open(archive) as tar:
            members = index_members(tar)
            for entry in manifest_entries(tar, members):
                image = read_image(tar, members, entry)
                config = read_member(tar, members, str(entry["Config"]), MAX_CONFIG_BYTES)
                layers = [members.get(name.removeprefix("./")) for name in image.layers]
                sizes = [m.size for m in layers if m is not None and m.isreg()]
                if len(sizes) != len(image.diff_ids):
                    continue
                pairs = list(zip(image.diff_ids, sizes, strict=True))
                found[image.image_id] = manifest_digest(config, pairs)
    except (OSError, ValueError, tarfile.TarError) as err:
        raise EngineError(f"{archive}: cannot read back the archive just written: {err}") from err
    return found


def loaded_as(archive: Path, config_id: str, loaded: Sequence[str], what: str) -> str:
    """The ID the engine shows for the image `config_id` of `archive`, which it just loaded.

    The config digest on the classic store, the manifest digest on the containerd store;
    EngineError when the engine reported loading neither.
    """
    if config_id in loaded:
        return config_id
    manifest = archive_engine_ids(archive).get(config_id)
    if manifest is not None and manifest in loaded:
        return manifest
    raise EngineError(
        f"the engine loaded {list(loaded)} for {what}, expected {config_id}"
        + (f" (or, on the containerd image store, {manifest})" if manifest else "")
    )
