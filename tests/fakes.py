"""Test doubles: `FakeEngine`, an in-memory `reprobox.engine.Engine` for unit tests.

Import it as `from fakes import FakeEngine` (pytest puts tests/ on sys.path). Images are docker
config dicts whose ID is the sha256 of their JSON, as in the real engine; builds replay the
Dockerfile through the real `BuildLog`, so step events and BuildErrors look like the real ones,
and give each RUN/COPY/ADD step a small real layer tar, so a built image can be saved,
normalised and loaded back as a real one is. LABEL and ENV lines reach the image's config.
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import shlex
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from dockerfile_parse import DockerfileParser

from reprobox.build_log import BuildLog
from reprobox.context import CacheLayout, Context
from reprobox.docker_engine import gpu_request_error
from reprobox.engine import (
    BuildEvent,
    Engine,
    EngineInfo,
    FinishedContainer,
    ImageInfo,
    RegistrySettings,
    RunResult,
)
from reprobox.errors import EngineError, ImageNotFoundError
from reprobox.identity import archive_engine_ids
from reprobox.progress import Reporter

__all__ = ["FakeEngine", "FakeRun", "config_id", "context"]

RunHandler = Callable[[str, Sequence[str], Mapping[str, str]], RunResult]


def config_id(config: Mapping[str, Any]) -> str:
    """The image ID of a config dict serialised canonically (as reprobox writes them)."""
    return _bytes_id(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())


@dataclass(frozen=True)
class FakeRun:
    """One container run: what ran, with which environment, and whether it asked for GPUs."""

    image: str
    argv: tuple[str, ...]
    env: dict[str, str]
    gpus: bool


@dataclass
class _Image:
    id: str
    config: dict[str, Any]
    tags: set[str] = field(default_factory=set)


class FakeEngine:
    """An in-memory engine: deterministic IDs, scripted build failures and container runs.

    `fail_on` maps an instruction substring to the output its (failing) step prints;
    `run_handler(image, argv, env)` answers `run` (default: exit 0, no output); `alive=False`
    makes every call raise EngineError (exit 3) as a missing engine would. `calls` records
    (method, argument) pairs for assertions, `runs` every container run with its GPU request.
    A run that asks for GPUs fails as the real engine's does unless `runtimes` lists `nvidia`.
    `add_image`, `remove_image` and `find_images` are the tests' own handles on its store, not
    part of the Engine protocol.
    """

    def __init__(
        self,
        *,
        alive: bool = True,
        arch: str = "amd64",
        fail_on: Mapping[str, str] | None = None,
        run_handler: RunHandler | None = None,
    ) -> None:
        self.alive = alive
        self.arch = arch
        self.fail_on = dict(fail_on or {})
        self.run_handler = run_handler
        self.images: dict[str, _Image] = {}
        #: Layer tars by diff ID: those builds made and archives brought.
        self.layers: dict[str, bytes] = {}
        self.calls: list[tuple[str, str]] = []
        self.pushed: dict[str, str] = {}
        self.runs: list[FakeRun] = []
        #: What `ping()` reports of the engine's settings; tests change them.
        self.runtimes: tuple[str, ...] = ("runc",)
        self.root_dir = "/var/lib/docker"
        #: Images in containerd's store (`ping` says so; IDs stay config digests in the fake).
        self.containerd_store = False
        self.registry_settings = RegistrySettings(insecure_cidrs=("127.0.0.0/8",))

    def _call(self, method: str, arg: str) -> None:
        self.calls.append((method, arg))
        if not self.alive:
            raise EngineError("no Docker Engine answers at fake://engine", hint="start it")

    def add_image(self, config: Mapping[str, Any], *tags: str, image_id: str | None = None) -> str:
        """Put an image (a docker config dict) into the engine, as `docker load` would."""
        copy: dict[str, Any] = json.loads(json.dumps(config))
        image = self.images.setdefault(
            image_id or config_id(copy), _Image(image_id or config_id(copy), copy)
        )
        for ref in tags:
            self.tag(image.id, ref)
        return image.id

    def _resolve(self, ref: str) -> _Image:
        for image in self.images.values():
            if ref in (image.id, image.id.removeprefix("sha256:")) or _full_ref(ref) in image.tags:
                return image
        raise ImageNotFoundError(f"inspecting {ref}: no such image in the fake engine")

    def ping(self) -> EngineInfo:
        """The fake's identity and settings, or EngineError when `alive` is False."""
        self._call("ping", "")
        return EngineInfo(
            "fake://engine",
            "20.10.24",
            "1.41",
            "linux",
            self.arch,
            storage_driver="overlayfs" if self.containerd_store else "overlay2",
            containerd_store=self.containerd_store,
            runtimes=self.runtimes,
            registry=self.registry_settings,
            root_dir=self.root_dir,
        )

    def build(
        self,
        context_dir: Path,
        *,
        tag: str | None = None,
        nocache: bool = False,
        labels: Mapping[str, str] | None = None,
        on_event: Callable[[BuildEvent], None] | None = None,
    ) -> str:
        """Replay the Dockerfile's steps through BuildLog; the ID hashes the whole context."""
        self._call("build", str(context_dir))
        steps = _instructions((context_dir / "Dockerfile").read_text())
        log = BuildLog(on_event)
        if not steps:
            log.fail("the Dockerfile has no instructions")
        config: dict[str, Any] = {}
        layers: list[str] = []
        for number, step in enumerate(steps, 1):
            log.feed({"stream": f"Step {number}/{len(steps)} : {step}\n"})
            if number == 1:
                config = self._from(step, log)
                layers = list(config.get("rootfs", {}).get("diff_ids", []))
            for needle, output in self.fail_on.items():
                if needle in step:
                    log.feed({"stream": output if output.endswith("\n") else output + "\n"})
                    log.feed({"error": f"The command '{step}' returned a non-zero code: 1"})
                    log.finish()  # raises the BuildError, as the real stream ends here
            if step.split()[0].upper() in {"RUN", "COPY", "ADD"}:
                data = _step_layer(number, f"{layers}{step}")
                self.layers[_bytes_id(data)] = data
                layers.append(_bytes_id(data))
        config["rootfs"] = {"type": "layers", "diff_ids": layers}
        settings = config.setdefault("config", {})
        parsed = DockerfileParser(fileobj=io.StringIO((context_dir / "Dockerfile").read_text()))
        if parsed.envs:
            settings["Env"] = [f"{k}={v}" for k, v in parsed.envs.items()]
        settings["Labels"] = {**(settings.get("Labels") or {}), **parsed.labels, **(labels or {})}
        config["context"] = _tree_digest(context_dir)
        log.feed({"aux": {"ID": self.add_image(config)}})
        image_id = log.finish()
        if tag is not None:
            self.tag(image_id, tag)
        return image_id

    def _from(self, step: str, log: BuildLog) -> dict[str, Any]:
        words = step.split()
        if len(words) < 2 or words[0].upper() != "FROM":
            log.fail("the first instruction must be FROM")
        if words[1] == "scratch":
            return {}
        if not self.image_exists(words[1]):
            log.fail(f"pull access denied for {words[1]}: no registry is reachable")
        config: dict[str, Any] = json.loads(json.dumps(self._resolve(words[1]).config))
        return config

    def run(
        self,
        image: str,
        argv: Sequence[str],
        *,
        env: Mapping[str, str] | None = None,
        timeout_s: float,
        gpus: bool = False,
        cpuset_cpus: str | None = None,
        archive: bytes | None = None,
    ) -> RunResult:
        """Answer with `run_handler` (default: exit 0, no output) for an image the fake holds."""
        self._call("run", shlex.join([image, *argv]))
        self._resolve(image)
        self.runs.append(FakeRun(image, tuple(argv), dict(env or {}), gpus))
        if gpus and "nvidia" not in self.runtimes:
            # What Docker Engine answers a device request when no runtime can serve it.
            said = 'could not select device driver "" with capabilities: [[gpu]]'
            error = gpu_request_error("fake://engine", said)
            assert error is not None
            raise error
        if self.run_handler is None:
            return RunResult(0, "", "")
        return self.run_handler(image, argv, dict(env or {}))

    def inspect_image(self, ref: str) -> ImageInfo:
        """The image as the real engine would describe it."""
        self._call("inspect_image", ref)
        image = self._resolve(ref)
        settings = image.config.get("config", {})
        cmd = settings.get("Cmd")
        return ImageInfo(
            id=image.id,
            tags=tuple(sorted(image.tags)),
            labels=dict(settings.get("Labels") or {}),
            env=tuple(settings.get("Env") or ()),
            cmd=None if cmd is None else tuple(cmd),
            diff_ids=tuple(image.config.get("rootfs", {}).get("diff_ids", [])),
            created=image.config.get("created", ""),
            architecture=image.config.get("architecture", self.arch),
            os=image.config.get("os", "linux"),
        )

    def image_exists(self, ref: str) -> bool:
        """Whether the fake holds `ref`."""
        self._call("image_exists", ref)
        try:
            self._resolve(ref)
        except ImageNotFoundError:
            return False
        return True

    def find_images(self, labels: Mapping[str, str]) -> list[str]:
        """IDs of the images that carry all of `labels`, sorted."""
        self._call("find_images", json.dumps(dict(labels), sort_keys=True))
        return sorted(
            image.id
            for image in self.images.values()
            if labels.items() <= (image.config.get("config", {}).get("Labels") or {}).items()
        )

    def tag(self, image_id: str, ref: str) -> None:
        """Move `ref` to `image_id`."""
        self._call("tag", f"{image_id} {ref}")
        target = self._resolve(image_id)
        for image in self.images.values():
            image.tags.discard(_full_ref(ref))
        target.tags.add(_full_ref(ref))

    def remove_image(self, ref: str, *, force: bool = False) -> None:
        """Untag `ref`; drop the image when it was named by ID or lost its last tag."""
        self._call("remove_image", ref)
        image = self._resolve(ref)
        image.tags.discard(_full_ref(ref))
        if not image.tags or ref.removeprefix("sha256:") in image.id:
            del self.images[image.id]

    def save(self, refs: Sequence[str], dest: Path) -> None:
        """A docker-archive of manifest, configs and the layers the fake holds (no layer at all
        for an image one of whose layers it lacks: a config made up by a test)."""
        self._call("save", " ".join(refs))
        manifest = []
        with tarfile.open(dest, "w") as archive:
            written: set[str] = set()
            for ref in refs:
                image = self._resolve(ref)
                name = image.id.removeprefix("sha256:") + ".json"
                _add_bytes(
                    archive,
                    name,
                    json.dumps(image.config, sort_keys=True, separators=(",", ":")).encode(),
                )
                diff_ids = list(image.config.get("rootfs", {}).get("diff_ids", []))
                held = all(d in self.layers for d in diff_ids)
                names = [d.removeprefix("sha256:") + "/layer.tar" for d in diff_ids] if held else []
                for diff_id, member in zip(diff_ids if held else [], names, strict=True):
                    if member not in written:
                        _add_bytes(archive, member, self.layers[diff_id])
                        written.add(member)
                manifest.append(
                    {"Config": name, "RepoTags": sorted(image.tags) or None, "Layers": names}
                )
            _add_bytes(archive, "manifest.json", json.dumps(manifest).encode())

    def load(self, archive: Path) -> list[str]:
        """Read a docker-archive's manifest, configs and layers; real archives too."""
        self._call("load", str(archive))
        ids = []
        # The containerd image store names a loaded image by its manifest's digest, and wants
        # every layer in the archive (it does not take one from its own store).
        shown = archive_engine_ids(archive) if self.containerd_store else {}
        with tarfile.open(archive) as tar:
            names = set(tar.getnames())
            for entry in json.loads(_member(tar, "manifest.json")):
                raw = _member(tar, entry["Config"])
                diff_ids = json.loads(raw).get("rootfs", {}).get("diff_ids") or []
                for number, layer in enumerate(entry.get("Layers") or []):
                    if layer in names:
                        data = _member(tar, layer)
                        self.layers.setdefault(_bytes_id(data), data)
                    elif self.containerd_store:
                        raise EngineError(f'failed to resolve layers: layer "{layer}" not found')
                    elif tuple(diff_ids[: number + 1]) not in self._chains():
                        # The classic store skips only a layer whose chain it holds.
                        raise EngineError(f"open {layer}: no such file or directory")
                tags = entry.get("RepoTags") or []
                image_id = shown.get(_bytes_id(raw), _bytes_id(raw))
                ids.append(self.add_image(json.loads(raw), *tags, image_id=image_id))
        return sorted(set(ids))

    def _chains(self) -> set[tuple[str, ...]]:
        """Every bottom-up prefix of diff IDs of the images held."""
        chains: set[tuple[str, ...]] = set()
        for image in self.images.values():
            diff_ids = image.config.get("rootfs", {}).get("diff_ids") or []
            chains.update(tuple(diff_ids[:end]) for end in range(1, len(diff_ids) + 1))
        return chains

    def load_stream(self, chunks: Iterable[bytes], what: str) -> list[str]:
        """`load` of an archive given as chunks (spooled to a temporary file first)."""
        with tempfile.TemporaryDirectory() as tmp:
            archive = Path(tmp) / "stream.tar"
            with archive.open("wb") as out:
                for chunk in chunks:
                    out.write(chunk)
            return self.load(archive)

    def run_kept(
        self,
        image: str,
        argv: Sequence[str],
        *,
        timeout_s: float,
        files: Iterable[bytes] | None = None,
        cancel: threading.Event | None = None,
        tmpfs: Sequence[str] = (),
    ) -> AbstractContextManager[FinishedContainer]:
        """Not faked: containers whose files are read run on a real engine only."""
        raise NotImplementedError("FakeEngine keeps no containers (use a real engine)")

    def push(
        self,
        repository: str,
        tag: str,
        auth_config: Mapping[str, str] | None = None,
        *,
        on_status: Callable[[str], None] | None = None,
    ) -> str:
        """Record the push; the digest is derived from the image ID."""
        self._call("push", f"{repository}:{tag}")
        image = self._resolve(f"{repository}:{tag}")
        digest = _bytes_id(f"manifest of {image.id}".encode())
        self.pushed[f"{repository}:{tag}"] = digest
        if on_status is not None:
            on_status(f"{tag}: digest: {digest}")
        return digest

    def pull(self, ref: str, auth_config: Mapping[str, str] | None = None) -> str:
        """Only what was pushed to the fake (or is held) can be pulled; its image ID."""
        self._call("pull", ref)
        if _full_ref(ref) not in self.pushed and not self.image_exists(ref):
            raise EngineError(f"pulling {ref}: the registry said: manifest unknown")
        return self._resolve(ref).id


