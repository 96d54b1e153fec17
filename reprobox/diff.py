"""Why two images differ: config field by field, layer by layer, file by file.

Images are given as engine references (ID or tag) or as paths to `docker save` archives; a path
that names an existing file is read as an archive. Images with the same ID are identical by
construction (the ID hashes the config, which holds the sha256 of every layer), and so are two
layers with the same diff ID, so only layers whose diff IDs differ are read, as streams, with file
contents hashed in chunks.
"""

from __future__ import annotations

import json
import re
import tarfile
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from pathlib import Path
from typing import IO, Any, Literal

from reprobox._files import rfc3339, sha256_hex
from reprobox._registry import check_image_ref
from reprobox.archive import (
    MAX_LAYER_ENTRIES,
    clean_name,
    index_members,
    manifest_entries,
    read_image,
)
from reprobox.engine import Engine, ImageInfo
from reprobox.errors import BadInputError
from reprobox.identity import archive_engine_ids

__all__ = ["SECTIONS", "Difference", "ImageDiff", "ImageSide", "diff_images"]

Section = Literal["config", "layer", "file"]
#: The sections of a diff, in the order its rows are sorted.
SECTIONS: tuple[Section, ...] = ("config", "layer", "file")
_SKIP_CONFIG = "rootfs.diff_ids"  # reported layer by layer instead
_MISSING = object()  # a config field that one side lacks (JSON null is None)
_INDEX = re.compile(r"\[(\d+)\]")


@dataclass(frozen=True)
class Difference:
    """One difference; `a` and `b` are display values, None where that side has nothing.

    `layer` is the 1-based layer number (None for config rows); `path` is a JSON path into the
    config (`config.Env[0]`), or an absolute file path; `field` names what differs (`value` for
    config rows, `diff_id` or `exists` for layers, and for files one of `exists`, `type`,
    `sha256`, `mode`, `uid`, `gid`, `uname`, `gname`, `mtime`, `linkname`, `xattrs`).
    """

    section: Section
    layer: int | None
    path: str
    field: str
    a: str | None
    b: str | None


@dataclass(frozen=True)
class ImageSide:
    """One of the two images: as the user named it, its ID, and its layer count."""

    ref: str
    image_id: str
    layers: int


@dataclass(frozen=True)
class ImageDiff:
    """The two images and every difference, sorted by section, layer, path and field."""

    a: ImageSide
    b: ImageSide
    differences: tuple[Difference, ...]

    @property
    def identical(self) -> bool:
        """Whether nothing differs."""
        return not self.differences


@dataclass(frozen=True)
class _Image:
    side: ImageSide
    archive: Path
    config: dict[str, Any]
    layers: tuple[str, ...]  # member names in the archive, bottom first
    diff_ids: tuple[str, ...]


@dataclass(frozen=True)
class _Entry:
    """What is compared of one file; the field order is the order rows are listed in."""

    type: str
    sha256: str | None
    mode: int
    uid: int
    gid: int
    uname: str
    gname: str
    mtime: int
    linkname: str
    xattrs: str


_ENTRY_FIELDS = tuple(f.name for f in fields(_Entry))
_TYPES = {
    tarfile.REGTYPE: "file",
    tarfile.AREGTYPE: "file",
    tarfile.LNKTYPE: "hardlink",
    tarfile.SYMTYPE: "symlink",
    tarfile.DIRTYPE: "dir",
    tarfile.CHRTYPE: "char",
    tarfile.BLKTYPE: "block",
    tarfile.FIFOTYPE: "fifo",
}


