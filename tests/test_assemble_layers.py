"""The assemble route's parts that need no engine: layer tars, wheels into a layer, the config.

The route end to end (a real engine, the demo spec, the same files as the recipe) is in
test_assemble.py.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import json
import stat
import tarfile
import zipfile
from pathlib import Path

import pytest
from fakes import FakeEngine
from installer import install
from installer.destinations import SchemeDictionaryDestination
from installer.sources import WheelFile

from reprobox import layer_tar
from reprobox.archive import write_normalized_layer
from reprobox.assemble import _config, recipe_history, recipe_only
from reprobox.docker_engine import _go_mode, _go_time
from reprobox.engine import Change
from reprobox.errors import BadInputError, EngineError
from reprobox.layer_tar import LayerIndex, LayerWriter, archive_stream
from reprobox.locked import LockedWheel
from reprobox.opt_layers import hook_paths
from reprobox.pylayer import TargetPython, _Spool, write_wheels
from reprobox.render import RenderedContext
from reprobox.spec_load import load_spec

EPOCH = 1_600_000_000
SITE = "/opt/venv/lib/python3.11/site-packages"


def layer_files(path: Path) -> dict[str, tuple[bytes, int]]:
    """A layer tar's regular files: name -> (bytes, mode)."""
    files = {}
    with tarfile.open(path) as tar:
        for member in tar:
            if member.isfile():
                data = tar.extractfile(member)
                assert data is not None
                files[member.name] = (data.read(), member.mode)
    return files


def disk_files(root: Path) -> dict[str, tuple[bytes, int]]:
    """The regular files under `root` as a layer would hold them: relative name -> (bytes,
    0755 or 0644 by the owner's executable bit)."""
    files = {}
    for path in root.rglob("*"):
        if path.is_file():
            mode = 0o755 if path.stat().st_mode & stat.S_IXUSR else 0o644
            files[path.relative_to(root).as_posix()] = (path.read_bytes(), mode)
    return files


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


def test_a_layer_writes_each_folder_once_before_its_children_with_fixed_headers(
    tmp_path: Path,
) -> None:
    writer = LayerWriter(tmp_path / "l.tar", EPOCH, root="opt/venv")
    writer.file("opt/venv/a/b/c.py", io.BytesIO(b"x = 1\n"), 6, mtime=EPOCH + 99)
    writer.file("opt/venv/a/d.py", io.BytesIO(b""), 0, mode=0o755)
    writer.symlink("opt/venv/bin/python", "python3")
    layer = writer.close()
    names = [m.name for m in _members(layer.path)]
    assert names == [
        "opt",
        "opt/venv",
        "opt/venv/a",
        "opt/venv/a/b",
        "opt/venv/a/b/c.py",
        "opt/venv/a/d.py",
        "opt/venv/bin",
        "opt/venv/bin/python",
    ]
    for member in _members(layer.path):
        assert (member.uid, member.gid, member.uname, member.gname) == (0, 0, "", "")
        assert member.mtime == EPOCH  # never later than SOURCE_DATE_EPOCH
        assert not ({"atime", "ctime"} & set(member.pax_headers))
    modes = {m.name: m.mode for m in _members(layer.path)}
    assert (modes["opt/venv/a"], modes["opt/venv/a/b/c.py"], modes["opt/venv/a/d.py"]) == (
        0o755,
        0o644,
        0o755,
    )
    data = layer.path.read_bytes()
    assert layer.diff_id == "sha256:" + hashlib.sha256(data).hexdigest()
    assert layer.size == len(data)


def test_a_layer_is_the_same_bytes_every_time_and_on_every_host(tmp_path: Path) -> None:
    """A golden diff ID: if a Python's tarfile ever writes these headers differently, every
    assembled image's ID changes, and this says so first."""

    def write(path: Path) -> str:
        writer = LayerWriter(path, EPOCH, root="opt/venv")
        writer.file("opt/venv/pkg/__init__.py", io.BytesIO(b"VALUE = 1\n"), 10)
        writer.symlink("opt/venv/lib64", "lib")
        return writer.close().diff_id

    first, second = write(tmp_path / "1.tar"), write(tmp_path / "2.tar")
    assert first == second
    assert first == "sha256:622d58dc11a380c035eba98187d3a2163933271de235fa5bc7499d77c52a0429"


