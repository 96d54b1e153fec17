"""Bootstrap Debian base images with mmdebstrap, written as a reproducible image archive.

`docker import` stamps the clock into the image config, so reprobox writes the docker-archive itself:
one layer normalised (sorted entries, clamped mtimes, numeric owners, no host files), a config with
fixed times, then `docker load`. The image ID is then a function of the suite, the package versions
and the architecture alone, and a base already in the engine is reused: only one this host made,
recorded by image ID (in `<cache>/bases/trusted-bases.json`) when it was loaded. Labels
alone prove nothing: anyone can `docker load` an image that carries them.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import subprocess
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from reprobox._files import rfc3339, write_text_atomic
from reprobox.archive import add_image, add_layer, write_normalized_layer
from reprobox.context import Context
from reprobox.engine import Engine, ImageInfo
from reprobox.errors import BadInputError, BuildError, EngineError
from reprobox.identity import loaded_as
from reprobox.labels import BASE_PREFIX, OCI_CREATED

__all__ = [
    "ALWAYS_INCLUDED",
    "BASE_FORMAT",
    "DEFAULT_MIRROR",
    "DEFAULT_SOURCE_DATE_EPOCH",
    "BaseImage",
    "Runner",
    "base_key",
    "bootstrap_base",
    "run_command",
    "write_base_archive",
]

#: Bump when the archive layout or the mmdebstrap options change: it is part of every base key.
BASE_FORMAT = 1
DEFAULT_MIRROR = "http://deb.debian.org/debian"
#: 2023-06-10T00:00:00Z, Debian 12's release day. Any fixed instant would do; the clock would not.
DEFAULT_SOURCE_DATE_EPOCH = 1686355200
#: What every reprobox image needs from its base: python3 and the venv module.
ALWAYS_INCLUDED = ("python3", "python3-venv")

_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_ENV = [f"PATH={_PATH}", "LANG=C.UTF-8"]
_CMD = ["/bin/bash"]
# Engine architecture (Go's names) -> Debian's.
_DPKG_ARCH = {
    "amd64": "amd64",
    "arm64": "arm64",
    "arm": "armhf",
    "386": "i386",
    "ppc64le": "ppc64el",
    "s390x": "s390x",
    "riscv64": "riscv64",
}
_PACKAGE = re.compile(r"[a-z0-9][a-z0-9+.-]+(=[A-Za-z0-9.+~:-]+)?")
_SUITE = re.compile(r"[a-z][a-z0-9-]*")
_HOOKS = Path("/usr/share/mmdebstrap/hooks")
# What Debian's slim images leave out as well; the rules stay in the image's dpkg configuration, so
# packages installed later (a spec's `apt:`) follow them too. Copyright files stay.
_SLIM = (
    "path-exclude=/usr/share/man/*",
    "path-exclude=/usr/share/locale/*",
    "path-include=/usr/share/locale/locale.alias",
    "path-exclude=/usr/share/doc/*",
    "path-include=/usr/share/doc/*/copyright",
)
# mmdebstrap copies these from the build host; the engine mounts its own over them at run time.
_HOST_FILES = {"etc/hostname": b"", "etc/resolv.conf": b""}
_TAIL_LINES = 20
# The record of bases this host made: base key -> image IDs, newest last.
_TRUSTED = "trusted-bases.json"
#: In that record: engine ID -> config digest, where the two differ (the containerd image store).
_CONFIGS = "configs"
_TRUSTED_PER_KEY = 8
_IMAGE_ID = re.compile(r"sha256:[0-9a-f]{64}")

#: Runs argv with extra environment, feeding each output line to the callback; returns the status.
Runner = Callable[[Sequence[str], Mapping[str, str], Callable[[str], None]], int]


@dataclass(frozen=True)
class BaseImage:
    """A bootstrapped base in the engine; `installed` lists every Debian package as name=version."""

    image_id: str
    ref: str
    suite: str
    packages: tuple[str, ...]
    key: str
    installed: tuple[str, ...]
    reused: bool
    #: Its config digest: what images built on it record (`image_id` is what the engine shows,
    #: the manifest digest on the containerd image store).
    config_id: str = ""


def base_key(
    suite: str,
    packages: Sequence[str],
    arch: str,
    *,
    mirror: str = DEFAULT_MIRROR,
    source_date_epoch: int = DEFAULT_SOURCE_DATE_EPOCH,
) -> str:
    """The sha256 naming a base: what was asked for, not what the mirror happened to serve."""
    asked = {
        "format": BASE_FORMAT,
        "suite": suite,
        "packages": sorted(set(packages)),
        "arch": arch,
        "mirror": mirror,
        "source_date_epoch": source_date_epoch,
        "options": _options(arch, packages),
    }
    return hashlib.sha256(json.dumps(asked, sort_keys=True).encode()).hexdigest()


def run_command(argv: Sequence[str], env: Mapping[str, str], on_line: Callable[[str], None]) -> int:
    """Run a tool found on PATH, streaming its merged output line by line."""
    if shutil.which(argv[0]) is None:
        raise EngineError(
            f"{argv[0]} is not installed; reprobox needs it to bootstrap a Debian base",
            hint=f"`apt-get install {argv[0]}` (or `make setup`), or use `base.image` instead",
        )
    with subprocess.Popen(
        argv,
        env={**os.environ, **env},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
    ) as proc:
        assert proc.stdout is not None  # stdout=PIPE
        for line in proc.stdout:
            on_line(line.rstrip("\n"))
        return proc.wait()


def bootstrap_base(
    ctx: Context,
    suite: str,
    packages: Sequence[str],
    *,
    mirror: str = DEFAULT_MIRROR,
    source_date_epoch: int = DEFAULT_SOURCE_DATE_EPOCH,
    runner: Runner = run_command,
) -> BaseImage:
    """The base for `suite` (e.g. "bookworm") plus `packages`, reused when the engine has it.

    The cache's `bases` folder is scratch space for the root filesystem and the archive (about
    twice the base's size while it runs, emptied afterwards); it also keeps the record of the
    bases made here, the only ones reused.
    """
    _validate(suite, packages)
    wanted = tuple(sorted(set(packages)))
    arch = ctx.engine_info().arch
    key = base_key(suite, wanted, arch, mirror=mirror, source_date_epoch=source_date_epoch)
    ref = f"reprobox/base:{suite}-{key[:12]}"
    found = _find(ctx.engine, key, ref, ctx.cache.bases)
    if found is not None:
        return found
    if arch not in _DPKG_ARCH:
        raise EngineError(f"the engine runs on {arch!r}: reprobox cannot bootstrap Debian for it")
    labels = {
        f"{BASE_PREFIX}format": str(BASE_FORMAT),
        f"{BASE_PREFIX}key": key,
        f"{BASE_PREFIX}mirror": mirror,
        f"{BASE_PREFIX}packages": ",".join(wanted),
        f"{BASE_PREFIX}suite": suite,
    }
    command = ["mmdebstrap", *_options(arch, wanted), suite]
    image_id, config_id, installed = _make(
        ctx,
        command,
        mirror=mirror,
        labels=labels,
        ref=ref,
        source_date_epoch=source_date_epoch,
        runner=runner,
    )
    _trust(ctx.cache.bases, key, image_id, config_id)
    return BaseImage(
        image_id, ref, suite, wanted, key, installed, reused=False, config_id=config_id
    )


def _make(
    ctx: Context,
    command: list[str],
    *,
    mirror: str,
    labels: Mapping[str, str],
    ref: str,
    source_date_epoch: int,
    runner: Runner,
) -> tuple[str, str, tuple[str, ...]]:
    """Run mmdebstrap, write its root filesystem as an image archive, and load it; the ID the
    engine shows, the config digest, and the installed packages."""
    on_line = ctx.reporter.detail
    ctx.cache.bases.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="base-", dir=ctx.cache.bases) as work:
        rootfs, archive = Path(work) / "rootfs.tar", Path(work) / "image.tar"
        tail: deque[str] = deque(maxlen=_TAIL_LINES)

        def line(text: str) -> None:
            tail.append(text)
            on_line(text)

        env = {"SOURCE_DATE_EPOCH": str(source_date_epoch)}
        if runner([*command, str(rootfs), mirror], env, line) != 0:
            raise BuildError(
                f"mmdebstrap could not make the {command[-1]} base",
                step=" ".join([*command, "OUT.tar", mirror]),
                log_tail="\n".join(tail),
                hint=f"check the package names and that {mirror} answers",
            )
        on_line(f"writing the image archive for {ref}")
        image_id, installed = write_base_archive(
            rootfs,
            archive,
            arch=ctx.engine_info().arch,
            labels=labels,
            ref=ref,
            source_date_epoch=source_date_epoch,
            created_by=" ".join([*command, mirror]),
        )
        on_line(f"loading {ref} into the engine")
        loaded = ctx.engine.load(archive)
        shown = loaded_as(archive, image_id, loaded, ref)
    return shown, image_id, installed


def _options(arch: str, packages: Sequence[str]) -> list[str]:
    """mmdebstrap's options for a base: part of its key, so that changing them makes a new base."""
    included = ",".join((*ALWAYS_INCLUDED, *sorted(set(packages))))
    options = ["--variant=minbase", f"--architectures={_DPKG_ARCH.get(arch, arch)}"]
    options += ["--format=tar", f"--include={included}"]
    hook = _HOOKS / "maybe-merged-usr"
    if hook.is_dir():
        # Merges /usr as debootstrap does; otherwise bookworm pulls in usrmerge, and perl with it.
        options.append(f"--hook-dir={hook}")
    return options + [f"--dpkgopt={rule}" for rule in _SLIM]


