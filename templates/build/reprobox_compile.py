"""Compile the `.py` files of one or more layers with compileall processes, as the recipe does.

Runs in a container of the base with the base's Python (`--assemble`'s bytecode step), with
PYTHONPYCACHEPREFIX set: `python reprobox_compile.py LIST... [--sources TAR]... [--under DIR]
[--pack OUT]`. Each LIST is one layer's sorted list, one absolute path per line (`\\n` only).
The recipe's build stage compiles each layer's list in one process
(`compileall -q -j 1 --invalidation-mode unchecked-hash -i LIST`); this program gives the same
bytes:

- On CPython 3.11 a pyc does not depend on what its process compiled before (measured: an
  interned string dies with its last reference, and marshal marks any other object by the
  references inside the module it writes). So the union of the lists is compiled in contiguous
  shards of its sorted order, four for each CPU the container may use, that many processes at a
  time, the shards with the most source bytes first (so that no CPU idles through a long last
  one).
- On 3.12 it does (interned strings live for ever there): a module holding one frozenset
  constant twice, compiled after a file that held the same strings, marshals it without its
  reference flag. Other versions were measured less than 3.11. So everywhere but on 3.11 each
  list is compiled in one process, as the recipe's stage does (the lists in parallel).
- Up to 3.10 marshal writes a frozenset's items in their hash order, so every compile runs with
  PYTHONHASHSEED=0, as the recipe's does.

The tests compare the program's bytes with the recipe's one-process-per-layer compile on every
CPython found on the test machine.

The `.py` files arrive as tars (`--sources`), one file each, unpacked here into the venv, which
is memory-backed (tmpfs) like the pyc folder; the pycs leave as one tar (`--pack`), each
process's added as soon as it has ended. A container's own filesystem (overlay) costs about a
millisecond for each file created in it: five seconds for the demo's 5,900 `.py` files on the
2-core machine this was measured on, and several more for their pycs.

Some wheels ship deliberately uncompilable files (templates, py2 fixtures); they stay
source-only, as the recipe's compile step and pip's leave them. Any other missing pyc (a
process killed, a full disk, a write error) fails: exit 2, with what is missing on stderr. Exit
0 when every file has its pyc or does not compile. A tar member that is not a file below the
venv, or a second one at the same path, fails too (exit 2).

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


def history_free() -> bool:
    """Whether a pyc here is the same whatever its process compiled before: measured on
    CPython 3.11 (torch's files in halves, in reverse, the demo's layers, and the tests'
    frozensets). On 3.12 a module holding one frozenset constant twice, compiled after a file
    with the same strings, gets other bytes (marshal drops the reference flag); the tests show
    it. Other versions are treated as 3.12 is."""
    return sys.implementation.name == "cpython" and sys.version_info[:2] == (3, 11)


def plan(lists: list[list[str]], workers: int) -> list[list[str]]:
    """The runs of files one compileall process each compiles. Where the bytes do not depend on
    a process's history: contiguous shards of the sorted union, `SHARDS_PER_WORKER` for each
    worker. Otherwise each list (one per layer, sorted) in one process, as the recipe's build
    stage compiles its layer's files."""
    if history_free():
        return shards(sorted(set().union(*lists)), workers * SHARDS_PER_WORKER)
    return [sorted(files) for files in lists if files]


def run_parts(
    listing: Path, parts: list[list[str]], workers: int, packed: tarfile.TarFile | None = None
) -> list[int]:
    """compileall's exit code for each of `parts` (each a list in the order it is compiled),
    run by `workers` processes at a time, the parts with the most source bytes first, each next
    one as soon as one ends: a last long part would leave the other CPUs idle. Each part's pycs
    go into `packed` as soon as it has ended. Its lists are written beside `listing`."""
    order = sorted(range(len(parts)), key=lambda i: -sum(_size(name) for name in parts[i]))
    packing = threading.Lock()

    def run(index: int) -> int:
        part = listing.with_name(f"{listing.name}.{index}")
        part.write_text("".join(name + "\n" for name in parts[index]), encoding="utf-8")
        command = [sys.executable, "-m", "compileall", "-q", "-j", "1"]
        command += ["--invalidation-mode", "unchecked-hash", "-i", str(part)]
        # The recipe's seed: up to 3.10 marshal writes a frozenset in hash order.
        env = {**os.environ, "PYTHONHASHSEED": "0"}
        code = subprocess.run(command, stdin=subprocess.DEVNULL, env=env, check=False).returncode
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
            # Not through a link the venv holds (bin/python, lib64), nor over a file written.
            inside, venv = str(target.parent.resolve()), str(Path(root, top).resolve())
            if inside != venv and not inside.startswith(venv + "/"):  # 3.8: no is_relative_to
                raise ValueError(f"{tar_path}: {name!r} would be written outside {under}")
            flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW
            data = tar.extractfile(member)
            assert data is not None
            with data, os.fdopen(os.open(target, flags, 0o644), "wb") as out:
                shutil.copyfileobj(data, out, 1 << 20)


def _arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="reprobox_compile.py")
    parser.add_argument("listings", type=Path, nargs="+", help="one sorted list per layer")
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
    lists = [read_list(listing) for listing in args.listings]
    files = sorted(set().union(*lists))
    if not files:
        return 0  # compileall -i of an empty list would compile all of sys.path
    workers = min(cpu_count(), MAX_SHARDS)
    try:
        with contextlib.ExitStack() as stack:
            packed = None
            if args.pack:
                packed = stack.enter_context(
                    tarfile.open(args.pack, "w", format=tarfile.PAX_FORMAT)
                )
            codes = run_parts(args.listings[0], plan(lists, workers), workers, packed)
    except OSError as err:  # a list or the tar not written (a full disk), no process started
        print(f"reprobox_compile: {err}", file=sys.stderr)
        return 2
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
