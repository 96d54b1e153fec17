"""Layer tars written by reprobox itself, and the image archive streamed from them.

A layer comes out as the normaliser (`archive.write_normalized_layer`) writes the recipe's
layers: entries sorted by name, owner 0:0 with blank names, mtime at or below SOURCE_DATE_EPOCH,
no atime or ctime, PAX format, so that the same entries give the same bytes on either route. A
layer whose entries were added in that order is written once and hashed while it is written; one
added in another order (pypa/installer's, with the pycs last) is put in order by one more pass
of the normaliser itself. The image archive is never written to disk: `archive_stream` yields it
as chunks for the engine's load endpoint.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import stat
import tarfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from reprobox._files import CHUNK, HashingWriter
from reprobox.archive import write_normalized_layer
from reprobox.errors import BadInputError

__all__ = ["Layer", "LayerWriter", "ancestors", "archive_stream", "installed_mode", "tar_stream"]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


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


def installed_mode(st_mode: int) -> int:
    """What an installer run with umask 022 makes: 0755 for directories and executables."""
    return 0o755 if stat.S_ISDIR(st_mode) or st_mode & 0o111 else 0o644


class _Counter(HashingWriter):
    def __init__(self, raw: IO[bytes]) -> None:
        super().__init__(raw)
        self.size = 0

    def write(self, data: bytes) -> int:
        self.size += len(data)
        return super().write(data)


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
        self._sink = _Counter(self._raw)
        self._tar = tarfile.open(fileobj=self._sink, mode="w|", format=tarfile.PAX_FORMAT)  # type: ignore[call-overload]  # noqa: SIM115
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
        outside = self.root and name != self.root and not name.startswith(self.root + "/")
        if outside or any(part in {"", ".", ".."} for part in name.split("/")):
            raise BadInputError(f"a layer entry {name!r} lies outside /{self.root}")
        # Every name here comes from a wheel or an engine's answer: none may hold a newline
        # (a line of the compile list, a header a reader splits) or another control character.
        if _CONTROL.search(name) or _CONTROL.search(linkname):
            raise BadInputError(
                f"a layer entry {name!r:.200} {linkname!r:.200} holds a control character"
            )

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
        with contextlib.suppress(OSError, ValueError, tarfile.TarError):
            self._tar.close()
        self._raw.close()
        self.path.unlink(missing_ok=True)
        self._unsorted_path().unlink(missing_ok=True)

    def _unsorted_path(self) -> Path:
        return self.path.with_name(self.path.name + ".unsorted")


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
