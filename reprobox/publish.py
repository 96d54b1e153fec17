"""The publish stage: build (or reuse) the image, let its self-check gate the push, tag, push, and
read the digest back from the registry.

Credentials come from the user's Docker config (`docker login`), go to the engine and the registry
in headers, and nowhere else: not into a label, a layer, a log line or an error message.
"""

from __future__ import annotations

import base64
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from reprobox._registry import (
    PublishTarget,
    RegistryClient,
    check_tag,
    is_insecure,
    parse_target,
    registry_auth,
)
from reprobox.build import BuildOptions, BuildResult
from reprobox.build import build as build_image
from reprobox.context import Context
from reprobox.errors import (
    EXIT_CHECK_FAILED,
    EXIT_MISSING,
    EngineError,
    GpuUnavailableError,
    PushInterruptedError,
    RegistryAuthError,
)
from reprobox.labels import CUDA, image_uses_cuda, recorded_fingerprints

__all__ = [
    "Builder",
    "PublishResult",
    "Published",
    "publish",
    "push_image",
    "scrub",
]

_AUTH = re.compile(r"unauthorized|authentication required|no basic auth credentials|denied", re.I)
# What the engine says when the registry goes away during a push (after it answered before it).
_NETWORK = re.compile(
    r"connection refused|connection reset|broken pipe|i/o timeout|\bEOF\b|no such host|"
    r"network is unreachable|context canceled",
    re.I,
)


#: The build stage, as publish calls it; tests pass a fake one.
Builder = Callable[[Context, Path, BuildOptions], BuildResult]


@dataclass(frozen=True)
class Published:
    """What landed in the registry: every tag names the manifest `digest`."""

    target: PublishTarget
    image_id: str
    digest: str
    tags: tuple[str, ...]
    layers_pushed: int
    layers_reused: int

    @property
    def reference(self) -> str:
        """`name@digest`: the one reference that can never move."""
        return f"{self.target.name}@{self.digest}"


def scrub(text: str, auth: Mapping[str, str] | None) -> str:
    """`text` with every credential value (and the encodings a header carries) blanked out."""
    secrets = [v for k, v in (auth or {}).items() if k in {"password", "identitytoken", "auth"}]
    if auth and auth.get("password"):
        pair = f"{auth.get('username', '')}:{auth['password']}"
        secrets += [pair, base64.b64encode(pair.encode()).decode()]
    for secret in sorted(secrets, key=len, reverse=True):
        if secret:
            text = text.replace(secret, "***")
    return text


class _LayerTally:
    """The engine's push status lines, boiled down to layers pushed and layers already there."""

    def __init__(self, show: Callable[[str], None]) -> None:
        self._show = show
        self.final: dict[str, str] = {}

    def __call__(self, line: str) -> None:
        self._show(line)
        layer, _, status = line.partition(" ")
        # A layer pushed for the first tag is "already there" for the next: the first word counts.
        if status in {"Pushed", "Layer already exists"} or status.startswith("Mounted"):
            self.final.setdefault(layer, status)

    @property
    def pushed(self) -> int:
        return sum(status == "Pushed" for status in self.final.values())

    @property
    def reused(self) -> int:
        return len(self.final) - self.pushed


def _push_error(
    err: EngineError, target: PublishTarget, auth: Mapping[str, str] | None
) -> EngineError:
    """The engine's push failure as one of the distinct errors a user can act on."""
    said = scrub(err.message, auth)
    if _AUTH.search(said):
        return RegistryAuthError(
            f"the registry {target.registry} refused the push: {said}",
            hint=f"log in with `docker login {target.registry}` as a user who may push to "
            f"{target.repository}; reprobox uses the credentials in the Docker config",
        )
    if _NETWORK.search(said):
        return PushInterruptedError(
            f"the push to {target.registry} was interrupted: {said}",
            hint="the registry keeps the layers it received: once it answers again, run the same "
            "command again and the push resumes from them",
        )
    return EngineError(said, hint=err.hint and scrub(err.hint, auth))


