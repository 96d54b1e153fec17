"""A real registry for publish tests: Debian's `docker-registry` on 127.0.0.1 with htpasswd auth.

`LocalRegistry.start(tmp)` writes a config (filesystem storage under `tmp`, bcrypt htpasswd), starts
the registry on a free port and waits until `/v2/` answers 401; `stop()` ends it (and `start` on a
stopped one starts it again on the same port and storage, as a restarted registry would).
`docker_config(tmp, registry, user, password)` writes the `config.json` a `docker login` leaves.
The Docker Engine treats 127.0.0.0/8 as an insecure registry, so plain HTTP works.
"""

from __future__ import annotations

import base64
import json
import shutil
import socket
import subprocess
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["REGISTRY_BINARY", "LocalRegistry", "docker_config"]

REGISTRY_BINARY = "docker-registry"
_READY_TIMEOUT_S = 20.0


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


def _htpasswd(user: str, password: str) -> str:
    done = subprocess.run(
        ["htpasswd", "-Bbn", user, password], capture_output=True, text=True, check=True
    )
    return done.stdout.strip() + "\n"


def _config(root: Path, port: int) -> str:
    # JSON is YAML: no YAML writer needed.
    return json.dumps(
        {
            "version": 0.1,
            "log": {"level": "info", "accesslog": {"disabled": True}},
            "storage": {"filesystem": {"rootdirectory": str(root / "storage")}},
            "http": {"addr": f"127.0.0.1:{port}", "secret": "reprobox-test-secret"},
            "auth": {"htpasswd": {"realm": "reprobox-test", "path": str(root / "htpasswd")}},
        },
        indent=2,
    )


@dataclass
class LocalRegistry:
    """One docker-registry process: where it listens, who may log in, where it keeps blobs."""

    root: Path
    port: int
    user: str
    password: str
    process: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """`127.0.0.1:PORT`, the registry part of an image reference."""
        return f"127.0.0.1:{self.port}"

    @property
    def log(self) -> Path:
        """The registry's own log (stdout and stderr)."""
        return self.root / "registry.log"

    @classmethod
    def start_in(
        cls, root: Path, user: str = "reprobox", password: str = "pw-s3cret-42"
    ) -> LocalRegistry:
        """Write the config and htpasswd under `root`, then start the registry."""
        if shutil.which(REGISTRY_BINARY) is None or shutil.which("htpasswd") is None:
            raise FileNotFoundError(
                "docker-registry or htpasswd is not installed: run `make setup` "
                "(apt-get install docker-registry apache2-utils)"
            )
        root.mkdir(parents=True, exist_ok=True)
        (root / "htpasswd").write_text(_htpasswd(user, password))
        registry = cls(root, _free_port(), user, password)
        (root / "config.yml").write_text(_config(root, registry.port))
        registry.start()
        return registry

    def start(self) -> None:
        """Start (or start again) the process and wait until `/v2/` asks for credentials."""
        if self.process is not None and self.process.poll() is None:
            return
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(
                [REGISTRY_BINARY, "serve", str(self.root / "config.yml")],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            if self._answers_401():
                return
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"the registry did not start; its log:\n{self.log.read_text()[-2000:]}")

    def _answers_401(self) -> bool:
        try:
            urllib.request.urlopen(f"http://{self.address}/v2/", timeout=1)
        except urllib.error.HTTPError as err:
            return err.code == 401
        except OSError:
            return False
        return False

    def stop(self) -> None:
        """Kill the process (as a crash would: no graceful shutdown) and reap it."""
        if self.process is None:
            return
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(timeout=10)
        self.process = None

    def blob_count(self) -> int:
        """How many blobs (layers, configs) the registry has stored."""
        blobs = self.root / "storage" / "docker" / "registry" / "v2" / "blobs"
        return sum(1 for path in blobs.rglob("data") if path.is_file()) if blobs.exists() else 0


def docker_config(folder: Path, registry: str, user: str, password: str) -> Path:
    """A Docker config folder (for DOCKER_CONFIG) holding what `docker login registry` writes."""
    folder.mkdir(parents=True, exist_ok=True)
    token = base64.b64encode(f"{user}:{password}".encode()).decode()
    (folder / "config.json").write_text(json.dumps({"auths": {registry: {"auth": token}}}))
    return folder
