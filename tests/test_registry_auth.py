"""Where registry credentials go: to the registry's own origin and the token realm it names, never
across a redirect to another origin (host, port or scheme); bodies bounded; garbage is exit 3.

Real HTTP servers on 127.0.0.1 that record every request's headers; no fakes of requests.
"""

from __future__ import annotations

import base64
import http.server
import json
import socket
import socketserver
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from reprobox._registry import (
    MAX_BODY_BYTES,
    RegistryClient,
    _origin,
    parse_target,
)
from reprobox.errors import EXIT_MISSING, EngineError, RegistryUnreachableError

USER, PASSWORD = "alice", "pw-s3cret-42"
BASIC = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
Route = Callable[["_Handler"], tuple[int, dict[str, str], bytes]]


@dataclass
class Recorder:
    """One server: its routes, and every request it saw as (path, Authorization or None)."""

    routes: dict[str, Route] = field(default_factory=dict)
    seen: list[tuple[str, str | None]] = field(default_factory=list)
    port: int = 0

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def authorizations(self) -> list[str]:
        return [auth for _, auth in self.seen if auth is not None]


class _Handler(http.server.BaseHTTPRequestHandler):
    recorder: Recorder

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.recorder.seen.append((self.path, self.headers.get("Authorization")))
        path = self.path.split("?", 1)[0]
        route = self.recorder.routes.get(path)
        status, headers, body = route(self) if route else (404, {}, b"")
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)


@pytest.fixture
def servers() -> Iterator[Callable[[], Recorder]]:
    """Start recording servers on 127.0.0.1, each on its own port (another origin)."""
    started: list[http.server.ThreadingHTTPServer] = []

    def start() -> Recorder:
        recorder = Recorder()
        handler = type("Handler", (_Handler,), {"recorder": recorder})
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        server.daemon_threads = True
        recorder.port = server.server_address[1]
        threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
        started.append(server)
        return recorder

    yield start
    for server in started:
        server.shutdown()
        server.server_close()


def _client(registry: Recorder) -> RegistryClient:
    target = parse_target(f"127.0.0.1:{registry.port}/team/demo")
    return RegistryClient(target, {"username": USER, "password": PASSWORD}, insecure=True)


def _basic_gate(then: Route) -> Route:
    def route(handler: _Handler) -> tuple[int, dict[str, str], bytes]:
        if handler.headers.get("Authorization") != BASIC:
            return 401, {"Www-Authenticate": 'Basic realm="test"'}, b""  # as Go writes it
        return then(handler)

    return route


def _redirect(to: str) -> Route:
    return lambda handler: (302, {"Location": to}, b"")


def _ok(body: bytes = b"{}") -> Route:
    return lambda handler: (200, {}, body)


def test_a_same_origin_redirect_keeps_the_credentials(servers: Callable[[], Recorder]) -> None:
    """The control: the recorder sees Authorization where it is allowed to go."""
    registry = servers()
    registry.routes["/v2/"] = _basic_gate(_redirect("/v2/moved"))
    registry.routes["/v2/moved"] = _basic_gate(_ok())
    _client(registry).check_access()
    assert ("/v2/moved", BASIC) in registry.seen


def test_credentials_never_follow_a_redirect_to_another_port(
    servers: Callable[[], Recorder],
) -> None:
    registry, elsewhere = servers(), servers()
    registry.routes["/v2/"] = _basic_gate(_redirect(f"{elsewhere.base}/v2/"))
    elsewhere.routes["/v2/"] = _ok()
    _client(registry).check_access()
    assert registry.authorizations() == [BASIC]  # it did have them to send
    assert elsewhere.seen == [("/v2/", None)]


def test_no_hop_after_leaving_the_origin_gets_them_back(servers: Callable[[], Recorder]) -> None:
    registry, elsewhere = servers(), servers()
    registry.routes["/v2/"] = _basic_gate(_redirect(f"{elsewhere.base}/bounce"))
    elsewhere.routes["/bounce"] = _redirect(f"{registry.base}/v2/back")
    registry.routes["/v2/back"] = _ok()
    _client(registry).check_access()
    assert elsewhere.seen == [("/bounce", None)]
    assert ("/v2/back", None) in registry.seen


