"""Spec + lock -> a build context on disk (the only module that uses Jinja)."""

from __future__ import annotations

import hashlib
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING

import jinja2
import yaml

from reprobox import __version__
from reprobox._lockfile import GROUPS, requirements_text
from reprobox.compat import driver_minimum
from reprobox.cpu import cpu_env
from reprobox.errors import ReproboxError
from reprobox.spec import Spec, parse_spec

if TYPE_CHECKING:
    from reprobox.lock import Lock

__all__ = [
    "RenderedContext",
    "default_tag",
    "dockerfile_quote",
    "image_env",
    "render_context",
    "source_date_epoch",
    "starter_spec",
]

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_IMAGE_FILES = ("reprobox_hook.py", "reprobox_cpu.py", "reprobox_selfcheck.py")


@dataclass(frozen=True)
class RenderedContext:
    """A build context written to disk, and the facts the later stages need from it."""

    path: Path
    base_ref: str
    tag: str
    labels: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]
    lock_sha256: str
    source_date_epoch: int


def dockerfile_quote(value: object) -> str:
    """Quote a value for ENV/LABEL so the builder reads it back literally and it adds nothing."""
    text = str(value)
    if _CONTROL.search(text):
        # The spec already refuses these; this is the second wall, not the first.
        raise ReproboxError(f"refusing to render a control character into the Dockerfile: {text!r}")
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("$", "\\$")
    return f'"{escaped}"'


def source_date_epoch(lock: Lock) -> int:
    """A timestamp derived from the lock, not the clock: the same pins, the same dates.

    reprobox images carry no real build time; every date in them is this one: midnight of
    a day in 2020-2024 chosen by the hash of the installer's and torch's pins. Only those
    pins, so that changing a small pin elsewhere leaves the torch layer byte for byte as it
    was (its mtimes are clamped to this date), as its build cache already does.
    """
    heavy = requirements_text(w for w in lock.wheels if w.group in {"installer", "torch"})
    digest = hashlib.sha256(heavy.encode()).hexdigest()
    return 1_577_836_800 + int(digest[:8], 16) % 1_826 * 86_400


def default_tag(spec: Spec, lock_sha256: str) -> str:
    """`name:<12 hex>` from the spec's and the lock's hashes."""
    digest = hashlib.sha256(f"{spec.sha256}\n{lock_sha256}".encode()).hexdigest()
    return f"{spec.name}:{digest[:12]}"


def image_env(spec: Spec, lock: Lock | None = None) -> tuple[tuple[str, str], ...]:
    """Every ENV the spec implies, determinism first, then the user's own `env`.

    The lock tells the CPU pins the image's architecture and numpy (x86_64 and none without it).
    """
    det = spec.determinism
    env: dict[str, str] = {
        "PYTHONHASHSEED": str(det.hash_seed),
        "OMP_NUM_THREADS": str(det.threads),
        "MKL_NUM_THREADS": str(det.threads),
        "OMP_DYNAMIC": "FALSE",
        "MKL_DYNAMIC": "FALSE",
        "GOMP_CPU_AFFINITY": det.gomp_cpu_affinity,
        "CUBLAS_WORKSPACE_CONFIG": det.cublas_workspace_config,
        "REPROBOX_SEED": str(det.seed),
        "REPROBOX_DETERMINISTIC": "1" if det.deterministic_algorithms else "0",
        "REPROBOX_WARN_ONLY": "1" if det.warn_only else "0",
        "REPROBOX_FILL_UNINITIALIZED_MEMORY": "1" if det.fill_uninitialized_memory else "0",
    }
    numpy = lock.wheel("numpy") if lock is not None else None
    arch = lock.arch if lock is not None else "x86_64"
    env |= cpu_env(det.cpu, arch, numpy.version if numpy is not None else None)
    if spec.torch.is_cuda:
        minimum = driver_minimum(spec.torch.cuda)
        require = f"cuda>={spec.torch.cuda}"
        if minimum is not None:
            require += f" driver>={minimum.full}"
        env |= {
            "NVIDIA_VISIBLE_DEVICES": "all",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
            "NVIDIA_REQUIRE_CUDA": require,
        }
    return (*env.items(), *sorted(spec.env.items()))


