"""normalize_image: synthetic archives through a fake engine, then real builds in Docker."""

from __future__ import annotations

import contextlib
import io
import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from archives import (
    BUILD_TIME,
    ArchiveEngine,
    Entry,
    directory,
    hash_pyc,
    layer,
    raw_config,
    read_archive,
    sha256,
    timestamp_pyc,
    write_archive,
)
from engine_admin import remove_image

from reprobox._files import rfc3339
from reprobox.bootstrap import BaseImage
from reprobox.cli_format import format_diff
from reprobox.diff import diff_images
from reprobox.docker_engine import DockerEngine
from reprobox.errors import ImageNotFoundError, ReproboxError
from reprobox.normalize import NormalizedImage, normalize_config, normalize_image

SDE = 1_700_000_000  # 2023-11-14T22:13:20Z, earlier than BUILD_TIME


@pytest.fixture
def engine(tmp_path: Path) -> ArchiveEngine:
    store = tmp_path / "store"
    store.mkdir()
    return ArchiveEngine(store)


def load(engine: ArchiveEngine, tmp_path: Path, layers: list[bytes], **config: Any) -> str:
    """Put an image of `layers` into the engine; its raw ID."""
    archive = tmp_path / f"raw-{len(engine.archives)}.tar"
    write_archive(archive, {**raw_config(layers), **config}, layers)
    (image_id,) = engine.load(archive)
    return image_id


def normalized(
    engine: ArchiveEngine, tmp_path: Path, image_id: str, **kwargs: Any
) -> tuple[NormalizedImage, dict[str, Any], list[tarfile.TarFile]]:
    """Normalise; the result, its config, and its layers opened for reading."""
    result = normalize_image(
        engine, image_id, source_date_epoch=SDE, workdir=tmp_path / "work", **kwargs
    )
    config, layers = read_archive(engine.archives[result.image_id])
    assert result.image_id == sha256(config)
    assert list(result.diff_ids) == [sha256(data) for data in layers]
    return result, json.loads(config), [tarfile.open(fileobj=io.BytesIO(d)) for d in layers]


def names(tar: tarfile.TarFile) -> list[str]:
    return [m.name.rstrip("/") for m in tar.getmembers()]


# --- layers ----------------------------------------------------------------------------------


def test_entries_are_sorted_clamped_and_owned_by_numbers(
    engine: ArchiveEngine, tmp_path: Path
) -> None:
    old = SDE - 86_400
    raw = layer(
        Entry("usr/bin/b", b"b", mode=0o755, uid=1000, gid=1000, uname="alice", gname="staff"),
        directory("usr"),
        Entry("usr/bin/a", b"a", mtime=old),
        directory("usr/bin"),
        Entry("usr/bin/link", type=tarfile.SYMTYPE, linkname="a"),
    )
    _, _, (out,) = normalized(engine, tmp_path, load(engine, tmp_path, [raw]))
    assert names(out) == ["usr", "usr/bin", "usr/bin/a", "usr/bin/b", "usr/bin/link"]
    members = {m.name.rstrip("/"): m for m in out.getmembers()}
    assert members["usr/bin/a"].mtime == old  # older than SOURCE_DATE_EPOCH: kept
    assert members["usr/bin/b"].mtime == SDE  # newer: clamped
    assert (members["usr/bin/b"].uid, members["usr/bin/b"].gid) == (1000, 1000)
    assert members["usr/bin/b"].mode == 0o755
    assert members["usr/bin/link"].linkname == "a"
    for member in out.getmembers():
        assert (member.uname, member.gname) == ("", "")
        assert not {"atime", "ctime", "mtime"} & member.pax_headers.keys()


def test_hard_links_survive_sorting(engine: ArchiveEngine, tmp_path: Path) -> None:
    raw = layer(
        Entry("z/data", b"shared"),
        Entry("a/alias", type=tarfile.LNKTYPE, linkname="z/data"),
    )
    _, _, (out,) = normalized(engine, tmp_path, load(engine, tmp_path, [raw]))
    first, second = out.getmembers()
    assert (first.name, first.isreg()) == ("a/alias", True)  # the data moves to the first name
    assert (second.name, second.islnk(), second.linkname) == ("z/data", True, "a/alias")
    extracted = out.extractfile(first)
    assert extracted is not None
    assert extracted.read() == b"shared"


