"""Built image -> reproducible image: the same layer contents give the same image ID.

The image is saved, each layer above the base is rewritten by `base.write_normalized_layer` (entries
sorted, mtimes clamped to SOURCE_DATE_EPOCH, numeric owners with blank names, no atime or ctime)
without its build debris, the config gets fixed times and loses its build-host fields, and the
result is loaded back. The engine names a loaded image by the sha256 of its config bytes, and the
config holds the sha256 of every layer, so the image ID is a pure function of what the image holds.

Build debris, dropped from every layer above the base because it differs from build to build and
nothing needs it at run time:

- everything below /tmp, /var/tmp, /root/.cache and /home/*/.cache (pip's and uv's caches among
  them); the directories themselves stay;
- the files below /var/cache/apt, /var/lib/apt/lists and /var/log (package caches, downloaded
  indexes, logs with times in them); their directories stay, as apt expects them;
- /var/cache/ldconfig/aux-cache, which records inode numbers and ctimes;
- timestamp-based .pyc files (PEP 552 flags 0), which plain imports write during a build: they
  embed the source's build-time mtime, which clamping makes stale anyway. Hash-based .pyc files
  (what a controlled `compileall --invalidation-mode unchecked-hash` writes) stay;
- whiteouts that hide nothing once the layers below are normalised (left by deleted debris).

The base image's layers are kept byte for byte: they are reproducible by construction (a
bootstrapped base) or pinned by digest, and keeping them keeps them shared with the base.
"""

from __future__ import annotations

import json
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from reprobox._files import CHUNK, rfc3339
from reprobox.archive import (
    ArchiveImage,
    add_image,
    add_layer,
    clean_name,
    index_members,
    manifest_entries,
    read_image,
    write_normalized_layer,
)
from reprobox.engine import Engine
from reprobox.errors import BadInputError
from reprobox.identity import loaded_as

__all__ = [
    "NormalizedImage",
    "normalize_config",
    "normalize_image",
    "relabel",
]

# Below these, everything goes (their names are often random or cache keys); the roots stay.
_ALL_BELOW = re.compile(r"^(tmp|var/tmp|root/\.cache|home/[^/]+/\.cache)/.")
# Below these, files go and directories stay: apt expects its directory skeleton.
_FILES_BELOW = re.compile(r"^(var/cache/apt|var/lib/apt/lists|var/log)/.")
_FILES = frozenset({"var/cache/ldconfig/aux-cache"})
_WHITEOUT = ".wh."
_OPAQUE = ".wh..wh..opq"
# The image config's build-host fields: the build container, the engine's version.
_HOST_FIELDS = ("container", "container_config", "docker_version")
# In `config`: the build container's hostname and the ID of the previous step's image.
_HOST_CONFIG_FIELDS = ("Hostname", "Image")
# In `config`: fields that Docker 20.10 writes with their empty value and Docker 28 leaves out;
# empty, they say nothing, so they go (one config, one ID, on either engine).
_EMPTY_CONFIG_FIELDS = (
    "AttachStderr",
    "AttachStdin",
    "AttachStdout",
    "Domainname",
    "Entrypoint",
    "OnBuild",
    "OpenStdin",
    "StdinOnce",
    "Tty",
    "User",
    "Volumes",
    "WorkingDir",
)
# A COPY/ADD step's history names its source by the builder's own hash of it, which differs
# between engine versions for the same files; the layer's diff ID already names what it holds.
_COPY_SOURCE = re.compile(
    r"^(/bin/sh -c #\(nop\) (?:COPY|ADD) (?:dir|file|multi)):[0-9a-f]{64}( in )"
)


@dataclass(frozen=True)
class NormalizedImage:
    """The loaded, normalised image; `removed` lists the dropped entries as absolute paths."""

    image_id: str
    source_id: str
    diff_ids: tuple[str, ...]
    source_date_epoch: int
    removed: tuple[str, ...]
    config: bytes = field(default=b"", repr=False, compare=False)
    #: The ID the engine shows for it, where not `image_id` (the containerd image store shows
    #: the manifest digest: see `identity`).
    engine_id: str = ""

    @property
    def ref(self) -> str:
        """What names it in the engine."""
        return self.engine_id or self.image_id


@dataclass(frozen=True)
class _Layer:
    diff_id: str
    removed: frozenset[str]