def write_base_archive(
    rootfs: Path,
    dest: Path,
    *,
    arch: str,
    labels: Mapping[str, str],
    ref: str,
    source_date_epoch: int,
    created_by: str,
) -> tuple[str, tuple[str, ...]]:
    """Write a one-layer docker-archive of `rootfs`; its image ID and installed packages."""
    layer = dest.with_name(dest.name + ".layer")
    diff_id = write_normalized_layer(
        rootfs,
        layer,
        source_date_epoch=source_date_epoch,
        replace=_HOST_FILES,
        drop=lambda name: name.startswith("dev/"),  # the engine mounts its own /dev
    )
    with tarfile.open(layer) as tar:
        installed = _installed(_member_bytes(tar, "var/lib/dpkg/status"))
    created = rfc3339(source_date_epoch)
    config = {
        "architecture": arch,
        "config": {
            "Cmd": _CMD,
            "Env": _ENV,
            "Labels": {
                **labels,
                f"{BASE_PREFIX}installed": ",".join(installed),
                OCI_CREATED: created,
            },
        },
        "created": created,
        "history": [{"created": created, "created_by": created_by}],
        "os": "linux",
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
    }
    config_bytes = json.dumps(config, sort_keys=True, separators=(",", ":")).encode()
    with tarfile.open(dest, "w", format=tarfile.PAX_FORMAT) as archive:
        with layer.open("rb") as data:
            add_layer(archive, diff_id, data, source_date_epoch)
        image_id = add_image(archive, config_bytes, [diff_id], source_date_epoch, repo_tags=[ref])
    layer.unlink()
    return image_id, installed


