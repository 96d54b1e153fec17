"""Spec -> Lock: every wheel of the image resolved for its platform by pip, pinned by sha256.

The resolver is pip's `install --dry-run --report` for the image's Python and manylinux tags
(metadata only, no wheel is downloaded); this module chooses what to ask for, checks what came
back against the spec (CUDA, cuDNN, torch wanted by others), and groups the wheels for the
Dockerfile's layers. `ensure_lock` decides whether to resolve or to use the lock file there
(`lockfile` reads and writes it); `lock_spec` is the `reprobox lock` stage.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from reprobox import __version__
from reprobox._no_wheel import explain_no_match
from reprobox._pip import (
    PipConfig,
    Resolution,
    ResolvedDist,
    Runner,
    link_listing,
    pip_version,
    read_pip_config,
    resolve_with_pip,
    run_pip,
)
from reprobox._platform import Platform, platform_for
from reprobox._sizes import wheel_sizes
from reprobox.compat import torch_release
from reprobox.context import Context
from reprobox.errors import IndexUnreachableError, LockError, NoMatchError
from reprobox.locked import IndexSettings, Lock, LockedWheel
from reprobox.lockfile import (
    LockFile,
    default_lock_path,
    pylock_path,
    read_lockfile,
    write_lockfile,
    write_pylock,
)
from reprobox.spec import Index, Spec
from reprobox.spec_load import load_spec

__all__ = [
    "PYTORCH_INDEX",
    "LockResult",
    "Sizer",
    "ensure_lock",
    "lock_spec",
    "locked_spec",
    "resolve",
]

#: PyTorch's own wheel index; one sub-index per build variant (`/cpu`, `/cu118`, ...).
PYTORCH_INDEX = "https://download.pytorch.org/whl"

#: Measures wheels: their URLs -> size in bytes (None where unknown); tests pass a fake.
Sizer = Callable[[Iterable[str]], Mapping[str, "int | None"]]

_RUNTIME = re.compile(r"^(?:nvidia-cuda-runtime(?:-cu[0-9]+)?|cuda-toolkit)$")
_CUDNN = re.compile(r"^nvidia-cudnn(?:-cu[0-9]+)?$")
_OWN = {
    "torch": "torch.version",
    "transformers": "transformers",
    "pip": "reprobox (the image's installer)",
}


def _where(spec: Spec) -> str:
    return str(spec.source) if spec.source is not None else "<spec>"


def _torch_requirement(spec: Spec) -> tuple[str, str | None]:
    """torch's requirement for the spec's build, and the PyTorch index that has it, if any."""
    torch = spec.torch
    version, _, label = torch.version.partition("+")
    wanted = "cpu" if not torch.is_cuda else "cu" + torch.cuda.replace(".", "")
    row = torch_release(torch.release)
    default_build = torch.is_cuda and row is not None and row.pypi_cuda == torch.cuda
    if label and label != wanted:
        raise LockError(
            f"{_where(spec)}: torch.version: {torch.version} is the +{label} build, but torch.cuda "
            f"is {torch.cuda}",
            hint=f'write torch.version as "{version}" and let torch.cuda choose the build',
        )
    if default_build:
        # `===` matches 2.5.1 only: `==2.5.1` would also take a local 2.5.1+cpu from find-links.
        return f"torch==={version}", None
    return f"torch=={version}+{wanted}", f"{PYTORCH_INDEX}/{wanted}"


def _requirements(spec: Spec, torch: str, installer: str) -> list[str]:
    for pin in spec.packages:
        name = str(canonicalize_name(Requirement(pin).name))
        if name in _OWN:
            raise LockError(
                f"{_where(spec)}: packages: {pin} pins {name}, which is set by {_OWN[name]}",
                hint=f"remove {pin} from packages"
                + ("" if name == "pip" else f" and set {_OWN[name]} instead"),
            )
    transformers = [f"transformers=={spec.transformers}"] if spec.transformers else []
    return [torch, *transformers, *spec.packages, installer]


def _index_args(spec: Spec, pip_config: PipConfig) -> list[str]:
    """Where pip looks: the spec's index settings, else the locations of the user's pip config."""
    args: list[str] = list(pip_config.network)
    if spec.index == Index():
        return args + list(pip_config.locations)
    if spec.index.url is not None:
        args += ["--index-url", spec.index.url]
    for url in spec.index.extra_urls:
        args += ["--extra-index-url", url]
    root = spec.source.parent if spec.source is not None else Path.cwd()
    for link in spec.index.find_links:
        args += ["--find-links", link if "://" in link else str((root / link).resolve())]
    return args


def _resolve(
    target: Platform, requirements: list[str], args: list[str], runner: Runner, fallback: str | None
) -> Resolution:
    """pip's resolution; if torch's build is missing, once more with its PyTorch index added."""
    try:
        try:
            return resolve_with_pip(target, requirements, args, runner)
        except NoMatchError as err:
            if fallback is None or err.requirement != requirements[0]:
                raise
            try:
                return resolve_with_pip(
                    target, requirements, [*args, "--extra-index-url", fallback], runner
                )
            except IndexUnreachableError as again:
                raise IndexUnreachableError(
                    f"{requirements[0]} is not on the configured indexes, so reprobox asked "
                    f"PyTorch's index {fallback}; {again.message}",
                    hint=again.hint,
                ) from None
    except NoMatchError as err:
        listing = link_listing(target, err.requirement, err.index_args, runner)
        raise explain_no_match(
            err.requirement, err.usable_versions, listing, target, err.indexes
        ) from None


def _active(requirement: Requirement, env: Mapping[str, str], extras: Sequence[str]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate({**env, "extra": extra}) for extra in ("", *extras))


def _pins(dist: ResolvedDist, env: Mapping[str, str]) -> dict[str, str]:
    """`name -> version` of the exact pins in a distribution's active requirements."""
    pins: dict[str, str] = {}
    for text in dist.requires:
        req = Requirement(text)
        exact = [s.version for s in req.specifier if s.operator in {"==", "==="}]
        if exact and _active(req, env, ()):
            pins[str(canonicalize_name(req.name))] = exact[0]
    return pins


