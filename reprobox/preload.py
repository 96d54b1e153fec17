"""The bottom chain of an assembled image (the base and torch's layer) loaded into the engine
while the layers above it are written.

A classic-store `docker load` of a 0.9 GB layer takes 10 to 18 s here, and the final load can
only start once every layer and the config exist. So once torch's layer is there, a thread
loads a small image of the base's layers and that one layer; the final load then sends only
the layers above it. That image is kept, untagged and labelled `reprobox.assemble-chain`, as
the recipe's raw build is kept: its config is a pure function of the two inputs, so builds that
share them share it, and no build removes what another may be using. `docker image prune
--filter label=reprobox.assemble-chain` removes them; the final images keep their layers.

The containerd store takes every layer in each load (section 3.3 of the performance design), so
nothing is loaded early there.
"""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
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
    """A load running in a thread; `wait` gives the loaded image's ID, `cancel` stops it."""

    def __init__(
        self, ctx: Context, config: bytes, layers: Sequence[tuple[str, Layer | None]]
    ) -> None:
        self.image_id = "sha256:" + hashlib.sha256(config).hexdigest()
        self.sent = sum(layer.size for _, layer in layers if layer is not None)
        self._stop = threading.Event()
        send = [
            (diff_id, None if layer is None else layer.path, 0 if layer is None else layer.size)
            for diff_id, layer in layers
        ]
        chunks = self._until_stopped(archive_stream(send, config, 0))
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="preload")
        self._future: Future[list[str]] = self._pool.submit(
            ctx.engine.load_stream, chunks, "the base and torch's layer"
        )

    def _until_stopped(self, chunks: Iterator[bytes]) -> Iterator[bytes]:
        for chunk in chunks:
            if self._stop.is_set():
                raise EngineError("the early load was stopped: the build had failed")
            yield chunk

    def wait(self) -> str:
        """The loaded image's ID, once the engine holds it; EngineError if it loaded another."""
        try:
            loaded = self._future.result()
        finally:
            self._pool.shutdown()
        if loaded != [self.image_id]:
            raise EngineError(
                f"the engine loaded {', '.join(loaded) or 'nothing'} for the base and torch's "
                f"layer (expected {self.image_id})"
            )
        return self.image_id

    def cancel(self) -> None:
        """Stop sending (the engine drops a load cut short) and wait for the thread."""
        self._stop.set()
        self._pool.shutdown(wait=True)


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
    config = chain_config(base_config, chain)
    return Preload(ctx, config, [*((d, None) for d in base_diff_ids), (layer.diff_id, layer)])
