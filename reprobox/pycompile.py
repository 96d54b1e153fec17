"""Bytecode for `--assemble`'s Python layers: the base's Python compiles, in one short container.

Only the layers' `.py` files go in (a tar and a sorted list per layer); only the pycs come back.
templates/build/reprobox_compile.py compiles them with `PYTHONPYCACHEPREFIX`, unchecked-hash
pycs: the bytes the recipe's install step writes, one process per layer. On CPython 3.11 a pyc
does not depend on what else its process compiled, so the program compiles the union in
contiguous shards of its sorted list, several processes at a time; on 3.12 it does (a frozenset
constant an earlier file's strings also filled), and elsewhere each layer's list is compiled in
one process, as the recipe's stage does. Every compile runs with PYTHONHASHSEED=0, as the
recipe's does: up to 3.10 a frozenset's items are written in their hash order. Either way every
layer's `.py` files can share one container, and each layer takes its own pycs back.

The container's venv and pyc folder are memory-backed (tmpfs): the tars go in as one file each
and the program unpacks them there; it packs the pycs into one tar on the container's own
filesystem, which `get_archive` can read (a tmpfs it cannot). Each file created in a
container's own filesystem (overlay) costs about a millisecond here: putting the demo's 5,900
`.py` files in file by file took 5.7 s of a cold demo build.
"""

from __future__ import annotations

import contextlib
import functools
import posixpath
import shlex
import shutil
import tarfile
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO

from reprobox._files import CHUNK
from reprobox.engine import Engine
from reprobox.errors import ContainerCancelledError, EngineError
from reprobox.layer_tar import LayerIndex, tar_stream

__all__ = ["Sources", "append_pycs", "compile_all", "engine_tar"]

#: The compile container's time limit (a CUDA group compiles in about half a minute here).
_COMPILE_TIMEOUT_S = 3600.0
_PROGRAM = "build/reprobox_compile.py"

#: Memory-backed in the compile container (the venv holds the `.py` files while they compile).
_PYC_DIR = "/reprobox-pyc"
_PACKED = "/reprobox-build/pycs.tar"

# templates/build/reprobox_compile.py: unpacks the tars into the venv, compiles the lists
# (every file gets its pyc or does not compile) and packs the pycs into one tar.
_COMPILE = """set -eu
export PYTHONDONTWRITEBYTECODE=1
python3 -m venv --without-pip {venv}
PYTHONPYCACHEPREFIX={pyc_dir} {venv}/bin/python /reprobox-build/reprobox_compile.py \\
  {lists} --under {venv} {sources} --pack {packed}
"""


@dataclass(frozen=True)
class Sources:
    """A tar of one layer's `.py` files (named relative to `/`), and their absolute paths."""

    path: Path
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
    own_files = [own for own in sources if own.files]
    if not own_files:
        yield None
        return
    work.mkdir()
    program = work / "reprobox_compile.py"
    program.write_bytes(resources.files("reprobox.templates").joinpath(_PROGRAM).read_bytes())
    entries = [("reprobox-build/reprobox_compile.py", program)]
    # One sorted list per layer: the program compiles each in one process where a pyc depends
    # on what its process compiled before (everywhere but on CPython 3.11), as the recipe does.
    for index, own in enumerate(own_files):
        listing = work / f"compile-list-{index}"
        listing.write_text("\n".join(sorted(own.files)) + "\n", encoding="utf-8")
        entries += [
            (f"reprobox-build/compile-list-{index}", listing),
            (f"reprobox-build/sources-{index}.tar", own.path),
        ]
    count = range(len(own_files))
    command = _COMPILE.format(
        venv=shlex.quote(venv),
        pyc_dir=_PYC_DIR,
        lists=" ".join(f"/reprobox-build/compile-list-{i}" for i in count),
        sources=" ".join(f"--sources /reprobox-build/sources-{i}.tar" for i in count),
        packed=_PACKED,
    )
    argv = ["/bin/sh", "-c", command]
    with engine.run_kept(
        base,
        argv,
        timeout_s=_COMPILE_TIMEOUT_S,
        files=tar_stream(entries, 0),
        cancel=cancel,
        tmpfs=(venv, _PYC_DIR),
    ) as box:
        if box.result.exit_code != 0:
            raise EngineError(
                f"compiling bytecode in {base} failed (exit {box.result.exit_code}, "
                f"`{shlex.join(argv[:2])} ...`): {box.result.stderr.strip()[-2000:]}"
            )
        outer = work / "packed.tar"
        box.get_archive(_PACKED, outer)
        pycs = work / "pycs.tar"
        _unwrap(outer, posixpath.basename(_PACKED), pycs)
        outer.unlink()
        yield pycs


def _unwrap(outer: Path, name: str, dest: Path) -> None:
    """The file `name` of the engine's tar `outer` (get_archive of one file), written to `dest`."""
    with engine_tar(outer) as tar:
        member = tar.getmember(name)
        data = tar.extractfile(member) if member.isreg() else None
        if data is None:
            raise EngineError(f"the engine's archive {outer.name} holds no file {name}")
        with data, dest.open("wb") as out:
            shutil.copyfileobj(data, out, CHUNK)


def append_pycs(
    layers: Sequence[LayerIndex],
    compiled: Sequence[Path | None],
    sources: Sequence[Sources],
    cache_tag: str,
    opened: contextlib.ExitStack,
) -> None:
    """Into each layer's index the pycs of its `sources` (`compiled[i]` holds layer i's), each
    into its `__pycache__`, read from their tar (left open on `opened`) when the layer is
    written. Each tar's headers are read once; a pyc of no layer's `.py` file (or with another
    tag than the probe's) fails, instead of being dropped without a word."""
    suffix = f".{cache_tag}.pyc"
    for pycs in dict.fromkeys(p for p in compiled if p is not None):
        owners = [i for i, p in enumerate(compiled) if p == pycs]
        taken: dict[int, list[tarfile.TarInfo]] = {i: [] for i in owners}
        stray: list[str] = []
        try:
            tar = opened.enter_context(tarfile.open(pycs))  # noqa: SIM115  # closed by `opened`
            members = [member for member in tar if member.isfile()]
        except (tarfile.TarError, EOFError) as err:
            raise _unusable(pycs, err) from err
        for member in members:
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
        for owner, found in taken.items():
            for member in found:
                folder, _, name = member.name.removeprefix("reprobox-pyc/").rpartition("/")
                opener = functools.partial(_member, tar, member)
                layers[owner].file(f"{folder}/__pycache__/{name}", opener, member.size)


def _member(tar: tarfile.TarFile, member: tarfile.TarInfo) -> IO[bytes]:
    data = tar.extractfile(member)
    assert data is not None  # a regular file's
    return data


def _unusable(path: Path, err: BaseException) -> EngineError:
    return EngineError(f"the engine's archive {path.name} is not a usable tar: {err}")


@contextlib.contextmanager
def engine_tar(path: Path) -> Iterator[tarfile.TarFile]:
    """A tar the engine gave (get_archive): a broken one, or one without the member asked
    for, is the engine's fault (exit 3)."""
    try:
        with tarfile.open(path) as tar:
            yield tar
    except (tarfile.TarError, EOFError, KeyError) as err:
        raise _unusable(path, err) from err
