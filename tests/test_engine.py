"""The engine: build-log parsing, error mapping, and the real Docker Engine end to end."""

from __future__ import annotations

import contextlib
import json
import socket
import subprocess
import sys
import tarfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from engine_admin import add_labels, remove_image
from fakes import FakeEngine

from reprobox.bootstrap import BaseImage
from reprobox.build_log import BuildLog
from reprobox.docker_engine import DockerEngine, engine_info, image_info
from reprobox.engine import BuildEvent, Engine, ImageInfo, RegistrySettings
from reprobox.errors import (
    EXIT_BAD_INPUT,
    EXIT_MISSING,
    BuildError,
    ContainerTimeoutError,
    EngineError,
    ImageNotFoundError,
    ReproboxError,
)


def _feed(log: BuildLog, *texts: str) -> None:
    for text in texts:
        log.feed({"stream": text})


# --- BuildLog: the classic builder's stream -------------------------------------------------


def test_build_log_reports_steps_and_output_lines() -> None:
    events: list[BuildEvent] = []
    log = BuildLog(events.append)
    # The builder splits lines across messages, and paints a step's stderr red.
    _feed(log, "Step 1/2 : FROM sha256:abc", "\n", " ---> abc\n", "Step 2/2 : RUN make\n")
    _feed(log, " ---> Running in 0123\n", "hel", "lo\n\x1b[91mwarn\n\x1b[0m", "done\n")
    log.feed({"aux": {"ID": "sha256:" + "1" * 64}})
    assert log.finish() == "sha256:" + "1" * 64
    assert [e for e in events if e.kind == "step"] == [
        BuildEvent("step", 1, 2, "FROM sha256:abc"),
        BuildEvent("step", 2, 2, "RUN make"),
    ]
    step2 = [e.text for e in events if e.kind == "output" and e.step == 2]
    assert step2 == [" ---> Running in 0123", "hello", "warn", "done"]


def test_build_log_error_names_the_step_and_its_last_lines() -> None:
    log = BuildLog()
    _feed(log, "Step 1/3 : FROM base\n", "early output\n", "Step 2/3 : RUN ./fail.sh\n")
    _feed(log, " ---> Running in 0123\n", *(f"line {i}\n" for i in range(30)))
    _feed(log, "Removing intermediate container 0123\n")
    log.feed({"error": "The command '/bin/sh -c ./fail.sh' returned a non-zero code: 2"})
    with pytest.raises(BuildError) as caught:
        log.finish()
    err = caught.value
    assert err.step == "RUN ./fail.sh"
    assert err.log_tail.splitlines() == [f"line {i}" for i in range(10, 30)]
    assert "step 2/3" in err.message
    assert "returned a non-zero code: 2" in err.message
    assert err.exit_code == EXIT_BAD_INPUT  # the spec asks for what cannot be built
    assert "RUN ./fail.sh" in err.render()
    assert "line 29" in err.render()


def test_build_log_error_before_any_step_has_no_step() -> None:
    log = BuildLog()
    log.feed({"error": "dockerfile parse error line 2: unknown instruction: FOO"})
    with pytest.raises(BuildError) as caught:
        log.finish()
    assert caught.value.step == ""
    assert "unknown instruction" in caught.value.message


def test_build_log_without_an_image_id_is_an_error() -> None:
    log = BuildLog()
    _feed(log, "Step 1/1 : FROM base\n")
    with pytest.raises(BuildError, match="no image ID"):
        log.finish()


# --- DockerEngine without an engine ----------------------------------------------------------


def test_both_engines_satisfy_the_protocol() -> None:
    engines: list[Engine] = [DockerEngine(), FakeEngine()]  # mypy checks the structure
    assert len(engines) == 2


def test_importing_the_engine_neither_imports_docker_nor_connects() -> None:
    code = "import sys, reprobox.docker_engine as e; e.DockerEngine('unix:///nonexistent'); print('docker' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_ping_against_a_dead_socket_says_what_to_do(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DOCKER_HOST", "unix:///nonexistent")
    engine = DockerEngine()
    with pytest.raises(EngineError) as caught:
        engine.ping()
    err = caught.value
    assert err.exit_code == EXIT_MISSING
    assert "unix:///nonexistent" in err.message
    assert err.hint is not None
    assert "make setup" in err.hint
    assert "docker.io" in err.hint
    assert "Traceback" not in err.render()


