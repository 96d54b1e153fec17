"""`reprobox init --from FILE`: a spec of exact pins from a project's requirements or lock.

The requirements are read for the image's environment (`reprobox.importers`); torch and
transformers move to their own keys; torch's CUDA libraries are left to the lock (they follow
`torch.cuda`); ranges are resolved once, now, by the same pip resolver the lock uses, for the
image's platform, and the spec says so in a comment. The text is checked as a spec before it is
returned.
"""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from reprobox import __version__
from reprobox._pip import PipConfig, Runner, read_pip_config, resolve_with_pip, run_pip
from reprobox._platform import ASSUMED_GLIBC, Platform, host_arch
from reprobox.compat import debian_suite, torch_release
from reprobox.errors import BadInputError
from reprobox.importers import Imported, Wanted, read_project
from reprobox.spec_load import parse_spec

__all__ = ["DEFAULT_TORCH", "spec_from_project", "write_spec"]

DEFAULT_TORCH = "2.13.0"
#: torch's own CUDA stack: pinned by torch's metadata for its build, so left to the lock.
_CUDA_STACK = re.compile(r"^(?:nvidia-.+|triton|pytorch-triton|cuda-.+)$")
_SUITES = ("bookworm", "trixie", "bullseye")
_LABEL = re.compile(r"^cu(?P<major>[0-9]+)(?P<minor>[0-9])$")


@dataclass(frozen=True)
class _Base:
    yaml: str
    target: Platform
    described: str


def _base(python: str, base_image: str | None, arch: str) -> _Base:
    if base_image is not None:
        target = Platform(python, arch, ASSUMED_GLIBC, glibc_assumed=True)
        return _Base(f"  image: {json.dumps(base_image)}", target, f"glibc {ASSUMED_GLIBC} assumed")
    for suite in _SUITES:
        facts = debian_suite(suite)
        if facts is not None and facts[0] == python:
            target = Platform(python, arch, facts[1])
            return _Base(f"  bootstrap: debian:{suite}", target, f"glibc {facts[1]}")
    raise BadInputError(
        f"no Debian base reprobox can bootstrap has Python {python}",
        hint="pass --base-image NAME@sha256:<digest> (an image with that Python), or --python 3.11",
    )


def _exact(req: Requirement) -> str | None:
    specs = list(req.specifier)
    if len(specs) == 1 and specs[0].operator in {"==", "==="} and "*" not in specs[0].version:
        return specs[0].version
    return None


def _plain(req: Requirement) -> str:
    """The requirement without its marker (already evaluated for the image)."""
    extras = f"[{','.join(sorted(req.extras))}]" if req.extras else ""
    return f"{canonicalize_name(req.name)}{extras}{req.specifier}"


def _cuda_of(version: str, cuda: str | None) -> str:
    label = version.partition("+")[2]
    if cuda is not None:
        return cuda
    if label == "cpu":
        return "cpu"
    match = _LABEL.match(label)
    if match:
        return f"{match['major']}.{match['minor']}"
    row = torch_release(".".join(version.split("+", maxsplit=1)[0].split(".")[:2]))
    return row.pypi_cuda if row is not None and row.pypi_cuda else "cpu"


def _torch_pin(version: str, cuda: str) -> str:
    base = version.partition("+")[0]
    if cuda == "cpu":
        return f"torch=={base}+cpu"
    row = torch_release(".".join(base.split(".")[:2]))
    if row is not None and row.pypi_cuda == cuda:
        return f"torch==={base}"
    return f"torch=={base}+cu{cuda.replace('.', '')}"


def _index_args(imported: Imported, config: PipConfig) -> list[str]:
    args = list(config.network)
    if imported.index_url is None and not imported.extra_index_urls and not imported.find_links:
        return args + list(config.locations)
    if imported.index_url is not None:
        args += ["--index-url", imported.index_url]
    for url in imported.extra_index_urls:
        args += ["--extra-index-url", url]
    for link in imported.find_links:
        args += ["--find-links", link]
    return args


@dataclass(frozen=True)
class _Pins:
    torch: str
    cuda: str
    transformers: str | None
    packages: tuple[str, ...]
    left_out: tuple[str, ...]
    resolved: tuple[str, ...]  # "numpy>=2 -> 2.2.6"


def _by_name(wanted: Sequence[Wanted]) -> dict[str, list[Wanted]]:
    grouped: dict[str, list[Wanted]] = {}
    for item in wanted:
        grouped.setdefault(str(canonicalize_name(item.requirement.name)), []).append(item)
    return grouped


