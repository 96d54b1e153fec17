"""Python layers written straight from the verified wheels: no build container installs them.

pypa/installer runs in reprobox's own process with a destination whose one file-writing method
is replaced: every file it would write (wheel members, generated console scripts, the RECORD it
rewrites) becomes an entry of the layer's index, a pure function of the wheel bytes. Each
file's bytes go once into a spool file, hashed on the way (for the RECORD); once the pycs are
there, each layer is written in one pass, sorted, every file read from where it lies in the
spool. No installed tree ever exists on this host.

Bytecode is the base's Python's to write: the group's `.py` files (only they) go into one short
container of the base without network, which compiles them with `PYTHONPYCACHEPREFIX` to the bytes
today's install step writes (a sorted list, unchecked-hash pycs; in shards, one process per CPU,
which write what one process writes); only the pycs come back, into the index. Their code objects
name `/opt/venv/...`, as an in-place compile does.
"""

from __future__ import annotations

import contextlib
import functools
import io
import json
import posixpath
import re
import shutil
import tarfile
import tempfile
import threading
import zipfile
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, BinaryIO, cast

from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.exceptions import InstallerError
from installer.records import Hash, RecordEntry
from installer.scripts import Script
from installer.sources import WheelFile
from installer.utils import Scheme, copyfileobj_with_hashing

from reprobox._files import atomic_path, write_text_atomic
from reprobox.engine import Engine
from reprobox.errors import BadInputError, EngineError
from reprobox.layer_tar import Layer, LayerIndex, Opener, installed_mode
from reprobox.locked import LockedWheel
from reprobox.pycompile import Sources, append_pycs, compile_all, engine_tar

__all__ = [
    "VENV",
    "LayerJob",
    "TargetPython",
    "probe_target",
    "python_layer",
    "python_layers",
    "write_wheels",
]

#: Where the image's venv lives (the recipe's path too).
VENV = "/opt/venv"
#: The quick pass's `.py` files larger than this pass through a temporary file, not memory.
_SPOOL_BYTES = 16 << 20

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# The probe's one line of answer starts with this (a base's entrypoint may print a banner).
_MARKER = "reprobox-venv-paths: "

_PROBE = f"""set -eu
python3 -m venv --without-pip {VENV}
{VENV}/bin/python - <<'EOF'
import json, sys, sysconfig
paths = sysconfig.get_paths()
paths["py_version_short"] = sysconfig.get_python_version()
paths["cache_tag"] = sys.implementation.cache_tag
print("{_MARKER}" + json.dumps(paths, sort_keys=True))
EOF
"""


@dataclass(frozen=True)
class TargetPython:
    """The venv the base's Python makes: install paths, its pyc tag, its skeleton (a tar)."""

    purelib: str
    platlib: str
    scripts: str
    data: str
    #: "3.11": where pip puts a wheel's headers in a venv (`include/site/python3.11/NAME`).
    version: str
    cache_tag: str
    skeleton: Path

    def scheme(self, project: str) -> dict[str, str]:
        """The scheme for `project` in the venv: its paths, and headers where pip puts them
        (the recipe's install step uses the same scheme, and pip before Python 3.10)."""
        paths = {
            "purelib": self.purelib,
            "platlib": self.platlib,
            "scripts": self.scripts,
            "data": self.data,
            "headers": f"{VENV}/include/site/python{self.version}/{project}",
        }
        for key, value in paths.items():
            if not (value == VENV or value.startswith(VENV + "/")):
                raise EngineError(f"the base's Python puts {key} at {value}, outside {VENV}")
        return {key: value.lstrip("/") for key, value in paths.items()}


def probe_target(engine: Engine, base: str, cache: Path, *, fresh: bool = False) -> TargetPython:
    """The base's venv (from one container run, kept under `cache` by the base's ID; asked
    again when `fresh`, as `--no-cache` asks)."""
    cache.mkdir(parents=True, exist_ok=True)
    paths_file, skeleton = cache / "paths.json", cache / "skeleton.tar"
    if not fresh and paths_file.is_file() and skeleton.is_file():
        with contextlib.suppress(EngineError, OSError):  # kept by an older reprobox: ask again
            return _target(paths_file.read_text(encoding="utf-8"), skeleton)
    with engine.run_kept(base, ["/bin/sh", "-c", _PROBE], timeout_s=300) as box:
        if box.result.exit_code != 0:
            raise EngineError(
                f"making a venv with the base's python3 failed "
                f"(exit {box.result.exit_code}): {box.result.stderr.strip()[-2000:]}",
                hint="the base needs python3 with its venv module",
            )
        lines = [line for line in box.result.stdout.splitlines() if line.startswith(_MARKER)]
        answer = lines[-1].removeprefix(_MARKER) if lines else ""
        target = _target(answer, skeleton)  # checked before anything is kept
        with atomic_path(skeleton) as partial:
            box.get_archive(VENV, partial)
    write_text_atomic(paths_file, answer + "\n")
    return target


