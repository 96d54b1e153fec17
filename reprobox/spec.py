"""The spec: YAML in, a validated and frozen `Spec` out, with file:line errors."""

from __future__ import annotations

import difflib
import hashlib
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    model_validator,
)

from reprobox.compat import check_spec
from reprobox.errors import SpecError

__all__ = ["Base", "Determinism", "Index", "SelfCheck", "Spec", "Torch", "load_spec", "parse_spec"]

# Dockerfile and shell safety rests on these patterns: a value that matches cannot hold a
# newline, a quote, a `$`, a backslash or a `#`, so it can never add or escape an instruction.
_NAME = r"[a-z0-9]+(?:[._-][a-z0-9]+)*"
_DIGEST_REF = re.compile(
    r"^(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?@sha256:(?P<digest>[0-9a-f]{64})$"
)
_PIN = re.compile(
    r"^(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(?:\[(?P<extras>[A-Za-z0-9._,-]+)\])?"
    r"==(?P<version>[A-Za-z0-9.+!_-]+)$"
)
_RANGE = re.compile(r"(>=|<=|~=|!=|===|>|<|\*|\^)")
_VERSION = r"^[0-9]+(?:\.[0-9]+)*(?:(?:a|b|rc|\.post|\.dev)[0-9]+)*(?:\+[a-z0-9.]+)?$"
_APT = re.compile(r"^(?P<name>[a-z0-9][a-z0-9+.-]+)(?:=(?P<version>[A-Za-z0-9.+~:-]+))?$")
_ENV_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")

# Set by the `determinism` section; a user who puts them in `env` would silently fight it.
RESERVED_ENV = frozenset(
    {
        "PYTHONHASHSEED",
        "OMP_NUM_THREADS",
        "MKL_NUM_THREADS",
        "OMP_DYNAMIC",
        "MKL_DYNAMIC",
        "GOMP_CPU_AFFINITY",
        "CUBLAS_WORKSPACE_CONFIG",
        "ATEN_CPU_CAPABILITY",
        "ONEDNN_MAX_CPU_ISA",
        "MKL_CBWR",
        "OPENBLAS_CORETYPE",
        "NPY_DISABLE_CPU_FEATURES",
        "NVIDIA_VISIBLE_DEVICES",
        "NVIDIA_DRIVER_CAPABILITIES",
        "NVIDIA_REQUIRE_CUDA",
        "PATH",
        "VIRTUAL_ENV",
    }
)


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


def _exact_version(value: str) -> str:
    if _RANGE.search(value):
        raise ValueError(
            f"{value!r} is a range; reprobox pins exactly: write one version, e.g. '2.5.1'"
        )
    if not re.match(_VERSION, value):
        raise ValueError(f"{value!r} is not an exact version such as '2.5.1'")
    return value


ExactVersion = Annotated[str, AfterValidator(_exact_version)]


def _pin(value: str) -> str:
    if _PIN.match(value):
        return value
    if _RANGE.search(value.split("==", 1)[-1]) or "==" not in value:
        raise ValueError(
            f"{value!r} is not an exact pin; reprobox pins exactly: write 'name==version', "
            "e.g. 'numpy==2.4.6'"
        )
    raise ValueError(
        f"{value!r} is not a pin of the form 'name==version' (letters, digits, . _ - +)"
    )


def _apt(value: str) -> str:
    if not _APT.match(value):
        raise ValueError(
            f"{value!r} is not a Debian package: write 'name' or 'name=version' "
            "(lower-case letters, digits, + . - : ~)"
        )
    return value


def _image_ref(value: str) -> str:
    if not _DIGEST_REF.match(value):
        raise ValueError(
            f"{value!r} is not pinned by digest: write 'name[:tag]@sha256:<64 hex digits>' "
            "(a tag alone can move)"
        )
    return value


def _bootstrap(value: str) -> str:
    m = re.match(r"^debian:([a-z]+)$", value)
    if not m:
        raise ValueError(
            f"{value!r} is not a bootstrap base: write 'debian:<suite>', e.g. 'debian:bookworm'"
        )
    return value


class Base(_Model):
    """Where the image starts: an image pinned by digest, or a Debian base reprobox makes."""

    image: Annotated[str, AfterValidator(_image_ref)] | None = None
    bootstrap: Annotated[str, AfterValidator(_bootstrap)] | None = None

    @model_validator(mode="after")
    def _exactly_one(self) -> Base:
        if (self.image is None) == (self.bootstrap is None):
            raise ValueError(
                "give exactly one of 'image' (pinned by digest) or 'bootstrap' (e.g. debian:bookworm)"
            )
        return self

    @property
    def suite(self) -> str | None:
        """The Debian suite of a bootstrap base."""
        return None if self.bootstrap is None else self.bootstrap.split(":", 1)[1]


def _cuda(value: str) -> str:
    if value != "cpu" and not re.match(r"^[0-9]+\.[0-9]+$", value):
        raise ValueError(f"{value!r} is neither 'cpu' nor a CUDA version such as '12.4'")
    return value


