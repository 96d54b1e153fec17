"""The self-check stage: run the in-image self-check, read its report, compare fingerprints."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reprobox.engine import Engine
from reprobox.errors import CheckError
from reprobox.spec import Spec

__all__ = [
    "FINGERPRINT_LABEL",
    "SELFCHECK_LABEL",
    "SETTINGS_LABEL",
    "SelfCheckResult",
    "Verdict",
    "compare_with_recorded",
    "fingerprint_label",
    "recorded_fingerprints",
    "recorded_settings",
    "run_selfcheck",
    "selfcheck_argv",
    "settings_differences",
    "settings_seen",
]

FINGERPRINT_LABEL = "reprobox.fingerprint."
SELFCHECK_LABEL = "reprobox.selfcheck.argv"
#: + device class: the settings the recorded run saw (ENV, torch's flags, the CPU), as JSON.
SETTINGS_LABEL = "reprobox.settings."
_PROGRAM = "/opt/reprobox/reprobox_selfcheck.py"
_DEVICE_CLASS = re.compile(r"^[a-z0-9][a-z0-9._-]{0,62}$")


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


def fingerprint_label(device_class: str) -> str:
    """The label key under which an image records its fingerprint for one device class."""
    if not _DEVICE_CLASS.match(device_class):
        raise CheckError(f"the self-check reported an unusable device class {device_class!r}")
    return FINGERPRINT_LABEL + device_class


def recorded_fingerprints(labels: Mapping[str, str]) -> dict[str, str]:
    """Device class -> fingerprint, from an image's labels."""
    return {
        k.removeprefix(FINGERPRINT_LABEL): v
        for k, v in labels.items()
        if k.startswith(FINGERPRINT_LABEL)
    }


def run_selfcheck(
    engine: Engine,
    image: str,
    argv: list[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout_s: float = 3600,
    gpus: bool = False,
    cpuset_cpus: str | None = None,
    archive: bytes | None = None,
) -> SelfCheckResult:
    """Run the self-check in a fresh container of `image` and read its JSON report."""
    result = engine.run(
        image,
        argv,
        env=env,
        timeout_s=timeout_s,
        gpus=gpus,
        cpuset_cpus=cpuset_cpus,
        archive=archive,
    )
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
            f"no fingerprint is recorded for this host's device class {result.device_class} "
            f"(the image records: {known}), so there is nothing to compare with: neither a "
            f"failure nor a proof; this host's fingerprint is {result.fingerprint}",
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


def settings_seen(report: Mapping[str, Any]) -> dict[str, Any]:
    """What decides the bits, from a self-check report: ENV, torch's flags, the CPU, the hook's adaptations."""
    settings = report.get("settings") or {}
    seen = {key: settings.get(key) for key in ("env", "torch", "cpu")}
    hook = settings.get("hook")
    seen["hook_host"] = hook.get("host") if isinstance(hook, dict) else None
    return seen


def recorded_settings(labels: Mapping[str, str], device_class: str) -> dict[str, Any] | None:
    """The settings the image's recorded run saw on `device_class`, if it recorded them."""
    raw = labels.get(SETTINGS_LABEL + device_class)
    if raw is None:
        return None
    try:
        loaded = json.loads(raw)
    except json.JSONDecodeError:
        return None
    return loaded if isinstance(loaded, dict) else None


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        flat: dict[str, Any] = {}
        for key, item in value.items():
            flat |= _flatten(item, f"{prefix}.{key}" if prefix else str(key))
        return flat
    return {prefix: value}


def settings_differences(recorded: Mapping[str, Any], here: Mapping[str, Any]) -> dict[str, Any]:
    """`key.path: [recorded, here]` for every setting the two sides saw differently."""
    a, b = _flatten(dict(recorded)), _flatten(dict(here))
    return {
        key: [a.get(key), b.get(key)] for key in sorted(set(a) | set(b)) if a.get(key) != b.get(key)
    }
