"""Shared fixtures: the real Docker Engine (or a clear skip) and one bootstrapped base per session.

Docker tests request `docker_engine` or `debian_base`. Where no engine answers they skip with the
reason; with CI=true they fail instead, because CI must never pass by skipping them.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from typing import NoReturn

import pytest

from reprobox.bootstrap import BaseImage, bootstrap_base
from reprobox.context import Context
from reprobox.docker_engine import DockerEngine
from reprobox.errors import EngineError

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
    """The real engine, pinged once per session."""
    engine = require_docker()
    yield engine
    engine.close()


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
