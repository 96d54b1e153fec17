"""Image archives (`docker save` / `docker load` tars) and reproducible layer tars: read and write.

Reading: an archive is someone else's file until checked. A 1 MB gzip file can hold a
manifest.json of 1 GiB, a tar can hold millions of members, a JSON document can nest deeper than
Python recurses. So small members are read only up to a limit taken from the tar header before
reading, members are counted, and every malformation becomes one `ValueError` (a wrong type
too) that the caller words for its user.

Writing: a layer is rewritten reproducibly (entries sorted, mtimes clamped to SOURCE_DATE_EPOCH,
numeric owners with blank names, only xattrs kept of the PAX records), and an archive is its
layers, each once, then the config and manifest.json, all stamped with the same epoch. The
engine names a loaded image by the sha256 of its config bytes, which `add_image` returns.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, cast

from reprobox._files import CHUNK, HashingWriter, sha256_hex
from reprobox.errors import BadInputError

__all__ = [
    "MAX_CONFIG_BYTES",
    "MAX_IMAGES",
    "MAX_LAYER_ENTRIES",
    "MAX_MANIFEST_BYTES",
    "MAX_MEMBERS",
    "ArchiveImage",
    "add_file",
    "add_image",
    "add_layer",
    "clean_name",
    "file_in_layers",
    "index_members",
    "layer_diff_id",
    "manifest_entries",
    "member_stream",
    "read_image",
    "read_json",
    "read_member",
    "write_normalized_layer",
]

#: manifest.json of a docker-archive: a few hundred bytes per image.
MAX_MANIFEST_BYTES = 1 << 20
#: An image config: labels (the self-check trace included) and history; a few KiB in practice.
MAX_CONFIG_BYTES = 8 << 20
#: Members of the outer archive: a few per layer.
MAX_MEMBERS = 100_000
#: Entries of one layer that `diff` lists (a CUDA torch layer holds about 50,000).
MAX_LAYER_ENTRIES = 2_000_000
#: Images in one archive.
MAX_IMAGES = 64

Members = Mapping[str, tarfile.TarInfo]


@dataclass(frozen=True)
class ArchiveImage:
    """One image of an archive: its ID (the sha256 of its config), config, and layer members."""

    image_id: str
    config: dict[str, Any]
    #: The members holding its layers, bottom first.
    layers: tuple[str, ...]
    tags: tuple[str, ...]

    @property
    def diff_ids(self) -> tuple[str, ...]:
        """The layers' diff IDs as its config lists them."""
        return tuple(str(d) for d in (self.config.get("rootfs") or {}).get("diff_ids") or [])


def clean_name(name: str) -> str:
    """A member name as layers are compared and written: relative, no `./`, no trailing slash."""
    name = name.removeprefix("./").lstrip("/").rstrip("/")
    return "" if name == "." else name


# --- reading, with bounds ----------------------------------------------------------------------


def index_members(tar: tarfile.TarFile) -> dict[str, tarfile.TarInfo]:
    """Name -> member of every member of `tar` (the last of a name wins, as tar extracts)."""
    found: dict[str, tarfile.TarInfo] = {}
    count = 0
    while (member := tar.next()) is not None:
        count += 1
        if count > MAX_MEMBERS:
            raise ValueError(f"it holds more than {MAX_MEMBERS} members")
        found[member.name.removeprefix("./")] = member
    return found


def member_stream(tar: tarfile.TarFile, members: Members, name: str) -> IO[bytes]:
    """The data of the regular member `name`; a ValueError when it is missing or no file."""
    member = members.get(name.removeprefix("./"))
    stream = tar.extractfile(member) if member is not None and member.isreg() else None
    if stream is None:
        raise ValueError(f"the member {name[:200]!r} is missing or not a file")
    return stream


def read_member(tar: tarfile.TarFile, members: Members, name: str, limit: int) -> bytes:
    """The bytes of the regular member `name`, refused when its header says more than `limit`."""
    member = members.get(name.removeprefix("./"))
    if member is not None and member.isreg() and member.size > limit:
        raise ValueError(
            f"the member {name[:200]!r} is {member.size} bytes, more than {limit} allowed"
        )
    data = member_stream(tar, members, name).read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"the member {name[:200]!r} holds more than {limit} bytes")
    return data


