"""The wheel cache: content addressing, verification in and out, atomic writes, placement."""

from __future__ import annotations

import dataclasses
import errno
import http.server
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from functools import partial
from hashlib import sha256
from pathlib import Path
from typing import Any

import pytest

from reprobox.cache import WheelCache, fetch, materialize
from reprobox.errors import EXIT_BAD_INPUT, EXIT_MISSING, LockError
from reprobox.locked import LockedWheel

PIP_26_3 = LockedWheel(
    "pip",
    "26.3",
    "pip-26.3-py3-none-any.whl",
    "https://files.pythonhosted.org/packages/07/25/ee8c38ae72d66b844ce8eb9711ba905dba21ca1a8a0c960057c41cd23337/pip-26.3-py3-none-any.whl",
    "f3b60b20ffaadd4415ed7957212a38ac63fa4c5fa375bd0f4a797777940fad13",
    "installer",
)


def _wheel(folder: Path, name: str, size: int = 200_000, *, url: str | None = None) -> LockedWheel:
    """A file standing in for a wheel, and its lock entry (a file:// URL unless `url` is given)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-1.0-py3-none-any.whl"
    path.write_bytes(os.urandom(size))
    digest = sha256(path.read_bytes()).hexdigest()
    return LockedWheel(name, "1.0", path.name, url or path.as_uri(), digest, "rest")


def _leftovers(root: Path) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and p.name.startswith(".")]


def test_fetch_stores_each_wheel_read_only_under_its_sha256(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")
    files = WheelCache(tmp_path / "cache").fetch([wheel])
    path = files[wheel.sha256]
    assert path == tmp_path / "cache" / "wheels" / "sha256" / wheel.sha256[:2] / wheel.sha256
    assert sha256(path.read_bytes()).hexdigest() == wheel.sha256
    assert path.stat().st_mode & 0o222 == 0
    assert _leftovers(tmp_path / "cache") == []


def test_a_cached_wheel_is_verified_and_used_without_its_source(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")
    cache = WheelCache(tmp_path / "cache")
    cache.fetch([wheel])
    (tmp_path / "src" / wheel.filename).unlink()
    seen: list[tuple[str, int, int | None]] = []
    files = cache.fetch([wheel], progress=lambda *event: seen.append(event))
    assert files[wheel.sha256].exists()
    assert seen[-1] == (f"(1/1) {wheel.filename} (verify)", 200_000, 200_000)


def _make_writable(path: Path) -> None:
    path.chmod(0o644)


def test_a_truncated_cached_wheel_is_refused_and_refetched_only_on_request(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")
    cache = WheelCache(tmp_path / "cache")
    path = cache.fetch([wheel])[wheel.sha256]
    _make_writable(path)
    path.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(LockError) as err:
        cache.fetch([wheel])
    assert err.value.exit_code == EXIT_BAD_INPUT
    assert "is corrupt or was changed" in err.value.message
    assert "1000 bytes" in err.value.message
    assert "--refetch" in (err.value.hint or "")
    assert path.stat().st_size == 1000  # refused, not silently replaced
    cache.fetch([wheel], refetch=True)
    assert sha256(path.read_bytes()).hexdigest() == wheel.sha256


def test_a_tampered_cached_wheel_of_the_right_size_is_refused(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")
    cache = WheelCache(tmp_path / "cache")
    path = cache.fetch([wheel])[wheel.sha256]
    _make_writable(path)
    data = bytearray(path.read_bytes())
    data[100_000] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(LockError, match="corrupt or was changed"):
        cache.fetch([wheel])


def test_a_source_that_does_not_match_the_lock_is_not_cached(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")
    (tmp_path / "src" / wheel.filename).write_bytes(b"something else")
    cache = WheelCache(tmp_path / "cache")
    with pytest.raises(LockError) as err:
        cache.fetch([wheel])
    assert "not the" in err.value.message
    assert wheel.sha256 in err.value.message
    assert not cache.path(wheel.sha256).exists()
    assert _leftovers(tmp_path / "cache") == []


def test_a_missing_local_source_is_exit_3(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")
    (tmp_path / "src" / wheel.filename).unlink()
    with pytest.raises(LockError) as err:
        WheelCache(tmp_path / "cache").fetch([wheel])
    assert err.value.exit_code == EXIT_MISSING


def test_only_http_https_and_file_urls_are_fetched(tmp_path: Path) -> None:
    wheel = LockedWheel("a", "1", "a-1-py3-none-any.whl", "ftp://x/a.whl", "a" * 64, "rest")
    with pytest.raises(LockError, match="only http, https and file"):
        WheelCache(tmp_path).fetch([wheel])


def test_a_path_that_is_not_a_sha256_is_refused(tmp_path: Path) -> None:
    with pytest.raises(LockError, match="not a sha256"):
        WheelCache(tmp_path).path("../../etc/passwd")


# --- http ------------------------------------------------------------------------------------


class _Quiet(http.server.SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:
        pass

    def copyfile(self, source: Any, outputfile: Any) -> None:
        # About 16 MB/s: slow enough that concurrent fetches of one file really overlap.
        while chunk := source.read(64 * 1024):
            outputfile.write(chunk)
            time.sleep(0.004)


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[Path, str]]:
    """A folder served over http on 127.0.0.1, and its base URL."""
    root = tmp_path / "served"
    root.mkdir()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), partial(_Quiet, directory=str(root)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield root, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_fetch_streams_verifies_and_reports_bytes_and_files(
    http_root: tuple[Path, str], tmp_path: Path
) -> None:
    root, base = http_root
    a = _wheel(root, "alpha", 3_000_000)
    b = _wheel(root, "beta", 1_000)
    wheels = [
        LockedWheel(w.name, w.version, w.filename, f"{base}/{w.filename}", w.sha256, w.group)
        for w in (a, b)
    ]
    seen: list[tuple[str, int, int | None]] = []
    files = fetch(wheels, root=tmp_path / "cache", progress=lambda *event: seen.append(event))
    assert {sha256(p.read_bytes()).hexdigest() for p in files.values()} == {a.sha256, b.sha256}
    assert (f"(1/2) {a.filename}", 3_000_000, 3_000_000) in seen
    assert (f"(2/2) {b.filename}", 1_000, 1_000) in seen


def test_an_http_404_says_to_relock(http_root: tuple[Path, str], tmp_path: Path) -> None:
    _, base = http_root
    wheel = LockedWheel("a", "1", "a-1-py3-none-any.whl", f"{base}/gone.whl", "a" * 64, "rest")
    with pytest.raises(LockError) as err:
        WheelCache(tmp_path).fetch([wheel])
    assert "answered 404" in err.value.message
    assert "--relock" in (err.value.hint or "")


def test_an_unreachable_server_is_exit_3(tmp_path: Path) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    wheel = LockedWheel(
        "a", "1", "a-1-py3-none-any.whl", f"http://127.0.0.1:{port}/a.whl", "a" * 64, "rest"
    )
    with pytest.raises(LockError) as err:
        WheelCache(tmp_path).fetch([wheel])
    assert err.value.exit_code == EXIT_MISSING


# --- two processes at once -------------------------------------------------------------------

_FETCHER = """
import sys, time
from pathlib import Path
from reprobox.cache import WheelCache
from reprobox.locked import LockedWheel
gate = Path(sys.argv[2])
while not gate.exists():
    time.sleep(0.005)