class Torch(_Model):
    """The torch release and the build of it (CPU or a CUDA variant)."""

    version: ExactVersion
    cuda: Annotated[str, AfterValidator(_cuda)] = "cpu"
    cudnn: Annotated[str, StringConstraints(pattern=r"^[0-9]+(\.[0-9]+){1,3}$")] | None = None

    @property
    def release(self) -> str:
        """The minor release, e.g. '2.5' for '2.5.1'."""
        return ".".join(self.version.split("+")[0].split(".")[:2])

    @property
    def is_cuda(self) -> bool:
        return self.cuda != "cpu"


class Determinism(_Model):
    """What the image's ENV and the seed-on-import hook pin down."""

    seed: Annotated[int, Field(ge=0, le=2**32 - 1)] = 0
    threads: Annotated[int, Field(ge=1, le=1024)] = 1
    gomp_cpu_affinity: Annotated[
        str, StringConstraints(pattern=r"^[0-9]+(?:[-:][0-9]+)*(?:[ ,][0-9]+(?:[-:][0-9]+)*)*$")
    ] = "0"
    cublas_workspace_config: Annotated[str, StringConstraints(pattern=r"^(?::[0-9]+:[0-9]+)+$")] = (
        ":4096:8"
    )
    deterministic_algorithms: bool = True
    # portable: x86-64-v3 code paths pinned, one result on Intel and AMD; native: the host's own.
    cpu: Literal["portable", "native"] = "portable"
    warn_only: bool = False
    fill_uninitialized_memory: bool = True
    python_hash_seed: Annotated[int, Field(ge=0, le=2**32 - 1)] | None = None

    @property
    def hash_seed(self) -> int:
        """PYTHONHASHSEED: the explicit one, else the seed."""
        return self.seed if self.python_hash_seed is None else self.python_hash_seed


class SelfCheck(_Model):
    """How the in-image self-check trains: steps, or the user's own script."""

    steps: Annotated[int, Field(ge=1, le=100_000)] = 20
    script: Annotated[str, StringConstraints(pattern=r"^[A-Za-z0-9_./-]+\.py$")] | None = None


def _index_url(value: str) -> str:
    if not re.match(r"^(https?|file)://[^\s\"'$\\`#]+$", value):
        raise ValueError(f"{value!r} is not an http(s):// or file:// URL without spaces or quotes")
    return value


IndexUrl = Annotated[str, AfterValidator(_index_url)]


class Index(_Model):
    """Where wheels are resolved from; empty means pip's own configuration on this machine."""

    url: IndexUrl | None = None
    extra_urls: tuple[IndexUrl, ...] = Field(default=(), strict=False)
    find_links: tuple[Annotated[str, StringConstraints(pattern=r"^[^\s\"'$\\`#]+$")], ...] = Field(
        default=(), strict=False
    )


def _env(value: Mapping[str, str]) -> Mapping[str, str]:
    for key, val in value.items():
        if not _ENV_KEY.match(key):
            raise ValueError(
                f"env key {key!r} is not a variable name (letters, digits, _; not first a digit)"
            )
        if key in RESERVED_ENV or key.startswith("REPROBOX_"):
            raise ValueError(f"env key {key!r} is set by reprobox from 'determinism'; set it there")
        if _CONTROL.search(val):
            raise ValueError(
                f"env value of {key!r} holds a newline or control character; they cannot be set safely"
            )
    return dict(sorted(value.items()))


class Spec(_Model):
    """A whole reprobox spec, version 1."""

    version: Literal[1]
    name: Annotated[str, StringConstraints(pattern=f"^{_NAME}$", max_length=128)]
    base: Base
    python: Annotated[str, StringConstraints(pattern=r"^3\.[0-9]+$")]
    torch: Torch
    transformers: ExactVersion | None = None
    packages: tuple[Annotated[str, AfterValidator(_pin)], ...] = Field(default=(), strict=False)
    apt: tuple[Annotated[str, AfterValidator(_apt)], ...] = Field(default=(), strict=False)
    env: Annotated[dict[str, str], AfterValidator(_env)] = Field(default_factory=dict)
    determinism: Determinism = Field(default_factory=Determinism)
    selfcheck: SelfCheck = Field(default_factory=SelfCheck)
    index: Index = Field(default_factory=Index)
    # Where the project lives (the OCI `source` label); not guessed from git, so that a clone
    # made over SSH and one made over HTTPS still build the same image.
    source_url: Annotated[str, AfterValidator(_index_url)] | None = None

    # Not part of the YAML: where it came from, so relative paths and errors can name the file.
    source: Path | None = Field(default=None, exclude=True)
    sha256: str = Field(default="", exclude=True)

    @property
    def script_path(self) -> Path | None:
        """The self-check script, resolved against the spec's directory."""
        if self.selfcheck.script is None:
            return None
        root = self.source.parent if self.source is not None else Path.cwd()
        return root / self.selfcheck.script


