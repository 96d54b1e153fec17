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
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from reprobox._registry import (
    RegistryClient,
    Target,
    check_tag,
    is_insecure,
    parse_target,
    registry_auth,
)
from reprobox.docker_engine import DockerEngine
from reprobox.engine import Engine, EngineInfo
from reprobox.errors import (
    EXIT_CHECK_FAILED,
    EXIT_MISSING,
    EngineError,
    GpuUnavailableError,
    ImageNotFoundError,
    PushInterruptedError,
    RegistryAuthError,
)
from reprobox.labels import CUDA, image_uses_cuda, recorded_fingerprints
from reprobox.progress import Reporter

__all__ = [
    "Builder",
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


class Builder(Protocol):
    """`reprobox.pipeline.build`'s shape, so tests can pass a fake one."""

    def __call__(
        self,
        spec_path: Path,
        *,
        lock_path: Path | None,
        tag: str | None,
        relock: bool,
        nocache: bool,
        check: bool,
        refetch: bool,
    ) -> dict[str, Any]: ...


@dataclass(frozen=True)
class Published:
    """What landed in the registry: every tag names the manifest `digest`."""

    target: Target
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


def _push_error(err: EngineError, target: Target, auth: Mapping[str, str] | None) -> EngineError:
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
    engine: Engine,
    client: RegistryClient,
    image_id: str,
    tags: Sequence[str],
    *,
    auth: Mapping[str, str] | None,
    reporter: Reporter,
) -> Published:
    """Tag `image_id` in the target repository, push every tag, and check the registry's digest."""
    target = client.target
    tally = _LayerTally(reporter.detail)
    digests = set()
    for tag in tags:
        engine.tag(image_id, target.ref(tag))
        with reporter.stage(f"push {target.ref(tag)}"):
            try:
                digests.add(engine.push(target.name, tag, auth, on_status=tally))
            except ImageNotFoundError:
                raise
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


def _client(info: EngineInfo, target: Target, auth: Mapping[str, str] | None) -> RegistryClient:
    return RegistryClient(target, auth, insecure=is_insecure(target.registry, info.registry))


def _default_builder() -> Builder:
    from reprobox.pipeline import build

    return build


def publish(
    spec_path: Path,
    to: str,
    *,
    tags: Sequence[str] = (),
    lock_path: Path | None = None,
    relock: bool = False,
    refetch: bool = False,
    engine: Engine | None = None,
    builder: Builder | None = None,
    credentials: Callable[[str], dict[str, str] | None] = registry_auth,
    allow_unverified: bool = False,
) -> dict[str, Any]:
    """`reprobox publish`: build, gate on the self-check, push, verify the digest; a report.

    The gate: the image must carry a fingerprint for its kind (a cuda-* one for a CUDA image,
    a cpu-* one for a CPU image). Where the self-check cannot run at all (a CUDA image on a
    host without a GPU), `allow_unverified` pushes the image anyway, unproven, and the report
    says so; a self-check that ran and failed always stops the push.
    """
    started = time.monotonic()
    target = parse_target(to)
    extra = [check_tag(tag) for tag in tags]
    reporter = Reporter()
    engine = engine or DockerEngine()
    info = engine.ping()
    auth = credentials(target.registry)
    client = _client(info, target, auth)
    with reporter.stage(f"check the registry {target.registry} and the credentials for it"):
        client.check_access()
    build = builder or _default_builder()
    options: dict[str, Any] = {
        "lock_path": lock_path,
        "tag": None,
        "relock": relock,
        "nocache": False,
        "refetch": refetch,
    }
    unverified: str | None = None
    try:
        built = build(spec_path, check=True, **options)
    except GpuUnavailableError as err:
        if not allow_unverified:
            return _unproven(target, None, err.render())
        unverified = err.message
        built = build(spec_path, check=False, **options)
    if not built["passed"]:
        return _gated(target, built)
    labels = engine.inspect_image(built["image_id"]).labels
    proof = _proof(labels, built["image_id"])
    if not proof:
        unverified = unverified or f"{built['image_id']} carries no fingerprint for {_kind(labels)}"
        if not allow_unverified:
            return _unproven(target, built["image_id"], unverified)
    content_tag = str(built["tags"][0]).rsplit(":", 1)[1]
    wanted = list(dict.fromkeys([content_tag, *extra]))
    done = push_image(engine, client, built["image_id"], wanted, auth=auth, reporter=reporter)
    seconds = round(time.monotonic() - started, 1)
    refs = [target.ref(tag) for tag in done.tags]
    warning = (
        ""
        if unverified is None
        else f"\nUNVERIFIED (--allow-unverified): no self-check proves this image: {unverified}"
    )
    return {
        "passed": True,
        "exit_code": 0,
        "verified": unverified is None,
        "unverified_reason": unverified,
        "fingerprints": proof,
        "reference": done.reference,
        "digest": done.digest,
        "tags": refs,
        "image_id": done.image_id,
        "selfcheck": built["selfcheck"],
        "layers": {"pushed": done.layers_pushed, "reused": done.layers_reused},
        "seconds": seconds,
        "summary": f"published {done.reference}\ntags: {', '.join(refs)} "
        f"({done.layers_pushed} layers pushed, {done.layers_reused} already there; {seconds} s)"
        + warning,
    }


def _kind(labels: Mapping[str, str]) -> str:
    return "a CUDA image (cuda-*)" if labels.get(CUDA, "cpu") != "cpu" else "a CPU image (cpu-*)"


def _proof(labels: Mapping[str, str], image_id: str) -> dict[str, str]:
    """The image's fingerprints for its own kind: cuda-* for a CUDA image, cpu-* for a CPU one."""
    prefix = "cuda-" if image_uses_cuda(labels, image_id) else "cpu-"
    return {k: v for k, v in sorted(recorded_fingerprints(labels).items()) if k.startswith(prefix)}


def _unproven(target: Target, image_id: str | None, why: str) -> dict[str, Any]:
    """The report when no self-check proves the image and the user did not allow that."""
    code = EXIT_MISSING if image_id is None else EXIT_CHECK_FAILED
    return {
        "passed": False,
        "exit_code": code,
        "verified": False,
        "unverified_reason": why,
        "fingerprints": {},
        "reference": None,
        "digest": None,
        "tags": [],
        "image_id": image_id,
        "selfcheck": None,
        "summary": f"{why}\nnothing was pushed to {target.name}: an image is published only "
        "with the proof of its self-check; `--allow-unverified` publishes it unproven (the "
        "report then says so)",
    }


def _gated(target: Target, built: Mapping[str, Any]) -> dict[str, Any]:
    """The report when the self-check failed: nothing was tagged in the target, nothing pushed."""
    return {
        "passed": False,
        "exit_code": EXIT_CHECK_FAILED,
        "verified": False,
        "unverified_reason": None,
        "fingerprints": {},
        "reference": None,
        "digest": None,
        "tags": [],
        "image_id": built.get("image_id"),
        "selfcheck": built.get("selfcheck"),
        "summary": f"{built.get('summary', 'the self-check failed')}\n"
        f"nothing was pushed to {target.name}: the self-check gates publishing",
    }
