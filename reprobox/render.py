"""Spec + lock -> a build context on disk (the only module that uses Jinja)."""

from __future__ import annotations

import base64
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from importlib import metadata, resources
from pathlib import Path

import installer
import jinja2
import yaml

from reprobox import __version__
from reprobox import labels as label
from reprobox._files import place, rfc3339
from reprobox.cache import fetch_locked
from reprobox.compat import nvidia_require_cuda
from reprobox.context import Context
from reprobox.cpu import cpu_env
from reprobox.dockerfile import dockerfile_key, dockerfile_quote, from_reference, shell_word
from reprobox.errors import BadInputError, MissingError, ReproboxError
from reprobox.lock import locked_spec
from reprobox.locked import GROUPS, Lock, requirements_text
from reprobox.lockfile import LockFile, default_lock_path
from reprobox.spec import Spec
from reprobox.spec_load import parse_spec

__all__ = [
    "RenderResult",
    "RenderedContext",
    "check_output_dir",
    "content_tag",
    "image_env",
    "render_context",
    "render_spec",
    "source_date_epoch",
    "starter_spec",
]

_IMAGE_FILES = (
    "reprobox_hook.py",
    "reprobox_cpu.py",
    "reprobox_selfcheck.py",
    "reprobox_inference.py",
    "reprobox_generation.py",
    "reprobox_decoder.py",
)
_WHEEL_FILE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._+-]{0,254}\.whl")
_PIN = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}==[A-Za-z0-9.+!_-]{1,128}")
_SHA256 = re.compile(r"[0-9a-f]{64}")


@dataclass(frozen=True)
class RenderedContext:
    """A build context written to disk, and the facts the later stages need from it."""

    path: Path
    base_ref: str
    #: The image's name (the spec's) and its content tag (from the spec's and lock's hashes).
    name: str
    content_tag: str
    labels: tuple[tuple[str, str], ...]
    env: tuple[tuple[str, str], ...]
    lock_sha256: str
    source_date_epoch: int
    #: sha256 of everything the context holds, as written (each entry's path, kind and mode, each
    #: file's bytes, each wheel's verified sha256): the recipe build's inputs.
    inputs_sha256: str

    @property
    def tag(self) -> str:
        """`name:content-tag`, the tag a build gets by default."""
        return f"{self.name}:{self.content_tag}"


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


def content_tag(spec: Spec, lock_sha256: str) -> str:
    """12 hex digits from the spec's and the lock's hashes: the image's default tag."""
    return hashlib.sha256(f"{spec.sha256}\n{lock_sha256}".encode()).hexdigest()[:12]


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
        env |= {
            "NVIDIA_VISIBLE_DEVICES": "all",
            "NVIDIA_DRIVER_CAPABILITIES": "compute,utility",
            "NVIDIA_REQUIRE_CUDA": nvidia_require_cuda(spec.torch.cuda),
        }
    return (*env.items(), *sorted(spec.env.items()))


def _labels(
    spec: Spec, lock_sha256: str, base_ref: str, tag: str, epoch: int
) -> tuple[tuple[str, str], ...]:
    """The image's labels, `tag` being its content tag."""
    created = rfc3339(epoch)
    labels = {
        label.OCI_TITLE: spec.name,
        label.OCI_VERSION: tag,
        label.OCI_CREATED: created,
        label.OCI_DESCRIPTION: f"reprobox image: torch {spec.torch.version} ({spec.torch.cuda})",
        label.VERSION: __version__,
        label.SPEC_SHA256: spec.sha256,
        label.LOCK_SHA256: lock_sha256,
        label.BASE: base_ref,
        label.TORCH: spec.torch.version,
        label.CUDA: spec.torch.cuda,
        label.SEED: str(spec.determinism.seed),
    }
    if spec.source_url is not None:
        labels[label.OCI_SOURCE] = spec.source_url
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
    env.filters["key"] = dockerfile_key
    env.filters["sh"] = shell_word
    env.filters["ref"] = from_reference
    return env


def _spec_text(spec: Spec) -> str:
    """The spec's own text (the bytes its sha256 covers), or a dump of a spec made in code."""
    if spec.text:
        return spec.text
    return yaml.safe_dump(spec.model_dump(mode="json"), sort_keys=True)


def _bad_output(message: str, *, missing: bool = False) -> ReproboxError:
    """`message` as bad input (exit 2), or where this host cannot write there (exit 3)."""
    kind = MissingError if missing else BadInputError
    return kind(message, hint="render into a new or empty directory (`-o DIR`)")


