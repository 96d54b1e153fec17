"""The stages in order, for the CLI: spec -> lock -> fetch -> render -> build -> check -> label."""

from __future__ import annotations

import json
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobox._files import write_text_atomic
from reprobox._registry import check_image_ref
from reprobox.bootstrap import bootstrap_base
from reprobox.cache import WheelCache, default_cache_dir, usable_cache_dir
from reprobox.check import (
    SelfCheckResult,
    compare_with_recorded,
    device_argv,
    gpu_probe_argv,
    parse_selfcheck_label,
    run_selfcheck,
    selfcheck_argv,
)
from reprobox.compare import Verdict, first_trace_difference
from reprobox.compat import TRITON_BUILD_PACKAGES
from reprobox.docker_engine import DockerEngine
from reprobox.engine import Engine
from reprobox.errors import BadInputError, DigestMismatchError, GpuUnavailableError
from reprobox.labels import (
    CONTENT_ID,
    SELFCHECK_ARGV,
    fingerprint_label,
    image_uses_cuda,
    recorded_fingerprints,
    recorded_trace,
    trace_label,
)
from reprobox.lock import ensure_lock
from reprobox.locked import Lock
from reprobox.lockfile import LockFile, default_lock_path, pylock_path, record_image_id
from reprobox.normalize import normalize_image, relabel
from reprobox.progress import Reporter
from reprobox.render import RenderedContext, check_output_dir, render_context
from reprobox.spec import Spec, load_spec

__all__ = ["ReuseIndex", "build", "check", "lock", "render"]


@dataclass(frozen=True)
class _Locked:
    spec: Spec
    file: LockFile
    path: Path

    @property
    def lock(self) -> Lock:
        return self.file.lock


def _locked(spec_path: Path, lock_path: Path | None, relock: bool, reporter: Reporter) -> _Locked:
    spec = load_spec(spec_path)
    path = lock_path or default_lock_path(spec_path)
    with reporter.stage(f"lock {path}"):
        locked = ensure_lock(spec, path, relock=relock, on_note=reporter.note)
    return _Locked(spec, locked, path)


def _fetch(locked: _Locked, refetch: bool, reporter: Reporter) -> dict[str, Path]:
    cache = WheelCache(default_cache_dir())
    with reporter.stage(f"fetch and verify {len(locked.lock.wheels)} wheels into {cache.root}"):
        return cache.fetch(locked.lock.wheels, progress=reporter.transfer, refetch=refetch)


def _engine(reporter: Reporter) -> Engine:
    engine = DockerEngine()
    info = engine.ping()
    reporter.note(
        f"Docker Engine {info.server_version} (API {info.api_version}, {info.arch}) at {info.host}"
    )
    return engine


def _pull_base(ref: str, engine: Engine, reporter: Reporter) -> None:
    """Pull a digest-pinned `base.image` the engine lacks, with the user's Docker credentials,
    and check that what came is the image the digest names."""
    from reprobox._registry import registry_auth

    named, digest = ref.split("@", 1)
    slash, colon = named.rfind("/"), named.rfind(":")
    repository = named[:colon] if colon > slash else named  # the tag goes: the digest decides
    first = repository.split("/", 1)[0]
    # Docker's rule: a first part with a dot or a port (or localhost) names the registry.
    is_host = "/" in repository and ("." in first or ":" in first or first == "localhost")
    registry = first if is_host else "https://index.docker.io/v1/"
    with reporter.stage(f"pull the base {repository}@{digest}"):
        engine.pull(f"{repository}@{digest}", registry_auth(registry))
    found = engine.inspect_image(f"{repository}@{digest}").repo_digests
    if f"{repository}@{digest}" not in found and not any(d.endswith("@" + digest) for d in found):
        raise DigestMismatchError(
            f"the registry served {repository} with digests {', '.join(found) or 'none'}, not "
            f"{digest}; the base was not used",
            hint="check the reference and the registry: a digest-pinned base must match exactly",
        )


def _base_ref(spec: Spec, engine: Engine, reporter: Reporter) -> str:
    if spec.base.image is not None:
        if not engine.image_exists(spec.base.image):
            _pull_base(spec.base.image, engine, reporter)
        return spec.base.image
    suite = spec.base.suite or "bookworm"
    with reporter.stage(f"base debian:{suite}"):
        cache_dir = default_cache_dir() / "bases"
        cache_dir.mkdir(parents=True, exist_ok=True)
        base = bootstrap_base(
            suite, _base_packages(spec), engine, cache_dir=cache_dir, on_line=reporter.detail
        )
        reporter.note(f"base {base.ref} = {base.image_id} ({'reused' if base.reused else 'made'})")
    return base.image_id


