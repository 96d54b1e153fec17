"""pip as the resolver: its command line, its report, and its failures as clear LockErrors.

The one module that knows pip's options and output; the volatile dependency stays here.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import unquote, urlsplit, urlunsplit

from packaging.utils import canonicalize_name

from reprobox._platform import Platform
from reprobox.errors import IndexUnreachableError, LockError, NoMatchError

__all__ = [
    "PYPI",
    "PipConfig",
    "PipResult",
    "Resolution",
    "ResolvedDist",
    "Runner",
    "pip_version",
    "read_pip_config",
    "resolve_with_pip",
    "run_pip",
]

PYPI = "https://pypi.org/simple"

# pip evaluates dependency markers against the interpreter it runs in, even with
# --python-version; this bootstrap makes it evaluate them for the image instead (the
# marker environment comes as the first argument), and reports index pages pip could
# not fetch, which it otherwise logs only at debug level.
_BOOTSTRAP = """\
import json, logging, sys
from pip._vendor.packaging import markers
_env = json.loads(sys.argv.pop(1))
markers.default_environment = lambda: dict(_env)
_handler = logging.StreamHandler(sys.stderr)
_handler.setFormatter(logging.Formatter("reprobox-pip: %(message)s"))
_handler.addFilter(lambda r: r.getMessage().startswith("Could not fetch URL"))
_log = logging.getLogger("pip._internal.index.collector")
_log.setLevel(logging.DEBUG)
_log.addHandler(_handler)
from pip._internal.cli.main import main
sys.exit(main())
"""

_FETCH_FAILED = re.compile(
    r"^reprobox-pip: Could not fetch URL (?P<url>\S+): (?P<reason>.*) - skipping$", re.M
)
_HTTP_STATUS = re.compile(r"\b[1-5][0-9][0-9] (?:Client|Server) Error\b")
_NETWORK = re.compile(
    r"NewConnectionError|NameResolutionError|ConnectTimeoutError|Max retries exceeded|"
    r"Network is unreachable|Connection refused|SSLError|ReadTimeoutError"
)
_NO_MATCH = re.compile(r"No matching distribution found for (?P<req>\S+)")
_FROM_VERSIONS = re.compile(r"\(from versions: (?P<versions>[^)]*)\)")


@dataclass(frozen=True)
class PipResult:
    """What a pip run returned: its exit status and its output."""

    returncode: int
    stdout: str
    stderr: str


#: Runs one pip command line (argv, extra environment) and returns its result; tests pass a fake.
Runner = Callable[[Sequence[str], Mapping[str, str]], PipResult]


def _isolated_env() -> dict[str, str]:
    """This process's environment without pip's: no PIP_* variable, no configuration file.

    What pip chooses must follow from the spec and the index locations the lock records, not
    from a constraints file or an option someone set on this machine; `read_pip_config` takes
    the locations (and the network settings) from the user's configuration explicitly.
    """
    env = {key: value for key, value in os.environ.items() if not key.startswith("PIP_")}
    return {**env, "PIP_CONFIG_FILE": os.devnull}


def run_pip(argv: Sequence[str], extra_env: Mapping[str, str]) -> PipResult:
    """The real runner: a subprocess, isolated from pip's configuration, plus `extra_env`."""
    done = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        check=False,
        env={**_isolated_env(), **extra_env},
    )
    return PipResult(done.returncode, done.stdout, done.stderr)


#: pip settings that say where to look: used when the spec names no index of its own.
_LOCATIONS = ("index-url", "extra-index-url", "find-links", "no-index")
#: pip settings that say how to reach an index, never what it chooses: always passed on.
_NETWORK_OPTIONS = {
    "cert": "--cert",
    "client-cert": "--client-cert",
    "proxy": "--proxy",
    "timeout": "--timeout",
    "default-timeout": "--timeout",
    "retries": "--retries",
}
#: Settings that change neither what is chosen nor how an index is reached.
_HARMLESS = frozenset(
    {
        "disable-pip-version-check", "no-input", "progress-bar", "verbose", "quiet", "log",
        "cache-dir", "no-cache-dir", "root-user-action", "require-virtualenv", "no-color",
        "keyring-provider", "break-system-packages",
    }
)  # fmt: skip
_CONFIG_LINE = re.compile(r"^(?P<section>[^.=\s]+|:env:)\.(?P<key>[a-z0-9-]+)='(?P<value>.*)'$")
# Later sections override earlier ones, as pip applies them to `pip install`.
_SECTIONS = ("global", "install", ":env:")


@dataclass(frozen=True)
class PipConfig:
    """What reprobox takes from the user's pip configuration, and what it leaves out."""

    locations: tuple[str, ...] = ()  # pip options naming index locations
    network: tuple[str, ...] = ()  # pip options for reaching them (cert, proxy, timeout)
    ignored: tuple[str, ...] = ()  # settings that would change what is chosen (constraint...)


