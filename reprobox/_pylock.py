"""The lock as `pylock.toml` (PEP 751), for the tools that read it: uv, pip 26, PDM.

The same wheels, hashes and sizes as the requirements-style lock, for the one environment the
lock was resolved for (the image's Python, Linux, its architecture). reprobox's own facts (spec
sha256, platform, resolver, install groups) go in `[tool.reprobox]` tables, which PEP 751 sets
aside for tools, and a comment header says where the file came from.
"""

from __future__ import annotations

import tomllib
from typing import Any

import tomli_w
from packaging.pylock import Pylock, PylockValidationError

from reprobox.locked import Lock, LockedWheel

__all__ = ["format_pylock"]


def _environment(lock: Lock) -> str:
    return (
        f"implementation_name == 'cpython' and python_version == '{lock.python}' and "
        f"sys_platform == 'linux' and platform_machine == '{lock.arch}'"
    )


def _package(wheel: LockedWheel) -> dict[str, Any]:
    file: dict[str, Any] = {"name": wheel.filename, "url": wheel.url}
    if wheel.size is not None:
        file["size"] = wheel.size
    file["hashes"] = {"sha256": wheel.sha256}
    return {
        "name": wheel.name,
        "version": wheel.version,
        "wheels": [file],
        "tool": {"reprobox": {"group": wheel.group}},
    }


def _tool(lock: Lock) -> dict[str, Any]:
    facts: dict[str, Any] = {
        "spec-sha256": lock.spec_sha256,
        "python": lock.python,
        "arch": lock.arch,
        "glibc": lock.glibc,
        "glibc-assumed": lock.glibc_assumed,
        "platforms": list(lock.platforms),
        "resolver": lock.resolver,
        "installer": lock.installer,
        "index-urls": list(lock.index.index_urls),
        "find-links": list(lock.index.find_links),
        "reprobox": lock.reprobox_version,
    }
    if lock.torch_cuda is not None:
        facts["torch-cuda"] = lock.torch_cuda
    if lock.torch_cudnn is not None:
        facts["torch-cudnn"] = lock.torch_cudnn
    return {"reprobox": facts}


def _document(lock: Lock) -> dict[str, Any]:
    return {
        "lock-version": "1.0",
        "environments": [_environment(lock)],
        "requires-python": f"=={lock.python}.*",
        "created-by": "reprobox",
        "packages": [_package(w) for w in sorted(lock.wheels, key=lambda w: w.name)],
        "tool": _tool(lock),
    }


def format_pylock(lock: Lock, lock_name: str) -> str:
    """The text of the `pylock.toml` for `lock` (whose requirements file is `lock_name`).

    Checked against PEP 751 with `packaging.pylock` before it is returned.
    """
    header = (
        f"# Written by reprobox beside {lock_name}: the same wheels, hashes and sizes, in\n"
        "# PEP 751's format, for the image's platform only. Do not edit: `reprobox lock\n"
        "# --relock SPEC` writes both again. Install with `uv pip install -r THIS-FILE` or\n"
        "# `pip install -r THIS-FILE` (pip 26, experimental); reprobox's own facts are in\n"
        "# [tool.reprobox].\n"
    )
    text = header + tomli_w.dumps(_document(lock))
    try:
        Pylock.from_dict(tomllib.loads(text))
    except PylockValidationError as exc:  # a bug here, never the user's input
        raise AssertionError(f"reprobox wrote an invalid pylock.toml: {exc}") from exc
    return text