def _base_packages(spec: Spec) -> tuple[str, ...]:
    """The spec's apt packages, and for CUDA what torch.compile's Triton needs at run time."""
    named = {package.split("=", 1)[0] for package in spec.apt}  # the spec's own pin wins
    extra = [p for p in TRITON_BUILD_PACKAGES if p not in named] if spec.torch.is_cuda else []
    return (*spec.apt, *extra)


@contextmanager
def _context_dir() -> Iterator[Path]:
    # Beside the wheel cache, so wheels are hard-linked rather than copied into the context.
    root = default_cache_dir() / "contexts"
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctx-", dir=root) as tmp:
        yield Path(tmp) / "context"


def lock(spec_path: Path, *, output: Path | None, relock: bool) -> dict[str, Any]:
    """`reprobox lock`: resolve and write the lock (or confirm the one there is current)."""
    reporter = Reporter()
    locked = _locked(spec_path, output, relock, reporter)
    pylock = pylock_path(locked.path)
    return {
        "lock": str(locked.path),
        "pylock": str(pylock),
        "spec_sha256": locked.spec.sha256,
        "wheels": len(locked.lock.wheels),
        "summary": f"{locked.path}: {len(locked.lock.wheels)} wheels pinned by sha256 "
        f"(also as {pylock.name}, PEP 751)",
    }


def render(
    spec_path: Path, out: Path, *, lock_path: Path | None, relock: bool, wheels: bool, refetch: bool
) -> dict[str, Any]:
    """`reprobox render`: the build context, without building."""
    reporter = Reporter()
    check_output_dir(out)  # before the lock is written: bad input changes nothing on disk
    if wheels:
        usable_cache_dir()
    locked = _locked(spec_path, lock_path, relock, reporter)
    files = _fetch(locked, refetch, reporter) if wheels else None
    spec = locked.spec
    if spec.base.image is not None:
        base_ref = spec.base.image
    else:
        # Without an engine the bootstrapped base has no ID yet: name it; `build` uses the ID.
        base_ref = f"reprobox/base:{spec.base.suite}"
    with reporter.stage(f"render {out}"):
        ctx = render_context(spec, locked.file, out, base_ref=base_ref, wheels=files)
    return {
        "context": str(ctx.path),
        "tag": ctx.tag,
        "lock": str(locked.path),
        "summary": f"wrote the build context to {ctx.path} (Dockerfile, hook, self-check, lock)",
    }


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
        write_text_atomic(self._path(built_id), json.dumps(record, sort_keys=True))


def _selfcheck_labels(spec: Spec) -> dict[str, str]:
    return {SELFCHECK_ARGV: json.dumps(selfcheck_argv(spec))}


def _reusable(engine: Engine, index: ReuseIndex, built_id: str) -> dict[str, str] | None:
    """What this exact raw build became last time, if that image is still in the engine."""
    record = index.get(built_id)
    if record is None or not engine.image_exists(record.get("image_id", "")):
        return None
    return record


def build(
    spec_path: Path,
    *,
    lock_path: Path | None,
    tag: str | None,
    relock: bool,
    nocache: bool,
    check: bool,
    refetch: bool,
) -> dict[str, Any]:
    """`reprobox build`: everything, ending in a tagged image that passed its self-check."""
    started = time.monotonic()
    reporter = Reporter()
    if tag is not None:
        check_image_ref(tag, "--tag")
    usable_cache_dir()  # before minutes of resolving: a cache it cannot write is exit 2 or 3 now
    engine = _engine(reporter)
    locked = _locked(spec_path, lock_path, relock, reporter)
    spec = locked.spec
    files = _fetch(locked, refetch, reporter)
    base_ref = _base_ref(spec, engine, reporter)
    with _context_dir() as ctx_dir:
        ctx: RenderedContext = render_context(
            spec, locked.file, ctx_dir, base_ref=base_ref, wheels=files
        )
        with reporter.stage("build"):
            built_id = engine.build(
                ctx.path,
                nocache=nocache,
                labels=_selfcheck_labels(spec),
                on_event=reporter.build_event,
            )
    index = ReuseIndex(default_cache_dir() / "builds")
    report: dict[str, Any] = {
        "spec": str(spec_path),
        "lock": str(locked.path),
        "spec_sha256": spec.sha256,
        "lock_sha256": ctx.lock_sha256,
        "base": base_ref,
        "built_id": built_id,
        "tags": [tag or ctx.tag],
    }
    record = None if nocache else _reusable(engine, index, built_id)
    if record is not None and (record.get("checked") == "yes" or not check):
        outcome = _reused(engine, record, check=check)
    else:
        if record is not None:
            _gpu_preflight(engine, record, reporter)
        try:
            outcome = _prove(engine, spec, ctx, built_id, base_ref, check=check, reporter=reporter)
        except _UnprovenError as unproven:
            # Built and normalised, not proven: a later `--no-check` reuses it in seconds.
            index.put(
                built_id,
                {"image_id": unproven.image_id, "content_id": unproven.content_id, "checked": "no"},
            )
            raise unproven.error from None
        if outcome.passed:
            index.put(
                built_id,
                {
                    "image_id": outcome.image_id,
                    "content_id": outcome.content_id,
                    "checked": "yes" if check else "no",
                },
            )
    report |= {
        "image_id": outcome.image_id,
        "content_id": outcome.content_id,
        "passed": outcome.passed,
        "selfcheck": outcome.selfcheck,
    }
    if not outcome.passed:
        report |= {"tags": [], "summary": outcome.summary}
        return report
    report["reproducible"] = _compare_recorded(locked.file, outcome.content_id)
    for ref in report["tags"]:
        engine.tag(outcome.image_id, ref)
    report["seconds"] = round(time.monotonic() - started, 1)
    report["summary"] = "\n".join(
        [
            outcome.summary,
            report["reproducible"]["message"],
            f"tagged {', '.join(report['tags'])} ({report['seconds']} s)",
        ]
    )
    return report


