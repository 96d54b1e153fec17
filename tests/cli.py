"""The CLI as a user (or CI) runs it: a fresh process, its exit code, its two streams.

Import it as `from cli import reprobox` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Cli", "reprobox"]


@dataclass(frozen=True)
class Cli:
    """One finished `reprobox` run."""

    code: int
    stdout: str
    stderr: str

    def json(self) -> Any:
        return json.loads(self.stdout)


def reprobox(*argv: str | Path, env: Mapping[str, str] | None = None) -> Cli:
    """Run `python -m reprobox ARGV` with extra `env`, and wait for it."""
    done = subprocess.run(
        [sys.executable, "-m", "reprobox", *map(str, argv)],
        capture_output=True,
        text=True,
        env={**os.environ, **(env or {})},
        timeout=1800,
        check=False,
    )
    return Cli(done.returncode, done.stdout, done.stderr)