def diff_images(
    a: str, b: str, *, engine: Engine | None = None, workdir: Path | None = None
) -> ImageDiff:
    """Compare two images (IDs, tags, or docker-archive paths); `engine` saves the non-paths."""
    infos = _inspect([ref for ref in (a, b) if not Path(ref).is_file()], engine)
    if a in infos and b in infos and infos[a].id == infos[b].id:
        side = ImageSide(a, infos[a].id, len(infos[a].diff_ids))
        return ImageDiff(side, ImageSide(b, side.image_id, side.layers), ())
    with tempfile.TemporaryDirectory(prefix="diff-", dir=workdir) as tmp:
        saved = Path(tmp) / "images.tar"
        if infos and engine is not None:
            # One archive for both: layers they share are written once.
            engine.save(sorted({info.id for info in infos.values()}), saved)
        image_a, image_b = (_image(ref, infos, saved) for ref in (a, b))
        differences: list[Difference] = []
        if image_a.side.image_id != image_b.side.image_id:
            differences += _config_differences(image_a.config, image_b.config)
            differences += _layer_differences(image_a, image_b)
    return ImageDiff(image_a.side, image_b.side, tuple(sorted(differences, key=_order)))


def _order(row: Difference) -> tuple[int, int, str, int, str]:
    field_rank = _ENTRY_FIELDS.index(row.field) if row.field in _ENTRY_FIELDS else -1
    # Numbers in paths sort as numbers: Env[2] before Env[10].
    path = _INDEX.sub(lambda m: f"[{int(m[1]):09d}]", row.path)
    return (SECTIONS.index(row.section), row.layer or 0, path, field_rank, row.field)


def _inspect(refs: Sequence[str], engine: Engine | None) -> dict[str, ImageInfo]:
    """The engine's description of each reference that does not name a file."""
    for ref in refs:
        check_image_ref(ref, "an image")
    if refs and engine is None:
        raise BadInputError(
            f"{refs[0]} is not a file, and there is no engine to save it from",
            hint="name a docker-archive (.tar) that exists, or an image in the engine",
        )
    return {ref: engine.inspect_image(ref) for ref in refs} if engine is not None else {}


def _image(ref: str, infos: Mapping[str, ImageInfo], saved: Path) -> _Image:
    if ref in infos:
        return _read_image(ref, saved, infos[ref].id)
    return _read_image(ref, Path(ref), None)


def _read_image(ref: str, archive: Path, image_id: str | None) -> _Image:
    """The image `image_id` in `archive`, or its only image when `image_id` is None."""
    try:
        with tarfile.open(archive) as tar:
            members = index_members(tar)
            images = [read_image(tar, members, e) for e in manifest_entries(tar, members)]
    except (tarfile.TarError, ValueError) as err:
        raise BadInputError(f"{archive} is not a docker-archive ({err})") from err
    found = [image for image in images if image_id in (None, image.image_id)]
    if image_id is not None and not found:  # the containerd image store shows manifest digests
        shown = archive_engine_ids(archive)
        found = [image for image in images if shown.get(image.image_id) == image_id]
    if len(found) != 1:
        raise BadInputError(
            f"{archive} holds {len(found)} images{'' if image_id is None else ' with ID ' + image_id}",
            hint="diff takes an archive of one image: `docker save IMAGE -o FILE.tar`",
        )
    image = found[0]
    side = ImageSide(ref, image.image_id, len(image.layers))
    return _Image(side, archive, image.config, image.layers, image.diff_ids)


def _config_differences(a: Any, b: Any, path: str = "") -> Iterator[Difference]:
    """Walk both configs together; a field one side lacks is one row, however deep it is."""
    if path == _SKIP_CONFIG or a == b:
        return
    if isinstance(a, dict) and isinstance(b, dict):
        for key in sorted(a.keys() | b.keys()):
            yield from _config_differences(
                a.get(key, _MISSING), b.get(key, _MISSING), _step(path, key)
            )
    elif isinstance(a, list) and isinstance(b, list):
        for index in range(max(len(a), len(b))):
            item_a = a[index] if index < len(a) else _MISSING
            item_b = b[index] if index < len(b) else _MISSING
            yield from _config_differences(item_a, item_b, f"{path}[{index}]")
    else:
        yield Difference("config", None, path, "value", _json(a), _json(b))


def _step(path: str, key: str) -> str:
    """`path.key`, or `path["key"]` where the key is no identifier (labels: `a.b.c`)."""
    if not key.isidentifier():
        return f"{path}[{json.dumps(key)}]"
    return f"{path}.{key}" if path else key


