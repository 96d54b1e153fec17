"""The build stage: spec -> lock -> wheels -> base -> context -> engine build -> normalised,
self-checked, labelled and tagged image.

An unchanged rebuild is the engine's layer cache plus the reuse index: the raw build's ID maps to
the labelled image made from it last time, so normalising and the self-check are skipped.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

from reprobox._files import write_text_atomic
from reprobox._registry import check_image_ref
from reprobox.assemble import assemble, load_assembled, recipe_only, refuse_unsupported
from reprobox.base_image import base_refs
from reprobox.cache import fetch_locked
from reprobox.check import (
    SelfCheckResult,
    device_argv,
    gpu_probe_argv,
    run_selfcheck,
    selfcheck_argv,
    settings_seen,
)
from reprobox.compare import Verdict
from reprobox.context import Context
from reprobox.errors import GpuUnavailableError
from reprobox.labels import (
    CONTENT_ID,
    SELFCHECK_ARGV,
    fingerprint_label,
    image_uses_cuda,
    recorded_fingerprints,
    settings_label,
    trace_label,
)
from reprobox.layer_cache import limit_from_env
from reprobox.lock import locked_spec
from reprobox.lockfile import LockFile, default_lock_path, record_image_id
from reprobox.normalize import (
    KnownLayers,
    NormalizedImage,
    held_chains,
    normalize_image,
    relabel,
)
from reprobox.render import RenderedContext, render_context
from reprobox.spec import Spec
from reprobox.spec_load import load_spec

__all__ = ["BuildOptions", "BuildResult", "ReuseIndex", "build"]


@dataclass(frozen=True)
class BuildOptions:
    """How to build: the command line's choices."""

    lock_path: Path | None = None
    tag: str | None = None
    relock: bool = False
    nocache: bool = False
    check: bool = True
    refetch: bool = False
    #: Write the layers from the wheels (`assemble`, True) or build the recipe (False); None:
    #: assemble wherever that gives the recipe's image (`assemble.recipe_only`), the CLI's
    #: default.
    assemble: bool | None = False


@dataclass(frozen=True)
class BuildResult:
    """What a build made: the image, the proof it carries, and where it came from.

    `selfcheck` is this build's self-check (None when it was skipped or reused); a reused image
    (`reused`) keeps the proof it already carries, its `fingerprints`. `tags` is empty and
    `reproducible` None when the self-check failed: nothing was tagged.
    """

    spec: Path
    lock: Path
    spec_sha256: str
    lock_sha256: str
    base: str
    built_id: str
    image_id: str
    content_id: str
    content_tag: str
    tags: tuple[str, ...]
    passed: bool
    checked: bool
    reused: bool = False
    selfcheck: SelfCheckResult | None = None
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    #: This build's content ID against the one its lock records.
    reproducible: Verdict | None = None
    seconds: float | None = None


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

    def recent_images(self, count: int = 8) -> list[str]:
        """The images the `count` latest records name, labelled and not (their layers may still
        be in the engine)."""
        try:
            paths = sorted(self.root.glob("*.json"), key=lambda p: p.stat().st_mtime)[-count:]
        except OSError:
            return []
        found = [self.get(p.stem) for p in reversed(paths)]
        return [r[k] for r in found if r is not None for k in ("image_id", "content_id") if k in r]


@dataclass(frozen=True)
class _Outcome:
    """What a raw build became: the labelled image, its unlabelled content ID, its proof."""

    image_id: str
    content_id: str
    passed: bool = True
    reused: bool = False
    selfcheck: SelfCheckResult | None = None
    fingerprints: Mapping[str, str] = field(default_factory=dict)


class _UnprovenError(Exception):
    """The image was built and normalised, but its self-check needs a GPU this host lacks."""

    def __init__(self, image_id: str, content_id: str, error: GpuUnavailableError) -> None:
        super().__init__(error.message)
        self.image_id, self.content_id, self.error = image_id, content_id, error