def _target(answer: str, skeleton: Path) -> TargetPython:
    """The probe's answer (JSON), checked: every path a string inside the venv, a version."""
    try:
        found: dict[str, Any] = json.loads(answer)
        target = TargetPython(
            purelib=found["purelib"],
            platlib=found["platlib"],
            scripts=found["scripts"],
            data=found["data"],
            version=found["py_version_short"],
            cache_tag=found["cache_tag"],
            skeleton=skeleton,
        )
    except (ValueError, KeyError, TypeError) as err:
        raise EngineError(f"the base's python3 did not say where a venv keeps what: {err}") from err
    fields = (target.purelib, target.platlib, target.scripts, target.data, target.cache_tag)
    if not all(isinstance(v, str) for v in fields) or not re.fullmatch(
        r"3\.[0-9]{1,2}", str(target.version)
    ):
        raise EngineError(f"the base's python3 answered {answer[:300]!r}")
    target.scheme("x")  # every path inside the venv
    return target


@dataclass(frozen=True)
class _Part:
    """A file's bytes in the spool: the spool's reader, at the file's first byte. The layer
    writer reads exactly the file's size from it."""

    reader: IO[bytes]
    offset: int

    def __enter__(self) -> IO[bytes]:
        self.reader.seek(self.offset)
        return self.reader

    def __exit__(self, *exc: object) -> None:
        return None


class _Spool:
    """Every file installer writes, one after another in one file on disk, hashed on the way
    in and read back where it lies when its layer is written: each wheel is decompressed once,
    and no file is held in memory."""

    def __init__(self, folder: Path) -> None:
        # Unnamed: a killed build leaves no spool (GBs for a CUDA stack) in the layer cache.
        self._file = tempfile.TemporaryFile(dir=folder)  # noqa: SIM115  # closed by close()
        self._end = 0

    def add(self, stream: BinaryIO, algorithm: str) -> tuple[str, int, Opener]:
        """`stream`'s bytes appended: their hash (as installer writes it in RECORD), their
        size, and where they are."""
        self._file.seek(self._end)
        digest, size = copyfileobj_with_hashing(stream, cast(BinaryIO, self._file), algorithm)
        offset, self._end = self._end, self._end + size
        return digest, size, functools.partial(_Part, self._file, offset)

    def close(self) -> None:
        self._file.close()


class _TarDestination(SchemeDictionaryDestination):
    """pypa/installer's destination, indexing into the layer (its bytes into the spool) and/or
    copying into a tar of the `.py` files.

    Without a layer (the first, quick pass) only the `.py` files are read from the wheel; the
    others are never decompressed.
    """

    def __init__(
        self,
        layer: tuple[LayerIndex, _Spool] | None,
        sources: tarfile.TarFile | None,
        *,
        spool_dir: Path,
        scheme_dict: dict[str, str],
        seen: dict[str, str],
        skeleton: tuple[frozenset[str], frozenset[str]],
    ) -> None:
        super().__init__(
            scheme_dict=scheme_dict,
            interpreter=f"{VENV}/bin/python",
            script_kind="posix",
            bytecode_optimization_levels=[],
        )
        self._layer, self._sources, self._spool_dir = layer, sources, spool_dir
        self._seen = seen  # .py files already in `sources`, by name: their sha256
        self._reserved, self._links = skeleton  # the venv's own files, and its links
        self.python_files: list[str] = []

    def write_to_fs(
        self, scheme: Scheme, path: str, stream: BinaryIO, is_executable: bool
    ) -> RecordEntry:
        folder = self.scheme_dict[scheme]
        name = posixpath.normpath(posixpath.join(folder, path))
        # pypa/installer's own check (its write_to_fs is replaced here), and no control
        # characters: a name becomes a tar header and a line of the compile list.
        if not name.startswith(folder + "/") or _CONTROL.search(path):
            raise BadInputError(f"a wheel's file {path!r:.200} would land outside /{folder}")
        # As the recipe's install step refuses them: the venv's own files are not a wheel's
        # to replace, in any layer, and nothing lands through its links (`lib64`).
        if name in self._reserved:
            raise BadInputError(f"a wheel's file would replace the venv's own /{name}")
        if any(name.startswith(link + "/") for link in self._links):
            raise BadInputError(f"a wheel's file /{name} would land through a link")
        if self._layer is None and not name.endswith(".py"):
            return RecordEntry(path, None, None)
        # A second copy (namespace packages) is the layer's to accept or refuse.
        copy = self._sources is not None and name.endswith(".py") and name not in self._seen
        if self._layer is not None:
            index, spool = self._layer
            digest, size, opener = spool.add(stream, self.hash_algorithm)
            index.file(name, opener, size, mode=0o755 if is_executable else 0o644, sha256=digest)
            if copy:
                with opener() as data:
                    self._copy(name, data, size, digest)
        else:
            with tempfile.SpooledTemporaryFile(_SPOOL_BYTES, dir=str(self._spool_dir)) as buf:
                digest, size = copyfileobj_with_hashing(
                    stream, cast(BinaryIO, buf), self.hash_algorithm
                )
                if copy:
                    buf.seek(0)
                    self._copy(name, buf, size, digest)
        return RecordEntry(path, Hash(self.hash_algorithm, digest), size)

    def _copy(self, name: str, data: IO[bytes], size: int, digest: str) -> None:
        """A `.py` file into the sources tar (the compile container's input)."""
        assert self._sources is not None
        self._seen[name] = digest
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = size, 0o644, 0
        self._sources.addfile(info, data)
        self.python_files.append("/" + name)

    def write_script(self, name: str, module: str, attr: str, section: str) -> RecordEntry:
        # The parent's version chmods the file it wrote on disk; here the mode is in the header.
        script = Script(name, module, attr, section)  # type: ignore[arg-type]
        script_name, data = script.generate(self.interpreter, self.script_kind)
        with io.BytesIO(data) as stream:
            return self.write_to_fs(Scheme("scripts"), script_name, stream, is_executable=True)