def _built_cuda(spec: Spec, torch: ResolvedDist, runtime: tuple[str, str] | None) -> str:
    """The CUDA major.minor torch was built for: from its runtime pin, else from +cuXYZ."""
    if runtime is not None:
        return ".".join(runtime[1].split(".")[:2])
    label = torch.version.partition("+")[2]
    if re.fullmatch(r"cu[0-9]{3,}", label):
        return f"{label[2:-1]}.{label[-1]}"
    raise LockError(
        f"{_where(spec)}: torch {torch.version} pins no CUDA runtime and has no +cuXYZ label, so "
        f"reprobox cannot check it against torch.cuda {spec.torch.cuda}",
        hint="pick a torch release whose metadata pins its CUDA libraries",
    )


def _check_torch(
    spec: Spec, torch: ResolvedDist, env: Mapping[str, str]
) -> tuple[str | None, str | None]:
    """Fail unless the resolved torch is the build the spec names; return its CUDA and cuDNN."""
    if not spec.torch.is_cuda:
        return None, None
    pins = _pins(torch, env)
    runtime = next(((n, v) for n, v in sorted(pins.items()) if _RUNTIME.match(n)), None)
    cudnn = next(((n, v) for n, v in sorted(pins.items()) if _CUDNN.match(n)), None)
    built = _built_cuda(spec, torch, runtime)
    if built != spec.torch.cuda:
        pinned = f" (it pins {runtime[0]}=={runtime[1]})" if runtime else ""
        raise LockError(
            f"{_where(spec)}: torch.cuda: torch {torch.version} is built for CUDA {built}{pinned}, "
            f"but the spec says {spec.torch.cuda}",
            hint=f'set torch.cuda to "{built}"',
        )
    wanted = spec.torch.cudnn
    if wanted is not None and cudnn is None:
        raise LockError(
            f"{_where(spec)}: torch.cudnn: torch {torch.version} pins no nvidia-cudnn wheel, so "
            f"cuDNN {wanted} cannot be checked",
            hint="remove torch.cudnn",
        )
    if wanted is not None and cudnn is not None and cudnn[1] != wanted:
        raise LockError(
            f"{_where(spec)}: torch.cudnn: torch {torch.version} pins cuDNN {cudnn[1]} "
            f"({cudnn[0]}=={cudnn[1]}), not {wanted}",
            hint=f'set torch.cudnn to "{cudnn[1]}" (or remove it: the lock records what torch pins)',
        )
    return (runtime[1] if runtime else built), (cudnn[1] if cudnn else None)


