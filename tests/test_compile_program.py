"""templates/build/reprobox_compile.py, the bytecode step of `--assemble`, run on this host."""

from __future__ import annotations

import importlib.util
import io
import os
import subprocess
import sys
import tarfile
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


def _sources_tar(path: Path, members: dict[str, bytes], *, link: str | None = None) -> Path:
    """A tar like `--assemble`'s quick pass writes: files named relative to `/`."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = tarfile.SYMTYPE, "/etc/passwd"
            tar.addfile(info)
    return path


def test_sources_in_tars_are_compiled_and_their_pycs_leave_as_one_sorted_tar(
    tmp_path: Path,
) -> None:
    """The container's route: `.py` files in as tars, pycs out as one tar (run here, with the
    venv a folder of tmp_path: the names in the tars are relative to `/`)."""
    venv = tmp_path / "venv"
    site = f"{str(venv).lstrip('/')}/lib/site-packages"
    names = {f"{site}/pkg/m{i}.py": f"X = {i}\n".encode() for i in range(5)}
    names[f"{site}/pkg/py2.py"] = b"print 'py2'\n"
    first = _sources_tar(tmp_path / "a.tar", dict(list(names.items())[:3]))
    second = _sources_tar(tmp_path / "b.tar", dict(list(names.items())[3:]))
    listing = tmp_path / "compile-list"
    listing.write_text("".join(f"/{n}\n" for n in sorted(names)), encoding="utf-8")
    prefix, packed = tmp_path / "reprobox-pyc", tmp_path / "pycs.tar"
    options = ["--under", str(venv), "--sources", str(first), "--sources", str(second)]
    done = subprocess.run(
        [sys.executable, str(PROGRAM), str(listing), *options, "--pack", str(packed)],
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert {f"/{n}" for n in names} == {str(p) for p in venv.rglob("*.py")}
    tag = sys.implementation.cache_tag
    with tarfile.open(packed) as tar:
        members = [m for m in tar.getmembers() if m.isfile()]
        got = {m.name: tar.extractfile(m).read() for m in members}  # type: ignore[union-attr]
    packed_prefix = str(prefix).lstrip("/")  # each pyc is named as its path, without the `/`
    expected = [f"{packed_prefix}/{n.removesuffix('.py')}.{tag}.pyc" for n in names]
    expected.remove(f"{packed_prefix}/{site}/pkg/py2.{tag}.pyc")  # stays source only
    assert sorted(m.name for m in members) == sorted(expected)
    pyc = prefix / site / "pkg" / f"m0.{tag}.pyc"
    assert got[f"{packed_prefix}/{site}/pkg/m0.{tag}.pyc"] == pyc.read_bytes()


@pytest.mark.parametrize(
    ("name", "link"),
    [
        ("{site}/../../../outside.py", None),
        ("etc/elsewhere.py", None),
        ("{site}/./m.py", None),
        (None, "{site}/link.py"),
    ],
)
def test_a_sources_member_that_is_not_a_file_below_the_venv_is_refused(
    tmp_path: Path, name: str | None, link: str | None
) -> None:
    venv = tmp_path / "venv"
    site = f"{str(venv).lstrip('/')}/lib/site-packages"
    members = {} if name is None else {name.format(site=site): b"X = 1\n"}
    tar = _sources_tar(tmp_path / "s.tar", members, link=link and link.format(site=site))
    listing = tmp_path / "compile-list"
    listing.write_text("", encoding="utf-8")
    done = subprocess.run(
        [sys.executable, str(PROGRAM), str(listing), "--under", str(venv), "--sources", str(tar)],
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(tmp_path / "pyc")},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 2
    assert "is not a file below" in done.stderr
    assert not (tmp_path / "outside.py").exists()
    assert not venv.exists()


def test_shards_run_the_largest_first_and_each_is_packed_once_it_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Contiguous runs of the list (the compile histories the tests above rely on), run in
    order of their source bytes, the largest first; every shard runs, and its pycs are packed."""
    files = []
    for i in range(16):
        path = tmp_path / "src" / f"m{i:02}.py"
        path.parent.mkdir(exist_ok=True)
        path.write_text(
            f"X = '{i:02}'\n" + "# pad\n" * (100 if i in (9, 10) else 0), encoding="utf-8"
        )
        files.append(str(path))
    prefix = tmp_path / "pyc"
    monkeypatch.setattr(sys, "pycache_prefix", str(prefix))
    monkeypatch.setenv("PYTHONPYCACHEPREFIX", str(prefix))  # for the compileall processes
    listing = tmp_path / "list"
    with tarfile.open(tmp_path / "p.tar", "w") as packed:
        codes = compile_program.compile_shards(listing, files, 1, packed)
    assert codes == [0] * compile_program.SHARDS_PER_WORKER
    parts = sorted(tmp_path.glob("list.*"), key=lambda p: int(p.suffix[1:]))
    assert [line for p in parts for line in compile_program.read_list(p)] == files
    with tarfile.open(tmp_path / "p.tar") as tar:
        names = tar.getnames()
    tag = sys.implementation.cache_tag
    # Four shards of four files: m08-m11 holds the two large files and runs first.
    order = [8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]
    assert names == [f"{str(prefix).lstrip('/')}{files[i][:-3]}.{tag}.pyc" for i in order]
