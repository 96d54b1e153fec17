"""Build-stage installer: verified local wheels into a venv, with deterministic bytecode.

Runs inside the image build with the base's own python3 and the standard library. Every wheel
is taken by the sha256 its requirements line names, so nothing but the verified wheels can be
installed, and none is fetched.

- On Python 3.10 and later the wheels are installed with pypa/installer, from the copy of its
  source that reprobox put into the context (the version `build --assemble` writes its layers
  with): sorted by name, no INSTALLER or REQUESTED marker, its own launchers, pip's place for
  headers (`include/site/python3.X/NAME`). The files are those `build --assemble` writes. A
  second copy of one file in two wheels is written once; a different one is refused. A file
  of a lower stage is replaced, as an upper layer shadows it.
- Before 3.10 (which that installer does not run on) pip runs from its locked wheel, as the
  lock names it: pip writes its own metadata and launchers.

Then the `.py` files this run wrote are compiled in one process, sorted, to unchecked-hash
pycs. With --delta, the files this run added or changed are copied under that directory, so a
later stage can take just them.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import BinaryIO

__all__ = ["install_wheels", "main", "read_requirements"]

_REQUIREMENT = re.compile(r"([A-Za-z0-9][A-Za-z0-9._-]*)==(\S+) --hash=sha256:([0-9a-f]{64})")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_CHUNK = 1 << 20


def _snapshot(root: Path) -> dict[str, tuple[int, int]]:
    state: dict[str, tuple[int, int]] = {}
    if not root.exists():
        return state
    for path in root.rglob("*"):
        st = path.lstat()
        state[str(path)] = (st.st_size, st.st_mtime_ns)
    return state


def _run(argv: list[str], *, check: bool = True, env: dict[str, str] | None = None) -> int:
    print("+ " + " ".join(argv), flush=True)
    return subprocess.run(argv, check=check, env=env).returncode


def _copy_delta(before: dict[str, tuple[int, int]], venv: Path, delta: Path) -> int:
    after = _snapshot(venv)
    changed = sorted(p for p, st in after.items() if before.get(p) != st)
    for name in changed:
        source = Path(name)
        target = delta / source.relative_to("/")
        if source.is_symlink():
            target.parent.mkdir(parents=True, exist_ok=True)
            target.symlink_to(source.readlink())
        elif source.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            shutil.copystat(source, target)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)
    delta.mkdir(parents=True, exist_ok=True)
    return len(changed)


def read_requirements(text: str) -> list[tuple[str, str, str]]:
    """`(name, version, sha256)` of each `name==version --hash=sha256:HEX` requirement, as
    reprobox writes them (one hash, continuation lines); anything else is refused."""
    joined = re.sub(r"[ \t]*\\\n\s*", " ", text)
    found = []
    for raw in joined.splitlines():
        line = raw.strip()
        if not line:
            continue
        match = _REQUIREMENT.fullmatch(line)
        if match is None:
            raise SystemExit(f"reprobox_install: not a pinned, hashed requirement: {line[:200]!r}")
        found.append((match.group(1), match.group(2), match.group(3)))
    return found


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as data:
        while chunk := data.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _locate(
    requirements: list[tuple[str, str, str]], folders: list[Path]
) -> list[tuple[str, Path]]:
    """Each requirement's wheel file, found by its sha256, as `(name, path)`, sorted by name
    and file name (the order `build --assemble` installs them in)."""
    by_hash: dict[str, Path] = {}
    for folder in folders:
        for path in sorted(folder.glob("*.whl")):
            by_hash.setdefault(_sha256(path), path)
    chosen = []
    hashes = [sha256 for _, _, sha256 in requirements]
    for name, version, sha256 in requirements:
        if hashes.count(sha256) > 1:
            raise SystemExit(
                f"reprobox_install: {name}=={version} shares its sha256 with another requirement"
            )
        found = by_hash.get(sha256)
        if found is None:
            raise SystemExit(f"reprobox_install: no wheel with the sha256 of {name}=={version}")
        chosen.append((name, found))
    return sorted(chosen, key=lambda item: (item[0], item[1].name))


def install_wheels(
    wheels: list[tuple[str, Path]],
    schemes: dict[str, dict[str, str]],
    interpreter: str,
    *,
    root: Path,
    keep: frozenset[str] = frozenset(),
) -> list[str]:
    """Install `wheels` (`(name, path)`, in order) with pypa/installer, each into the scheme
    `schemes[name]` gives; the paths of the `.py` files written, in the order written.

    Nothing may be written through a link below `root` (the venv's `lib64`), nor replace a
    path of `keep` (the venv's own files: `bin/python`, `pyvenv.cfg`, ...).
    """
    import zipfile

    from installer import install
    from installer.destinations import SchemeDictionaryDestination
    from installer.exceptions import InstallerError
    from installer.records import Hash, RecordEntry
    from installer.sources import WheelFile
    from installer.utils import Scheme, copyfileobj_with_hashing

    real_root = Path(os.path.realpath(root))

    written: dict[str, str] = {}  # this run's files: their sha256
    python_files: list[str] = []

    class _Destination(SchemeDictionaryDestination):
        def write_to_fs(
            self, scheme: Scheme, path: str, stream: BinaryIO, is_executable: bool
        ) -> RecordEntry:
            target = self._path_with_destdir(scheme, path)  # refuses a path outside the scheme
            if _CONTROL.search(path):
                raise SystemExit(
                    f"reprobox_install: a wheel's file {path!r:.200} holds a control character"
                )
            key = str(target)
            if key in keep:
                raise SystemExit(
                    f"reprobox_install: a wheel's file would replace the venv's own {key}"
                )
            if Path(os.path.realpath(target.parent)) != real_root / target.parent.relative_to(root):
                raise SystemExit(
                    f"reprobox_install: a wheel's file {key} would land through a link"
                )
            if key in written:
                with Path(os.devnull).open("wb") as discard:
                    digest, size = copyfileobj_with_hashing(stream, discard, self.hash_algorithm)
                if digest != written[key]:
                    raise SystemExit(f"reprobox_install: two different files at {key} in one layer")
                return RecordEntry(path, Hash(self.hash_algorithm, digest), size)
            if target.is_symlink() or target.exists():
                target.unlink()  # a lower stage's copy: replaced, its mode too
            entry = super().write_to_fs(scheme, path, stream, is_executable)
            assert entry.hash_ is not None  # the parent hashes what it writes
            written[key] = entry.hash_.value
            if key.endswith(".py"):
                python_files.append(key)
            return entry

    for name, path in wheels:
        destination = _Destination(
            schemes[name],
            interpreter=interpreter,
            script_kind="posix",
            bytecode_optimization_levels=[],
        )
        try:
            with WheelFile.open(path) as source:
                install(source, destination, additional_metadata={})
        except (ValueError, KeyError, OSError, zipfile.BadZipFile, InstallerError) as err:
            raise SystemExit(
                f"reprobox_install: {path.name}: not an installable wheel: {err}"
            ) from err
    return python_files


def _venv_paths(python: str) -> dict[str, str]:
    """Where the venv's Python keeps what (`sysconfig.get_paths()`), and its version."""
    program = (
        "import json, sysconfig; p = sysconfig.get_paths(); "
        "p['py_version_short'] = sysconfig.get_python_version(); print(json.dumps(p))"
    )
    answer = subprocess.run([python, "-c", program], check=False, capture_output=True, text=True)
    if answer.returncode != 0:
        raise SystemExit(
            f"reprobox_install: the venv's Python did not say where it keeps what: {answer.stderr[-2000:]}"
        )
    paths: dict[str, str] = json.loads(answer.stdout)
    return paths


def _schemes(venv: Path, names: list[str]) -> dict[str, dict[str, str]]:
    paths = _venv_paths(str(venv / "bin" / "python"))
    common = {key: paths[key] for key in ("purelib", "platlib", "scripts", "data")}
    for key, value in common.items():
        if not (value == str(venv) or value.startswith(f"{venv}/")):
            raise SystemExit(f"reprobox_install: the venv puts {key} at {value}, outside {venv}")
    include = f"{venv}/include/site/python{paths['py_version_short']}"
    return {name: {**common, "headers": f"{include}/{name}"} for name in names}


def _pip(args: argparse.Namespace, python: str) -> list[str]:
    """Before Python 3.10: pip from its locked wheel. The `.py` files are what it added."""
    before = _snapshot(args.venv)
    # --no-index and --require-hashes: nothing but the verified wheels can be installed.
    _run(
        [
            python,
            str(args.installer / "pip"),
            "install",
            "--no-index",
            "--no-deps",
            "--require-hashes",
            "--no-compile",
            "--no-cache-dir",
            "--disable-pip-version-check",
            "--no-warn-script-location",
            *(f"--find-links={folder}" for folder in args.wheels),
            "--requirement",
            str(args.requirements),
        ]
    )
    # New or replaced: a replaced file's lower pyc is unchecked-hash, never looked at again.
    return [
        p for p, st in _snapshot(args.venv).items() if p.endswith(".py") and before.get(p) != st
    ]


def main(argv: list[str] | None = None) -> int:
    """Install one requirements file into the venv; exit non-zero on any failure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--venv", type=Path, required=True)
    parser.add_argument("--installer", type=Path, required=True, help="the locked pip wheel")
    parser.add_argument(
        "--pypa", type=Path, required=True, help="the folder that holds pypa/installer's source"
    )
    parser.add_argument("--wheels", type=Path, action="append", required=True)
    parser.add_argument("--requirements", type=Path, required=True)
    parser.add_argument("--delta", type=Path, help="copy what this run adds under this directory")
    parser.add_argument(
        "--skeleton",
        type=Path,
        required=True,
        help="the list of the venv's own files: written where this run makes the venv, else read",
    )
    args = parser.parse_args(argv)

    if not (args.venv / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", "--without-pip", str(args.venv)])
        made = sorted(
            p for p in _snapshot(args.venv) if not Path(p).is_dir() or Path(p).is_symlink()
        )
        args.skeleton.write_text("".join(f"{p}\n" for p in made), encoding="utf-8")
    keep = frozenset(args.skeleton.read_text(encoding="utf-8").splitlines())
    before = _snapshot(args.venv)
    python = str(args.venv / "bin" / "python")
    requirements = read_requirements(args.requirements.read_text(encoding="utf-8"))
    if not requirements:
        new_sources: list[str] = []
    elif sys.version_info >= (3, 10):  # noqa: UP036 (the base's Python may be older)
        sys.path.insert(0, str(args.pypa))
        wheels = _locate(requirements, args.wheels)
        schemes = _schemes(args.venv, [name for name, _ in wheels])
        new_sources = install_wheels(wheels, schemes, python, root=args.venv, keep=keep)
        print(f"reprobox: {len(wheels)} wheels installed by pypa/installer", flush=True)
    else:
        new_sources = _pip(args, python)
    # Bytecode made here with unchecked-hash pycs: no mtimes in the headers, and the interpreter
    # never rewrites them at run time. One worker keeps the output order-independent.
    if new_sources:
        listing = args.venv / ".reprobox-compile-list"
        listing.write_text("\n".join(sorted(set(new_sources))) + "\n", encoding="utf-8")
        _run(
            [
                python,
                "-m",
                "compileall",
                "-q",
                "-j",
                "1",
                "--invalidation-mode",
                "unchecked-hash",
                "-i",
                str(listing),
            ],
            # Some wheels ship deliberately uncompilable files (templates, py2 fixtures);
            # they stay source-only, as pip's own compile step would leave them.
            check=False,
            # Up to Python 3.10 marshal writes a frozenset constant in its iteration order,
            # which follows the string hash seed: with a random one, two builds could differ.
            env={**os.environ, "PYTHONHASHSEED": "0"},
        )
        listing.unlink()
    if args.delta is not None:
        print(
            f"reprobox: {_copy_delta(before, args.venv, args.delta)} paths in the delta", flush=True
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
