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


def _listed(tmp_path: Path, names: dict[str, str], listing: Path) -> list[str]:
    """`names` (relative path: source) written under tmp_path/src, and their sorted list at
    `listing`, as compileall's `-i` reads it; the sorted paths."""
    paths = []
    for name, source in names.items():
        path = tmp_path / "src" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(source, encoding="utf-8")
        paths.append(str(path))
    listing.write_text("".join(p + "\n" for p in sorted(paths)), encoding="utf-8")
    return sorted(paths)


def _run(
    tmp_path: Path, names: dict[str, str], prefix: Path
) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    listing = tmp_path / "compile-list"
    paths = _listed(tmp_path, names, listing)
    done = subprocess.run(
        [sys.executable, str(PROGRAM), str(listing)],
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(prefix)},
        capture_output=True,
        text=True,
        check=False,
    )
    return done, paths


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


def _sources_tar(
    path: Path, members: dict[str, bytes], *, link: str | None = None, kind: bytes = tarfile.SYMTYPE
) -> Path:
    """A tar like `--assemble`'s quick pass writes: files named relative to `/`; and `link`, an
    entry of `kind` (a symbolic link, a hard link, a folder)."""
    with tarfile.open(path, "w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link is not None:
            info = tarfile.TarInfo(link)
            info.type, info.linkname = kind, "etc/passwd"
            tar.addfile(info)
    return path


def test_sources_in_tars_are_compiled_and_their_pycs_leave_as_one_tar(
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
    ("name", "link", "kind"),
    [
        ("{site}/../../../outside.py", None, tarfile.SYMTYPE),
        ("etc/elsewhere.py", None, tarfile.SYMTYPE),
        ("{site}/./m.py", None, tarfile.SYMTYPE),
        ("{site}//m.py", None, tarfile.SYMTYPE),
        ("{site}/m.py/", None, tarfile.SYMTYPE),
        ("/{site}/m.py", None, tarfile.SYMTYPE),
        (None, "{site}/link.py", tarfile.SYMTYPE),
        (None, "{site}/hard.py", tarfile.LNKTYPE),
        (None, "{site}/folder", tarfile.DIRTYPE),
    ],
    ids=[
        "dotdot",
        "outside",
        "dot",
        "double-slash",
        "trailing-slash",
        "absolute",
        "symlink",
        "hardlink",
        "folder",
    ],
)
def test_a_sources_member_that_is_not_a_file_below_the_venv_is_refused(
    tmp_path: Path, name: str | None, link: str | None, kind: bytes
) -> None:
    venv = tmp_path / "venv"
    site = f"{str(venv).lstrip('/')}/lib/site-packages"
    members = {} if name is None else {name.format(site=site): b"X = 1\n"}
    linked = link and link.format(site=site)
    tar = _sources_tar(tmp_path / "s.tar", members, link=linked, kind=kind)
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


def test_unpacking_follows_no_link_the_venv_holds_and_writes_no_path_twice(tmp_path: Path) -> None:
    """`python3 -m venv` makes links (bin/python, lib64): a member under one is refused, and so
    is a second member at a path already written."""
    venv, elsewhere = tmp_path / "venv", tmp_path / "elsewhere"
    venv.mkdir()
    elsewhere.mkdir()
    (venv / "lib64").symlink_to(elsewhere)
    top = str(venv).lstrip("/")
    through = _sources_tar(tmp_path / "a.tar", {f"{top}/lib64/m.py": b"X = 1\n"})
    with pytest.raises(ValueError, match="would be written outside"):
        compile_program.unpack(str(through), str(venv))
    assert list(elsewhere.iterdir()) == []
    twice = tmp_path / "b.tar"
    with tarfile.open(twice, "w") as tar:
        for data in (b"X = 1\n", b"X = 2\n"):
            info = tarfile.TarInfo(f"{top}/lib/m.py")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(FileExistsError):
        compile_program.unpack(str(twice), str(venv))
    assert (venv / "lib" / "m.py").read_bytes() == b"X = 1\n"


def test_parts_run_the_largest_first_and_each_is_packed_once_it_has_ended(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shards are contiguous runs of the sorted list (the compile histories the tests above
    rely on), run in order of their source bytes, the largest first; every shard runs, and its
    pycs are in the tar before the next one starts."""
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
    monkeypatch.setattr(compile_program, "history_free", lambda: True)
    parts = compile_program.plan([files[8:], files[:8]], 1)
    assert [name for part in parts for name in part] == files  # the union, sorted
    assert len(parts) == compile_program.SHARDS_PER_WORKER
    packed_before: list[int] = []
    real_run = compile_program.subprocess.run

    def run(*args: object, **kwargs: object) -> object:
        packed_before.append(len(packed.getmembers()))
        return real_run(*args, **kwargs)

    monkeypatch.setattr(compile_program.subprocess, "run", run)
    with tarfile.open(tmp_path / "p.tar", "w") as packed:
        codes = compile_program.run_parts(tmp_path / "list", parts, 1, packed)
    assert codes == [0] * compile_program.SHARDS_PER_WORKER
    assert packed_before == [0, 4, 8, 12]
    with tarfile.open(tmp_path / "p.tar") as tar:
        names = tar.getnames()
    tag = sys.implementation.cache_tag
    # Four shards of four files: m08-m11 holds the two large files and runs first.
    order = [8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 12, 13, 14, 15]
    assert names == [f"{str(prefix).lstrip('/')}{files[i][:-3]}.{tag}.pyc" for i in order]


def test_where_a_pyc_depends_on_its_process_each_list_is_one_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compile_program, "history_free", lambda: False)
    assert compile_program.plan([["/b/2.py", "/b/1.py"], [], ["/a/1.py"]], 2) == [
        ["/b/1.py", "/b/2.py"],
        ["/a/1.py"],
    ]


COMPILEALL = ["-m", "compileall", "-q", "-j", "1", "--invalidation-mode", "unchecked-hash", "-i"]


def _interpreters() -> list[str]:
    """This Python, and every other CPython 3.8+ pyenv holds on this machine."""
    found = {sys.executable}
    for python in sorted(Path.home().glob(".pyenv/versions/3.*/bin/python3")):
        minor = python.parent.parent.name.split(".")[1]
        if minor.isdigit() and int(minor) >= 8:
            found.add(str(python))
    return sorted(found)


@pytest.mark.parametrize("python", _interpreters())
def test_the_bytes_are_the_recipes_one_process_per_layer_on_every_python(
    tmp_path: Path, python: str
) -> None:
    """Two layers as the recipe compiles them (each layer's sorted list in one process of its
    own) and as the program does, on each Python found here. The second layer's frozenset
    constant holds strings the first layer's files hold too, and the first layer's files share
    one: on 3.8 to 3.10 and from 3.12, one process for both layers, or a shard boundary inside
    one, gives other bytes."""
    layer_a = {
        f"pkg_a/m{i}.py": f"def f{i}(p):\n    return p in {{'zzalpha', 'zzbeta'}}\n"
        for i in range(3)
    }
    layer_b = {
        # Compiled before mod.py in the recipe's process; a shard boundary falls between them.
        "pkg_b/a_first.py": "def k(p):\n    return p in {'zzalpha', 'zzbeta'}\n",
        "pkg_b/mod.py": (
            "import sys\n"
            "if sys.platform not in {'zzalpha', 'zzbeta'}:\n"
            "    pass\n"
            "def g(p):\n"
            "    return p in {'zzalpha', 'zzbeta'}\n"
        ),
        # Up to 3.10 the four items are written in their hash order: the seed decides them.
        "pkg_b/four.py": "def h(p):\n    return p in {'zza', 'zzb', 'zzc', 'zzd'}\n",
        **{f"pkg_b/n{i}.py": f"Y = {i}\n" for i in range(5)},
    }
    lists = [tmp_path / "list-a", tmp_path / "list-b"]
    _listed(tmp_path, layer_a, lists[0])
    _listed(tmp_path, layer_b, lists[1])
    recipe, program = tmp_path / "recipe", tmp_path / "program"
    for listing in lists:
        subprocess.run(
            [python, *COMPILEALL, str(listing)],
            # As templates/build/reprobox_install.py runs it.
            env={**os.environ, "PYTHONPYCACHEPREFIX": str(recipe), "PYTHONHASHSEED": "0"},
            check=True,
        )
    done = subprocess.run(
        [python, str(PROGRAM), *map(str, lists)],
        env={**os.environ, "PYTHONPYCACHEPREFIX": str(program), "PYTHONHASHSEED": "random"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    files = sorted(p.relative_to(recipe) for p in recipe.rglob("*.pyc"))
    assert len(files) == len(layer_a) + len(layer_b)
    assert files == sorted(p.relative_to(program) for p in program.rglob("*.pyc"))
    differ = [f for f in files if (recipe / f).read_bytes() != (program / f).read_bytes()]
    assert differ == []
