"""The container engine behind a small protocol; the only module that imports `docker`.

`DockerEngine` drives Docker Engine through the SDK's low-level client (created on first use, and
`docker` itself imported then, so importing this module stays cheap). `BuildLog` turns the build stream
into step events; tests/fakes.py has a FakeEngine that replays builds through it.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shlex
import socket
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NoReturn, Protocol

from reprobox.errors import EXIT_BAD_INPUT, EXIT_CHECK_FAILED, BuildError, EngineError

if TYPE_CHECKING:
    import docker

__all__ = [
    "BuildEvent",
    "BuildLog",
    "ContainerTimeoutError",
    "DockerEngine",
    "Engine",
    "EngineInfo",
    "GpuUnavailableError",
    "ImageNotFoundError",
    "RunResult",
    "gpu_request_error",
    "registry_auth",
]

_DEFAULT_HOST = "unix:///var/run/docker.sock"
_PING_TIMEOUT_S = 10
_TAIL_LINES = 20
_STEP = re.compile(r"^Step (\d+)/(\d+) : (.*)$")
_ANSI = re.compile(r"\x1b\[[0-9;]*m")  # the builder paints a step's stderr red
# The builder's own bookkeeping lines: shown as output, kept out of a failed step's tail.
_CHATTER = re.compile(r"^( ---> |Removing intermediate container |Successfully (built|tagged) )")
_NO_ENGINE_HINT = (
    "start a Docker Engine: on Debian or Ubuntu, as root, `make setup` installs docker.io and starts "
    "dockerd; elsewhere install Docker Engine (https://docs.docker.com/engine/install/) and start it, "
    "or point DOCKER_HOST at one that runs"
)


class ImageNotFoundError(EngineError):
    """The engine holds no image by that name or ID (bad input, not a missing engine)."""

    exit_code = EXIT_BAD_INPUT


class GpuUnavailableError(EngineError):
    """A container was to get a GPU and got none: no NVIDIA runtime, no GPU, a refused driver."""


_TOOLKIT_HINT = (
    "install the NVIDIA Container Toolkit, run `nvidia-ctk runtime configure --runtime=docker` "
    "and restart dockerd (`reprobox doctor SPEC` checks the driver and the runtime)"
)


def gpu_request_error(host: str, said: str) -> GpuUnavailableError | None:
    """The engine's refusal of a GPU request as the error a user can act on (None: not that)."""
    if "could not select device driver" in said:
        return GpuUnavailableError(
            f"the Docker Engine at {host} cannot give containers a GPU: it has no NVIDIA "
            f"runtime (it said: {said})",
            hint=_TOOLKIT_HINT,
        )
    if "nvidia-container-cli" in said or "unsatisfied condition" in said:
        hint = _TOOLKIT_HINT
        if "unsatisfied condition" in said:
            hint = "the driver is older than the image's NVIDIA_REQUIRE_CUDA allows: upgrade it"
        return GpuUnavailableError(
            f"the NVIDIA Container Toolkit on {host} refused to give the container a GPU: {said}",
            hint=hint,
        )
    return None


class ContainerTimeoutError(EngineError):
    """A container ran past its time limit and was stopped."""

    exit_code = EXIT_CHECK_FAILED


@dataclass(frozen=True)
class EngineInfo:
    """Who answered: where, which versions, which platform."""

    host: str
    server_version: str
    api_version: str
    os: str
    arch: str


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


class Engine(Protocol):
    """What reprobox needs from a container engine."""

    def ping(self) -> EngineInfo: ...

    def build(
        self,
        context_dir: Path,
        *,
        tag: str | None = None,
        nocache: bool = False,
        labels: Mapping[str, str] | None = None,
        buildargs: Mapping[str, str] | None = None,
        dockerfile: str = "Dockerfile",
        on_event: Callable[[BuildEvent], None] | None = None,
    ) -> str: ...

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
    ) -> RunResult: ...

    def inspect_image(self, ref: str) -> dict[str, Any]: ...

    def image_exists(self, ref: str) -> bool: ...

    def find_images(self, labels: Mapping[str, str]) -> list[str]: ...

    def tag(self, image_id: str, ref: str) -> None: ...

    def remove_image(self, ref: str, *, force: bool = False) -> None: ...

    def save(self, refs: Sequence[str], dest: Path) -> None: ...

    def load(self, archive: Path) -> list[str]: ...

    def push(
        self,
        repository: str,
        tag: str,
        auth_config: Mapping[str, str] | None = None,
        *,
        on_status: Callable[[str], None] | None = None,
    ) -> str: ...

    def pull(self, ref: str, auth_config: Mapping[str, str] | None = None) -> str: ...

    def info(self) -> dict[str, Any]: ...

    def add_labels(self, image_id: str, labels: Mapping[str, str]) -> str: ...


