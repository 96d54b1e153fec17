"""Hand-off without a registry: `export` writes one docker-archive that carries the image and, as
extra members under `reprobox/`, the spec and the lock it was built from; `import` verifies every
byte of such an archive against its own digests before the engine sees it, then loads it.

`docker load` reads `manifest.json` and the files it names and ignores other members, so the
archive stays an ordinary `docker save` archive (`docker load -i FILE.tar` works too), and
`tar -xf FILE.tar reprobox/` gives the spec and lock to a reader.

An archive is someone else's file: import reads every member with a bound (reprobox.archive),
accepts only a reprobox export (one image, its spec and lock members, and the image's
`reprobox.spec-sha256` / `reprobox.lock-sha256` labels matching them) unless `allow_foreign`,
and never moves a tag this engine already has to another image unless `force` (checked before
loading, since `docker load` moves tags itself). Tags under `reprobox/base` are never imported:
only this host makes bases.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import tarfile
import time
import zlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobox._files import atomic_path
from reprobox._registry import check_image_ref
from reprobox._yaml import MAX_BYTES as MAX_SPEC_BYTES
from reprobox.archive import (
    ArchiveImage,
    file_in_layers,
    index_members,
    layer_diff_id,
    manifest_entries,
    member_stream,
    read_image,
    read_member,
)
from reprobox.context import Context
from reprobox.engine import Engine, ImageInfo
from reprobox.errors import ArchiveError, BadInputError, MissingError
from reprobox.identity import archive_engine_ids
from reprobox.labels import LOCK_SHA256, SELFCHECK_ARGV, SPEC_SHA256, recorded_fingerprints

__all__ = [
    "SIDE_MEMBERS",
    "ArchiveContents",
    "ExportResult",
    "ImportResult",
    "export_image",
    "import_image",
    "verify_archive",
]

#: The reprobox members of an exported archive, and where they come from in the image.
SIDE_MEMBERS = {
    "reprobox/spec.yaml": "opt/reprobox/spec.yaml",
    "reprobox/reprobox.lock": "opt/reprobox/reprobox.lock",
}
_SIDE_LIMITS = {"reprobox/spec.yaml": MAX_SPEC_BYTES, "reprobox/reprobox.lock": 16 << 20}
# A tag as the engine writes it in RepoTags: name[:port]/path:tag, nothing else.
_REPO_TAG = re.compile(
    r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*"
    r"(?::[0-9]+)?/)?[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*"
    r":[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}"
)


@dataclass(frozen=True)
class ArchiveContents:
    """What a verified docker-archive holds."""

    image_ids: tuple[str, ...]
    tags: tuple[str, ...]
    side: Mapping[str, bytes]  # reprobox/ member name -> its bytes
    labels: Mapping[str, str]  # the first image's labels


def _corrupt(archive: Path, why: str) -> ArchiveError:
    return ArchiveError(
        f"{archive} is not a usable image archive: {why}; nothing was loaded",
        hint="copy the file again from its source (compare `sha256sum`), or export it again "
        "with `reprobox export IMAGE -o FILE.tar`",
    )


def _verify_image(
    tar: tarfile.TarFile, members: Mapping[str, tarfile.TarInfo], entry: Mapping[str, Any]
) -> ArchiveImage:
    """One manifest entry: its config hashes to its ID, and each layer to the config's diff ID."""
    image = read_image(tar, members, entry)
    stem = Path(str(entry["Config"])).name.removesuffix(".json")
    if stem not in image.image_id:
        raise ValueError(f"the config {entry['Config'][:200]!r} does not hash to its name")
    for layer, expected in zip(image.layers, image.diff_ids, strict=True):
        if layer_diff_id(member_stream(tar, members, layer)) != expected:
            raise ValueError(f"the layer {layer[:200]!r} does not hash to {expected!r}")
    return image


def verify_archive(archive: Path) -> ArchiveContents:
    """Read the whole archive, with bounds, and check every config and layer against its digest."""
    try:
        with tarfile.open(archive, "r:*") as tar:
            try:
                members = index_members(tar)
                images = [_verify_image(tar, members, e) for e in manifest_entries(tar, members)]
                side = {
                    name: read_member(tar, members, name, _SIDE_LIMITS[name])
                    for name in SIDE_MEMBERS
                    if name in members
                }
            except (ValueError, KeyError, TypeError, AttributeError, RecursionError) as err:
                raise _corrupt(archive, str(err)) from None
    except FileNotFoundError:
        raise BadInputError(f"{archive}: no such file") from None
    except (tarfile.TarError, EOFError, OSError, zlib.error) as err:
        raise _corrupt(archive, f"{type(err).__name__}: {err}") from None
    tags = [tag for image in images for tag in image.tags]
    labels = (images[0].config.get("config") or {}).get("Labels") or {}
    if not isinstance(labels, dict):
        raise _corrupt(archive, "the image's labels are not a mapping")
    return ArchiveContents(tuple(i.image_id for i in images), tuple(tags), side, labels)


