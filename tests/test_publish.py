"""publish: unit tests against a fake registry server and the FakeEngine, then the real thing:
Debian's docker-registry with htpasswd auth, and the Docker Engine.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
from cli import reprobox
from conftest import skip_or_fail
from engine_admin import inspect_raw, remove_image
from fakes import FakeEngine, context
from registry import REGISTRY_BINARY, LocalRegistry, docker_config
from test_stages import BASE, project, selfcheck

from reprobox._registry import is_insecure, parse_target
from reprobox.build import BuildOptions, BuildResult
from reprobox.check import SelfCheckResult
from reprobox.cli_format import report
from reprobox.context import Context
from reprobox.docker_engine import DockerEngine, engine_info
from reprobox.engine import RegistrySettings
from reprobox.errors import (
    EXIT_BAD_INPUT,
    EXIT_MISSING,
    EngineError,
    GpuUnavailableError,
    PushInterruptedError,
    RegistryAuthError,
    RegistryUnreachableError,
    ReproboxError,
)
from reprobox.publish import Builder
from reprobox.publish import publish as publish_stage

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "images" / "demo-cpu.yaml"
USER, PASSWORD = "ci-bot", "pw-Tr0ub4dor-s3cret"

# --- a fake registry: just enough of the v2 API (Basic or Bearer auth, manifests) -----------------


class FakeRegistry(ThreadingHTTPServer):
    """An in-process HTTP registry: `manifests[(repo, tag)]` is what it serves."""

    def __init__(self, bearer: bool = False, lie: bool = False, token_uses: int = 1000) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.bearer, self.lie, self.token_uses = bearer, lie, token_uses
        self.manifests: dict[tuple[str, str], bytes] = {}
        self.scopes: list[str] = []
        self.tokens = 0  # issued so far; only the last is valid, for `token_uses` requests
        self.uses_left = 0

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"


class _Handler(BaseHTTPRequestHandler):
    server: FakeRegistry
    _BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()

    def log_message(self, format: str, *args: Any) -> None:
        """Quiet."""

    def _send(self, status: int, body: bytes = b"", headers: Mapping[str, str] = {}) -> None:
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _authorized(self) -> bool:
        server = self.server
        wanted = f"Bearer tok-{server.tokens}" if server.bearer else self._BASIC
        if self.headers.get("Authorization") == wanted and (not server.bearer or server.uses_left):
            server.uses_left -= 1
            return True
        challenge = (
            f'Bearer realm="http://{self.server.address}/token",service="fake"'
            if self.server.bearer
            else 'Basic realm="fake"'
        )
        self._send(401, b'{"errors":[{"code":"UNAUTHORIZED"}]}', {"WWW-Authenticate": challenge})
        return False

    def do_GET(self) -> None:
        if self.path.startswith("/token"):
            self.server.scopes.append(self.path)
            if self.headers.get("Authorization") != self._BASIC:
                self._send(401)
                return
            self.server.tokens += 1
            self.server.uses_left = self.server.token_uses
            self._send(200, json.dumps({"token": f"tok-{self.server.tokens}"}).encode())
            return
        if not self._authorized():
            return
        if self.path == "/v2/":
            self._send(200, b"{}")
            return
        repo, _, tag = self.path.removeprefix("/v2/").partition("/manifests/")
        body = self.server.manifests.get((repo, tag))
        if body is None:
            self._send(404)
            return
        served = b"another manifest" if self.server.lie else body
        digest = "sha256:" + hashlib.sha256(served).hexdigest()
        self._send(200, body, {"Docker-Content-Digest": digest})


@pytest.fixture
def fake_registry(request: pytest.FixtureRequest) -> Iterator[FakeRegistry]:
    server = FakeRegistry(**getattr(request, "param", {}))
    thread = threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


class PushingFakeEngine(FakeEngine):
    """The FakeEngine whose pushes land in a FakeRegistry (the manifest bytes hash to the digest)."""

    def __init__(self, registry: FakeRegistry) -> None:
        super().__init__()
        self.registry = registry

    def push(self, repository: str, tag: str, *args: Any, **kwargs: Any) -> str:
        digest = super().push(repository, tag, *args, **kwargs)
        image = self._resolve(f"{repository}:{tag}")
        path = repository.split("/", 1)[1]
        self.registry.manifests[(path, tag)] = f"manifest of {image.id}".encode()
        return digest


#: Publish's own work needs no cache; the fake builds below never touch one.
UNUSED_CACHE = Path("/nonexistent/reprobox-cache")


def publish(
    spec: Path, to: str, *, engine: FakeEngine, builder: Builder, **kwargs: Any
) -> dict[str, Any]:
    """`reprobox publish --json`'s report: the stage, with a fake engine and a fake build."""
    return report(publish_stage(context(engine, UNUSED_CACHE), spec, to, build=builder, **kwargs))