def _walk(
    roots: Sequence[str], dists: Mapping[str, ResolvedDist], env: Mapping[str, str]
) -> dict[str, set[str]]:
    """Every resolved distribution the `roots` requirements reach, with the extras asked of it.

    Follows only the requirements that are active in the image for the extras really
    requested along the way (a root's own `name[extra]`, or a dependent's), never every extra.
    """
    wanted: dict[str, set[str]] = {}
    todo = [Requirement(text) for text in roots]
    while todo:
        req = todo.pop()
        name = str(canonicalize_name(req.name))
        if name not in dists:
            continue
        known = wanted.get(name)
        if known is not None and set(req.extras) <= known:
            continue
        extras = wanted.setdefault(name, set())
        extras.update(req.extras)
        for text in dists[name].requires:
            dep = Requirement(text)
            if _active(dep, env, sorted(extras)):
                todo.append(dep)
    return wanted


def _through(req: Requirement, env: Mapping[str, str], extras: Sequence[str]) -> str | None:
    """The requested extra that makes `req` active, or None when it is active without one."""
    if _active(req, env, ()):
        return None
    return next((e for e in sorted(extras) if _active(req, env, (e,))), None)


def _used_with_torch(requirements: Sequence[str]) -> list[str]:
    """The roots as the torch check sees them: the spec's transformers is used with its torch.

    transformers keeps torch behind its 'torch' extra; the spec's `transformers` key means
    transformers on the spec's torch, so that extra counts as requested (for the check only:
    what is locked stays what pip resolved for the plain pin).
    """
    return [
        "transformers[torch]" + r.removeprefix("transformers")
        if r.startswith("transformers==")
        else r
        for r in requirements
    ]


def _check_torch_wanted(
    spec: Spec,
    requirements: Sequence[str],
    dists: Mapping[str, ResolvedDist],
    torch: str,
    env: Mapping[str, str],
) -> None:
    """Fail if a package of the image asks for another torch, even through a requested extra.

    pip enforces plain requirements; transformers and others put torch behind an extra, so a
    release that needs a newer torch would otherwise install quietly next to the old one.
    Only the extras that were really requested count: `safetensors[torch]` needing torch>=2.4
    is no objection when nothing asked for safetensors' 'torch' extra.
    """
    for name, extras in sorted(_walk(requirements, dists, env).items()):
        dist = dists[name]
        for text in dist.requires:
            req = Requirement(text)
            if canonicalize_name(req.name) != "torch" or not _active(req, env, sorted(extras)):
                continue
            if req.specifier.contains(torch, prereleases=True):
                continue
            extra = _through(req, env, sorted(extras))
            via = f" (through its '{extra}' extra)" if extra else ""
            raise LockError(
                f"{_where(spec)}: {dist.name} {dist.version} needs torch{req.specifier}{via}, but the "
                f"spec pins torch {torch}; reprobox never changes torch to fit another package",
                hint=f"pin a {dist.name} release that supports torch {torch}, or set torch.version "
                f"to one that {dist.name} {dist.version} accepts",
            )


def _closure(root: str, dists: Mapping[str, ResolvedDist], env: Mapping[str, str]) -> set[str]:
    """`root` and every resolved distribution it needs, directly or not, in the image."""
    return set(_walk([root], dists, env))


def _wheels(
    dists: Sequence[ResolvedDist], env: Mapping[str, str], sizes: Mapping[str, int | None]
) -> tuple[LockedWheel, ...]:
    by_name = {d.name: d for d in dists}
    torch_group = _closure("torch", by_name, env)
    wheels = []
    for dist in dists:
        if dist.sha256 is None:
            raise LockError(
                f"{dist.name} {dist.version}: the index gave no sha256 for {dist.url}",
                hint="use an index that publishes hashes (PyPI does) or a find-links folder",
            )
        group = (
            "installer" if dist.name == "pip" else "torch" if dist.name in torch_group else "rest"
        )
        wheels.append(
            LockedWheel(
                dist.name,
                dist.version,
                dist.filename,
                dist.url,
                dist.sha256,
                group,
                sizes.get(dist.url),
            )
        )
    return tuple(sorted(wheels, key=lambda w: w.name))