@dataclass(frozen=True)
class _Outcome:
    """What a build became: the labelled image, its unlabelled content ID, the check's report."""

    image_id: str
    content_id: str
    selfcheck: dict[str, Any] | None
    summary: str
    passed: bool = True


def _reused(engine: Engine, record: dict[str, str], *, check: bool) -> _Outcome:
    """The image this exact raw build became last time, with the proof it already carries."""
    image_id = record["image_id"]
    labels = engine.inspect_image(image_id).labels
    fingerprints = recorded_fingerprints(labels)
    shown = ", ".join(f"{k} {v}" for k, v in fingerprints.items()) or "no self-check"
    return _Outcome(
        image_id,
        record["content_id"],
        {"passed": True, "reused": True, "fingerprints": fingerprints} if check else None,
        f"built {image_id}: unchanged since its last build ({shown})",
    )


def _prove(
    engine: Engine,
    spec: Spec,
    ctx: RenderedContext,
    built_id: str,
    base_ref: str,
    *,
    check: bool,
    reporter: Reporter,
) -> _Outcome:
    """Normalise the raw build, self-check the normalised image, then label it (no rewrite)."""
    workdir = default_cache_dir() / "work"
    with reporter.stage("normalize (sorted entries, clamped times, no build debris)"):
        normalized = normalize_image(
            engine,
            built_id,
            source_date_epoch=ctx.source_date_epoch,
            workdir=workdir,
            base_image=base_ref,
        )
    content_id = normalized.image_id
    labels = {CONTENT_ID: content_id}
    cuda = image_uses_cuda(engine.inspect_image(content_id).labels, content_id)
    if not check:
        image_id = relabel(engine, normalized, labels, workdir=workdir)
        return _Outcome(
            image_id,
            content_id,
            None,
            f"built {image_id} (self-check skipped: --no-check, the image is not proven)",
        )
    steps = spec.selfcheck.steps
    where = "on the GPU" if cuda else "on the CPU"
    with reporter.stage(f"self-check ({steps} steps, twice, in fresh interpreters, {where})"):
        try:
            result = run_selfcheck(
                engine, content_id, device_argv(selfcheck_argv(spec), cuda=cuda), gpus=cuda
            )
        except GpuUnavailableError as err:
            image_id = relabel(engine, normalized, labels, workdir=workdir)
            raise _UnprovenError(image_id, content_id, _needs_gpu(err, image_id)) from err
    selfcheck = {
        "passed": result.passed,
        "fingerprint": result.fingerprint,
        "device_class": result.device_class,
        "first_difference": result.first_difference,
        "report": result.report,
    }
    if not result.passed:
        return _Outcome(
            content_id,
            content_id,
            selfcheck,
            f"self-check FAILED in {content_id}: {_why_failed(result.report)}; "
            "the image was not tagged",
            passed=False,
        )
    trace = json.dumps(result.report.get("runs", [{}])[0], sort_keys=True, separators=(",", ":"))
    labels |= {
        fingerprint_label(result.device_class): result.fingerprint,
        trace_label(result.device_class): trace,
    }
    image_id = relabel(engine, normalized, labels, workdir=workdir)
    return _Outcome(
        image_id,
        content_id,
        selfcheck,
        f"built {image_id}: self-check passed on {result.device_class}, "
        f"fingerprint {result.fingerprint}" + _inference_lines(result.report),
    )


class _UnprovenError(Exception):
    """The image was built and normalised, but its self-check needs a GPU this host lacks."""

    def __init__(self, image_id: str, content_id: str, error: GpuUnavailableError) -> None:
        super().__init__(error.message)
        self.image_id, self.content_id, self.error = image_id, content_id, error


