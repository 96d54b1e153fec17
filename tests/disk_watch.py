"""Where the suite's disk space goes: free space on each filesystem it writes to, after every test.

The terminal summary gives, for each filesystem (the temporary folder, the reprobox cache, the
engine's storage): free space at the start, the least free and after which test, free space at
the end, and the tests after which free space fell the most. A run that runs out of room then
says where the room went, and a change that makes the suite hungrier shows in CI's log.
Loaded by conftest (`pytest_plugins`).
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from reprobox.context import default_cache_dir
from reprobox.docker_engine import DockerEngine
from reprobox.errors import EngineError

_GB = 10**9
#: How many of the largest falls the summary lists, and the least it lists.
_TOP = 6
_NOTABLE = _GB // 10


@dataclass
class _Device:
    """One filesystem: the places on it, and its free space as the session went."""

    places: list[str]
    start: int
    last: int
    least: int
    least_after: str = "(the start)"
    falls: list[tuple[int, str]] = field(default_factory=list)

    def sample(self, free: int, nodeid: str) -> None:
        if free < self.least:
            self.least, self.least_after = free, nodeid
        if free < self.last:
            self.falls.append((self.last - free, nodeid))
            self.falls = sorted(self.falls, reverse=True)[:_TOP]
        self.last = free


def _free(path: str) -> int:
    return shutil.disk_usage(path).free


def _engine_root() -> str | None:
    """The local engine's storage folder, or None (no engine, a remote one), as doctor finds it."""
    engine = DockerEngine()
    try:
        info = engine.ping()
    except EngineError:
        return None
    finally:
        engine.close()
    return info.root_dir if info.root_dir and info.host.startswith("unix://") else None


class DiskWatch:
    def __init__(self) -> None:
        self.devices: dict[int, _Device] = {}

    def start(self) -> None:
        places = [tempfile.gettempdir(), str(default_cache_dir()), _engine_root()]
        for place in places:
            if place is None or not Path(place).is_dir():
                continue
            device = Path(place).stat().st_dev
            if device in self.devices:
                self.devices[device].places.append(place)
                continue
            free = _free(place)
            self.devices[device] = _Device([place], free, free, free)

    def sample(self, nodeid: str) -> None:
        for device in self.devices.values():
            with contextlib.suppress(OSError):
                device.sample(_free(device.places[0]), nodeid)

    def report(self, terminal: pytest.TerminalReporter) -> None:
        terminal.write_sep("-", "disk: free space on the filesystems the tests write to")
        for device in self.devices.values():
            terminal.write_line(
                f"{', '.join(device.places)}: {device.start / _GB:.1f} GB free at the start, "
                f"{device.least / _GB:.1f} GB at the least (after {device.least_after}), "
                f"{device.last / _GB:.1f} GB at the end"
            )
            for fall, nodeid in device.falls:
                if fall < _NOTABLE:
                    break
                terminal.write_line(f"  -{fall / _GB:.1f} GB after {nodeid}")


_WATCH = DiskWatch()


def pytest_sessionstart(session: pytest.Session) -> None:
    _WATCH.start()


def pytest_runtest_logfinish(nodeid: str, location: tuple[str, int | None, str]) -> None:
    _WATCH.sample(nodeid)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    _WATCH.report(terminalreporter)