def test_build_debris_is_dropped_and_the_rest_kept(engine: ArchiveEngine, tmp_path: Path) -> None:
    raw = layer(
        directory("tmp", mode=0o1777),
        Entry("tmp/pip-unpack-x7d2/wheel.whl", b"w"),
        directory("var/log/apt"),
        Entry("var/log/apt/history.log", b"Start-Date: 2027-01-15"),
        Entry("var/log/dpkg.log", b"2027-01-15 status installed"),
        Entry("var/cache/apt/pkgcache.bin", b"cache"),
        directory("var/cache/apt/archives/partial"),
        Entry("var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease", b"index"),
        Entry("var/cache/ldconfig/aux-cache", b"inodes"),
        Entry("root/.cache/pip/http-v2/a/b/c", b"cached"),
        Entry("home/dev/.cache/uv/wheels/x", b"cached"),
        Entry("opt/app/__pycache__/imported.cpython-311.pyc", timestamp_pyc()),
        Entry(
            "opt/app/__pycache__/alias.cpython-311.pyc",
            type=tarfile.LNKTYPE,
            linkname="opt/app/__pycache__/imported.cpython-311.pyc",
        ),
        Entry("opt/app/__pycache__/compiled.cpython-311.pyc", hash_pyc()),
        Entry("opt/app/imported.py", b"X = 1\n"),
        Entry("var/log.txt", b"not below /var/log"),
        Entry("etc/tmp/kept", b"not below /tmp"),
    )
    result, _, (out,) = normalized(engine, tmp_path, load(engine, tmp_path, [raw]))
    assert names(out) == [
        "etc/tmp/kept",
        "opt/app/__pycache__/compiled.cpython-311.pyc",
        "opt/app/imported.py",
        "tmp",
        "var/cache/apt/archives/partial",
        "var/log.txt",  # plain string order: "." sorts before "/"
        "var/log/apt",
    ]
    assert result.removed == (
        "/home/dev/.cache/uv/wheels/x",
        "/opt/app/__pycache__/alias.cpython-311.pyc",
        "/opt/app/__pycache__/imported.cpython-311.pyc",
        "/root/.cache/pip/http-v2/a/b/c",
        "/tmp/pip-unpack-x7d2/wheel.whl",
        "/var/cache/apt/pkgcache.bin",
        "/var/cache/ldconfig/aux-cache",
        "/var/lib/apt/lists/deb.debian.org_dists_bookworm_InRelease",
        "/var/log/apt/history.log",
        "/var/log/dpkg.log",
    )


def test_whiteouts_stay_where_they_hide_something(engine: ArchiveEngine, tmp_path: Path) -> None:
    lower = layer(
        Entry("etc/motd", b"hello"),
        Entry("tmp/tmp.Xq1z9", b"debris"),
        Entry("opt/tree/file", b"f"),
    )
    upper = layer(
        Entry("etc/.wh.motd"),  # hides etc/motd: kept
        Entry("tmp/.wh.tmp.Xq1z9"),  # hid debris that is gone: dropped
        Entry("opt/.wh.tree"),  # hides a directory with files in it: kept
        Entry("opt/.wh.never-there"),  # hides nothing: dropped
        Entry("srv/.wh..wh..opq"),  # an opaque directory that is kept
        Entry("tmp/build/.wh..wh..opq"),  # inside debris: goes with it
    )
    result, _, (_, out) = normalized(engine, tmp_path, load(engine, tmp_path, [lower, upper]))
    assert names(out) == ["etc/.wh.motd", "opt/.wh.tree", "srv/.wh..wh..opq"]
    assert "/tmp/.wh.tmp.Xq1z9" in result.removed


def test_only_the_layers_above_the_base_are_rewritten(
    engine: ArchiveEngine, tmp_path: Path
) -> None:
    base_layer = layer(Entry("var/log/base.log", b"base"), Entry("a", b"unsorted"), directory("b"))
    base_id = load(engine, tmp_path, [base_layer])
    upper = layer(Entry("var/log/build.log", b"noise"), Entry("srv/app", b"app"))
    image_id = load(engine, tmp_path, [base_layer, upper])
    result, _, layers = normalized(engine, tmp_path, image_id, base_image=base_id)
    assert result.diff_ids[0] == sha256(base_layer)  # byte for byte
    assert names(layers[0]) == ["var/log/base.log", "a", "b"]
    assert names(layers[1]) == ["srv/app"]
    # Without the base, its layer is rewritten too: a different image.
    whole, _, _ = normalized(engine, tmp_path, image_id)
    assert whole.diff_ids[0] != sha256(base_layer)
    assert whole.image_id != result.image_id