def _pins(
    imported: Imported,
    target: Platform,
    *,
    torch: str | None,
    cuda: str | None,
    runner: Runner,
    pip_config: PipConfig | None,
) -> _Pins:
    grouped = _by_name(imported.wanted)
    grouped.pop("pip", None)  # the image's installer is reprobox's own
    left_out = tuple(sorted(n for n in grouped if _CUDA_STACK.match(n)))
    for name in left_out:
        del grouped[name]
    exact = {n: _exact(w[0].requirement) if len(w) == 1 else None for n, w in grouped.items()}
    torch_wanted = grouped.pop("torch", None)
    torch_exact = exact.pop("torch", None)
    if torch_wanted and torch_exact and torch and torch_exact.partition("+")[0] != torch:
        raise BadInputError(
            f"{torch_wanted[0].where}: the file pins torch {torch_exact}, but --torch says {torch}",
            hint="drop --torch (it is for files that name no torch, or a range)",
        )
    torch_range = torch_wanted is not None and torch_exact is None and torch is None
    torch_version = torch or torch_exact or DEFAULT_TORCH
    ranges = sorted(n for n in grouped if exact[n] is None)
    resolved: list[str] = []
    if ranges or torch_range:
        first = (
            [_plain(w.requirement) for w in torch_wanted or ()]
            if torch_range
            else [_torch_pin(torch_version, _cuda_of(torch_version, cuda))]
        )
        rest = [_plain(w.requirement) for n in sorted(grouped) for w in grouped[n]]
        config = read_pip_config() if pip_config is None else pip_config
        resolution = resolve_with_pip(target, first + rest, _index_args(imported, config), runner)
        found = {d.name: d.version for d in resolution.dists}
        for name in (["torch"] if torch_range else []) + ranges:
            wanted = torch_wanted if name == "torch" else grouped[name]
            shown = ",".join(str(w.requirement.specifier) for w in wanted or ()) or "(any)"
            resolved.append(f"{name} {shown} -> {found[name]}")
            exact[name] = found[name]
        if torch_range:
            torch_version = found["torch"]
    transformers = exact["transformers"] if "transformers" in grouped else None
    packages = []
    for name in sorted(grouped):
        if name == "transformers":
            continue
        extras = sorted({e for w in grouped[name] for e in w.requirement.extras})
        shown = f"{name}[{','.join(extras)}]" if extras else name
        packages.append(f"{shown}=={exact[name]}")
    return _Pins(
        torch_version.partition("+")[0],
        _cuda_of(torch_version, cuda),
        transformers,
        tuple(packages),
        left_out,
        tuple(resolved),
    )


def _name(given: str | None, imported: Imported) -> str:
    raw = given or imported.name or "my-env"
    name = re.sub(r"[^a-z0-9]+", "-", raw.lower()).strip("-")
    return name or "my-env"


def _comment(text: str) -> list[str]:
    words, lines, line = text.split(), [], "#"
    for word in words:
        if len(line) + 1 + len(word) > 96:
            lines.append(line)
            line = "#"
        line += " " + word
    return [*lines, line]


def spec_from_project(
    path: Path,
    *,
    groups: Sequence[str] = (),
    python: str = "3.11",
    cuda: str | None = None,
    torch: str | None = None,
    name: str | None = None,
    base_image: str | None = None,
    arch: str | None = None,
    runner: Runner = run_pip,
    pip_config: PipConfig | None = None,
) -> str:
    """The text of a spec whose pins are what the project at `path` asks for, on the image."""
    base = _base(python, base_image, arch or host_arch())
    target = base.target
    imported = read_project(
        path,
        groups=groups,
        environment=target.marker_environment(),  # type: ignore[arg-type]
        tags=sorted(target.tags(), key=str),
    )
    pins = _pins(imported, target, torch=torch, cuda=cuda, runner=runner, pip_config=pip_config)
    platform = f"Python {python}, Linux {target.arch}, {base.described}"
    notes = [f"Written by `reprobox init --from {path.name}` (reprobox {__version__})."]
    if pins.resolved:
        notes.append(
            f"Ranges were resolved once, when this spec was written, by pip for the image's "
            f"platform ({platform}): {'; '.join(pins.resolved)}."
        )
    else:
        notes.append("Every requirement was pinned already; nothing was resolved.")
    if pins.left_out:
        notes.append(
            "Left to the lock, since torch's build decides them (torch.cuda): "
            + ", ".join(pins.left_out)
            + "."
        )
    lines = [line for note in notes for line in _comment(note)]
    lines += [
        "version: 1",
        f"name: {_name(name, imported)}",
        "base:",
        base.yaml,
        f'python: "{python}"',
        "torch:",
        f'  version: "{pins.torch}"',
        f'  cuda: "{pins.cuda}"',
    ]
    if pins.transformers is not None:
        lines.append(f'transformers: "{pins.transformers}"')
    lines.append("packages:" if pins.packages else "packages: []")
    lines += [f"  - {json.dumps(pin)}" for pin in pins.packages]
    index = _index_yaml(imported)
    lines += [*index, "determinism:", "  seed: 0", "  threads: 1", "selfcheck:", "  steps: 20"]
    text = "\n".join(lines) + "\n"
    parse_spec(text, Path("<init --from>"))  # never hand out a spec reprobox would refuse
    return text


def _index_yaml(imported: Imported) -> list[str]:
    if imported.index_url is None and not imported.extra_index_urls and not imported.find_links:
        return []
    lines = ["index:"]
    if imported.index_url is not None:
        lines.append(f"  url: {json.dumps(imported.index_url)}")
    if imported.extra_index_urls:
        lines.append(f"  extra_urls: {json.dumps(list(imported.extra_index_urls))}")
    if imported.find_links:
        lines.append(f"  find_links: {json.dumps(list(imported.find_links))}")
    return lines


def write_spec(path: Path, text: str) -> None:
    """Write a new spec file; an existing file is never overwritten."""
    try:
        with path.open("x", encoding="utf-8", newline="\n") as handle:
            handle.write(text)
    except FileExistsError:
        raise BadInputError(
            f"{path}: already exists; reprobox does not overwrite a spec",
            hint="choose another path, or remove the file first",
        ) from None