def context(engine: Engine, cache_root: Path) -> Context:
    """A stage's context: `engine`, a cache under `cache_root`, progress on stderr."""
    return Context(engine, CacheLayout(cache_root), Reporter())


def _step_layer(number: int, text: str) -> bytes:
    """A layer tar as a build step leaves it: one file, the step's trace, at a build-time mtime."""
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w", format=tarfile.PAX_FORMAT) as tar:
        data = text.encode()
        info = tarfile.TarInfo(f"fake-build/step-{number}")
        info.size, info.mtime, info.uname = len(data), 1_800_000_000, "builder"
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _bytes_id(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _full_ref(ref: str) -> str:
    return ref if ":" in ref.rsplit("/", 1)[-1] else f"{ref}:latest"


def _instructions(dockerfile: str) -> list[str]:
    joined = re.sub(r"\\\n", " ", dockerfile)
    return [
        line.strip()
        for line in joined.splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    ]


def _tree_digest(root: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        digest.update(f"{path.relative_to(root).as_posix()}\0".encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def _add_bytes(archive: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    archive.addfile(info, io.BytesIO(data))


def _member(tar: tarfile.TarFile, name: str) -> bytes:
    member = tar.extractfile(name)
    if member is None:
        raise EngineError(f"{name} is missing from the image archive")
    return member.read()