def resolve(
    spec: Spec,
    *,
    runner: Runner = run_pip,
    arch: str | None = None,
    pip_config: PipConfig | None = None,
    on_note: Callable[[str], None] | None = None,
    sizes: Sizer | None = None,
) -> Lock:
    """Resolve every wheel of `spec`'s image with pip, for its Python, architecture and glibc.

    pip runs isolated from its configuration; of the user's (`pip_config`, read when not
    given) only index locations and network settings are used, and `on_note` hears which
    settings were left out because they would change what is chosen. Each wheel's size is
    read from its URL (`sizes`, by default `stat` or an HTTP HEAD).
    """
    pip_config = read_pip_config() if pip_config is None else pip_config
    if pip_config.ignored and on_note is not None:
        on_note(
            "ignored from pip's configuration (they would change what the lock chooses): "
            + ", ".join(pip_config.ignored)
        )
    target = platform_for(spec, arch)
    torch, variant_index = _torch_requirement(spec)
    installer = f"pip=={pip_version()}"
    requirements = _requirements(spec, torch, installer)
    # A spec that names its own index decides where wheels come from; else PyTorch's index
    # is tried for torch's build when pip's configured indexes do not have it.
    fallback = variant_index if spec.index.url is None else None
    resolution = _resolve(target, requirements, _index_args(spec, pip_config), runner, fallback)
    env = target.marker_environment()
    dists = {d.name: d for d in resolution.dists}
    if "torch" not in dists or "pip" not in dists:
        raise LockError("pip's report lacks torch or pip; this pip is not one reprobox knows")
    cuda, cudnn = _check_torch(spec, dists["torch"], env)
    _check_torch_wanted(spec, _used_with_torch(requirements), dists, dists["torch"].version, env)
    if sizes is None:
        verify = _cert(pip_config.network)
        sizes = lambda urls: wheel_sizes(urls, verify=verify, on_note=on_note)  # noqa: E731
    measured = sizes(d.url for d in resolution.dists)
    return Lock(
        spec_sha256=spec.sha256,
        python=target.python,
        arch=target.arch,
        glibc=target.glibc,
        platforms=target.platforms,
        index=IndexSettings(resolution.index_urls, resolution.find_links),
        resolver=f"pip {pip_version()}",
        installer=installer,
        reprobox_version=__version__,
        wheels=_wheels(resolution.dists, env, measured),
        torch_cuda=cuda,
        torch_cudnn=cudnn,
        glibc_assumed=target.glibc_assumed,
    )


def _cert(network: Sequence[str]) -> bool | str:
    """The CA bundle pip was told to trust (its `cert` setting), else requests' default."""
    args = list(network)
    return args[args.index("--cert") + 1] if "--cert" in args else True


def ensure_lock(
    spec: Spec,
    path: Path,
    *,
    relock: bool = False,
    runner: Runner = run_pip,
    on_note: Callable[[str], None] | None = None,
    sizes: Sizer | None = None,
) -> LockFile:
    """The lock at `path` if it was made from this spec; resolve and write it when missing or asked.

    A lock made from another version of the spec is never rewritten silently: that is an error
    unless `relock` is set. The lock's `pylock.toml` (see `lockfile.pylock_path`) is written
    beside it whenever it is missing or no longer follows the lock.
    """
    if path.exists() and not relock:
        locked = read_lockfile(path)
        if locked.lock.spec_sha256 != spec.sha256:
            raise LockError(
                f"the spec changed since {path} was written (the lock is for spec sha256 "
                f"{locked.lock.spec_sha256[:12]}, the spec is now {spec.sha256[:12]}); run with --relock",
                hint="`--relock` resolves again and rewrites the lock; review its diff before you commit it",
            )
    else:
        locked = write_lockfile(path, resolve(spec, runner=runner, on_note=on_note, sizes=sizes))
    write_pylock(locked.lock, path)
    return locked


@dataclass(frozen=True)
class LockResult:
    """`reprobox lock`: where the lock and its pylock.toml are, and what they pin."""

    lock: Path
    pylock: Path
    spec_sha256: str
    wheels: int


def locked_spec(
    ctx: Context, spec_path: Path, lock_path: Path | None, *, relock: bool
) -> tuple[Spec, LockFile]:
    """The spec at `spec_path`, and its lock (`lock_path`, by default beside the spec)."""
    spec = load_spec(spec_path)
    path = lock_path or default_lock_path(spec_path)
    with ctx.reporter.stage(f"lock {path}"):
        return spec, ensure_lock(spec, path, relock=relock, on_note=ctx.reporter.note)


def lock_spec(ctx: Context, spec_path: Path, *, output: Path | None, relock: bool) -> LockResult:
    """The lock stage: resolve and write the lock, or confirm the one there is current."""
    spec, locked = locked_spec(ctx, spec_path, output, relock=relock)
    path = output or default_lock_path(spec_path)
    return LockResult(path, pylock_path(path), spec.sha256, len(locked.lock.wheels))
