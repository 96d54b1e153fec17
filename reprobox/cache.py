"""The wheel cache: content-addressed by sha256, verified on the way in and again before use.

Files live at `<root>/wheels/sha256/<2 hex>/<64 hex>`, read-only. A download goes to a temp
file in the same folder and is renamed into place only once its sha256 matches, so two
processes fetching at once never leave a partial or wrong file under a hash's name. Every
fetch hashes each cached file in full before handing it out, in parallel threads (measured on
a 2-core machine: 0.4 s for the 190 MB CPU torch wheel, 3.1 s for the CUDA example's 3 GB):
a size check would miss a changed byte, and a changed byte is what tampering looks like.

A download reads the bytes as sent (requests, no content decoding, timeouts) and stops at the
size the lock records, or at MAX_DOWNLOAD_BYTES where it records none, so an endless stream
ends in exit 2. Workers are daemon threads that check a stop event between chunks; the main
thread waits in short slices, so Ctrl-C stops a fetch within about two seconds, even one stuck
on a silent server, and partial files are deleted.
"""

from __future__ import annotations

import hashlib
import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO
from urllib.parse import unquote, urlsplit

import requests

from reprobox import __version__
from reprobox._files import CHUNK, atomic_path, place, sha256_hex
from reprobox._text import unsafe_character
from reprobox.context import Context, usable_cache_dir
from reprobox.errors import IndexUnreachableError, LockError
from reprobox.locked import Lock, LockedWheel

__all__ = [
    "MAX_DOWNLOAD_BYTES",
    "TransferProgress",
    "WheelCache",
    "fetch",
    "fetch_locked",
    "materialize",
]

#: Called as bytes move: (label of the file, bytes done, total bytes or None). May be called
#: from worker threads, but never from two at once.
TransferProgress = Callable[[str, int, int | None], None]

#: Where the lock records no size, a download stops here: twice the largest wheel a torch
#: image needs today (nvidia-cudnn-cu12, about 0.7 GB; torch's CUDA builds, 0.9 to 2.5 GB).
MAX_DOWNLOAD_BYTES = 8 << 30
_WORKERS = 4
# (connect, read): a server that sends nothing for a minute is given up on.
_TIMEOUT_S = (15.0, 60.0)
# After Ctrl-C, how long the main thread waits for workers to delete their partial files.
_GRACE_S = 2.0


class _StoppedError(Exception):
    """A worker saw the stop event (Ctrl-C, or another worker failed) between two chunks."""


def _verify_setting() -> str | bool:
    """pip's CA bundle where one is set (PIP_CERT); else requests' (honours REQUESTS_CA_BUNDLE)."""
    return os.environ.get("PIP_CERT") or True


def _too_large(wheel: LockedWheel, limit: int) -> LockError:
    recorded = "the size the lock records" if wheel.size is not None else "reprobox's limit"
    return LockError(
        f"{wheel.url} serves more than {limit} bytes ({recorded}) for {wheel.filename}; the "
        "download was stopped and nothing was cached",
        hint="the index serves another file than the lock pins: check the index, and relock "
        "(`--relock`) only if you trust it",
    )


@contextmanager
def _open(wheel: LockedWheel, limit: int) -> Iterator[tuple[Iterator[bytes], int | None]]:
    """The raw bytes of the wheel's URL (http, https or file) in chunks, and the size if known."""
    if unsafe_character(wheel.url) is not None or len(wheel.url) > 4096:
        raise LockError(
            f"the lock names a URL for {wheel.filename[:120]!r} that holds a control character "
            f"or is too long: {wheel.url[:200]!r}",
            hint="write the lock again with `reprobox lock --relock SPEC`",
        )
    parts = urlsplit(wheel.url)
    if parts.scheme == "file":
        path = Path(unquote(parts.path))
        with path.open("rb") as handle:
            size = os.fstat(handle.fileno()).st_size
            if size > limit:
                raise _too_large(wheel, limit)
            yield iter(lambda: handle.read(CHUNK), b""), size
        return
    if parts.scheme not in {"http", "https"}:
        raise LockError(f"cannot fetch {wheel.url}: only http, https and file URLs are supported")
    headers = {"User-Agent": f"reprobox/{__version__}", "Accept-Encoding": "identity"}
    with requests.get(
        wheel.url, headers=headers, stream=True, timeout=_TIMEOUT_S, verify=_verify_setting()
    ) as response:
        if response.status_code >= 400:
            raise LockError(
                f"cannot fetch {wheel.filename}: {wheel.url} answered {response.status_code} "
                f"{response.reason}",
                hint="the index no longer serves this file: relock with --relock",
            )
        length = response.headers.get("Content-Length", "")
        total = int(length) if length.isdecimal() else None
        if total is not None and total > limit:
            raise _too_large(wheel, limit)
        # The bytes as sent (no gzip decoding): what the lock's sha256 is taken over.
        yield response.raw.stream(CHUNK, decode_content=False), total


def _sha256(path: Path, on_bytes: Callable[[int], None], stop: threading.Event) -> str:
    def step(done: int) -> None:
        if stop.is_set():
            raise _StoppedError
        on_bytes(done)

    with path.open("rb") as handle:
        return sha256_hex(handle, step)