def _member_bytes(tar: tarfile.TarFile, name: str) -> bytes:
    try:
        member = tar.extractfile(name)
    except KeyError:
        member = None
    if member is None:
        raise BadInputError(f"the root filesystem has no {name}: is it a Debian system?")
    return member.read()


def _installed(status: bytes) -> tuple[str, ...]:
    """name=version of every installed package in a dpkg status file, sorted."""
    found = []
    for stanza in status.decode("utf-8", errors="replace").split("\n\n"):
        fields = dict(
            line.split(": ", 1) for line in stanza.splitlines() if ": " in line and line[0] != " "
        )
        if fields.get("Status", "").endswith(" installed") and "Package" in fields:
            found.append(f"{fields['Package']}={fields.get('Version', '')}")
    return tuple(sorted(found))


def _trusted(cache_dir: Path, key: str) -> list[str]:
    """The image IDs this host recorded for `key`, newest first; a corrupt record trusts none."""
    try:
        record = json.loads((cache_dir / _TRUSTED).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return []
    ids = record.get(key) if isinstance(record, dict) else None
    if not isinstance(ids, list):
        return []
    return [i for i in reversed(ids) if isinstance(i, str) and _IMAGE_ID.fullmatch(i)]


def _config_of(cache_dir: Path, image_id: str) -> str | None:
    """The config digest recorded for an engine ID unlike it (the containerd image store)."""
    try:
        record = json.loads((cache_dir / _TRUSTED).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    configs = record.get(_CONFIGS) if isinstance(record, dict) else None
    found = configs.get(image_id) if isinstance(configs, dict) else None
    return found if isinstance(found, str) and _IMAGE_ID.fullmatch(found) else None


def _trust(cache_dir: Path, key: str, image_id: str, config_id: str) -> None:
    """Record that this host made `image_id` (config digest `config_id`) for `key`: locked, then
    written atomically."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    with (cache_dir / f".{_TRUSTED}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            record = json.loads((cache_dir / _TRUSTED).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError):
            record = {}
        if not isinstance(record, dict):
            record = {}
        ids = [i for i in record.get(key) or [] if i != image_id] + [image_id]
        record[key] = ids[-_TRUSTED_PER_KEY:]
        if config_id != image_id:  # the containerd image store: the engine cannot tell it later
            configs = record.get(_CONFIGS)
            record[_CONFIGS] = {
                **(configs if isinstance(configs, dict) else {}),
                image_id: config_id,
            }
        write_text_atomic(cache_dir / _TRUSTED, json.dumps(record, sort_keys=True, indent=1))


def _find(engine: Engine, key: str, ref: str, cache_dir: Path) -> BaseImage | None:
    """The base with this key if this host made it and the engine still holds it.

    Only image IDs recorded when this host loaded a base count; an image that merely carries
    the labels (an imported archive, a pulled image) is never taken for the base.
    """
    for image_id in _trusted(cache_dir, key):
        if not engine.image_exists(image_id):
            continue
        info = engine.inspect_image(image_id)
        labels = info.labels
        if info.id == image_id and _is_base(info) and labels.get(f"{BASE_PREFIX}key") == key:
            config_id = _config_of(cache_dir, image_id) or image_id
            engine.tag(image_id, ref)  # the tag keeps `docker image prune` off it
            return BaseImage(
                image_id=image_id,
                ref=ref,
                suite=labels[f"{BASE_PREFIX}suite"],
                packages=tuple(p for p in labels[f"{BASE_PREFIX}packages"].split(",") if p),
                key=key,
                installed=tuple(labels[f"{BASE_PREFIX}installed"].split(",")),
                reused=True,
                config_id=config_id,
            )
    return None


def _is_base(info: ImageInfo) -> bool:
    """One layer, and exactly the config we write: not an image built FROM the base.

    A step that changes no file (`RUN true`) adds no layer and inherits every label, so the
    layer count and labels alone cannot tell; the pinned creation time and the absence of a
    parent can, since the builder stamps the clock and records the parent on what it makes.
    """
    labels = info.labels
    ours = {
        f"{BASE_PREFIX}{n}" for n in ("format", "installed", "key", "mirror", "packages", "suite")
    }
    return (
        not info.parent
        and info.created == labels.get(OCI_CREATED)
        and len(info.diff_ids) == 1
        and set(labels) == {*ours, OCI_CREATED}
        and info.env == tuple(_ENV)
        and info.cmd == tuple(_CMD)
    )


def _validate(suite: str, packages: Sequence[str]) -> None:
    if not _SUITE.fullmatch(suite):
        raise BadInputError(
            f"{suite!r} is not a Debian suite name",
            hint="use a codename such as bookworm or trixie (without the `debian:` prefix)",
        )
    bad = [p for p in packages if not _PACKAGE.fullmatch(p)]
    if bad:
        raise BadInputError(
            f"not Debian package names: {', '.join(map(repr, bad))}",
            hint="write `name` or `name=version`, e.g. `libgomp1` or `libgomp1=12.2.0-14`",
        )
