"""Bootstrapped bases: the normalised layer, the image archive, reuse, and the real mmdebstrap."""

from __future__ import annotations

import hashlib
import io
import json
import shutil
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from conftest import command_context
from engine_admin import find_images, remove_image
from fakes import FakeEngine, context

from reprobox.archive import write_normalized_layer
from reprobox.bootstrap import (
    ALWAYS_INCLUDED,
    DEFAULT_SOURCE_DATE_EPOCH,
    BaseImage,
    Runner,
    base_key,
    bootstrap_base,
    run_command,
    write_base_archive,
)
from reprobox.docker_engine import DockerEngine
from reprobox.errors import EXIT_BAD_INPUT, EXIT_MISSING, BuildError, EngineError, ReproboxError

EPOCH = DEFAULT_SOURCE_DATE_EPOCH
SUITE = "bookworm"  # as the session's `debian_base` (tests/conftest.py)
LATER = EPOCH + 10**6
STATUS = b"""Package: python3
Status: install ok installed
Version: 3.11.2-1+b1

Package: removed-long-ago
Status: deinstall ok config-files
Version: 1.0

Package: bash
Status: install ok installed
Priority: required
Description: the shell
 Version: not-a-field
Version: 5.2.15-2+b13
"""


def _rootfs(
    path: Path, *, order: Callable[[list[tarfile.TarInfo]], list[tarfile.TarInfo]] = list
) -> Path:
    """A tiny root filesystem shaped like mmdebstrap's output, with the quirks we normalise."""
    files: dict[str, bytes] = {
        "./etc/hostname": b"build-host\n",
        "./etc/resolv.conf": b"nameserver 10.0.0.1\n",
        "./usr/bin/zz-real": b"#!/bin/sh\necho real\n",
        "./var/lib/dpkg/status": STATUS,
    }
    entries: list[tuple[tarfile.TarInfo, bytes | None]] = []
    for name in [
        "./",
        "./dev/",
        "./etc/",
        "./usr/",
        "./usr/bin/",
        "./var/",
        "./var/lib/",
        "./var/lib/dpkg/",
    ]:
        info = tarfile.TarInfo(name)
        info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, LATER
        entries.append((info, None))
    for name, data in files.items():
        info = tarfile.TarInfo(name)
        info.size, info.mode, info.mtime = len(data), 0o755, LATER
        info.uname, info.gname = "builder", "builders"  # as docker.io writes host names
        entries.append((info, data))
    null = tarfile.TarInfo("./dev/null")
    null.type, null.devmajor, null.devminor, null.mode = tarfile.CHRTYPE, 1, 3, 0o666
    old = tarfile.TarInfo("./usr/bin/old")
    old.size, old.mtime = 3, EPOCH - 1000
    entries += [(null, None), (old, b"old")]
    # Written after its target, yet sorting puts "usr/bin/aa-link" first: the link must become the data.
    link = tarfile.TarInfo("./usr/bin/aa-link")
    link.type, link.linkname, link.mtime = tarfile.LNKTYPE, "./usr/bin/zz-real", LATER
    entries.append((link, None))
    data_of = {id(info): data for info, data in entries}
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for info in order([info for info, _ in entries]):
            content = data_of[id(info)]
            tar.addfile(info, io.BytesIO(content) if content is not None else None)
    return path


def _members(path: Path) -> list[tarfile.TarInfo]:
    with tarfile.open(path) as tar:
        return tar.getmembers()


# --- the normalised layer ----------------------------------------------------------------------


