"""One comparator of "recorded vs this run", numbering steps as the in-image self-check does."""

from __future__ import annotations

import importlib.util
from types import ModuleType
from typing import Any

import pytest
from hooked_venv import SELFCHECK

from reprobox.compare import Verdict, first_trace_difference


@pytest.fixture(scope="module")
def selfcheck() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reprobox_selfcheck", SELFCHECK)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(losses: list[str], state: str = "s") -> dict[str, Any]:
    return {"losses": losses, "state_sha256": state}


LOSSES = [float.hex(x / 7) for x in range(1, 7)]
CHANGED = [*LOSSES[:3], float.hex(1.0), *LOSSES[4:]]


@pytest.mark.parametrize(
    ("a", "b"),
    [
        (_run(LOSSES), _run(CHANGED)),
        (_run(LOSSES), _run(LOSSES[:4])),
        (_run(LOSSES), _run(LOSSES, state="t")),
        (_run(LOSSES), _run(LOSSES)),
    ],
    ids=["a-loss", "fewer-steps", "final-state", "same"],
)
def test_the_host_and_the_image_name_the_same_first_difference(
    selfcheck: ModuleType, a: dict[str, Any], b: dict[str, Any]
) -> None:
    assert first_trace_difference(a, b) == selfcheck._first_loss_difference(a, b)


def test_a_changed_loss_is_named_by_its_step_counted_from_one() -> None:
    difference = first_trace_difference(_run(LOSSES), _run(CHANGED))
    assert difference == {"step": 4, "what": "loss", "a": LOSSES[3], "b": float.hex(1.0)}


def test_a_verdict_says_match_differ_or_nothing_recorded() -> None:
    assert Verdict(here="x", recorded="x").matches is True
    assert Verdict(here="x", recorded="y").matches is False
    assert Verdict(here="x", recorded=None).matches is None