def test_a_layer_written_out_of_order_comes_out_as_the_normaliser_writes_it(
    tmp_path: Path,
) -> None:
    """pypa/installer writes a wheel's files in its zip's order and the pycs come last; the
    layer must still be the bytes the recipe's normaliser makes of the same entries (sorted),
    or the two routes give two image IDs for one set of files."""
    writer = LayerWriter(tmp_path / "l.tar", EPOCH, root="opt/venv")
    writer.file("opt/venv/lib/pkg/b.py", io.BytesIO(b"b\n"), 2)
    writer.file("opt/venv/bin/tool", io.BytesIO(b"#!x\n"), 4, mode=0o755)
    writer.file("opt/venv/lib/pkg/a.py", io.BytesIO(b"a\n"), 2)
    writer.file("opt/venv/lib/pkg/__pycache__/a.cpython-311.pyc", io.BytesIO(b"p"), 1)
    layer = writer.close()
    names = [m.name for m in _members(layer.path)]
    assert names == sorted(names)
    assert not (tmp_path / "l.tar.unsorted").exists()
    again = write_normalized_layer(layer.path, tmp_path / "n.tar", source_date_epoch=EPOCH)
    assert again == layer.diff_id
    assert (tmp_path / "n.tar").read_bytes() == layer.path.read_bytes()
    assert layer.size == layer.path.stat().st_size
    assert layer.diff_id == "sha256:" + hashlib.sha256(layer.path.read_bytes()).hexdigest()


def test_a_layer_written_in_order_is_already_what_the_normaliser_writes(tmp_path: Path) -> None:
    """The one-pass case (no second pass over the tar) must give the normaliser's bytes too."""
    writer = LayerWriter(tmp_path / "l.tar", EPOCH, root="opt/venv")
    writer.file("opt/venv/a.py", io.BytesIO(b"a\n"), 2, mtime=EPOCH - 5)
    writer.symlink("opt/venv/lib64", "lib")
    writer.file("opt/venv/z/x.sh", io.BytesIO(b"#!\n"), 3, mode=0o755)
    layer = writer.close()
    normalised = write_normalized_layer(layer.path, tmp_path / "n.tar", source_date_epoch=EPOCH)
    assert normalised == layer.diff_id
    assert (tmp_path / "n.tar").read_bytes() == layer.path.read_bytes()


def test_long_and_non_ascii_names_are_the_same_bytes_every_time_and_read_back_whole(
    tmp_path: Path,
) -> None:
    """Names past the 100-byte ustar field and names in UTF-8 (wheels hold both) go into PAX
    headers; a golden diff ID pins those bytes too."""
    deep = "opt/venv/lib/python3.11/site-packages/" + "/".join(["a_rather_long_folder"] * 6)
    names = [f"{deep}/module_{'x' * 80}.py", "opt/venv/share/données/日本語.txt"]
    target = "../" * 40 + "lib"

    def write(path: Path) -> str:
        writer = LayerWriter(path, EPOCH, root="opt/venv")
        for name in names:
            writer.file(name, io.BytesIO(b"z\n"), 2)
        writer.symlink("opt/venv/share/link", target)
        return writer.close().diff_id

    first, second = write(tmp_path / "1.tar"), write(tmp_path / "2.tar")
    assert first == second
    assert first == "sha256:ab114f50edbd024ef771ebf7f6f7f0ae2ac29d17be161bd31d1dd7607d7d58df"
    members = {m.name: m for m in _members(tmp_path / "1.tar")}
    assert set(names) <= set(members)
    assert members["opt/venv/share/link"].linkname == target


@pytest.mark.parametrize(
    ("name", "target"),
    [("opt/venv/a\nb.py", ""), ("opt/venv/a\x1b[2J.py", ""), ("opt/venv/link", "lib\nx")],
)
def test_a_name_or_link_with_a_control_character_is_refused(
    tmp_path: Path, name: str, target: str
) -> None:
    """Wheels and the engine's answers (the hook's changes) both reach the writer."""
    writer = LayerWriter(tmp_path / "l.tar", EPOCH, root="opt/venv")

    def write() -> None:
        if target:
            writer.symlink(name, target)
        else:
            writer.file(name, io.BytesIO(b""), 0)

    with pytest.raises(BadInputError, match="control character"):
        write()
    writer.abort()