def test_the_layer_is_sorted_clamped_anonymous_and_free_of_host_files(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    write_normalized_layer(
        _rootfs(tmp_path / "rootfs.tar"),
        layer,
        source_date_epoch=EPOCH,
        replace={"etc/hostname": b""},
        drop=lambda name: name.startswith("dev/"),
    )
    members = _members(layer)
    names = [m.name for m in members]
    assert names == sorted(names)
    assert "dev" in names
    assert "dev/null" not in names
    assert "" not in names
    assert not any(n.startswith(("./", "/")) for n in names)
    assert all(m.mtime <= EPOCH for m in members)
    assert {m.mtime for m in members if m.name == "usr/bin/old"} == {EPOCH - 1000}  # older stays
    assert all(m.uname == "" and m.gname == "" for m in members)
    with tarfile.open(layer) as tar:
        hostname = tar.extractfile("etc/hostname")
        assert hostname is not None
        assert hostname.read() == b""


def test_a_hard_link_sorted_before_its_target_carries_the_data(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    write_normalized_layer(_rootfs(tmp_path / "rootfs.tar"), layer, source_date_epoch=EPOCH)
    by_name = {m.name: m for m in _members(layer)}
    assert by_name["usr/bin/aa-link"].isreg()
    assert by_name["usr/bin/zz-real"].islnk()
    assert by_name["usr/bin/zz-real"].linkname == "usr/bin/aa-link"
    out = tmp_path / "out"
    with tarfile.open(layer) as tar:
        tar.extractall(out, filter="tar")
    assert (out / "usr/bin/zz-real").read_bytes() == b"#!/bin/sh\necho real\n"
    assert (out / "usr/bin/zz-real").stat().st_ino == (out / "usr/bin/aa-link").stat().st_ino


def test_the_diff_id_hashes_the_layer_and_ignores_the_input_order(tmp_path: Path) -> None:
    first, second = tmp_path / "1.tar", tmp_path / "2.tar"
    diff_id = write_normalized_layer(_rootfs(tmp_path / "a.tar"), first, source_date_epoch=EPOCH)
    shuffled = _rootfs(tmp_path / "b.tar", order=lambda infos: infos[::-1])
    assert shuffled.read_bytes() != (tmp_path / "a.tar").read_bytes()
    assert write_normalized_layer(shuffled, second, source_date_epoch=EPOCH) == diff_id
    assert diff_id == "sha256:" + hashlib.sha256(first.read_bytes()).hexdigest()
    assert first.read_bytes() == second.read_bytes()
    # Negative control: another epoch clamps differently, so the layer differs.
    third = tmp_path / "3.tar"
    assert write_normalized_layer(tmp_path / "a.tar", third, source_date_epoch=EPOCH + 1) != diff_id


# --- the image archive -------------------------------------------------------------------------


def _archive(
    tmp_path: Path, rootfs: Path, name: str, epoch: int = EPOCH
) -> tuple[str, tuple[str, ...]]:
    return write_base_archive(
        rootfs,
        tmp_path / name,
        arch="amd64",
        labels={"reprobox.base.key": "k"},
        ref="reprobox/base:test",
        source_date_epoch=epoch,
        created_by="mmdebstrap test",
    )


def _read_archive(path: Path) -> tuple[list[dict[str, Any]], bytes, set[str]]:
    with tarfile.open(path) as tar:
        manifest_file = tar.extractfile("manifest.json")
        assert manifest_file is not None
        manifest: list[dict[str, Any]] = json.loads(manifest_file.read())
        config_file = tar.extractfile(manifest[0]["Config"])
        assert config_file is not None
        return manifest, config_file.read(), set(tar.getnames())


def test_the_archive_is_a_docker_archive_with_fixed_times(tmp_path: Path) -> None:
    image_id, installed = _archive(tmp_path, _rootfs(tmp_path / "rootfs.tar"), "image.tar")
    manifest, raw_config, names = _read_archive(tmp_path / "image.tar")
    assert image_id == "sha256:" + hashlib.sha256(raw_config).hexdigest()
    assert installed == ("bash=5.2.15-2+b13", "python3=3.11.2-1+b1")
    assert manifest[0]["RepoTags"] == ["reprobox/base:test"]
    assert set(manifest[0]["Layers"]) <= names
    config = json.loads(raw_config)
    assert config["created"] == "2023-06-10T00:00:00Z"
    assert [h["created"] for h in config["history"]] == [config["created"]]
    assert (config["os"], config["architecture"]) == ("linux", "amd64")
    assert "LANG=C.UTF-8" in config["config"]["Env"]
    assert any(e.startswith("PATH=/usr/local/sbin:") for e in config["config"]["Env"])
    labels = config["config"]["Labels"]
    assert labels["reprobox.base.installed"] == "bash=5.2.15-2+b13,python3=3.11.2-1+b1"
    with tarfile.open(tmp_path / "image.tar") as tar:
        layer = tar.extractfile(manifest[0]["Layers"][0])
        assert layer is not None
        digest = hashlib.sha256(layer.read()).hexdigest()
    assert config["rootfs"] == {"type": "layers", "diff_ids": [f"sha256:{digest}"]}


def test_the_same_rootfs_gives_the_same_image_id_and_bytes(tmp_path: Path) -> None:
    rootfs = _rootfs(tmp_path / "rootfs.tar")
    first, _ = _archive(tmp_path, rootfs, "1.tar")
    time.sleep(1.1)  # a clock read anywhere would now show
    second, _ = _archive(tmp_path, rootfs, "2.tar")
    assert first == second
    assert (tmp_path / "1.tar").read_bytes() == (tmp_path / "2.tar").read_bytes()
    assert _archive(tmp_path, rootfs, "3.tar", epoch=EPOCH + 1)[0] != first  # negative control


# --- bootstrap_base with a fake engine and a fake mmdebstrap ----------------------------------


class FakeMmdebstrap:
    """Stands in for mmdebstrap: records each call and writes the tiny rootfs to the target."""

    def __init__(self, status: int = 0) -> None:
        self.calls: list[tuple[list[str], dict[str, str]]] = []
        self.status = status

    def __call__(
        self, argv: Sequence[str], env: Mapping[str, str], on_line: Callable[[str], None]
    ) -> int:
        self.calls.append((list(argv), dict(env)))
        for i in range(30):
            on_line(f"I: line {i}")
        if self.status == 0:
            _rootfs(Path(argv[-2]))  # mmdebstrap [options] SUITE TARGET MIRROR
        return self.status


def _bootstrap(
    engine: FakeEngine, tmp_path: Path, runner: Runner, packages: Sequence[str] = ()
) -> BaseImage:
    """A bootstrap into a cache under tmp_path/cache: its bases folder is tmp_path/cache/bases."""
    return bootstrap_base(context(engine, tmp_path / "cache"), "bookworm", packages, runner=runner)


def test_bootstrap_runs_mmdebstrap_once_then_reuses_the_base(tmp_path: Path) -> None:
    engine, runner = FakeEngine(), FakeMmdebstrap()
    first = _bootstrap(engine, tmp_path, runner, ["libgomp1", "curl"])
    assert not first.reused
    assert first.packages == ("curl", "libgomp1")
    assert first.installed == ("bash=5.2.15-2+b13", "python3=3.11.2-1+b1")
    assert first.ref == f"reprobox/base:bookworm-{first.key[:12]}"
    assert engine.inspect_image(first.ref).id == first.image_id
    ((argv, env),) = runner.calls
    assert argv[:2] == ["mmdebstrap", "--variant=minbase"]
    assert f"--include={','.join((*ALWAYS_INCLUDED, 'curl', 'libgomp1'))}" in argv
    assert argv[-3] == "bookworm"
    assert argv[-1] == "http://deb.debian.org/debian"
    assert "--dpkgopt=path-exclude=/usr/share/doc/*" in argv  # slim, as Debian's own images
    assert env == {"SOURCE_DATE_EPOCH": str(EPOCH)}
    # Scratch emptied; only the record of the bases made here stays.
    assert sorted(p.name for p in (tmp_path / "cache" / "bases").iterdir()) == [
        ".trusted-bases.json.lock",
        "trusted-bases.json",
    ]
    again = _bootstrap(engine, tmp_path, runner, ["curl", "libgomp1"])
    assert len(runner.calls) == 1
    assert again.reused
    assert (again.image_id, again.key, again.installed, again.packages) == (
        first.image_id,
        first.key,
        first.installed,
        first.packages,
    )


def test_other_packages_make_another_base(tmp_path: Path) -> None:
    engine, runner = FakeEngine(), FakeMmdebstrap()
    a = _bootstrap(engine, tmp_path, runner)
    b = _bootstrap(engine, tmp_path, runner, ["libgomp1"])
    assert len(runner.calls) == 2
    assert a.key != b.key
    assert a.image_id != b.image_id


def test_the_key_names_what_was_asked_for() -> None:
    key = base_key("bookworm", ["b", "a"], "amd64")
    assert key == base_key("bookworm", ["a", "b", "a"], "amd64")
    assert key != base_key("trixie", ["a", "b"], "amd64")
    assert key != base_key("bookworm", ["a", "b"], "arm64")
    assert key != base_key("bookworm", ["a", "b"], "amd64", mirror="http://snapshot.debian.org/x")


def test_an_image_built_on_the_base_is_not_taken_for_it(tmp_path: Path) -> None:
    engine, runner = FakeEngine(), FakeMmdebstrap()
    base = _bootstrap(engine, tmp_path, runner)
    context = tmp_path / "ctx"
    context.mkdir()
    (context / "Dockerfile").write_text(f"FROM {base.image_id}\nRUN make\n")
    engine.build(context, tag="app:1")  # inherits every reprobox.base.* label
    engine.remove_image(base.ref)
    assert len(engine.find_images({"reprobox.base.key": base.key})) == 1
    rebuilt = _bootstrap(engine, tmp_path, runner)
    assert not rebuilt.reused
    assert rebuilt.image_id == base.image_id
    assert len(runner.calls) == 2


def test_an_image_that_only_carries_the_labels_is_not_taken_for_the_base(tmp_path: Path) -> None:
    """A loaded (imported, pulled) image with the very labels and shape of a base is not one."""
    engine, runner = FakeEngine(), FakeMmdebstrap()
    base = _bootstrap(engine, tmp_path, runner)
    planted_config = json.loads(json.dumps(engine.images[base.image_id].config))
    planted_config["rootfs"]["diff_ids"] = ["sha256:" + "6" * 64]  # other content, same labels
    planted = engine.add_image(planted_config, "planted:1")
    engine.remove_image(base.ref)
    assert engine.find_images({"reprobox.base.key": base.key}) == [planted]
    other_host = tmp_path / "other-cache"  # a cache that never recorded a base
    made = bootstrap_base(context(engine, other_host), SUITE, (), runner=runner)
    assert not made.reused
    assert made.image_id == base.image_id != planted
    assert len(runner.calls) == 2


@pytest.mark.parametrize("record", ["not json", "[]", '{"KEY": "sha256:x"}', '{"KEY": [1]}'])
def test_a_damaged_record_trusts_nothing(tmp_path: Path, record: str) -> None:
    engine, runner = FakeEngine(), FakeMmdebstrap()
    base = _bootstrap(engine, tmp_path, runner)
    (tmp_path / "cache" / "bases" / "trusted-bases.json").write_text(
        record.replace("KEY", base.key)
    )
    again = _bootstrap(engine, tmp_path, runner)
    assert not again.reused
    assert len(runner.calls) == 2
    assert _bootstrap(engine, tmp_path, runner).reused  # recorded again when it was made


def test_a_failing_mmdebstrap_is_a_build_error_with_its_tail(tmp_path: Path) -> None:
    engine = FakeEngine()
    with pytest.raises(BuildError) as caught:
        _bootstrap(engine, tmp_path, FakeMmdebstrap(status=1), ["no-such-package"])
    err = caught.value
    assert err.exit_code == EXIT_BAD_INPUT  # what the spec asks for cannot be bootstrapped
    assert err.step.startswith("mmdebstrap --variant=minbase")
    assert err.log_tail.splitlines() == [f"I: line {i}" for i in range(10, 30)]
    assert engine.images == {}


def test_missing_mmdebstrap_says_how_to_install_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(EngineError) as caught:
        _bootstrap(FakeEngine(), tmp_path, run_command)
    assert caught.value.exit_code == EXIT_MISSING
    assert caught.value.hint is not None
    assert "apt-get install mmdebstrap" in caught.value.hint
    assert "make setup" in caught.value.hint


@pytest.mark.parametrize(
    ("suite", "packages"),
    [
        ("Bookworm", ()),
        ("debian:bookworm", ()),
        ("bookworm", ["curl,wget"]),
        ("bookworm", ["--evil"]),
    ],
)
def test_bad_names_are_bad_input_and_touch_nothing(
    suite: str, packages: Sequence[str], tmp_path: Path
) -> None:
    engine, runner = FakeEngine(), FakeMmdebstrap()
    with pytest.raises(ReproboxError) as caught:
        bootstrap_base(context(engine, tmp_path / "c"), suite, packages, runner=runner)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert runner.calls == []
    assert engine.calls == []
    assert not (tmp_path / "c").exists()


def test_no_engine_means_no_mmdebstrap_run(tmp_path: Path) -> None:
    runner = FakeMmdebstrap()
    with pytest.raises(EngineError) as caught:
        _bootstrap(FakeEngine(alive=False), tmp_path, runner)
    assert caught.value.exit_code == EXIT_MISSING
    assert runner.calls == []


def test_an_unknown_engine_architecture_is_refused(tmp_path: Path) -> None:
    with pytest.raises(EngineError, match="mips"):
        _bootstrap(FakeEngine(arch="mips"), tmp_path, FakeMmdebstrap())


# --- the real thing: mmdebstrap and Docker Engine ---------------------------------------------


@pytest.mark.docker
def test_the_base_runs_python_and_makes_venvs(
    docker_engine: DockerEngine, debian_base: BaseImage
) -> None:
    info = docker_engine.inspect_image(debian_base.ref)
    assert info.id == debian_base.image_id
    assert len(info.diff_ids) == 1
    assert info.created.startswith("2023-06-10T00:00:00")
    assert any(p.startswith("python3=") for p in debian_base.installed)
    script = "python3 -m venv --without-pip /tmp/v && /tmp/v/bin/python -c 'import sys; print(sys.prefix)' && echo $LANG"
    result = docker_engine.run(debian_base.image_id, ["sh", "-c", script], timeout_s=60)
    assert (result.exit_code, result.stdout) == (0, "/tmp/v\nC.UTF-8\n"), result.stderr


@pytest.mark.docker
def test_a_second_bootstrap_reuses_the_base_quickly(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    def must_not_run(
        argv: Sequence[str], env: Mapping[str, str], on_line: Callable[[str], None]
    ) -> int:
        pytest.fail(f"mmdebstrap ran again: {argv}")

    started = time.monotonic()
    again = bootstrap_base(command_context(docker_engine), SUITE, (), runner=must_not_run)
    assert time.monotonic() - started < 5
    assert again.reused
    assert again.image_id == debian_base.image_id


@pytest.mark.docker
def test_an_imported_image_with_base_labels_is_not_reused(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    """The issue's attack: `reprobox import` an archive carrying reprobox.base.* labels for the
    real key (and every other mark of a base); the next bootstrap must not build on it."""
    from cli import reprobox

    arch = docker_engine.ping().arch
    labels = {
        "reprobox.base.format": "1",
        "reprobox.base.key": debian_base.key,
        "reprobox.base.mirror": "http://deb.debian.org/debian",
        "reprobox.base.packages": "",
        "reprobox.base.suite": SUITE,
    }
    archive = tmp_path / "planted.tar"
    planted, _ = write_base_archive(
        _rootfs(tmp_path / "rootfs.tar"),
        archive,
        arch=arch,
        labels=labels,
        ref="planted/base:1",
        source_date_epoch=EPOCH,
        created_by="not mmdebstrap",
    )
    imported = reprobox("import", archive, "--allow-foreign")
    assert imported.code == 0, imported.stderr
    try:
        assert planted in find_images(docker_engine, {"reprobox.base.key": debian_base.key})
        ran: list[Sequence[str]] = []

        def refuse(
            argv: Sequence[str], env: Mapping[str, str], on_line: Callable[[str], None]
        ) -> int:
            ran.append(argv)
            return 1

        with pytest.raises(BuildError):
            bootstrap_base(context(docker_engine, tmp_path / "c"), SUITE, (), runner=refuse)
        assert len(ran) == 1, "the planted image was taken for the base"
        # The control: where this host recorded the real base, it is reused, not the planted one.
        reused = bootstrap_base(command_context(docker_engine), SUITE, (), runner=refuse)
        assert reused.reused
        assert reused.image_id == debian_base.image_id != planted
    finally:
        remove_image(docker_engine, planted, force=True)


@pytest.mark.docker
def test_two_mmdebstrap_runs_give_the_same_image_id(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    """Fresh runs go into a FakeEngine (which computes IDs as Docker does) to leave the real one be."""
    kept: list[Path] = []

    def keep_rootfs(
        argv: Sequence[str], env: Mapping[str, str], on_line: Callable[[str], None]
    ) -> int:
        status = run_command(argv, env, on_line)
        kept.append(Path(shutil.copy(argv[-2], tmp_path / f"rootfs-{len(kept)}.tar")))
        return status

    def fresh() -> BaseImage:
        engine = FakeEngine(arch=docker_engine.ping().arch)
        return bootstrap_base(context(engine, tmp_path / "cache"), SUITE, (), runner=keep_rootfs)

    first = fresh()
    if first.installed == debian_base.installed:
        assert first.image_id == debian_base.image_id
    else:  # the session's base came from the engine's cache, made before the mirror moved on
        assert fresh().image_id == first.image_id
    # The same mmdebstrap output, written twice, gives the same ID as well.
    labels = {"reprobox.base.key": first.key}
    again = [
        write_base_archive(
            kept[0],
            tmp_path / f"{n}.tar",
            arch="amd64",
            labels=labels,
            ref="t:1",
            source_date_epoch=EPOCH,
            created_by="x",
        )[0]
        for n in (1, 2)
    ]
    assert again[0] == again[1]