wheels = [LockedWheel(*line.split("\\t")) for line in Path(sys.argv[3]).read_text().splitlines()]
files = WheelCache(Path(sys.argv[1])).fetch(wheels)
print(len(files))
"""


def test_processes_fetching_at_once_leave_a_correct_cache(
    http_root: tuple[Path, str], tmp_path: Path
) -> None:
    served, base = http_root
    wheels = [
        _wheel(served, name, 4_000_000, url=f"{base}/{name}-1.0-py3-none-any.whl")
        for name in ("alpha", "beta", "gamma")
    ]
    listing = tmp_path / "wheels.tsv"
    listing.write_text(
        "\n".join(
            "\t".join((w.name, w.version, w.filename, w.url, w.sha256, w.group)) for w in wheels
        )
    )
    gate = tmp_path / "go"
    root = tmp_path / "cache"
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _FETCHER, str(root), str(gate), str(listing)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(4)
    ]
    gate.touch()  # all four start fetching the same three wheels at the same moment
    for proc in procs:
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 0, err
        assert out.strip() == "3"
    cache = WheelCache(root)
    for wheel in wheels:
        assert sha256(cache.path(wheel.sha256).read_bytes()).hexdigest() == wheel.sha256
    assert _leftovers(root) == []


def test_a_leftover_partial_download_does_not_matter(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")
    cache = WheelCache(tmp_path / "cache")
    folder = cache.path(wheel.sha256).parent
    folder.mkdir(parents=True)
    (folder / f".{wheel.sha256[:16]}.dead.part").write_bytes(b"half a wheel")
    assert (
        cache.fetch([wheel])[wheel.sha256].read_bytes()
        == (tmp_path / "src" / wheel.filename).read_bytes()
    )


# --- into a build context --------------------------------------------------------------------


def test_materialize_hard_links_wheels_under_their_file_names(tmp_path: Path) -> None:
    wheels = [_wheel(tmp_path / "src", n) for n in ("alpha", "beta")]
    cache = WheelCache(tmp_path / "cache")
    placed = cache.materialize(wheels, tmp_path / "ctx" / "wheels")
    assert [p.name for p in placed] == [w.filename for w in wheels]
    for wheel, path in zip(wheels, placed, strict=True):
        assert path.samefile(cache.path(wheel.sha256))
    again = cache.materialize(wheels, tmp_path / "ctx" / "wheels")  # idempotent
    assert again == placed


def test_materialize_copies_across_filesystems(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")

    def no_link(source: object, target: object) -> None:
        raise OSError(errno.EXDEV, "Invalid cross-device link")

    monkeypatch.setattr(os, "link", no_link)
    (placed,) = materialize([wheel], tmp_path / "ctx", root=tmp_path / "cache")
    assert not placed.samefile(WheelCache(tmp_path / "cache").path(wheel.sha256))
    assert sha256(placed.read_bytes()).hexdigest() == wheel.sha256


def test_materialize_refuses_a_file_name_that_is_a_path(tmp_path: Path) -> None:
    good = _wheel(tmp_path / "src", "alpha")
    evil = LockedWheel(good.name, good.version, "../evil.whl", good.url, good.sha256, good.group)
    with pytest.raises(LockError, match="not a plain name"):
        materialize([evil], tmp_path / "ctx", root=tmp_path / "cache")
    assert not (tmp_path / "evil.whl").exists()


@pytest.mark.network
def test_network_fetch_over_https_verifies_a_real_wheel(tmp_path: Path) -> None:
    files = fetch([PIP_26_3], root=tmp_path)
    assert sha256(files[PIP_26_3.sha256].read_bytes()).hexdigest() == PIP_26_3.sha256


# --- hostile servers: endless streams, stalls, Ctrl-C (issue 12) ------------------------------


class _Endless(http.server.BaseHTTPRequestHandler):
    """Serves zeros forever (or, for /stall, headers and then nothing), noting each request."""

    started: threading.Event
    length: str | None = None

    def log_message(self, format: str, *args: object) -> None:
        pass

    def do_GET(self) -> None:
        self.send_response(200)
        if self.length is not None:
            self.send_header("Content-Length", self.length)
        self.end_headers()
        self.started.set()
        if self.path.endswith("/stall"):
            time.sleep(120)
            return
        chunk = b"\0" * 65536
        try:
            while True:
                self.wfile.write(chunk)
        except OSError:  # the client went away: the point of the test
            return


@pytest.fixture
def endless() -> Iterator[tuple[str, threading.Event]]:
    """A server on 127.0.0.1 that never stops sending, and an event set once it has begun."""
    started = threading.Event()
    handler = type("Handler", (_Endless,), {"started": started})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", started
    finally:
        server.shutdown()
        server.server_close()


def _endless_wheel(url: str, size: int | None) -> LockedWheel:
    return LockedWheel(
        "big", "1", "big-1-py3-none-any.whl", f"{url}/big.whl", "e" * 64, "rest", size
    )


def test_a_download_stops_at_the_size_the_lock_records(
    endless: tuple[str, threading.Event], tmp_path: Path
) -> None:
    url, _ = endless
    started = time.monotonic()
    with pytest.raises(LockError) as caught:
        WheelCache(tmp_path).fetch([_endless_wheel(url, 3_000_000)])
    assert time.monotonic() - started < 10
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert "more than 3000000 bytes (the size the lock records)" in caught.value.message
    assert not WheelCache(tmp_path).path("e" * 64).exists()
    assert _leftovers(tmp_path) == []


def test_a_download_without_a_recorded_size_stops_at_the_hard_cap(
    endless: tuple[str, threading.Event], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import reprobox.cache

    monkeypatch.setattr(reprobox.cache, "MAX_DOWNLOAD_BYTES", 5_000_000)
    url, _ = endless
    with pytest.raises(LockError, match="more than 5000000 bytes \\(reprobox's limit\\)"):
        WheelCache(tmp_path).fetch([_endless_wheel(url, None)])
    assert _leftovers(tmp_path) == []


def test_a_content_length_above_the_size_is_refused_before_reading(
    endless: tuple[str, threading.Event], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    url, _ = endless
    monkeypatch.setattr(_Endless, "length", str(10**12))
    with pytest.raises(LockError, match="more than 1000 bytes"):
        WheelCache(tmp_path).fetch([_endless_wheel(url, 1000)])


def test_a_local_file_larger_than_the_lock_says_is_refused(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha", 5000)
    sized = dataclasses.replace(wheel, size=4999)
    with pytest.raises(LockError, match="more than 4999 bytes"):
        WheelCache(tmp_path / "cache").fetch([sized])
    exact = dataclasses.replace(wheel, size=5000)
    assert WheelCache(tmp_path / "cache").fetch([exact])  # the control: the right size passes


# `python -m reprobox` as at a terminal: a shell's background job (a CI script started with `&`)
# inherits SIGINT ignored, and Python then installs no KeyboardInterrupt handler of its own.
_AS_AT_A_TERMINAL = """
import runpy, signal, sys
signal.signal(signal.SIGINT, signal.default_int_handler)
sys.argv[0] = "reprobox"
runpy.run_module("reprobox", run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("path", ["big.whl", "stall"])
def test_ctrl_c_stops_a_download_at_once_and_leaves_nothing(
    endless: tuple[str, threading.Event], tmp_path: Path, path: str
) -> None:
    """A real SIGINT to a real `reprobox render` while it downloads (or waits on a stalled server)."""
    from test_render import fake_lock

    from reprobox.lockfile import format_lock
    from reprobox.spec_load import load_spec

    url, begun = endless
    spec_path = tmp_path / "spec.yaml"
    spec_path.write_text((Path(__file__).parent.parent / "images" / "demo-cpu.yaml").read_text())
    spec = load_spec(spec_path)
    lock = fake_lock(spec)
    wheels = tuple(
        LockedWheel(w.name, w.version, w.filename, f"{url}/{path}", w.sha256, w.group)
        for w in lock.wheels
    )
    (tmp_path / "spec.lock").write_text(
        format_lock(type(lock)(**{**lock.__dict__, "wheels": wheels}))
    )
    cache = tmp_path / "cache"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _AS_AT_A_TERMINAL,
            "render",
            str(spec_path),
            "-o",
            str(tmp_path / "ctx"),
        ],
        env={**os.environ, "REPROBOX_CACHE_DIR": str(cache)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert begun.wait(30), "the download never started"
        time.sleep(0.5)
        proc.send_signal(signal.SIGINT)
        sent = time.monotonic()
        _, err = proc.communicate(timeout=15)
        took = time.monotonic() - sent
    finally:
        proc.kill()
        proc.communicate()  # reap it and close its pipes, whatever happened above
    assert proc.returncode == 130, err
    assert took < 4, f"Ctrl-C took {took:.1f} s to stop the download"
    assert "interrupted" in err
    assert "Traceback" not in err
    assert not (tmp_path / "ctx").exists()
    files = [p for p in cache.rglob("*") if p.is_file()]
    assert files == [], f"left in the cache: {files}"


def test_a_lock_url_with_a_control_character_is_refused(tmp_path: Path) -> None:
    wheel = _wheel(tmp_path / "src", "alpha")
    hostile = dataclasses.replace(wheel, url=wheel.url + "\x1b]0;pwned\x07")
    with pytest.raises(LockError, match="control character") as caught:
        WheelCache(tmp_path / "cache").fetch([hostile])
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert "\x1b" not in caught.value.render()


@pytest.mark.parametrize("linked", [True, False], ids=["hard-link", "copy"])
def test_a_placed_file_keeps_the_mode_of_its_source_whatever_the_umask(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, linked: bool
) -> None:
    """A wheel goes into the context as a hard link, or as a copy where the cache is on
    another filesystem: either way with the cache's mode, not the umask's (the context's
    inputs digest holds every mode)."""
    from reprobox._files import place

    source = tmp_path / "cache.whl"
    source.write_bytes(b"wheel")
    source.chmod(0o600)
    if not linked:

        def no_link(*args: object) -> None:
            raise OSError(18, "Invalid cross-device link")

        monkeypatch.setattr("reprobox._files.os.link", no_link)
    mask = os.umask(0o002)
    try:
        place(source, tmp_path / "ctx.whl")
    finally:
        os.umask(mask)
    placed = tmp_path / "ctx.whl"
    assert placed.read_bytes() == b"wheel"
    assert placed.stat().st_mode & 0o777 == 0o600
    assert placed.samefile(source) == linked
