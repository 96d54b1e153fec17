"""Build-stage installer: verified local wheels into a venv, with deterministic bytecode.

Runs inside the image build with the base's own python3 and the standard library only. pip
itself runs from its locked wheel, so the base needs no pip and the final image carries no
installer that the lock did not name. With --delta, the files this run added or changed are
copied under that directory, so a later stage can take just them.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
from pathlib import Path

__all__ = ["main"]


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


def main(argv: list[str] | None = None) -> int:
    """Install one requirements file into the venv; exit non-zero on any failure."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--venv", type=Path, required=True)
    parser.add_argument("--installer", type=Path, required=True, help="the locked pip wheel")
    parser.add_argument("--wheels", type=Path, action="append", required=True)
    parser.add_argument("--requirements", type=Path, required=True)
    parser.add_argument("--delta", type=Path, help="copy what this run adds under this directory")
    args = parser.parse_args(argv)

    if not (args.venv / "bin" / "python").exists():
        _run([sys.executable, "-m", "venv", "--without-pip", str(args.venv)])
    before = _snapshot(args.venv)
    python = str(args.venv / "bin" / "python")
    if args.requirements.read_text(encoding="utf-8").strip():
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
    # Bytecode made here with unchecked-hash pycs: no mtimes in the headers, and the interpreter
    # never rewrites them at run time. One worker keeps the output order-independent.
    new_sources = sorted(
        p for p, _ in _snapshot(args.venv).items() if p.endswith(".py") and p not in before
    )
    if new_sources:
        listing = args.venv / ".reprobox-compile-list"
        listing.write_text("\n".join(new_sources) + "\n", encoding="utf-8")
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
