"""What the CLI prints: each command's typed result as a text summary, and as a `--json` report.

The stages return dataclasses and nothing here computes anything: it only words and shapes
them. A JSON report is the result's fields plus `summary` (its text); the keys are a contract
with pipelines (docs/ci.md), so they change only with that document.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, fields, is_dataclass
from functools import singledispatch
from pathlib import Path
from typing import Any

from reprobox.build import BuildResult
from reprobox.check import CheckResult, SelfCheckResult
from reprobox.compare import Verdict
from reprobox.diff import SECTIONS, Difference, ImageDiff, ImageSide
from reprobox.doctor import DoctorResult
from reprobox.export_import import ExportResult, ImportResult
from reprobox.lock import LockResult
from reprobox.publish import PublishResult
from reprobox.render import RenderResult

__all__ = ["report", "text"]

_MAX_ROWS = 30
_MAX_CELL = 44
_PLACES = {"config": "the config", "layer": "layers", "file": "files"}


def report(result: object) -> dict[str, Any]:
    """The `--json` report of a command's result: its fields, and its text as `summary`."""
    return _fields(result) | {"summary": text(result)}


@singledispatch
def text(result: object) -> str:
    """The text summary of a command's result."""
    raise TypeError(f"no text for {type(result).__name__}")


@singledispatch
def _fields(result: object) -> dict[str, Any]:
    raise TypeError(f"no report for {type(result).__name__}")


# --- lock, render ------------------------------------------------------------------------------


@text.register
def _(result: LockResult) -> str:
    return (
        f"{result.lock}: {result.wheels} wheels pinned by sha256 "
        f"(also as {result.pylock.name}, PEP 751)"
    )


def _jsonable(value: object) -> Any:
    """A result's field as JSON holds it: paths as strings, tuples as lists, dataclasses as objects."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_jsonable(item) for item in value]
    if isinstance(value, Mapping):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if is_dataclass(value) and not isinstance(value, type):
        return _plain(value)
    return value


def _plain(result: Any) -> dict[str, Any]:
    """A result whose report is its fields as they are."""
    return {f.name: _jsonable(getattr(result, f.name)) for f in fields(result)}


_fields.register(LockResult, _plain)


@text.register
def _(result: RenderResult) -> str:
    return (
        f"wrote the build context to {result.context} (Dockerfile, hook, self-check, lock; "
        f"determinism.cpu: {result.cpu})"
    )


_fields.register(RenderResult, _plain)


# --- build ---------------------------------------------------------------------------------------


@text.register
def _(result: BuildResult) -> str:
    if not result.passed or result.reproducible is None:
        return _build_outcome(result)
    return "\n".join(
        [
            _build_outcome(result),
            _image_id_message(result.reproducible, result.lock),
            f"tagged {', '.join(result.tags)} ({result.seconds} s)",
        ]
    )


def _build_outcome(result: BuildResult) -> str:
    """The first line: what the raw build became, and its proof."""
    check = result.selfcheck
    if result.reused:
        shown = ", ".join(f"{k} {v}" for k, v in result.fingerprints.items()) or "no self-check"
        return f"built {result.image_id}: unchanged since its last build ({shown})"
    if check is None:
        return f"built {result.image_id} (self-check skipped: --no-check, the image is not proven)"
    if not result.passed:
        return (
            f"self-check FAILED in {result.content_id}: {_why_failed(check.report)}; "
            "the image was not tagged"
        )
    return (
        f"built {result.image_id}: self-check passed on {check.device_class}, "
        f"fingerprint {check.fingerprint}" + _inference_lines(check.report)
    )


def _image_id_message(verdict: Verdict, lock: Path) -> str:
    if verdict.matches is None:
        return f"image ID {verdict.here} recorded in {lock}"
    if verdict.matches:
        return f"image ID {verdict.here} matches the one {lock} records"
    return (
        f"image ID {verdict.here} differs from the {verdict.recorded} that {lock} records; "
        f"`reprobox diff {verdict.recorded} {verdict.here}` shows why (if both are in this engine)"
    )


@_fields.register
def _(result: BuildResult) -> dict[str, Any]:
    out = {
        "spec": str(result.spec),
        "lock": str(result.lock),
        "spec_sha256": result.spec_sha256,
        "lock_sha256": result.lock_sha256,
        "base": result.base,
        "built_id": result.built_id,
        "tags": list(result.tags),
        "image_id": result.image_id,
        "content_id": result.content_id,
        "passed": result.passed,
        "selfcheck": _build_selfcheck(result),
    }
    if result.reproducible is not None:
        verdict = result.reproducible
        out["reproducible"] = {
            "recorded": verdict.recorded,
            "matches": verdict.matches,
            "message": _image_id_message(verdict, result.lock),
        }
    if result.seconds is not None:
        out["seconds"] = result.seconds
    return out


def _build_selfcheck(result: BuildResult) -> dict[str, Any] | None:
    """A fresh self-check's outcome, or the proof a reused image carries; None when skipped."""
    if result.reused:
        if not result.checked:
            return None
        return {"passed": True, "reused": True, "fingerprints": dict(result.fingerprints)}
    check = result.selfcheck
    if check is None:
        return None
    return {
        "passed": check.passed,
        "fingerprint": check.fingerprint,
        "device_class": check.device_class,
        "first_difference": check.first_difference,
        "report": check.report,
    }