def test_a_stale_socket_is_no_engine_either(tmp_path: Path) -> None:
    path = tmp_path / "docker.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as stale:
        stale.bind(str(path))  # bound, never listening: what a crashed dockerd leaves
        with pytest.raises(EngineError) as caught:
            DockerEngine(f"unix://{path}").ping()
    assert caught.value.exit_code == EXIT_MISSING
    assert "nothing listens" in caught.value.message


def test_every_call_on_a_dead_engine_is_an_engine_error(tmp_path: Path) -> None:
    engine = DockerEngine("unix:///nonexistent")
    with pytest.raises(EngineError) as caught:
        engine.build(tmp_path, tag="x:y")
    assert caught.value.exit_code == EXIT_MISSING


def test_docker_json_becomes_the_typed_values_the_stages_read() -> None:
    version = {"Version": "28.5.2", "ApiVersion": "1.51", "Os": "linux", "Arch": "amd64"}
    said: dict[str, Any] = {
        "Driver": "overlayfs",
        "DriverStatus": [["driver-type", "io.containerd.snapshotter.v1"]],
        "Runtimes": {"runc": {"path": "runc"}, "nvidia": {"path": "nvidia-container-runtime"}},
        "DockerRootDir": "/srv/docker",
        "RegistryConfig": {
            "InsecureRegistryCIDRs": ["127.0.0.0/8"],
            "IndexConfigs": {"r.example:5000": {"Secure": False}, "docker.io": {"Secure": True}},
        },
    }
    info = engine_info("tcp://engine:2375", version, said)
    assert (info.server_version, info.api_version, info.arch) == ("28.5.2", "1.51", "amd64")
    assert (info.storage_driver, info.containerd_store, info.root_dir) == (
        "overlayfs",
        True,
        "/srv/docker",
    )
    assert info.runtimes == ("nvidia", "runc")
    assert info.registry == RegistrySettings(
        ("127.0.0.0/8",), {"r.example:5000": False, "docker.io": True}
    )
    # The control: the classic store says something else in DriverStatus.
    said |= {"Driver": "overlay2", "DriverStatus": [["Backing Filesystem", "extfs"]]}
    assert engine_info("unix:///x", version, said).containerd_store is False
    image = image_info(
        {
            "Id": "sha256:" + "1" * 64,
            "RepoTags": ["a:1"],
            "RepoDigests": ["r/a@sha256:" + "2" * 64],
            "Parent": "",
            "Created": "2023-06-10T00:00:00Z",
            "Architecture": "amd64",
            "Os": "linux",
            "Size": 125,
            "Config": {"Env": ["A=1"], "Cmd": None, "Labels": {"k": "v"}},
            "RootFS": {"Type": "layers", "Layers": ["sha256:" + "3" * 64]},
        }
    )
    assert image == ImageInfo(
        id="sha256:" + "1" * 64,
        tags=("a:1",),
        repo_digests=("r/a@sha256:" + "2" * 64,),
        labels={"k": "v"},
        env=("A=1",),
        cmd=None,
        diff_ids=("sha256:" + "3" * 64,),
        created="2023-06-10T00:00:00Z",
        architecture="amd64",
        os="linux",
        size=125,
    )
    assert image_info({"Id": "sha256:x", "Config": {"Labels": None}}).labels == {}


# --- the real engine ---------------------------------------------------------------------------


@pytest.fixture
def scratch_images(docker_engine: DockerEngine) -> Iterator[list[str]]:
    """Image IDs and tags a test made; removed afterwards (the base is never listed here)."""
    made: list[str] = []
    yield made
    for ref in reversed(made):
        if docker_engine.image_exists(ref):
            remove_image(docker_engine, ref, force=True)


def _context(tmp_path: Path, base: BaseImage, *body: str) -> Path:
    (tmp_path / "Dockerfile").write_text("\n".join([f"FROM {base.image_id}", *body]) + "\n")
    return tmp_path


@pytest.fixture
def small_image(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path, scratch_images: list[str]
) -> str:
    """A two-layer image on the bootstrapped base."""
    context = _context(tmp_path, debian_base, "RUN echo built > /built.txt", "ENV GREETING=hi")
    image_id = docker_engine.build(context, tag="reprobox-test/small:1", nocache=True)
    scratch_images.extend([image_id, "reprobox-test/small:1"])
    return image_id


