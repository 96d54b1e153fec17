"""Hand-off without a registry: `export` writes one docker-archive that carries the image and, as
extra members under `reprobox/`, the spec and the lock it was built from; `import` verifies every
byte of such an archive against its own digests before the engine sees it, then loads it.

`docker load` reads `manifest.json` and the files it names and ignores other members, so the
archive stays an ordinary `docker save` archive (`docker load -i FILE.tar` works too), and
`tar -xf FILE.tar reprobox/` gives the spec and lock to a reader.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import tarfile
import time
import zlib
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol

from reprobox.check import SELFCHECK_LABEL, recorded_fingerprints
from reprobox.engine import DockerEngine, Engine
from reprobox.errors import EXIT_BAD_INPUT, ReproboxError
from reprobox.progress import Reporter

__all__ = ["SIDE_MEMBERS", "ArchiveContents", "export_image", "import_image", "verify_archive"]

#: The reprobox members of an exported archive, and where they come from in the image.
SIDE_MEMBERS = {
    "reprobox/spec.yaml": "opt/reprobox/spec.yaml",
    "reprobox/reprobox.lock": "opt/reprobox/reprobox.lock",
}
_LOCK_LABEL = "reprobox.lock-sha256"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class ArchiveContents:
    """What a verified docker-archive holds."""

    image_ids: tuple[str, ...]
    tags: tuple[str, ...]
    side: Mapping[str, bytes]  # reprobox/ member name -> its bytes
    labels: Mapping[str, str]  # the first image's labels


def _corrupt(archive: Path, why: str) -> ReproboxError:
    return ReproboxError(
        f"{archive} is not a usable image archive: {why}; nothing was loaded",
        hint="copy the file again from its source (compare `sha256sum`), or export it again "
        "with `reprobox export IMAGE -o FILE.tar`",
        exit_code=EXIT_BAD_INPUT,
    )


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


def _sha256(stream: _Reader) -> str:
    digest = hashlib.sha256()
    while chunk := stream.read(_CHUNK):
        digest.update(chunk)
    return "sha256:" + digest.hexdigest()


def _read(tar: tarfile.TarFile, name: str, archive: Path) -> IO[bytes]:
    try:
        stream = tar.extractfile(name)
    except KeyError:
        stream = None
    if stream is None:
        raise _corrupt(archive, f"the member {name} is missing")
    return stream


def _layer_digest(stream: IO[bytes]) -> str:
    """The diff ID of a layer file: the sha256 of its uncompressed tar."""
    head = stream.read(2)
    stream.seek(0)
    if head == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=stream) as unzipped:
            return _sha256(unzipped)
    return _sha256(stream)


def _verify_image(tar: tarfile.TarFile, entry: Mapping[str, Any], archive: Path) -> dict[str, Any]:
    """One manifest entry: its config hashes to its ID, and each layer to the config's diff ID."""
    raw = _read(tar, str(entry["Config"]), archive).read()
    image_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    stem = Path(str(entry["Config"])).name.removesuffix(".json")
    if stem not in image_id:
        raise _corrupt(archive, f"the config {entry['Config']} does not hash to its name")
    config: dict[str, Any] = json.loads(raw)
    diff_ids = list(config.get("rootfs", {}).get("diff_ids", []))
    layers = [str(layer) for layer in entry.get("Layers") or []]
    if len(diff_ids) != len(layers):
        raise _corrupt(archive, f"{len(layers)} layers for the {len(diff_ids)} its config lists")
    for layer, expected in zip(layers, diff_ids, strict=True):
        if _layer_digest(_read(tar, layer, archive)) != expected:
            raise _corrupt(archive, f"the layer {layer} does not hash to {expected}")
    config["Id"] = image_id
    return config


def verify_archive(archive: Path) -> ArchiveContents:
    """Read the whole archive and check every config and layer against its digest."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            try:
                manifest = json.loads(_read(tar, "manifest.json", archive).read())
                configs = [_verify_image(tar, entry, archive) for entry in manifest]
            except (ValueError, KeyError, TypeError, AttributeError) as err:
                raise _corrupt(archive, f"its manifest or a config is malformed ({err})") from None
            side = {
                name: _read(tar, name, archive).read()
                for name in SIDE_MEMBERS
                if name in tar.getnames()
            }
    except FileNotFoundError:
        raise ReproboxError(f"{archive}: no such file", exit_code=EXIT_BAD_INPUT) from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise _corrupt(archive, f"{type(err).__name__}: {err}") from None
    if not configs:
        raise _corrupt(archive, "its manifest lists no image")
    tags = [str(tag) for entry in manifest for tag in entry.get("RepoTags") or []]
    labels = configs[0].get("config", {}).get("Labels") or {}
    return ArchiveContents(tuple(c["Id"] for c in configs), tuple(tags), side, labels)


def _file_in_layers(tar: tarfile.TarFile, layers: list[str], path: str) -> bytes | None:
    """`path` as the image sees it: from the topmost layer that holds it (or deletes it)."""
    folder, _, name = path.rpartition("/")
    whiteout = f"{folder}/.wh.{name}"
    for layer in reversed(layers):
        stream = tar.extractfile(layer)
        if stream is None:
            continue
        with tarfile.open(fileobj=stream, mode="r:*") as inner:
            for member in inner:
                clean = member.name.removeprefix("./")
                if clean == whiteout:
                    return None
                if clean == path and member.isfile():
                    data = inner.extractfile(member)
                    return None if data is None else data.read()
    return None


def _side_members(saved: Path) -> dict[str, bytes]:
    """The spec and lock, read out of the saved image's own layers."""
    with tarfile.open(saved, "r:") as tar:
        manifest = json.loads(_read(tar, "manifest.json", saved).read())
        layers = [str(layer) for layer in manifest[0].get("Layers") or []]
        found = {
            member: _file_in_layers(tar, layers, inside) for member, inside in SIDE_MEMBERS.items()
        }
    return {name: data for name, data in found.items() if data is not None}