def read_pip_config(text: str | None = None) -> PipConfig:
    """The user's pip configuration (files and PIP_* variables), sorted into what reprobox uses.

    `text` is `pip config list` output (for tests); by default pip is asked.
    """
    if text is None:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"],
            capture_output=True,
            text=True,
            check=False,
            env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"},
        )
        text = done.stdout if done.returncode == 0 else ""
    settings: dict[str, str] = {}
    for section in _SECTIONS:
        for line in text.splitlines():
            match = _CONFIG_LINE.match(line.strip())
            if match and match["section"] == section:
                settings[match["key"]] = match["value"]
    locations: list[str] = []
    network: list[str] = []
    ignored: list[str] = []
    for key, value in sorted(settings.items()):
        if key in _LOCATIONS:
            locations += _as_options(key, value)
        elif key in _NETWORK_OPTIONS:
            network += [_NETWORK_OPTIONS[key], value]
        elif key == "trusted-host":
            network += [arg for host in value.split() for arg in ("--trusted-host", host)]
        elif key not in _HARMLESS:
            ignored.append(key)
    return PipConfig(tuple(locations), tuple(network), tuple(ignored))


def _as_options(key: str, value: str) -> list[str]:
    if key == "no-index":
        return ["--no-index"] if value.strip().lower() in {"1", "true", "yes", "on"} else []
    return [arg for item in value.split() for arg in (f"--{key}", item)]


def pip_version() -> str:
    """The version of the pip that resolves (the one reprobox depends on)."""
    from importlib.metadata import version

    return version("pip")


@dataclass(frozen=True)
class ResolvedDist:
    """One distribution of pip's report."""

    name: str
    version: str
    url: str
    sha256: str | None
    requires: tuple[str, ...]
    extras: tuple[str, ...]

    @property
    def filename(self) -> str:
        """The wheel's file name, from its URL."""
        return unquote(PurePosixPath(urlsplit(self.url).path).name)


@dataclass(frozen=True)
class Resolution:
    """What pip chose, and where it looked."""

    dists: tuple[ResolvedDist, ...]
    index_urls: tuple[str, ...]
    find_links: tuple[str, ...]


def strip_credentials(url: str) -> str:
    """`url` without user or password: a lock goes into build contexts and logs."""
    parts = urlsplit(url)
    if "@" not in parts.netloc:
        return url
    return urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def _argv(
    target: Platform, requirements: Sequence[str], index_args: Sequence[str], report: Path
) -> list[str]:
    platforms = [arg for p in target.platforms for arg in ("--platform", p)]
    return [
        sys.executable, "-c", _BOOTSTRAP, json.dumps(target.marker_environment(), sort_keys=True),
        "install", "--dry-run", "--ignore-installed", "--no-input", "--progress-bar", "off",
        # Where an index does not serve PEP 658 metadata files, read METADATA out of the
        # remote wheel with range requests instead of downloading gigabytes of CUDA wheels.
        "--use-feature=fast-deps",
        "--only-binary=:all:", *platforms, "--python-version", target.python,
        "--implementation", "cp", "--abi", target.abi,
        *index_args, "--report", str(report), *requirements,
    ]  # fmt: skip


_ENV = {
    "PIP_REQUIRE_VIRTUALENV": "0",
    "PIP_DISABLE_PIP_VERSION_CHECK": "1",
    "PYTHONIOENCODING": "utf-8",
}


def _dist(item: Mapping[str, Any]) -> ResolvedDist:
    meta = item["metadata"]
    info = item["download_info"]
    hashes = info.get("archive_info", {}).get("hashes", {})
    return ResolvedDist(
        name=str(canonicalize_name(meta["name"])),
        version=meta["version"],
        url=strip_credentials(info["url"]),
        sha256=hashes.get("sha256"),
        requires=tuple(meta.get("requires_dist", ())),
        extras=tuple(item.get("requested_extras", ())),
    )


def _locations(stdout: str, no_index: bool) -> tuple[tuple[str, ...], tuple[str, ...]]:
    indexes: tuple[str, ...] = () if no_index else (PYPI,)
    links: tuple[str, ...] = ()
    for line in stdout.splitlines():
        if line.startswith("Looking in indexes: "):
            indexes = tuple(strip_credentials(u) for u in line.split(": ", 1)[1].split(", "))
        elif line.startswith("Looking in links: "):
            links = tuple(strip_credentials(u) for u in line.split(": ", 1)[1].split(", "))
    return indexes, links