@dataclass(frozen=True)
class LayerJob:
    """One Python layer to write: its wheels, the file it goes to, and whether it is the bottom
    one (which holds the venv's skeleton)."""

    wheels: Sequence[LockedWheel]
    dest: Path
    bottom: bool


def python_layer(
    engine: Engine,
    base: str,
    target: TargetPython,
    wheels: Sequence[LockedWheel],
    files: Mapping[str, Path],
    *,
    dest: Path,
    epoch: int,
    bottom: bool,
) -> Layer:
    """The layer of `wheels` installed into the venv, with their pycs; the skeleton if `bottom`.

    `files` maps a wheel's sha256 to its verified file. The layer is written to `dest`.
    """
    return python_layers(
        engine, base, target, [LayerJob(wheels, dest, bottom)], files, epoch=epoch
    )[0]


def python_layers(
    engine: Engine,
    base: str,
    target: TargetPython,
    jobs: Sequence[LayerJob],
    files: Mapping[str, Path],
    *,
    epoch: int,
) -> list[Layer]:
    """Each job's layer: its wheels installed into the venv, with their pycs.

    The `.py` files of every job are compiled in one container, started before the wheels are
    indexed, so that the base's Python compiles while this process reads the wheels (one
    container start, not one per layer). A pyc does not depend on what else its process
    compiled, so each layer gets the bytes a compile of its own files gives. When two jobs
    ship a file at the same path, each job is compiled in a container of its own (in turn).
    Each layer is written once, sorted, when its pycs are there.
    """
    if not jobs:
        return []
    written: list[Layer] = []
    work = Path(tempfile.mkdtemp(prefix="pylayer-", dir=jobs[0].dest.parent))
    try:
        # The spool and the pyc tars the indexes read from stay open until the layers are
        # written.
        with contextlib.ExitStack() as opened:
            spool = _Spool(work)
            opened.callback(spool.close)
            # First the `.py` files alone (a tenth of the bytes), so that the compile starts
            # early.
            sources = [
                _python_sources(work / f"sources-{index}.tar", job, work, target, files)
                for index, job in enumerate(jobs)
            ]
            # Set when this thread fails or is interrupted: the compile container is then
            # removed within a second, not waited for until it finishes.
            stop = threading.Event()
            # The pycs, as soon as they are read: the container is removed while the layers
            # are written.
            ready: Future[list[Path | None]] = Future()
            with ThreadPoolExecutor(max_workers=1, thread_name_prefix="compile") as pool:
                try:
                    compiling = pool.submit(
                        compile_all,
                        engine,
                        base,
                        sources=sources,
                        venv=VENV,
                        work=work,
                        ready=ready,
                        cancel=stop,
                    )
                    indexes: list[LayerIndex] = []
                    for job in jobs:
                        _raise_if_failed(ready)  # a failed compile is not waited out
                        index = LayerIndex(VENV.lstrip("/"))
                        indexes.append(index)
                        if job.bottom:
                            _add_skeleton(index, target.skeleton)
                        write_wheels(
                            (index, spool),
                            None,
                            spool_dir=work,
                            target=target,
                            wheels=job.wheels,
                            files=files,
                        )
                    pycs = _pycs_when_ready(ready, compiling)
                    append_pycs(indexes, pycs, sources, target.cache_tag, opened)
                    for job, index in zip(jobs, indexes, strict=True):
                        written.append(index.write(job.dest, epoch))
                    compiling.result()  # the container removed
                except BaseException:
                    stop.set()
                    raise
    except BaseException:
        for layer in written:
            layer.path.unlink(missing_ok=True)
        raise
    else:
        return written
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _pycs_when_ready(
    ready: Future[list[Path | None]], compiling: Future[None]
) -> list[Path | None]:
    """The pycs, waited for on both futures: were `compile_all` ever to end without setting
    `ready`, this would still not wait for ever."""
    both: list[Future[Any]] = [ready, compiling]
    wait(both, return_when=FIRST_COMPLETED)
    if not ready.done():
        compiling.result()
        raise EngineError("compiling bytecode ended without giving its pycs")
    return ready.result()


