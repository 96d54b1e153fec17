"""The assemble stage (`reprobox build --assemble`): the image written by reprobox, not built.

No `docker build`, no `docker save`, no normalising pass: the layers are born normalised.

| layer | what | made by |
| --- | --- | --- |
| the base's | as the recipe's FROM | the base stage |
| 1 | /opt/venv: the venv skeleton, torch and its closure, their pycs | `pylayer` (+ one compile container) |
| 2 | /opt/venv: every other locked wheel (pip included), their pycs | `pylayer` (+ one compile container) |
| 3 | /opt/reprobox: hook, self-check, spec, lock, the user's script | this host |
| 4 | the hook installed into the base's Python (what `reprobox_hook.py install` changes) | one container, its changes read back |

Every layer is in the normaliser's order, and reprobox writes the config that a `docker build`
of the recipe gets once normalised (the base's, with the image's ENV, labels and the recipe's
history, all times at SOURCE_DATE_EPOCH): both routes give one image ID. It streams one
`docker load`. The content ID is the sha256 of the config bytes, known before the load and
checked after it. Layers 1, 2 and 4 are kept under the cache by the hash of their inputs
(`layer_cache`, bounded); a small pin change rewrites layer 2 only and sends the engine only the
layers it lacks. `--no-cache` ignores them and gives the same bytes.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import shutil
import tarfile
import tempfile
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import Executor, Future, ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from importlib.metadata import version
from pathlib import Path
from typing import IO, Any, cast

from reprobox._files import CHUNK, HashingWriter, rfc3339, write_text_atomic
from reprobox.archive import index_members, manifest_entries, member_stream, read_image
from reprobox.context import Context
from reprobox.errors import BadInputError, EngineError
from reprobox.identity import manifest_digest
from reprobox.layer_cache import LIMIT_ENV, LayerCache
from reprobox.layer_tar import Layer, archive_stream
from reprobox.locked import LockedWheel
from reprobox.lockfile import LockFile
from reprobox.normalize import NormalizedImage, held_chains, normalize_config
from reprobox.opt_layers import files_layer, hook_layer
from reprobox.pylayer import VENV, LayerJob, TargetPython, probe_target, python_layers
from reprobox.render import RenderedContext
from reprobox.spec import Spec

__all__ = [
    "Assembled",
    "assemble",
    "load_assembled",
    "recipe_history",
    "recipe_only",
    "refuse_unsupported",
]

#: Bumped whenever the bytes a layer is made of could change: it is part of every layer key.
FORMAT = "assemble-3"
_HOOK_FILES = ("reprobox_hook.py", "reprobox_cpu.py")


@dataclass(frozen=True)
class Assembled:
    """An image written but not yet loaded: its config, the base's layers and the new ones."""

    config: bytes
    base_diff_ids: tuple[str, ...]
    layers: tuple[Layer, ...]
    epoch: int
    #: The base as the engine names it, and where its config (and layers) are kept.
    base_ref: str
    base_dir: Path

    @property
    def content_id(self) -> str:
        """The config digest: what the lock records and the classic store shows."""
        return "sha256:" + hashlib.sha256(self.config).hexdigest()

    @property
    def diff_ids(self) -> tuple[str, ...]:
        return (*self.base_diff_ids, *(layer.diff_id for layer in self.layers))

    def normalized(self) -> NormalizedImage:
        """The loaded image as the later stages (self-check, labels) take it."""
        return NormalizedImage(
            image_id=self.content_id,
            source_id=self.content_id,
            diff_ids=self.diff_ids,
            source_date_epoch=self.epoch,
            removed=(),
            config=self.config,
        )