def _built(
    image_id: str,
    *,
    passed: bool = True,
    tags: tuple[str, ...] = ("demo-cpu:0123456789ab",),
    selfcheck: SelfCheckResult | None = None,
) -> BuildResult:
    """What `build` returns for `image_id` (its default tag's content tag is 0123456789ab)."""
    return BuildResult(
        spec=DEMO,
        lock=DEMO.with_suffix(".lock"),
        spec_sha256="1" * 64,
        lock_sha256="2" * 64,
        base="sha256:" + "3" * 64,
        built_id="sha256:" + "4" * 64,
        image_id=image_id,
        content_id=image_id,
        content_tag="0123456789ab",
        tags=tags if passed else (),
        passed=passed,
        checked=selfcheck is not None,
        selfcheck=selfcheck,
    )


def _builder(engine: FakeEngine, passed: bool = True) -> Builder:
    image_id = engine.add_image(
        {
            "config": {
                "Labels": {"reprobox.cuda": "cpu", "reprobox.fingerprint.cpu-x86_64": "f" * 64}
            }
        }
    )
    check = SelfCheckResult(
        passed, "f" * 64, "cpu-x86_64", None, {"passed": passed, "failures": ["the runs differ"]}
    )

    def build(ctx: Context, spec_path: Path, options: BuildOptions) -> BuildResult:
        return _built(image_id, passed=passed, selfcheck=check)

    return build


def _never(ctx: Context, spec_path: Path, options: BuildOptions) -> BuildResult:
    raise AssertionError("nothing may be built")


def _creds(password: str = PASSWORD) -> Callable[[str], dict[str, str]]:
    return lambda registry: {"username": USER, "password": password, "serveraddress": registry}


@pytest.mark.parametrize(
    "fake_registry",
    [{}, {"bearer": True}, {"bearer": True, "token_uses": 1}],
    ids=["basic", "bearer", "bearer-token-expires"],
    indirect=True,
)
def test_publish_pushes_every_tag_and_reads_the_pushed_digest_back(
    fake_registry: FakeRegistry,
) -> None:
    engine = PushingFakeEngine(fake_registry)
    to = f"{fake_registry.address}/team/demo"
    report = publish(
        DEMO, to, tags=["v1"], engine=engine, builder=_builder(engine), credentials=_creds()
    )
    assert report["passed"] is True
    digest = report["digest"]
    assert report["reference"] == f"{to}@{digest}"
    assert report["tags"] == [f"{to}:0123456789ab", f"{to}:v1"]
    assert set(engine.pushed) == set(report["tags"])
    assert set(engine.pushed.values()) == {digest}
    assert report["selfcheck"]["fingerprint"] == "f" * 64
    if fake_registry.bearer:
        assert "scope=repository%3Ateam%2Fdemo%3Apull%2Cpush" in fake_registry.scopes[0]
        # one token for the check before the build; an expired one is renewed per read-back
        assert fake_registry.tokens == (1 if fake_registry.token_uses > 1 else 3)


def test_a_failed_self_check_pushes_nothing(fake_registry: FakeRegistry) -> None:
    engine = PushingFakeEngine(fake_registry)
    to = f"{fake_registry.address}/team/demo"
    report = publish(
        DEMO, to, engine=engine, builder=_builder(engine, passed=False), credentials=_creds()
    )
    assert report["passed"] is False
    assert report["digest"] is None
    assert "nothing was pushed" in report["summary"]
    assert engine.pushed == {}
    assert not any(call == "tag" for call, _ in engine.calls)


class _GpulessBuilder:
    """A build of a CUDA spec on a host without a GPU: the checked build cannot prove it."""

    def __init__(self, engine: FakeEngine, labels: dict[str, str] | None = None) -> None:
        self.image_id = engine.add_image(
            {"config": {"Labels": labels or {"reprobox.cuda": "12.4"}}}
        )
        self.checks: list[bool] = []

    def __call__(self, ctx: Context, spec_path: Path, options: BuildOptions) -> BuildResult:
        self.checks.append(options.check)
        if options.check:
            raise GpuUnavailableError("the Docker Engine cannot give containers a GPU")
        return _built(self.image_id, tags=("cuda-small:0123456789ab",))


