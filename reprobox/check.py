"""The self-check stage: run the in-image self-check, read its report, compare fingerprints."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reprobox._text import unsafe_character
from reprobox.engine import Engine
from reprobox.errors import EXIT_BAD_INPUT, CheckError, ReproboxError
from reprobox.spec import Spec

__all__ = [
    "FINGERPRINT_LABEL",
    "SELFCHECK_LABEL",
    "SelfCheckResult",
    "Verdict",
    "compare_with_recorded",
    "fingerprint_label",
    "parse_selfcheck_label",
    "recorded_fingerprints",
    "run_selfcheck",
    "selfcheck_argv",
]

FINGERPRINT_LABEL = "reprobox.fingerprint."
SELFCHECK_LABEL = "reprobox.selfcheck.argv"
_PROGRAM = "/opt/reprobox/reprobox_selfcheck.py"
_DEVICE_CLASS = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class SelfCheckResult:
    """What one self-check run in an image reported."""

    passed: bool
    fingerprint: str
    device_class: str
    first_difference: Mapping[str, Any] | None
    report: Mapping[str, Any]


@dataclass(frozen=True)
class Verdict:
    """The self-check compared with the fingerprint the image recorded for this device class."""

    matches: bool | None  # None: nothing recorded for this device class yet
    recorded: str | None
    message: str


def selfcheck_argv(spec: Spec) -> list[str]:
    """The command that runs the self-check inside the image, as the spec asks for it."""
    argv = ["python", _PROGRAM, "--steps", str(spec.selfcheck.steps)]
    script = spec.script_path
    if script is not None:
        argv += [
            "--script",
            f"/opt/reprobox/user/{script.name}",
            "--output-dir",
            "/tmp/reprobox-output",  # noqa: S108 - a fresh container's /tmp, nobody else's
        ]
    return argv


def parse_selfcheck_label(image: str, raw: str) -> list[str]:
    """The self-check command an image's label records, checked: a JSON list of plain strings
    that runs reprobox's self-check program; anything else is exit 2 naming the label."""
    try:
        argv = json.loads(raw)
    except (ValueError, RecursionError):
        argv = None
    well_formed = (
        isinstance(argv, list)
        and 2 <= len(argv) <= 64
        and all(isinstance(a, str) and len(a) <= 4096 and unsafe_character(a) is None for a in argv)
        and argv[:2] == ["python", _PROGRAM]
    )
    if not well_formed:
        raise ReproboxError(
            f"{image}: its {SELFCHECK_LABEL} label is not the self-check command reprobox records "
            f"(a JSON list of strings starting with python {_PROGRAM}): {raw[:120]!r}",
            hint="the image was changed after reprobox built it; build it again, or ask its author",
            exit_code=EXIT_BAD_INPUT,
        )
    return list(argv)


def fingerprint_label(device_class: str) -> str:
    """The label key under which an image records its fingerprint for one device class."""
    if not _DEVICE_CLASS.fullmatch(device_class):
        raise CheckError(f"the self-check reported an unusable device class {device_class!r}")
    return FINGERPRINT_LABEL + device_class


def recorded_fingerprints(labels: Mapping[str, str]) -> dict[str, str]:
    """Device class -> fingerprint, from an image's labels; malformed ones (an image is someone
    else's input: a label may hold anything, terminal escapes included) are left out."""
    return {
        k.removeprefix(FINGERPRINT_LABEL): v
        for k, v in labels.items()
        if k.startswith(FINGERPRINT_LABEL)
        and _DEVICE_CLASS.fullmatch(k.removeprefix(FINGERPRINT_LABEL))
        and isinstance(v, str)
        and _FINGERPRINT.fullmatch(v)
    }


def run_selfcheck(
    engine: Engine,
    image: str,
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 3600,
    gpus: bool = False,
) -> SelfCheckResult:
    """Run the self-check in a fresh container of `image` and read its JSON report."""
    result = engine.run(image, argv, env=env, timeout_s=timeout_s, gpus=gpus)
    try:
        report: dict[str, Any] = json.loads(result.stdout)
        passed = report["passed"]
        fingerprint = report["fingerprint"]
        device_class = report["device_class"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        tail = "\n".join((result.stderr or result.stdout).splitlines()[-20:])
        raise CheckError(
            f"the self-check in {image} exited {result.exit_code} without a report\n{tail}",
            hint="run with --debug, or `docker run --rm IMAGE python /opt/reprobox/reprobox_selfcheck.py`",
        ) from exc
    if fingerprint is None or device_class is None:
        failures = "; ".join(str(f) for f in report.get("failures") or []) or "no reason given"
        tail = "\n".join(result.stderr.splitlines()[-20:])
        raise CheckError(f"the self-check in {image} could not train: {failures}\n{tail}".rstrip())
    if not isinstance(passed, bool) or passed != (result.exit_code == 0):
        raise CheckError(
            f"the self-check's report (passed={passed!r}) disagrees with its exit code {result.exit_code}"
        )
    return SelfCheckResult(
        passed, str(fingerprint), str(device_class), report.get("first_difference"), report
    )


def compare_with_recorded(result: SelfCheckResult, labels: Mapping[str, str]) -> Verdict:
    """Does this run reproduce what the image recorded for the same device class?"""
    recorded = recorded_fingerprints(labels).get(result.device_class)
    if recorded is None:
        known = ", ".join(sorted(recorded_fingerprints(labels))) or "none"
        return Verdict(
            None,
            None,
            f"the image holds no fingerprint for device class {result.device_class} yet "
            f"(it has: {known}); this run's fingerprint is {result.fingerprint}",
        )
    if recorded == result.fingerprint:
        return Verdict(
            True, recorded, f"fingerprint {recorded} reproduced on {result.device_class}"
        )
    return Verdict(
        False,
        recorded,
        f"fingerprint {result.fingerprint} differs from the {recorded} recorded for {result.device_class}",
    )