def _unreachable(result: PipResult) -> list[tuple[str, str]]:
    """Index pages pip could not fetch for a network reason (not a 4xx: a missing project)."""
    failures = []
    for match in _FETCH_FAILED.finditer(result.stderr):
        reason = match["reason"]
        if _HTTP_STATUS.search(reason) and " Server Error" not in reason:
            continue
        failures.append((match["url"], reason))
    return failures


def _unreachable_error(failures: list[tuple[str, str]], indexes: Sequence[str]) -> LockError:
    url, reason = failures[0]
    index = next((i for i in indexes if url.startswith(i.rstrip("/") + "/")), url)
    others = f" (and {len(failures) - 1} more pages)" if len(failures) > 1 else ""
    return IndexUnreachableError(
        f"could not reach the package index {index} while locking: {reason[:300]}{others}. "
        "A lock made without it could differ from one made with it, so reprobox stops",
        hint="connect this machine to that index, or point the spec's index.extra_urls or "
        "index.find_links (or pip's configuration) at a mirror or a folder holding the wheels",
    )


def _conflict_error(result: PipResult) -> LockError:
    text = result.stdout + "\n" + result.stderr
    cause = text.split("The conflict is caused by:", 1)[-1].split("\n\n", 1)[0]
    lines = [line.strip() for line in cause.splitlines() if line.strip()]
    return LockError(
        "the pinned requirements cannot all be installed together: "
        + "; ".join(lines or ["pip reports a conflict"])
        + ". reprobox never changes a pin (torch least of all) to make them fit",
        hint="change the pin that asks for something else (in packages, transformers or "
        "torch.version) to a release that accepts the others",
    )


def _generic_error(result: PipResult) -> LockError:
    tail = "\n".join(result.stderr.strip().splitlines()[-12:])
    network = _NETWORK.search(result.stderr + result.stdout) is not None
    message = f"pip could not resolve the requirements:\n{tail}"
    if network:
        return IndexUnreachableError(message, hint="check the network and the index settings")
    return LockError(message, hint="see pip's message above")


def _no_match(
    result: PipResult, index_args: Sequence[str], indexes: tuple[str, ...]
) -> NoMatchError | None:
    """pip found no wheel for a requirement: which one, and the versions it could use."""
    match = _NO_MATCH.search(result.stderr)
    if match is None:
        return None
    versions = _FROM_VERSIONS.search(result.stderr)
    usable = (
        ()
        if versions is None
        else tuple(
            v.strip() for v in versions["versions"].split(",") if v.strip() and v.strip() != "none"
        )
    )
    return NoMatchError(match["req"], usable, tuple(index_args), indexes)


def resolve_with_pip(
    target: Platform, requirements: Sequence[str], index_args: Sequence[str], runner: Runner
) -> Resolution:
    """Resolve `requirements` for `target` with pip's dry run; every failure is a LockError."""
    with tempfile.TemporaryDirectory(prefix="reprobox-lock-") as tmp:
        report = Path(tmp) / "report.json"
        result = runner(_argv(target, requirements, index_args, report), _ENV)
        indexes, links = _locations(result.stdout, "--no-index" in index_args)
        failures = _unreachable(result)
        if failures:
            raise _unreachable_error(failures, indexes)
        if result.returncode != 0:
            if "ResolutionImpossible" in result.stderr + result.stdout:
                raise _conflict_error(result)
            no_match = _no_match(result, index_args, indexes)
            if no_match is not None:
                raise no_match
            raise _generic_error(result)
        data = json.loads(report.read_text(encoding="utf-8"))
    _check_environment(data.get("environment"), target)
    dists = tuple(_dist(item) for item in data["install"])
    return Resolution(dists, indexes, links)


def _check_environment(environment: Mapping[str, str] | None, target: Platform) -> None:
    """Fail if pip evaluated markers for this machine rather than the image (a changed pip)."""
    wanted = target.marker_environment()
    if environment is not None and any(environment.get(k) != v for k, v in wanted.items()):
        raise LockError(
            f"pip {pip_version()} evaluated dependency markers for this machine "
            f"(Python {environment.get('python_full_version')}), not for the image "
            f"(Python {target.python}); the lock would be wrong",
            hint="install reprobox with the pip version it pins (`pip install -e .`)",
        )


def link_listing(
    target: Platform, requirement: str, index_args: Sequence[str], runner: Runner
) -> str:
    """pip's debug output for one requirement: it names every file it skipped, and why."""
    with tempfile.TemporaryDirectory(prefix="reprobox-lock-") as tmp:
        argv = _argv(target, [requirement], index_args, Path(tmp) / "report.json")
        argv.insert(argv.index("install") + 1, "-vv")
        argv.insert(argv.index("install") + 1, "--no-deps")
        result = runner(argv, _ENV)
    return result.stdout + "\n" + result.stderr
