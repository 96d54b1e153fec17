"""Docker Engine behind the `Engine` protocol: the only module that imports the docker SDK for
the engine's API and reads Docker's JSON (the build stream aside: `build_log`).

`DockerEngine` drives the engine through the SDK's low-level client, created on first use (and
`docker` itself imported then, so importing this module stays cheap). What the engine answers
becomes `ImageInfo` and `EngineInfo` here, and its refusals the errors a user can act on.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import shlex
import socket
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from reprobox._files import CHUNK, atomic_path
from reprobox.build_log import BuildLog
from reprobox.engine import (
    BuildEvent,
    Change,
    EngineInfo,
    ImageInfo,
    RegistrySettings,
    RunResult,
)
from reprobox.errors import (
    BadInputError,
    ContainerCancelledError,
    ContainerTimeoutError,
    EngineError,
    GpuUnavailableError,
    ImageNotFoundError,
)

if TYPE_CHECKING:
    import docker

__all__ = ["DockerEngine", "engine_for", "engine_info", "gpu_request_error", "image_info"]

_DEFAULT_HOST = "unix:///var/run/docker.sock"
_PING_TIMEOUT_S = 10
#: `docker info`'s DriverStatus on an engine that keeps images in containerd's store.
_CONTAINERD_SNAPSHOTTER = ("driver-type", "io.containerd.snapshotter.v1")
_NO_ENGINE_HINT = (
    "start a Docker Engine: on Debian or Ubuntu, as root, `make setup` installs docker.io and starts "
    "dockerd; elsewhere install Docker Engine (https://docs.docker.com/engine/install/) and start it, "
    "or point DOCKER_HOST at one that runs"
)


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


def _strings(value: Any) -> tuple[str, ...]:
    return tuple(str(item) for item in value or ())


def image_info(raw: Mapping[str, Any]) -> ImageInfo:
    """`docker inspect` of an image as the typed value the stages read."""
    config = raw.get("Config") or {}
    cmd = config.get("Cmd")
    return ImageInfo(
        id=str(raw.get("Id") or ""),
        tags=_strings(raw.get("RepoTags")),
        repo_digests=_strings(raw.get("RepoDigests")),
        labels={str(k): str(v) for k, v in (config.get("Labels") or {}).items()},
        env=_strings(config.get("Env")),
        cmd=None if cmd is None else _strings(cmd),
        diff_ids=_strings((raw.get("RootFS") or {}).get("Layers")),
        created=str(raw.get("Created") or ""),
        parent=str(raw.get("Parent") or ""),
        architecture=str(raw.get("Architecture") or ""),
        os=str(raw.get("Os") or ""),
        size=int(raw.get("Size") or 0),
    )


def engine_info(host: str, version: Mapping[str, Any], info: Mapping[str, Any]) -> EngineInfo:
    """`docker version` and `docker info` as the typed value the stages read."""
    registry = info.get("RegistryConfig") or {}
    indexes = registry.get("IndexConfigs") or {}
    status = [tuple(pair) for pair in info.get("DriverStatus") or [] if len(pair) == 2]
    return EngineInfo(
        host=host,
        server_version=str(version.get("Version", "")),
        api_version=str(version.get("ApiVersion", "")),
        os=str(version.get("Os", "")),
        arch=str(version.get("Arch", "")),
        storage_driver=str(info.get("Driver") or ""),
        containerd_store=_CONTAINERD_SNAPSHOTTER in status,
        runtimes=tuple(sorted(str(name) for name in info.get("Runtimes") or {})),
        registry=RegistrySettings(
            insecure_cidrs=_strings(registry.get("InsecureRegistryCIDRs")),
            secure={
                str(name): bool(index["Secure"])
                for name, index in indexes.items()
                if isinstance(index, Mapping) and "Secure" in index
            },
        ),
        root_dir=str(info.get("DockerRootDir") or ""),
    )


#: Docker's own rule for a context's name.
_CONTEXT_NAME = re.compile(r"[a-zA-Z0-9][a-zA-Z0-9_.+-]{0,127}")


def engine_for(context: str | None) -> DockerEngine:
    """The engine the docker CLI would talk to: `--context NAME`, else DOCKER_HOST, else the
    DOCKER_CONTEXT variable, else the current context of Docker's config (`docker context use`).

    The context is read on first use (commands that need no engine never import docker).
    """
    if context is None and os.environ.get("DOCKER_HOST"):
        return DockerEngine()
    return DockerEngine(context=context or os.environ.get("DOCKER_CONTEXT") or "")


def _from_context(name: str) -> tuple[str | None, Any]:
    """A Docker context's host and TLS material; "" is Docker's current context, and `default`
    DOCKER_HOST or the local socket. Read from DOCKER_CONFIG (or ~/.docker)'s contexts."""
    from docker.context import ContextAPI

    name = name or str(ContextAPI.get_current_context().Name)
    if not _CONTEXT_NAME.fullmatch(name):
        raise BadInputError(f"{name!r} is not a Docker context name")
    if name == "default":
        return None, None
    found = ContextAPI.get_context(name)
    host = found.Host if found is not None else None
    if found is None or not isinstance(host, str) or not host:
        raise BadInputError(
            f"no Docker context named {name!r} with a Docker endpoint",
            hint="`docker context ls` lists the contexts; DOCKER_CONFIG names the config folder",
        )
    # The docker CLI writes `unix://...`; docker-py's create_context writes `http+unix://...`.
    if host.startswith("http+unix://"):
        host = "unix://" + host.removeprefix("http+unix://")
    return host, found.TLSConfig