def check_output_dir(out: Path) -> None:
    """`out` can become a build context: absent, or an empty directory; else exit 2 now."""
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise _bad_output(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        raise _bad_output(f"{out} is not empty")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise _bad_output(f"{parent} is not a directory, so {out} cannot be made in it")
            break


def _wheel_plan(lock: Lock) -> dict[str, str]:
    """Relative path in the context -> sha256, for every wheel; refuses names that are paths."""
    plan: dict[str, str] = {}
    for wheel in lock.wheels:
        pin = f"{wheel.name}=={wheel.version}"
        if _PIN.fullmatch(pin) is None or _SHA256.fullmatch(wheel.sha256) is None:
            raise BadInputError(
                f"the lock pins {pin[:120]!r} (sha256 {wheel.sha256[:80]!r}), which is not a plain "
                "name==version with a sha256; it goes into the build's requirement files",
                hint="write the lock again with `reprobox lock --relock SPEC`",
            )
        if wheel.group not in GROUPS or _WHEEL_FILE.fullmatch(wheel.filename) is None:
            raise BadInputError(
                f"the lock names a wheel file {wheel.filename[:120]!r} (group {wheel.group[:40]!r}) "
                "that is not a plain wheel name",
                hint="write the lock again with `reprobox lock --relock SPEC`",
            )
        plan[f"wheels/{wheel.group}/{wheel.filename}"] = wheel.sha256
    return plan


def _place_wheels(ctx: Path, plan: Mapping[str, str], wheels: Mapping[str, Path] | None) -> None:
    for group in GROUPS:
        (ctx / "wheels" / group).mkdir(parents=True, exist_ok=True)
    if wheels is None:
        return
    for relative, sha256 in plan.items():
        place(wheels[sha256], ctx / relative)


def _write_tree(
    out: Path,
    files: Mapping[str, str],
    plan: Mapping[str, str],
    wheels: Mapping[str, Path] | None,
) -> None:
    """Write the context into a sibling temporary folder and rename it into place.

    rename(2) replaces an absent or empty directory but never a non-empty one, so of two
    renders racing into one new folder exactly one wins, and a reader never sees half a context.
    What it holds is 0644 (files) and 0755 (folders) whatever the umask or a default ACL would
    make: COPY keeps the modes, so `/opt/reprobox` and the image ID would follow the host's
    umask. The folder itself keeps the umask's mode; the wheels keep the cache's (they are hard
    links, and reach no image's layer).
    """
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".partial", dir=out.parent))
    except OSError as exc:
        denied = exc.errno in {errno.EACCES, errno.EPERM, errno.EROFS}
        raise _bad_output(f"cannot create {out}: {exc.strerror or exc}", missing=denied) from None
    try:
        for relative, text in files.items():
            path = tmp / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
            path.chmod(0o644)
        _place_wheels(tmp, plan, wheels)
        # While `tmp` is mkdtemp's 0700 nobody else can swap a folder for a link under it.
        for folder in tmp.rglob("*"):
            if folder.is_dir() and not folder.is_symlink():
                folder.chmod(0o755)
        mask = os.umask(0)
        os.umask(mask)
        tmp.chmod(0o777 & ~mask)
        try:
            tmp.rename(out)
        except OSError as exc:
            if exc.errno in {errno.ENOTEMPTY, errno.EEXIST}:
                raise _bad_output(
                    f"{out} is not empty (another render may have written it first)"
                ) from None
            if exc.errno in {errno.ENOTDIR, errno.EISDIR}:
                raise _bad_output(f"{out} exists and is not a directory") from None
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def render_context(
    spec: Spec,
    locked: LockFile,
    out: Path,
    *,
    base_ref: str,
    wheels: Mapping[str, Path] | None = None,
    base_label: str | None = None,
) -> RenderedContext:
    """Write the build context for `spec` into `out` (which must be empty or absent).

    `base_ref` is what `FROM` names: the spec's digest-pinned image, or the ID of the
    bootstrapped base; `base_label` what the image records of it (default `base_ref`: the
    base's config digest, where the engine shows another ID). `wheels` maps sha256 to verified files; None leaves the wheel
    folders empty (a context to read, not to build). Everything is rendered and checked in
    memory first: on any error nothing is written.
    """
    check_output_dir(out)
    lock, lock_sha256 = locked.lock, locked.sha256
    epoch = source_date_epoch(lock)
    tag = content_tag(spec, lock_sha256)
    env = image_env(spec, lock)
    labels = _labels(spec, lock_sha256, base_label or base_ref, tag, epoch)
    plan = _wheel_plan(lock)
    by_group = {group: [w for w in lock.wheels if w.group == group] for group in GROUPS}
    installer = by_group["installer"]
    if len(installer) != 1:
        raise BadInputError(
            "the lock names no installer wheel (pip)", hint="run `reprobox lock --relock`"
        )
    missing = sorted({sha for sha in plan.values() if wheels is not None and sha not in wheels})
    if missing:
        raise BadInputError(f"no verified file for the locked wheels {', '.join(missing)}")
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
    templates = resources.files("reprobox.templates")
    files = {
        "Dockerfile": dockerfile,
        "requirements/torch.txt": requirements_text(by_group["torch"]),
        "requirements/rest.txt": requirements_text(by_group["rest"] + installer),
        "build/reprobox_install.py": templates.joinpath("build/reprobox_install.py").read_text(),
        **_pypa_installer_files(),
        **{
            f"image/{name}": templates.joinpath(f"image/{name}").read_text()
            for name in _IMAGE_FILES
        },
        "image/reprobox.lock": locked.body,
        "image/spec.yaml": _spec_text(spec),
    }
    script = spec.script_path
    if script is not None:
        if spec.script_text is None:
            raise BadInputError(
                "selfcheck.script is read when the spec is loaded from its file, and this spec "
                "was not",
                hint="load it with `load_spec(PATH)` (the CLI does)",
            )
        files[f"image/user/{script.name}"] = spec.script_text
    _write_tree(out, files, plan, wheels)
    inputs = _inputs_sha256(out, files, plan if wheels is not None else {})
    return RenderedContext(out, base_ref, spec.name, tag, labels, env, lock_sha256, epoch, inputs)