def test_the_same_file_twice_is_written_once_and_a_different_one_is_refused(
    tmp_path: Path,
) -> None:
    writer = LayerWriter(tmp_path / "l.tar", EPOCH, root="opt/venv")
    digest = hashlib.sha256(b"").hexdigest()
    assert writer.file("opt/venv/nvidia/__init__.py", io.BytesIO(b""), 0, sha256=digest)
    assert not writer.file("opt/venv/nvidia/__init__.py", io.BytesIO(b""), 0, sha256=digest)
    with pytest.raises(BadInputError, match="two different entries"):
        writer.file("opt/venv/nvidia/__init__.py", io.BytesIO(b"x"), 1, sha256="0" * 64)
    writer.abort()
    assert not (tmp_path / "l.tar").exists()


def test_a_tar_written_straight_to_its_sink_is_the_stream_modes_bytes(tmp_path: Path) -> None:
    """Layers are written with `mode="w"` and 1 MB copies; the normaliser's bytes were those
    of tarfile's stream mode. Files past one 10 KB record and one copy, of odd sizes, and an
    empty one: the same bytes either way."""
    from reprobox._files import HashingWriter
    from reprobox.layer_tar import _tar_writer

    sizes = [0, 1, 10_241, (2 << 20) + 12_345, 513]
    blobs = [bytes((i * 7 + n) % 251 for i in range(n)) for n in sizes]

    def add(tar: tarfile.TarFile) -> None:
        for number, blob in enumerate(blobs):
            info = tarfile.TarInfo(f"opt/venv/f{number}")
            info.size, info.mtime = len(blob), EPOCH
            tar.addfile(info, io.BytesIO(blob))

    with (
        (tmp_path / "stream.tar").open("wb") as raw,
        tarfile.open(fileobj=raw, mode="w|", format=tarfile.PAX_FORMAT) as stream,
    ):
        add(stream)
    with (tmp_path / "direct.tar").open("wb") as raw:
        sink = HashingWriter(raw)
        with _tar_writer(sink) as direct:
            add(direct)
    expected = (tmp_path / "stream.tar").read_bytes()
    assert (tmp_path / "direct.tar").read_bytes() == expected
    assert sink.size == len(expected)
    assert sink.hexdigest() == hashlib.sha256(expected).hexdigest()


def _no_second_pass(*args: object, **kwargs: object) -> str:
    raise AssertionError("the layer took the normaliser's second pass")


