"""Image references and a registry's HTTP API (v2): can we push there, and what digest does it hold.

Only what publish needs: parse and validate `REGISTRY/REPO`, knock on `/v2/` with the user's
credentials (Basic, or a Bearer token from the registry's token service), and read a manifest's
digest back. Credentials travel in headers only; no message here ever contains them.

Where credentials go, as a rule rather than a library default: the Basic credentials and the
Bearer token go only to the registry's own origin (scheme, host and port), and the Basic
credentials also to the token realm named by a 401 challenge that the registry's own origin
sent. Redirects are followed by hand; a hop to another origin goes without an Authorization
header, and so does every hop after it, and a challenge from anywhere but the registry's origin
is never answered (the Docker client's Go transport drops the header on such hops too). Bodies
are read with a size limit. A plain-HTTP token realm is refused for a registry reached over TLS.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import json
import re
import socket
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

import requests

from reprobox.engine import RegistrySettings
from reprobox.errors import (
    BadInputError,
    EngineError,
    RegistryAuthError,
    RegistryUnreachableError,
)

__all__ = [
    "MANIFEST_TYPES",
    "PublishTarget",
    "RegistryClient",
    "check_image_ref",
    "check_tag",
    "is_insecure",
    "parse_target",
    "registry_auth",
]

#: What a Docker Engine 20.10 pushes (schema 2), and the OCI form other tools push.
MANIFEST_TYPES = (
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.oci.image.manifest.v1+json",
)
_HUB = "docker.io"
_HUB_API = "registry-1.docker.io"
_TIMEOUT_S = 15
#: The most a registry answer may hold: manifests are limited to 4 MiB by distribution itself.
MAX_BODY_BYTES = 4 << 20
_MAX_REDIRECTS = 5
# distribution/reference's grammar, as the engine applies it.
_PATH_COMPONENT = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN = r"(?:[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)(?:\.[a-zA-Z0-9](?:[a-zA-Z0-9-]*[a-zA-Z0-9])?)*(?::[0-9]+)?"
_REPOSITORY = re.compile(rf"{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*")
_REGISTRY = re.compile(_DOMAIN)
_TAG = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")
_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


@dataclass(frozen=True)
class PublishTarget:
    """Where to publish: a registry and a repository in it."""

    registry: str  # as written: `127.0.0.1:5000`, `ghcr.io`; `docker.io` when none was
    repository: str  # the path in the registry: `team/model`, `library/ubuntu` on Docker Hub
    name: str  # what the engine tags and pushes: the reference as the user wrote it

    @property
    def api_host(self) -> str:
        """The host that serves the v2 API (Docker Hub's differs from its name)."""
        return _HUB_API if self.registry == _HUB else self.registry

    def ref(self, tag: str) -> str:
        """`name:tag`."""
        return f"{self.name}:{tag}"


def _bad_reference(text: str, why: str) -> BadInputError:
    return BadInputError(
        f"--to {text!r} is not a valid repository name: {why}",
        hint="write REGISTRY/REPO, for example 127.0.0.1:5000/team/model or ghcr.io/org/model: "
        "lower-case letters, digits and . _ - in the path, no tag (give tags with --tag)",
    )


def parse_target(text: str) -> PublishTarget:
    """Validate `REGISTRY/REPO` (Docker's reference grammar) before anything is built."""
    if not text or text != text.strip():
        raise _bad_reference(text, "it is empty or has spaces around it")
    if "@" in text:
        raise _bad_reference(text, "a digest cannot be pushed to; name the repository only")
    first, _, rest = text.partition("/")
    has_registry = bool(rest) and ("." in first or ":" in first or first == "localhost")
    registry, path = (first, rest) if has_registry else (_HUB, text)
    if not _REGISTRY.fullmatch(registry):
        raise _bad_reference(text, f"{registry!r} is not a host name or host:port")
    last = path.rsplit("/", 1)[-1]
    if ":" in last:
        raise _bad_reference(text, f"it ends in a tag ({last.split(':', 1)[1]!r})")
    if not _REPOSITORY.fullmatch(path):
        raise _bad_reference(text, f"the repository path {path!r} breaks the naming rules")
    if len(text) > 255:
        raise _bad_reference(text, "it is longer than 255 characters")
    if registry == _HUB and "/" not in path:
        path = f"library/{path}"
    return PublishTarget(registry, path, text)


def check_tag(tag: str) -> str:
    """A tag the engine accepts (letters, digits, `_ . -`, at most 128, not starting with . or -)."""
    if not _TAG.fullmatch(tag):
        raise BadInputError(
            f"--tag {tag!r} is not a valid tag",
            hint="use letters, digits, _ . and -, at most 128 characters, not starting with . or -",
        )
    return tag


_IMAGE_REF = re.compile(
    rf"(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?(?:@sha256:[0-9a-f]{64})?"
    r"|(?:sha256:)?[0-9a-f]{12,64}"
)


def check_image_ref(text: str, what: str = "IMAGE") -> str:
    """An image the engine is asked about: a name[:tag][@digest] or an ID; else exit 2 now."""
    if len(text) > 512 or _IMAGE_REF.fullmatch(text) is None:
        raise BadInputError(
            f"{what} {text[:200]!r} is not an image name or ID",
            hint="write name[:tag], name@sha256:<digest>, or an image ID (`docker images` lists them)",
        )
    return text


def _addresses(host: str) -> list[str]:
    name = host.rsplit(":", 1)[0] if host.count(":") == 1 else host
    try:
        return [str(info[4][0]) for info in socket.getaddrinfo(name, None)]
    except OSError:
        return []


def is_insecure(registry: str, settings: RegistrySettings) -> bool:
    """Whether the engine talks plain HTTP to `registry` (its insecure-registries setting)."""
    if registry in settings.secure:
        return not settings.secure[registry]
    networks = []
    for cidr in settings.insecure_cidrs:
        try:
            networks.append(ipaddress.ip_network(cidr))
        except ValueError:
            continue
    return any(
        ipaddress.ip_address(address.split("%", 1)[0]) in network
        for address in _addresses(registry)
        for network in networks
    )


@dataclass(frozen=True)
class _Answer:
    status: int
    headers: Mapping[str, str]
    body: bytes
    #: Whether the answer came from the origin the request was sent to (no hop elsewhere).
    same_origin: bool = True


def _origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of an http(s) URL, the port made explicit."""
    parts = urllib.parse.urlsplit(url)
    default = 443 if parts.scheme == "https" else 80
    try:
        port = parts.port or default
    except ValueError:
        port = -1
    return parts.scheme, (parts.hostname or "").lower(), port


class RegistryClient:
    """The v2 API of one registry, for one repository, with one set of credentials."""

    def __init__(
        self, target: PublishTarget, auth: Mapping[str, str] | None, *, insecure: bool = False
    ) -> None:
        self.target = target
        self._auth = dict(auth or {})
        self._schemes = ("https", "http") if insecure else ("https",)
        self._scheme: str | None = None
        self._authorization: str | None = None

    def check_access(self) -> None:
        """Reachable, and the credentials accepted for push; else a clear error (exit 3)."""
        answer = self._get("/v2/")
        if answer.status == 401:
            raise self._refused("refused the credentials from the Docker config")
        if answer.status >= 400:
            raise EngineError(
                f"the registry {self.target.registry} answered HTTP {answer.status} at /v2/",
                hint="check that the address is a container registry",
            )

    def manifest_digest(self, tag: str) -> str:
        """The digest of the manifest `tag` names, as the registry serves it now."""
        path = f"/v2/{self.target.repository}/manifests/{urllib.parse.quote(tag, safe='')}"
        answer = self._get(path, accept=", ".join(MANIFEST_TYPES))
        if answer.status == 404:
            raise EngineError(
                f"the registry {self.target.registry} holds no manifest for "
                f"{self.target.repository}:{tag} right after the push",
                hint="run the same command again; if it persists, the registry drops pushes",
            )
        if answer.status >= 400:
            raise EngineError(
                f"reading the manifest of {self.target.ref(tag)} back: HTTP {answer.status}"
            )
        computed = "sha256:" + hashlib.sha256(answer.body).hexdigest()
        served = answer.headers.get("Docker-Content-Digest") or computed
        if served != computed:
            raise EngineError(
                f"the registry {self.target.registry} says the manifest of {self.target.ref(tag)} "
                f"is {served[:100]!r}, but its bytes hash to {computed}"
            )
        return served

    def _get(self, path: str, *, accept: str | None = None) -> _Answer:
        fresh = self._authorization is None
        if self._authorization is None:
            self._authorization = self._login()
        answer = self._send(path, self._headers(accept))
        if answer.status == 401 and not fresh:
            # A token from before the build may have expired (registries give minutes): renew once.
            self._authorization = self._login()
            answer = self._send(path, self._headers(accept))
        return answer

    def _headers(self, accept: str | None) -> dict[str, str]:
        headers = {"Authorization": self._authorization} if self._authorization else {}
        if accept:
            headers["Accept"] = accept
        return headers

    def _login(self) -> str:
        """The Authorization header value for this registry ('' where it asks for none)."""
        answer = self._send("/v2/", {})
        if answer.status != 401:
            return ""
        if not answer.same_origin:
            raise EngineError(
                f"the registry {self.target.registry} redirected /v2/ to another address that "
                "asks for credentials; reprobox sends them to the registry's own address only",
                hint="publish to the address that serves the registry API itself",
            )
        challenge = answer.headers.get("WWW-Authenticate", "")
        scheme = challenge.split(" ", 1)[0].lower()
        if not self._auth:
            raise self._refused("asks for credentials, and the Docker config holds none for it")
        if scheme == "basic":
            return "Basic " + _basic(self._auth)
        if scheme == "bearer":
            return "Bearer " + self._token(dict(_CHALLENGE.findall(challenge)))
        raise EngineError(
            f"the registry {self.target.registry} asks for {scheme or 'an unknown'} authentication, "
            "which reprobox does not speak"
        )

    def _token(self, params: Mapping[str, str]) -> str:
        realm = params.get("realm", "")
        realm_scheme = urllib.parse.urlsplit(realm).scheme
        if realm_scheme not in {"https", "http"} or not _origin(realm)[1]:
            raise EngineError(f"the registry {self.target.registry} named no usable token service")
        if realm_scheme == "http" and self._scheme == "https":
            raise EngineError(
                f"the registry {self.target.registry} names a token service over plain HTTP "
                f"({realm}); reprobox does not send credentials for a TLS registry in clear text"
            )
        query = {"scope": f"repository:{self.target.repository}:pull,push"}
        if params.get("service"):
            query["service"] = params["service"]
        token = self._auth.get("identitytoken")
        if token:
            form = {**query, "grant_type": "refresh_token", "refresh_token": token}
            form["client_id"] = "reprobox"
            data: bytes | None = urllib.parse.urlencode(form).encode()
            headers = {"Content-Type": "application/x-www-form-urlencoded"}
        else:
            data, headers = None, {"Authorization": "Basic " + _basic(self._auth)}
        joiner = "&" if "?" in realm else "?"
        url = f"{realm}{joiner}{urllib.parse.urlencode(query)}" if data is None else realm
        try:
            answer = _fetch(url, headers, data)
        except requests.RequestException as err:
            raise RegistryUnreachableError(
                f"the token service of {self.target.registry} is unreachable ({_reason(err)})"
            ) from None
        if answer.status in (401, 403):
            raise self._refused("'s token service refused the credentials from the Docker config")
        try:
            body = json.loads(answer.body)
            value = str(body.get("token") or body["access_token"])
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            raise EngineError(
                f"the token service of {self.target.registry} answered HTTP {answer.status} "
                "without a token"
            ) from None
        if not re.fullmatch(r"[A-Za-z0-9._~+/=-]{1,8192}", value):
            raise EngineError(f"the token service of {self.target.registry} sent an unusable token")
        return value

    def _send(self, path: str, headers: Mapping[str, str]) -> _Answer:
        schemes = (self._scheme,) if self._scheme else self._schemes
        reasons = []
        for scheme in schemes:
            try:
                answer = _fetch(f"{scheme}://{self.target.api_host}{path}", headers)
            except requests.RequestException as err:
                reasons.append(f"{scheme}: {_reason(err)}")
                continue
            self._scheme = scheme
            return answer
        raise RegistryUnreachableError(
            f"the registry {self.target.registry} is unreachable or does not speak HTTP "
            f"({'; '.join(reasons)})",
            hint="check the address and that the registry runs; a registry on plain HTTP must be "
            "in the engine's insecure-registries (127.0.0.0/8 is by default)",
        )

    def _refused(self, why: str) -> RegistryAuthError:
        sep = "" if why.startswith("'") else " "
        return RegistryAuthError(
            f"the registry {self.target.registry}{sep}{why}",
            hint=f"log in with `docker login {self.target.registry}`; reprobox uses the credentials "
            "in the Docker config ($DOCKER_CONFIG/config.json, default ~/.docker/config.json) "
            "and its credential helpers",
        )


def _basic(auth: Mapping[str, str]) -> str:
    pair = f"{auth.get('username', '')}:{auth.get('password', '')}"
    return base64.b64encode(pair.encode()).decode()


def _fetch(url: str, headers: Mapping[str, str], data: bytes | None = None) -> _Answer:
    """One HTTP exchange, redirects followed by hand; an HTTP error status is an answer.

    The Authorization header goes only to `url`'s origin: from the first hop to another
    origin on, it is left off, whatever the hop after that. A network failure, a non-HTTP
    answer or a body over MAX_BODY_BYTES raise `requests.RequestException`.
    """
    origin = _origin(url)
    sent = dict(headers)
    same_origin = True
    for _ in range(_MAX_REDIRECTS + 1):
        if urllib.parse.urlsplit(url).scheme not in {"https", "http"}:
            raise requests.exceptions.InvalidURL(f"a registry speaks HTTP(S) only, not {url!r}")
        if _origin(url) != origin:
            same_origin = False
        if not same_origin:
            sent.pop("Authorization", None)
        response = requests.request(
            "POST" if data is not None else "GET",
            url,
            headers=sent,
            data=data,
            timeout=_TIMEOUT_S,
            allow_redirects=False,
            stream=True,
            auth=_no_netrc,  # no credentials from ~/.netrc either: only those the rule allows
        )
        with response:
            location = response.headers.get("Location")
            if response.is_redirect and location:
                url = urllib.parse.urljoin(url, location)
                if response.status_code in (301, 302, 303):
                    data = None
                continue
            body = _bounded_body(response)
            # Header names are case-insensitive (Go's registry sends `Www-Authenticate`).
            headers = requests.structures.CaseInsensitiveDict(response.headers)
            return _Answer(response.status_code, headers, body, same_origin)
    raise requests.exceptions.TooManyRedirects(f"more than {_MAX_REDIRECTS} redirects")


def _no_netrc(request: requests.PreparedRequest) -> requests.PreparedRequest:
    return request


def _bounded_body(response: requests.Response) -> bytes:
    length = response.headers.get("Content-Length", "")
    if length.isdecimal() and int(length) > MAX_BODY_BYTES:
        raise requests.exceptions.ContentDecodingError(
            f"the answer is {length} bytes, more than the {MAX_BODY_BYTES} reprobox reads"
        )
    chunks, size = [], 0
    for chunk in response.iter_content(64 * 1024):
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise requests.exceptions.ContentDecodingError(
                f"the answer is more than the {MAX_BODY_BYTES} bytes reprobox reads"
            )
        chunks.append(chunk)
    return b"".join(chunks)


def _reason(err: BaseException) -> str:
    """The innermost cause: what the network or the server did, without urllib3's wrapping."""
    seen = err
    while seen.__context__ is not None and isinstance(seen, requests.RequestException):
        seen = seen.__context__
    if isinstance(err, requests.exceptions.SSLError):
        return f"TLS failed: {seen}"
    if isinstance(seen, OSError) and seen.strerror:
        return seen.strerror
    text = str(err.args[0]) if err.args else str(err)
    return text if len(text) < 200 else text[:197] + "..."


def registry_auth(registry: str) -> dict[str, str] | None:
    """The credentials the user's Docker config holds for `registry` (None: none there).

    Read the way `docker login` left them: `$DOCKER_CONFIG/config.json` (default
    `~/.docker/config.json`), its `auths`, `credsStore` and `credHelpers`. The values are secrets:
    pass them on, never print them.
    """
    # The SDK's reader of the Docker client's config, imported here only: it follows
    # credsStore and credHelpers as `docker login` set them up.
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
