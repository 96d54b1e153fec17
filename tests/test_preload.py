"""The early load of an assembled image's bottom chain (base + torch's layer), with a fake engine."""

from __future__ import annotations

import io
import threading
import time
from collections.abc import Iterable
from pathlib import Path

import pytest
from fakes import FakeEngine, context

from reprobox.errors import EngineError
from reprobox.layer_tar import Layer, LayerWriter
from reprobox.preload import CHAIN_LABEL, Preload, chain_image_id, start_preload

BASE = {"architecture": "amd64", "os": "linux", "rootfs": {"diff_ids": ["sha256:" + "b" * 64]}}
BASE_IDS = ("sha256:" + "b" * 64,)


def _layer(tmp_path: Path, size: int = 4096) -> Layer:
    writer = LayerWriter(tmp_path / "torch.tar", 0, root="opt/venv")
    writer.file("opt/venv/torch.py", io.BytesIO(b"x" * size), size)
    return writer.close()


class _SlowEngine(FakeEngine):
    """Reads the archive a chunk at a time, slowly; can refuse it, or hang after the last chunk."""

    def __init__(self, *, delay: float = 0.0, refuse: bool = False, hang: float = 0.0) -> None:
        super().__init__()
        self.delay, self.refuse, self.hang = delay, refuse, hang
        self.chunks_read = 0

    def load_stream(self, chunks: Iterable[bytes], what: str) -> list[str]:
        def slow() -> Iterable[bytes]:
            for chunk in chunks:
                self.chunks_read += 1
                time.sleep(self.delay)
                yield chunk

        if self.refuse:
            raise EngineError("no space left on device")
        loaded = super().load_stream(slow(), what)
        time.sleep(self.hang)  # registering the layer: nothing on our side can stop it
        return loaded


def test_the_chain_image_is_named_as_the_engine_names_it(tmp_path: Path) -> None:
    engine = FakeEngine()
    torch = _layer(tmp_path)
    preload = start_preload(context(engine, tmp_path / "cache"), BASE, BASE_IDS, torch)
    image_id = preload.wait()
    assert image_id == chain_image_id(BASE, (*BASE_IDS, torch.diff_id))
    info = engine.inspect_image(image_id)
    assert info.diff_ids == (*BASE_IDS, torch.diff_id)
    assert info.labels == {CHAIN_LABEL: torch.diff_id}
    assert torch.diff_id in engine.layers, "torch's layer sent; the base's only named"
    assert BASE_IDS[0] not in engine.layers


def test_an_engine_that_refuses_the_load_fails_the_wait_and_says_so_early(tmp_path: Path) -> None:
    preload = start_preload(
        context(_SlowEngine(refuse=True), tmp_path / "c"), BASE, BASE_IDS, _layer(tmp_path)
    )
    deadline = time.monotonic() + 10
    while not preload.failed() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert preload.failed()
    with pytest.raises(EngineError, match="no space left"):
        preload.wait()


def test_an_engine_that_loads_another_image_fails_the_wait(tmp_path: Path) -> None:
    class _Other(FakeEngine):
        def load_stream(self, chunks: Iterable[bytes], what: str) -> list[str]:
            super().load_stream(chunks, what)
            return ["sha256:" + "0" * 64]

    preload = start_preload(context(_Other(), tmp_path / "c"), BASE, BASE_IDS, _layer(tmp_path))
    with pytest.raises(EngineError, match="expected"):
        preload.wait()


def test_cancel_stops_sending_mid_stream(tmp_path: Path) -> None:
    engine = _SlowEngine(delay=0.2)
    torch = _layer(tmp_path, size=8 * 1024 * 1024)  # many chunks
    preload = start_preload(context(engine, tmp_path / "c"), BASE, BASE_IDS, torch)
    time.sleep(0.3)
    started = time.monotonic()
    preload.cancel()
    assert time.monotonic() - started < Preload.CANCEL_WAIT_S + 1
    read = engine.chunks_read
    time.sleep(0.3)
    assert engine.chunks_read == read, "nothing more is sent"
    assert torch.diff_id not in engine.layers


def test_a_cancel_after_the_last_chunk_does_not_wait_for_the_engine(tmp_path: Path) -> None:
    """The engine registers the layer after the body (minutes for a CUDA layer): let it go."""
    engine = _SlowEngine(hang=30)
    preload = start_preload(context(engine, tmp_path / "c"), BASE, BASE_IDS, _layer(tmp_path))
    time.sleep(0.5)
    started = time.monotonic()
    preload.cancel()
    assert time.monotonic() - started < Preload.CANCEL_WAIT_S + 1


def test_ctrl_c_while_waiting_cancels_the_load(tmp_path: Path) -> None:
    engine = _SlowEngine(hang=30)
    preload = start_preload(context(engine, tmp_path / "c"), BASE, BASE_IDS, _layer(tmp_path))
    timer = threading.Timer(0.5, _interrupt_main)
    timer.start()
    started = time.monotonic()
    with pytest.raises(KeyboardInterrupt):
        preload.wait()
    assert time.monotonic() - started < Preload.CANCEL_WAIT_S + 2


def _interrupt_main() -> None:
    import _thread

    _thread.interrupt_main()