def test_an_index_writes_its_layer_in_one_pass_in_the_normalisers_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Entries given in installer's order (pycs last), and a folder (`pkg/b`) whose only entry
    (`pkg/b/c.py`) sorts after a file beside the folder (`pkg/b!x`): a folder made when its
    first entry is written would come out of order. Written once, sorted, each folder in its
    sorted place, the bytes the normaliser (and the writer's second pass) give."""
    entries = [
        ("opt/venv/lib/pkg/b/c.py", b"c\n", 0o644),
        ("opt/venv/bin/tool", b"#!x\n", 0o755),
        ("opt/venv/lib/pkg/b!x", b"x", 0o644),
        ("opt/venv/lib/pkg/__pycache__/a.cpython-311.pyc", b"p", 0o644),
        ("opt/venv/lib/pkg/a.py", b"a\n", 0o644),
    ]
    index = LayerIndex("opt/venv")
    writer = LayerWriter(tmp_path / "w.tar", EPOCH, root="opt/venv")
    for name, data, mode in entries:
        assert index.file(name, functools.partial(io.BytesIO, data), len(data), mode=mode)
        writer.file(name, io.BytesIO(data), len(data), mode=mode)
    index.symlink("opt/venv/lib64", "lib")
    writer.symlink("opt/venv/lib64", "lib")
    expected = writer.close()  # out of order: its second pass sorts it
    with monkeypatch.context() as patched:
        patched.setattr(layer_tar, "write_normalized_layer", _no_second_pass)
        layer = index.write(tmp_path / "i.tar", EPOCH)
    names = [m.name for m in _members(layer.path)]
    assert names == sorted(names)
    assert names.index("opt/venv/lib/pkg/b") < names.index("opt/venv/lib/pkg/b!x")
    assert layer.diff_id == expected.diff_id
    assert layer.path.read_bytes() == expected.path.read_bytes()
    assert layer.diff_id == "sha256:" + hashlib.sha256(layer.path.read_bytes()).hexdigest()


def test_an_index_takes_the_same_file_once_and_refuses_a_different_one(tmp_path: Path) -> None:
    index = LayerIndex("opt/venv")
    digest = hashlib.sha256(b"").hexdigest()
    empty = functools.partial(io.BytesIO, b"")
    assert index.file("opt/venv/nvidia/__init__.py", empty, 0, sha256=digest)
    assert not index.file("opt/venv/nvidia/__init__.py", empty, 0, sha256=digest)
    with pytest.raises(BadInputError, match="two different entries"):
        index.file("opt/venv/nvidia/__init__.py", empty, 0, sha256="0" * 64)
    with pytest.raises(BadInputError, match="a folder and a file"):
        index.directory("opt/venv/nvidia/__init__.py")
    with pytest.raises(BadInputError, match="outside"):
        index.file("opt/venv/../etc/passwd", empty, 0)
    with pytest.raises(BadInputError, match="control character"):
        index.symlink("opt/venv/link", "lib\nx")
    # A file with an entry under it is refused when the layer is written, and no layer is left.
    index.file("opt/venv/a", empty, 0)
    index.file("opt/venv/a/b.py", empty, 0)
    with pytest.raises(BadInputError, match="not a folder"):
        index.write(tmp_path / "l.tar", EPOCH)
    assert not (tmp_path / "l.tar").exists()


@pytest.mark.parametrize(
    "name", ["opt/venv/../etc/passwd", "etc/passwd", "opt/venvx/a", "opt/venv//a", "opt/venv/./a"]
)
def test_an_entry_outside_the_venv_is_refused(tmp_path: Path, name: str) -> None:
    writer = LayerWriter(tmp_path / "l.tar", EPOCH, root="opt/venv")
    with pytest.raises(BadInputError, match="outside"):
        writer.file(name, io.BytesIO(b""), 0)
    writer.abort()


def _wheel(path: Path) -> Path:
    """A small wheel with what an installer must handle: a package, a console script, a
    `.data/scripts` file with a `#!python` line, data and headers."""
    dist = "demo_pkg-1.0"
    files = {
        "demo_pkg/__init__.py": b"def main():\n    return 0\n",
        "demo_pkg/sub/mod.py": b"X = 2\n",
        "demo_pkg/table.bin": b"\x00\x01",
        f"{dist}.data/scripts/demo-tool": b"#!python\nprint('tool')\n",
        f"{dist}.data/data/share/demo/readme.txt": b"data\n",
        f"{dist}.data/headers/demo.h": b"#define DEMO 1\n",
        f"{dist}.dist-info/METADATA": b"Metadata-Version: 2.1\nName: demo-pkg\nVersion: 1.0\n",
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        f"{dist}.dist-info/entry_points.txt": b"[console_scripts]\ndemo = demo_pkg:main\n",
    }
    record = [f"{name},sha256={_urlsafe(data)},{len(data)}" for name, data in files.items()] + [
        f"{dist}.dist-info/RECORD,,"
    ]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist}.dist-info/RECORD", "\n".join(record) + "\n")
    return path


def _locked(wheel_path: Path, name: str) -> tuple[LockedWheel, str]:
    """`wheel_path` as the lock would name it, and its sha256."""
    digest = hashlib.sha256(wheel_path.read_bytes()).hexdigest()
    url = f"https://example.invalid/{wheel_path.name}"
    wheel = LockedWheel(name, "1.0", wheel_path.name, url, digest, "rest")
    return wheel, digest


def _urlsafe(data: bytes) -> str:
    import base64

    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _target(skeleton: Path) -> TargetPython:
    return TargetPython(
        purelib=SITE,
        platlib=SITE,
        scripts="/opt/venv/bin",
        data="/opt/venv",
        version="3.11",
        cache_tag="cpython-311",
        skeleton=skeleton,
    )


