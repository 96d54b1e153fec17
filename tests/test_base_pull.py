"""A `base.image` pinned by digest that the engine lacks is pulled from the registry it names,
with the user's Docker credentials, and its digest checked: against the real Debian registry on
127.0.0.1 (htpasswd auth) and the real Docker Engine.

The docker test drives the build's base step (`base_image.base_for`) and a classic-builder build FROM the
pulled reference; a whole `reprobox build` from it (torch installed, normalised) passed when this
was written but took 320 s on the 2-core machine, past this test's share of the CI budget.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import pytest
from conftest import command_context, skip_or_fail
from engine_admin import add_labels, remove_image
from fakes import context
from registry import REGISTRY_BINARY, LocalRegistry, docker_config

from reprobox.base_image import _pull_base, base_for
from reprobox.bootstrap import BaseImage
from reprobox.docker_engine import DockerEngine
from reprobox.engine import ImageInfo
from reprobox.errors import EXIT_CHECK_FAILED, EXIT_MISSING, DigestMismatchError, EngineError
from reprobox.spec_load import load_spec

_SPEC = """\
version: 1
name: pulled-base
base:
  image: "{image}"
python: "3.11"
torch:
  version: "2.13.0"
  cuda: cpu
"""


class _Answering:
    """An engine whose pull works but whose image carries other digests (a unit test's fake)."""

    def __init__(self, digests: list[str]) -> None:
        self.digests = digests
        self.pulled: list[str] = []

    def pull(self, ref: str, auth_config: Any = None) -> str:
        self.pulled.append(ref)
        return "sha256:" + "1" * 64

    def inspect_image(self, ref: str) -> ImageInfo:
        return ImageInfo("sha256:" + "1" * 64, repo_digests=tuple(self.digests))


def test_a_pulled_base_whose_digest_differs_is_refused(tmp_path: Path) -> None:
    ref = "registry.example:5000/team/base:1@sha256:" + "a" * 64
    engine = _Answering(["registry.example:5000/team/base@sha256:" + "b" * 64])
    with pytest.raises(DigestMismatchError) as err:
        _pull_base(context(engine, tmp_path), ref)  # type: ignore[arg-type]
    assert err.value.exit_code == EXIT_CHECK_FAILED
    assert "not sha256:" + "a" * 64 in err.value.message
    # The tag is dropped: the digest alone decides what is pulled.
    assert engine.pulled == ["registry.example:5000/team/base@sha256:" + "a" * 64]
    fine = _Answering(["registry.example:5000/team/base@sha256:" + "a" * 64])
    _pull_base(context(fine, tmp_path), ref)  # type: ignore[arg-type]


@pytest.fixture
def registry(tmp_path: Path) -> Any:
    if shutil.which(REGISTRY_BINARY) is None or shutil.which("htpasswd") is None:
        skip_or_fail("docker-registry or htpasswd is not installed: run `make setup`")
    started = LocalRegistry.start_in(tmp_path / "registry")
    yield started
    started.stop()


@pytest.mark.docker
def test_a_digest_pinned_base_is_pulled_with_credentials_and_built_from(
    docker_engine: DockerEngine,
    debian_base: BaseImage,
    registry: LocalRegistry,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # A base of its own (the session's Debian base plus a label: no layer of its own), pushed to
    # the registry, then removed here, so that only a pull can bring it back.
    own = add_labels(docker_engine, debian_base.image_id, {"reprobox.test": "pulled-base"})
    repository = f"{registry.address}/reprobox-test/base"
    docker_engine.tag(own, f"{repository}:1")
    auth = {
        "username": registry.user,
        "password": registry.password,
        "serveraddress": registry.address,
    }
    digest = docker_engine.push(repository, "1", auth)
    remove_image(docker_engine, f"{repository}:1")
    ref = f"{repository}:1@{digest}"
    assert not docker_engine.image_exists(ref)
    assert not docker_engine.image_exists(own)
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text(_SPEC.format(image=ref), encoding="utf-8")
    spec = load_spec(spec_path)
    built = None
    try:
        # Without credentials the registry refuses, and reprobox says which image (exit 3).
        monkeypatch.setenv("DOCKER_CONFIG", str(tmp_path / "none"))
        with pytest.raises(EngineError) as err:
            base_for(command_context(docker_engine), spec)
        assert err.value.exit_code == EXIT_MISSING
        assert f"pulling {repository}@{digest}" in err.value.message
        assert not docker_engine.image_exists(ref)
        # With the credentials `docker login` leaves, the build's base step pulls it.
        config = docker_config(
            tmp_path / "docker", registry.address, registry.user, registry.password
        )
        monkeypatch.setenv("DOCKER_CONFIG", str(config))
        assert base_for(command_context(docker_engine), spec) == ref
        pulled = docker_engine.inspect_image(ref)
        assert pulled.id == own
        assert f"{repository}@{digest}" in pulled.repo_digests
        # The engine builds FROM the digest reference (as the rendered Dockerfile does).
        built = add_labels(docker_engine, ref, {"reprobox.test": "built-from-pulled"})
        assert docker_engine.inspect_image(built).parent == own
    finally:
        for image in (built, ref, own):
            if image is not None and docker_engine.image_exists(image):
                remove_image(docker_engine, image, force=True)