def test_an_image_no_self_check_can_prove_here_is_pushed_only_when_allowed(
    fake_registry: FakeRegistry,
) -> None:
    engine = PushingFakeEngine(fake_registry)
    to = f"{fake_registry.address}/team/cuda"
    builder = _GpulessBuilder(engine)
    refused = publish(DEMO, to, engine=engine, builder=builder, credentials=_creds())
    assert (refused["passed"], refused["exit_code"], refused["verified"]) == (False, 3, False)
    assert "cannot give containers a GPU" in refused["unverified_reason"]
    assert "--allow-unverified" in refused["summary"]
    assert engine.pushed == {}
    assert builder.checks == [True]

    builder = _GpulessBuilder(engine)
    allowed = publish(
        DEMO, to, engine=engine, builder=builder, credentials=_creds(), allow_unverified=True
    )
    assert (allowed["passed"], allowed["exit_code"], allowed["verified"]) == (True, 0, False)
    assert "cannot give containers a GPU" in allowed["unverified_reason"]
    assert allowed["fingerprints"] == {}
    assert "UNVERIFIED" in allowed["summary"]
    assert builder.checks == [True, False], "the proof is tried first"
    assert set(engine.pushed) == {f"{to}:0123456789ab"}


def test_a_cuda_image_with_only_a_cpu_fingerprint_is_not_proven(
    fake_registry: FakeRegistry,
) -> None:
    engine = PushingFakeEngine(fake_registry)
    labels = {"reprobox.cuda": "12.4", "reprobox.fingerprint.cpu-x86_64": "f" * 64}
    image_id = engine.add_image({"config": {"Labels": labels}})

    def build(ctx: Context, spec_path: Path, options: BuildOptions) -> BuildResult:
        return _built(image_id, tags=("x:0123456789ab",))

    report = publish(
        DEMO,
        f"{fake_registry.address}/team/cuda",
        engine=engine,
        builder=build,
        credentials=_creds(),
    )
    assert (report["passed"], report["exit_code"], report["verified"]) == (False, 1, False)
    assert "no fingerprint for a CUDA image" in report["unverified_reason"]
    assert engine.pushed == {}


@pytest.mark.parametrize("passed", [False, True], ids=["check-fails", "check-passes"])
def test_the_real_build_stage_gates_the_push(
    fake_registry: FakeRegistry, tmp_path: Path, passed: bool
) -> None:
    """Publish with the build stage itself (FakeEngine, real lock, context and normalising)."""
    engine = PushingFakeEngine(fake_registry)
    engine.add_image({"config": {"Labels": {}}}, BASE)
    engine.run_handler = lambda *_: selfcheck(passed=passed)
    to = f"{fake_registry.address}/team/demo"
    spec_path = project(tmp_path / "p")
    result = publish_stage(context(engine, tmp_path / "cache"), spec_path, to, credentials=_creds())
    published = report(result)
    assert (published["passed"], published["exit_code"]) == (passed, 0 if passed else 1)
    assert [call for call, _ in engine.calls].count("ping") == 1, "one engine, asked once"
    if not passed:
        assert published["digest"] is None
        assert "nothing was pushed" in published["summary"]
        assert engine.pushed == {}
        assert not any(
            ref.startswith(fake_registry.address) for i in engine.images.values() for ref in i.tags
        )
        return
    assert result.built is not None
    assert published["tags"] == [f"{to}:{result.built.content_tag}"]
    assert set(engine.pushed) == set(published["tags"])
    assert published["fingerprints"] == {"cpu-x86_64": "a" * 64}


def test_a_proven_publish_says_so(fake_registry: FakeRegistry) -> None:
    engine = PushingFakeEngine(fake_registry)
    to = f"{fake_registry.address}/team/demo"
    report = publish(DEMO, to, engine=engine, builder=_builder(engine), credentials=_creds())
    assert (report["verified"], report["unverified_reason"]) == (True, None)
    assert report["fingerprints"] == {"cpu-x86_64": "f" * 64}
    assert "UNVERIFIED" not in report["summary"]


