"""The file helpers every stage shares: atomic writes, streaming sha256, and fixed times.

A reader of a file reprobox writes sees the old file or the new one, never half of it; a hash is
taken in chunks, never by reading a file whole; every time an image carries is an epoch written
the one way image configs write it.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Protocol

__all__ = [
    "CHUNK",
    "HashingWriter",
    "atomic_path",
    "place",
    "rfc3339",
    "sha256_hex",
    "write_text_atomic",
]

#: How much of a file is read or hashed at a time.
CHUNK = 1 << 20


class _Reader(Protocol):
    def read(self, size: int = -1, /) -> bytes: ...


@contextmanager
def atomic_path(dest: Path, *, fsync: bool = False) -> Iterator[Path]:
    """A new temporary file beside `dest` that replaces `dest` only when the block finishes.

    The name is unique, so concurrent writers of one `dest` never share a temporary file; on
    any error (Ctrl-C included) it is deleted and `dest` is left as it was. `fsync` flushes
    the data to disk before the rename, for large files that must survive a crash whole.
    """
    fd, name = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".partial", dir=dest.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with tmp.open("rb") as handle:
                os.fsync(handle.fileno())
        tmp.replace(dest)
    finally:
        tmp.unlink(missing_ok=True)


def write_text_atomic(dest: Path, text: str) -> None:
    """Write `text` (UTF-8, `\\n` line ends) to `dest` atomically, making its folder if needed."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8", newline="\n")


def place(source: Path, target: Path) -> None:
    """`target` becomes what `source` holds, atomically: a hard link where possible (same
    filesystem, so no bytes are copied), else a copy with its mode."""
    if target.exists() and target.samefile(source):
        return
    with atomic_path(target) as tmp:
        tmp.unlink()  # a link needs the name free
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
            shutil.copymode(source, tmp)  # as a link would: not the umask's


def sha256_hex(stream: _Reader, on_chunk: Callable[[int], None] | None = None) -> str:
    """The sha256 of what `stream` holds, read in chunks; `on_chunk` hears the bytes so far
    (and may raise to stop)."""
    digest = hashlib.sha256()
    done = 0
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
        done += len(chunk)
        if on_chunk is not None:
            on_chunk(done)
    return digest.hexdigest()


class HashingWriter:
    """A write-only file that hashes and counts what passes through it (a tar's diff ID as it
    is written). It says where it is (`tell`), so that a tarfile writes to it directly, not
    through its own stream buffer (a copy in 10 KB pieces)."""

    def __init__(self, raw: IO[bytes]) -> None:
        self._raw = raw
        self._digest = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes) -> int:
        self._digest.update(data)
        self.size += len(data)
        return self._raw.write(data)

    def tell(self) -> int:
        return self.size

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def rfc3339(epoch: int) -> str:
    """`epoch` as the UTC time an image config carries, e.g. 2023-06-10T00:00:00Z."""
    return datetime.fromtimestamp(epoch, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