def normalize_image(
    engine: Engine,
    image_id: str,
    *,
    source_date_epoch: int,
    workdir: Path,
    labels: Mapping[str, str] | None = None,
    base_image: str | None = None,
) -> NormalizedImage:
    """Rewrite `image_id` reproducibly (see the module docstring), load it, and describe it.

    `labels` are merged into the config, so labels can be set without a rebuild; `base_image`
    names the image it was built FROM, whose layers are kept as they are. Temporary files go to
    a directory under `workdir` that is removed afterwards.
    """
    base_ids = _base_layers(engine, image_id, base_image)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="normalize-", dir=workdir) as tmp:
        saved, out = Path(tmp) / "saved.tar", Path(tmp) / "normalized.tar"
        engine.save([image_id], saved)
        new_id, layers, config = _rewrite(saved, out, base_ids, source_date_epoch, labels)
        saved.unlink()  # before the load: the engine copies the archive, so the disk holds three
        loaded = engine.load(out)
        shown = loaded_as(out, new_id, loaded, f"the normalised {image_id}")
    return NormalizedImage(
        image_id=new_id,
        source_id=image_id,
        diff_ids=tuple(layer.diff_id for layer in layers),
        source_date_epoch=source_date_epoch,
        removed=tuple(sorted({f"/{name}" for layer in layers for name in layer.removed})),
        config=config,
        engine_id="" if shown == new_id else shown,
    )


def relabel(
    engine: Engine, image: NormalizedImage, labels: Mapping[str, str], *, workdir: Path
) -> str:
    """`image` with `labels` merged into its config, loaded without rewriting a layer.

    The archive holds only the new config and a manifest: the engine already has every layer
    of the chain, so `docker load` takes them from its store. The containerd image store
    does not (it wants every layer in the archive): there the image is saved and its layers
    written too. The new ID is as reproducible as the image and the labels are; the ID the
    engine shows for it is returned.
    """
    blob = normalize_config(
        json.loads(image.config),
        diff_ids=image.diff_ids,
        source_date_epoch=image.source_date_epoch,
        labels=labels,
    )
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="relabel-", dir=workdir) as tmp:
        archive = Path(tmp) / "labels.tar"
        saved = Path(tmp) / "saved.tar"
        if image.engine_id:
            engine.save([image.engine_id], saved)
        with tarfile.open(archive, "w", format=tarfile.PAX_FORMAT) as dest:
            if image.engine_id:
                _copy_layers(saved, dest, image.source_date_epoch)
                saved.unlink()
            new_id = add_image(dest, blob, image.diff_ids, image.source_date_epoch)
        loaded = engine.load(archive)
        return loaded_as(archive, new_id, loaded, f"the relabelled {image.image_id}")


def _copy_layers(saved: Path, dest: tarfile.TarFile, epoch: int) -> None:
    """Add the layers of the one image saved at `saved` to `dest`, as they are."""
    with tarfile.open(saved) as archive:
        image = _saved_image(archive, saved)
        for name, diff_id in zip(image.layers, image.diff_ids, strict=True):
            data = archive.extractfile(name)
            if data is None:
                raise BadInputError(f"the saved image's {name} is not a file")
            add_layer(dest, diff_id, data, epoch)


def normalize_config(
    config: Mapping[str, Any],
    *,
    diff_ids: Sequence[str],
    source_date_epoch: int,
    labels: Mapping[str, str] | None = None,
) -> bytes:
    """The config as canonical JSON bytes: fixed times, no build-host fields, new diff IDs."""
    out: dict[str, Any] = json.loads(json.dumps(config))  # a deep copy
    created = rfc3339(source_date_epoch)
    for key in _HOST_FIELDS:
        out.pop(key, None)
    inner = out.get("config") or {}
    for key in _HOST_CONFIG_FIELDS:
        inner.pop(key, None)
    for key in _EMPTY_CONFIG_FIELDS:
        if key in inner and inner[key] in ("", False, None):
            del inner[key]
    if labels:
        inner["Labels"] = {**(inner.get("Labels") or {}), **labels}
    out["config"] = inner
    out["created"] = created
    out["history"] = [_history_entry(entry, created) for entry in out.get("history") or []]
    out["rootfs"] = {"type": "layers", "diff_ids": list(diff_ids)}
    return json.dumps(out, sort_keys=True, separators=(",", ":")).encode()


def _history_entry(entry: Mapping[str, Any], created: str) -> dict[str, Any]:
    """A history entry with the fixed time, and a COPY/ADD source named without its hash."""
    out = {**entry, "created": created}
    by = out.get("created_by")
    if isinstance(by, str):
        out["created_by"] = _COPY_SOURCE.sub(r"\1\2", by)
    return out


def _base_layers(engine: Engine, image_id: str, base_image: str | None) -> tuple[str, ...]:
    """The diff IDs of `base_image`, checked to be where `image_id`'s layers start."""
    if base_image is None:
        return ()
    base = engine.inspect_image(base_image).diff_ids
    if engine.inspect_image(image_id).diff_ids[: len(base)] != base:
        raise BadInputError(
            f"{image_id} is not built on {base_image}: its layers do not start with the base's",
            hint="pass the image that the Dockerfile names in FROM as the base",
        )
    return base


