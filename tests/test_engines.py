"""One spec, two engines: the tests' engine (Debian 12's Docker 20.10 in CI) and a current one,
Docker Engine 28.5 from Debian sid with the containerd image store, started nested by `engines`.

One build on each (the first is reused where test_build already built the demo): the recorded
identity, the config digest, must be the same, though the containerd store shows another ID.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from cli import reprobox
from engines import start_inner_engine

from reprobox.context import default_cache_dir
from reprobox.docker_engine import DockerEngine
from reprobox.lockfile import default_lock_path, read_lockfile

pytestmark = pytest.mark.docker

DEMO = Path(__file__).resolve().parent.parent / "images" / "demo-cpu.yaml"


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


def test_the_demo_gives_one_identity_on_20_10_and_on_the_containerd_store(
    docker_engine: DockerEngine, containerd_engine: DockerEngine, tmp_path: Path
) -> None:
    """Build, self-check and record on the tests' engine; build and check on the current one."""
    who = containerd_engine.ping()
    assert who.containerd_store, who
    assert who.host != docker_engine.host
    spec = tmp_path / "spec.yaml"
    spec.write_text(DEMO.read_text())
    here = reprobox("build", spec, "--json")
    assert here.code == 0, here.stderr
    recorded = here.json()["content_id"]
    assert read_lockfile(default_lock_path(spec)).image_id == recorded

    on_current = {"DOCKER_HOST": containerd_engine.host}
    there = reprobox("build", spec, "--json", env=on_current)
    assert there.code == 0, there.stderr
    report = there.json()
    assert report["content_id"] == recorded
    assert report["reproducible"]["matches"] is True, report["reproducible"]
    # What that store shows is the manifest digest, not the recorded config digest.
    tag = report["tags"][0]
    shown = containerd_engine.inspect_image(tag).id
    assert shown == report["image_id"]
    assert shown != recorded
    checked = reprobox("check", tag, "--json", env=on_current)
    assert checked.code == 0, checked.stdout + checked.stderr