def _why_failed(report: Mapping[str, Any]) -> str:
    """The self-check's own reasons (the runs' first difference, inference, deterministic mode)."""
    failures = [str(failure) for failure in report.get("failures") or []]
    return (
        "; ".join(failures)
        or f"the two runs differ at {json.dumps(report.get('first_difference'))}"
    )


def _inference_lines(report: Mapping[str, Any]) -> str:
    """The inference check's summary (run to run, batch and padding invariance), if it ran."""
    inference = report.get("inference") or {}
    return "".join(f"\n{line}" for line in inference.get("summary") or [])


# --- check ---------------------------------------------------------------------------------------


@text.register
def _(result: CheckResult) -> str:
    check, verdict = result.selfcheck, result.verdict
    lines = [
        "self-check passed: the two runs here match bit for bit"
        if check.passed
        else f"self-check FAILED: {_why_failed(check.report)}",
        _fingerprint_message(check, verdict, result.fingerprints),
    ]
    if verdict.matches is False:
        lines += _difference_lines(result)
    return "\n".join(lines) + _inference_lines(check.report)


def _difference_lines(result: CheckResult) -> list[str]:
    """Where this run differs from the recorded one: the first step, and the settings."""
    lines = []
    if result.first_difference is not None:
        lines.append(
            f"first difference from the recorded run: {json.dumps(result.first_difference)}"
        )
    differing = result.settings.differences
    if differing is None:
        lines.append("the image recorded no settings for this class to compare with")
    elif differing:
        shown = "; ".join(f"{key}: {a!r} recorded, {b!r} here" for key, (a, b) in differing.items())
        lines.append(f"settings that differ: {shown}")
    else:
        lines.append(
            "both sides saw the same settings (ENV, torch flags, CPU facts): the difference "
            "comes from something they do not name (a library's choice, a hardware approximation)"
        )
    return lines


def _fingerprint_message(
    check: SelfCheckResult, verdict: Verdict, fingerprints: Mapping[str, str]
) -> str:
    if verdict.matches is None:
        known = ", ".join(sorted(fingerprints)) or "none"
        return (
            f"no fingerprint is recorded for this host's device class {check.device_class} "
            f"(the image records: {known}), so there is nothing to compare with: neither a "
            f"failure nor a proof; this host's fingerprint is {check.fingerprint}"
        )
    if verdict.matches:
        return f"fingerprint {verdict.recorded} reproduced on {check.device_class}"
    return (
        f"fingerprint {check.fingerprint} differs from the {verdict.recorded} recorded for "
        f"{check.device_class}"
    )


@_fields.register
def _(result: CheckResult) -> dict[str, Any]:
    return {
        "image": result.image,
        "passed": result.passed,
        "verdict": result.outcome,
        "device_class": result.selfcheck.device_class,
        "fingerprint": result.selfcheck.fingerprint,
        "recorded": result.verdict.recorded,
        "recorded_classes": sorted(result.fingerprints),
        "matches_recorded": result.verdict.matches,
        "first_difference": result.first_difference,
        "settings": _jsonable(result.settings),
        "emulated_cpu": result.emulated_cpu,
        "cpuset_cpus": result.cpuset_cpus,
        "selfcheck": result.selfcheck.report,
    }


# --- diff ----------------------------------------------------------------------------------------


@text.register
def _(diff: ImageDiff) -> str:
    return format_diff(diff)


@_fields.register
def _(diff: ImageDiff) -> dict[str, Any]:
    return {
        "a": asdict(diff.a),
        "b": asdict(diff.b),
        "identical": diff.identical,
        "differences": [asdict(d) for d in diff.differences],
    }


def format_diff(diff: ImageDiff, *, max_rows: int = _MAX_ROWS) -> str:
    """A short table of the differences: a summary line, then at most `max_rows` rows."""
    lines = [f"a: {_side(diff.a)}", f"b: {_side(diff.b)}"]
    if diff.identical:
        return "\n".join([*lines, "identical"])
    lines.append(_summary(diff.differences))
    rows = [("WHERE", "FIELD", "A", "B")]
    rows += [(_where(d), d.field, _cell(d.a), _cell(d.b)) for d in diff.differences[:max_rows]]
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    lines += [
        "  ".join([*(c.ljust(w) for c, w in zip(r, widths, strict=False)), r[3]]) for r in rows
    ]
    left_out = len(diff.differences) - max_rows
    if left_out > 0:
        lines.append(f"... {left_out} more not shown (--json lists them all)")
    return "\n".join(line.rstrip() for line in lines)


