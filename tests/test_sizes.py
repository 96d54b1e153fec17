"""Wheel sizes at lock time: `stat` for file:// URLs, a HEAD request to a real HTTP server."""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from functools import partial
from pathlib import Path

import pytest

from reprobox._sizes import wheel_sizes
from reprobox.errors import EXIT_MISSING, LockError


class _Server(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_HEAD(self) -> None:
        if self.path.startswith("/private/"):
            self.send_response(401)
            self.end_headers()
            return
        if self.path.startswith("/moved/"):
            self.send_response(302)
            self.send_header("Location", "/" + self.path.removeprefix("/moved/"))
            self.end_headers()
            return
        super().do_HEAD()


@pytest.fixture
def served(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over HTTP on 127.0.0.1, and its base URL."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), partial(_Server, directory=str(root))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_a_file_url_is_measured_on_disk(tmp_path: Path) -> None:
    wheel = tmp_path / "a b-1.0-py3-none-any.whl"
    wheel.write_bytes(b"x" * 12345)
    url = wheel.as_uri()
    assert wheel_sizes([url]) == {url: 12345}


def test_a_missing_file_is_exit_3(tmp_path: Path) -> None:
    with pytest.raises(LockError) as err:
        wheel_sizes([(tmp_path / "gone.whl").as_uri()])
    assert err.value.exit_code == EXIT_MISSING


def test_an_http_url_is_measured_by_its_content_length(served: tuple[Path, str]) -> None:
    root, base = served
    (root / "a-1.0-py3-none-any.whl").write_bytes(b"a" * 70001)
    (root / "b-2.0-py3-none-any.whl").write_bytes(b"")
    urls = [f"{base}/a-1.0-py3-none-any.whl", f"{base}/b-2.0-py3-none-any.whl"]
    assert wheel_sizes(urls) == {urls[0]: 70001, urls[1]: 0}
    # A redirect is followed to the file itself.
    moved = f"{base}/moved/a-1.0-py3-none-any.whl"
    assert wheel_sizes([moved]) == {moved: 70001}


def test_a_url_that_wants_credentials_keeps_its_size_unknown(served: tuple[Path, str]) -> None:
    _, base = served
    notes: list[str] = []
    url = f"{base}/private/a-1.0-py3-none-any.whl"
    assert wheel_sizes([url], on_note=notes.append) == {url: None}
    assert notes == [f"no size known for 1 wheel(s), e.g. {url}"]


def test_a_file_the_server_no_longer_has_is_exit_3(served: tuple[Path, str]) -> None:
    _, base = served
    with pytest.raises(LockError) as err:
        wheel_sizes([f"{base}/gone-1.0-py3-none-any.whl"])
    assert err.value.exit_code == EXIT_MISSING
    assert "HTTP 404" in err.value.message


def test_a_server_that_does_not_answer_is_exit_3() -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(LockError) as err:
        wheel_sizes([f"http://127.0.0.1:{port}/a-1.0-py3-none-any.whl"])
    assert err.value.exit_code == EXIT_MISSING
    assert "ConnectionError" in err.value.message