def read_json(tar: tarfile.TarFile, members: Members, name: str, limit: int) -> Any:
    """A member parsed as JSON, bounded in size; any malformation is a ValueError."""
    data = read_member(tar, members, name, limit)
    try:
        return json.loads(data)
    except (ValueError, RecursionError) as err:
        raise ValueError(f"the member {name[:200]!r} is not JSON ({type(err).__name__})") from None


def manifest_entries(tar: tarfile.TarFile, members: Members) -> list[dict[str, Any]]:
    """manifest.json's entries, each checked for the shape `docker save` writes."""
    manifest = read_json(tar, members, "manifest.json", MAX_MANIFEST_BYTES)
    if not isinstance(manifest, list) or not 1 <= len(manifest) <= MAX_IMAGES:
        raise ValueError(f"the manifest is not a list of 1 to {MAX_IMAGES} images")
    for entry in manifest:
        if not isinstance(entry, dict) or not isinstance(entry.get("Config"), str):
            raise ValueError("a manifest entry has no Config")  # noqa: TRY004 - one type
        layers, tags = entry.get("Layers") or [], entry.get("RepoTags") or []
        if not isinstance(layers, list) or not all(isinstance(x, str) for x in layers):
            raise ValueError("a manifest entry's Layers is not a list of names")
        if not isinstance(tags, list) or not all(isinstance(x, str) for x in tags):
            raise ValueError("a manifest entry's RepoTags is not a list of names")
    return manifest


def read_image(tar: tarfile.TarFile, members: Members, entry: Mapping[str, Any]) -> ArchiveImage:
    """The image a manifest entry names: its config read with a bound, hashed to its ID, and
    checked to be a JSON object that lists as many layers as the entry holds."""
    name = str(entry["Config"])
    raw = read_member(tar, members, name, MAX_CONFIG_BYTES)
    image_id = "sha256:" + hashlib.sha256(raw).hexdigest()
    try:
        config = json.loads(raw)
    except (ValueError, RecursionError):
        raise ValueError(f"the config {name[:200]!r} is not JSON") from None
    if not isinstance(config, dict):
        raise ValueError(f"the config {name[:200]!r} is not a JSON object")  # noqa: TRY004 - one type
    rootfs = config.get("rootfs") or {}
    if not isinstance(rootfs, dict) or not isinstance(rootfs.get("diff_ids") or [], list):
        raise ValueError(f"the config {name[:200]!r} has no list of diff IDs")  # noqa: TRY004 - one type
    layers = tuple(str(layer) for layer in entry.get("Layers") or [])
    tags = tuple(str(tag) for tag in entry.get("RepoTags") or [])
    image = ArchiveImage(image_id, config, layers, tags)
    if len(image.diff_ids) != len(layers):
        raise ValueError(f"{len(layers)} layers for the {len(image.diff_ids)} its config lists")
    return image


def layer_diff_id(stream: IO[bytes]) -> str:
    """The diff ID of a layer member: the sha256 of its uncompressed tar, streamed."""
    head = stream.read(2)
    stream.seek(0)
    if head == b"\x1f\x8b":
        with gzip.GzipFile(fileobj=stream) as unzipped:
            return "sha256:" + sha256_hex(unzipped)
    return "sha256:" + sha256_hex(stream)


def file_in_layers(
    tar: tarfile.TarFile, members: Members, layers: Sequence[str], path: str, limit: int
) -> bytes | None:
    """`path` as the image sees it: from the topmost layer that holds it (or deletes it)."""
    folder, _, name = path.rpartition("/")
    whiteout = f"{folder}/.wh.{name}"
    for layer in reversed(layers):
        member = members.get(layer)
        stream = tar.extractfile(member) if member is not None else None
        if stream is None:
            continue
        with tarfile.open(fileobj=stream, mode="r:*") as inner:
            for entry in inner:
                clean = entry.name.removeprefix("./")
                if clean == whiteout:
                    return None
                if clean == path and entry.isfile():
                    if entry.size > limit:
                        raise ValueError(f"{path} in the image is larger than {limit} bytes")
                    data = inner.extractfile(entry)
                    return None if data is None else data.read(limit)
    return None


