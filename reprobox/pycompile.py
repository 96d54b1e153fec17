"""Bytecode for `--assemble`'s Python layers: the base's Python compiles, in one short container.

Only the layers' `.py` files go in (tars of them, one per layer); only the pycs come back.
templates/build/reprobox_compile.py compiles the sorted list in contiguous shards, one process
per CPU the container may use, with `PYTHONPYCACHEPREFIX`, unchecked-hash pycs: the bytes
today's install step writes, since a pyc does not depend on what else its process compiled.
So every layer's `.py` files can share one container, and each layer takes its own pycs back.
"""

from __future__ import annotations

import contextlib
import shlex
import tarfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from reprobox.engine import Engine
from reprobox.errors import ContainerCancelledError, EngineError
from reprobox.layer_tar import LayerWriter, tar_stream

__all__ = ["Sources", "append_pycs", "compile_all", "engine_tar"]

#: The compile container's time limit (a CUDA group compiles in about half a minute here).
_COMPILE_TIMEOUT_S = 3600.0
_PROGRAM = "build/reprobox_compile.py"

# templates/build/reprobox_compile.py: the sorted list in contiguous shards, one compileall
# process per CPU the container may use; every file gets its pyc or does not compile.
_COMPILE = """set -eu
export PYTHONDONTWRITEBYTECODE=1
python3 -m venv --without-pip {venv}
mkdir -p /reprobox-pyc
PYTHONPYCACHEPREFIX=/reprobox-pyc {venv}/bin/python /reprobox-build/reprobox_compile.py \\
  /reprobox-build/compile-list
"""


@dataclass(frozen=True)
class Sources:
    """A tar of one layer's `.py` files (its first `length` bytes: without the end blocks)."""

    path: Path
    length: int
    files: frozenset[str]


def compile_all(
    engine: Engine,
    base: str,
    *,
    sources: Sequence[Sources],
    venv: str,
    work: Path,
    ready: Future[list[Path | None]],
    cancel: threading.Event | None = None,
) -> None:
    """Set `ready` to, for each of `sources`, the tar of pycs that holds its files' (None: no
    `.py` file), once the last pycs are read and before the last container is removed. One
    container compiles them all, or one per tar (in turn) when two hold the same path."""
    try:
        names = [own.files for own in sources]
        if sum(len(n) for n in names) == len(frozenset[str]().union(*names)):
            batches = [list(range(len(sources)))]
        else:
            batches = [[index] for index in range(len(sources))]
        found: list[Path | None] = [None] * len(sources)
        for number, batch in enumerate(batches):
            _raise_if_cancelled(cancel)
            own = [sources[index] for index in batch]
            folder = work / f"compile-{number}"
            with _compiled(engine, base, own, venv=venv, work=folder, cancel=cancel) as pycs:
                for index in batch:
                    found[index] = pycs
                if number == len(batches) - 1:
                    ready.set_result(found)  # before this container is removed
    except BaseException as err:
        if not ready.done():
            ready.set_exception(err)
        raise


def _raise_if_cancelled(cancel: threading.Event | None) -> None:
    if cancel is not None and cancel.is_set():
        raise ContainerCancelledError("compiling bytecode: no longer needed")


@contextlib.contextmanager
def _compiled(
    engine: Engine,
    base: str,
    sources: Sequence[Sources],
    *,
    venv: str,
    work: Path,
    cancel: threading.Event | None,
) -> Iterator[Path | None]:
    """The pycs of `sources`, compiled by the base's Python in one container: a tar (None
    without a `.py` file), while the container is still there (it is removed after)."""
    python_files = sorted(frozenset[str]().union(*(own.files for own in sources)))
    if not python_files:
        yield None
        return
    work.mkdir()
    listing = work / "compile-list"
    listing.write_text("\n".join(python_files) + "\n", encoding="utf-8")
    program = work / "reprobox_compile.py"
    program.write_bytes(resources.files("reprobox.templates").joinpath(_PROGRAM).read_bytes())
    entries = [
        ("reprobox-build/compile-list", listing),
        ("reprobox-build/reprobox_compile.py", program),
    ]
    files = _concat(tar_stream(entries, 0), sources)
    argv = ["/bin/sh", "-c", _COMPILE.format(venv=shlex.quote(venv))]
    with engine.run_kept(
        base, argv, timeout_s=_COMPILE_TIMEOUT_S, files=files, cancel=cancel
    ) as box:
        if box.result.exit_code != 0:
            raise EngineError(
                f"compiling bytecode in {base} failed (exit {box.result.exit_code}, "
                f"`{shlex.join(argv[:2])} ...`): {box.result.stderr.strip()[-2000:]}"
            )
        pycs = work / "pycs.tar"
        box.get_archive("/reprobox-pyc", pycs)
        yield pycs


def append_pycs(
    layers: Sequence[LayerWriter],
    compiled: Sequence[Path | None],
    sources: Sequence[Sources],
    cache_tag: str,
) -> None:
    """Into each layer the pycs of its `sources` (`compiled[i]` holds layer i's), sorted, each
    into its `__pycache__`. Each tar is read once; a pyc of no layer's `.py` file (or with
    another tag than the probe's) fails, instead of being dropped without a word."""
    suffix = f".{cache_tag}.pyc"
    for pycs in dict.fromkeys(p for p in compiled if p is not None):
        owners = [i for i, p in enumerate(compiled) if p == pycs]
        taken: dict[int, list[tarfile.TarInfo]] = {i: [] for i in owners}
        stray: list[str] = []
        with engine_tar(pycs) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                # reprobox-pyc/opt/venv/.../pkg/mod.cpython-311.pyc, of /opt/venv/.../pkg/mod.py
                source = member.name.removeprefix("reprobox-pyc").removesuffix(suffix) + ".py"
                owner = next((i for i in owners if source in sources[i].files), None)
                if owner is None:
                    stray.append(member.name)
                else:
                    taken[owner].append(member)
            if stray:
                raise EngineError(
                    f"the compile gave {len(stray)} pycs of no layer's `.py` file: "
                    + ", ".join(sorted(stray)[:5]),
                    hint="the base's Python names its pycs otherwise than it said when asked "
                    "(its cache tag); build with `--no-cache` to ask it again",
                )
            for owner, members in taken.items():
                for member in sorted(members, key=lambda m: m.name):
                    folder, _, name = member.name.removeprefix("reprobox-pyc/").rpartition("/")
                    data = tar.extractfile(member)
                    assert data is not None
                    layers[owner].file(f"{folder}/__pycache__/{name}", data, member.size)


@contextlib.contextmanager
def engine_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """A tar the engine gave (get_archive): a broken one, or one without the member asked
    for, is the engine's fault (exit 3)."""
    try:
        with tarfile.open(path) as tar:
            yield tar
    except (tarfile.TarError, EOFError, KeyError) as err:
        raise EngineError(f"the engine's archive {path.name} is not a usable tar: {err}") from err


def _concat(head: Iterator[bytes], sources: Sequence[Sources]) -> Iterator[bytes]:
    """One tar stream of `head`'s members, then those of each tar in `sources`."""
    pending = b""
    for chunk in head:
        pending += chunk
    yield pending[: len(pending) - 1024]  # without head's end-of-archive blocks
    for own in sources:
        left = own.length
        with own.path.open("rb") as data:
            while left and (chunk := data.read(min(left, 1 << 20))):
                left -= len(chunk)
                yield chunk
    yield b"\0" * 1024