@pytest.mark.parametrize("with_sources", [False, True], ids=["layer-alone", "layer-and-sources"])
def test_wheels_go_into_the_layer_as_pypa_installer_writes_them_on_disk(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, with_sources: bool
) -> None:
    """The layer alone, as a build writes it, and with the `.py` files copied out on the way
    (read back from the spool)."""
    wheel_path = _wheel(tmp_path / "demo_pkg-1.0-py3-none-any.whl")
    locked, digest = _locked(wheel_path, "demo-pkg")
    target = _target(tmp_path / "unused")
    layer_path, sources_path = tmp_path / "layer.tar", tmp_path / "sources.tar"
    index, spool = LayerIndex("opt/venv"), _Spool(tmp_path)
    with (
        tarfile.open(sources_path, "w", format=tarfile.PAX_FORMAT) as sources,
        contextlib.closing(spool),
    ):
        python_files = write_wheels(
            (index, spool),
            sources if with_sources else None,
            spool_dir=tmp_path,
            target=target,
            wheels=[locked],
            files={digest: wheel_path},
        )
        with monkeypatch.context() as patched:
            patched.setattr(layer_tar, "write_normalized_layer", _no_second_pass)
            written = index.write(layer_path, EPOCH)
    # Written once, already in the normaliser's order, each file read back from the spool.
    names = [m.name for m in _members(layer_path)]
    assert names == sorted(names)
    again = write_normalized_layer(layer_path, tmp_path / "n.tar", source_date_epoch=EPOCH)
    assert again == written.diff_id
    if with_sources:
        assert python_files == [f"{SITE}/demo_pkg/__init__.py", f"{SITE}/demo_pkg/sub/mod.py"]

    # The same wheel through pypa/installer's own destination onto this disk, under `root`.
    root = tmp_path / "root"
    scheme = {key: str(root / value) for key, value in target.scheme("demo-pkg").items()}
    on_disk = SchemeDictionaryDestination(
        scheme,
        interpreter="/opt/venv/bin/python",
        script_kind="posix",
        bytecode_optimization_levels=[],
    )
    with zipfile.ZipFile(wheel_path) as archive:
        install(WheelFile(archive), on_disk, additional_metadata={})
    layer = layer_files(layer_path)
    assert layer == disk_files(root)
    assert f"{SITE[1:]}/demo_pkg-1.0.dist-info/RECORD" in layer
    assert layer["opt/venv/bin/demo-tool"][0].startswith(b"#!/opt/venv/bin/python\n")
    assert layer["opt/venv/bin/demo"][1] == 0o755
    assert "opt/venv/include/site/python3.11/demo-pkg/demo.h" in layer  # where pip puts it
    assert "opt/venv/share/demo/readme.txt" in layer
    with tarfile.open(sources_path) as tar:
        assert sorted(tar.getnames()) == [p.lstrip("/") for p in python_files]
        for member in tar:
            data = tar.extractfile(member)
            assert data is not None
            assert (data.read(), 0o644) == layer[member.name]  # the bytes the layer holds


@pytest.mark.parametrize(
    ("member", "with_layer"),
    [
        ("evil-1.0.data/data/../../../etc/cron.d/x", True),
        # The first pass reads only .py files, for the compile container: checked there too.
        ("evil-1.0.data/purelib/../../../../usr/lib/python3.11/sitecustomize.py", False),
        ("evil/line\nbreak.py", False),
    ],
)
def test_a_wheel_that_would_write_outside_its_folder_is_refused(
    tmp_path: Path, member: str, with_layer: bool
) -> None:
    wheel_path = tmp_path / "evil-1.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel_path, "w") as archive:
        archive.writestr(member, b"import os\n")
        archive.writestr("evil-1.0.dist-info/METADATA", b"Name: evil\nVersion: 1.0\n")
        archive.writestr("evil-1.0.dist-info/WHEEL", b"Wheel-Version: 1.0\nRoot-Is-Purelib: true\n")
        archive.writestr("evil-1.0.dist-info/RECORD", b"")
    locked, digest = _locked(wheel_path, "evil")
    spool = _Spool(tmp_path)
    with (
        tarfile.open(tmp_path / "s.tar", "w") as sources,
        contextlib.closing(spool),
        pytest.raises(BadInputError, match="would land outside"),
    ):
        write_wheels(
            (LayerIndex("opt/venv"), spool) if with_layer else None,
            sources,
            spool_dir=tmp_path,
            target=_target(tmp_path / "unused"),
            wheels=[locked],
            files={digest: wheel_path},
        )
    with tarfile.open(tmp_path / "s.tar") as written:
        assert written.getnames() == []  # nothing reached the compile container's input