class DockerEngine:
    """The real engine: Docker's low-level API client, made on first use."""

    def __init__(
        self, base_url: str | None = None, *, timeout_s: int = 900, context: str | None = None
    ) -> None:
        self._base_url = base_url
        self._timeout_s = timeout_s
        self._context = context  # a Docker context to read on first use ("" = the current one)
        self._tls: Any = None  # a docker.tls.TLSConfig from that context, or None
        self._api: docker.APIClient | None = None

    def _resolve_context(self) -> None:
        if self._context is not None:
            name, self._context = self._context, None
            self._base_url, self._tls = _from_context(name)

    def close(self) -> None:
        """Close the client's connections (a later call opens new ones)."""
        if self._api is not None:
            self._api.close()
            self._api = None

    @property
    def host(self) -> str:
        """The address this engine talks to."""
        self._resolve_context()
        return self._base_url or os.environ.get("DOCKER_HOST") or _DEFAULT_HOST

    def _client(self) -> docker.APIClient:
        if self._api is None:
            import docker  # here, not at the top: ~0.2 s that only engine commands should pay

            self._resolve_context()
            kwargs: dict[str, Any] = dict(docker.utils.kwargs_from_env())
            if self._base_url is not None:
                kwargs["base_url"] = self._base_url
            if self._tls is not None:
                kwargs["tls"] = self._tls
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
        except requests.exceptions.RequestException as err:
            # The engine sent its headers, then its reply broke off (a daemon that died
            # mid-wait, say): ChunkedEncodingError and kin.
            raise EngineError(
                f"{doing}: the Docker Engine at {self.host} stopped answering mid-reply ({err})",
                hint="see whether dockerd is still running (`systemctl status docker`)",
            ) from err

    def ping(self) -> EngineInfo:
        """Who answers at `host`, and its settings; EngineError (exit 3) when nobody does."""
        api = self._client()
        with self._errors("asking the engine for its version and settings"):
            version = api.version()
            info = api.info()
        return engine_info(self.host, version, info)

    def build(
        self,
        context_dir: Path,
        *,
        tag: str | None = None,
        nocache: bool = False,
        labels: Mapping[str, str] | None = None,
        on_event: Callable[[BuildEvent], None] | None = None,
    ) -> str:
        """Build `context_dir` and return the image ID; `tag` is applied only once it succeeded."""
        api = self._client()
        log = BuildLog(on_event)
        with self._build_errors(log):
            stream = api.build(
                path=str(context_dir),
                nocache=nocache,
                rm=True,
                forcerm=True,
                pull=False,
                decode=True,
                labels=dict(labels) if labels else None,
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
                return _run_to_end(api, cid, doing, archive, timeout_s)
        finally:
            with self._errors(f"removing the container of {doing}"):
                api.remove_container(cid, force=True)

    @contextlib.contextmanager
    def run_kept(
        self,
        image: str,
        argv: Sequence[str],
        *,
        timeout_s: float,
        files: Iterable[bytes] | None = None,
        cancel: threading.Event | None = None,
        tmpfs: Sequence[str] = (),
    ) -> Iterator[_Finished]:
        """Run `argv` without network, `files` (a tar stream) unpacked at / first, a tmpfs at
        each of `tmpfs` (programs in it may run); keep the exited container for the `with`
        block, then remove it. Setting `cancel` stops it."""
        api = self._client()
        doing = f"running `{shlex.join(argv)}` in {image}"
        with self._errors(doing):
            cid = api.create_container(
                image,
                command=list(argv),
                network_disabled=True,
                host_config=api.create_host_config(tmpfs=dict.fromkeys(tmpfs, "exec")),
            )["Id"]
        try:
            with self._errors(doing):
                result = _run_to_end(api, cid, doing, files, timeout_s, cancel=cancel)
            yield _Finished(self, cid, result)
        finally:
            with self._errors(f"removing the container of {doing}"):
                api.remove_container(cid, force=True)

    def load_stream(self, chunks: Iterable[bytes], what: str) -> list[str]:
        """`docker load` of an archive sent as it is generated (chunked transfer encoding)."""
        return self._load(chunks, what)

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

    def inspect_image(self, ref: str) -> ImageInfo:
        """The engine's description of an image; ImageNotFoundError when there is none."""
        api = self._client()
        with self._errors(f"inspecting {ref}"):
            raw: dict[str, Any] = api.inspect_image(ref)  # type: ignore[no-untyped-call]
        return image_info(raw)

    def image_exists(self, ref: str) -> bool:
        """Whether the engine holds `ref` (a name, tag or ID)."""
        try:
            self.inspect_image(ref)
        except ImageNotFoundError:
            return False
        return True

    def tag(self, image_id: str, ref: str) -> None:
        """Point `ref` (`repo[:tag]`) at `image_id`."""
        import docker.utils

        api = self._client()
        repository, tag = docker.utils.parse_repository_tag(ref)
        with self._errors(f"tagging {image_id} as {ref}"):
            api.tag(image_id, repository, tag or "latest", force=True)

    def save(self, refs: Sequence[str], dest: Path) -> None:
        """Write `refs` into one `docker save` archive at `dest` (atomically).

        The SDK's `get_image` takes one name; the engine's endpoint takes several (layers that
        images share are then written once). The client is a requests Session, so its public
        `get` asks the endpoint directly, and the SDK's own mapping turns an HTTP error into
        its APIError (ImageNotFound for a missing name).
        """
        import docker.errors
        import requests

        api = self._client()
        url = f"{api.base_url}/v{api.api_version}/images/get"
        with self._errors(f"saving {', '.join(refs)}"), atomic_path(dest) as partial:
            response = api.get(url, params={"names": list(refs)}, stream=True, timeout=api.timeout)
            with response:
                try:
                    response.raise_for_status()
                except requests.exceptions.HTTPError as err:
                    docker.errors.create_api_error_from_http_exception(err)
                with partial.open("wb") as out:
                    for chunk in response.iter_content(chunk_size=CHUNK):
                        out.write(chunk)

    def load(self, archive: Path) -> list[str]:
        """`docker load` an archive; the IDs of the images it held."""
        with archive.open("rb") as data:
            return self._load(data, str(archive))

    def _load(self, data: Any, what: str) -> list[str]:
        api = self._client()
        ids: list[str] = []
        errors: list[str] = []
        with self._errors(f"loading {what}"):
            for chunk in api.load_image(data):  # type: ignore[no-untyped-call]
                if "error" in chunk:
                    errors.append(str(chunk["error"]))
                for line in str(chunk.get("stream", "")).splitlines():
                    if line.startswith("Loaded image ID: "):
                        ids.append(line.removeprefix("Loaded image ID: ").strip())
                    elif line.startswith("Loaded image: "):
                        ref = line.removeprefix("Loaded image: ").strip()
                        ids.append(self.inspect_image(ref).id)
        if errors:
            raise EngineError(f"loading {what}: the Docker Engine said: {errors[0]}")
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
        return self.inspect_image(ref).id


#: How often a cancellable wait looks at its event.
_CANCEL_POLL_S = 1.0


def _run_to_end(
    api: docker.APIClient,
    cid: str,
    doing: str,
    files: Any,
    timeout_s: float,
    *,
    cancel: threading.Event | None = None,
) -> RunResult:
    """Put `files` (a tar stream, or None) into the created container, start it, wait, collect.

    With `cancel`, the wait looks at it every second: once it is set, ContainerCancelledError
    (the caller's `finally` removes the container, which kills it).
    """
    if files is not None and not api.put_archive(cid, "/", files):
        raise EngineError(f"{doing}: the engine refused the files put into it")
    if cancel is not None and cancel.is_set():
        raise ContainerCancelledError(f"{doing}: not started, it is no longer needed")
    api.start(cid)
    deadline = time.monotonic() + timeout_s
    while True:
        left = deadline - time.monotonic()
        step = left if cancel is None else min(left, _CANCEL_POLL_S)
        try:
            status = api.wait(cid, timeout=max(1, math.ceil(step)))
            break
        except Exception as err:
            if not _wait_timed_out(err):
                raise
            if cancel is not None and cancel.is_set():
                raise ContainerCancelledError(f"{doing}: stopped, it is no longer needed") from err
            if cancel is None or time.monotonic() >= deadline:
                raise ContainerTimeoutError(
                    f"{doing}: still running after {timeout_s:g} s, stopped",
                    hint="raise the time limit, or make the command do less",
                ) from err
    return RunResult(
        exit_code=int(status["StatusCode"]),
        stdout=api.logs(cid, stdout=True, stderr=False).decode("utf-8", errors="replace"),
        stderr=api.logs(cid, stdout=False, stderr=True).decode("utf-8", errors="replace"),
    )


def _wait_timed_out(err: Exception) -> bool:
    """Whether a wait ended by its read timeout (docker-py over a unix socket raises that as a
    ConnectionError wrapping urllib3's ReadTimeoutError), not by a lost engine."""
    import requests
    import urllib3

    if isinstance(err, requests.exceptions.ReadTimeout):
        return True
    return isinstance(err, requests.exceptions.ConnectionError) and any(
        isinstance(arg, urllib3.exceptions.ReadTimeoutError) for arg in err.args
    )


_CHANGE_KINDS: dict[int, Literal["added", "changed", "deleted"]] = {
    0: "changed",
    1: "added",
    2: "deleted",
}


class _Finished:
    """An exited container of `DockerEngine.run_kept`: read its files through the API."""

    def __init__(self, engine: DockerEngine, cid: str, result: RunResult) -> None:
        self._engine, self._cid, self.result = engine, cid, result

    def get_archive(self, path: str, dest: Path) -> None:
        """`path` as a tar at `dest` (streamed)."""
        api = self._engine._client()
        with self._engine._errors(f"reading {path} from a container"), dest.open("wb") as out:
            chunks, _ = api.get_archive(self._cid, path, chunk_size=CHUNK)
            for chunk in chunks:
                out.write(chunk)

    def changes(self) -> tuple[Change, ...]:
        """The container's changes (Docker's kinds 0 changed, 1 added, 2 deleted)."""
        api = self._engine._client()
        with self._engine._errors("listing a container's changes"):
            raw = api.diff(self._cid) or []
        try:
            return tuple(
                Change(_CHANGE_KINDS[int(entry["Kind"])], str(entry["Path"])) for entry in raw
            )
        except (KeyError, TypeError, ValueError) as err:
            raise EngineError(f"the engine listed a container's changes as {raw!r:.300}") from err

    def stat(self, path: str) -> tuple[int, float]:
        """Mode bits and mtime, from the archive endpoint's stat header (HEAD, no data)."""
        import base64

        import requests

        api = self._engine._client()
        url = f"{api.base_url}/v{api.api_version}/containers/{self._cid}/archive"
        with self._engine._errors(f"reading the mode of {path} in a container"):
            response = api.head(url, params={"path": path}, timeout=api.timeout)
            try:
                response.raise_for_status()
                found = json.loads(
                    base64.b64decode(response.headers["X-Docker-Container-Path-Stat"])
                )
                return _go_mode(int(found["mode"])), _go_time(str(found["mtime"]))
            except (requests.exceptions.HTTPError, KeyError, TypeError, ValueError) as err:
                raise EngineError(f"the engine gave no usable stat of {path}: {err}") from err


# Go's os.FileMode keeps setuid, setgid and sticky above the permission bits.
_GO_SPECIAL = ((1 << 23, 0o4000), (1 << 22, 0o2000), (1 << 20, 0o1000))
# Go's RFC 3339 with nanoseconds, in the daemon's own time zone.
_GO_TIME = re.compile(r"(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)(?:\.\d{1,9})?(Z|[+-]\d\d:\d\d)")


def _go_mode(mode: int) -> int:
    """A Go file mode as tar's mode bits."""
    return (mode & 0o777) | sum(bit for go, bit in _GO_SPECIAL if mode & go)


def _go_time(text: str) -> float:
    """A Go RFC 3339 time (any zone, up to nanoseconds) as whole seconds since the epoch."""
    import datetime

    match = _GO_TIME.fullmatch(text)
    if match is None:
        raise ValueError(f"{text!r:.80} is not an RFC 3339 time")
    zone = "+00:00" if match[2] == "Z" else match[2]
    return datetime.datetime.fromisoformat(match[1] + zone).timestamp()
