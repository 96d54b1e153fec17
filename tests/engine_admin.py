"""What tests do to the real engine beyond the operations reprobox uses: remove an image, list
images by label, read every field of an image's inspect, give an image more labels.

Import it as `from engine_admin import remove_image` (pytest puts tests/ on sys.path). Removing and
listing go through the docker SDK's own client; labels go through `Engine.build`, as a user's
`FROM image` + `LABEL` would.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import docker

from reprobox.docker_engine import DockerEngine

__all__ = ["add_labels", "find_images", "inspect_raw", "remove_image"]


def _api(engine: DockerEngine) -> docker.APIClient:
    return docker.APIClient(base_url=engine.host, version="auto")


def remove_image(engine: DockerEngine, ref: str, *, force: bool = False) -> None:
    """Remove `ref` (only untags it when other tags remain)."""
    with _api(engine) as api:
        api.remove_image(ref, force=force)


def find_images(engine: DockerEngine, labels: Mapping[str, str]) -> list[str]:
    """IDs of the images that carry all of `labels`, sorted."""
    wanted = [f"{key}={value}" for key, value in sorted(labels.items())]
    with _api(engine) as api:
        ids = api.images(quiet=True, filters={"label": wanted})
    return sorted(set(ids))


def inspect_raw(engine: DockerEngine, ref: str) -> dict[str, Any]:
    """`docker inspect` of an image as the engine says it, every field (reprobox reads a few)."""
    with _api(engine) as api:
        raw: dict[str, Any] = api.inspect_image(ref)  # type: ignore[no-untyped-call]
    return raw


def add_labels(engine: DockerEngine, image: str, labels: Mapping[str, str]) -> str:
    """A new image: `image` plus `labels`, with the very same layers (no layer is rebuilt).

    The builder appends the labels as a LABEL step itself, so values need no quoting.
    """
    with tempfile.TemporaryDirectory(prefix="labels-") as tmp:
        (Path(tmp) / "Dockerfile").write_text(f"FROM {image}\n")
        return engine.build(Path(tmp), labels=labels)
