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

import hashlib
import inspect
import json
import re
import shutil
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any

from reprobox import archive as archive_module
from reprobox._files import CHUNK, rfc3339, write_text_atomic
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
from reprobox.errors import BadInputError, EngineError, ImageNotFoundError
from reprobox.identity import loaded_as

__all__ = [
    "KnownLayers",
    "NormalizedImage",
    "held_chains",
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
    #: Layers an earlier build normalised, whose chain the engine held: not sent again.
    layers_not_sent: int = 0

    @property
    def ref(self) -> str:
        """What names it in the engine."""
        return self.engine_id or self.image_id


@dataclass(frozen=True)
class _Layer:
    diff_id: str
    removed: frozenset[str]
    #: False where the engine holds this layer's chain and it was neither rewritten nor sent.
    sent: bool = True


_LAYER_RECORD = re.compile(r"sha256:[0-9a-f]{64}")


def _writer_digest() -> str:
    """This Python's version and the bytes of the modules that write a normalised layer."""
    digest = hashlib.sha256(f"normalised layer 1 {sys.version_info[:2]}".encode())
    for module in (archive_module, sys.modules[__name__]):
        digest.update(Path(inspect.getfile(module)).read_bytes())
    return digest.hexdigest()


_WRITER = _writer_digest()


@dataclass(frozen=True)
class KnownLayers:
    """What earlier normalisations made of a raw layer, and the layer chains the engine holds.

    A record maps the normaliser's version, the raw layer's diff ID, the epoch and the debris it
    drops to the normalised layer's diff ID (a small file under `records`). Where the engine
    holds the chain that layer ends (an earlier build's image: the classic store, which skips
    the file of a layer whose chain it has), the layer is neither rewritten nor put into the
    archive. `--no-cache` passes none: every layer is rewritten and sent.
    """

    records: Path
    chains: frozenset[tuple[str, ...]]

    def key(self, raw_diff_id: str, epoch: int, removed: frozenset[str]) -> str:
        """The record's name: everything the normalised bytes follow from, the code that
        writes them included (a changed normaliser never reads an older one's records)."""
        parts = [_WRITER, raw_diff_id, epoch, sorted(removed)]
        return hashlib.sha256(json.dumps(parts).encode()).hexdigest()

    def get(self, key: str) -> str | None:
        """The normalised diff ID recorded for `key`; None when absent or unreadable."""
        try:
            found = (self.records / key).read_text(encoding="ascii").strip()
        except (OSError, ValueError):
            return None
        return found if _LAYER_RECORD.fullmatch(found) else None

    def put(self, key: str, diff_id: str) -> None:
        self.records.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.records / key, diff_id + "\n")


def held_chains(engine: Engine, images: Iterable[str]) -> frozenset[tuple[str, ...]]:
    """Every layer chain (bottom-up prefix of diff IDs) of the images the engine still holds."""
    chains: set[tuple[str, ...]] = set()
    for image in images:
        try:
            diff_ids = engine.inspect_image(image).diff_ids
        except ImageNotFoundError:
            continue  # removed meanwhile (an untagged image by `docker image prune`)
        chains.update(tuple(diff_ids[:end]) for end in range(1, len(diff_ids) + 1))
    return frozenset(chains)