def test_a_base_that_is_not_below_the_image_is_refused(
    engine: ArchiveEngine, tmp_path: Path
) -> None:
    other = load(engine, tmp_path, [layer(Entry("x", b"x"))])
    image_id = load(engine, tmp_path, [layer(Entry("y", b"y"))])
    with pytest.raises(ReproboxError, match="is not built on"):
        normalize_image(engine, image_id, source_date_epoch=SDE, workdir=tmp_path, base_image=other)


def test_the_workdir_is_left_clean(engine: ArchiveEngine, tmp_path: Path) -> None:
    normalized(engine, tmp_path, load(engine, tmp_path, [layer(Entry("x", b"x"))]))
    assert list((tmp_path / "work").iterdir()) == []


# --- config and image ID ---------------------------------------------------------------------


def test_config_loses_build_host_fields_and_gets_fixed_times() -> None:
    raw = raw_config([b"layer"])
    out = json.loads(normalize_config(raw, diff_ids=["sha256:" + "a" * 64], source_date_epoch=SDE))
    assert rfc3339(SDE) == "2023-11-14T22:13:20Z"
    assert out["created"] == rfc3339(SDE)
    assert [h["created"] for h in out["history"]] == [rfc3339(SDE)]
    assert [h["created_by"] for h in out["history"]] == ["/bin/sh -c step 0"]
    assert not {"container", "container_config", "docker_version"} & out.keys()
    assert not {"Hostname", "Image"} & out["config"].keys()
    assert out["config"]["Env"] == raw["config"]["Env"]
    assert out["rootfs"] == {"type": "layers", "diff_ids": ["sha256:" + "a" * 64]}


def test_one_config_from_docker_20_10_and_28() -> None:
    """What the two engines wrote for the demo's COPY steps and empty fields (seen 2026-11-30):
    normalised, one config; a different destination or a set field still differs."""
    kwargs: dict[str, Any] = {"diff_ids": ["sha256:" + "a" * 64], "source_date_epoch": SDE}
    copy = "/bin/sh -c #(nop) COPY dir:{} in /opt/venv "
    empty = {
        "AttachStderr": False,
        "Domainname": "",
        "Entrypoint": None,
        "OnBuild": None,
        "Tty": False,
        "User": "",
        "Volumes": None,
        "WorkingDir": "",
    }
    old = {
        "config": {"Env": ["A=1"], **empty},
        "history": [{"created_by": copy.format("b9b1b9eb" + "ab" * 28)}],
    }
    new = {
        "config": {"Env": ["A=1"]},
        "history": [{"created_by": copy.format("d516e6ff" + "cd" * 28)}],
    }
    assert normalize_config(old, **kwargs) == normalize_config(new, **kwargs)
    history = json.loads(normalize_config(new, **kwargs))["history"]
    assert history[0]["created_by"] == "/bin/sh -c #(nop) COPY dir in /opt/venv "
    elsewhere = {**new, "history": [{"created_by": copy.format("1" * 64).replace("venv", "x")}]}
    assert normalize_config(elsewhere, **kwargs) != normalize_config(new, **kwargs)
    user = {**new, "config": {"Env": ["A=1"], "User": "1000"}}
    assert json.loads(normalize_config(user, **kwargs))["config"]["User"] == "1000"


def test_config_bytes_are_canonical_and_labels_merge() -> None:
    raw = raw_config([b"layer"])
    shuffled = json.loads(json.dumps(dict(reversed(list(raw.items())))))
    kwargs: dict[str, Any] = {"diff_ids": ["sha256:" + "a" * 64], "source_date_epoch": SDE}
    assert normalize_config(raw, **kwargs) == normalize_config(shuffled, **kwargs)
    labelled = normalize_config(raw, labels={"org.example.x": "1"}, **kwargs)
    assert labelled != normalize_config(raw, **kwargs)
    assert json.loads(labelled)["config"]["Labels"] == {
        "org.example.base": "yes",
        "org.example.x": "1",
    }


