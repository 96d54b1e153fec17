"""The stages in order, for the CLI: spec -> lock -> fetch -> render -> build -> check -> label."""

from __future__ import annotations

import json
import re
import tempfile
import time
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from reprobox._registry import check_image_ref
from reprobox.base import bootstrap_base
from reprobox.cache import WheelCache, default_cache_dir, usable_cache_dir
from reprobox.check import (
    SELFCHECK_LABEL,
    SETTINGS_LABEL,
    compare_with_recorded,
    device_argv,
    fingerprint_label,
    gpu_probe_argv,
    image_uses_cuda,
    parse_selfcheck_label,
    recorded_fingerprints,
    recorded_settings,
    run_selfcheck,
    selfcheck_argv,
    settings_differences,
    settings_seen,
)
from reprobox.compat import TRITON_BUILD_PACKAGES
from reprobox.emulate import emulation
from reprobox.engine import DockerEngine, Engine, GpuUnavailableError
from reprobox.errors import EXIT_CHECK_FAILED, EngineError, ReproboxError
from reprobox.lock import Lock, default_lock_path, ensure_lock, pylock_path
from reprobox.normalize import normalize_image, relabel
from reprobox.progress import Reporter
from reprobox.record import ReuseIndex, lock_body, record_image_id, recorded_image_id
from reprobox.render import RenderedContext, check_output_dir, render_context
from reprobox.spec import Spec, load_spec

__all__ = ["build", "check", "lock", "render"]

CONTENT_LABEL = "reprobox.content-id"
TRACE_LABEL = "reprobox.trace."


@dataclass(frozen=True)
class _Locked:
    spec: Spec
    lock: Lock
    path: Path
    text: str


