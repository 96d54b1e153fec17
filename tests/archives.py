"""Small docker-archives written by tests, and an engine that saves and loads them for real.

`layer(...)` writes a layer tar from `Entry` values in the order given (as a build would: unsorted,
host user names, build-time mtimes, atime and ctime); `write_archive` wraps layers and a config
into a `docker save` archive; `ArchiveEngine` is a FakeEngine whose `save` returns the archive it
was loaded from, so normalize and diff run end to end without Docker.
"""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import struct
import tarfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fakes import FakeEngine

__all__ = [
    "BUILD_TIME",
    "ArchiveEngine",
    "Entry",
    "directory",
    "hash_pyc",
    "layer",
    "raw_config",
    "read_archive",
    "sha256",
    "timestamp_pyc",
    "write_archive",
]

#: A build-time mtime: later than the SOURCE_DATE_EPOCH the tests use.
BUILD_TIME = 1_800_000_000
_PYC_MAGIC = b"\xa7\r\r\n"  # CPython 3.11


@dataclass(frozen=True)
class Entry:
    """One tar entry as a build leaves it; `data` is the content of a regular file."""

    name: str
    data: bytes = b""
    type: bytes = tarfile.REGTYPE
    mode: int = 0o644
    mtime: int = BUILD_TIME
    uid: int = 0
    gid: int = 0
    uname: str = "builder"
    gname: str = "builder"
    linkname: str = ""
    pax: Mapping[str, str] = field(default_factory=lambda: {"atime": "1800000001.5"})


def directory(name: str, mode: int = 0o755, **kwargs: Any) -> Entry:
    """A directory entry."""
    return Entry(name, type=tarfile.DIRTYPE, mode=mode, **kwargs)


def layer(*entries: Entry) -> bytes:
    """A layer tar holding `entries` in the order given."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for entry in entries:
            info = tarfile.TarInfo(entry.name)
            info.type, info.mode, info.mtime = entry.type, entry.mode, entry.mtime
            info.uid, info.gid, info.uname, info.gname = (
                entry.uid,
                entry.gid,
                entry.uname,
                entry.gname,
            )
            info.linkname = entry.linkname
            info.pax_headers = dict(entry.pax)
            data = None
            if entry.type == tarfile.REGTYPE:
                info.size, data = len(entry.data), io.BytesIO(entry.data)
            tar.addfile(info, data)
    return out.getvalue()


def sha256(data: bytes) -> str:
    """`sha256:<hex>` of `data`, as diff IDs and image IDs are written."""
    return f"sha256:{hashlib.sha256(data).hexdigest()}"


def raw_config(
    layers: Sequence[bytes], *, created: str = "2027-01-15T08:00:00.5Z"
) -> dict[str, Any]:
    """A config as the classic builder writes it, with its build-host fields."""
    return {
        "architecture": "amd64",
        "os": "linux",
        "created": created,
        "container": "5a48d968da3c",
        "container_config": {"Hostname": "5a48d968da3c", "Image": "sha256:" + "1" * 64},
        "docker_version": "20.10.24+dfsg1",
        "config": {
            "Hostname": "",
            "Image": "sha256:" + "2" * 64,
            "Env": ["PATH=/usr/bin:/bin"],
            "Cmd": ["/bin/bash"],
            "Labels": {"org.example.base": "yes"},
        },
        "history": [
            {"created": created, "created_by": f"/bin/sh -c step {n}"} for n in range(len(layers))
        ],
        "rootfs": {"type": "layers", "diff_ids": [sha256(data) for data in layers]},
    }


def write_archive(
    path: Path, config: Mapping[str, Any], layers: Sequence[bytes], *, indent: int | None = None
) -> str:
    """A `docker save` archive of one image at `path`; the image's ID."""
    blob = json.dumps(config, indent=indent).encode()
    image_id = sha256(blob)
    names = [sha256(data).removeprefix("sha256:") + "/layer.tar" for data in layers]
    manifest = [{"Config": image_id[7:] + ".json", "RepoTags": None, "Layers": names}]
    with tarfile.open(path, "w") as tar:
        for name, data in [
            *zip(names, layers, strict=True),
            (image_id[7:] + ".json", blob),
            ("manifest.json", json.dumps(manifest).encode()),
        ]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return image_id


def read_archive(path: Path) -> tuple[bytes, list[bytes]]:
    """The config bytes and the layer tars of the one image in a docker-archive."""
    with tarfile.open(path) as tar:
        (entry,) = json.loads(_read(tar, "manifest.json"))
        return _read(tar, entry["Config"]), [_read(tar, name) for name in entry["Layers"]]


def _read(tar: tarfile.TarFile, name: str) -> bytes:
    data = tar.extractfile(name)
    assert data is not None, name
    return data.read()


def timestamp_pyc(source_mtime: int = BUILD_TIME) -> bytes:
    """A .pyc as a plain import writes it: PEP 552 flags 0, then the source's mtime and size."""
    return _PYC_MAGIC + struct.pack("<III", 0, source_mtime, 10) + b"\xe3code"


def hash_pyc() -> bytes:
    """A .pyc as `compileall --invalidation-mode unchecked-hash` writes it: flags 1, a hash."""
    return _PYC_MAGIC + struct.pack("<I", 1) + b"\x01" * 8 + b"\xe3code"


class ArchiveEngine(FakeEngine):
    """A FakeEngine that keeps what it loads and saves it back byte for byte."""

    def __init__(self, store: Path) -> None:
        super().__init__()
        self.store = store
        self.archives: dict[str, Path] = {}

    def load(self, archive: Path) -> list[str]:
        ids = super().load(archive)
        for image_id in ids:
            kept = self.store / f"{image_id[7:]}.tar"
            shutil.copyfile(archive, kept)
            self.archives[image_id] = kept
        return ids

    def save(self, refs: Sequence[str], dest: Path) -> None:
        (ref,) = refs
        self._call("save", ref)
        shutil.copyfile(self.archives[self.inspect_image(ref).id], dest)
