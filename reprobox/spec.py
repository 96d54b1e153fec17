"""The spec as a model: every key, its type and its rule, frozen; `spec_load` reads a file into it.

Every string field is `Annotated[str, Text(pattern, ...)]` (reprobox._text): bounded, free of
control characters, and a full match of its pattern. Keep it that way for new fields; a test
walks the model and fails on a string field without one.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    model_validator,
)

from reprobox._text import Text

__all__ = [
    "MAX_SCRIPT_BYTES",
    "Base",
    "Determinism",
    "Index",
    "SelfCheck",
    "Spec",
    "Text",
    "Torch",
]

#: The largest `selfcheck.script` reprobox copies into an image.
MAX_SCRIPT_BYTES = 256 * 1024

# Each pattern is matched whole (re.fullmatch). Apart from `env` values, none admits a space, a
# quote, a `$`, a backslash, a backquote or a `#`, so none can add or escape an instruction even
# before the render filters quote it.
_NAME = r"[a-z0-9]+(?:[._-][a-z0-9]+)*"
_DIGEST_REF = (
    r"(?P<repo>[a-z0-9]+(?:[._-][a-z0-9]+)*(?::[0-9]+)?(?:/[a-z0-9]+(?:[._-][a-z0-9]+)*)*)"
    r"(?::(?P<tag>[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}))?@sha256:(?P<digest>[0-9a-f]{64})"
)
_PIN = (
    r"(?P<name>[A-Za-z0-9](?:[A-Za-z0-9._-]*[A-Za-z0-9])?)(?:\[(?P<extras>[A-Za-z0-9._,-]+)\])?"
    r"==(?P<version>[A-Za-z0-9.+!_-]+)"
)
_RANGE = r"(>=|<=|~=|!=|===|>|<|\*|\^)"
_VERSION = r"[0-9]+(?:\.[0-9]+)*(?:(?:a|b|rc|\.post|\.dev)[0-9]+)*(?:\+[a-z0-9.]+)?"
_APT = r"[a-z0-9][a-z0-9+.-]+(?:=[A-Za-z0-9.+~:-]+)?"
_ENV_KEY = r"[A-Za-z_][A-Za-z0-9_]*"
_URL = r"(?:https?|file)://[^\s\"'$\\`#]+"
_LINK = r"[^\s\"'$\\`#]+"

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


def _range_why(value: str) -> str | None:
    if re.search(_RANGE, value):
        return f"{value!r} is a range; reprobox pins exactly: write one version, e.g. '2.5.1'"
    return None


def _pin_why(value: str) -> str:
    if "==" not in value or re.search(_RANGE, value.split("==", 1)[-1]):
        return (
            f"{value!r} is not an exact pin; reprobox pins exactly: write 'name==version', "
            "e.g. 'numpy==2.4.6'"
        )
    return f"{value!r} is not a pin of the form 'name==version' (letters, digits, . _ - +)"


def _no_credentials(value: str) -> str:
    parts = urlsplit(value)
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "the URL holds credentials (user:password@); the spec is copied into the image and "
            "its URLs into the lock, so keep credentials in pip's configuration or ~/.netrc"
        )
    return value


ExactVersion = Annotated[
    str, Text(_VERSION, "an exact version such as '2.5.1'", max_length=64, why=_range_why)
]
Url = Annotated[
    str,
    Text(_URL, "an http(s):// or file:// URL without spaces or quotes", max_length=2048),
    AfterValidator(_no_credentials),
]


class Base(_Model):
    """Where the image starts: an image pinned by digest, or a Debian base reprobox makes."""

    image: (
        Annotated[
            str,
            Text(
                _DIGEST_REF,
                "pinned by digest: write 'name[:tag]@sha256:<64 hex digits>' (a tag alone can move)",
                max_length=512,
            ),
        ]
        | None
    ) = None
    bootstrap: (
        Annotated[
            str,
            Text(
                r"debian:[a-z]+", "a bootstrap base: write 'debian:<suite>', e.g. 'debian:bookworm'"
            ),
        ]
        | None
    ) = None

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


class Torch(_Model):
    """The torch release and the build of it (CPU or a CUDA variant)."""

    version: ExactVersion
    cuda: Annotated[
        str, Text(r"cpu|[0-9]+\.[0-9]+", "'cpu' or a CUDA version such as '12.4'", max_length=16)
    ] = "cpu"
    cudnn: (
        Annotated[str, Text(r"[0-9]+(?:\.[0-9]+){1,3}", "a cuDNN version such as '9.1.0.70'")]
        | None
    ) = None

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
        str,
        Text(
            r"[0-9]+(?:[-:][0-9]+)*(?:[ ,][0-9]+(?:[-:][0-9]+)*)*",
            "a CPU list such as '0', '0-3' or '0,2,4'",
        ),
    ] = "0"
    cublas_workspace_config: Annotated[
        str, Text(r"(?::[0-9]+:[0-9]+)+", "a cuBLAS workspace setting such as ':4096:8'")
    ] = ":4096:8"
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
    """How the in-image self-check trains: steps, or the user's own script; and inference."""

    steps: Annotated[int, Field(ge=1, le=100_000)] = 20
    script: (
        Annotated[
            str,
            Text(
                r"[A-Za-z0-9_.-][A-Za-z0-9_./-]*\.py",
                "a .py file named relative to the spec's folder (letters, digits, _ . / -)",
            ),
        ]
        | None
    ) = None
    # Generation checked too (reprobox_inference.py): greedy and seeded sampling run to run.
    inference: bool = False
    # Fail unless a prompt's output is the same alone and inside batches (else only reported).
    require_batch_invariance: bool = False
    # Add the pure-torch decoder with a capacity-limited mixture-of-experts layer.
    inference_moe: bool = False

    @model_validator(mode="after")
    def _inference_options_need_inference(self) -> SelfCheck:
        asked = [k for k in ("require_batch_invariance", "inference_moe") if getattr(self, k)]
        if asked and not self.inference:
            verb = "applies" if len(asked) == 1 else "apply"
            raise ValueError(
                f"{' and '.join(asked)} only {verb} to the inference check: "
                "add 'inference: true' to selfcheck, or remove them"
            )
        return self