def _gpu_preflight(engine: Engine, record: dict[str, str], reporter: Reporter) -> None:
    """Before normalising again an unproven CUDA build: can this host prove it at all?

    One self-check step on the image already normalised (the same content): a host without a
    GPU answers in seconds, and the build stops before minutes of normalising.
    """
    content_id = record.get("content_id", "")
    if not engine.image_exists(content_id):
        return
    labels = engine.inspect_image(content_id).labels
    if not image_uses_cuda(labels, content_id):
        return
    with reporter.stage("is there a GPU for the self-check?"):
        try:
            run_selfcheck(engine, content_id, gpu_probe_argv(), gpus=True)
        except GpuUnavailableError as err:
            raise _needs_gpu(err, record["image_id"]) from err


def _needs_gpu(err: GpuUnavailableError, image_id: str) -> GpuUnavailableError:
    return GpuUnavailableError(
        f"built and normalised {image_id}, but a CUDA image's self-check needs a GPU, and here "
        f"there is none to give it: {err.message}",
        hint="`reprobox build SPEC --no-check` tags the image now, without a proof (in seconds: "
        "this build is reused); then `reprobox check IMAGE` on a host with an NVIDIA GPU and "
        "the NVIDIA Container Toolkit proves it there, and `reprobox build SPEC` on such a "
        f"host records its fingerprint. Here: {err.hint}",
    )


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


def _compare_recorded(locked: LockFile, content_id: str) -> dict[str, Any]:
    """Did this build give the image ID the lock recorded? Record it where none is."""
    verdict = Verdict(here=content_id, recorded=locked.image_id)
    if verdict.recorded is None:
        record_image_id(locked, content_id)
    return {
        "recorded": verdict.recorded,
        "matches": verdict.matches,
        "message": _image_id_message(verdict, locked.path),
    }


def _image_id_message(verdict: Verdict, lock_path: Path | None) -> str:
    content_id, recorded = verdict.here, verdict.recorded
    if verdict.matches is None:
        return f"image ID {content_id} recorded in {lock_path}"
    if verdict.matches:
        return f"image ID {content_id} matches the one {lock_path} records"
    return (
        f"image ID {content_id} differs from the {recorded} that {lock_path} records; "
        f"`reprobox diff {recorded} {content_id}` shows why (if both are in this engine)"
    )


def _fingerprint_message(
    result: SelfCheckResult, verdict: Verdict, labels: Mapping[str, str]
) -> str:
    if verdict.matches is None:
        known = ", ".join(sorted(recorded_fingerprints(labels))) or "none"
        return (
            f"the image holds no fingerprint for device class {result.device_class} yet "
            f"(it has: {known}); this run's fingerprint is {result.fingerprint}"
        )
    if verdict.matches:
        return f"fingerprint {verdict.recorded} reproduced on {result.device_class}"
    return (
        f"fingerprint {result.fingerprint} differs from the {verdict.recorded} recorded for "
        f"{result.device_class}"
    )


def check(image: str) -> dict[str, Any]:
    """`reprobox check IMAGE`: rerun the self-check here and compare with what the image recorded."""
    check_image_ref(image)
    reporter = Reporter()
    engine = _engine(reporter)
    if not engine.image_exists(image):
        raise BadInputError(
            f"no image {image!r} in the engine", hint="build it, `reprobox import` it, or pull it"
        )
    labels = engine.inspect_image(image).labels
    raw_argv = labels.get(SELFCHECK_ARGV)
    if raw_argv is None:
        raise BadInputError(f"{image} is not a reprobox image (it has no {SELFCHECK_ARGV} label)")
    recorded_argv = parse_selfcheck_label(image, raw_argv)
    cuda = image_uses_cuda(labels, image)
    argv = device_argv(recorded_argv, cuda=cuda)
    with reporter.stage(f"self-check in {image} ({'on the GPU' if cuda else 'on the CPU'})"):
        result = run_selfcheck(engine, image, argv, gpus=cuda)
    verdict = compare_with_recorded(result, labels)
    passed = result.passed and verdict.matches is not False
    difference = result.first_difference
    if verdict.matches is False:
        recorded = recorded_trace(labels, result.device_class)
        runs = result.report.get("runs") or [{}]
        difference = None if recorded is None else first_trace_difference(recorded, runs[0])
    lines = [
        "self-check passed: the two runs here match bit for bit"
        if result.passed
        else f"self-check FAILED: {_why_failed(result.report)}",
        _fingerprint_message(result, verdict, labels),
    ]
    if verdict.matches is False and difference is not None:
        lines.append(f"first difference from the recorded run: {json.dumps(difference)}")
    return {
        "image": image,
        "passed": passed,
        "device_class": result.device_class,
        "fingerprint": result.fingerprint,
        "recorded": verdict.recorded,
        "matches_recorded": verdict.matches,
        "first_difference": difference,
        "selfcheck": result.report,
        "summary": "\n".join(lines) + _inference_lines(result.report),
    }
