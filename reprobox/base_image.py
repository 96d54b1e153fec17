"""The base stage: the image a build starts FROM, as an image ID or a digest-pinned reference.

A spec's `base.image` is used as it is, pulled by its digest where the engine lacks it (with
the user's Docker credentials) and checked to be the image the digest names; a `base.bootstrap`
is made (or reused) by `bootstrap`.
"""

from __future__ import annotations

from reprobox._registry import registry_auth
from reprobox.bootstrap import bootstrap_base
from reprobox.compat import TRITON_BUILD_PACKAGES
from reprobox.context import Context
from reprobox.errors import DigestMismatchError
from reprobox.spec import Spec

__all__ = ["base_for", "base_packages", "base_refs"]

#: Docker Hub, as the Docker config names it.
_HUB = "https://index.docker.io/v1/"


def base_for(ctx: Context, spec: Spec) -> str:
    """What the build's FROM names: the spec's pinned image, or the ID of its Debian base."""
    return base_refs(ctx, spec)[0]


def base_refs(ctx: Context, spec: Spec) -> tuple[str, str]:
    """What the build's FROM names, and what the image records of its base: the same but for a
    Debian base on the containerd image store (FROM its manifest digest, record its config
    digest, the same on every engine)."""
    if spec.base.image is not None:
        if not ctx.engine.image_exists(spec.base.image):
            _pull_base(ctx, spec.base.image)
        return spec.base.image, spec.base.image
    suite = spec.base.suite or "bookworm"
    with ctx.reporter.stage(f"base debian:{suite}"):
        base = bootstrap_base(ctx, suite, base_packages(spec))
        ctx.reporter.note(
            f"base {base.ref} = {base.image_id} ({'reused' if base.reused else 'made'})"
        )
    return base.image_id, base.config_id or base.image_id


def base_packages(spec: Spec) -> tuple[str, ...]:
    """The spec's apt packages, and for CUDA what torch.compile's Triton needs at run time."""
    named = {package.split("=", 1)[0] for package in spec.apt}  # the spec's own pin wins
    extra = [p for p in TRITON_BUILD_PACKAGES if p not in named] if spec.torch.is_cuda else []
    return (*spec.apt, *extra)


def _registry_of(repository: str) -> str:
    """Docker's rule: a first part with a dot or a port (or localhost) names the registry."""
    first = repository.split("/", 1)[0]
    is_host = "/" in repository and ("." in first or ":" in first or first == "localhost")
    return first if is_host else _HUB


def _pull_base(ctx: Context, ref: str) -> None:
    """Pull a digest-pinned `base.image` the engine lacks, with the user's Docker credentials,
    and check that what came is the image the digest names."""
    named, digest = ref.split("@", 1)
    slash, colon = named.rfind("/"), named.rfind(":")
    repository = named[:colon] if colon > slash else named  # the tag goes: the digest decides
    with ctx.reporter.stage(f"pull the base {repository}@{digest}"):
        ctx.engine.pull(f"{repository}@{digest}", registry_auth(_registry_of(repository)))
    found = ctx.engine.inspect_image(f"{repository}@{digest}").repo_digests
    if f"{repository}@{digest}" not in found and not any(d.endswith("@" + digest) for d in found):
        raise DigestMismatchError(
            f"the registry served {repository} with digests {', '.join(found) or 'none'}, not "
            f"{digest}; the base was not used",
            hint="check the reference and the registry: a digest-pinned base must match exactly",
        )