# --- writing, reproducibly ----------------------------------------------------------------------


def write_normalized_layer(
    src: Path,
    dst: Path,
    *,
    source_date_epoch: int,
    replace: Mapping[str, bytes] | None = None,
    drop: Callable[[str], bool] | None = None,
) -> str:
    """Rewrite a layer tar reproducibly; its diff ID (sha256 of the uncompressed tar).

    Entries are sorted by path, mtimes clamped to `source_date_epoch`, owners numeric with blank
    names, and only xattrs kept of the PAX records. `replace` gives files new contents; `drop`
    leaves entries out. Hard links are re-pointed so that each target precedes its links.
    """
    replace = replace or {}
    with tarfile.open(src) as tar:
        everything = {clean_name(m.name): m for m in tar.getmembers()}
        kept = sorted(n for n in everything if n and not (drop is not None and drop(n)))
        first: dict[str, str] = {}  # hard-link group -> the kept name that carries the data
        with dst.open("wb") as raw:
            sink = HashingWriter(raw)
            with tarfile.TarFile(
                fileobj=cast(IO[bytes], sink),
                mode="w",
                format=tarfile.PAX_FORMAT,
                copybufsize=CHUNK,
            ) as out:
                for name in kept:
                    member = everything[name]
                    info = _normalized_info(name, member, source_date_epoch)
                    data: IO[bytes] | None = None
                    if name in replace:
                        info.type, info.mode, info.linkname = tarfile.REGTYPE, 0o644, ""
                        info.size, data = len(replace[name]), io.BytesIO(replace[name])
                    elif member.isreg() or member.islnk():
                        group = clean_name(member.linkname) if member.islnk() else name
                        if group in first:
                            info.type, info.linkname, info.size = tarfile.LNKTYPE, first[group], 0
                        else:
                            first[group] = name
                            source = everything.get(group)
                            if source is None or not source.isreg():
                                raise BadInputError(
                                    f"{src}: hard link {name} -> {group}: no such file"
                                )
                            info.type, info.linkname, info.size = tarfile.REGTYPE, "", source.size
                            data = tar.extractfile(source)
                    out.addfile(info, data)
    return f"sha256:{sink.hexdigest()}"


def _normalized_info(name: str, member: tarfile.TarInfo, epoch: int) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = member.type
    info.mode = member.mode
    info.uid, info.gid = member.uid, member.gid
    info.uname = info.gname = ""
    info.mtime = min(int(member.mtime), epoch)
    info.linkname = member.linkname
    info.devmajor, info.devminor = member.devmajor, member.devminor
    info.pax_headers = {
        k: v for k, v in member.pax_headers.items() if k.startswith("SCHILY.xattr.")
    }
    return info


def add_file(dest: tarfile.TarFile, name: str, data: IO[bytes], size: int, epoch: int) -> None:
    """One member of an image archive: a regular file, mode 0644, stamped with `epoch`."""
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, epoch, 0o644
    dest.addfile(info, data)


def add_layer(dest: tarfile.TarFile, diff_id: str, data: IO[bytes], epoch: int) -> None:
    """The layer `diff_id` into an archive being written, once (an image may hold it twice)."""
    name = diff_id.removeprefix("sha256:") + "/layer.tar"
    if name in dest.getnames():
        return
    size = data.seek(0, 2)
    data.seek(0)
    add_file(dest, name, data, size, epoch)


def add_image(
    dest: tarfile.TarFile,
    config: bytes,
    diff_ids: Sequence[str],
    epoch: int,
    *,
    repo_tags: Sequence[str] | None = None,
) -> str:
    """The config and manifest.json, after the layers; the image ID the engine will give it."""
    config_hex = hashlib.sha256(config).hexdigest()
    layers = [d.removeprefix("sha256:") + "/layer.tar" for d in diff_ids]
    tags = list(repo_tags) if repo_tags is not None else None
    manifest = [{"Config": f"{config_hex}.json", "Layers": layers, "RepoTags": tags}]
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    for name, data in ((f"{config_hex}.json", config), ("manifest.json", blob)):
        add_file(dest, name, io.BytesIO(data), len(data), epoch)
    return f"sha256:{config_hex}"