def _side_members(saved: Path) -> dict[str, bytes]:
    """The spec and lock, read out of the saved image's own layers."""
    try:
        with tarfile.open(saved, "r:") as tar:
            members = index_members(tar)
            layers = manifest_entries(tar, members)[0].get("Layers") or []
            found = {
                member: file_in_layers(tar, members, layers, inside, _SIDE_LIMITS[member])
                for member, inside in SIDE_MEMBERS.items()
            }
    except ValueError as err:
        raise BadInputError(f"the image's spec and lock cannot be read: {err}") from None
    return {name: data for name, data in found.items() if data is not None}


def _append(saved: Path, members: Mapping[str, bytes]) -> None:
    with tarfile.open(saved, "a", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted(members.items()):
            info = tarfile.TarInfo(name)
            info.size, info.mode, info.mtime = len(data), 0o644, 0
            tar.addfile(info, io.BytesIO(data))


def _refs_to_save(info: ImageInfo, image: str) -> list[str]:
    """The name the user gave, or every tag of an image named by ID (an ID alone saves no tag)."""
    tags = list(info.tags)
    named = image if ":" in image.rsplit("/", 1)[-1] else f"{image}:latest"
    if named in tags:
        return [named]
    return tags or [info.id]


def _lock_matches(side: Mapping[str, bytes], labels: Mapping[str, str]) -> bool | None:
    lock = side.get("reprobox/reprobox.lock")
    if lock is None or LOCK_SHA256 not in labels:
        return None
    return hashlib.sha256(lock).hexdigest() == labels[LOCK_SHA256]


def _not_an_export(contents: ArchiveContents) -> str | None:
    """Why the archive is not a reprobox export, or None when it is one."""
    if len(contents.image_ids) != 1:
        return f"it holds {len(contents.image_ids)} images; an export holds one"
    for member, label in (
        ("reprobox/spec.yaml", SPEC_SHA256),
        ("reprobox/reprobox.lock", LOCK_SHA256),
    ):
        data = contents.side.get(member)
        if data is None:
            return f"it has no {member} member"
        recorded = contents.labels.get(label)
        if recorded is None:
            return f"its image has no {label} label"
        if hashlib.sha256(data).hexdigest() != recorded:
            return f"its {member} does not match the image's {label} label"
    return None


def _check_tags(contents: ArchiveContents, engine: Engine, archive: Path, *, force: bool) -> None:
    """Before `docker load` moves any tag: every tag well-formed, none under reprobox/base, and
    none of this engine's tags moved to another image without `force`."""
    for tag in contents.tags:
        if _REPO_TAG.fullmatch(tag) is None:
            raise _corrupt(archive, f"its manifest names a malformed tag {tag[:200]!r}")
        if tag.startswith("reprobox/base:"):
            raise BadInputError(
                f"{archive} carries the tag {tag}; bases are made on this host only, so it "
                "was not loaded",
                hint="import images that `reprobox export` wrote; bases never travel",
            )
    image_id = contents.image_ids[0] if len(contents.image_ids) == 1 else None
    # The ID the containerd image store would show for it (see `identity`).
    shown = archive_engine_ids(archive).get(image_id or "") if contents.tags else None
    moved = [
        tag
        for tag in contents.tags
        if engine.image_exists(tag) and engine.inspect_image(tag).id not in (image_id, shown)
    ]
    if moved and not force:
        raise BadInputError(
            f"importing {archive} would move {', '.join(moved)} from the image it names in this "
            "engine to another one; nothing was loaded",
            hint="pass --force to move the tag, or remove the tag first (`docker rmi TAG`)",
        )


def _check_output(output: Path) -> None:
    """Where export writes: a file path (new or to replace) in an existing or creatable folder."""
    if output.is_dir():
        raise BadInputError(
            f"{output} is a directory; export writes one file",
            hint="give the archive's file name, e.g. `-o image.tar`",
        )
    try:
        output.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInputError(f"{output.parent} is not a directory") from None
    except OSError as exc:
        raise MissingError(f"cannot make {output.parent}: {exc.strerror or exc}") from None
    if not os.access(output.parent, os.W_OK):
        raise MissingError(f"cannot write into {output.parent}")


@dataclass(frozen=True)
class ExportResult:
    """`reprobox export`: the archive written, and what it holds."""

    archive: Path
    bytes: int
    image_id: str
    #: The names saved: the one the user gave, or every tag of an image named by ID.
    refs: tuple[str, ...]
    members: tuple[str, ...]
    fingerprints: Mapping[str, str]
    seconds: float

    @property
    def tags(self) -> tuple[str, ...]:
        """The tags saved with the image (not its ID)."""
        return tuple(ref for ref in self.refs if ref != self.image_id)


@dataclass(frozen=True)
class ImportResult:
    """`reprobox import`: what was loaded, and whether it is a reprobox export."""

    archive: Path
    image_ids: tuple[str, ...]
    tags: tuple[str, ...]
    members: tuple[str, ...]
    reprobox_export: bool
    #: The lock inside hashes to the image's reprobox.lock-sha256 (None: nothing to compare).
    lock_matches_label: bool | None
    fingerprints: Mapping[str, str]
    seconds: float


def export_image(ctx: Context, image: str, output: Path) -> ExportResult:
    """`reprobox export`: one archive with the image, its spec and its lock."""
    started = time.monotonic()
    check_image_ref(image)
    _check_output(output)  # before the engine spends seconds saving
    info = ctx.engine.inspect_image(image)
    labels = info.labels
    if SELFCHECK_ARGV not in labels:
        raise BadInputError(
            f"{image} is not a reprobox image (it has no {SELFCHECK_ARGV} label)",
            hint="export images that `reprobox build` made; `docker save` writes any other image",
        )
    refs = _refs_to_save(info, image)
    try:
        with (
            ctx.reporter.stage(f"export {', '.join(refs)} to {output}"),
            atomic_path(output, fsync=True) as partial,
        ):
            ctx.engine.save(refs, partial)
            side = _side_members(partial)
            if _lock_matches(side, labels) is False:
                raise BadInputError(
                    f"the lock inside {image} does not match its {LOCK_SHA256} label"
                )
            _append(partial, side)
    except IsADirectoryError:
        raise BadInputError(f"{output} is a directory") from None
    return ExportResult(
        archive=output,
        bytes=output.stat().st_size,
        image_id=info.id,
        refs=tuple(refs),
        members=tuple(sorted(side)),
        fingerprints=recorded_fingerprints(labels),
        seconds=round(time.monotonic() - started, 1),
    )


def import_image(
    ctx: Context, archive: Path, *, allow_foreign: bool = False, force: bool = False
) -> ImportResult:
    """`reprobox import`: verify the archive in full, check what it would change, then load it.

    Only a reprobox export is loaded unless `allow_foreign`; a tag this engine already has for
    another image is moved only with `force`.
    """
    started = time.monotonic()
    ctx.engine_info()
    with ctx.reporter.stage(f"verify {archive} (every layer against its digest)"):
        contents = verify_archive(archive)
    if _lock_matches(contents.side, contents.labels) is False:
        raise _corrupt(archive, f"its reprobox.lock does not match the image's {LOCK_SHA256}")
    why = _not_an_export(contents)
    if why is not None and not allow_foreign:
        raise BadInputError(
            f"{archive} is not a reprobox export: {why}; nothing was loaded",
            hint="`reprobox export IMAGE -o FILE.tar` writes one; to load another archive "
            "anyway, pass --allow-foreign (or use `docker load`)",
        )
    _check_tags(contents, ctx.engine, archive, force=force)
    with ctx.reporter.stage(f"load {archive}"):
        loaded = ctx.engine.load(archive)
    missing = sorted(set(contents.image_ids) - set(loaded))
    if missing:  # the containerd image store shows manifest digests (see `identity`)
        shown = archive_engine_ids(archive)
        missing = [image_id for image_id in missing if shown.get(image_id) not in loaded]
    if missing:
        raise BadInputError(f"the engine did not report loading {', '.join(missing)}")
    return ImportResult(
        archive=archive,
        image_ids=contents.image_ids,
        tags=contents.tags,
        members=tuple(sorted(contents.side)),
        reprobox_export=why is None,
        lock_matches_label=_lock_matches(contents.side, contents.labels),
        fingerprints=recorded_fingerprints(contents.labels),
        seconds=round(time.monotonic() - started, 1),
    )