def push_image(
    ctx: Context,
    client: RegistryClient,
    image_id: str,
    tags: Sequence[str],
    *,
    auth: Mapping[str, str] | None,
) -> Published:
    """Tag `image_id` in the target repository, push every tag, and check the registry's digest."""
    target, engine, reporter = client.target, ctx.engine, ctx.reporter
    tally = _LayerTally(reporter.detail)
    digests = set()
    for tag in tags:
        engine.tag(image_id, target.ref(tag))
        with reporter.stage(f"push {target.ref(tag)}"):
            try:
                digests.add(engine.push(target.name, tag, auth, on_status=tally))
            except EngineError as err:
                raise _push_error(err, target, auth) from None
    if len(digests) != 1:
        raise EngineError(f"the tags of one image were pushed as different manifests: {digests}")
    digest = digests.pop()
    with reporter.stage(f"read the digest back from {target.registry}"):
        for tag in tags:
            served = client.manifest_digest(tag)
            if served != digest:
                raise EngineError(
                    f"the registry serves {target.ref(tag)} as {served}, "
                    f"but the engine pushed {digest}",
                    hint="another push to the same tag may have raced this one; run it again",
                )
    return Published(target, image_id, digest, tuple(tags), tally.pushed, tally.reused)


@dataclass(frozen=True)
class PublishResult:
    """`reprobox publish`: what was pushed, or why nothing was.

    `built` is the build it published (None when the build could not prove the image at all);
    `published` is None when nothing was pushed: the self-check failed (`exit_code` 1) or no
    self-check could prove the image here and `--allow-unverified` was not given.
    """

    target: PublishTarget
    exit_code: int
    built: BuildResult | None
    published: Published | None = None
    #: Why the image is not proven (None: it is); pushed anyway only with --allow-unverified.
    unverified: str | None = None
    #: The image's fingerprints of its own kind (cuda-* or cpu-*).
    fingerprints: Mapping[str, str] = field(default_factory=dict)
    seconds: float | None = None

    @property
    def passed(self) -> bool:
        """Whether it was pushed."""
        return self.published is not None


def publish(
    ctx: Context,
    spec_path: Path,
    to: str,
    *,
    tags: Sequence[str] = (),
    options: BuildOptions | None = None,
    build: Builder = build_image,
    credentials: Callable[[str], dict[str, str] | None] = registry_auth,
    allow_unverified: bool = False,
) -> PublishResult:
    """`reprobox publish`: build, gate on the self-check, push, verify the digest.

    The gate: the image must carry a fingerprint for its kind (a cuda-* one for a CUDA image,
    a cpu-* one for a CPU image). Where the self-check cannot run at all (a CUDA image on a
    host without a GPU), `allow_unverified` pushes the image anyway, unproven, and the result
    says so; a self-check that ran and failed always stops the push.
    """
    started = time.monotonic()
    target = parse_target(to)
    extra = [check_tag(tag) for tag in tags]
    info = ctx.engine_info()
    auth = credentials(target.registry)
    client = RegistryClient(target, auth, insecure=is_insecure(target.registry, info.registry))
    with ctx.reporter.stage(f"check the registry {target.registry} and the credentials for it"):
        client.check_access()
    unverified: str | None = None
    # Published as the build tags it by default, from the layer cache.
    options = replace(options or BuildOptions(), tag=None, nocache=False)
    try:
        built = build(ctx, spec_path, replace(options, check=True))
    except GpuUnavailableError as err:
        if not allow_unverified:
            return PublishResult(target, EXIT_MISSING, None, unverified=err.render())
        unverified = err.message
        built = build(ctx, spec_path, replace(options, check=False))
    if not built.passed:
        return PublishResult(target, EXIT_CHECK_FAILED, built)
    labels = ctx.engine.inspect_image(built.image_id).labels
    proof = _proof(labels, built.image_id)
    if not proof:
        unverified = unverified or f"{built.image_id} carries no fingerprint for {_kind(labels)}"
        if not allow_unverified:
            return PublishResult(target, EXIT_CHECK_FAILED, built, unverified=unverified)
    wanted = list(dict.fromkeys([built.content_tag, *extra]))
    done = push_image(ctx, client, built.image_id, wanted, auth=auth)
    seconds = round(time.monotonic() - started, 1)
    return PublishResult(target, 0, built, done, unverified, proof, seconds)


def _kind(labels: Mapping[str, str]) -> str:
    return "a CUDA image (cuda-*)" if labels.get(CUDA, "cpu") != "cpu" else "a CPU image (cpu-*)"


def _proof(labels: Mapping[str, str], image_id: str) -> dict[str, str]:
    """The image's fingerprints for its own kind: cuda-* for a CUDA image, cpu-* for a CPU one."""
    prefix = "cuda-" if image_uses_cuda(labels, image_id) else "cpu-"
    return {k: v for k, v in sorted(recorded_fingerprints(labels).items()) if k.startswith(prefix)}