def test_a_file_cannot_be_a_folder_in_one_layer(tmp_path: Path) -> None:
    writer = LayerWriter(tmp_path / "l.tar", EPOCH, root="opt/venv")
    writer.file("opt/venv/a", io.BytesIO(b""), 0)
    with pytest.raises(BadInputError, match="not a folder"):
        writer.file("opt/venv/a/b.py", io.BytesIO(b""), 0)
    with pytest.raises(BadInputError, match="a folder and a file"):
        writer.directory("opt/venv/a")
    writer.abort()


def test_the_streamed_archive_loads_as_the_config_digest(tmp_path: Path) -> None:
    writer = LayerWriter(tmp_path / "l.tar", EPOCH, root="opt/reprobox")
    writer.file("opt/reprobox/spec.yaml", io.BytesIO(b"name: x\n"), 8)
    layer = writer.close()
    config = json.dumps(
        {
            "architecture": "amd64",
            "os": "linux",
            "rootfs": {"type": "layers", "diff_ids": [layer.diff_id]},
        },
        sort_keys=True,
        separators=(",", ":"),
    ).encode()
    engine = FakeEngine()
    loaded = engine.load_stream(
        archive_stream([(layer.diff_id, layer.path, layer.size)], config, EPOCH), "test"
    )
    assert loaded == ["sha256:" + hashlib.sha256(config).hexdigest()]


def test_the_hooks_changes_are_its_files_not_opt_reprobox_and_nothing_deleted() -> None:
    changes = [
        Change("changed", "/usr"),
        Change("changed", "/usr/lib/python3.11"),
        Change("changed", "/usr/lib/python3.11/sitecustomize.py"),
        Change("added", "/usr/lib/python3.11/reprobox_chained_sitecustomize.py"),
        Change("added", "/opt"),
        Change("added", "/opt/reprobox/reprobox_hook.py"),
        Change("changed", "/var/lib/dpkg/diversions"),
    ]
    assert hook_paths(changes) == [
        "usr/lib/python3.11/reprobox_chained_sitecustomize.py",
        "usr/lib/python3.11/sitecustomize.py",
        "var/lib/dpkg/diversions",
    ]
    with pytest.raises(EngineError, match="deleted"):
        hook_paths([*changes, Change("deleted", "/etc/python3.11/sitecustomize.py")])
    # A Python under /opt (conda's): its sitecustomize is the hook's, and stays.
    conda = [
        Change("changed", "/opt"),
        Change("added", "/opt/reprobox"),
        Change("added", "/opt/reprobox/reprobox_hook.py"),
        Change("changed", "/opt/conda/lib/python3.11"),
        Change("added", "/opt/conda/lib/python3.11/sitecustomize.py"),
    ]
    assert hook_paths(conda) == ["opt/conda/lib/python3.11/sitecustomize.py"]


def test_go_times_and_modes_from_the_engines_stat() -> None:
    # The daemon's own time zone; nanoseconds dropped as a tar header does.
    assert _go_time("2024-01-01T12:00:00.123456789+02:00") == _go_time("2024-01-01T10:00:00Z")
    assert _go_time("2024-01-01T10:00:00Z") == 1_704_103_200
    with pytest.raises(ValueError, match="RFC 3339"):
        _go_time("2024-01-01 10:00")
    go_dir, go_sticky, go_setgid = 1 << 31, 1 << 20, 1 << 22
    assert _go_mode(go_dir | 0o755) == 0o755
    assert _go_mode(go_dir | go_sticky | 0o777) == 0o1777
    assert _go_mode(go_setgid | 0o2755 & 0o777) == 0o2755