def build(ctx: Context, spec_path: Path, options: BuildOptions) -> BuildResult:
    """`reprobox build`: everything, ending in a tagged image that passed its self-check."""
    started = time.monotonic()
    if options.tag is not None:
        check_image_ref(options.tag, "--tag")
    ctx.cache.usable()  # before minutes of resolving: a cache it cannot write is exit 2 or 3 now
    ctx.note_engine()
    options, twin = _route(ctx, spec_path, options)
    cache_limit = limit_from_env(os.environ) if options.assemble else 0
    spec, locked = locked_spec(ctx, spec_path, options.lock_path, relock=options.relock)
    files = fetch_locked(ctx, locked.lock, refetch=options.refetch)
    base_ref, base_label = base_refs(ctx, spec)
    labels = {SELFCHECK_ARGV: json.dumps(selfcheck_argv(spec))}
    known: tuple[str, _Outcome] | None = None
    with _context_dir(ctx) as ctx_dir:
        if options.assemble:
            rendered = render_context(
                spec, locked, ctx_dir, base_ref=base_ref, base_label=base_label
            )
            index = ReuseIndex(ctx.cache.builds)
            chains_from = [] if options.nocache else index.recent_images()
            assembled = assemble(
                ctx,
                spec,
                locked,
                rendered,
                files,
                labels=labels,
                nocache=options.nocache,
                cache_limit=cache_limit,
            )
            built_id = assembled.content_id
            outcome = _outcome(
                ctx,
                spec,
                rendered,
                built_id,
                options,
                make=lambda: load_assembled(ctx, assembled, chains_from),
            )
        else:
            rendered = render_context(
                spec, locked, ctx_dir, base_ref=base_ref, wheels=files, base_label=base_label
            )
            inputs = _recipe_inputs(rendered, labels)
            # Inputs this engine built, normalised and checked before: that image, no build.
            known = _known_inputs(ctx, inputs, options)
            built_id = known[0] if known else _build_recipe(ctx, rendered, labels, options)
    if not options.assemble:
        if known is not None:
            outcome = known[1]
        else:
            try:
                outcome = _outcome(
                    ctx,
                    spec,
                    rendered,
                    built_id,
                    options,
                    make=lambda: _normalize(ctx, rendered, built_id, nocache=options.nocache),
                )
            except GpuUnavailableError:
                _remember_unproven(ctx, inputs, built_id)
                raise
            _remember_inputs(ctx, inputs, built_id, outcome)
    content_tag = rendered.content_tag + ("" if twin else "-assembled")
    result = BuildResult(
        spec=spec_path,
        lock=options.lock_path or default_lock_path(spec_path),
        spec_sha256=spec.sha256,
        lock_sha256=rendered.lock_sha256,
        base=base_ref,
        built_id=built_id,
        image_id=outcome.image_id,
        content_id=outcome.content_id,
        content_tag=content_tag,
        tags=(options.tag or f"{rendered.name}:{content_tag}",) if outcome.passed else (),
        passed=outcome.passed,
        checked=options.check,
        reused=outcome.reused,
        selfcheck=outcome.selfcheck,
        fingerprints=outcome.fingerprints,
    )
    if not outcome.passed:
        return result
    reproducible = _compare_recorded(locked, outcome.content_id) if twin else None
    for ref in result.tags:
        ctx.engine.tag(outcome.image_id, ref)
    seconds = round(time.monotonic() - started, 1)
    return replace(result, reproducible=reproducible, seconds=seconds)


@contextmanager
def _context_dir(ctx: Context) -> Iterator[Path]:
    # Beside the wheel cache, so wheels are hard-linked rather than copied into the context.
    ctx.cache.contexts.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="ctx-", dir=ctx.cache.contexts) as tmp:
        yield Path(tmp) / "context"


def _normalize(
    ctx: Context, rendered: RenderedContext, built_id: str, *, nocache: bool
) -> NormalizedImage:
    known = None
    if not nocache and not ctx.engine_info().containerd_store:
        # The containerd store takes no layer from what it holds: every layer goes.
        images = ReuseIndex(ctx.cache.builds).recent_images()
        known = KnownLayers(ctx.cache.root / "normalised-layers", held_chains(ctx.engine, images))
    with ctx.reporter.stage("normalize (sorted entries, clamped times, no build debris)"):
        image = normalize_image(
            ctx.engine,
            built_id,
            source_date_epoch=rendered.source_date_epoch,
            workdir=ctx.cache.work,
            base_image=rendered.base_ref,
            known=known,
        )
        if image.layers_not_sent:
            ctx.reporter.note(
                f"{image.layers_not_sent} layer(s) as an earlier build normalised them: the "
                "engine holds them, neither rewritten nor sent"
            )
        return image


