"""The bottom chain of an assembled image (the base and torch's layer) loaded into the engine
while the layers above it are written.

A classic-store `docker load` of a 0.9 GB layer takes 10 to 18 s here, and the final load can
only start once every layer and the config exist. So once torch's layer is there, a thread
loads a small image of the base's layers and that one layer; the final load then sends only
the layers above it. That image is kept, untagged and labelled `reprobox.assemble-chain`, as
the recipe's raw build is kept: its config is a pure function of the two inputs, so builds that
share them share it, and no build removes what another may be using. `docker image prune`
removes them (they are untagged); the final images keep their layers.

The containerd store takes every layer in each load (section 3.3 of the performance design), so
nothing is loaded early there.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from reprobox.context import Context
from reprobox.errors import EngineError
from reprobox.layer_tar import Layer, archive_stream

__all__ = ["CHAIN_LABEL", "Preload", "chain_config", "chain_image_id", "start_preload"]

CHAIN_LABEL = "reprobox.assemble-chain"


def chain_config(base_config: Mapping[str, Any], diff_ids: Sequence[str]) -> bytes:
    """The kept bottom image's config: the base's platform, the chain, one label; no times."""
    config = {
        "architecture": base_config.get("architecture", "amd64"),
        "os": base_config.get("os", "linux"),
        "config": {"Labels": {CHAIN_LABEL: diff_ids[-1]}},
        "rootfs": {"type": "layers", "diff_ids": list(diff_ids)},
    }
    return json.dumps(config, sort_keys=True, separators=(",", ":")).encode()


class Preload:
    """A load running in a daemon thread; `wait` gives the loaded image's ID, `cancel` stops it.

    Daemon, and let go of when cancelled: once the last chunk is sent, the engine registers the
    layer (seconds to minutes) and nothing on this side can stop that; a failed or interrupted
    build does not wait for it. The engine then keeps the chain image, as it would have anyway.
    """

    #: How long `cancel` waits for the thread before letting it go.
    CANCEL_WAIT_S = 2.0

    def __init__(
        self, ctx: Context, config: bytes, layers: Sequence[tuple[str, Layer | None]]
    ) -> None:
        self.image_id = "sha256:" + hashlib.sha256(config).hexdigest()
        self._stop = threading.Event()
        send = [
            (diff_id, None if layer is None else layer.path, 0 if layer is None else layer.size)
            for diff_id, layer in layers
        ]
        self._chunks = self._until_stopped(archive_stream(send, config, 0))
        self._ctx = ctx
        self._loaded: list[str] | None = None
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="preload", daemon=True)

    def _run(self) -> None:
        try:
            self._loaded = self._ctx.engine.load_stream(self._chunks, "the base and torch's layer")
        except BaseException as err:  # handed to the main thread by `wait`
            self._error = err

    def _until_stopped(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self._stop.is_set():
                raise EngineError("the early load was stopped: the build had failed")
            yield chunk

    def start(self) -> None:
        self._thread.start()

    def failed(self) -> bool:
        """Whether the load has already ended in an error (`wait` raises it)."""
        return not self._thread.is_alive() and self._error is not None

    def wait(self) -> str:
        """The loaded image's ID, once the engine holds it; the load's error, or EngineError if
        it loaded another. Interrupted here, the load is cancelled."""
        try:
            while self._thread.is_alive():
                self._thread.join(timeout=0.5)  # a Ctrl-C is taken between joins
        except BaseException:
            self.cancel()
            raise
        if self._error is not None:
            raise self._error
        if self._loaded != [self.image_id]:
            raise EngineError(
                f"the engine loaded {', '.join(self._loaded or []) or 'nothing'} for the base "
                f"and torch's layer (expected {self.image_id})"
            )
        return self.image_id

    def cancel(self) -> None:
        """Stop sending (the engine drops a load cut short before its end); wait a moment for
        the thread, then let it go."""
        self._stop.set()
        self._thread.join(timeout=self.CANCEL_WAIT_S)


def chain_image_id(base_config: Mapping[str, Any], chain: Sequence[str]) -> str:
    """The ID the kept bottom image of `chain` has on the classic store."""
    return "sha256:" + hashlib.sha256(chain_config(base_config, chain)).hexdigest()


def start_preload(
    ctx: Context,
    base_config: Mapping[str, Any],
    base_diff_ids: Sequence[str],
    layer: Layer,
) -> Preload:
    """Start loading the base's layers (the engine holds them: only named) and `layer`."""
    chain = (*base_diff_ids, layer.diff_id)
    preload = Preload(
        ctx,
        chain_config(base_config, chain),
        [*((d, None) for d in base_diff_ids), (layer.diff_id, layer)],
    )
    preload.start()
    return preload
