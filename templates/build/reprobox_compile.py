"""Compile a sorted list of `.py` files in contiguous shards, one compileall process each.

Runs in a container of the base with the base's Python (`--assemble`'s bytecode step), with
PYTHONPYCACHEPREFIX set: `python reprobox_compile.py LIST`. The list holds one absolute path
per line (`\\n` only). A pyc does not depend on what its process compiled before (CPython's
marshal marks interned strings as references always, any other object by its references inside
the module written), so the shards write the bytes one process writes; the tests compare them
with the recipe's one-process compile.

Some wheels ship deliberately uncompilable files (templates, py2 fixtures); they stay
source-only, as the recipe's compile step and pip's leave them. Any other missing pyc (a shard
killed, a full disk, a write error) fails: exit 2, with what is missing on stderr. Exit 0 when
every file has its pyc or does not compile.

Standard library only: it runs on whatever Python the base has (3.8 and later).
"""

from __future__ import annotations

import importlib.util
import math
import os
import subprocess
import sys
from pathlib import Path

#: At most this many processes, whatever the machine has.
MAX_SHARDS = 16


def cpu_count() -> int:
    """The CPUs this container may use: its affinity, lowered by a cgroup v2 quota."""
    count = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    count = count or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            count = min(count, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass
    return count


def shards(files: list[str], count: int) -> list[list[str]]:
    """`files` in `count` contiguous runs of near-equal length (none empty)."""
    count = max(1, min(count, len(files)))
    return [files[i * len(files) // count : (i + 1) * len(files) // count] for i in range(count)]


def read_list(path: Path) -> list[str]:
    """One path per `\\n`-ended line, as compileall's `-i` reads them (no other line breaks)."""
    text = path.read_text(encoding="utf-8")
    return [line for line in text.split("\n") if line]


def does_not_compile(path: str) -> bool:
    """Whether the interpreter refuses `path`'s source (as compileall reports, exit 1)."""
    try:
        source = Path(path).read_bytes()
        compile(source, path, "exec", dont_inherit=True)
    except (SyntaxError, ValueError, UnicodeDecodeError):
        return True
    return False


def main(argv: list[str]) -> int:
    listing = Path(argv[0])
    files = read_list(listing)
    jobs = []
    for index, shard in enumerate(shards(files, min(cpu_count(), MAX_SHARDS))):
        part = listing.with_name(f"{listing.name}.{index}")
        part.write_text("".join(name + "\n" for name in shard), encoding="utf-8")
        command = [sys.executable, "-m", "compileall", "-q", "-j", "1"]
        command += ["--invalidation-mode", "unchecked-hash", "-i", str(part)]
        jobs.append(subprocess.Popen(command, stdin=subprocess.DEVNULL))
    codes = [job.wait() for job in jobs]
    if any(code not in (0, 1) for code in codes):
        print(f"reprobox_compile: compileall exited {codes}", file=sys.stderr)
        return 2
    missing = [
        name
        for name in files
        if not Path(importlib.util.cache_from_source(name)).is_file() and not does_not_compile(name)
    ]
    if missing:
        print(
            f"reprobox_compile: {len(missing)} files compile but have no pyc "
            f"(compileall exited {codes}): {', '.join(missing[:5])}",
            file=sys.stderr,
        )
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