def _key(*parts: object) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def assemble(
    ctx: Context,
    spec: Spec,
    locked: LockFile,
    rendered: RenderedContext,
    files: Mapping[str, Path],
    *,
    labels: Mapping[str, str],
    nocache: bool,
    cache_limit: int,
) -> Assembled:
    """Write every layer above the base (or take it from the cache) and the config; then
    bound the layer cache to `cache_limit` bytes (this build's layers stay).

    `build` has called `refuse_unsupported(spec)` and read the limit before locking.
    """
    base = rendered.base_ref
    root = ctx.cache.root / "assemble"
    # Kept by the engine's ID of the base; layer keys use its config digest, the same on
    # every engine, so that engines share the layer cache.
    base_dir = root / "bases" / ctx.engine.inspect_image(base).id.removeprefix("sha256:")
    base_config, base_id = _base_config(ctx, base, base_dir)
    cache = LayerCache(root / "layers", enabled=not nocache)
    epoch = rendered.source_date_epoch
    with ctx.reporter.stage("the base's python3 (venv paths)"):
        target = probe_target(ctx.engine, base, base_dir, fresh=nocache)
    lock = locked.lock
    if target.version != lock.python:
        raise BadInputError(
            f"the base's python3 is {target.version}; the lock is for Python {lock.python}",
            hint="set `python:` to the base's version, or choose a base with that Python",
        )
    base_diff_ids = _base_diff_ids(base_config)
    writing = _Writing(
        ctx=ctx, cache=cache, base=base, target=target, files=files, epoch=epoch, base_id=base_id
    )
    torch_wheels = [w for w in lock.wheels if w.group == "torch"]
    rest_wheels = [w for w in lock.wheels if w.group in {"rest", "installer"}]
    # The hook's container runs while the Python layers are written: it needs none of them.
    hook: _PendingHook | None = None
    try:
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="hook") as pool:
            hook = writing.hook_layer(pool, rendered.path / "image")
            try:
                layers = [
                    *writing.python_layers({"torch": torch_wheels, "rest": rest_wheels}),
                    # Written beside the rendered context (a temporary folder): it changes
                    # with every lock.
                    files_layer(rendered.path / "image", rendered.path.parent / "files.tar", epoch),
                    hook.result(),
                ]
            except BaseException:
                hook.stop.set()  # its container is removed within a second
                raise
    except BaseException:
        if hook is not None:
            hook.discard()  # the pool is joined: nothing writes its file any more
        raise
    pruned = cache.prune(cache_limit, in_use=[layer.path for layer in layers])
    if pruned.entries:
        ctx.reporter.note(
            f"removed {pruned.entries} least recently used layers ({pruned.freed / 1e9:.1f} GB) "
            f"from the layer cache; it keeps {pruned.kept / 1e9:.1f} GB (limit "
            f"{cache_limit / 1e9:g} GB, {LIMIT_ENV})"
        )
    config = _config(
        base_config,
        rendered,
        labels,
        [*base_diff_ids, *(layer.diff_id for layer in layers)],
        recipe_history(rendered, labels),
    )
    return Assembled(config, base_diff_ids, tuple(layers), epoch, base, base_dir)


@dataclass
class _Writing:
    """The layers above the base, each written once (or taken from the cache by its key)."""

    ctx: Context
    cache: LayerCache
    base: str
    target: TargetPython
    files: Mapping[str, Path]
    epoch: int
    base_id: str

    def python_layers(self, groups: Mapping[str, Sequence[LockedWheel]]) -> list[Layer]:
        """The venv layer of each group, in order (the first, "torch", is the bottom one and
        holds the venv's skeleton): taken from the cache, or written (all missing ones at once,
        with one compile container)."""
        keys: dict[str, str] = {}
        found: dict[str, Layer] = {}
        for index, (group, wheels) in enumerate(groups.items()):
            keys[group] = _key(
                FORMAT,
                self.base_id,
                _target_key(self.target),
                group,
                index == 0,
                self.epoch,
                version("installer"),
                sorted((w.name, w.filename, w.sha256) for w in wheels),
            )
            layer = self.cache.get(keys[group])
            if layer is not None:
                self.ctx.reporter.note(f"{group} layer {layer.diff_id[:19]} from the cache")
                found[group] = layer
        missing = [(i, group) for i, group in enumerate(groups) if group not in found]
        if missing:
            names = " and ".join(group for _, group in missing)
            count = sum(len(groups[group]) for _, group in missing)
            noun = "layer" if len(missing) == 1 else "layers"
            jobs = [
                LayerJob(groups[group], self.cache.scratch(group), bottom=index == 0)
                for index, group in missing
            ]
            with self.ctx.reporter.stage(f"write the {names} {noun} ({count} wheels, pycs)"):
                written = python_layers(
                    self.ctx.engine, self.base, self.target, jobs, self.files, epoch=self.epoch
                )
                for (_, group), layer in zip(missing, written, strict=True):
                    found[group] = self.cache.put(keys[group], layer)
        return [found[group] for group in groups]

    def hook_layer(self, pool: Executor, image_dir: Path) -> _PendingHook:
        """The hook's install copies itself and its CPU facts module into the base's stdlib.

        Started on `pool` when it is not in the cache: the Python layers need nothing of it.
        """
        hook_files = [image_dir / name for name in _HOOK_FILES]
        key = _key(FORMAT, self.base_id, "hook", self.epoch, [_sha256(p) for p in hook_files])
        kept = self.cache.get(key)
        if kept is not None:
            return _PendingHook(self, key, kept)
        dest, stop = self.cache.scratch("hook"), threading.Event()
        making = pool.submit(
            hook_layer, self.ctx, self.base, hook_files, dest, self.epoch, cancel=stop
        )
        return _PendingHook(self, key, making, dest, stop)