def test_the_config_is_the_bases_with_the_recipes_env_labels_and_history(tmp_path: Path) -> None:
    base = {
        "architecture": "amd64",
        "os": "linux",
        "created": "2020-01-01T00:00:00Z",
        "config": {"Env": ["PATH=/usr/bin:/bin", "LANG=C.UTF-8"], "Cmd": ["bash"]},
        "history": [{"created": "2020-01-01T00:00:00Z", "created_by": "base"}],
        "rootfs": {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]},
    }
    rendered = RenderedContext(
        path=tmp_path,
        base_ref="sha256:" + "b" * 64,
        name="demo",
        content_tag="0" * 12,
        labels=(("reprobox.version", "1"),),
        env=(("OMP_NUM_THREADS", "1"), ("PYTHONHASHSEED", "0")),
        lock_sha256="c" * 64,
        source_date_epoch=EPOCH,
        inputs_sha256="e" * 64,
    )
    diff_ids = ["sha256:" + "a" * 64, "sha256:" + "d" * 64]
    labels = {"reprobox.selfcheck-argv": "[]"}
    history = recipe_history(rendered, labels)
    raw = _config(base, rendered, labels, diff_ids, history)
    config = json.loads(raw)
    assert config["config"]["Env"] == [
        "PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        "LANG=C.UTF-8",
        "VIRTUAL_ENV=/opt/venv",
        "OMP_NUM_THREADS=1",
        "PYTHONHASHSEED=0",
    ]
    assert config["config"]["Labels"] == {"reprobox.version": "1", "reprobox.selfcheck-argv": "[]"}
    assert config["config"]["Cmd"] == ["bash"]
    # The lines a `docker build` of the recipe writes (the classic builder's, a COPY's source
    # hash dropped by the normaliser): ENV and LABEL steps make no layer.
    nop = "/bin/sh -c #(nop) "
    assert [(h["created_by"], h.get("empty_layer", False)) for h in config["history"]] == [
        ("base", False),
        (f"{nop}COPY dir in /opt/venv ", False),
        (f"{nop}COPY dir in / ", False),
        (f"{nop}COPY dir in /opt/reprobox/ ", False),
        ("/bin/sh -c python3 /opt/reprobox/reprobox_hook.py install", False),
        (
            f"{nop} ENV VIRTUAL_ENV=/opt/venv PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin"
            ":/usr/sbin:/usr/bin:/sbin:/bin OMP_NUM_THREADS=1 PYTHONHASHSEED=0",
            True,
        ),
        (f"{nop} LABEL reprobox.version=1", True),
        (f"{nop} LABEL reprobox.selfcheck-argv=[]", True),
    ]
    assert {h["created"] for h in config["history"]} == {"2020-09-13T12:26:40Z"}
    assert config["created"] == "2020-09-13T12:26:40Z"
    assert config["rootfs"]["diff_ids"] == diff_ids
    assert raw == _config(base, rendered, labels, diff_ids, recipe_history(rendered, labels))
    # The builder adds one LABEL step per build label, sorted by key, and none without any.
    two = recipe_history(rendered, {"b": "2", "a": "1"})[-2:]
    assert [h["created_by"] for h in two] == [f"{nop} LABEL a=1", f"{nop} LABEL b=2"]
    assert recipe_history(rendered, {})[-1]["created_by"] == f"{nop} LABEL reprobox.version=1"


def test_a_failed_build_keeps_nothing_of_the_hook_layer_made_meanwhile(tmp_path: Path) -> None:
    from concurrent.futures import Future

    from reprobox.assemble import _PendingHook
    from reprobox.layer_tar import Layer

    dest = tmp_path / ".hook.partial"
    dest.write_bytes(b"layer")
    made: Future[Layer] = Future()
    made.set_result(Layer("sha256:" + "0" * 64, dest, 5))
    _PendingHook(writing=None, key="k", layer=made, dest=dest).discard()  # type: ignore[arg-type]
    assert not dest.exists()


def _pyc_tar(path: Path, names: list[str]) -> Path:
    with tarfile.open(path, "w") as tar:
        for name in names:
            info = tarfile.TarInfo(f"reprobox-pyc{name}")
            info.size = len(name)
            tar.addfile(info, io.BytesIO(name.encode()))
    return path