def test_builds_that_differ_only_in_noise_get_one_id(engine: ArchiveEngine, tmp_path: Path) -> None:
    def build(stamp: int, host: str, content: bytes = b"payload") -> str:
        raw = layer(
            Entry("opt/payload", content, mtime=stamp, uname=host),
            Entry("var/log/dpkg.log", str(stamp).encode(), mtime=stamp),
            Entry("opt/__pycache__/m.cpython-311.pyc", timestamp_pyc(stamp), mtime=stamp),
            Entry(f"tmp/tmp.{stamp}", b"x", mtime=stamp),
        )
        created = rfc3339(stamp)
        return load(engine, tmp_path, [raw], created=created, container=host)

    first, second = build(BUILD_TIME, "host-a"), build(BUILD_TIME + 60, "host-b")
    assert first != second
    one, _, _ = normalized(engine, tmp_path, first)
    two, _, _ = normalized(engine, tmp_path, second)
    assert one.image_id == two.image_id
    three, _, _ = normalized(engine, tmp_path, build(BUILD_TIME, "host-a", b"payl0ad"))
    assert three.image_id != one.image_id


def test_labels_change_the_id_but_not_the_layers(engine: ArchiveEngine, tmp_path: Path) -> None:
    image_id = load(engine, tmp_path, [layer(Entry("x", b"x"))])
    plain, _, _ = normalized(engine, tmp_path, image_id)
    labelled, config, _ = normalized(engine, tmp_path, image_id, labels={"org.example.x": "1"})
    assert labelled.diff_ids == plain.diff_ids
    assert labelled.image_id != plain.image_id
    assert config["config"]["Labels"]["org.example.x"] == "1"


# --- real builds in Docker -------------------------------------------------------------------

_DOCKERFILE = """\
FROM {base}
COPY data.txt /opt/data.txt
RUN python3 -c "import pathlib; pathlib.Path('/opt/made.txt').write_text('hello')"
RUN mkdir -p /opt/pkg /opt/hashed \\
 && printf 'X = 1\\n' > /opt/pkg/mod.py && printf 'Y = 2\\n' > /opt/hashed/h.py \\
 && cd /opt && python3 -c "import pkg.mod" \\
 && python3 -m compileall -q --invalidation-mode unchecked-hash /opt/hashed \\
 && date +%s%N > /var/log/build.log \\
 && mkdir -p /root/.cache/pip && date +%s%N > /root/.cache/pip/stamp \\
 && mktemp /tmp/debris.XXXXXX && mktemp /tmp/gone.XXXXXX && rm /etc/issue.net
RUN rm /tmp/gone.*
"""

# What the normalised image must hold, and must not: whiteouts, hashed pyc kept; debris gone.
_PROBE = """\
import glob, os, sys
assert open('/opt/made.txt').read() == 'hello'
assert os.path.exists('/opt/hashed/__pycache__/h.cpython-311.pyc')
assert not os.path.exists('/opt/pkg/__pycache__/mod.cpython-311.pyc')
assert not os.path.exists('/etc/issue.net')
assert not os.path.exists('/var/log/build.log')
assert not os.path.exists('/root/.cache/pip')
assert os.listdir('/tmp') == [], os.listdir('/tmp')
import pkg.mod
print(pkg.mod.X, open('/opt/data.txt').read().strip())
"""


@dataclass(frozen=True)
class Builds:
    """Two builds of one context and one of a changed context, raw and normalised."""

    raw: tuple[str, str, str]
    normal: tuple[NormalizedImage, NormalizedImage, NormalizedImage]


@pytest.fixture(scope="module")
def builds(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Builds]:
    made: list[str] = []
    work = tmp_path_factory.mktemp("normalize")
    try:
        raw: list[str] = []
        for content in ("one", "one", "two"):
            context = tmp_path_factory.mktemp("context")
            (context / "Dockerfile").write_text(_DOCKERFILE.format(base=debian_base.image_id))
            (context / "data.txt").write_text(content + "\n")
            raw.append(docker_engine.build(context, nocache=True))
            made.append(raw[-1])
        normal = [
            normalize_image(
                docker_engine,
                image_id,
                source_date_epoch=SDE,
                workdir=work,
                base_image=debian_base.image_id,
            )
            for image_id in raw
        ]
        made += [n.image_id for n in normal]
        yield Builds((raw[0], raw[1], raw[2]), (normal[0], normal[1], normal[2]))
    finally:
        for image_id in dict.fromkeys(reversed(made)):
            with contextlib.suppress(ImageNotFoundError):
                remove_image(docker_engine, image_id, force=True)


