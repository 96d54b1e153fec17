"""The assemble route's layer cache: layer tars kept by the hash of their inputs, and its bound.

Each entry is `<key>.tar` and `<key>.json` (diff ID, size) under `<cache>/assemble/layers`. A
hit or a write marks the entry used (its mtime). After each assembled build the least recently
used entries go until the folder holds at most the limit: `REPROBOX_ASSEMBLE_CACHE_GB`
(default 20, gigabytes of 10^9 bytes; 0 keeps only what is in use). An entry used in the last
hour is never removed, since another build may be about to load it, nor one this build uses
(so 0 keeps this build's layers and those used in the last hour). Partial files and work
folders of builds that are gone (a day old) go too.

Builds share the folder: `get` and `put` hold a shared lock (`.lock`) while they look up and mark
an entry, `prune` an exclusive one, and it looks at each entry's time again under the lock, so an
entry a build has just found is never removed under it. An entry it cannot remove (another
user's) is left.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import math
import os
import shutil
import time
import uuid
from collections.abc import Collection, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from reprobox._files import write_text_atomic
from reprobox.errors import BadInputError
from reprobox.layer_tar import Layer

__all__ = [
    "DEFAULT_LIMIT_BYTES",
    "IN_USE_S",
    "LIMIT_ENV",
    "STALE_PARTIAL_S",
    "LayerCache",
    "Pruned",
    "limit_from_env",
]

DEFAULT_LIMIT_BYTES = 20 * 10**9
LIMIT_ENV = "REPROBOX_ASSEMBLE_CACHE_GB"
#: An entry used this recently may be loaded by another build now: never pruned.
IN_USE_S = 3600.0
#: A partial file this old belongs to a build that is gone.
STALE_PARTIAL_S = 86400.0


@dataclass(frozen=True)
class Pruned:
    """What a prune removed, and what the cache holds after it."""

    entries: int
    freed: int
    kept: int


def limit_from_env(environ: Mapping[str, str]) -> int:
    """The cache's bound in bytes, from `REPROBOX_ASSEMBLE_CACHE_GB`; BadInputError if it is
    not a number of gigabytes, zero or more."""
    raw = environ.get(LIMIT_ENV)
    if raw is None or raw == "":
        return DEFAULT_LIMIT_BYTES
    try:
        limit = float(raw) * 10**9
    except ValueError:
        limit = math.nan
    if not math.isfinite(limit) or limit < 0:
        raise BadInputError(
            f"{LIMIT_ENV}={raw!r} is not a size in gigabytes",
            hint=f"set it to a number, 0 or more (default {DEFAULT_LIMIT_BYTES // 10**9})",
        )
    return int(limit)


class LayerCache:
    """Layer files by the hash of their inputs: `<key>.tar` and `<key>.json` (diff ID, size)."""

    def __init__(self, root: Path, *, enabled: bool) -> None:
        self.root, self.enabled = root, enabled
        root.mkdir(parents=True, exist_ok=True)

    @contextlib.contextmanager
    def _locked(self, kind: int) -> Iterator[None]:
        with (self.root / ".lock").open("a") as handle:
            fcntl.flock(handle, kind)
            yield

    def get(self, key: str) -> Layer | None:
        """The kept layer for `key`, marked used; None when there is none (or it is damaged)."""
        if not self.enabled:
            return None
        with self._locked(fcntl.LOCK_SH):
            try:
                meta = json.loads((self.root / f"{key}.json").read_text(encoding="utf-8"))
                layer = Layer(str(meta["diff_id"]), self.root / f"{key}.tar", int(meta["size"]))
                if layer.path.stat().st_size != layer.size:
                    return None
            except (OSError, ValueError, KeyError, TypeError):
                return None
            _touch(layer.path)
        return layer

    def put(self, key: str, layer: Layer) -> Layer:
        """Keep `layer` (a file in this folder, made by `scratch`) as `key`'s."""
        kept = Layer(layer.diff_id, self.root / f"{key}.tar", layer.size)
        with self._locked(fcntl.LOCK_SH):
            layer.path.replace(kept.path)
            _touch(kept.path)
            write_text_atomic(
                self.root / f"{key}.json",
                json.dumps({"diff_id": layer.diff_id, "size": layer.size}),
            )
        return kept

    def scratch(self, name: str) -> Path:
        """Where this process writes a layer before `put` keeps it (a name no other process,
        in this container or another sharing the folder, uses)."""
        return self.root / f".{name}.{os.getpid()}-{uuid.uuid4().hex[:12]}.partial"

    def prune(self, limit: int, in_use: Collection[Path], now: float | None = None) -> Pruned:
        """Remove least recently used entries until at most `limit` bytes are kept; never one
        in `in_use` (layer files) or one used in the last hour. Stale partial files go too."""
        now = time.time() if now is None else now
        with self._locked(fcntl.LOCK_EX):
            self._remove_stale_partials(now)
            entries: list[tuple[float, int, Path]] = []
            for tar in self.root.glob("*.tar"):
                with contextlib.suppress(OSError):
                    stat = tar.stat()
                    entries.append((stat.st_mtime, stat.st_size, tar))
            total = sum(size for _, size, _ in entries)
            keep = {path.resolve() for path in in_use}
            removed = freed = 0
            for _, size, tar in sorted(entries, key=lambda e: (e[0], e[2].name)):
                if total <= limit:
                    break
                if tar.resolve() in keep or not self._unused(tar, now):
                    continue
                try:
                    # The description first: a reader finds no entry, not half of one.
                    tar.with_suffix(".json").unlink(missing_ok=True)
                    tar.unlink(missing_ok=True)
                except OSError:
                    continue  # another user's: left as it is
                total -= size
                removed += 1
                freed += size
        return Pruned(removed, freed, total)

    @staticmethod
    def _unused(tar: Path, now: float) -> bool:
        try:
            return now - tar.stat().st_mtime >= IN_USE_S
        except OSError:
            return False

    def _remove_stale_partials(self, now: float) -> None:
        """Layers being written (`.NAME.*.partial`) and `pylayer-*` work folders a day old."""
        for path in [
            *self.root.glob(".*.partial"),
            *self.root.glob(".*.part"),
            *self.root.glob("pylayer-*"),
        ]:
            with contextlib.suppress(OSError):
                if now - path.stat().st_mtime <= STALE_PARTIAL_S:
                    continue
                if path.is_dir():
                    shutil.rmtree(path)
                else:
                    path.unlink()


def _touch(path: Path) -> None:
    """Mark an entry used; best effort (another user's file keeps its time)."""
    with contextlib.suppress(OSError):
        os.utime(path)
