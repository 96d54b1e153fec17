"""A second, current Docker Engine for the tests: Debian sid's docker.io, run nested in the engine
the tests use, with its socket in a folder on this host.

The sid rootfs is made by mmdebstrap once and kept in the reprobox cache (`engines/sid.tar`,
about 390 MB, ~30 s); the main engine imports it as an image, runs it privileged with dockerd
listening on a unix socket in a bind-mounted folder, and the folder's daemon.json turns the
containerd image store on or off. `InnerEngine.stop` removes the container and its volume.
Import it as `from engines import start_inner_engine` (pytest puts tests/ on sys.path).
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import docker

from reprobox.docker_engine import DockerEngine
from reprobox.errors import EngineError

__all__ = ["InnerEngine", "sid_rootfs", "start_inner_engine"]

ROOTFS_IMAGE = "reprobox-test/engine:sid"
_PACKAGES = "docker.io,ca-certificates,iproute2,iptables,procps"
_MIRROR = "http://deb.debian.org/debian"
_READY_S = 120
_TCP_PORT = 2375


@dataclass
class InnerEngine:
    """A running nested engine: its client, its container and volume in the outer engine."""

    engine: DockerEngine
    container: str
    volume: str
    outer: DockerEngine

    def stop(self) -> None:
        """Remove the container (dockerd with it) and its data volume."""
        self.engine.close()
        with docker.APIClient(base_url=self.outer.host, version="auto") as api:
            api.remove_container(self.container, force=True)
            api.remove_volume(self.volume, force=True)


def sid_rootfs(cache_root: Path) -> Path:
    """The sid rootfs tar with docker.io, made by mmdebstrap unless the cache holds it."""
    tar = cache_root / "engines" / "sid.tar"
    if tar.is_file():
        return tar
    if shutil.which("mmdebstrap") is None:
        raise EngineError("mmdebstrap is missing: it makes the second engine's rootfs")
    tar.parent.mkdir(parents=True, exist_ok=True)
    partial = tar.with_suffix(".partial.tar")
    subprocess.run(
        [
            "mmdebstrap",
            "--quiet",
            "--variant=minbase",
            f"--include={_PACKAGES}",
            '--aptopt=Acquire::Check-Valid-Until "false"',  # sid's Release may outlive a snapshot
            "sid",
            str(partial),
            _MIRROR,
        ],
        check=True,
        timeout=900,
    )
    partial.rename(tar)
    return tar


def _ensure_rootfs_image(outer: DockerEngine, cache_root: Path) -> None:
    if outer.image_exists(ROOTFS_IMAGE):
        return
    tar = sid_rootfs(cache_root)
    with docker.APIClient(base_url=outer.host, version="auto") as api, tar.open("rb") as data:
        api.import_image_from_data(
            data, repository=ROOTFS_IMAGE.split(":", maxsplit=1)[0], tag="sid"
        )


def start_inner_engine(
    outer: DockerEngine,
    cache_root: Path,
    socket_dir: Path,
    *,
    name: str,
    containerd: bool,
    tcp: bool = False,
) -> InnerEngine:
    """Start dockerd from the sid image (containerd store on or off) and wait until it answers.

    With `tcp` the tests reach it as a remote engine: dockerd also listens on TCP (no TLS: the
    port is published on 127.0.0.1 only) and the returned client speaks `tcp://127.0.0.1:PORT`.
    """
    _ensure_rootfs_image(outer, cache_root)
    socket_dir.mkdir(parents=True, exist_ok=True)
    config = {"features": {"containerd-snapshotter": containerd}}
    (socket_dir / "daemon.json").write_text(json.dumps(config))
    volume = f"{name}-data"
    with docker.APIClient(base_url=outer.host, version="auto") as api:
        for stale in api.containers(all=True, filters={"name": f"^{name}$"}):
            api.remove_container(stale["Id"], force=True)
        # Every capability but SYS_RESOURCE (a nested dev engine may lack it), all devices, no
        # masked /proc or /sys: what dockerd needs for mounts, cgroups and netfilter of its own.
        host_config = api.create_host_config(
            cap_add=["ALL"],
            cap_drop=["SYS_RESOURCE"],
            device_cgroup_rules=["a *:* rwm"],
            security_opt=["seccomp=unconfined", "apparmor=unconfined"],
            binds={
                "/sys/fs/cgroup": {"bind": "/sys/fs/cgroup", "mode": "rw"},
                volume: {"bind": "/var/lib/docker", "mode": "rw"},
                str(socket_dir): {"bind": "/run/inner", "mode": "rw"},
            },
            port_bindings={_TCP_PORT: ("127.0.0.1", None)} if tcp else None,
        )
        host_config.update(
            MaskedPaths=[], ReadonlyPaths=[]
        )  # `--security-opt systempaths=unconfined`
        container = api.create_container(
            ROOTFS_IMAGE,
            name=name,
            command=[
                "dockerd",
                "--host=unix:///run/inner/docker.sock",
                *([f"--host=tcp://0.0.0.0:{_TCP_PORT}", "--tls=false"] if tcp else []),
                "--config-file=/run/inner/daemon.json",
                f"--cgroup-parent=/{name}",
            ],
            ports=[_TCP_PORT] if tcp else None,
            host_config=host_config,
        )
        api.start(container["Id"])
        host = f"unix://{socket_dir}/docker.sock"
        if tcp:
            published = api.port(container["Id"], _TCP_PORT)
            host = f"tcp://127.0.0.1:{published[0]['HostPort']}"
    inner = InnerEngine(DockerEngine(host), container["Id"], volume, outer)
    deadline = time.monotonic() + _READY_S
    while True:
        try:
            inner.engine.ping()
        except EngineError:
            if time.monotonic() > deadline:
                inner.stop()
                raise
            inner.engine.close()
            time.sleep(1)
        else:
            return inner
