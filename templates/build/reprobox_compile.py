"""Compile a sorted list of `.py` files in shards, contiguous runs of it, by compileall processes.

Runs in a container of the base with the base's Python (`--assemble`'s bytecode step), with
PYTHONPYCACHEPREFIX set: `python reprobox_compile.py LIST [--sources TAR]... [--under DIR]
[--pack OUT]`. The list holds one absolute path per line (`\\n` only). One process per CPU the
container may use at a time, four shards each; the shards with the most source bytes run
first, each next one as soon as one ends, so that no CPU idles through a long last shard.

A pyc does not depend on what its process compiled before (CPython's marshal marks interned
strings as references always, any other object by its references inside the module written),
so the shards write the bytes one process writes; the tests compare them with the recipe's
one-process compile.

In the container the `.py` files arrive as tars (`--sources`), one file each, unpacked here into
the venv, which is memory-backed (tmpfs) like the pyc folder; the pycs leave as one tar
(`--pack`), each shard's added as soon as it has ended. A container's own filesystem (overlay)
costs about a millisecond for each file created in it: five seconds for the demo's 5,900 `.py`
files on the 2-core machine this was measured on, and several more for their pycs.

Some wheels ship deliberately uncompilable files (templates, py2 fixtures); they stay
source-only, as the recipe's compile step and pip's leave them. Any other missing pyc (a shard
killed, a full disk, a write error) fails: exit 2, with what is missing on stderr. Exit 0 when
every file has its pyc or does not compile. A tar member that is not a file below the venv
fails too (exit 2).

Standard library only: it runs on whatever Python the base has (3.8 and later).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import posixpath
import shutil
import subprocess
import sys
import tarfile
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

#: At most this many processes at a time, whatever the machine has.
MAX_SHARDS = 16
#: Shards for each process: the sorted list in this many more, shorter runs.
SHARDS_PER_WORKER = 4


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


def _size(path: str) -> int:
    try:
        return Path(path).stat().st_size
    except OSError:
        return 0


def compile_shards(
    listing: Path, files: list[str], workers: int, packed: tarfile.TarFile | None = None
) -> list[int]:
    """compileall's exit codes, one for each of `SHARDS_PER_WORKER * workers` shards of `files`
    (in the list's order), run by `workers` processes at a time, the shards with the most
    source bytes first, each next one as soon as one ends: a last long shard would leave the
    other CPUs idle. Each shard's pycs go into `packed` as soon as it has ended."""
    parts = shards(files, workers * SHARDS_PER_WORKER)
    order = sorted(range(len(parts)), key=lambda i: -sum(_size(name) for name in parts[i]))
    packing = threading.Lock()

    def run(index: int) -> int:
        part = listing.with_name(f"{listing.name}.{index}")
        part.write_text("".join(name + "\n" for name in parts[index]), encoding="utf-8")
        command = [sys.executable, "-m", "compileall", "-q", "-j", "1"]
        command += ["--invalidation-mode", "unchecked-hash", "-i", str(part)]
        code = subprocess.run(command, stdin=subprocess.DEVNULL, check=False).returncode
        if packed is not None:
            with packing:
                _pack(packed, parts[index])
        return code

    with ThreadPoolExecutor(max_workers=workers) as pool:
        codes = dict(zip(order, pool.map(run, order)))  # noqa: B905 (3.8 has no strict=)
    return [codes[index] for index in range(len(parts))]


def _pack(packed: tarfile.TarFile, sources: list[str]) -> None:
    """The pycs of `sources` that were written, into `packed`, each named as its path without
    the leading `/`."""
    for name in sources:
        pyc = Path(importlib.util.cache_from_source(name))
        if pyc.is_file():
            info = tarfile.TarInfo(pyc.as_posix().lstrip("/"))
            info.size, info.mode = pyc.stat().st_size, 0o644
            with pyc.open("rb") as data:
                packed.addfile(info, data)


def unpack(tar_path: str, under: str, root: str = "/") -> None:
    """The regular files of the tar at `tar_path` (named relative to `/`), written below `root`.

    Each must lie below `under` (the venv): a link, a folder, a device, `..` or a name outside
    it is refused (ValueError). The tar is reprobox's own; this is the last check, not the only.
    """
    top = under.strip("/") + "/"
    with tarfile.open(tar_path) as tar:
        for member in tar:
            name = member.name
            if (
                not member.isreg()
                or posixpath.normpath(name) != name
                or not name.startswith(top)
                or any(part in ("", ".", "..") for part in name.split("/"))
            ):
                raise ValueError(f"{tar_path}: {name!r} is not a file below {under}")
            target = Path(root, name)
            target.parent.mkdir(parents=True, exist_ok=True)
            data = tar.extractfile(member)
            assert data is not None
            with data, target.open("wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reprobox_compile.py")
    parser.add_argument("listing", type=Path)
    parser.add_argument("--sources", action="append", default=[], help="a tar of .py files")
    parser.add_argument("--under", default="/opt/venv", help="where --sources' files must lie")
    parser.add_argument("--pack", help="write the pycs (PYTHONPYCACHEPREFIX) to this tar")
    args = parser.parse_args(argv)
    if args.pack and not sys.pycache_prefix:
        parser.error("--pack needs PYTHONPYCACHEPREFIX")
    return args


def main(argv: list[str]) -> int:
    args = _arguments(argv)
    for tar_path in args.sources:
        try:
            unpack(tar_path, args.under)
        except (OSError, ValueError, tarfile.TarError) as err:
            print(f"reprobox_compile: unpacking {tar_path}: {err}", file=sys.stderr)
            return 2
    listing = args.listing
    files = read_list(listing)
    workers = min(cpu_count(), MAX_SHARDS)
    with contextlib.ExitStack() as stack:
        packed = None
        if args.pack:
            packed = stack.enter_context(tarfile.open(args.pack, "w", format=tarfile.PAX_FORMAT))
        codes = compile_shards(listing, files, workers, packed)
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