@pytest.mark.docker
def test_two_raw_builds_differ_and_diff_says_where(
    builds: Builds, docker_engine: DockerEngine
) -> None:
    first, second, _ = builds.raw
    assert first != second
    diff = diff_images(first, second, engine=docker_engine)
    rows = {(d.section, d.path, d.field) for d in diff.differences}
    assert ("config", "created", "value") in rows
    assert ("config", "history[1].created", "value") in rows
    assert ("file", "/opt/made.txt", "mtime") in rows
    assert ("file", "/var/log/build.log", "sha256") in rows
    assert ("file", "/opt/pkg/__pycache__/mod.cpython-311.pyc", "sha256") in rows
    assert "/var/log/build.log" in format_diff(diff, max_rows=1000)


@pytest.mark.docker
def test_normalised_builds_share_one_id(builds: Builds, docker_engine: DockerEngine) -> None:
    one, two, _ = builds.normal
    assert one.image_id == two.image_id
    assert one.diff_ids == two.diff_ids
    assert diff_images(one.image_id, two.image_id, engine=docker_engine).identical
    assert "/var/log/build.log" in one.removed
    assert "/opt/pkg/__pycache__/mod.cpython-311.pyc" in one.removed


@pytest.mark.docker
def test_a_changed_file_changes_the_id_and_diff_names_only_it(
    builds: Builds, docker_engine: DockerEngine
) -> None:
    one, _, changed = builds.normal
    assert changed.image_id != one.image_id
    diff = diff_images(one.image_id, changed.image_id, engine=docker_engine)
    # The COPY step's history no longer names the builder's hash of its source (it differs
    # between engines): the layer's diff ID is what names the new content.
    assert [(d.section, d.path, d.field) for d in diff.differences] == [
        ("layer", "", "diff_id"),
        ("file", "/opt/data.txt", "sha256"),
    ]


@pytest.mark.docker
def test_the_normalised_image_runs(builds: Builds, docker_engine: DockerEngine) -> None:
    image_id = builds.normal[0].image_id
    result = docker_engine.run(
        image_id, ["python3", "-c", _PROBE], env={"PYTHONPATH": "/opt"}, timeout_s=60
    )
    assert (result.exit_code, result.stdout, result.stderr) == (0, "1 one\n", "")
    # The probe can fail: the raw build still holds the debris.
    raw = docker_engine.run(
        builds.raw[0], ["python3", "-c", _PROBE], env={"PYTHONPATH": "/opt"}, timeout_s=60
    )
    assert raw.exit_code == 1
    assert "AssertionError" in raw.stderr


@pytest.mark.docker
def test_labels_apply_without_touching_layers(
    builds: Builds, docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    plain = builds.normal[0]
    labelled = normalize_image(
        docker_engine,
        builds.raw[0],
        source_date_epoch=SDE,
        workdir=tmp_path,
        labels={"org.opencontainers.image.title": "reprobox-test"},
        base_image=debian_base.image_id,
    )
    try:
        assert labelled.image_id != plain.image_id
        assert labelled.diff_ids == plain.diff_ids
        info = docker_engine.inspect_image(labelled.image_id)
        assert info.labels["org.opencontainers.image.title"] == "reprobox-test"
        assert info.diff_ids == labelled.diff_ids
    finally:
        remove_image(docker_engine, labelled.image_id, force=True)


@pytest.mark.docker
def test_without_a_base_every_layer_is_rewritten_and_still_agrees(
    builds: Builds, docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    whole = [
        normalize_image(docker_engine, raw, source_date_epoch=SDE, workdir=tmp_path)
        for raw in builds.raw[:2]
    ]
    try:
        assert whole[0].image_id == whole[1].image_id
        base_layer = docker_engine.inspect_image(debian_base.image_id).diff_ids[0]
        assert whole[0].diff_ids[0] != base_layer  # the base's empty logs went as debris
        assert whole[0].diff_ids[1:] == builds.normal[0].diff_ids[1:]
        result = docker_engine.run(
            whole[0].image_id, ["python3", "-c", _PROBE], env={"PYTHONPATH": "/opt"}, timeout_s=60
        )
        assert (result.exit_code, result.stderr) == (0, "")
    finally:
        remove_image(docker_engine, whole[0].image_id, force=True)
