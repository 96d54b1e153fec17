"""The container engine seam: the operations reprobox uses, and the typed values they return.

Stages read `ImageInfo` and `EngineInfo`, never an engine's own JSON: only the implementation
(`docker_engine.DockerEngine`, and `build_log` for its build stream) knows Docker's keys.
tests/fakes.py has a FakeEngine that follows the same protocol.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal, Protocol

__all__ = [
    "BuildEvent",
    "Change",
    "Engine",
    "EngineInfo",
    "FinishedContainer",
    "ImageInfo",
    "RegistrySettings",
    "RunResult",
]


@dataclass(frozen=True)
class RegistrySettings:
    """How the engine reaches registries: which it talks plain HTTP to."""

    #: Networks whose registries the engine reaches over plain HTTP (`insecure-registries`).
    insecure_cidrs: tuple[str, ...] = ()
    #: Registry -> whether the engine uses TLS for it, where the engine says so explicitly.
    secure: Mapping[str, bool] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineInfo:
    """Who answered: where, which versions, which platform, and how it stores images."""

    host: str
    server_version: str
    api_version: str
    os: str
    arch: str
    storage_driver: str = ""
    #: Images live in containerd's store (an image's ID is then its manifest digest).
    containerd_store: bool = False
    runtimes: tuple[str, ...] = ()
    registry: RegistrySettings = field(default_factory=RegistrySettings)
    #: Where the engine keeps its data, on the engine's host.
    root_dir: str = ""


@dataclass(frozen=True)
class ImageInfo:
    """What the engine says about one image; labels and the rest are someone else's input."""

    id: str
    tags: tuple[str, ...] = ()
    repo_digests: tuple[str, ...] = ()
    labels: Mapping[str, str] = field(default_factory=dict)
    env: tuple[str, ...] = ()
    cmd: tuple[str, ...] | None = None
    #: The layers' diff IDs, bottom first.
    diff_ids: tuple[str, ...] = ()
    created: str = ""
    parent: str = ""
    architecture: str = ""
    os: str = ""
    #: Bytes of its layers, as the engine counts them (0 where it does not say).
    size: int = 0


@dataclass(frozen=True)
class BuildEvent:
    """One step starting (`text` is its instruction) or one line of a step's output."""

    kind: Literal["step", "output"]
    step: int
    total: int
    text: str


@dataclass(frozen=True)
class RunResult:
    """What a finished container left: its exit status and its two output streams."""

    exit_code: int
    stdout: str
    stderr: str


@dataclass(frozen=True)
class Change:
    """A path a container added, changed or deleted, against its image."""

    kind: Literal["added", "changed", "deleted"]
    path: str


class FinishedContainer(Protocol):
    """A container that ran and exited, kept until the `with` block ends, to read files from."""

    result: RunResult

    def get_archive(self, path: str, dest: Path) -> None:
        """Write `path` (a file or a directory, recursively) as a tar to `dest`."""
        ...

    def changes(self) -> tuple[Change, ...]:
        """What the container changed against its image."""
        ...

    def stat(self, path: str) -> tuple[int, float]:
        """`path`'s mode bits and mtime (seconds) in the container."""
        ...


class Engine(Protocol):
    """What reprobox needs from a container engine, and nothing more."""

    def ping(self) -> EngineInfo:
        """Who answers; EngineError (exit 3) with what to do when nobody does."""
        ...

    def build(
        self,
        context_dir: Path,
        *,
        tag: str | None = None,
        nocache: bool = False,
        labels: Mapping[str, str] | None = None,
        on_event: Callable[[BuildEvent], None] | None = None,
    ) -> str:
        """Build `context_dir`; the image ID. `tag` is applied only once it succeeded."""
        ...

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
        """Run `argv` in a fresh container without network, wait, collect, remove it.

        `cpuset_cpus` ("0", "0-1") limits the CPUs it may use; `archive` is a tar stream
        unpacked at / before it starts (sent through the API, so remote engines work too).
        """
        ...

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
        """Run `argv` like `run` (no network), with `files` (a tar stream) unpacked at / first,
        and keep the exited container for the `with` block: its files can be read. Once
        `cancel` is set, the wait stops and the container is removed (ContainerCancelledError).
        Each path in `tmpfs` is an empty memory-backed folder while it runs (gone once it has
        exited: what is to be read must be written elsewhere)."""
        ...

    def load_stream(self, chunks: Iterable[bytes], what: str) -> list[str]:
        """`load`, from a docker-archive generated as it is sent (never written to disk)."""
        ...

    def inspect_image(self, ref: str) -> ImageInfo:
        """The image `ref` names; ImageNotFoundError (exit 2) when there is none."""
        ...

    def image_exists(self, ref: str) -> bool:
        """Whether the engine holds `ref` (a name, tag or ID)."""
        ...

    def tag(self, image_id: str, ref: str) -> None:
        """Point `ref` (`repo[:tag]`) at `image_id`."""
        ...

    def save(self, refs: Sequence[str], dest: Path) -> None:
        """Write `refs` into one docker-archive at `dest`."""
        ...

    def load(self, archive: Path) -> list[str]:
        """Load a docker-archive; the IDs of the images it held."""
        ...

    def push(
        self,
        repository: str,
        tag: str,
        auth_config: Mapping[str, str] | None = None,
        *,
        on_status: Callable[[str], None] | None = None,
    ) -> str:
        """Push `repository:tag`; the registry's manifest digest."""
        ...

    def pull(self, ref: str, auth_config: Mapping[str, str] | None = None) -> str:
        """Pull `ref`; the ID of the image it names."""
        ...