class WheelCache:
    """A content-addressed store of wheel files under `root`."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        self._partials: set[Path] = set()

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
        unless `refetch` asks to replace it. The first failure stops the other downloads; so
        does Ctrl-C, promptly, leaving no partial file behind.
        """
        usable_cache_dir(self.root)
        unique = list({w.sha256: w for w in wheels}.values())
        count = len(unique)
        report = self._serialized(progress)
        todo: queue.SimpleQueue[tuple[int, LockedWheel]] = queue.SimpleQueue()
        for item in enumerate(unique, 1):
            todo.put(item)
        stop = threading.Event()
        done: dict[str, Path] = {}
        errors: list[BaseException] = []

        def work() -> None:
            while not stop.is_set():
                try:
                    index, wheel = todo.get_nowait()
                except queue.Empty:
                    return
                label = f"({index}/{count}) {wheel.filename}"
                try:
                    done[wheel.sha256] = self._ensure(wheel, label, report, refetch, stop)
                except _StoppedError:
                    return
                except BaseException as err:
                    errors.append(err)
                    stop.set()
                    return

        # Daemon threads, waited for in short slices: the main thread stays interruptible, and a
        # worker stuck in a socket read cannot keep the process alive after Ctrl-C.
        threads = [
            threading.Thread(target=work, name=f"reprobox-fetch-{n}", daemon=True)
            for n in range(max(1, min(_WORKERS, count)))
        ]
        for thread in threads:
            thread.start()
        try:
            for thread in threads:
                while thread.is_alive():
                    thread.join(0.1)
        except KeyboardInterrupt:
            stop.set()
            for thread in threads:
                thread.join(_GRACE_S / len(threads))
            with self._lock:
                for partial in self._partials:
                    partial.unlink(missing_ok=True)
            raise
        if errors:
            raise errors[0]
        return {wheel.sha256: done[wheel.sha256] for wheel in unique}

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
            place(files[wheel.sha256], target)
            placed.append(target)
        return tuple(placed)

    def _serialized(self, progress: TransferProgress | None) -> TransferProgress:
        def report(label: str, done: int, total: int | None) -> None:
            if progress is not None:
                with self._lock:
                    progress(label, done, total)

        return report

    def _ensure(
        self,
        wheel: LockedWheel,
        label: str,
        report: TransferProgress,
        refetch: bool,
        stop: threading.Event,
    ) -> Path:
        path = self.path(wheel.sha256)
        if path.exists():
            size = path.stat().st_size
            actual = _sha256(path, lambda done: report(f"{label} (verify)", done, size), stop)
            if actual == wheel.sha256:
                return path
            if not refetch:
                raise LockError(
                    f"the cached {wheel.filename} at {path} is corrupt or was changed: its sha256 is "
                    f"{actual} ({size} bytes), the lock says {wheel.sha256}; it was not used",
                    hint="fetch it again with --refetch (or delete that file)",
                )
            path.unlink()
        self._download(wheel, path, label, report, stop)
        return path

    def _download(
        self,
        wheel: LockedWheel,
        path: Path,
        label: str,
        report: TransferProgress,
        stop: threading.Event,
    ) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(path, fsync=True) as tmp:
            with self._lock:
                self._partials.add(tmp)
            try:
                with tmp.open("wb") as out:
                    actual, size = _copy(wheel, out, label, report, stop)
                if actual != wheel.sha256:
                    raise LockError(
                        f"{wheel.url} served a file whose sha256 is {actual} ({size} bytes), not "
                        f"the {wheel.sha256} the lock pins for {wheel.filename}; it was not cached",
                        hint="the index changed or the transfer was tampered with: check the "
                        "index, and relock (`--relock`) only if you trust the new file",
                    )
                tmp.chmod(0o444)
            finally:
                with self._lock:
                    self._partials.discard(tmp)


def _copy(
    wheel: LockedWheel,
    out: BinaryIO,
    label: str,
    report: TransferProgress,
    stop: threading.Event,
) -> tuple[str, int]:
    """Stream the wheel's URL into `out`, hashing on the way, up to its size; (sha256, size)."""
    limit = wheel.size if wheel.size is not None else MAX_DOWNLOAD_BYTES
    digest = hashlib.sha256()
    done = 0
    try:
        with _open(wheel, limit) as (chunks, total):
            report(label, 0, total)
            for chunk in chunks:
                if stop.is_set():
                    raise _StoppedError
                done += len(chunk)
                if done > limit:
                    raise _too_large(wheel, limit)
                out.write(chunk)
                digest.update(chunk)
                report(label, done, total)
    except (requests.RequestException, OSError) as exc:
        raise IndexUnreachableError(
            f"cannot fetch {wheel.filename} from {wheel.url}: {_reason(exc)}",
            hint="check the network (or that the file:// path still exists), then run again",
        ) from exc
    return digest.hexdigest(), done


def _reason(exc: BaseException) -> str:
    """The innermost cause's message: what the network said, without urllib3's wrapping."""
    while exc.__context__ is not None and isinstance(exc, requests.RequestException):
        exc = exc.__context__
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc)
    return text if len(text) < 300 else text[:297] + "..."


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
    root: Path,
    progress: TransferProgress | None = None,
    refetch: bool = False,
) -> Mapping[str, Path]:
    """`WheelCache(root).fetch(...)`: every wheel cached and verified, `{sha256: path}`."""
    return WheelCache(root).fetch(wheels, progress=progress, refetch=refetch)


def materialize(
    wheels: Sequence[LockedWheel],
    dest_dir: Path,
    *,
    root: Path,
    progress: TransferProgress | None = None,
    refetch: bool = False,
) -> tuple[Path, ...]:
    """`WheelCache(root).materialize(...)`: verified wheels in `dest_dir` under their file names."""
    return WheelCache(root).materialize(wheels, dest_dir, progress=progress, refetch=refetch)


def fetch_locked(ctx: Context, lock: Lock, *, refetch: bool = False) -> dict[str, Path]:
    """The fetch stage: every wheel of `lock` in the context's cache, verified, `{sha256: path}`."""
    cache = WheelCache(ctx.cache.root)
    with ctx.reporter.stage(f"fetch and verify {len(lock.wheels)} wheels into {cache.root}"):
        return cache.fetch(lock.wheels, progress=ctx.reporter.transfer, refetch=refetch)
