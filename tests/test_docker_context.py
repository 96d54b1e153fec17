"""Docker contexts: `--context NAME` and DOCKER_CONTEXT pick the engine as the docker CLI does.

The contexts live in a throwaway DOCKER_CONFIG folder; the one that works points at the tests'
engine through a socket path of its own (a symlink), so the engine's reported address proves
which way reprobox went.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from cli import reprobox

from reprobox.docker_engine import DockerEngine
from reprobox.errors import EXIT_BAD_INPUT, EXIT_MISSING

pytestmark = pytest.mark.docker

DEMO = Path(__file__).resolve().parent.parent / "images" / "demo-cpu.yaml"


@pytest.fixture
def contexts(docker_engine: DockerEngine, tmp_path: Path) -> dict[str, str]:
    """A DOCKER_CONFIG with contexts `here` (the tests' engine via a symlink) and `gone`."""
    from docker.context import ContextAPI

    real = docker_engine.host.removeprefix("unix://")
    if real == docker_engine.host:
        pytest.skip(f"the tests' engine is not on a unix socket: {docker_engine.host}")
    config = tmp_path / "docker-config"
    config.mkdir()
    (config / "config.json").write_text("{}")
    link = tmp_path / "here.sock"
    link.symlink_to(real)
    env = {"DOCKER_CONFIG": str(config), "DOCKER_HOST": "", "DOCKER_CONTEXT": ""}
    saved = {key: os.environ.get(key) for key in env}
    os.environ["DOCKER_CONFIG"] = str(config)
    try:
        ContextAPI.create_context("here", host=f"unix://{link}")
        ContextAPI.create_context("gone", host=f"unix://{tmp_path / 'nothing.sock'}")
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
    return {**env, "LINK": f"unix://{link}"}


def _env(contexts: dict[str, str], **extra: str) -> dict[str, str]:
    env = {key: value for key, value in contexts.items() if key != "LINK"}
    return {**env, **extra}


def test_context_flag_and_variable_pick_that_engine(contexts: dict[str, str]) -> None:
    for argv, extra in ((("--context", "here"), {}), ((), {"DOCKER_CONTEXT": "here"})):
        done = reprobox(*argv, "doctor", DEMO, "--json", env=_env(contexts, **extra))
        report = json.loads(done.stdout)
        assert report["engine"]["host"] == contexts["LINK"], done.stdout + done.stderr
        assert report["engine"]["version"], report["engine"]


def test_the_flag_wins_over_docker_host(contexts: dict[str, str]) -> None:
    env = _env(contexts, DOCKER_HOST="unix:///nonexistent/docker.sock")
    done = reprobox("--context", "here", "doctor", DEMO, "--json", env=env)
    assert json.loads(done.stdout)["engine"]["host"] == contexts["LINK"], done.stderr


def test_an_unknown_context_is_bad_input_and_a_dead_one_names_its_engine(
    contexts: dict[str, str],
) -> None:
    unknown = reprobox("--context", "nosuch", "check", "demo:1", env=_env(contexts))
    assert unknown.code == EXIT_BAD_INPUT, unknown.stderr
    assert "no Docker context named 'nosuch'" in unknown.stderr
    odd = reprobox("--context", "../x", "check", "demo:1", env=_env(contexts))
    assert odd.code == EXIT_BAD_INPUT, odd.stderr
    assert "is not a Docker context name" in odd.stderr
    gone = reprobox("--context", "gone", "check", "demo:1", env=_env(contexts))
    assert gone.code == EXIT_MISSING, gone.stderr
    assert "nothing.sock" in gone.stderr
