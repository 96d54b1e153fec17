"""The self-check stage: run the in-image self-check, read its report, compare fingerprints."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from reprobox._registry import check_image_ref
from reprobox._text import unsafe_character
from reprobox.compare import Verdict, first_trace_difference, settings_differences
from reprobox.context import Context
from reprobox.emulate import emulation
from reprobox.engine import Engine
from reprobox.errors import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_UNRECORDED,
    BadInputError,
    CheckError,
    GpuUnavailableError,
)
from reprobox.labels import (
    SELFCHECK_ARGV,
    image_uses_cuda,
    recorded_fingerprints,
    recorded_settings,
    recorded_trace,
)
from reprobox.spec import Spec

__all__ = [
    "CheckResult",
    "SelfCheckResult",
    "Settings",
    "check_image",
    "compare_with_recorded",
    "device_argv",
    "gpu_probe_argv",
    "parse_selfcheck_label",
    "run_selfcheck",
    "selfcheck_argv",
    "settings_seen",
]

_PROGRAM = "/opt/reprobox/reprobox_selfcheck.py"
_CPUSET = re.compile(r"[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*")
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
        raise BadInputError(
            f"{image}: its {SELFCHECK_ARGV} label is not the self-check command reprobox records "
            f"(a JSON list of strings starting with python {_PROGRAM}): {raw[:120]!r}",
            hint="the image was changed after reprobox built it; build it again, or ask its author",
        )
    return list(argv)


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
    `cpuset_cpus` and `archive` go to `Engine.run` as they are.
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
    """Does this run reproduce the fingerprint the image recorded for the same device class?"""
    recorded = recorded_fingerprints(labels).get(result.device_class)
    return Verdict(here=result.fingerprint, recorded=recorded)


def settings_seen(report: Mapping[str, Any]) -> dict[str, Any]:
    """What decides the bits, from a self-check report: ENV, torch's flags, the CPU, and what
    the hook adapted to on this host."""
    settings = report.get("settings") or {}
    seen = {key: settings.get(key) for key in ("env", "torch", "cpu")}
    hook = settings.get("hook")
    seen["hook_host"] = hook.get("host") if isinstance(hook, dict) else None
    return seen


@dataclass(frozen=True)
class Settings:
    """The settings this run saw, those the image recorded for its device class, and, where the
    fingerprint differs from the record, which of them differ (`key.path: [recorded, here]`;
    None when nothing was recorded to compare with)."""

    here: Mapping[str, Any]
    recorded: Mapping[str, Any] | None
    differences: Mapping[str, list[Any]] | None


@dataclass(frozen=True)
class CheckResult:
    """`reprobox check IMAGE`: the self-check here, and how it compares with the image's record."""

    image: str
    selfcheck: SelfCheckResult
    #: This run's fingerprint against the one the image records for this device class.
    verdict: Verdict
    #: Every fingerprint the image records (device class -> fingerprint).
    fingerprints: Mapping[str, str]
    #: The first difference between the two runs here or, where the fingerprint differs
    #: from the record, between this run and the recorded one.
    first_difference: Mapping[str, Any] | None
    settings: Settings
    #: The qemu-user CPU model it ran on (`--emulate-cpu`), and the CPUs it was given.
    emulated_cpu: str | None = None
    cpuset_cpus: str | None = None

    @property
    def passed(self) -> bool:
        """The runs here agree, and do not contradict the recorded fingerprint."""
        return self.selfcheck.passed and self.verdict.matches is not False

    @property
    def outcome(self) -> str:
        """One word: not-reproducible, reproduced, differs, or unrecorded."""
        if not self.selfcheck.passed:
            return "not-reproducible"
        return {True: "reproduced", False: "differs", None: "unrecorded"}[self.verdict.matches]

    @property
    def exit_code(self) -> int:
        """1 when it failed; 5 when the runs agree but the image recorded nothing for this
        device class (neither a failure nor a proof); else 0."""
        if not self.passed:
            return EXIT_CHECK_FAILED
        return EXIT_UNRECORDED if self.verdict.matches is None else EXIT_OK


def check_image(
    ctx: Context, image: str, *, emulate_cpu: str | None = None, cpuset_cpus: str | None = None
) -> CheckResult:
    """The check stage: rerun the self-check in `image` here, compare with what it recorded.

    `emulate_cpu` runs it on a qemu-user CPU model; `cpuset_cpus` on those CPUs only.
    """
    if cpuset_cpus is not None and not _CPUSET.fullmatch(cpuset_cpus):
        raise BadInputError(
            f"--cpuset-cpus {cpuset_cpus!r} is not a CPU list",
            hint="write e.g. '0' or '0-1' or '0,2'",
        )
    check_image_ref(image)
    ctx.note_engine()
    if not ctx.engine.image_exists(image):
        raise BadInputError(
            f"no image {image!r} in the engine", hint="build it, `reprobox import` it, or pull it"
        )
    labels = ctx.engine.inspect_image(image).labels
    raw_argv = labels.get(SELFCHECK_ARGV)
    if raw_argv is None:
        raise BadInputError(f"{image} is not a reprobox image (it has no {SELFCHECK_ARGV} label)")
    recorded_argv = parse_selfcheck_label(image, raw_argv)
    cuda = image_uses_cuda(labels, image)
    if cuda and emulate_cpu is not None:
        raise BadInputError(
            f"--emulate-cpu: {image} is a CUDA image; its self-check runs on the GPU, and an "
            "emulated CPU says nothing about it",
            hint="emulate CPUs for CPU images (torch.cuda: cpu) only",
        )
    argv = device_argv(recorded_argv, cuda=cuda)
    emulated = emulation(emulate_cpu, ctx.engine_info().arch) if emulate_cpu is not None else None
    where = f" on an emulated {emulate_cpu}" if emulate_cpu else ""
    with ctx.reporter.stage(
        f"self-check in {image} ({'on the GPU' if cuda else 'on the CPU'}{where})"
    ):
        result = run_selfcheck(
            ctx.engine,
            image,
            [*emulated.argv_prefix, *argv] if emulated else argv,
            gpus=cuda,
            cpuset_cpus=cpuset_cpus,
            archive=emulated.archive if emulated else None,
            timeout_s=4 * 3600 if emulated else 3600,
        )
    verdict = compare_with_recorded(result, labels)
    difference = result.first_difference
    here = settings_seen(result.report)
    recorded = recorded_settings(labels, result.device_class)
    differing = None
    if verdict.matches is False:
        trace = recorded_trace(labels, result.device_class)
        runs = result.report.get("runs") or [{}]
        difference = None if trace is None else first_trace_difference(trace, runs[0])
        differing = None if recorded is None else settings_differences(recorded, here)
    return CheckResult(
        image,
        result,
        verdict,
        recorded_fingerprints(labels),
        difference,
        Settings(here, recorded, differing),
        emulate_cpu,
        cpuset_cpus,
    )