@pytest.mark.parametrize(
    ("password", "message"),
    [("wrong", "refused the credentials"), ("", "holds none")],
)
def test_refused_or_missing_credentials_stop_before_the_build(
    fake_registry: FakeRegistry, password: str, message: str
) -> None:
    engine = PushingFakeEngine(fake_registry)
    creds = _creds(password) if password else (lambda registry: None)
    with pytest.raises(RegistryAuthError) as caught:
        publish(
            DEMO,
            f"{fake_registry.address}/team/demo",
            engine=engine,
            builder=_never,
            credentials=creds,
        )
    assert caught.value.exit_code == EXIT_MISSING
    text = caught.value.render()
    assert message in text
    assert f"docker login {fake_registry.address}" in text
    assert PASSWORD not in text


@pytest.mark.parametrize("fake_registry", [{"lie": True}], indirect=True)
def test_a_registry_serving_another_digest_fails_the_publish(fake_registry: FakeRegistry) -> None:
    engine = PushingFakeEngine(fake_registry)
    with pytest.raises(EngineError, match="hash to"):
        publish(
            DEMO,
            f"{fake_registry.address}/team/demo",
            engine=engine,
            builder=_builder(engine),
            credentials=_creds(),
        )


def test_an_unreachable_registry_stops_before_the_build() -> None:
    with pytest.raises(RegistryUnreachableError) as caught:
        publish(
            DEMO, "127.0.0.1:9/team/demo", engine=FakeEngine(), builder=_never, credentials=_creds()
        )
    assert caught.value.exit_code == EXIT_MISSING
    assert "127.0.0.1:9 is unreachable" in caught.value.message


@pytest.mark.parametrize(
    "to",
    [
        "127.0.0.1:5000/Team/demo",
        "127.0.0.1:5000/team/demo:v1",
        "127.0.0.1:5000/team//demo",
        "127.0.0.1:5000/team/demo@sha256:" + "0" * 64,
        "bad host!/team/demo",
        "",
        "ghcr.io/" + "a" * 260,
    ],
)
def test_an_invalid_repository_name_is_bad_input_before_anything(to: str) -> None:
    engine = FakeEngine()
    with pytest.raises(ReproboxError) as caught:
        publish(DEMO, to, engine=engine, builder=_never, credentials=_creds())
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert "not a valid repository name" in caught.value.message
    assert engine.calls == []


def test_references_name_their_registry_as_the_engine_does() -> None:
    assert parse_target("127.0.0.1:5000/team/demo").registry == "127.0.0.1:5000"
    assert parse_target("localhost/demo").registry == "localhost"
    hub = parse_target("someone/demo")
    assert (hub.registry, hub.repository, hub.api_host) == (
        "docker.io",
        "someone/demo",
        "registry-1.docker.io",
    )
    assert parse_target("ubuntu").repository == "library/ubuntu"


def test_the_engine_settings_decide_plain_http() -> None:
    said: dict[str, Any] = {"InsecureRegistryCIDRs": ["127.0.0.0/8"], "IndexConfigs": {}}

    def settings() -> RegistrySettings:  # as the engine's `docker info` reads
        return engine_info("unix:///x", {}, {"RegistryConfig": said}).registry

    assert is_insecure("127.0.0.1:5000", settings())
    assert is_insecure("localhost:5000", settings())
    assert not is_insecure("10.1.2.3:5000", settings())
    said["IndexConfigs"]["10.1.2.3:5000"] = {"Secure": False}
    assert is_insecure("10.1.2.3:5000", settings())


class FailingPushEngine(PushingFakeEngine):
    def __init__(self, registry: FakeRegistry, said: str) -> None:
        super().__init__(registry)
        self.said = said

    def push(self, repository: str, tag: str, *args: Any, **kwargs: Any) -> str:
        raise EngineError(f"pushing {repository}:{tag}: the registry said: {self.said}")


@pytest.mark.parametrize(
    ("said", "kind", "words"),
    [
        (
            "dial tcp 127.0.0.1:5000: connect: connection refused",
            PushInterruptedError,
            "run the same command again",
        ),
        (
            f"unauthorized: authentication required for {USER}:{PASSWORD}",
            RegistryAuthError,
            "docker login",
        ),
    ],
)
def test_push_failures_are_told_apart_and_carry_no_secret(
    fake_registry: FakeRegistry, said: str, kind: type[EngineError], words: str
) -> None:
    engine = FailingPushEngine(fake_registry, said)
    with pytest.raises(kind) as caught:
        publish(
            DEMO,
            f"{fake_registry.address}/team/demo",
            engine=engine,
            builder=_builder(engine),
            credentials=_creds(),
        )
    text = caught.value.render()
    assert words in text
    assert caught.value.exit_code == EXIT_MISSING
    assert PASSWORD not in text
    assert base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode() not in text


# --- the real registry and engine ----------------------------------------------------------------