@dataclass
class _PendingHook:
    """The hook layer: kept, or being made on another thread."""

    writing: _Writing
    key: str
    layer: Layer | Future[Layer]
    dest: Path | None = None
    #: Set when the build fails: the hook's container is then removed within a second.
    stop: threading.Event = field(default_factory=threading.Event)

    def result(self) -> Layer:
        """The layer, kept in the cache (waited for when it is being made)."""
        if isinstance(self.layer, Layer):
            return self.layer
        with self.writing.ctx.reporter.stage("install the hook (one container, run meanwhile)"):
            return self.writing.cache.put(self.key, self.layer.result())

    def discard(self) -> None:
        """The build failed (and the thread making the layer has ended): keep nothing of it."""
        if self.dest is not None:
            self.dest.unlink(missing_ok=True)


def recipe_only(spec: Spec) -> str | None:
    """Why this image is built from the recipe by default (a reason to print), or None: then
    assembling it gives the recipe's very image, and is the default.

    Only a bootstrapped base is assembled by default: reprobox wrote its config. A pinned
    `base.image` is someone else's, and the classic builder applies parts of it that the
    assembled route does not (its SHELL names every history line, ONBUILD triggers run at each
    FROM, the RUN step ignores its ENTRYPOINT, and it re-serialises the config), so there
    the two routes are not shown to give one image.
    """
    if spec.base.image is not None and spec.apt:
        return "`apt:` packages on a pinned `base.image` are installed by a RUN step"
    minor = int(spec.python.split(".")[1])  # the spec's check: "3." and digits
    if minor < 10:
        return (
            f"on Python {spec.python} the recipe installs with pip (pypa/installer needs 3.10), "
            "so an assembled image would differ from it"
        )
    if spec.base.image is not None:
        return (
            "a pinned `base.image` (its SHELL, ONBUILD, ENTRYPOINT and config are the "
            "builder's to apply; assembling gives the recipe's image on bootstrapped bases)"
        )
    return None


def refuse_unsupported(spec: Spec) -> None:
    """What `--assemble` cannot build yet: a BadInputError (exit 2) before any work."""
    if spec.base.image is not None and spec.apt:
        raise BadInputError(
            "`--assemble` does not install `apt:` packages on a pinned `base.image` yet",
            hint="build without `--assemble`, or bootstrap a Debian base (`base.bootstrap`)",
        )


