"""This run against the one recorded before: one verdict, and one shape for the first difference.

`build` compares the image ID it made with the one its lock records; `check` compares the
self-check's fingerprint with the one the image records for this device class, and where they
differ, this run's trace with the recorded one. A first difference has the in-image self-check's
shape, whichever comparison found it: `{"step", "what", "a", "b"}`, steps counted from 1, `a`
the earlier side (the first run, or the recorded one) and `b` the later. Where a fingerprint
differs, the settings both runs saw are compared too: `{"key.path": [recorded, here]}`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["Verdict", "first_trace_difference", "settings_differences"]


@dataclass(frozen=True)
class Verdict:
    """A value this run produced (an image ID, a fingerprint) against the one recorded."""

    here: str
    recorded: str | None

    @property
    def matches(self) -> bool | None:
        """True or False; None when nothing was recorded to compare with."""
        return None if self.recorded is None else self.recorded == self.here


def _losses(run: Mapping[str, Any]) -> list[Any]:
    losses = run.get("losses")
    return losses if isinstance(losses, list) else []


def first_trace_difference(
    recorded: Mapping[str, Any], here: Mapping[str, Any]
) -> dict[str, Any] | None:
    """The first step at which this run's trace (`here`) leaves the recorded one, or None.

    A trace is one run of the self-check: `losses` (float.hex per step), `state_sha256` (the
    final model and optimiser state) and, with the inference check, `inference_sha256`.
    """
    a, b = _losses(recorded), _losses(here)
    for step, (loss_a, loss_b) in enumerate(zip(a, b, strict=False), 1):
        if loss_a != loss_b:
            return {"step": step, "what": "loss", "a": loss_a, "b": loss_b}
    if len(a) != len(b):
        return {"step": None, "what": "number of steps", "a": str(len(a)), "b": str(len(b))}
    if recorded.get("state_sha256") != here.get("state_sha256"):
        return {
            "step": len(a),
            "what": "final state",
            "a": recorded.get("state_sha256"),
            "b": here.get("state_sha256"),
        }
    if recorded.get("inference_sha256") != here.get("inference_sha256"):
        return {
            "step": None,
            "what": "inference",
            "a": recorded.get("inference_sha256"),
            "b": here.get("inference_sha256"),
        }
    return None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return flat
    return {prefix: value}


def settings_differences(
    recorded: Mapping[str, Any], here: Mapping[str, Any]
) -> dict[str, list[Any]]:
    """`key.path: [recorded, here]` for every setting the two sides saw differently."""
    a, b = _flatten(recorded), _flatten(here)
    return {
        key: [a.get(key), b.get(key)] for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)
    }