class Index(_Model):
    """Where wheels are resolved from; empty means pip's own configuration on this machine."""

    url: Url | None = None
    extra_urls: tuple[Url, ...] = Field(default=(), strict=False, max_length=32)
    find_links: tuple[
        Annotated[str, Text(_LINK, "a path or URL without spaces or quotes", max_length=2048)], ...
    ] = Field(default=(), strict=False, max_length=32)


def _env(value: Mapping[str, str]) -> Mapping[str, str]:
    for key in value:
        if key in RESERVED_ENV or key.startswith("REPROBOX_"):
            raise ValueError(f"env key {key!r} is set by reprobox from 'determinism'; set it there")
    return dict(sorted(value.items()))


EnvKey = Annotated[
    str,
    Text(_ENV_KEY, "a variable name (letters, digits, _; not first a digit)", max_length=128),
]
# Any printable text: the render filter quotes it for ENV, so it cannot add an instruction.
EnvValue = Annotated[str, Text(r".*", "printable text", max_length=4096)]


def _spec_version(value: int) -> int:
    if value != 1:
        raise ValueError(f"unsupported spec version {value!r}; this reprobox reads version 1")
    return value


class Spec(_Model):
    """A whole reprobox spec, version 1."""

    version: Annotated[int, AfterValidator(_spec_version)]
    name: Annotated[
        str,
        Text(_NAME, "a name: lower-case letters and digits joined by . _ or -", max_length=128),
    ]
    base: Base
    python: Annotated[str, Text(r"3\.[0-9]+", "a Python version such as '3.11'", max_length=8)]
    torch: Torch
    transformers: ExactVersion | None = None
    packages: tuple[
        Annotated[str, Text(_PIN, "a pin 'name==version'", max_length=256, why=_pin_why)],
        ...,
    ] = Field(default=(), strict=False, max_length=1024)
    apt: tuple[
        Annotated[
            str,
            Text(
                _APT,
                "a Debian package: write 'name' or 'name=version' "
                "(lower-case letters, digits, + . - : ~)",
                max_length=256,
            ),
        ],
        ...,
    ] = Field(default=(), strict=False, max_length=1024)
    env: Annotated[dict[EnvKey, EnvValue], AfterValidator(_env)] = Field(
        default_factory=dict, max_length=256
    )
    determinism: Determinism = Field(default_factory=Determinism)
    selfcheck: SelfCheck = Field(default_factory=SelfCheck)
    index: Index = Field(default_factory=Index)
    # Where the project lives (the OCI `source` label); not guessed from git, so that a clone
    # made over SSH and one made over HTTPS still build the same image.
    source_url: Url | None = None

    # Not part of the YAML: where it came from, so relative paths and errors can name the file;
    # its exact text (what `sha256` is taken over, and what the image carries); and the
    # self-check script as it was read and checked when the spec was loaded.
    source: Path | None = Field(default=None, exclude=True)
    sha256: str = Field(default="", exclude=True)
    text: str = Field(default="", exclude=True, repr=False)
    script_text: str | None = Field(default=None, exclude=True, repr=False)

    @property
    def script_path(self) -> Path | None:
        """The self-check script, resolved against the spec's directory."""
        if self.selfcheck.script is None:
            return None
        root = self.source.parent if self.source is not None else Path.cwd()
        return root / self.selfcheck.script
