"""Every label key reprobox writes or reads, and the readers of an image's labels.

An image's labels are someone else's input once the image travels (an import, a pull): a label
may hold anything, terminal escapes included, so a reader here takes only well-formed values.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from typing import Any

from reprobox.errors import BadInputError, CheckError

__all__ = [
    "BASE",
    "BASE_PREFIX",
    "CONTENT_ID",
    "CUDA",
    "FINGERPRINT_PREFIX",
    "LOCK_SHA256",
    "OCI_CREATED",
    "OCI_DESCRIPTION",
    "OCI_SOURCE",
    "OCI_TITLE",
    "OCI_VERSION",
    "SEED",
    "SELFCHECK_ARGV",
    "SETTINGS_PREFIX",
    "SPEC_SHA256",
    "TORCH",
    "TRACE_PREFIX",
    "VERSION",
    "fingerprint_label",
    "image_uses_cuda",
    "recorded_fingerprints",
    "recorded_settings",
    "recorded_trace",
    "settings_label",
    "trace_label",
]

OCI_TITLE = "org.opencontainers.image.title"
OCI_VERSION = "org.opencontainers.image.version"
OCI_CREATED = "org.opencontainers.image.created"
OCI_DESCRIPTION = "org.opencontainers.image.description"
OCI_SOURCE = "org.opencontainers.image.source"
#: The reprobox release that built the image.
VERSION = "reprobox.version"
#: sha256 of the spec's text and of the lock's body: what the image was built from.
SPEC_SHA256 = "reprobox.spec-sha256"
LOCK_SHA256 = "reprobox.lock-sha256"
#: What FROM named; the torch release; the seed.
BASE = "reprobox.base"
TORCH = "reprobox.torch"
SEED = "reprobox.seed"
#: "cpu" or the CUDA version the image's torch was built for; set at render time.
CUDA = "reprobox.cuda"
#: The self-check command, as a JSON list (set at build time, so `check IMAGE` reruns it).
SELFCHECK_ARGV = "reprobox.selfcheck.argv"
#: The reproducible image ID before the self-check labels: what the lock records.
CONTENT_ID = "reprobox.content-id"
#: Per device class: the self-check's fingerprint, and its first run's trace (JSON).
FINGERPRINT_PREFIX = "reprobox.fingerprint."
TRACE_PREFIX = "reprobox.trace."
#: Per device class: the settings the recorded run saw (ENV, torch's flags, the CPU), as JSON.
SETTINGS_PREFIX = "reprobox.settings."
#: A bootstrapped base's own labels (format, key, mirror, packages, suite, installed).
BASE_PREFIX = "reprobox.base."

_DEVICE_CLASS = re.compile(r"[a-z0-9][a-z0-9._-]{0,62}")
_FINGERPRINT = re.compile(r"[0-9a-f]{64}")
_CUDA_VALUE = re.compile(r"cpu|[0-9]{1,2}\.[0-9]{1,2}")


def image_uses_cuda(labels: Mapping[str, str], image: str) -> bool:
    """Whether `image` is a CUDA image, by its own `reprobox.cuda` label (validated)."""
    value = labels.get(CUDA)
    if value is None or not _CUDA_VALUE.fullmatch(value):
        shown = "missing" if value is None else repr(value[:40])
        raise BadInputError(
            f"{image}: its {CUDA} label is {shown}, not 'cpu' or a CUDA version such as '12.4'",
            hint="rebuild it with this reprobox (`reprobox build SPEC`)",
        )
    return value != "cpu"


def _device_class(device_class: str) -> str:
    if not _DEVICE_CLASS.fullmatch(device_class):
        raise CheckError(f"the self-check reported an unusable device class {device_class!r}")
    return device_class


def fingerprint_label(device_class: str) -> str:
    """The label key under which an image records its fingerprint for one device class."""
    return FINGERPRINT_PREFIX + _device_class(device_class)


def trace_label(device_class: str) -> str:
    """The label key under which an image records the trace of one run, per device class."""
    return TRACE_PREFIX + _device_class(device_class)


def settings_label(device_class: str) -> str:
    """The label key under which an image records the settings one run saw, per device class."""
    return SETTINGS_PREFIX + _device_class(device_class)


def recorded_fingerprints(labels: Mapping[str, str]) -> dict[str, str]:
    """Device class -> fingerprint, from an image's labels; malformed ones are left out."""
    return {
        k.removeprefix(FINGERPRINT_PREFIX): v
        for k, v in labels.items()
        if k.startswith(FINGERPRINT_PREFIX)
        and _DEVICE_CLASS.fullmatch(k.removeprefix(FINGERPRINT_PREFIX))
        and isinstance(v, str)
        and _FINGERPRINT.fullmatch(v)
    }


def recorded_trace(labels: Mapping[str, str], device_class: str) -> dict[str, Any] | None:
    """The run the image recorded for `device_class`; None where none is, or it is damaged
    (the fingerprints still tell the verdict)."""
    return _json_object(labels.get(TRACE_PREFIX + device_class))


def recorded_settings(labels: Mapping[str, str], device_class: str) -> dict[str, Any] | None:
    """The settings the image's recorded run saw on `device_class`; None where none are, or
    they are damaged."""
    return _json_object(labels.get(SETTINGS_PREFIX + device_class))


def _json_object(raw: str | None) -> dict[str, Any] | None:
    if raw is None:
        return None
    try:
        loaded = json.loads(raw)
    except (ValueError, RecursionError):
        return None
    return loaded if isinstance(loaded, dict) else None
