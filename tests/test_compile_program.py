"""templates/build/reprobox_compile.py, the bytecode step of `--assemble`, run on this host."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

PROGRAM = Path(__file__).resolve().parent.parent / "templates" / "build" / "reprobox_compile.py"


def _module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reprobox_compile_under_test", PROGRAM)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


compile_program = _module()


def test_shards_are_contiguous_runs_of_the_sorted_list_and_never_empty() -> None:
    files = [f"/f{i:02}.py" for i in range(10)]
    for count in (1, 2, 3, 7, 10, 16):
        parts = compile_program.shards(files, count)
        assert [name for part in parts for name in part] == files
        assert all(parts)
        assert len(parts) == min(count, len(files))
        assert max(map(len, parts)) - min(map(len, parts)) <= 1
    assert compile_program.shards(files[:1], 16) == [files[:1]]


def test_the_list_is_split_on_newlines_only(tmp_path: Path) -> None:
    """U+2028 and U+0085 are line breaks to str.splitlines, not to compileall's `-i`."""
    listing = tmp_path / "list"
    listing.write_text("/a\u2028b.py\n/c\x85d.py\n", encoding="utf-8")
    assert compile_program.read_list(listing) == ["/a\u2028b.py", "/c\x85d.py"]


def _run(
    tmp_path: Path, names: dict[str, str], prefix: Path
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    paths = []
    for name, source in names.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
        paths.append(str(path))
    listing = tmp_path / "compile-list"
    listing.write_text("".join(p + "\n" for p in sorted(paths)), encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(PROGRAM), str(listing)],
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)},
        capture_output=True,
        text=True,
        check=False,
    )
    return done, sorted(paths)


def test_every_file_gets_its_pyc_and_one_that_does_not_compile_stays_source(
    tmp_path: Path,
) -> None:
    names = {f"pkg/m{i}.py": f"X = {i}\n" for i in range(9)}
    names["pkg/odd\u2028name.py"] = "Y = 1\n"
    names["pkg/py2.py"] = "print 'py2'\n"
    prefix = tmp_path / "pyc"
    done, paths = _run(tmp_path, names, prefix)
    assert done.returncode == 0, done.stderr
    pycs = {
        p: prefix
        / Path(p).relative_to("/").parent
        / f"{Path(p).stem}.{sys.implementation.cache_tag}.pyc"
        for p in paths
    }
    assert {p for p, pyc in pycs.items() if not pyc.is_file()} == {str(tmp_path / "src/pkg/py2.py")}


def test_bytes_are_those_of_one_process(tmp_path: Path) -> None:
    names = {
        f"pkg/m{i}.py": f"import os\nNAME = 'v{i}'\ndef f():\n    return os.sep, NAME\n"
        for i in range(12)
    }
    sharded, one = tmp_path / "sharded", tmp_path / "one"
    done, paths = _run(tmp_path, names, sharded)
    assert done.returncode == 0, done.stderr
    listing = tmp_path / "compile-list"
    subprocess.run(
        [
            sys.executable,
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
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(one)},
        check=True,
    )
    files = sorted(p.relative_to(one) for p in one.rglob("*.pyc"))
    assert len(files) == len(paths)
    assert files == sorted(p.relative_to(sharded) for p in sharded.rglob("*.pyc"))
    assert all((one / f).read_bytes() == (sharded / f).read_bytes() for f in files)


def test_a_pyc_that_could_not_be_written_fails(tmp_path: Path) -> None:
    """A negative control: compileall exits 1 for a write error too; that is not a py2 file."""
    blocked = tmp_path / "pyc"
    blocked.write_text("a file where the pyc folder should be")
    done, _ = _run(tmp_path, {"pkg/fine.py": "X = 1\n"}, blocked)
    assert done.returncode == 2
    assert "compile but have no pyc" in done.stderr


@pytest.mark.parametrize(
    ("quota", "expected"), [("max 100000", 8), ("150000 100000", 2), ("50000 100000", 1)]
)
def test_a_cgroup_quota_lowers_the_count(
    monkeypatch: pytest.MonkeyPatch, quota: str, expected: int
) -> None:
    monkeypatch.setattr(compile_program.os, "sched_getaffinity", lambda _pid: set(range(8)))
    real_read = Path.read_text

    def read_text(self: Path, *args: object, **kwargs: object) -> str:
        if str(self) == "/sys/fs/cgroup/cpu.max":
            return quota + "\n"
        return real_read(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "read_text", read_text)
    assert compile_program.cpu_count() == expected