def _pypa_installer_files() -> dict[str, str]:
    """pypa/installer's source as reprobox runs it (`--assemble`), for the recipe's install
    step: `build/pypa/installer/...`. The distribution must be the one this process imports,
    and each file is checked against its installed RECORD, so what the image's build runs is
    what this process runs; the Windows launchers stay out."""
    hint = "reinstall reprobox (`make setup`, or `pip install --force-reinstall installer==1.1.0`)"
    dist = metadata.distribution("installer")
    if dist.version != installer.__version__:
        raise MissingError(
            f"pypa/installer {installer.__version__} is imported, but its installed metadata "
            f"says {dist.version}",
            hint=hint,
        )
    files: dict[str, str] = {}
    for entry in dist.files or ():
        name = entry.as_posix()
        if not (name.startswith("installer/") and name.endswith(".py")):
            continue
        try:
            data = entry.read_binary()
            text = data.decode("utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise MissingError(
                f"pypa/installer's {name} could not be read: {err}", hint=hint
            ) from err
        if entry.hash is None or entry.hash.mode != "sha256" or entry.hash.value != _urlsafe(data):
            raise MissingError(
                f"pypa/installer's {name} is not the file its RECORD names", hint=hint
            )
        files[f"build/pypa/{name}"] = text
    if "build/pypa/installer/__init__.py" not in files:
        raise MissingError("pypa/installer's source was not found beside reprobox", hint=hint)
    return files


def _urlsafe(data: bytes) -> str:
    return base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()


def _inputs_sha256(out: Path, files: Mapping[str, str], plan: Mapping[str, str]) -> str:
    """What the context written at `out` holds, as one digest: two contexts with the same
    digest give `docker build` the same input. Each entry's kind and mode as written (COPY
    keeps them; a umask or a default ACL sets them), each file's bytes (`files`), each wheel's
    verified sha256 (`plan`). Paths were checked when the context was planned: no NUL, no
    newline. A hard-linked wheel's mode is the cache's; it reaches no image."""
    digest = hashlib.sha256(b"reprobox context 2\n")
    for path in sorted(out.rglob("*")):
        relative = path.relative_to(out).as_posix()
        st = path.lstat()
        kind = (
            "dir" if stat.S_ISDIR(st.st_mode) else "file" if stat.S_ISREG(st.st_mode) else "other"
        )
        if relative in files:
            content = hashlib.sha256(files[relative].encode("utf-8")).hexdigest()
        elif relative in plan:
            content = plan[relative]
        elif kind == "file":  # none is written today; hashed all the same
            content = hashlib.sha256(path.read_bytes()).hexdigest()
        else:
            content = "-"
        digest.update(f"{kind} {stat.S_IMODE(st.st_mode):o} {relative}\0{content}\n".encode())
    return digest.hexdigest()


@dataclass(frozen=True)
class RenderResult:
    """`reprobox render`: where the context was written, its default tag, the lock it used."""

    context: Path
    tag: str
    lock: Path
    #: `determinism.cpu`: portable (x86-64-v3 code paths pinned) or native.
    cpu: str


def render_spec(
    ctx: Context,
    spec_path: Path,
    out: Path,
    *,
    lock_path: Path | None,
    relock: bool,
    wheels: bool,
    refetch: bool,
) -> RenderResult:
    """The render stage on its own: the build context in `out`, without building."""
    check_output_dir(out)  # before the lock is written: bad input changes nothing on disk
    if wheels:
        ctx.cache.usable()
    spec, locked = locked_spec(ctx, spec_path, lock_path, relock=relock)
    files = fetch_locked(ctx, locked.lock, refetch=refetch) if wheels else None
    # Without an engine the bootstrapped base has no ID yet: name it; `build` uses the ID.
    base_ref = spec.base.image or f"reprobox/base:{spec.base.suite}"
    with ctx.reporter.stage(f"render {out}"):
        rendered = render_context(spec, locked, out, base_ref=base_ref, wheels=files)
    return RenderResult(
        rendered.path,
        rendered.tag,
        lock_path or default_lock_path(spec_path),
        spec.determinism.cpu,
    )


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