def _append(saved: Path, members: Mapping[str, bytes]) -> None:
    with tarfile.open(saved, "a", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))


@contextmanager
def _partial(dest: Path) -> Iterator[Path]:
    """A sibling file that becomes `dest` only when the block finishes."""
    partial = dest.with_name(f".{dest.name}.reprobox-partial")
    try:
        yield partial
        with partial.open("rb+") as handle:
            os.fsync(handle.fileno())
        partial.replace(dest)
    finally:
        partial.unlink(missing_ok=True)


def _refs_to_save(info: Mapping[str, Any], image: str) -> list[str]:
    """The name the user gave, or every tag of an image named by ID (an ID alone saves no tag)."""
    tags = [str(tag) for tag in info.get("RepoTags") or []]
    named = image if ":" in image.rsplit("/", 1)[-1] else f"{image}:latest"
    if named in tags:
        return [named]
    return tags or [str(info["Id"])]


def _lock_matches(side: Mapping[str, bytes], labels: Mapping[str, str]) -> bool | None:
    lock = side.get("reprobox/reprobox.lock")
    if lock is None or _LOCK_LABEL not in labels:
        return None
    return hashlib.sha256(lock).hexdigest() == labels[_LOCK_LABEL]


def export_image(image: str, output: Path, *, engine: Engine | None = None) -> dict[str, Any]:
    """`reprobox export`: one archive with the image, its spec and its lock."""
    started = time.monotonic()
    engine = engine or DockerEngine()
    info = engine.inspect_image(image)
    labels = (info.get("Config") or {}).get("Labels") or {}
    if SELFCHECK_LABEL not in labels:
        raise ReproboxError(
            f"{image} is not a reprobox image (it has no {SELFCHECK_LABEL} label)",
            hint="export images that `reprobox build` made; `docker save` writes any other image",
        )
    refs = _refs_to_save(info, image)
    output.parent.mkdir(parents=True, exist_ok=True)
    reporter = Reporter()
    with reporter.stage(f"export {', '.join(refs)} to {output}"), _partial(output) as partial:
        engine.save(refs, partial)
        side = _side_members(partial)
        if _lock_matches(side, labels) is False:
            raise ReproboxError(f"the lock inside {image} does not match its {_LOCK_LABEL} label")
        _append(partial, side)
    size = output.stat().st_size
    seconds = round(time.monotonic() - started, 1)
    return {
        "archive": str(output),
        "bytes": size,
        "image_id": str(info["Id"]),
        "tags": [ref for ref in refs if ref != info["Id"]],
        "members": sorted(side),
        "fingerprints": recorded_fingerprints(labels),
        "seconds": seconds,
        "summary": f"exported {info['Id']} ({', '.join(refs)}) to {output}: "
        f"{size / 1e6:.0f} MB with {', '.join(sorted(side)) or 'no spec or lock'} ({seconds} s)\n"
        f"on the other side: `reprobox import {output.name}`, then `reprobox check {refs[0]}`",
    }


def import_image(archive: Path, *, engine: Engine | None = None) -> dict[str, Any]:
    """`reprobox import`: verify the archive in full, then load it; the image IDs and tags."""
    started = time.monotonic()
    engine = engine or DockerEngine()
    engine.ping()
    reporter = Reporter()
    with reporter.stage(f"verify {archive} (every layer against its digest)"):
        contents = verify_archive(archive)
    if _lock_matches(contents.side, contents.labels) is False:
        raise _corrupt(archive, f"its reprobox.lock does not match the image's {_LOCK_LABEL}")
    with reporter.stage(f"load {archive}"):
        loaded = engine.load(archive)
    missing = sorted(set(contents.image_ids) - set(loaded))
    if missing:
        raise ReproboxError(f"the engine did not report loading {', '.join(missing)}")
    shown = ", ".join(contents.tags) or "no tags"
    seconds = round(time.monotonic() - started, 1)
    first = contents.tags[0] if contents.tags else contents.image_ids[0]
    return {
        "archive": str(archive),
        "image_ids": list(contents.image_ids),
        "tags": list(contents.tags),
        "members": sorted(contents.side),
        "lock_matches_label": _lock_matches(contents.side, contents.labels),
        "fingerprints": recorded_fingerprints(contents.labels),
        "seconds": seconds,
        "summary": f"loaded {', '.join(contents.image_ids)} ({shown}) in {seconds} s\n"
        f"next: `reprobox check {first}` reruns its self-check here",
    }