def test_each_layer_takes_its_own_pycs_from_the_shared_tar_and_a_stray_one_fails(
    tmp_path: Path,
) -> None:
    from reprobox.pycompile import Sources, append_pycs

    pkg = f"{SITE}/pkg"
    sources = [
        Sources(tmp_path / "a.tar", frozenset({f"{pkg}/a.py", f"{pkg}/x.y.py"})),
        Sources(tmp_path / "b.tar", frozenset({f"{pkg}/b.py"})),
    ]
    shared = _pyc_tar(
        tmp_path / "pycs.tar",
        [f"{pkg}/b.cpython-311.pyc", f"{pkg}/x.y.cpython-311.pyc", f"{pkg}/a.cpython-311.pyc"],
    )
    layers = [LayerIndex("opt/venv") for _ in "ab"]
    with contextlib.ExitStack() as opened:
        append_pycs(layers, [shared, shared], sources, "cpython-311", opened)
        paths = [
            index.write(tmp_path / f"{n}.tar", EPOCH).path
            for n, index in zip("ab", layers, strict=True)
        ]
    written = [[m.name for m in _members(path) if m.isfile()] for path in paths]
    assert written == [
        [f"{pkg[1:]}/__pycache__/a.cpython-311.pyc", f"{pkg[1:]}/__pycache__/x.y.cpython-311.pyc"],
        [f"{pkg[1:]}/__pycache__/b.cpython-311.pyc"],
    ]
    # A pyc of no layer's file (here: another cache tag) is named, not dropped.
    stray = _pyc_tar(tmp_path / "stray.tar", [f"{pkg}/a.cpython-399.pyc"])
    with (
        contextlib.ExitStack() as opened,
        pytest.raises(EngineError, match=r"1 pycs of no layer.*a\.cpython-399\.pyc"),
    ):
        append_pycs([LayerIndex("opt/venv")], [stray], sources[:1], "cpython-311", opened)


def test_the_wait_for_the_pycs_ends_when_the_compile_ends_without_them() -> None:
    from concurrent.futures import Future

    from reprobox.pylayer import _pycs_when_ready

    ready: Future[list[Path | None]] = Future()
    compiling: Future[None] = Future()
    compiling.set_result(None)
    with pytest.raises(EngineError, match="without giving its pycs"):
        _pycs_when_ready(ready, compiling)
    ready.set_result([None])
    assert _pycs_when_ready(ready, compiling) == [None]


_ROUTE_SPEC = """\
version: 1
name: route
base:
  {base}
python: "{python}"
torch:
  version: "{torch}"
  cuda: cpu
apt: [{apt}]
"""
_PINNED = 'image: "registry.example/b:1@sha256:' + "b" * 64 + '"'


@pytest.mark.parametrize(
    ("base", "python", "apt", "why"),
    [
        ("bootstrap: debian:bookworm", "3.11", "", None),
        ("bootstrap: debian:bookworm", "3.11", "curl", None),  # in the bootstrapped base
        ("bootstrap: debian:trixie", "3.13", "", None),
        (_PINNED, "3.12", "", "a pinned `base.image`"),
        (
            _PINNED,
            "3.11",
            "curl",
            "`apt:` packages on a pinned `base.image` are installed by a RUN step",
        ),
        (_PINNED, "3.9", "", "on Python 3.9 the recipe installs with pip"),
        (_PINNED, "3.8", "", "on Python 3.8 the recipe installs with pip"),
    ],
    ids=["bootstrap", "bootstrap-apt", "trixie", "image", "image-apt", "image-3.9", "image-3.8"],
)
def test_the_default_route_assembles_where_that_gives_the_recipes_image(
    tmp_path: Path, base: str, python: str, apt: str, why: str | None
) -> None:
    spec = tmp_path / "spec.yaml"
    torch = "2.4.1" if python in {"3.8", "3.9"} else "2.13.0"  # torch 2.13 needs 3.10
    spec.write_text(_ROUTE_SPEC.format(base=base, python=python, apt=apt, torch=torch))
    found = recipe_only(load_spec(spec))
    if why is None:
        assert found is None
    else:
        assert found is not None
        assert found.startswith(why)