def _side(side: ImageSide) -> str:
    named = side.ref in (side.image_id, side.image_id.removeprefix("sha256:"))
    return f"{side.image_id}{'' if named else f' ({side.ref})'}, {side.layers} layers"


def _summary(differences: Sequence[Difference]) -> str:
    """E.g. `13 differences: 6 in the config, 2 in layers, 5 in files (4 mtime, 1 sha256)`."""
    counts = Counter(d.section for d in differences)
    by_field = Counter(d.field for d in differences if d.section == "file")
    parts = [f"{counts[s]} in {_PLACES[s]}" for s in SECTIONS if counts[s]]
    fields_ = ", ".join(
        f"{n} {f}" for f, n in sorted(by_field.items(), key=lambda x: (-x[1], x[0]))
    )
    return f"{len(differences)} differences: {', '.join(parts)}" + (
        f" ({fields_})" if fields_ else ""
    )


def _where(row: Difference) -> str:
    if row.section == "config":
        return f"config {row.path}"
    return f"layer {row.layer}" + (f" {row.path}" if row.path else "")


def _cell(value: str | None) -> str:
    if value is None:
        return "-"
    return value if len(value) <= _MAX_CELL else value[: _MAX_CELL - 3] + "..."


# --- publish -------------------------------------------------------------------------------------


@text.register
def _(result: PublishResult) -> str:
    name = result.target.name
    if result.published is None and result.unverified is not None:
        return (
            f"{result.unverified}\nnothing was pushed to {name}: an image is published only "
            "with the proof of its self-check; `--allow-unverified` publishes it unproven (the "
            "report then says so)"
        )
    if result.published is None:
        built = text(result.built) if result.built is not None else "the self-check failed"
        return f"{built}\nnothing was pushed to {name}: the self-check gates publishing"
    done = result.published
    refs = [result.target.ref(tag) for tag in done.tags]
    warning = (
        ""
        if result.unverified is None
        else f"\nUNVERIFIED (--allow-unverified): no self-check proves this image: "
        f"{result.unverified}"
    )
    return (
        f"published {done.reference}\ntags: {', '.join(refs)} ({done.layers_pushed} layers "
        f"pushed, {done.layers_reused} already there; {result.seconds} s)" + warning
    )


@_fields.register
def _(result: PublishResult) -> dict[str, Any]:
    built, done = result.built, result.published
    out: dict[str, Any] = {
        "passed": result.passed,
        "exit_code": result.exit_code,
        "verified": done is not None and result.unverified is None,
        "unverified_reason": result.unverified,
        "fingerprints": dict(result.fingerprints),
        "reference": None if done is None else done.reference,
        "digest": None if done is None else done.digest,
        "tags": [] if done is None else [result.target.ref(tag) for tag in done.tags],
        "image_id": None if built is None else built.image_id,
        # Where no self-check could prove the image, there is none to show.
        "selfcheck": None
        if built is None or (done is None and result.unverified is not None)
        else _build_selfcheck(built),
    }
    if done is not None:
        out["layers"] = {"pushed": done.layers_pushed, "reused": done.layers_reused}
        out["seconds"] = result.seconds
    return out


# --- export, import, doctor ----------------------------------------------------------------------


@text.register
def _(result: ExportResult) -> str:
    members = ", ".join(result.members) or "no spec or lock"
    return (
        f"exported {result.image_id} ({', '.join(result.refs)}) to {result.archive}: "
        f"{result.bytes / 1e6:.0f} MB with {members} ({result.seconds} s)\n"
        f"on the other side: `reprobox import {result.archive.name}`, then "
        f"`reprobox check {result.refs[0]}`"
    )


@_fields.register
def _(result: ExportResult) -> dict[str, Any]:
    out = _plain(result) | {"tags": _jsonable(result.tags)}
    del out["refs"]  # the text names them; the report keeps the tags
    return out


@text.register
def _(result: ImportResult) -> str:
    shown = ", ".join(result.tags) or "no tags"
    first = result.tags[0] if result.tags else result.image_ids[0]
    return (
        f"loaded {', '.join(result.image_ids)} ({shown}) in {result.seconds} s\n"
        f"next: `reprobox check {first}` reruns its self-check here"
    )


_fields.register(ImportResult, _plain)


@text.register
def _(result: DoctorResult) -> str:
    out = []
    for line in result.lines:
        out.append(f"{line.status.upper():<5} {line.name:<10} {line.detail}")
        if line.hint and line.status != "ok":
            out.append(f"{'':<16} -> {line.hint}")
    failed = sum(line.status == "fail" for line in result.lines)
    against = f" for {result.spec}" if result.spec is not None else ""
    out.append(
        f"{failed} problem(s){against}: fix the FAIL lines above"
        if failed
        else f"this host can build{against or ' CPU specs'}"
    )
    return "\n".join(out)


@_fields.register
def _(result: DoctorResult) -> dict[str, Any]:
    return _plain(result) | {"passed": result.passed, "exit_code": result.exit_code}
