"""The self-check stage: run the in-image self-check, read its report, compare fingerprints."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reprobox._text import unsafe_character
from reprobox.engine import Engine, GpuUnavailableError
from reprobox.errors import EXIT_BAD_INPUT, CheckError, ReproboxError
from reprobox.spec import Spec

__all__ = [
    "CUDA_LABEL",
    "FINGERPRINT_LABEL",
    "SELFCHECK_LABEL",
    "SETTINGS_LABEL",
    "SelfCheckResult",
    "Verdict",
    "compare_with_recorded",
    "device_argv",
    "fingerprint_label",
    "gpu_probe_argv",
    "image_uses_cuda",
    "parse_selfcheck_label",
    "recorded_fingerprints",
    "recorded_settings",
    "run_selfcheck",
    "selfcheck_argv",
    "settings_differences",
    "settings_seen",
]

FINGERPRINT_LABEL = "reprobox.fingerprint."
SELFCHECK_LABEL = "reprobox.selfcheck.argv"
#: "cpu" or the CUDA version the image's torch was built for; set at render time.
CUDA_LABEL = "reprobox.cuda"
#: + device class: the settings the recorded run saw (ENV, torch's flags, the CPU), as JSON.
SETTINGS_LABEL = "reprobox.settings."
_PROGRAM = "/opt/reprobox/reprobox_selfcheck.py"
_DEVICE_CLASS = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_CUDA_VALUE = re.compile(r"cpu|[0-9]{1,2}\.[0-9]{1,2}")
_EXIT_DEVICE_MISSING = 3  # the self-check's own exit status for --device cuda without a GPU
_GPU_HINT = (
    "run it on a host with an NVIDIA GPU, its driver and the NVIDIA Container Toolkit "
    "(`reprobox doctor SPEC` says what this host lacks)"
)


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
    if spec.torch.is_cuda:
        argv += ["--device", "cuda"]
    script = spec.script_path
    if script is not None:
        argv += [
            "--script",
            f"/opt/reprobox/user/{script.name}",
            "--output-dir",
            "/tmp/reprobox-output",  # noqa: S108 - a fresh container's /tmp, nobody else's
        ]
    return argv + _inference_argv(spec)


def _inference_argv(spec: Spec) -> list[str]:
    """The inference check's flags: in the argv label, so `check IMAGE` reruns it too."""
    selfcheck = spec.selfcheck
    if not selfcheck.inference:
        return []
    flags = ["--inference"]
    if selfcheck.require_batch_invariance:
        flags.append("--require-batch-invariance")
    if selfcheck.inference_moe:
        flags.append("--inference-moe")
    return flags


def image_uses_cuda(labels: Mapping[str, str], image: str) -> bool:
    """Whether `image` is a CUDA image, by its own `reprobox.cuda` label (validated)."""
    value = labels.get(CUDA_LABEL)
    if value is None or not _CUDA_VALUE.fullmatch(value):
        shown = "missing" if value is None else repr(value[:40])
        raise ReproboxError(
            f"{image}: its {CUDA_LABEL} label is {shown}, not 'cpu' or a CUDA version such as '12.4'",
            hint="rebuild it with this reprobox (`reprobox build SPEC`)",
        )
    return value != "cpu"


def device_argv(argv: list[str], *, cuda: bool) -> list[str]:
    """The self-check's argv for the image's kind: a CUDA image trains on the GPU, never on CPU.

    The recorded argv (a label) says `--device cuda` for CUDA images built by this reprobox;
    an older or edited one is corrected here, since `auto` would fall back to the CPU.
    """
    if not cuda:
        return list(argv)
    kept: list[str] = []
    skip = False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--device":
            skip = True
        elif not arg.startswith("--device="):
            kept.append(arg)
    return [*kept, "--device", "cuda"]


def gpu_probe_argv() -> list[str]:
    """The shortest self-check on the GPU: it answers in seconds where there is none."""
    return ["python", _PROGRAM, "--steps", "1", "--device", "cuda"]


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
    cpuset_cpus: str | None = None,
    archive: bytes | None = None,
) -> SelfCheckResult:
    """Run the self-check in a fresh container of `image` and read its JSON report.

    `gpus` asks the engine for every GPU: a CUDA image's self-check. A run that reports no
    GPU, or trained anywhere but on one, raises; it never passes as a CPU proof.
    """
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
    missing = report.get("device_missing")
    if result.exit_code == _EXIT_DEVICE_MISSING and isinstance(missing, str):
        raise GpuUnavailableError(
            f"the self-check in {image} was to train on a GPU (--device cuda) and found none "
            f"usable: {missing[:500]}",
            hint=_GPU_HINT,
        )
    if gpus and isinstance(device_class, str) and not device_class.startswith("cuda-"):
        raise CheckError(
            f"the self-check in {image} was given the GPU but trained on {device_class}; "
            "a CUDA image records no CPU fingerprint",
            hint="check that the image's torch is a CUDA build (`reprobox diff` against a good one)",
        )
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