def _raise_if_failed(ready: Future[list[Path | None]]) -> None:
    """The compile's error, as soon as there is one."""
    if ready.done() and (err := ready.exception()) is not None:
        raise err


def _python_sources(
    path: Path, job: LayerJob, work: Path, target: TargetPython, files: Mapping[str, Path]
) -> Sources:
    """The quick pass: only `job`'s `.py` files, read from its wheels into a tar at `path`."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        found = write_wheels(
            None, tar, spool_dir=work, target=target, wheels=job.wheels, files=files
        )
    return Sources(path, frozenset(found))


def write_wheels(
    layer: tuple[LayerIndex, _Spool] | None,
    sources: tarfile.TarFile | None,
    *,
    spool_dir: Path,
    target: TargetPython,
    wheels: Sequence[LockedWheel],
    files: Mapping[str, Path],
) -> list[str]:
    """Install `wheels` (sorted by name) with pypa/installer into a layer's index (the bytes
    into its spool), and/or a copy of each `.py` file into `sources`; the `.py` files'
    absolute paths in the image, in the order met.
    """
    python_files: list[str] = []
    seen: dict[str, str] = {}
    skeleton = _skeleton_names(target.skeleton)
    for wheel in sorted(wheels, key=lambda w: (w.name, w.filename)):
        destination = _TarDestination(
            layer,
            sources,
            spool_dir=spool_dir,
            scheme_dict=target.scheme(wheel.name),
            seen=seen,
            skeleton=skeleton,
        )
        try:
            with zipfile.ZipFile(files[wheel.sha256]) as archive:
                archive.filename = wheel.filename  # the cache names files by their hash
                install(WheelFile(archive), destination, additional_metadata={})
        except (ValueError, KeyError, zipfile.BadZipFile, InstallerError) as err:
            raise BadInputError(f"{wheel.filename}: not an installable wheel: {err}") from err
        python_files += destination.python_files
    return python_files


def _skeleton_names(skeleton: Path) -> tuple[frozenset[str], frozenset[str]]:
    """The venv skeleton's files and links, and its links alone, as layer names; none where
    there is no skeleton file (a test's target)."""
    if not skeleton.is_file():
        return frozenset(), frozenset()
    files, links = set(), set()
    with engine_tar(skeleton) as tar:
        for member in tar.getmembers():
            name = posixpath.normpath(posixpath.join(posixpath.dirname(VENV), member.name))
            if not member.isdir():
                files.add(name.lstrip("/"))
            if member.issym():
                links.add(name.lstrip("/"))
    return frozenset(files), frozenset(links)


def _add_skeleton(layer: LayerIndex, skeleton: Path) -> None:
    """The venv skeleton (pyvenv.cfg, bin/python links, activate scripts), held in memory
    (the index puts it in order)."""
    with engine_tar(skeleton) as tar:
        for member in tar.getmembers():
            name = posixpath.normpath(posixpath.join(posixpath.dirname(VENV), member.name))
            name = name.lstrip("/")
            if member.isdir():
                layer.directory(name)
            elif member.issym():
                layer.symlink(name, member.linkname)
            elif member.isfile():
                data = tar.extractfile(member)
                assert data is not None
                held = data.read()
                opener = functools.partial(io.BytesIO, held)
                layer.file(name, opener, len(held), mode=installed_mode(member.mode))
            else:
                raise EngineError(f"the base's venv holds {member.name}, not a file or link")