def normalize_image(
    engine: Engine,
    image_id: str,
    *,
    source_date_epoch: int,
    workdir: Path,
    labels: Mapping[str, str] | None = None,
    base_image: str | None = None,
    known: KnownLayers | None = None,
) -> NormalizedImage:
    """Rewrite `image_id` reproducibly (see the module docstring), load it, and describe it.

    `labels` are merged into the config, so labels can be set without a rebuild; `base_image`
    names the image it was built FROM, whose layers are kept as they are; `known` lets a layer
    an earlier build normalised, whose chain the engine holds, go unwritten and unsent (the
    classic store only). Temporary files go to a directory under `workdir` that is removed
    afterwards.
    """
    base_ids = _base_layers(engine, image_id, base_image)
    workdir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="normalize-", dir=workdir) as tmp:
        saved, out = Path(tmp) / "saved.tar", Path(tmp) / "normalized.tar"
        engine.save([image_id], saved)
        new_id, layers, config = _rewrite(
            saved, out, base_ids, source_date_epoch, labels, known=known
        )
        skipped = not all(layer.sent for layer in layers)
        if not skipped:
            saved.unlink()  # before the load: the engine copies the archive, so the disk holds three
        try:
            loaded = engine.load(out)
        except EngineError:
            if not skipped:
                raise
            # A layer's chain went from the engine since it was looked at (an image removed
            # meanwhile): every layer rewritten and sent, as without a record.
            new_id, layers, config = _rewrite(saved, out, base_ids, source_date_epoch, labels)
            loaded = engine.load(out)
        saved.unlink(missing_ok=True)
        shown = loaded_as(out, new_id, loaded, f"the normalised {image_id}")
    return NormalizedImage(
        image_id=new_id,
        source_id=image_id,
        diff_ids=tuple(layer.diff_id for layer in layers),
        source_date_epoch=source_date_epoch,
        removed=tuple(sorted({f"/{name}" for layer in layers for name in layer.removed})),
        config=config,
        engine_id="" if shown == new_id else shown,
        layers_not_sent=sum(not layer.sent for layer in layers),
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
    *,
    known: KnownLayers | None = None,
) -> tuple[str, list[_Layer], bytes]:
    """Write the normalised docker-archive of the image saved at `saved`; its ID, layers, config."""
    with (
        tarfile.open(saved) as archive,
        tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as dest,
    ):
        image = _saved_image(archive, saved)
        raw_ids = image.diff_ids
        if len(raw_ids) != len(image.layers):
            raise BadInputError(
                f"{saved}: its config lists {len(raw_ids)} layers, not {len(image.layers)}"
            )
        rewriter = _Rewriter(archive, dest, saved.parent, epoch, known)
        layers: list[_Layer] = []
        for i, name in enumerate(image.layers):
            below = tuple(layer.diff_id for layer in layers)
            if i < len(base_ids):
                layers.append(rewriter.keep(name, base_ids[i]))
            else:
                layers.append(rewriter.normalize(name, raw_ids[i], below))
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
        self,
        archive: tarfile.TarFile,
        dest: tarfile.TarFile,
        work: Path,
        epoch: int,
        known: KnownLayers | None = None,
    ) -> None:
        self._archive, self._dest, self._work, self._epoch = archive, dest, work, epoch
        self._known = known
        self._held: set[str] = set()  # what the layers so far hold, with ancestors

    def keep(self, name: str, diff_id: str) -> _Layer:
        """Add a base layer byte for byte."""
        with self._open(name) as data, tarfile.open(fileobj=data) as layer:
            _hold(self._held, (clean_name(m.name) for m in layer.getmembers()), frozenset())
        with self._open(name) as data:
            add_layer(self._dest, diff_id, data, self._epoch)
        return _Layer(diff_id, frozenset())

    def normalize(self, name: str, raw_diff_id: str, below: tuple[str, ...]) -> _Layer:
        """Add a layer rewritten by `write_normalized_layer`, less its debris; or, where an
        earlier build normalised the same raw layer and the engine holds that chain, nothing."""
        with self._open(name) as data, tarfile.open(fileobj=data) as layer:
            removed = _debris(layer, self._held)
            _hold(self._held, (clean_name(m.name) for m in layer.getmembers()), removed)
        key = self._known.key(raw_diff_id, self._epoch, removed) if self._known else ""
        if self._known is not None:
            recorded = self._known.get(key)
            if recorded is not None and (*below, recorded) in self._known.chains:
                return _Layer(recorded, removed, sent=False)
        raw, normal = self._work / "layer.tar", self._work / "layer.normal.tar"
        with self._open(name) as data, raw.open("wb") as copy:
            shutil.copyfileobj(data, copy, CHUNK)
        diff_id = write_normalized_layer(
            raw, normal, source_date_epoch=self._epoch, drop=removed.__contains__
        )
        raw.unlink()
        with normal.open("rb") as data:
            add_layer(self._dest, diff_id, data, self._epoch)
        normal.unlink()
        if self._known is not None:
            self._known.put(key, diff_id)
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
