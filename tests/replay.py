"""Replaying recorded pip runs for the lock's unit tests (no network, no real pip run).

tests/data/pip-*.json hold pip runs recorded on a real machine: exit status, output, and the
--report JSON. `resolve` and `ensure_lock` here are the real ones, given `recorded_sizes` when a
replayed runner is passed, since a replayed run's URLs must not be asked over the network.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from reprobox._pip import PipResult
from reprobox.lock import ensure_lock as real_ensure_lock
from reprobox.lock import resolve as real_resolve
from reprobox.locked import Lock
from reprobox.lockfile import LockFile
from reprobox.spec import Spec

__all__ = ["DATA", "FakeRunner", "ensure_lock", "recorded_sizes", "resolve"]

DATA = Path(__file__).resolve().parent / "data"


def recorded_sizes(urls: Iterable[str]) -> dict[str, int | None]:
    """Sizes for replayed pip runs, whose URLs must not be asked: a number derived from each URL."""
    return {url: 1000 + len(url) for url in urls}


def resolve(spec: Spec, **kwargs: Any) -> Lock:
    """The real `resolve`; a replayed pip run (a `runner` given) gets `recorded_sizes`."""
    if "runner" in kwargs:
        kwargs.setdefault("sizes", recorded_sizes)
    return real_resolve(spec, **kwargs)


def ensure_lock(spec: Spec, path: Path, **kwargs: Any) -> LockFile:
    """The real `ensure_lock`, with `recorded_sizes` for a replayed pip run."""
    if "runner" in kwargs:
        kwargs.setdefault("sizes", recorded_sizes)
    return real_ensure_lock(spec, path, **kwargs)


class FakeRunner:
    """Replays recorded pip runs in order, writing each run's report where pip would."""

    def __init__(self, calls: Sequence[Mapping[str, Any]]) -> None:
        self.calls = list(calls)
        self.argvs: list[list[str]] = []

    @classmethod
    def recorded(cls, name: str) -> FakeRunner:
        return cls(json.loads((DATA / f"pip-{name}.json").read_text(encoding="utf-8")))

    def __call__(self, argv: Sequence[str], extra_env: Mapping[str, str]) -> PipResult:
        assert self.calls, f"pip was run more often than recorded: {argv[4:]}"
        call = self.calls.pop(0)
        self.argvs.append(list(argv))
        if call.get("report") is not None:
            report = Path(argv[list(argv).index("--report") + 1])
            report.write_text(json.dumps(call["report"]), encoding="utf-8")
        return PipResult(call["rc"], call.get("stdout", ""), call.get("stderr", ""))