def _rewrite(
    saved: Path,
    out: Path,
    base_ids: Sequence[str],
    epoch: int,
    labels: Mapping[str, str] | None,
) -> tuple[str, list[_Layer], bytes]:
    """Write the normalised docker-archive of the image saved at `saved`; its ID, layers, config."""
    with (
        tarfile.open(saved) as archive,
        tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dest,
    ):
        image = _saved_image(archive, saved)
        rewriter = _Rewriter(archive, dest, saved.parent, epoch)
        layers = [
            rewriter.keep(name, base_ids[i]) if i < len(base_ids) else rewriter.normalize(name)
            for i, name in enumerate(image.layers)
        ]
        diff_ids = [layer.diff_id for layer in layers]
        blob = normalize_config(
            image.config, diff_ids=diff_ids, source_date_epoch=epoch, labels=labels
        )
        return add_image(dest, blob, diff_ids, epoch), layers, blob


def _saved_image(archive: tarfile.TarFile, path: Path) -> ArchiveImage:
    """The one image of a docker-archive the engine saved, read as any archive is."""
    try:
        members = index_members(archive)
        images = [read_image(archive, members, e) for e in manifest_entries(archive, members)]
    except ValueError as err:
        raise BadInputError(f"{path} is not a usable docker-archive: {err}") from None
    if len(images) != 1:
        raise BadInputError(f"{path} holds {len(images)} images; expected exactly one")
    return images[0]


class _Rewriter:
    """Adds a saved image's layers to `dest`, bottom to top: the base's as they are, others normalised."""

    def __init__(
        self, archive: tarfile.TarFile, dest: tarfile.TarFile, work: Path, epoch: int
    ) -> None:
        self._archive, self._dest, self._work, self._epoch = archive, dest, work, epoch
        self._held: set[str] = set()  # what the layers so far hold, with ancestors

    def keep(self, name: str, diff_id: str) -> _Layer:
        """Add a base layer byte for byte."""
        with self._open(name) as data, tarfile.open(fileobj=data) as layer:
            _hold(self._held, (clean_name(m.name) for m in layer.getmembers()), frozenset())
        with self._open(name) as data:
            add_layer(self._dest, diff_id, data, self._epoch)
        return _Layer(diff_id, frozenset())

    def normalize(self, name: str) -> _Layer:
        """Add a layer rewritten by `write_normalized_layer`, less its debris."""
        raw, normal = self._work / "layer.tar", self._work / "layer.normal.tar"
        with self._open(name) as data, raw.open("wb") as copy:
            shutil.copyfileobj(data, copy, CHUNK)
        with tarfile.open(raw) as layer:
            removed = _debris(layer, self._held)
            _hold(self._held, (clean_name(m.name) for m in layer.getmembers()), removed)
        diff_id = write_normalized_layer(
            raw, normal, source_date_epoch=self._epoch, drop=removed.__contains__
        )
        raw.unlink()
        with normal.open("rb") as data:
            add_layer(self._dest, diff_id, data, self._epoch)
        normal.unlink()
        return _Layer(diff_id, removed)

    def _open(self, name: str) -> IO[bytes]:
        data = self._archive.extractfile(name)
        if data is None:
            raise BadInputError(f"the saved image's {name} is not a file")
        return data


def _debris(layer: tarfile.TarFile, held: set[str]) -> frozenset[str]:
    """The entries of `layer` to drop, given what the layers below still hold."""
    dropped: set[str] = set()
    for member in layer.getmembers():
        name = clean_name(member.name)
        if _is_debris(layer, member, held=held, dropped=dropped):
            dropped.add(name)
    return frozenset(dropped)


def _is_debris(
    layer: tarfile.TarFile, member: tarfile.TarInfo, *, held: set[str], dropped: set[str]
) -> bool:
    name = clean_name(member.name)
    path = PurePosixPath(name)
    if path.name.startswith(_WHITEOUT):
        return _stale_whiteout(path, held)
    if _ALL_BELOW.match(name) or name in _FILES:
        return True
    if _FILES_BELOW.match(name):
        return not member.isdir()
    if not name.endswith(".pyc"):
        return False
    if member.islnk():
        return clean_name(member.linkname) in dropped
    return member.isreg() and _timestamp_pyc(layer, member)


def _stale_whiteout(path: PurePosixPath, held: set[str]) -> bool:
    """Whether a whiteout hides nothing: such ones differ with the debris they once hid."""
    if path.name == _OPAQUE:
        return bool(_ALL_BELOW.match(str(path.parent)))  # it goes with its directory
    return str(path.parent / path.name.removeprefix(_WHITEOUT)) not in held


def _timestamp_pyc(layer: tarfile.TarFile, member: tarfile.TarInfo) -> bool:
    """Whether a .pyc is timestamp-based (PEP 552: a zero flags word after the magic)."""
    data = layer.extractfile(member)
    head = data.read(8) if data is not None else b""
    return len(head) == 8 and int.from_bytes(head[4:], "little") == 0


def _hold(held: set[str], names: Iterable[str], removed: frozenset[str]) -> None:
    """Add the files `names` keep, and their ancestors (a whiteout of a directory hides its tree)."""
    for name in names:
        if name in removed or name.rpartition("/")[2].startswith(_WHITEOUT):
            continue
        path = name
        while path and path not in held:
            held.add(path)
            path = path.rpartition("/")[0]