def load_assembled(
    ctx: Context, assembled: Assembled, chains_from: Sequence[str]
) -> NormalizedImage:
    """Stream the image into the engine: on the classic store only the layers whose chain it
    lacks; on the containerd store every layer, the base's too (it takes none from its store).

    `chains_from` names images (earlier builds) whose layers the engine may hold; none, and
    every layer above the base is sent.
    """
    send: list[tuple[str, Path | None, int]]
    if ctx.engine_info().containerd_store:
        send = [*_base_layer_files(ctx, assembled.base_ref, assembled.base_dir)]
        send += [(layer.diff_id, layer.path, layer.size) for layer in assembled.layers]
        shown = manifest_digest(assembled.config, [(d, size) for d, _, size in send])
    else:
        have = held_chains(ctx.engine, chains_from)
        chain: list[str] = list(assembled.base_diff_ids)
        send = [(d, None, 0) for d in assembled.base_diff_ids]
        for layer in assembled.layers:
            chain.append(layer.diff_id)
            send.append((layer.diff_id, None if tuple(chain) in have else layer.path, layer.size))
        shown = assembled.content_id
    sent = sum(size for _, path, size in send if path is not None)
    with ctx.reporter.stage(f"load ({sent / 1e6:.1f} MB sent, one streamed archive)"):
        loaded = ctx.engine.load_stream(
            archive_stream(send, assembled.config, assembled.epoch), "the assembled image"
        )
    if loaded != [shown]:
        raise EngineError(
            f"the engine loaded {', '.join(loaded) or 'nothing'} for the assembled image "
            f"{assembled.content_id} (expected it as {shown})"
        )
    image = assembled.normalized()
    return image if shown == image.image_id else replace(image, engine_id=shown)


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _skeleton_digest(skeleton: Path) -> str:
    """What the venv skeleton holds, as the layer keeps it (names, kinds, links, modes, bytes),
    not the bytes of the engine's tar of it (its times and order are the engine's)."""
    entries = []
    with tarfile.open(skeleton) as tar:
        for member in tar:
            data = tar.extractfile(member) if member.isfile() else None
            content = hashlib.sha256(data.read()).hexdigest() if data is not None else ""
            entries.append(
                (member.name, member.type.decode(), member.linkname, member.mode & 0o111, content)
            )
    return _key(sorted(entries))


def _target_key(target: TargetPython) -> list[str]:
    return [
        target.purelib,
        target.platlib,
        target.scripts,
        target.data,
        target.version,
        target.cache_tag,
        _skeleton_digest(target.skeleton),
    ]


def _base_config(ctx: Context, base: str, cache: Path) -> tuple[dict[str, Any], str]:
    """The base's config and its digest (one `docker save`, then kept by the engine's ID)."""
    kept = cache / "base.json"
    if not kept.is_file():
        _save_base(ctx, base, cache)
    found: dict[str, Any] = json.loads(kept.read_text(encoding="utf-8"))
    return found["config"], str(found["digest"])


def _base_layer_files(ctx: Context, base: str, cache: Path) -> list[tuple[str, Path, int]]:
    """The base's layers as files on this host (the containerd store wants them sent)."""
    diff_ids = _base_diff_ids(_base_config(ctx, base, cache)[0])
    files = [cache / "layers" / f"{d.removeprefix('sha256:')}.tar" for d in diff_ids]
    if not all(path.is_file() for path in files):
        _save_base(ctx, base, cache)
    return [(d, path, path.stat().st_size) for d, path in zip(diff_ids, files, strict=True)]


def _save_base(ctx: Context, base: str, cache: Path) -> None:
    """Save the base once: its config (as JSON) and its layer tars, each checked by its diff ID."""
    (cache / "layers").mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        saved = Path(tmp) / "base.tar"
        ctx.engine.save([base], saved)
        try:
            with tarfile.open(saved) as tar:
                members = index_members(tar)
                entries = manifest_entries(tar, members)
                if len(entries) != 1:
                    raise EngineError(f"saving the base {base} gave {len(entries)} images")
                image = read_image(tar, members, entries[0])
                for name, diff_id in zip(image.layers, image.diff_ids, strict=True):
                    dest = cache / "layers" / f"{diff_id.removeprefix('sha256:')}.tar"
                    partial = Path(tmp) / "layer.tar"
                    stream = _uncompressed(member_stream(tar, members, name))
                    with stream as data, partial.open("wb") as out:
                        sink = HashingWriter(out)
                        shutil.copyfileobj(data, sink, CHUNK)
                    if f"sha256:{sink.hexdigest()}" != diff_id:
                        raise EngineError(
                            f"the saved base's layer {name} is not {diff_id}",
                            hint=_RECIPE_HINT,
                        )
                    partial.replace(dest)
        except (ValueError, tarfile.TarError, EOFError, OSError) as err:
            raise EngineError(
                f"the engine's save of the base {base} is not usable: {err}", hint=_RECIPE_HINT
            ) from err
        record = {"config": image.config, "digest": image.image_id}
        write_text_atomic(cache / "base.json", json.dumps(record, sort_keys=True))


