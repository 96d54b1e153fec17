"""What a build leaves behind to compare with later: the image ID in the lock, and a reuse index.

The lock records the reproducible (normalised, unlabelled) image ID it produced, on one header
line that is not part of the lock's own hash, so recording it changes neither the lock's
identity nor the image. The reuse index maps a raw engine build to the labelled image made
from it, so an unchanged rebuild skips normalising and the self-check.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from pathlib import Path

__all__ = ["ReuseIndex", "lock_body", "record_image_id", "recorded_image_id"]

_IMAGE_LINE = re.compile(r"^# image-id: (?P<id>sha256:[0-9a-f]{64})\n", re.MULTILINE)
_AFTER = re.compile(r"^# reprobox: .*\n", re.MULTILINE)


def lock_body(text: str) -> str:
    """The lock's text without its image-id line: what the lock's sha256 is taken over."""
    return _IMAGE_LINE.sub("", text)


def recorded_image_id(text: str) -> str | None:
    """The image ID a lock recorded, if any."""
    match = _IMAGE_LINE.search(text)
    return None if match is None else match["id"]


def _write_atomic(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            out.write(text)
        Path(tmp).replace(path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def record_image_id(lock_path: Path, image_id: str) -> None:
    """Write `image_id` into the lock's header (only where it records none yet)."""
    text = lock_path.read_text(encoding="utf-8")
    if recorded_image_id(text) is not None:
        return
    anchor = _AFTER.search(text)
    position = anchor.end() if anchor else 0
    _write_atomic(lock_path, f"{text[:position]}# image-id: {image_id}\n{text[position:]}")


class ReuseIndex:
    """Raw build ID -> the normalised, checked and labelled image made from it."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def _path(self, built_id: str) -> Path:
        return self.root / f"{built_id.removeprefix('sha256:')}.json"

    def get(self, built_id: str) -> dict[str, str] | None:
        """The record for `built_id`; None when absent or unreadable (it is only a cache)."""
        try:
            data = json.loads(self._path(built_id).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None
        if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
            return None
        return data

    def put(self, built_id: str, record: dict[str, str]) -> None:
        """Remember what `built_id` became."""
        self.root.mkdir(parents=True, exist_ok=True)
        _write_atomic(self._path(built_id), json.dumps(record, sort_keys=True))