def _json(value: Any) -> str | None:
    return None if value is _MISSING else json.dumps(value, sort_keys=True)


def _layer_differences(a: _Image, b: _Image) -> list[Difference]:
    rows: list[Difference] = []
    with ThreadPoolExecutor(max_workers=2) as pool:
        for index in range(max(len(a.layers), len(b.layers))):
            id_a = a.diff_ids[index] if index < len(a.diff_ids) else None
            id_b = b.diff_ids[index] if index < len(b.diff_ids) else None
            if id_a is None or id_b is None:
                rows.append(Difference("layer", index + 1, "", "exists", id_a, id_b))
            elif id_a != id_b:
                rows.append(Difference("layer", index + 1, "", "diff_id", id_a, id_b))
                # The two layers are read at once: hashing releases the GIL.
                files_a, files_b = pool.map(_layer_entries, (a, b), (index, index))
                rows += _file_differences(index + 1, files_a, files_b)
    return rows


def _layer_entries(image: _Image, index: int) -> dict[str, _Entry]:
    """Every entry of one layer, streamed; each thread opens its own handle on the archive."""
    with (
        tarfile.open(image.archive) as outer,
        _layer_stream(outer, image.layers[index], image.archive) as layer,
    ):
        entries: dict[str, _Entry] = {}
        for member in layer:
            if len(entries) >= MAX_LAYER_ENTRIES:
                raise BadInputError(
                    f"{image.archive}: layer {image.layers[index]} holds more than "
                    f"{MAX_LAYER_ENTRIES} entries; diff does not list them"
                )
            entries["/" + clean_name(member.name)] = _entry(layer, member)
        return entries


@contextmanager
def _layer_stream(outer: tarfile.TarFile, name: str, archive: Path) -> Iterator[tarfile.TarFile]:
    data = outer.extractfile(name)
    if data is None:
        raise BadInputError(f"{archive}: layer {name} is not a file")
    # "r|*": a stream, read once front to back; compressed layers (OCI archives) work too.
    with data, tarfile.open(fileobj=data, mode="r|*") as layer:
        yield layer


def _entry(layer: tarfile.TarFile, member: tarfile.TarInfo) -> _Entry:
    xattrs = {k: v for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")}
    return _Entry(
        type=_type(member),
        sha256=_sha256(layer.extractfile(member)) if member.isreg() else None,
        mode=member.mode & 0o7777,
        uid=member.uid,
        gid=member.gid,
        uname=member.uname,
        gname=member.gname,
        mtime=int(member.mtime),
        linkname=member.linkname,
        xattrs=" ".join(
            f"{k.removeprefix('SCHILY.xattr.')}={v}" for k, v in sorted(xattrs.items())
        ),
    )


def _type(member: tarfile.TarInfo) -> str:
    if member.name.rpartition("/")[2].startswith(".wh."):
        return "whiteout"  # a regular file to tar, a deletion to the engine
    return _TYPES.get(member.type, f"type {member.type!r}")


def _sha256(data: IO[bytes] | None) -> str | None:
    return None if data is None else sha256_hex(data)


def _file_differences(
    layer: int, a: Mapping[str, _Entry], b: Mapping[str, _Entry]
) -> Iterator[Difference]:
    for path in sorted(a.keys() | b.keys()):
        entry_a, entry_b = a.get(path), b.get(path)
        if entry_a is None or entry_b is None:
            kind_a = entry_a.type if entry_a else None
            kind_b = entry_b.type if entry_b else None
            yield Difference("file", layer, path, "exists", kind_a, kind_b)
            continue
        for name in _ENTRY_FIELDS:
            value_a, value_b = getattr(entry_a, name), getattr(entry_b, name)
            if value_a != value_b:
                yield Difference(
                    "file", layer, path, name, _show(name, value_a), _show(name, value_b)
                )


def _show(field: str, value: object) -> str | None:
    if value is None:
        return None
    if field == "mode" and isinstance(value, int):
        return f"{value:04o}"
    if field == "mtime" and isinstance(value, int):
        return rfc3339(value)
    return str(value)