def _route(ctx: Context, spec_path: Path, options: BuildOptions) -> tuple[BuildOptions, bool]:
    """The route (`options.assemble` True or False), and whether this image is the recipe's:
    False where `--assemble` was asked for a spec whose assembled image is not shown to be the
    recipe's; then it gets a tag of its own and the lock's image-id is neither compared nor
    recorded. By default (None) a spec is assembled wherever that gives the recipe's image."""
    if options.assemble is False:
        return options, True
    spec = load_spec(spec_path)
    why_not = recipe_only(spec)
    if options.assemble is None:
        if why_not is not None:
            ctx.reporter.note(f"route: the recipe (`docker build`): {why_not}")
        return replace(options, assemble=why_not is None), True
    refuse_unsupported(spec)
    if why_not is not None:
        ctx.reporter.note(
            f"--assemble: not shown to give the recipe's image here ({why_not}): tagged "
            "NAME:TAG-assembled; the lock's image-id is neither compared nor recorded"
        )
    return options, why_not is None


def _outcome(
    ctx: Context,
    spec: Spec,
    rendered: RenderedContext,
    built_id: str,
    options: BuildOptions,
    *,
    make: Callable[[], NormalizedImage],
) -> _Outcome:
    """The image this raw build becomes: reused from the index, or normalised and proven now."""
    index = ReuseIndex(ctx.cache.builds)
    record = None if options.nocache else _reusable(ctx, index, built_id)
    if record is not None and (record.get("checked") == "yes" or not options.check):
        return _reused(ctx, record)
    if record is not None:
        _gpu_preflight(ctx, record)
    try:
        outcome = _prove(ctx, spec, make, check=options.check)
    except _UnprovenError as unproven:
        # Built and normalised, not proven: a later `--no-check` reuses it in seconds.
        index.put(
            built_id,
            {"image_id": unproven.image_id, "content_id": unproven.content_id, "checked": "no"},
        )
        raise unproven.error from None
    if outcome.passed:
        checked = "yes" if options.check else "no"
        index.put(
            built_id,
            {"image_id": outcome.image_id, "content_id": outcome.content_id, "checked": checked},
        )
    return outcome


def _build_recipe(
    ctx: Context, rendered: RenderedContext, labels: Mapping[str, str], options: BuildOptions
) -> str:
    """`docker build` of the rendered context: the raw image's ID."""
    with ctx.reporter.stage("build"):
        return ctx.engine.build(
            rendered.path,
            nocache=options.nocache,
            labels=labels,
            on_event=ctx.reporter.build_event,
        )


