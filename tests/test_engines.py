"""One spec, three engines: the tests' engine (Debian 12's Docker 20.10 in CI) and a current one,
Docker Engine 28.5 from Debian sid, started nested by `engines` twice: with the containerd image
store on a unix socket, and with the classic store reached over TCP as a remote engine.

The demo is built once on the tests' engine (reused where test_build already built it); each
current engine builds it once more. The recorded identity, the config digest, must be the same
on all three, though the containerd store shows another ID; an export from the old engine
imports and checks on the containerd one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cli import reprobox
from engines import start_inner_engine

from reprobox.context import default_cache_dir
from reprobox.docker_engine import DockerEngine
from reprobox.lockfile import default_lock_path, read_lockfile

pytestmark = pytest.mark.docker

DEMO = Path(__file__).resolve().parent.parent / "images" / "demo-cpu.yaml"


@dataclass(frozen=True)
class Demo:
    """The demo as the tests' engine built and recorded it."""

    spec: Path
    content_id: str
    image_id: str
    tag: str


@pytest.fixture(scope="module")
def demo(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Demo:
    spec = tmp_path_factory.mktemp("demo") / "spec.yaml"
    spec.write_text(DEMO.read_text())
    # The recipe here and on the current engines (the assembled route: its own test below).
    here = reprobox("build", spec, "--recipe", "--json")
    assert here.code == 0, here.stderr
    report = here.json()
    assert read_lockfile(default_lock_path(spec)).image_id == report["content_id"]
    return Demo(spec, report["content_id"], report["image_id"], report["tags"][0])


@pytest.fixture(scope="module")
def containerd_engine(
    docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DockerEngine]:
    """Docker Engine 28.5 with the containerd image store, for this module; removed after it."""
    inner = start_inner_engine(
        docker_engine,
        default_cache_dir(),
        tmp_path_factory.mktemp("engine"),
        name="reprobox-test-containerd",
        containerd=True,
    )
    yield inner.engine
    inner.stop()


@pytest.fixture(scope="module")
def remote_engine(
    docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[DockerEngine]:
    """Docker Engine 28.5 with the classic store, reached only over TCP on 127.0.0.1."""
    inner = start_inner_engine(
        docker_engine,
        default_cache_dir(),
        tmp_path_factory.mktemp("remote"),
        name="reprobox-test-remote",
        containerd=False,
        tcp=True,
    )
    yield inner.engine
    inner.stop()


def test_the_demo_gives_one_identity_on_20_10_and_on_the_containerd_store(
    demo: Demo, docker_engine: DockerEngine, containerd_engine: DockerEngine
) -> None:
    """Build, self-check and record on the tests' engine; build and check on the current one."""
    who = containerd_engine.ping()
    assert who.containerd_store, who
    assert who.host != docker_engine.host
    on_current = {"DOCKER_HOST": containerd_engine.host}
    there = reprobox("build", demo.spec, "--recipe", "--json", env=on_current)
    assert there.code == 0, there.stderr
    report = there.json()
    assert report["content_id"] == demo.content_id
    assert report["reproducible"]["matches"] is True, report["reproducible"]
    # What that store shows is the manifest digest, not the recorded config digest.
    tag = report["tags"][0]
    shown = containerd_engine.inspect_image(tag).id
    assert shown == report["image_id"]
    assert shown != demo.content_id
    checked = reprobox("check", tag, "--json", env=on_current)
    assert checked.code == 0, checked.stdout + checked.stderr


def test_a_remote_engine_over_tcp_with_the_classic_store_gives_the_same_identity(
    demo: Demo, docker_engine: DockerEngine, remote_engine: DockerEngine
) -> None:
    """Nothing may assume the engine shares this host's files: it is reached over TCP only."""
    who = remote_engine.ping()
    assert remote_engine.host.startswith("tcp://127.0.0.1:"), remote_engine.host
    assert not who.containerd_store, who
    assert who.server_version.startswith("28."), who
    on_remote = {"DOCKER_HOST": remote_engine.host}
    doctor = reprobox("doctor", demo.spec, "--json", env=on_remote)
    assert doctor.json()["engine"]["store"] == "classic", doctor.stdout
    there = reprobox("build", demo.spec, "--recipe", "--json", env=on_remote)
    assert there.code == 0, there.stderr
    report = there.json()
    assert report["content_id"] == demo.content_id
    assert report["reproducible"]["matches"] is True, report["reproducible"]
    # On the classic store the engine's ID is the config digest: the same image as 20.10's.
    assert report["image_id"] == demo.image_id
    checked = reprobox("check", report["tags"][0], "--json", env=on_remote)
    assert checked.code == 0, checked.stdout + checked.stderr
    assert checked.json()["matches_recorded"] is True


def test_an_export_from_20_10_imports_and_checks_on_the_containerd_store(
    demo: Demo, containerd_engine: DockerEngine, tmp_path: Path
) -> None:
    archive = tmp_path / "demo.tar"
    exported = reprobox("export", demo.tag, "-o", archive, "--json")
    assert exported.code == 0, exported.stderr
    on_current = {"DOCKER_HOST": containerd_engine.host}
    imported = reprobox("import", archive, "--json", env=on_current)
    assert imported.code == 0, imported.stderr
    assert imported.json()["image_ids"] == [demo.image_id]
    assert imported.json()["lock_matches_label"] is True
    checked = reprobox("check", demo.tag, "--json", env=on_current)
    assert checked.code == 0, checked.stdout + checked.stderr
    assert checked.json()["matches_recorded"] is True


def test_an_assembled_image_is_one_identity_on_20_10_and_both_current_engines(
    demo: Demo,
    docker_engine: DockerEngine,
    containerd_engine: DockerEngine,
    remote_engine: DockerEngine,
) -> None:
    """`build --assemble` writes every byte itself: the engines only load and run it, and
    every engine has the recipe's identity."""
    here = reprobox("build", demo.spec, "--assemble", "--json")
    assert here.code == 0, here.stderr
    content_id = here.json()["content_id"]
    assert content_id == demo.content_id  # the recipe's image, as 20.10 built it
    reports = {}
    for name, engine in (("remote", remote_engine), ("containerd", containerd_engine)):
        # --no-cache: every layer made again there (compiled and hooked in that engine's
        # containers), not taken from the layer cache the engines share on this host.
        there = reprobox(
            "build",
            demo.spec,
            "--assemble",
            "--no-cache",
            "--json",
            env={"DOCKER_HOST": engine.host},
        )
        assert there.code == 0, f"{name}: {there.stderr}"
        reports[name] = report = there.json()
        assert report["content_id"] == content_id, name
        assert report["reproducible"]["matches"] is True, (name, report["reproducible"])
    # The containerd store shows the manifest digest, which reprobox computed before the load.
    shown = containerd_engine.inspect_image(reports["containerd"]["tags"][0]).id
    assert shown == reports["containerd"]["image_id"]
    assert shown != content_id
    # The classic store over TCP shows the config digest: the very image 20.10 holds.
    assert reports["remote"]["image_id"] == here.json()["image_id"]
