"""The assemble route's layer cache: layer tars kept by the hash of their inputs, and its bound.

Each entry is `<key>.tar` and `<key>.json` (diff ID, size) under `<cache>/assemble/layers`. A
hit or a write marks the entry used (its mtime). After each assembled build the least recently
used entries go until the folder holds at most the limit: `REPROBOX_ASSEMBLE_CACHE_GB`
(default 20, gigabytes of 10^9 bytes; 0 keeps only what is in use). An entry used in the last
hour is never removed, since another build may be about to load it, nor one this build uses.
Partial files of builds that are gone (a day old) go too.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from pathlib import Path

from reprobox._files import write_text_atomic
from reprobox.errors import BadInputError
from reprobox.layer_tar import Layer

__all__ = ["DEFAULT_LIMIT_BYTES", "LayerCache", "Pruned", "limit_from_env"]

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
        gigabytes = float(raw)
    except ValueError:
        gigabytes = math.nan
    if not math.isfinite(gigabytes) or gigabytes < 0:
        raise BadInputError(
            f"{LIMIT_ENV}={raw!r} is not a size in gigabytes",
            hint=f"set it to a number, 0 or more (default {DEFAULT_LIMIT_BYTES // 10**9})",
        )
    return int(gigabytes * 10**9)


class LayerCache:
    """Layer files by the hash of their inputs: `<key>.tar` and `<key>.json` (diff ID, size)."""

    def __init__(self, root: Path, *, enabled: bool) -> None:
        self.root, self.enabled = root, enabled
        root.mkdir(parents=True, exist_ok=True)

    def get(self, key: str) -> Layer | None:
        """The kept layer for `key`, marked used; None when there is none (or it is damaged)."""
        if not self.enabled:
            return None
        try:
            meta = json.loads((self.root / f"{key}.json").read_text(encoding="utf-8"))
            layer = Layer(str(meta["diff_id"]), self.root / f"{key}.tar", int(meta["size"]))
            if layer.path.stat().st_size != layer.size:
                return None
            _touch(layer.path)
        except (OSError, ValueError, KeyError, TypeError):
            return None
        return layer

    def put(self, key: str, layer: Layer) -> Layer:
        """Keep `layer` (a file in this folder, made by `scratch`) as `key`'s."""
        kept = Layer(layer.diff_id, self.root / f"{key}.tar", layer.size)
        layer.path.replace(kept.path)
        _touch(kept.path)
        write_text_atomic(
            self.root / f"{key}.json", json.dumps({"diff_id": layer.diff_id, "size": layer.size})
        )
        return kept

    def scratch(self, name: str) -> Path:
        """Where this process writes a layer before `put` keeps it."""
        return self.root / f".{name}.{os.getpid()}.partial"

    def prune(self, limit: int, in_use: Collection[Path], now: float | None = None) -> Pruned:
        """Remove least recently used entries until at most `limit` bytes are kept; never one
        in `in_use` (layer files) or one used in the last hour. Stale partial files go too."""
        now = time.time() if now is None else now
        entries: list[tuple[float, int, Path]] = []
        for tar in self.root.glob("*.tar"):
            try:
                stat = tar.stat()
            except FileNotFoundError:
                continue
            entries.append((stat.st_mtime, stat.st_size, tar))
        for partial in self.root.glob(".*.partial"):
            try:
                if now - partial.stat().st_mtime > STALE_PARTIAL_S:
                    partial.unlink()
            except FileNotFoundError:
                continue
        total = sum(size for _, size, _ in entries)
        keep = {path.resolve() for path in in_use}
        removed = freed = 0
        for mtime, size, tar in sorted(entries, key=lambda e: (e[0], e[2].name)):
            if total <= limit:
                break
            if tar.resolve() in keep or now - mtime < IN_USE_S:
                continue
            # The description first: a build that reads it now finds no entry, not half of one.
            tar.with_suffix(".json").unlink(missing_ok=True)
            tar.unlink(missing_ok=True)
            total -= size
            removed += 1
            freed += size
        return Pruned(removed, freed, total)


def _touch(path: Path) -> None:
    os.utime(path)
