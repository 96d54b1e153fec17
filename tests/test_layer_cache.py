"""The assemble route's layer cache: hits, and the bound that keeps it from filling the disk."""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

import pytest

from reprobox.errors import BadInputError
from reprobox.layer_cache import (
    DEFAULT_LIMIT_BYTES,
    IN_USE_S,
    STALE_PARTIAL_S,
    LayerCache,
    Pruned,
    limit_from_env,
)
from reprobox.layer_tar import Layer

NOW = time.time()
HOUR = 3600.0


def _put(cache: LayerCache, key: str, size: int, used_at: float) -> Layer:
    scratch = cache.scratch(key)
    scratch.write_bytes(b"\0" * size)
    kept = cache.put(key, Layer(f"sha256:{key:0>64}", scratch, size))
    os.utime(kept.path, (used_at, used_at))
    return kept


def test_a_kept_layer_is_found_by_its_key_and_a_damaged_one_is_not(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "layers", enabled=True)
    kept = _put(cache, "a", 1000, NOW - 5 * HOUR)
    found = cache.get("a")
    assert found == kept
    assert kept.path.stat().st_mtime > NOW - HOUR, "a hit marks the entry used"
    kept.path.write_bytes(b"short")
    assert cache.get("a") is None, "a tar of another size is no entry"
    assert cache.get("missing") is None
    assert LayerCache(tmp_path / "layers", enabled=False).get("a") is None, "--no-cache"


def test_the_least_recently_used_go_first_until_the_bound_holds(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "layers", enabled=True)
    oldest = _put(cache, "1", 400, NOW - 30 * HOUR)
    older = _put(cache, "2", 300, NOW - 20 * HOUR)
    old = _put(cache, "3", 200, NOW - 10 * HOUR)
    pruned = cache.prune(300, in_use=[], now=NOW)
    assert (pruned.entries, pruned.freed, pruned.kept) == (2, 700, 200)
    assert not oldest.path.exists()
    assert not oldest.path.with_suffix(".json").exists()
    assert not older.path.exists()
    assert cache.get("3") == old
    nothing = cache.prune(300, in_use=[], now=NOW)
    assert (nothing.entries, nothing.kept) == (0, 200), "under the bound: nothing goes"


def test_layers_in_use_or_used_within_the_hour_stay_over_the_bound(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "layers", enabled=True)
    mine = _put(cache, "mine", 500, NOW - 50 * HOUR)
    recent = _put(cache, "recent", 500, NOW - IN_USE_S / 2)
    stale = _put(cache, "stale", 500, NOW - IN_USE_S * 2)
    pruned = cache.prune(0, in_use=[mine.path], now=NOW)
    assert pruned.entries == 1
    assert pruned.kept == 1000
    assert mine.path.exists()
    assert recent.path.exists()
    assert not stale.path.exists()


def test_partial_files_of_builds_that_are_gone_are_removed(tmp_path: Path) -> None:
    cache = LayerCache(tmp_path / "layers", enabled=True)
    layers = tmp_path / "layers"
    gone, writing = layers / ".torch.1-abc.partial", cache.scratch("torch")
    hook_part, work = layers / ".hook.1-abc.part", layers / "pylayer-x1"
    work.mkdir()
    (work / "sources.tar").write_bytes(b"x")
    for path, age in (
        (gone, STALE_PARTIAL_S + HOUR),
        (writing, 60.0),
        (hook_part, STALE_PARTIAL_S + HOUR),
    ):
        path.write_bytes(b"x")
        os.utime(path, (NOW - age, NOW - age))
    os.utime(work, (NOW - STALE_PARTIAL_S - HOUR,) * 2)
    cache.prune(DEFAULT_LIMIT_BYTES, in_use=[], now=NOW)
    assert not gone.exists()
    assert not hook_part.exists()
    assert not work.exists()
    assert writing.exists(), "a build may be writing it now"
    assert cache.scratch("torch") != writing, "two writers never share a partial file"


@pytest.mark.parametrize(
    ("raw", "limit"),
    [(None, DEFAULT_LIMIT_BYTES), ("", DEFAULT_LIMIT_BYTES), ("0", 0), ("1.5", 1_500_000_000)],
)
def test_the_bound_comes_from_the_environment(raw: str | None, limit: int) -> None:
    environ = {} if raw is None else {"REPROBOX_ASSEMBLE_CACHE_GB": raw}
    assert limit_from_env(environ) == limit


@pytest.mark.parametrize("raw", ["-1", "ten", "nan", "inf", "1e400", "1e300", "20GB"])
def test_a_bound_that_is_not_a_size_is_bad_input(raw: str) -> None:
    with pytest.raises(BadInputError, match="REPROBOX_ASSEMBLE_CACHE_GB"):
        limit_from_env({"REPROBOX_ASSEMBLE_CACHE_GB": raw})


def test_an_entry_another_build_finds_while_prune_waits_is_kept(tmp_path: Path) -> None:
    """prune takes the folder's lock exclusively and looks at each entry's time under it."""
    cache = LayerCache(tmp_path / "layers", enabled=True)
    entry = _put(cache, "a", 100, NOW - 5 * HOUR)
    results: list[Pruned] = []
    with cache._locked(fcntl.LOCK_SH):  # another build between its lookup and its mark
        pruning = threading.Thread(target=lambda: results.append(cache.prune(0, in_use=[])))
        pruning.start()
        time.sleep(0.3)
        assert pruning.is_alive(), "prune waits for the reader"
        assert cache.get("a") == entry
    pruning.join(timeout=10)
    assert results[0].entries == 0
    assert entry.path.exists()