def _labels(
    spec: Spec, lock_sha256: str, base_ref: str, tag: str, epoch: int
) -> tuple[tuple[str, str], ...]:
    created = datetime.fromtimestamp(epoch, UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    labels = {
        "org.opencontainers.image.title": spec.name,
        "org.opencontainers.image.version": tag.split(":", 1)[1],
        "org.opencontainers.image.created": created,
        "org.opencontainers.image.description": f"reprobox image: torch {spec.torch.version} ({spec.torch.cuda})",
        "reprobox.version": __version__,
        "reprobox.spec-sha256": spec.sha256,
        "reprobox.lock-sha256": lock_sha256,
        "reprobox.base": base_ref,
        "reprobox.torch": spec.torch.version,
        "reprobox.cuda": spec.torch.cuda,
        "reprobox.seed": str(spec.determinism.seed),
    }
    if spec.source_url is not None:
        labels["org.opencontainers.image.source"] = spec.source_url
    return tuple(sorted(labels.items()))


def _environment() -> jinja2.Environment:
    loader = jinja2.FileSystemLoader(str(resources.files("reprobox.templates")))
    env = jinja2.Environment(
        loader=loader,
        undefined=jinja2.StrictUndefined,
        autoescape=False,  # noqa: S701 - a Dockerfile, not HTML; values go through `dq`
        keep_trailing_newline=True,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["dq"] = dockerfile_quote
    return env


def _spec_text(spec: Spec) -> str:
    if spec.source is not None:
        return spec.source.read_text(encoding="utf-8")
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=True)


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")


def _place_wheels(ctx: Path, lock: Lock, wheels: Mapping[str, Path] | None) -> None:
    for group in GROUPS:
        (ctx / "wheels" / group).mkdir(parents=True, exist_ok=True)
    if wheels is None:
        return
    for wheel in lock.wheels:
        source = wheels[wheel.sha256]
        target = ctx / "wheels" / wheel.group / wheel.filename
        try:
            target.hardlink_to(source)
        except OSError:
            shutil.copyfile(source, target)


def render_context(
    spec: Spec,
    lock: Lock,
    lock_text: str,
    out: Path,
    *,
    base_ref: str,
    wheels: Mapping[str, Path] | None = None,
) -> RenderedContext:
    """Write the build context for `spec` into `out` (which must be empty or absent).

    `base_ref` is what `FROM` names: the spec's digest-pinned image, or the ID of the
    bootstrapped base. `wheels` maps sha256 to verified files; None leaves the wheel
    folders empty (a context to read, not to build).
    """
    if out.exists() and any(out.iterdir()):
        raise ReproboxError(f"{out} is not empty", hint="render into a new or empty directory")
    lock_sha256 = hashlib.sha256(lock_text.encode()).hexdigest()
    epoch = source_date_epoch(lock)
    tag = default_tag(spec, lock_sha256)
    env = image_env(spec, lock)
    labels = _labels(spec, lock_sha256, base_ref, tag, epoch)
    by_group = {group: [w for w in lock.wheels if w.group == group] for group in GROUPS}
    installer = by_group["installer"]
    if len(installer) != 1:
        raise ReproboxError(
            "the lock names no installer wheel (pip)", hint="run `reprobox lock --relock`"
        )
    # Debian bootstrap bases get their apt packages at bootstrap time; only other bases install here.
    apt_install = list(spec.apt) if spec.base.image is not None else []
    dockerfile = (
        _environment()
        .get_template("Dockerfile.j2")
        .render(
            reprobox_version=__version__,
            spec=spec,
            spec_sha256=spec.sha256,
            base_ref=base_ref,
            installer_filename=installer[0].filename,
            # Nothing here may change with a pin outside torch's closure: it would invalidate
            # the torch layer's build cache. The installer writes hash-based pycs, no dates.
            install_env="PYTHONDONTWRITEBYTECODE=1",
            apt_install=apt_install,
            env=env,
            labels=labels,
        )
    )
    out.mkdir(parents=True, exist_ok=True)
    _write(out / "Dockerfile", dockerfile)
    _write(out / "requirements" / "torch.txt", requirements_text(by_group["torch"]))
    _write(out / "requirements" / "rest.txt", requirements_text(by_group["rest"] + installer))
    templates = resources.files("reprobox.templates")
    _write(
        out / "build" / "reprobox_install.py",
        templates.joinpath("build/reprobox_install.py").read_text(),
    )
    for name in _IMAGE_FILES:
        _write(out / "image" / name, templates.joinpath(f"image/{name}").read_text())
    _write(out / "image" / "reprobox.lock", lock_text)
    _write(out / "image" / "spec.yaml", _spec_text(spec))
    script = spec.script_path
    if script is not None:
        _write(out / "image" / "user" / script.name, script.read_text(encoding="utf-8"))
    _place_wheels(out, lock, wheels)
    return RenderedContext(out, base_ref, tag, labels, env, lock_sha256, epoch)


def starter_spec(*, torch: str = "2.13.0", cuda: str = "cpu", name: str = "my-env") -> str:
    """A commented starter spec that `render` accepts as written; checked before it is returned."""
    release = ".".join(torch.split(".")[:2])
    text = (
        _environment()
        .get_template("spec.yaml.j2")
        .render(name=name, python="3.11", torch=torch, cuda=cuda, release=release)
    )
    parse_spec(text)
    return text