#: A base whose saved layers reprobox cannot read (zstd on the containerd store) still builds
#: by the recipe, which only names the base in FROM.
_RECIPE_HINT = "`reprobox build --recipe` builds the same image with `docker build` of the recipe"


def _uncompressed(data: IO[bytes]) -> IO[bytes]:
    """A layer as its uncompressed tar: a store may save it gzip-compressed, as it was pulled."""
    head = data.read(2)
    data.seek(0)
    if head == b"\x1f\x8b":
        return cast(IO[bytes], gzip.GzipFile(fileobj=data, mode="rb"))
    return data


def _base_diff_ids(config: Mapping[str, Any]) -> tuple[str, ...]:
    return tuple(str(d) for d in (config.get("rootfs") or {}).get("diff_ids") or [])


#: The image's PATH (the recipe's ENV line).
_PATH = f"{VENV}/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
#: How the classic builder names a step that runs nothing (COPY, ENV, LABEL) in the history.
_NOP = "/bin/sh -c #(nop) "


def recipe_history(rendered: RenderedContext, labels: Mapping[str, str]) -> list[dict[str, Any]]:
    """The history entries above the base that a `docker build` of the recipe writes, as the
    normaliser keeps them (a COPY's source hash dropped): one per Dockerfile step after FROM,
    then one LABEL step per build label (sorted by key). The assembled config carries these lines,
    so that both routes give one config, and one image ID, for one spec and lock.

    The recipe's Dockerfile (templates/Dockerfile.j2) and this list change together:
    tests/test_assemble.py builds both and compares their IDs.
    """

    def step(word: str, pairs: Sequence[tuple[str, str]]) -> dict[str, Any]:
        text = " ".join(f"{key}={value}" for key, value in pairs)
        return {"created_by": f"{_NOP} {word} {text}", "empty_layer": True}

    return [
        {"created_by": f"{_NOP}COPY dir in {VENV} "},
        {"created_by": f"{_NOP}COPY dir in / "},
        {"created_by": f"{_NOP}COPY dir in /opt/reprobox/ "},
        {"created_by": "/bin/sh -c python3 /opt/reprobox/reprobox_hook.py install"},
        step("ENV", [("VIRTUAL_ENV", VENV), ("PATH", _PATH), *rendered.env]),
        step("LABEL", rendered.labels),
        # The builder adds one LABEL step per build label, sorted by key.
        *(step("LABEL", [(key, labels[key])]) for key in sorted(labels)),
    ]


def _config(
    base: Mapping[str, Any],
    rendered: RenderedContext,
    labels: Mapping[str, str],
    diff_ids: Sequence[str],
    history: Sequence[Mapping[str, Any]],
) -> bytes:
    """The image config: the base's, with the recipe's ENV, labels and history."""
    out: dict[str, Any] = json.loads(json.dumps(base))
    inner = out.get("config") or {}
    env: dict[str, str] = {}
    for item in inner.get("Env") or []:
        key, _, value = str(item).partition("=")
        env[key] = value
    env["VIRTUAL_ENV"] = VENV
    env["PATH"] = _PATH
    env.update(dict(rendered.env))
    inner["Env"] = [f"{key}={value}" for key, value in env.items()]
    inner["Labels"] = {**(inner.get("Labels") or {}), **dict(rendered.labels), **labels}
    out["config"] = inner
    created = rfc3339(rendered.source_date_epoch)
    out["history"] = [
        *(out.get("history") or []),
        *({**entry, "created": created} for entry in history),
    ]
    return normalize_config(out, diff_ids=diff_ids, source_date_epoch=rendered.source_date_epoch)