@pytest.mark.docker
def test_ping_reports_the_engine(docker_engine: DockerEngine) -> None:
    info = docker_engine.ping()
    assert info.server_version
    assert info.api_version
    assert info.os == "linux"
    assert info.arch
    assert info.storage_driver
    assert info.root_dir.startswith("/")
    assert "runc" in info.runtimes


@pytest.mark.docker
def test_build_streams_steps_and_tags_after_success(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path, scratch_images: list[str]
) -> None:
    events: list[BuildEvent] = []
    context = _context(tmp_path, debian_base, "RUN echo from-the-step", "ENV A=1")
    image_id = docker_engine.build(
        context, tag="reprobox-test/build:1", nocache=True, on_event=events.append
    )
    scratch_images.extend([image_id, "reprobox-test/build:1"])
    steps = [e.text for e in events if e.kind == "step"]
    assert steps == [f"FROM {debian_base.image_id}", "RUN echo from-the-step", "ENV A=1"]
    assert any(e.step == 2 and e.text == "from-the-step" for e in events if e.kind == "output")
    assert docker_engine.inspect_image("reprobox-test/build:1").id == image_id


@pytest.mark.docker
def test_a_failing_run_step_reports_it_and_leaves_no_tag(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path, scratch_images: list[str]
) -> None:
    # The engine does not order stderr against stdout: the pauses make the order certain.
    failing = "RUN for i in $(seq 1 40); do echo out-$i; done; sleep 1; echo to-stderr >&2; sleep 1; exit 7"
    context = _context(tmp_path, debian_base, "RUN echo fine", failing)
    with pytest.raises(BuildError) as caught:
        docker_engine.build(context, tag="reprobox-test/failing:1", nocache=True)
    err = caught.value
    assert err.step == failing
    assert "step 3/3" in err.message
    assert "non-zero code: 7" in err.message
    tail = err.log_tail.splitlines()
    assert "out-40" in tail
    assert "to-stderr" in tail
    assert "out-1" not in tail  # a tail, not the whole log
    assert len(tail) <= 20
    assert not docker_engine.image_exists("reprobox-test/failing:1")
    assert (
        docker_engine._client().containers(all=True, filters={"ancestor": debian_base.image_id})
        == []
    )


