"""Shared fixtures: the real Docker Engine (or a clear skip) and one bootstrapped base per session.

Docker tests request `docker_engine` or `debian_base`. Where no engine answers they skip with the
reason; with CI=true they fail instead, because CI must never pass by skipping them.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Iterator
from typing import NoReturn

import docker
import docker.errors
import pytest

from reprobox.bootstrap import BaseImage, bootstrap_base
from reprobox.context import Context
from reprobox.docker_engine import DockerEngine
from reprobox.errors import EngineError

pytest_plugins = ["disk_watch"]

#: The suite the tests bootstrap; the same key as a spec's `base.bootstrap: debian:bookworm`.
TEST_SUITE = "bookworm"


def skip_or_fail(reason: str) -> NoReturn:
    """Skip with `reason`, or fail where CI=true (CI must run every docker test)."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI=true, so this is a failure, not a skip: {reason}", pytrace=False)
    pytest.skip(reason)


def require_docker() -> DockerEngine:
    """A DockerEngine that answers, or a skip (a failure under CI=true) saying what to do."""
    engine = DockerEngine()
    try:
        engine.ping()
    except EngineError as err:
        skip_or_fail(f"{err.message}: run `make setup`")
    return engine


@pytest.fixture(scope="session")
def docker_engine() -> Iterator[DockerEngine]:
    """The real engine, pinged once per session; the images the session made go at its end."""
    engine = require_docker()
    with images_removed_after():
        yield engine
        engine.close()


@contextlib.contextmanager
def images_removed_after() -> Iterator[None]:
    """Remove the images made inside the block as it ends (bases excepted), for a module whose
    images are too large to keep until the session ends (a CUDA image is about 6 GB a copy)."""
    before = _image_ids()
    try:
        yield
    finally:
        _remove_images_made_since(before)


def _image_ids() -> set[str]:
    with contextlib.closing(docker.from_env()) as client:
        return {str(image.id) for image in client.images.list(all=True)}


def _remove_images_made_since(before: set[str]) -> None:
    """Every image this session made, bootstrapped bases excepted (the next session reuses them):
    a CUDA test image is ~6 GB, and a machine that keeps each run's images fills its disk."""
    with contextlib.closing(docker.from_env()) as client:
        for image in client.images.list(all=True):
            if image.id in before or any(t.startswith("reprobox/base:") for t in image.tags):
                continue
            # A parent of a kept base stays; one already gone with its child is no error.
            with contextlib.suppress(docker.errors.APIError):
                client.images.remove(str(image.id), force=True, noprune=False)


def command_context(engine: DockerEngine) -> Context:
    """The context a `reprobox` command gets (its cache, so its record of the bases this host
    made): the session's base shares it, so builds in the tests reuse that base and the next
    session finds it again (only recorded bases are reused)."""
    return Context.for_command(engine)


@pytest.fixture(scope="session")
def debian_base(docker_engine: DockerEngine) -> BaseImage:
    """A bookworm base (python3, venv) made by mmdebstrap once, or reused from the engine."""
    if shutil.which("mmdebstrap") is None:
        skip_or_fail(
            "mmdebstrap is not installed: run `make setup` (or `apt-get install mmdebstrap`)"
        )
    return bootstrap_base(command_context(docker_engine), TEST_SUITE, ())