def test_a_challenge_from_another_origin_is_never_answered(
    servers: Callable[[], Recorder],
) -> None:
    """A registry that redirects /v2/ to a host of its choosing that asks for credentials
    (how containerd leaked pull secrets, containerd PR 13894) gets an error, not the secret."""
    registry, evil = servers(), servers()
    registry.routes["/v2/"] = _redirect(f"{evil.base}/v2/")
    evil.routes["/v2/"] = lambda h: (401, {"WWW-Authenticate": 'Basic realm="evil"'}, b"")
    with pytest.raises(EngineError, match="redirected /v2/ to another address") as caught:
        _client(registry).check_access()
    assert caught.value.exit_code == EXIT_MISSING
    assert evil.authorizations() == []
    assert registry.authorizations() == []


def test_a_bearer_token_goes_to_the_registry_and_basic_only_to_its_realm(
    servers: Callable[[], Recorder],
) -> None:
    registry, tokens, blobs = servers(), servers(), servers()
    challenge = f'Bearer realm="{tokens.base}/token",service="test"'

    def gate(then: Route) -> Route:
        def route(handler: _Handler) -> tuple[int, dict[str, str], bytes]:
            if handler.headers.get("Authorization") != "Bearer tok-1":
                return 401, {"WWW-Authenticate": challenge}, b""
            return then(handler)

        return route

    tokens.routes["/token"] = _basic_gate(_ok(json.dumps({"token": "tok-1"}).encode()))
    registry.routes["/v2/"] = gate(_ok())
    registry.routes["/v2/team/demo/manifests/v1"] = gate(_redirect(f"{blobs.base}/m"))
    blobs.routes["/m"] = lambda h: (200, {"Docker-Content-Digest": "sha256:x"}, b"manifest")
    client = _client(registry)
    client.check_access()
    with pytest.raises(EngineError, match="sha256:x"):
        client.manifest_digest("v1")  # the digest header lies; what matters is who saw what
    assert set(tokens.authorizations()) == {BASIC}
    assert set(registry.authorizations()) == {"Bearer tok-1"}
    assert blobs.seen == [("/m", None)]


def test_an_oversized_answer_is_refused_without_reading_it_all(
    servers: Callable[[], Recorder],
) -> None:
    registry = servers()
    huge = b"{" + b" " * (MAX_BODY_BYTES + 1) + b"}"
    registry.routes["/v2/"] = _ok()
    registry.routes["/v2/team/demo/manifests/v1"] = lambda h: (200, {}, huge)
    client = _client(registry)
    client.check_access()
    with pytest.raises(RegistryUnreachableError, match=f"more than the {MAX_BODY_BYTES}") as caught:
        client.manifest_digest("v1")
    assert caught.value.exit_code == EXIT_MISSING


class _Garbage(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"SSH-2.0-OpenSSH_9.2 this is not HTTP\r\n\r\n")


def test_a_registry_that_answers_garbage_is_exit_3() -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Garbage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        target = parse_target(f"127.0.0.1:{server.server_address[1]}/team/demo")
        with pytest.raises(RegistryUnreachableError, match="does not speak HTTP") as caught:
            RegistryClient(target, {}, insecure=True).check_access()
        assert caught.value.exit_code == EXIT_MISSING
    finally:
        server.shutdown()
        server.server_close()


def test_a_plain_http_realm_is_refused_for_a_tls_registry() -> None:
    client = RegistryClient(parse_target("registry.example/team/demo"), {"username": "u"})
    client._scheme = "https"
    with pytest.raises(EngineError, match="plain HTTP"):
        client._token({"realm": "http://auth.example/token"})


def test_origins_compare_scheme_host_and_port() -> None:
    assert _origin("http://127.0.0.1/v2/") == _origin("http://127.0.0.1:80/x")
    assert _origin("https://Registry.Example/v2/") == _origin("https://registry.example:443/")
    assert _origin("http://r.example/") != _origin("https://r.example/")
    assert _origin("http://r.example:5000/") != _origin("http://r.example:5001/")
    assert _origin("http://r.example/") != _origin("http://r.example.evil/")


def test_nothing_listens_is_exit_3() -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    target = parse_target(f"127.0.0.1:{port}/team/demo")
    with pytest.raises(RegistryUnreachableError) as caught:
        RegistryClient(target, {}, insecure=True).check_access()
    assert caught.value.exit_code == EXIT_MISSING