def _spec(folder: Path, name: str, script: str | None = None) -> Path:
    """The CPU example under another name (its own cheap top layers), optionally with a script."""
    folder.mkdir(parents=True, exist_ok=True)
    text = DEMO.read_text().replace("name: demo-cpu", f"name: {name}")
    if script is not None:
        text = text.replace("  # script: train.py", "  script: train.py")
        (folder / "train.py").write_text(script)
    path = folder / "spec.yaml"
    path.write_text(text)
    return path


def _start_registry(root: Path) -> LocalRegistry:
    if shutil.which(REGISTRY_BINARY) is None or shutil.which("htpasswd") is None:
        skip_or_fail("docker-registry or htpasswd is missing: run `make setup`")
    return LocalRegistry.start_in(root, USER, PASSWORD)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalRegistry]:
    """One registry for the quick docker tests of this module."""
    running = _start_registry(tmp_path_factory.mktemp("registry"))
    yield running
    running.stop()


def _env(folder: Path, registry: LocalRegistry, password: str = PASSWORD) -> dict[str, str]:
    """DOCKER_CONFIG pointing at what `docker login` would have written."""
    return {"DOCKER_CONFIG": str(docker_config(folder, registry.address, USER, password))}


def _served_digest(registry: LocalRegistry, repository: str, tag: str) -> str | None:
    """The registry's own answer for a manifest, asked without reprobox."""
    request = urllib.request.Request(
        f"http://{registry.address}/v2/{repository}/manifests/{tag}",
        headers={
            "Accept": "application/vnd.docker.distribution.manifest.v2+json",
            "Authorization": "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        },
    )
    try:
        with urllib.request.urlopen(request, timeout=10) as answer:
            return str(answer.headers["Docker-Content-Digest"])
    except urllib.error.HTTPError as err:
        if err.code == 404:
            return None
        raise


def _no_secret(*texts: str, password: str = PASSWORD) -> None:
    encoded = base64.b64encode(f"{USER}:{password}".encode()).decode()
    for text in texts:
        assert password not in text
        assert encoded not in text


@pytest.mark.docker
def test_wrong_password_fails_cleanly_and_shows_no_secret(
    docker_engine: DockerEngine, registry: LocalRegistry, tmp_path: Path
) -> None:
    spec = _spec(tmp_path / "spec", "reprobox-publish-test")
    wrong = "wrong-horse-battery"
    env = _env(tmp_path / "docker", registry, password=wrong)
    result = reprobox("publish", spec, "--to", f"{registry.address}/team/demo", env=env)
    assert result.code == EXIT_MISSING
    assert "refused the credentials" in result.stderr
    assert f"docker login {registry.address}" in result.stderr
    assert "Traceback" not in result.stderr
    assert "==> build" not in result.stderr, "nothing is built before the registry says yes"
    _no_secret(result.stdout, result.stderr, password=wrong)


@pytest.mark.docker
def test_unreachable_registry_and_invalid_name_are_told_apart(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    spec = _spec(tmp_path / "spec", "reprobox-publish-test")
    down = reprobox("publish", spec, "--to", "127.0.0.1:9/team/demo")
    assert down.code == EXIT_MISSING
    assert "is unreachable" in down.stderr
    invalid = reprobox("publish", spec, "--to", "127.0.0.1:9/Team Demo")
    assert invalid.code == EXIT_BAD_INPUT
    assert "not a valid repository name" in invalid.stderr
    assert not spec.with_suffix(".lock").exists(), "bad input changes nothing on disk"


@pytest.mark.docker
def test_the_self_check_gates_the_push(
    docker_engine: DockerEngine, registry: LocalRegistry, tmp_path: Path
) -> None:
    noisy = "import os\nprint(os.urandom(8).hex())\n"
    spec = _spec(tmp_path / "spec", "reprobox-gate-test", script=noisy)
    before = registry.blob_count()
    result = reprobox(
        "publish",
        spec,
        "--to",
        f"{registry.address}/team/gate",
        "--json",
        env=_env(tmp_path / "d", registry),
    )
    assert result.code == 1, result.stderr
    report = result.json()
    assert report["passed"] is False
    assert report["digest"] is None
    assert "nothing was pushed" in report["summary"]
    assert registry.blob_count() == before
    tags = docker_engine.inspect_image(report["image_id"]).tags
    assert not any(tag.startswith(registry.address) for tag in tags)


def _wait_for_blobs(registry: LocalRegistry, process: subprocess.Popen[str], count: int) -> None:
    deadline = time.monotonic() + 900
    while registry.blob_count() < count:
        assert process.poll() is None, "the publish ended before any layer landed"
        assert time.monotonic() < deadline
        time.sleep(0.2)


@pytest.mark.docker
def test_an_interrupted_publish_resumes_and_the_pulled_image_passes_check(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    """Kill the registry mid-push; publish again; pull what landed into a clean engine; check it."""
    spec = _spec(tmp_path / "spec", "reprobox-publish-test")
    built = reprobox("build", spec, "--json")
    assert built.code == 0, built.stderr
    registry = _start_registry(tmp_path / "registry")
    env = _env(tmp_path / "docker", registry)
    to = f"{registry.address}/team/demo"
    try:
        first = subprocess.Popen(
            [sys.executable, "-m", "reprobox", "publish", str(spec), "--to", to],
            env={**os.environ, **env},
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        _wait_for_blobs(registry, first, 2)
        # A blob whose upload committed at this instant may not be linked into the repository
        # yet; a moment lets the landed ones settle, so at least one is there to be reused.
        time.sleep(1)
        registry.stop()  # as a crash would: some layers landed, others were on their way
        _, stderr = first.communicate(timeout=600)  # the engine retries for about a minute
        assert first.returncode == EXIT_MISSING, stderr
        assert "was interrupted" in stderr
        assert "run the same command again" in stderr

        registry.start()
        second = reprobox("publish", spec, "--to", to, "--tag", "v1", "--json", env=env)
        assert second.code == 0, second.stderr
        report = second.json()
        assert report["layers"]["reused"] >= 1, "the layers that landed before the crash stay"
        assert report["layers"]["pushed"] >= 1, "and the rest are sent now"
        digest = report["digest"]
        assert report["reference"] == f"{to}@{digest}"
        for ref in report["tags"]:
            assert _served_digest(registry, "team/demo", ref.rsplit(":", 1)[1]) == digest
        inspected = json.dumps(inspect_raw(docker_engine, report["image_id"]))
        _no_secret(second.stdout, second.stderr, stderr, inspected)

        remove_image(docker_engine, report["image_id"], force=True)
        assert not docker_engine.image_exists(report["image_id"])
        pulled = docker_engine.pull(report["tags"][1], {"username": USER, "password": PASSWORD})
        assert pulled == report["image_id"]
        check = reprobox("check", report["tags"][1], "--json")
        assert check.code == 0, check.stderr
        assert check.json()["matches_recorded"] is True
    finally:
        registry.stop()
        for ref in docker_engine.inspect_image(built.json()["image_id"]).tags:
            if ref.startswith(registry.address) and docker_engine.image_exists(ref):
                remove_image(docker_engine, ref)


@pytest.mark.docker
def test_an_assembled_image_is_published_and_the_pulled_copy_passes_check(
    docker_engine: DockerEngine, registry: LocalRegistry, tmp_path: Path
) -> None:
    """`publish --assemble`: the image written from the wheels is gated, pushed, pulled, proven."""
    spec = _spec(tmp_path / "spec", "reprobox-assembled-publish-test")
    to = f"{registry.address}/team/assembled"
    env = _env(tmp_path / "docker", registry)
    published = reprobox("publish", spec, "--assemble", "--to", to, "--json", env=env)
    assert published.code == 0, published.stderr
    report = published.json()
    assert report["passed"] is True
    image_id = report["image_id"]
    lock_text = spec.with_suffix(".lock").read_text()
    # The content ID (before the proof's labels), on the line either route records.
    assert re.search(r"^# image-id: sha256:[0-9a-f]{64}$", lock_text, re.MULTILINE)
    assert "assembled-image-id" not in lock_text
    digest = report["digest"]
    (tag,) = report["tags"]
    assert not tag.endswith("-assembled"), "the recipe's tag: both routes give one image"
    assert _served_digest(registry, "team/assembled", tag.rsplit(":", 1)[1]) == digest
    assert report["reference"] == f"{to}@{digest}"

    remove_image(docker_engine, image_id, force=True)
    assert not docker_engine.image_exists(image_id)
    pulled = docker_engine.pull(tag, {"username": USER, "password": PASSWORD})
    assert pulled == image_id, "the registry serves the assembled image's content"
    try:
        check = reprobox("check", tag, "--json")
        assert check.code == 0, check.stderr
        assert check.json()["matches_recorded"] is True
    finally:
        remove_image(docker_engine, image_id, force=True)
