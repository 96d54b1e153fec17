"""The wheel cache: content addressing, verification in and out, atomic writes, placement."""

from __future__ import annotations

import errno
import http.server
import os
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

from reprobox.cache import WheelCache, default_cache_dir, fetch, materialize
from reprobox.errors import EXIT_BAD_INPUT, EXIT_MISSING, LockError
from reprobox.lock import LockedWheel

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
from reprobox.lock import LockedWheel
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


def test_cache_root_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPROBOX_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    assert WheelCache().root == tmp_path / "elsewhere"
    monkeypatch.delenv("REPROBOX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "reprobox"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "reprobox"


@pytest.mark.network
def test_network_fetch_over_https_verifies_a_real_wheel(tmp_path: Path) -> None:
    files = fetch([PIP_26_3], root=tmp_path)
    assert sha256(files[PIP_26_3.sha256].read_bytes()).hexdigest() == PIP_26_3.sha256