def _recipe_inputs(rendered: RenderedContext, labels: Mapping[str, str]) -> str:
    """The index key of a recipe build: its context's inputs and the labels the engine adds."""
    text = json.dumps({"context": rendered.inputs_sha256, "labels": dict(labels)}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


def _inputs_index(ctx: Context) -> ReuseIndex:
    """Recipe inputs -> what they became; a folder of its own, so that `recent_images` (the
    chains an assembled load may skip) counts raw builds only."""
    return ReuseIndex(ctx.cache.builds / "recipe-inputs")


def _known_inputs(ctx: Context, inputs: str, options: BuildOptions) -> tuple[str, _Outcome] | None:
    """The raw build ID and the labelled image that these exact inputs gave last time, where
    the engine still holds that image and it needs no check this build would add: then the
    engine's build of the same context (every step from its cache) is not asked for."""
    if options.nocache:
        return None
    record = _reusable(ctx, _inputs_index(ctx), inputs)
    if record is None or (record.get("checked") != "yes" and options.check):
        return None  # the build and check below decide, GPU preflight included
    # The raw build too: while the engine holds it, it holds that build's cached steps and
    # would answer this build with it. Without them it would run every step again, and a
    # step that reads a live mirror (`apt:` on a pinned base) could give other bytes.
    if not ctx.engine.image_exists(record.get("built_id", "")):
        return None
    ctx.reporter.note(
        f"build: the inputs of {record['built_id']} (Dockerfile, files and modes, wheels by "
        "sha256), unchanged: not sent to the engine again"
    )
    return record["built_id"], _reused(ctx, record)


def _remember_inputs(ctx: Context, inputs: str, built_id: str, outcome: _Outcome) -> None:
    """Record what these inputs became: the raw build's own record (which `_outcome` wrote, or
    reused with the proof it names), and that raw build."""
    record = ReuseIndex(ctx.cache.builds).get(built_id) if outcome.passed else None
    if record is not None:
        _inputs_index(ctx).put(inputs, {**record, "built_id": built_id})


def _remember_unproven(ctx: Context, inputs: str, built_id: str) -> None:
    """A CUDA image built and normalised on a host without a GPU: its inputs name it too, so
    that the `--no-check` build the refusal suggests does not send the context again."""
    record = ReuseIndex(ctx.cache.builds).get(built_id)
    if record is not None and record.get("checked") == "no":
        _inputs_index(ctx).put(inputs, {**record, "built_id": built_id})


def _reusable(ctx: Context, index: ReuseIndex, built_id: str) -> dict[str, str] | None:
    """What this exact raw build became last time, if that image is still in the engine."""
    record = index.get(built_id)
    if record is None or not ctx.engine.image_exists(record.get("image_id", "")):
        return None
    return record


def _reused(ctx: Context, record: Mapping[str, str]) -> _Outcome:
    """The image this exact raw build became last time, with the proof it already carries."""
    image_id = record["image_id"]
    fingerprints = recorded_fingerprints(ctx.engine.inspect_image(image_id).labels)
    return _Outcome(image_id, record["content_id"], reused=True, fingerprints=fingerprints)


def _prove(
    ctx: Context, spec: Spec, make: Callable[[], NormalizedImage], *, check: bool
) -> _Outcome:
    """Make the normalised image, self-check it, then label it (no rewrite)."""
    normalized = make()
    content_id = normalized.image_id  # the config digest, the same on every engine
    cuda = image_uses_cuda(ctx.engine.inspect_image(normalized.ref).labels, content_id)
    if not check:
        return _Outcome(_label(ctx, normalized, {}), content_id)
    where = "on the GPU" if cuda else "on the CPU"
    argv = device_argv(selfcheck_argv(spec), cuda=cuda)
    steps = spec.selfcheck.steps
    with ctx.reporter.stage(f"self-check ({steps} steps, twice, in fresh interpreters, {where})"):
        try:
            result = run_selfcheck(ctx.engine, normalized.ref, argv, gpus=cuda)
        except GpuUnavailableError as err:
            image_id = _label(ctx, normalized, {})
            raise _UnprovenError(image_id, content_id, _needs_gpu(err, image_id)) from err
    if not result.passed:
        return _Outcome(normalized.ref, content_id, passed=False, selfcheck=result)
    trace = result.report.get("runs", [{}])[0]
    proof = {
        fingerprint_label(result.device_class): result.fingerprint,
        trace_label(result.device_class): _compact_json(trace),
        settings_label(result.device_class): _compact_json(settings_seen(result.report)),
    }
    return _Outcome(_label(ctx, normalized, proof), content_id, selfcheck=result)


def _compact_json(value: object) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def _label(ctx: Context, normalized: NormalizedImage, proof: Mapping[str, str]) -> str:
    """The normalised image with its content ID (and the self-check's proof) as labels."""
    labels = {CONTENT_ID: normalized.image_id, **proof}
    return relabel(ctx.engine, normalized, labels, workdir=ctx.cache.work)


def _gpu_preflight(ctx: Context, record: Mapping[str, str]) -> None:
    """Before normalising again an unproven CUDA build: can this host prove it at all?

    One self-check step on the image already normalised (the same content): a host without a
    GPU answers in seconds, and the build stops before minutes of normalising.
    """
    content_id = record.get("content_id", "")
    if not ctx.engine.image_exists(content_id):
        return
    if not image_uses_cuda(ctx.engine.inspect_image(content_id).labels, content_id):
        return
    with ctx.reporter.stage("is there a GPU for the self-check?"):
        try:
            run_selfcheck(ctx.engine, content_id, gpu_probe_argv(), gpus=True)
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


def _compare_recorded(locked: LockFile, content_id: str) -> Verdict:
    """Did this build give the image ID the lock recorded (either route: both give one ID)?
    Record it where none is."""
    verdict = Verdict(here=content_id, recorded=locked.image_id)
    if verdict.recorded is None:
        record_image_id(locked, content_id)
    return verdict
