"""Layer tars written by reprobox itself, and the image archive streamed from them.

A layer comes out as the normaliser (`archive.write_normalized_layer`) writes the recipe's
layers: entries sorted by name, owner 0:0 with blank names, mtime at or below SOURCE_DATE_EPOCH,
no atime or ctime, PAX format, so that the same entries give the same bytes on either route. A
layer whose entries were added in that order is written once and hashed while it is written; one
added in another order is put in order by one more pass of the normaliser itself (a safety net).
A `LayerIndex` gathers a layer's entries first, each with where its bytes are (pypa/installer's
output in a spool, a pyc in the compile's tar), and writes them in that order: the Python
layers are written once, in one pass. The image archive is never written to disk:
`archive_stream` yields it as chunks for the engine's load endpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import stat
import tarfile
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import IO, cast

from reprobox._files import CHUNK, HashingWriter
from reprobox.archive import write_normalized_layer
from reprobox.errors import BadInputError

__all__ = [
    "Layer",
    "LayerIndex",
    "LayerWriter",
    "Opener",
    "ancestors",
    "archive_stream",
    "installed_mode",
    "tar_stream",
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

#: An entry's bytes when its layer is written: the writer reads the entry's size from what
#: the context gives (an open file is one), then leaves the context.
Opener = Callable[[], AbstractContextManager[IO[bytes]]]


@dataclass(frozen=True)
class Layer:
    """A layer tar on this host (`path`), named by its diff ID, `size` bytes long."""

    diff_id: str
    path: Path
    size: int


def ancestors(name: str) -> Iterator[str]:
    """`a/b/c` -> `a`, `a/b`."""
    parts = name.split("/")
    for end in range(1, len(parts)):
        yield "/".join(parts[:end])


def _tar_writer(sink: HashingWriter) -> tarfile.TarFile:
    """A PAX tar written straight to `sink`, a file's data copied in `CHUNK`s (the bytes are
    those of a stream-mode tar: the padding is the tar's, not the buffer's)."""
    return tarfile.TarFile(
        fileobj=cast(IO[bytes], sink), mode="w", format=tarfile.PAX_FORMAT, copybufsize=CHUNK
    )


def _under(root: str, name: str) -> bool:
    return not root or name == root or name.startswith(root + "/")


def _check_name(root: str, name: str, linkname: str = "") -> None:
    if not _under(root, name) or any(part in {"", ".", ".."} for part in name.split("/")):
        raise BadInputError(f"a layer entry {name!r} lies outside /{root}")
    # Every name here comes from a wheel or an engine's answer: none may hold a newline
    # (a line of the compile list, a header a reader splits) or another control character.
    if _CONTROL.search(name) or _CONTROL.search(linkname):
        raise BadInputError(
            f"a layer entry {name!r:.200} {linkname!r:.200} holds a control character"
        )


def installed_mode(st_mode: int) -> int:
    """What an installer run with umask 022 makes: 0755 for directories and executables."""
    return 0o755 if stat.S_ISDIR(st_mode) or st_mode & 0o111 else 0o644


class LayerWriter:
    """Each ancestor directory once (0755), before its children; the layer in sorted order.

    A second entry at a path already written is skipped when it is a directory or the same
    file (the same sha256: namespace packages such as `nvidia/__init__.py` ship it in several
    wheels), and refused when it differs: pip would silently keep the last one.
    Every name must lie under `root` ("" for anywhere). `dir_meta` gives directories that need
    another mode or mtime than 0755 at the epoch.
    """

    def __init__(
        self,
        path: Path,
        epoch: int,
        *,
        root: str,
        dir_meta: Mapping[str, tuple[int, float]] | None = None,
    ) -> None:
        self.path, self.epoch, self.root = path, epoch, root
        self._dir_meta = dict(dir_meta or {})
        self._raw = path.open("wb")
        self._sink = HashingWriter(self._raw)
        self._tar = _tar_writer(self._sink)
        # name -> "dir", "link", or a file's sha256 ("-" when not given)
        self._seen: dict[str, str] = {}
        # The last name added, and whether every name so far came after the one before it.
        self._last, self._in_order = "", True

    def _info(
        self, name: str, kind: bytes, mode: int, *, size: int = 0, linkname: str = "", mtime: float
    ) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.size, info.linkname = kind, mode, size, linkname
        info.uid = info.gid = 0
        info.uname = info.gname = ""
        info.mtime = min(int(mtime), self.epoch)
        if name <= self._last:
            self._in_order = False
        self._last = name
        return info

    def _check(self, name: str, linkname: str = "") -> None:
        _check_name(self.root, name, linkname)

    def _parents(self, name: str) -> None:
        for parent in ancestors(name):
            kind = self._seen.get(parent)
            if kind is None:
                self._directory(parent)
            elif kind != "dir":
                raise BadInputError(f"/{name} in one layer under /{parent}, which is not a folder")

    def _directory(self, name: str) -> None:
        mode, mtime = self._dir_meta.get(name, (0o755, self.epoch))
        self._seen[name] = "dir"
        self._tar.addfile(self._info(name, tarfile.DIRTYPE, mode, mtime=mtime))

    def directory(self, name: str) -> None:
        """A directory (and its ancestors), once."""
        self._check(name)
        if name not in self._seen:
            self._parents(name)
            self._directory(name)
        elif self._seen[name] != "dir":
            raise BadInputError(f"/{name} is a folder and a file in one layer")

    def symlink(self, name: str, target: str, *, mtime: float | None = None) -> None:
        """A symbolic link (the venv's `bin/python`)."""
        self._check(name, target)
        if name in self._seen:
            raise BadInputError(f"two entries at {name} in one layer")
        self._parents(name)
        self._seen[name] = ""
        info = self._info(
            name,
            tarfile.SYMTYPE,
            0o777,
            linkname=target,
            mtime=self.epoch if mtime is None else mtime,
        )
        self._tar.addfile(info)

    def file(
        self,
        name: str,
        data: IO[bytes],
        size: int,
        *,
        mode: int = 0o644,
        sha256: str = "",
        mtime: float | None = None,
    ) -> bool:
        """A regular file of `size` bytes from `data`; False when the same file is there already."""
        self._check(name)
        if name in self._seen:
            if sha256 and self._seen[name] == sha256:
                return False
            raise BadInputError(f"two different entries at /{name} in one layer")
        self._parents(name)
        self._seen[name] = sha256 or "-"
        info = self._info(
            name, tarfile.REGTYPE, mode, size=size, mtime=self.epoch if mtime is None else mtime
        )
        self._tar.addfile(info, data)
        return True

    def close(self) -> Layer:
        """Finish the tar (put in sorted order if it was not written so); the layer it is."""
        self._tar.close()
        self._raw.close()
        if self._in_order:
            return Layer(f"sha256:{self._sink.hexdigest()}", self.path, self._sink.size)
        unsorted = self._unsorted_path()
        self.path.replace(unsorted)
        try:
            diff_id = write_normalized_layer(unsorted, self.path, source_date_epoch=self.epoch)
        except BaseException:
            self.path.unlink(missing_ok=True)
            raise
        finally:
            unsorted.unlink(missing_ok=True)
        return Layer(diff_id, self.path, self.path.stat().st_size)

    def abort(self) -> None:
        """Drop a half-written layer."""
        try:
            with contextlib.suppress(OSError, ValueError, tarfile.TarError):
                self._tar.close()
            with contextlib.suppress(OSError):  # a full disk fails the flush once more
                self._raw.close()
        finally:
            self.path.unlink(missing_ok=True)
            self._unsorted_path().unlink(missing_ok=True)

    def _unsorted_path(self) -> Path:
        return self.path.with_name(self.path.name + ".unsorted")


@dataclass(frozen=True)
class _Planned:
    """An entry of a `LayerIndex`: "dir", "link" (to `target`) or "file" (`size` bytes)."""

    kind: str
    mode: int = 0o755
    size: int = 0
    target: str = ""
    sha256: str = ""
    opener: Opener | None = None


class LayerIndex:
    """A layer's entries, each named with where its bytes are, written in one sorted pass.

    The same rules as `LayerWriter`'s: every name under `root`; a second entry at a path is
    skipped when it is a directory or the same file (the same sha256), refused when it differs.
    No bytes are held here beyond what the openers hold.
    """

    def __init__(self, root: str) -> None:
        self.root = root
        self._entries: dict[str, _Planned] = {}

    def directory(self, name: str) -> None:
        """A directory (its ancestors come with it when the layer is written)."""
        _check_name(self.root, name)
        found = self._entries.setdefault(name, _Planned("dir"))
        if found.kind != "dir":
            raise BadInputError(f"/{name} is a folder and a file in one layer")

    def symlink(self, name: str, target: str) -> None:
        """A symbolic link (the venv's `bin/python`)."""
        _check_name(self.root, name, target)
        if name in self._entries:
            raise BadInputError(f"two entries at {name} in one layer")
        self._entries[name] = _Planned("link", 0o777, target=target)

    def file(
        self, name: str, opener: Opener, size: int, *, mode: int = 0o644, sha256: str = ""
    ) -> bool:
        """A regular file of `size` bytes, read from `opener()` when the layer is written;
        False when the same file is there already."""
        _check_name(self.root, name)
        found = self._entries.get(name)
        if found is not None:
            if sha256 and found.kind == "file" and found.sha256 == sha256:
                return False
            raise BadInputError(f"two different entries at /{name} in one layer")
        self._entries[name] = _Planned("file", mode, size, sha256=sha256, opener=opener)
        return True

    def write(self, path: Path, epoch: int) -> Layer:
        """The layer, written to `path` in the normaliser's order: each folder that holds an
        entry, as `LayerWriter` makes it, sorted in among the entries."""
        names = set(self._entries)
        for name in self._entries:
            names.update(parent for parent in ancestors(name) if _under(self.root, parent))
        writer = LayerWriter(path, epoch, root=self.root)
        try:
            for name in sorted(names):
                entry = self._entries.get(name, _Planned("dir"))
                if entry.kind == "dir":
                    writer.directory(name)
                elif entry.kind == "link":
                    writer.symlink(name, entry.target)
                else:
                    assert entry.opener is not None
                    with entry.opener() as data:
                        writer.file(name, data, entry.size, mode=entry.mode, sha256=entry.sha256)
            return writer.close()
        except BaseException:
            writer.abort()
            raise


def _header(name: str, size: int, epoch: int) -> bytes:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = size, epoch, 0o644
    return info.tobuf(format=tarfile.PAX_FORMAT)


def _pad(size: int) -> bytes:
    return b"\0" * (-size % 512)


def _file_chunks(path: Path) -> Iterator[bytes]:
    with path.open("rb") as data:
        while chunk := data.read(CHUNK):
            yield chunk


def archive_stream(
    layers: Sequence[tuple[str, Path | None, int]],
    config: bytes,
    epoch: int,
) -> Iterator[bytes]:
    """A docker-archive of one image, as chunks: the layers that have a file, config, manifest.

    `layers` are (diff ID, layer file or None where the engine holds it, size), bottom first.
    """
    config_hex = hashlib.sha256(config).hexdigest()
    sent: set[str] = set()
    for diff_id, path, size in layers:
        if path is None or diff_id in sent:
            continue
        sent.add(diff_id)
        yield _header(f"{diff_id.removeprefix('sha256:')}/layer.tar", size, epoch)
        yield from _file_chunks(path)
        yield _pad(size)
    manifest = [
        {
            "Config": f"{config_hex}.json",
            "Layers": [f"{d.removeprefix('sha256:')}/layer.tar" for d, _, _ in layers],
            "RepoTags": None,
        }
    ]
    blob = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    for name, data in ((f"{config_hex}.json", config), ("manifest.json", blob)):
        yield _header(name, len(data), epoch)
        yield data
        yield _pad(len(data))
    yield b"\0" * 1024


def tar_stream(entries: Iterable[tuple[str, Path]], epoch: int) -> Iterator[bytes]:
    """A tar (for putting files into a container) of (name, file) entries, 0644, parents first."""
    done: set[str] = set()
    for name, path in entries:
        for parent in ancestors(name):
            if parent not in done:
                done.add(parent)
                info = tarfile.TarInfo(parent)
                info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, epoch
                yield info.tobuf(format=tarfile.PAX_FORMAT)
        size = path.stat().st_size
        yield _header(name, size, epoch)
        yield from _file_chunks(path)
        yield _pad(size)
    yield b"\0" * 1024