class BuildLog:
    """Turns the classic builder's JSON stream into step events, an image ID, or a BuildError."""

    def __init__(self, on_event: Callable[[BuildEvent], None] | None = None) -> None:
        self._on_event = on_event
        self._step = 0
        self._total = 0
        self._instruction = ""
        self._tail: deque[str] = deque(maxlen=_TAIL_LINES)
        self._partial = ""
        self._error: BuildError | None = None
        self.image_id: str | None = None

    def feed(self, chunk: Mapping[str, Any]) -> None:
        """Take one decoded message from the build stream (an error is raised by `finish`)."""
        if "stream" in chunk:
            self._text(str(chunk["stream"]))
        aux = chunk.get("aux")
        if isinstance(aux, dict) and isinstance(aux.get("ID"), str):
            self.image_id = aux["ID"]
        if "error" in chunk and self._error is None:
            # Kept, not raised: the caller reads the stream to its end, which frees the connection.
            self._flush()
            try:
                self.fail(str(chunk["error"]).strip())
            except BuildError as err:
                self._error = err

    def fail(self, error: str) -> NoReturn:
        """Raise the BuildError for `error`, naming the current step and its last lines."""
        if not self._step:
            raise BuildError(f"docker build failed: {error}", hint="fix the Dockerfile or context")
        raise BuildError(
            f"docker build failed at step {self._step}/{self._total}: {error}",
            step=self._instruction,
            log_tail="\n".join(self._tail),
            hint="fix the failing step; the last lines of its output are above",
        )

    def finish(self) -> str:
        """The built image's ID once the stream has ended; the BuildError if a step failed."""
        self._flush()
        if self._error is not None:
            raise self._error
        if self.image_id is None:
            self.fail("the engine reported no image ID")
        return self.image_id

    def _text(self, text: str) -> None:
        lines = (self._partial + text).split("\n")
        self._partial = lines.pop()
        for line in lines:
            self._line(line)

    def _flush(self) -> None:
        if self._partial:
            self._line(self._partial)
            self._partial = ""

    def _line(self, raw: str) -> None:
        line = _ANSI.sub("", raw).rstrip("\r")
        match = _STEP.match(line)
        if match:
            self._step, self._total = int(match[1]), int(match[2])
            self._instruction = match[3]
            self._tail.clear()
            self._emit(BuildEvent("step", self._step, self._total, self._instruction))
            return
        if not _CHATTER.match(line):
            self._tail.append(line)
        self._emit(BuildEvent("output", self._step, self._total, line))

    def _emit(self, event: BuildEvent) -> None:
        if self._on_event is not None:
            self._on_event(event)


def _no_engine(host: str, cause: object) -> EngineError:
    text = str(cause)
    if "Permission denied" in text or "PermissionError" in text:
        return EngineError(
            f"the Docker Engine at {host} refused this user (permission denied)",
            hint="run as root, or add this user to the `docker` group and log in again",
        )
    return EngineError(f"no Docker Engine answers at {host}", hint=_NO_ENGINE_HINT)


def _check_socket(host: str) -> None:
    """Knock on a unix socket first: clearer errors, and the SDK leaks the socket of a failed connect."""
    if not host.startswith("unix://"):
        return
    path = host.removeprefix("unix://")
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
        probe.settimeout(_PING_TIMEOUT_S)
        try:
            probe.connect(path)
        except FileNotFoundError:
            why = "no such socket"
        except ConnectionRefusedError:
            why = "the socket is there but nothing listens: is dockerd running?"
        except PermissionError as err:
            raise _no_engine(host, err) from None
        except OSError as err:
            why = err.strerror or str(err)
        else:
            return
    raise EngineError(f"no Docker Engine answers at {host} ({why})", hint=_NO_ENGINE_HINT)