def _line_map(
    node: yaml.Node, path: tuple[str | int, ...], out: dict[tuple[str | int, ...], int]
) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set[str] = set()
        for key_node, value_node in node.value:
            key = key_node.value
            if key in seen:
                raise _DuplicateKeyError((*path, key), key_node.start_mark.line + 1)
            seen.add(key)
            out[(*path, key)] = key_node.start_mark.line + 1
            _line_map(value_node, (*path, key), out)
    elif isinstance(node, yaml.SequenceNode):
        for index, item in enumerate(node.value):
            out[(*path, index)] = item.start_mark.line + 1
            _line_map(item, (*path, index), out)


class _DuplicateKeyError(Exception):
    def __init__(self, path: tuple[str | int, ...], line: int) -> None:
        super().__init__(path)
        self.path = path
        self.line = line


def _dotted(path: tuple[str | int, ...]) -> str:
    text = ""
    for part in path:
        text += f"[{part}]" if isinstance(part, int) else (f".{part}" if text else str(part))
    return text or "(top level)"


def _line_for(lines: Mapping[tuple[str | int, ...], int], path: tuple[str | int, ...]) -> int:
    for end in range(len(path), -1, -1):
        if path[:end] in lines:
            return lines[path[:end]]
    return 1


def _model_at(path: tuple[str | int, ...]) -> type[BaseModel] | None:
    model: type[BaseModel] = Spec
    for part in path:
        field = model.model_fields.get(str(part))
        annotation = getattr(field, "annotation", None)
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            return None
        model = annotation
    return model


def _did_you_mean(path: tuple[str | int, ...]) -> str:
    model = _model_at(path[:-1])
    if model is None:
        return ""
    known = [name for name, f in model.model_fields.items() if not f.exclude]
    close = difflib.get_close_matches(str(path[-1]), known, n=1, cutoff=0.6)
    if close:
        return f"; did you mean '{close[0]}'?"
    return f"; known keys here: {', '.join(sorted(known))}"


def _describe(error: Mapping[str, Any]) -> str:
    kind = error["type"]
    if kind == "extra_forbidden":
        return "unknown key" + _did_you_mean(tuple(error["loc"]))
    if kind == "missing":
        return "required key is missing"
    if kind == "literal_error" and tuple(error["loc"]) == ("version",):
        return f"unsupported spec version {error.get('input')!r}; this reprobox reads version 1"
    message = str(error["msg"])
    message = message.removeprefix("Value error, ")
    if kind.endswith("_type"):
        given = error.get("input")
        message = f"{message} (got {type(given).__name__} {given!r})"
        if kind == "string_type" and isinstance(given, int | float) and not isinstance(given, bool):
            message += f'; put it in quotes, e.g. "{given}" (YAML reads 3.10 as the number 3.1)'
    return message


def parse_spec(text: str, source: Path | None = None) -> Spec:
    """Parse spec YAML text; every problem becomes one `file:line: key.path: message` line."""
    where = str(source) if source is not None else "<spec>"
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc)
        raise SpecError(
            f"{where}{line}: the spec is not valid YAML: {problem}",
            hint="check indentation and quoting near that line",
        ) from exc
    if not isinstance(data, dict) or root is None:
        raise SpecError(
            f"{where}:1: the spec must be a YAML mapping of keys such as 'version', 'name', 'torch'"
        )
    lines: dict[tuple[str | int, ...], int] = {}
    try:
        _line_map(root, (), lines)
    except _DuplicateKeyError as exc:
        raise SpecError(
            f"{where}:{exc.line}: {_dotted(exc.path)}: key given twice; keep one"
        ) from exc
    try:
        spec = Spec.model_validate(data)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            loc = tuple(error["loc"])
            # Union members add their type names to the location; they mean nothing to a user.
            loc = tuple(
                p for p in loc if not (isinstance(p, str) and ("[" in p or p in {"str", "int"}))
            )
            problems.append(f"{where}:{_line_for(lines, loc)}: {_dotted(loc)}: {_describe(error)}")
        raise SpecError("\n".join(sorted(set(problems), key=_sort_key))) from exc
    check_spec(spec, lambda path: f"{where}:{_line_for(lines, path)}")
    digest = hashlib.sha256(text.encode()).hexdigest()
    return spec.model_copy(update={"source": source, "sha256": digest})


def _sort_key(line: str) -> tuple[int, str]:
    parts = line.split(":")
    number = next((int(p) for p in parts[1:3] if p.isdigit()), 0)
    return number, line


def load_spec(path: Path) -> Spec:
    """Read and validate the spec file at `path`."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise SpecError(
            f"{path}: no such spec file", hint="`reprobox init > spec.yaml` writes a starter"
        ) from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise SpecError(f"{path}: cannot read the spec: {exc}") from exc
    spec = parse_spec(text, path)
    script = spec.script_path
    if script is not None and not script.is_file():
        raise SpecError(
            f"{path}: selfcheck.script: {script} does not exist",
            hint="the path is relative to the spec",
        )
    return spec