def _locked(spec_path: Path, lock_path: Path | None, relock: bool, reporter: Reporter) -> _Locked:
    spec = load_spec(spec_path)
    path = lock_path or default_lock_path(spec_path)
    with reporter.stage(f"lock {path}"):
        lock = ensure_lock(spec, path, relock=relock, on_note=reporter.note)
    return _Locked(spec, lock, path, path.read_text(encoding="utf-8"))


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
    from reprobox.engine import registry_auth

    named, digest = ref.split("@", 1)
    slash, colon = named.rfind("/"), named.rfind(":")
    repository = named[:colon] if colon > slash else named  # the tag goes: the digest decides
    first = repository.split("/", 1)[0]
    # Docker's rule: a first part with a dot or a port (or localhost) names the registry.
    is_host = "/" in repository and ("." in first or ":" in first or first == "localhost")
    registry = first if is_host else "https://index.docker.io/v1/"
    with reporter.stage(f"pull the base {repository}@{digest}"):
        engine.pull(f"{repository}@{digest}", registry_auth(registry))
    found = engine.inspect_image(f"{repository}@{digest}").get("RepoDigests") or []
    if f"{repository}@{digest}" not in found and not any(d.endswith("@" + digest) for d in found):
        raise EngineError(
            f"the registry served {repository} with digests {', '.join(found) or 'none'}, not "
            f"{digest}; the base was not used",
            hint="check the reference and the registry: a digest-pinned base must match exactly",
            exit_code=EXIT_CHECK_FAILED,
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
        ctx = render_context(
            spec, locked.lock, lock_body(locked.text), out, base_ref=base_ref, wheels=files
        )
    return {
        "context": str(ctx.path),
        "tag": ctx.tag,
        "lock": str(locked.path),
        "cpu": spec.determinism.cpu,
        "summary": f"wrote the build context to {ctx.path} (Dockerfile, hook, self-check, lock; "
        f"determinism.cpu: {spec.determinism.cpu})",
    }


def _selfcheck_labels(spec: Spec) -> dict[str, str]:
    return {SELFCHECK_LABEL: json.dumps(selfcheck_argv(spec))}


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
    body = lock_body(locked.text)
    with _context_dir() as ctx_dir:
        ctx: RenderedContext = render_context(
            spec, locked.lock, body, ctx_dir, base_ref=base_ref, wheels=files
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
    report["reproducible"] = _compare_recorded(locked.path, outcome.content_id)
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
    labels = engine.inspect_image(image_id)["Config"].get("Labels") or {}
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
    labels = {CONTENT_LABEL: content_id}
    cuda = image_uses_cuda(
        engine.inspect_image(content_id)["Config"].get("Labels") or {}, content_id
    )
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
        TRACE_LABEL + result.device_class: trace,
        SETTINGS_LABEL + result.device_class: json.dumps(
            settings_seen(result.report), sort_keys=True, separators=(",", ":")
        ),
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
    labels = engine.inspect_image(content_id)["Config"].get("Labels") or {}
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


def _compare_recorded(lock_path: Path, content_id: str) -> dict[str, Any]:
    """Did this build give the image ID the lock recorded? Record it where none is."""
    recorded = recorded_image_id(lock_path.read_text(encoding="utf-8"))
    if recorded is None:
        record_image_id(lock_path, content_id)
        return {
            "recorded": None,
            "matches": None,
            "message": f"image ID {content_id} recorded in {lock_path}",
        }
    if recorded == content_id:
        return {
            "recorded": recorded,
            "matches": True,
            "message": f"image ID {content_id} matches the one {lock_path} records",
        }
    return {
        "recorded": recorded,
        "matches": False,
        "message": (
            f"image ID {content_id} differs from the {recorded} that {lock_path} records; "
            f"`reprobox diff {recorded} {content_id}` shows why (if both are in this engine)"
        ),
    }


_CPUSET = re.compile(r"[0-9]+(?:-[0-9]+)?(?:,[0-9]+(?:-[0-9]+)?)*")


def check(
    image: str, *, emulate_cpu: str | None = None, cpuset_cpus: str | None = None
) -> dict[str, Any]:
    """`reprobox check IMAGE`: rerun the self-check here and compare with what the image recorded.

    `emulate_cpu` runs it on a qemu-user CPU model; `cpuset_cpus` on those CPUs only.
    """
    if cpuset_cpus is not None and not _CPUSET.fullmatch(cpuset_cpus):
        raise ReproboxError(
            f"--cpuset-cpus {cpuset_cpus!r} is not a CPU list",
            hint="write e.g. '0' or '0-1' or '0,2'",
        )
    check_image_ref(image)
    reporter = Reporter()
    engine = _engine(reporter)
    if not engine.image_exists(image):
        raise ReproboxError(
            f"no image {image!r} in the engine", hint="build it, `reprobox import` it, or pull it"
        )
    labels: dict[str, str] = (engine.inspect_image(image).get("Config") or {}).get("Labels") or {}
    raw_argv = labels.get(SELFCHECK_LABEL)
    if raw_argv is None:
        raise ReproboxError(f"{image} is not a reprobox image (it has no {SELFCHECK_LABEL} label)")
    recorded_argv = parse_selfcheck_label(image, raw_argv)
    cuda = image_uses_cuda(labels, image)
    if cuda and emulate_cpu is not None:
        raise ReproboxError(
            f"--emulate-cpu: {image} is a CUDA image; its self-check runs on the GPU, and an "
            "emulated CPU says nothing about it",
            hint="emulate CPUs for CPU images (torch.cuda: cpu) only",
        )
    argv = device_argv(recorded_argv, cuda=cuda)
    emulated = emulation(emulate_cpu, engine.ping().arch) if emulate_cpu is not None else None
    where = f" on an emulated {emulate_cpu}" if emulate_cpu else ""
    device = "on the GPU" if cuda else "on the CPU"
    with reporter.stage(f"self-check in {image} ({device}{where})"):
        result = run_selfcheck(
            engine,
            image,
            [*emulated.argv_prefix, *argv] if emulated else argv,
            gpus=cuda,
            cpuset_cpus=cpuset_cpus,
            archive=emulated.archive if emulated else None,
            timeout_s=4 * 3600 if emulated else 3600,
        )
    verdict = compare_with_recorded(result, labels)
    passed = result.passed and verdict.matches is not False
    difference = result.first_difference
    here = settings_seen(result.report)
    recorded = recorded_settings(labels, result.device_class)
    differing: dict[str, Any] | None = None
    if verdict.matches is False:
        recorded_trace = labels.get(TRACE_LABEL + result.device_class)
        difference = _first_step_difference(recorded_trace, result.report)
        differing = settings_differences(recorded, here) if recorded is not None else None
    lines = [
        "self-check passed: the two runs here match bit for bit"
        if result.passed
        else f"self-check FAILED: {_why_failed(result.report)}",
        verdict.message,
    ]
    if verdict.matches is False:
        lines += _difference_lines(difference, differing)
    return {
        "image": image,
        "passed": passed,
        "verdict": _verdict_word(result.passed, verdict.matches),
        "device_class": result.device_class,
        "fingerprint": result.fingerprint,
        "recorded": verdict.recorded,
        "recorded_classes": sorted(recorded_fingerprints(labels)),
        "matches_recorded": verdict.matches,
        "first_difference": difference,
        "settings": {"here": here, "recorded": recorded, "differences": differing},
        "emulated_cpu": emulate_cpu,
        "cpuset_cpus": cpuset_cpus,
        "selfcheck": result.report,
        "summary": "\n".join(lines) + _inference_lines(result.report),
    }


def _verdict_word(runs_agree: bool, matches: bool | None) -> str:
    if not runs_agree:
        return "not-reproducible"
    return {True: "reproduced", False: "differs", None: "unrecorded"}[matches]


def _difference_lines(
    difference: Mapping[str, Any] | None, differing: Mapping[str, Any] | None
) -> list[str]:
    lines = []
    if difference is not None:
        lines.append(f"first difference from the recorded run: {json.dumps(difference)}")
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


def _first_step_difference(
    recorded_trace: str | None, report: dict[str, Any] | Any
) -> dict[str, Any] | None:
    if recorded_trace is None:
        return None
    try:
        recorded = json.loads(recorded_trace)
    except (ValueError, RecursionError):
        return None  # a damaged trace label: the fingerprints still tell the verdict
    if not isinstance(recorded, dict) or not isinstance(report, dict):
        return None
    runs = report.get("runs") or [{}]
    now = runs[0]
    recorded_losses = recorded.get("losses")
    recorded_losses = recorded_losses if isinstance(recorded_losses, list) else []
    for step, (a, b) in enumerate(zip(recorded_losses, now.get("losses", []), strict=False), 1):
        if a != b:
            return {"step": step, "recorded": a, "here": b}
    for key, what in (("state_sha256", "final state"), ("inference_sha256", "inference")):
        if recorded.get(key) != now.get(key):
            return {"step": what, "recorded": recorded.get(key), "here": now.get(key)}
    return None