class DockerEngine:
    """The real engine: Docker's low-level API client, made on first use."""

    def __init__(self, base_url: str | None = None, *, timeout_s: int = 900) -> None:
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._api: docker.APIClient | None = None

    def close(self) -> None:
        """Close the client's connections (a later call opens new ones)."""
        if self._api is not None:
            self._api.close()
            self._api = None

    @property
    def host(self) -> str:
        """The address this engine talks to."""
        return self._base_url or os.environ.get("DOCKER_HOST") or _DEFAULT_HOST

    def _client(self) -> docker.APIClient:
        if self._api is None:
            import docker  # here, not at the top: ~0.2 s that only engine commands should pay

            kwargs: dict[str, Any] = dict(docker.utils.kwargs_from_env())
            if self._base_url is not None:
                kwargs["base_url"] = self._base_url
            _check_socket(self.host)
            try:
                api = docker.APIClient(version="auto", timeout=_PING_TIMEOUT_S, **kwargs)
            except docker.errors.DockerException as err:
                raise _no_engine(self.host, err) from err
            api.timeout = self._timeout_s
            self._api = api
        return self._api

    @contextlib.contextmanager
    def _errors(self, doing: str) -> Iterator[None]:
        import docker.errors
        import requests

        try:
            yield
        except docker.errors.ImageNotFound as err:
            raise ImageNotFoundError(
                f"{doing}: no such image in the Docker Engine at {self.host}",
                hint="check the name or ID with `docker images`",
            ) from err
        except docker.errors.APIError as err:
            raise EngineError(f"{doing}: the Docker Engine said: {err.explanation or err}") from err
        except requests.exceptions.ConnectionError as err:
            raise _no_engine(self.host, err) from err

    def ping(self) -> EngineInfo:
        """Who answers at `host`; EngineError (exit 3) with what to do when nobody does."""
        api = self._client()
        with self._errors("asking the engine for its version"):
            version = api.version()
        return EngineInfo(
            host=self.host,
            server_version=str(version.get("Version", "")),
            api_version=str(version.get("ApiVersion", "")),
            os=str(version.get("Os", "")),
            arch=str(version.get("Arch", "")),
        )

    def build(
        self,
        context_dir: Path,
        *,
        tag: str | None = None,
        nocache: bool = False,
        labels: Mapping[str, str] | None = None,
        buildargs: Mapping[str, str] | None = None,
        dockerfile: str = "Dockerfile",
        on_event: Callable[[BuildEvent], None] | None = None,
    ) -> str:
        """Build `context_dir` and return the image ID; `tag` is applied only once it succeeded."""
        api = self._client()
        log = BuildLog(on_event)
        with self._build_errors(log):
            stream = api.build(
                path=str(context_dir),
                dockerfile=dockerfile,
                nocache=nocache,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
                labels=dict(labels) if labels else None,
                buildargs=dict(buildargs) if buildargs else None,
                timeout=None,  # a quiet RUN step may take long; the stream has no heartbeat
            )
            for chunk in stream:
                log.feed(chunk)
        image_id = log.finish()
        if tag is not None:
            self.tag(image_id, tag)
        return image_id

    @contextlib.contextmanager
    def _build_errors(self, log: BuildLog) -> Iterator[None]:
        import docker.errors

        with self._errors("building"):
            try:
                yield
            except docker.errors.APIError as err:
                # The classic builder answers a malformed Dockerfile or context with an HTTP error.
                if err.is_client_error() or err.is_server_error():
                    log.fail(str(err.explanation or err))
                raise

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
        import docker.types
        import requests

        api = self._client()
        doing = f"running `{shlex.join(argv)}` in {image}"
        requests_ = [docker.types.DeviceRequest(count=-1, capabilities=[["gpu"]])] if gpus else None
        with self._errors(doing), self._gpu_errors(gpus):
            container = api.create_container(
                image,
                command=list(argv),
                environment=dict(env or {}),
                network_disabled=True,
                host_config=api.create_host_config(
                    device_requests=requests_, cpuset_cpus=cpuset_cpus
                ),
            )
        cid = container["Id"]
        try:
            with self._errors(doing), self._gpu_errors(gpus):
                if archive is not None and not api.put_archive(cid, "/", archive):
                    raise EngineError(f"{doing}: the engine refused the files put into it")
                api.start(cid)
                try:
                    status = api.wait(cid, timeout=math.ceil(timeout_s))
                except (
                    requests.exceptions.ReadTimeout,
                    requests.exceptions.ConnectionError,
                ) as err:
                    raise ContainerTimeoutError(
                        f"{doing}: still running after {timeout_s:g} s, stopped",
                        hint="raise the time limit, or make the command do less",
                    ) from err
                stdout = api.logs(cid, stdout=True, stderr=False)
                stderr = api.logs(cid, stdout=False, stderr=True)
        finally:
            with self._errors(f"removing the container of {doing}"):
                api.remove_container(cid, force=True)
        return RunResult(
            exit_code=int(status["StatusCode"]),
            stdout=stdout.decode("utf-8", errors="replace"),
            stderr=stderr.decode("utf-8", errors="replace"),
        )

    @contextlib.contextmanager
    def _gpu_errors(self, gpus: bool) -> Iterator[None]:
        import docker.errors

        try:
            yield
        except docker.errors.APIError as err:
            found = gpu_request_error(self.host, str(err.explanation or err)) if gpus else None
            if found is not None:
                raise found from err
            raise

    def inspect_image(self, ref: str) -> dict[str, Any]:
        """The engine's description of an image; ImageNotFoundError when there is none."""
        api = self._client()
        with self._errors(f"inspecting {ref}"):
            info: dict[str, Any] = api.inspect_image(ref)  # type: ignore[no-untyped-call]
        return info

    def image_exists(self, ref: str) -> bool:
        """Whether the engine holds `ref` (a name, tag or ID)."""
        try:
            self.inspect_image(ref)
        except ImageNotFoundError:
            return False
        return True

    def find_images(self, labels: Mapping[str, str]) -> list[str]:
        """IDs of the images that carry all of `labels`, sorted."""
        api = self._client()
        wanted = [f"{key}={value}" for key, value in sorted(labels.items())]
        with self._errors("listing images"):
            ids = api.images(quiet=True, filters={"label": wanted})
        return sorted(set(ids))

    def tag(self, image_id: str, ref: str) -> None:
        """Point `ref` (`repo[:tag]`) at `image_id`."""
        import docker.utils

        api = self._client()
        repository, tag = docker.utils.parse_repository_tag(ref)
        with self._errors(f"tagging {image_id} as {ref}"):
            api.tag(image_id, repository, tag or "latest", force=True)

    def remove_image(self, ref: str, *, force: bool = False) -> None:
        """Remove `ref` (untags it when other tags remain)."""
        api = self._client()
        with self._errors(f"removing {ref}"):
            api.remove_image(ref, force=force)

    def save(self, refs: Sequence[str], dest: Path) -> None:
        """Write `refs` into one `docker save` archive at `dest` (atomically)."""
        api = self._client()
        partial = dest.with_name(dest.name + ".partial")
        with self._errors(f"saving {', '.join(refs)}"):
            # The SDK's get_image takes one name; the engine's endpoint takes several.
            # The stubs leave out these private helpers; the SDK is pinned (7.2.0).
            url = api._url("/images/get")  # type: ignore[attr-defined]
            response = api._get(url, params={"names": list(refs)}, stream=True)  # type: ignore[attr-defined]
            api._raise_for_status(response)  # type: ignore[attr-defined]
            with partial.open("wb") as out:
                for chunk in response.iter_content(chunk_size=1 << 20):
                    out.write(chunk)
        partial.replace(dest)

    def load(self, archive: Path) -> list[str]:
        """`docker load` an archive; the IDs of the images it held."""
        api = self._client()
        ids: list[str] = []
        errors: list[str] = []
        with self._errors(f"loading {archive}"), archive.open("rb") as data:
            for chunk in api.load_image(data):  # type: ignore[no-untyped-call]
                if "error" in chunk:
                    errors.append(str(chunk["error"]))
                for line in str(chunk.get("stream", "")).splitlines():
                    if line.startswith("Loaded image ID: "):
                        ids.append(line.removeprefix("Loaded image ID: ").strip())
                    elif line.startswith("Loaded image: "):
                        ref = line.removeprefix("Loaded image: ").strip()
                        ids.append(self.inspect_image(ref)["Id"])
        if errors:
            raise EngineError(f"loading {archive}: the Docker Engine said: {errors[0]}")
        return sorted(set(ids))

    def push(
        self,
        repository: str,
        tag: str,
        auth_config: Mapping[str, str] | None = None,
        *,
        on_status: Callable[[str], None] | None = None,
    ) -> str:
        """Push `repository:tag`; the registry's manifest digest. Credentials are never logged."""
        api = self._client()
        digest, error = "", ""
        auth = dict(auth_config) if auth_config is not None else None
        with self._errors(f"pushing {repository}:{tag}"):
            for chunk in api.push(repository, tag=tag, auth_config=auth, stream=True, decode=True):
                error = error or str(chunk.get("error", ""))
                aux = chunk.get("aux")
                if isinstance(aux, dict) and isinstance(aux.get("Digest"), str):
                    digest = aux["Digest"]
                if on_status is not None and "status" in chunk:
                    on_status(" ".join(str(chunk[k]) for k in ("id", "status") if chunk.get(k)))
        if error:
            raise EngineError(
                f"pushing {repository}:{tag}: the registry said: {error}",
                hint="check the registry address and `docker login` to it",
            )
        if not digest:
            raise EngineError(f"pushing {repository}:{tag}: the engine reported no digest")
        return digest

    def pull(self, ref: str, auth_config: Mapping[str, str] | None = None) -> str:
        """Pull `ref` (`repo:tag` or `repo@digest`); the ID of the image it names."""
        import docker.utils

        api = self._client()
        repository, tag = docker.utils.parse_repository_tag(ref)
        auth = dict(auth_config) if auth_config is not None else None
        error = ""
        with self._errors(f"pulling {ref}"):
            for chunk in api.pull(
                repository, tag=tag or "latest", auth_config=auth, stream=True, decode=True
            ):
                error = error or str(chunk.get("error", ""))
        if error:
            raise EngineError(
                f"pulling {ref}: the registry said: {error}",
                hint="check the reference and `docker login` to its registry",
            )
        image_id: str = self.inspect_image(ref)["Id"]
        return image_id

    def info(self) -> dict[str, Any]:
        """The engine's `docker info`: storage root, runtimes, registry settings."""
        api = self._client()
        with self._errors("asking the engine for its settings"):
            info: dict[str, Any] = api.info()
        return info

    def add_labels(self, image_id: str, labels: Mapping[str, str]) -> str:
        """A new image: `image_id` plus `labels`, with the very same layers (no rebuild)."""
        api = self._client()
        log = BuildLog()
        # The builder appends the labels as a LABEL step itself, so values need no quoting.
        dockerfile = io.BytesIO(f"FROM {image_id}\n".encode())
        with self._build_errors(log):
            for chunk in api.build(
                fileobj=dockerfile, labels=dict(labels), rm=True, forcerm=True, decode=True
            ):
                log.feed(chunk)
        return log.finish()


def registry_auth(registry: str) -> dict[str, str] | None:
    """The credentials the user's Docker config holds for `registry` (None: none there).

    Read the way `docker login` left them: `$DOCKER_CONFIG/config.json` (default
    `~/.docker/config.json`), its `auths`, `credsStore` and `credHelpers`. The values are secrets:
    pass them on, never print them.
    """
    import docker.auth
    import docker.errors

    try:
        config = docker.auth.load_config()
        found = config.resolve_authconfig(registry)
    except docker.errors.DockerException as err:
        raise EngineError(
            f"cannot read the credentials for {registry} from the Docker config: {type(err).__name__}",
            hint=f"run `docker login {registry}` again",
        ) from None
    if not found:
        return None
    return {str(k).lower(): str(v) for k, v in found.items() if v}