@pytest.mark.docker
def test_a_malformed_dockerfile_is_a_build_error(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    with pytest.raises(BuildError, match="unknown instruction"):
        docker_engine.build(_context(tmp_path, debian_base, "FOO bar"), tag="reprobox-test/bad:1")
    assert not docker_engine.image_exists("reprobox-test/bad:1")


@pytest.mark.docker
def test_run_separates_streams_passes_env_and_has_no_network(
    docker_engine: DockerEngine, small_image: str
) -> None:
    script = "echo out-$GREETING-$EXTRA; echo err >&2; ls /sys/class/net; cat /built.txt; exit 3"
    result = docker_engine.run(small_image, ["sh", "-c", script], env={"EXTRA": "x"}, timeout_s=60)
    assert result.exit_code == 3
    assert result.stdout.splitlines() == ["out-hi-x", "lo", "built"]
    assert result.stderr == "err\n"
    assert docker_engine._client().containers(all=True, filters={"ancestor": small_image}) == []


@pytest.mark.docker
def test_run_past_its_time_limit_is_stopped_and_removed(
    docker_engine: DockerEngine, small_image: str
) -> None:
    started = time.monotonic()
    with pytest.raises(ContainerTimeoutError) as caught:
        docker_engine.run(small_image, ["sleep", "60"], timeout_s=2)
    assert time.monotonic() - started < 30
    assert caught.value.exit_code == EXIT_MISSING  # the host did not finish in time
    assert docker_engine._client().containers(all=True, filters={"ancestor": small_image}) == []


@pytest.mark.docker
def test_labels_are_added_without_touching_the_layers(
    docker_engine: DockerEngine, small_image: str, scratch_images: list[str]
) -> None:
    labels = {"reprobox.fingerprint.cpu-x86_64": "ab" * 32, "odd": "quote\" 'single' $HOME\nline"}
    started = time.monotonic()
    labelled = add_labels(docker_engine, small_image, labels)
    scratch_images.append(labelled)
    assert time.monotonic() - started < 30
    before, after = docker_engine.inspect_image(small_image), docker_engine.inspect_image(labelled)
    assert labelled != small_image
    assert after.diff_ids == before.diff_ids
    assert len(after.diff_ids) == 2
    assert after.labels.items() >= labels.items()
    assert "odd" not in before.labels


@pytest.mark.docker
def test_save_and_load_round_trip(
    docker_engine: DockerEngine, small_image: str, tmp_path: Path, scratch_images: list[str]
) -> None:
    archive = tmp_path / "small.tar"
    layers = docker_engine.inspect_image(small_image).diff_ids
    docker_engine.save(["reprobox-test/small:1"], archive)
    remove_image(docker_engine, "reprobox-test/small:1")
    assert not docker_engine.image_exists(small_image)
    assert docker_engine.load(archive) == [small_image]
    assert docker_engine.inspect_image("reprobox-test/small:1").diff_ids == layers


@pytest.mark.docker
def test_save_writes_several_images_into_one_archive(
    docker_engine: DockerEngine, small_image: str, debian_base: BaseImage, tmp_path: Path
) -> None:
    out = tmp_path / "saved"
    out.mkdir()
    archive = out / "both.tar"
    docker_engine.save([small_image, debian_base.image_id], archive)
    with tarfile.open(archive) as tar:
        manifest = tar.extractfile("manifest.json")
        assert manifest is not None
        entries = json.load(manifest)
    configs = {
        "sha256:" + entry["Config"].removesuffix(".json").rpartition("/")[2] for entry in entries
    }
    assert configs == {small_image, debian_base.image_id}
    with pytest.raises(ReproboxError):
        docker_engine.save(["reprobox-test/never-built:1"], out / "none.tar")
    assert sorted(p.name for p in out.iterdir()) == ["both.tar"]


@pytest.mark.docker
def test_a_missing_image_is_bad_input(docker_engine: DockerEngine) -> None:
    assert not docker_engine.image_exists("reprobox-test/never-built:1")
    with pytest.raises(ImageNotFoundError) as caught:
        docker_engine.inspect_image("reprobox-test/never-built:1")
    assert caught.value.exit_code == EXIT_BAD_INPUT


@pytest.mark.docker
def test_a_failed_push_is_an_engine_error_that_shows_no_credentials(
    docker_engine: DockerEngine, small_image: str, scratch_images: list[str]
) -> None:
    docker_engine.tag(small_image, "127.0.0.1:9/reprobox-test/push:1")
    scratch_images.append("127.0.0.1:9/reprobox-test/push:1")
    auth = {"username": "someone", "password": "s3cret-do-not-show"}
    with pytest.raises(EngineError) as caught:
        docker_engine.push("127.0.0.1:9/reprobox-test/push", "1", auth)
    assert caught.value.exit_code == EXIT_MISSING
    assert "s3cret" not in caught.value.render()
    assert "s3cret" not in repr(caught.value.__cause__)


def test_an_engine_that_breaks_off_its_reply_is_an_engine_error(tmp_path: Path) -> None:
    """Headers, then the connection closes mid-body: what a dockerd that dies mid-wait sends."""
    path = tmp_path / "docker.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    server.listen()

    def answer() -> None:
        version = b'{"ApiVersion": "1.41", "Version": "20.10.24"}'
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return  # the test closed it
            with conn, contextlib.suppress(OSError):
                request = conn.recv(65536)
                if not request:
                    continue  # reprobox knocks on the socket first
                if b"GET /version " in request:  # the client's API negotiation: answered
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b"Connection: close\r\nContent-Length: %d\r\n\r\n%s"
                        % (len(version), version)
                    )
                else:  # then a reply that breaks off
                    conn.sendall(
                        b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                        b'Transfer-Encoding: chunked\r\n\r\n5\r\n{"Ve'
                    )

    threading.Thread(target=answer, daemon=True).start()
    try:
        with pytest.raises(EngineError) as caught:
            DockerEngine(f"unix://{path}").ping()
    finally:
        server.close()
    assert caught.value.exit_code == EXIT_MISSING
    assert "stopped answering mid-reply" in caught.value.message
