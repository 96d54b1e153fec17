"""Times of the lock and fetch stages, for the README and `make bench`.

Prints: locking the CUDA example with an empty pip cache (cold) and again with the same
cache (warm); fetching and verifying the CPU example's wheels into an empty wheel cache and
again from a full one (verification only), and the verify cost of its torch wheel alone.
Needs the network (PyPI, or the indexes pip is configured with on this machine).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

from reprobox.cache import WheelCache
from reprobox.lock import resolve
from reprobox.locked import Lock
from reprobox.spec_load import load_spec

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")


def _timed(label: str, work: Callable[[], T]) -> T:
    started = time.perf_counter()
    result = work()
    print(f"{label:<52} {time.perf_counter() - started:7.2f} s", flush=True)
    return result


def _bench_lock(spec_path: Path) -> None:
    spec = load_spec(spec_path)
    with tempfile.TemporaryDirectory(prefix="reprobox-bench-pip-") as pip_cache:
        os.environ["PIP_CACHE_DIR"] = pip_cache
        try:
            lock = _timed(f"lock {spec_path.name}, cold (empty pip cache)", lambda: resolve(spec))
            _timed(f"lock {spec_path.name}, warm (same pip cache)", lambda: resolve(spec))
        finally:
            del os.environ["PIP_CACHE_DIR"]
    print(f"  {len(lock.wheels)} wheels, torch CUDA {lock.torch_cuda}, cuDNN {lock.torch_cudnn}")


def _bench_fetch(spec_path: Path) -> None:
    lock: Lock = resolve(load_spec(spec_path))
    with tempfile.TemporaryDirectory(prefix="reprobox-bench-cache-") as root:
        cache = WheelCache(Path(root))
        files = _timed(
            f"fetch+verify {spec_path.name}, empty cache", lambda: cache.fetch(lock.wheels)
        )
        size = sum(path.stat().st_size for path in files.values())
        print(f"  {len(files)} wheels, {size / 1e6:.1f} MB")
        _timed(
            f"fetch+verify {spec_path.name}, warm cache (hash only)",
            lambda: cache.fetch(lock.wheels),
        )
        torch = lock.wheel("torch")
        if torch is not None:
            megabytes = files[torch.sha256].stat().st_size / 1e6
            _timed(
                f"verify {torch.filename[:24]}... ({megabytes:.0f} MB)",
                lambda: cache.fetch([torch]),
            )


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmarks; `--skip-cuda` leaves out the CUDA lock."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-cuda", action="store_true", help="do not time the CUDA lock")
    args = parser.parse_args(argv)
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} CPUs")
    if not args.skip_cuda:
        _bench_lock(ROOT / "images" / "cuda-12.4.yaml")
    _bench_fetch(ROOT / "images" / "demo-cpu.yaml")
    return 0


if __name__ == "__main__":
    sys.exit(main())
