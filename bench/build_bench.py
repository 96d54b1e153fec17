"""Build figures for the README: reprobox beside a plain hand-written Dockerfile, in one run.

Three ways to the same packages, measured side by side on one engine, from one base and the same
verified wheels (containers here cannot reach PyPI, so the plain Dockerfile installs from copied
wheels as well, as a hand-written offline build would):

- plain: COPY the wheels, pip install them in one RUN (no proof, wheels stay in a layer);
- recipe: `reprobox build --recipe` (the rendered Dockerfile built, normalised, self-checked);
- assemble: `reprobox build`, the default route (the same image written from the wheels,
  self-checked).

Rows: cold build, rebuild with nothing changed, rebuild after one small pin changed, final size
against base + installed packages, reprobox's peak memory. Ratios are reprobox / plain. The cold
builds of plain and the default route are alternated, three of each, and the ratio is of their
medians: one cold build on a 2-core host varies by a quarter from one minute to the next. With
BENCH_CUDA=1, the CUDA example with `--no-check` (about 3 GB of wheels) is measured the same way.
Every figure moves with the machine's load: the load average is printed beside the table.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import docker

from reprobox.cache import WheelCache
from reprobox.context import default_cache_dir
from reprobox.docker_engine import DockerEngine
from reprobox.lockfile import read_lockfile
from reprobox.spec_load import load_spec

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "images" / "demo-cpu.yaml"
CUDA = ROOT / "images" / "cuda-12.4.yaml"
SMALL_PIN = ("numpy==2.4.6", "numpy==2.4.5")

PLAIN = """\
FROM {base}
COPY wheels/ /wheels/
RUN python3 -m venv --without-pip /opt/venv \\
 && /opt/venv/bin/python /wheels/{pip}/pip install --no-index --find-links /wheels {requirements}
ENV PATH=/opt/venv/bin:$PATH
LABEL reprobox.bench=plain
"""


@dataclass(frozen=True)
class Run:
    seconds: float
    rss_mb: float
    report: dict[str, Any]


def _reprobox(*argv: str) -> Run:
    """`reprobox ARGV --json`, timed, with its peak resident memory (its own, from wait4)."""
    started = time.monotonic()
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        child = subprocess.Popen(
            [sys.executable, "-m", "reprobox", *argv, "--json"], stdout=out, stderr=err
        )
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        seconds = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        if child.returncode != 0:
            sys.exit(
                f"reprobox {' '.join(argv)} failed ({child.returncode}):\n"
                f"{err.read().decode(errors='replace')[-3000:]}"
            )
        report: dict[str, Any] = json.loads(out.read())
    return Run(seconds, usage.ru_maxrss / 1024, report)


def _mb(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def _plain_context(folder: Path, spec: Path, base: str) -> Path:
    lock = read_lockfile(spec.with_suffix(".lock")).lock
    ctx = folder / "plain"
    (ctx / "wheels").mkdir(parents=True, exist_ok=True)
    for old in (ctx / "wheels").iterdir():
        old.unlink()
    WheelCache(default_cache_dir()).materialize(lock.wheels, ctx / "wheels")
    pip = next(w.filename for w in lock.wheels if w.group == "installer")
    requirements = " ".join(w.requirement for w in lock.wheels if w.group != "installer")
    (ctx / "Dockerfile").write_text(PLAIN.format(base=base, pip=pip, requirements=requirements))
    return ctx


def _timed_build(engine: DockerEngine, ctx: Path, *, nocache: bool) -> tuple[float, str]:
    started = time.monotonic()
    image = engine.build(ctx, nocache=nocache)
    return time.monotonic() - started, image


def _installed_bytes(engine: DockerEngine, ref: str) -> int:
    result = engine.run(ref, ["du", "-sb", "/opt/venv", "/opt/reprobox"], timeout_s=300)
    return sum(int(line.split()[0]) for line in result.stdout.splitlines())


def _layers(engine: DockerEngine, ref: str) -> list[str]:
    return list(engine.inspect_image(ref).diff_ids)


def _forget_earlier_images(specs: list[Path]) -> None:
    """Remove earlier images of these specs: an engine that holds their layers would make a
    `--no-cache` assemble load faster than a cold one is."""
    _remove_labelled([f"reprobox.spec-sha256={load_spec(spec).sha256}" for spec in specs])


def _forget_plain_images() -> None:
    """Remove earlier plain builds (with their cached steps), which would answer the plain pin
    change from the cache."""
    _remove_labelled(["reprobox.bench=plain"])


def _remove_labelled(labels: list[str]) -> None:
    with contextlib.closing(docker.from_env()) as client:
        for label in labels:
            for image in client.images.list(all=True, filters={"label": label}):
                with contextlib.suppress(docker.errors.APIError):
                    client.images.remove(str(image.id), force=True)


def _settle() -> None:
    """Before a cold build: the host's disk written back (removing earlier images, or the build
    before, leaves gigabytes to write), so that no route pays for another's writes."""
    os.sync()
    time.sleep(2)


def _held_layers() -> set[str]:
    """Every layer diff ID some image in the engine holds (dangling and intermediate included)."""
    with contextlib.closing(docker.from_env()) as client:
        return {
            str(layer)
            for image in client.images.list(all=True)
            for layer in image.attrs.get("RootFS", {}).get("Layers", [])
        }


def _cold_or_exit(engine: DockerEngine, image: str, held: set[str], what: str) -> None:
    """A cold build whose layers the engine already held loads in seconds: its figure would be
    false, so the bench stops instead of printing it."""
    layers = _layers(engine, image)[1:]  # above the base, which every route shares
    if kept := held.intersection(layers):
        sys.exit(
            f"{what} was not cold: the engine held {len(kept)} of its "
            f"{len(layers)} layers above the base before it ran"
        )


def _ratio(ours: float, theirs: float) -> str:
    return f"{ours / theirs:.2f}x"


def _size_note(size: int, base: int, installed: int) -> str:
    return f"{_mb(size)} ({100 * (size / (base + installed) - 1):+.1f}% over base + installed)"


# Cold builds of plain and the default route, alternated: this host's noise is +-25 %.
COLD_ROUNDS = 3
# Rebuilds with nothing changed take one to two seconds here, give or take half a second:
# each side's figure is the median of this many, taken in turn.
WARM_ROUNDS = 3


def _median(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[len(ordered) // 2]


def _cold_cell(seconds: list[float], extra: str) -> str:
    each = ", ".join(f"{s:.0f}" for s in seconds)
    return f"median {_median(seconds):.0f} s ({each}; {extra})"


def _warm_cell(seconds: list[float]) -> str:
    each = ", ".join(f"{s:.1f}" for s in seconds)
    return f"median {_median(seconds):.1f} s ({each})"


def _cpu_rows(engine: DockerEngine, folder: Path) -> tuple[list[tuple[str, ...]], bool]:
    spec = folder / "spec.yaml"
    pinned = folder / "pinned" / "spec.yaml"
    pinned.parent.mkdir()
    spec.write_text(DEMO.read_text())
    pinned.write_text(DEMO.read_text().replace(*SMALL_PIN))
    _reprobox("lock", str(spec))
    _reprobox("lock", str(pinned))

    # The cold builds, alternated, each route's own earlier images removed and the disk flushed
    # right before it, so that every cold build starts from the same state whichever route it
    # is; the median of COLD_ROUNDS is the figure (one build on this host varies by +-25 %).
    assemble_colds: list[Run] = []
    plain_colds: list[float] = []
    plain_ctx: Path | None = None
    for _ in range(COLD_ROUNDS):
        _forget_earlier_images([spec, pinned])
        held = _held_layers()
        _settle()
        run = _reprobox("build", str(spec), "--no-cache")
        _cold_or_exit(engine, run.report["image_id"], held, "a cold build")
        assemble_colds.append(run)
        base = run.report["base"]
        plain_ctx = plain_ctx or _plain_context(folder, spec, base)
        _forget_plain_images()
        _settle()
        seconds, plain = _timed_build(engine, plain_ctx, nocache=True)
        plain_colds.append(seconds)
    assert plain_ctx is not None
    assemble_cold = assemble_colds[0]
    same_id = all(
        r.report["content_id"] == assemble_cold.report["content_id"] for r in assemble_colds
    )
    assemble_median = _median([r.seconds for r in assemble_colds])
    plain_cold = _median(plain_colds)

    plain_warms: list[float] = []
    assemble_warms: list[float] = []
    for _ in range(WARM_ROUNDS):
        plain_warms.append(_timed_build(engine, plain_ctx, nocache=False)[0])
        assemble_warms.append(_reprobox("build", str(spec)).seconds)
    plain_warm, assemble_warm = _median(plain_warms), _median(assemble_warms)
    plain_pin, plain_changed = _timed_build(
        engine, _plain_context(folder, pinned, base), nocache=False
    )
    assemble_pin = _reprobox("build", str(pinned))
    _settle()
    recipe_cold = _reprobox("build", str(spec), "--recipe", "--no-cache")
    recipe_warm = _median(
        [_reprobox("build", str(spec), "--recipe").seconds for _ in range(WARM_ROUNDS)]
    )
    recipe_pin = _reprobox("build", str(pinned), "--recipe")

    a_id, r_id = assemble_colds[-1].report["image_id"], recipe_cold.report["image_id"]
    # Both routes give one image: the recipe's build, normalised, has the assembled content ID.
    one_image = assemble_cold.report["content_id"] == recipe_cold.report["content_id"]
    torch_kept = {
        "assemble": _layers(engine, a_id)[1] == _layers(engine, assemble_pin.report["image_id"])[1],
        "recipe": _layers(engine, r_id)[1] == _layers(engine, recipe_pin.report["image_id"])[1],
        "plain": _layers(engine, plain)[-1] == _layers(engine, plain_changed)[-1],
    }
    base_size = engine.inspect_image(base).size

    def check_s(run: Run) -> str:
        return str(run.report["selfcheck"]["report"].get("seconds"))

    def kept(route: str) -> str:
        return "torch kept" if torch_kept[route] else "torch REBUILT"

    rows: list[tuple[str, ...]] = [
        (
            "cold build (no cache)",
            _cold_cell(plain_colds, "no check"),
            f"{recipe_cold.seconds:.0f} s (one build; check {check_s(recipe_cold)} s)",
            _ratio(recipe_cold.seconds, plain_cold),
            _cold_cell([r.seconds for r in assemble_colds], f"check {check_s(assemble_cold)} s"),
            _ratio(assemble_median, plain_cold),
        ),
        (
            "rebuild, nothing changed",
            _warm_cell(plain_warms),
            f"median {recipe_warm:.1f} s",
            _ratio(recipe_warm, plain_warm),
            _warm_cell(assemble_warms),
            _ratio(assemble_warm, plain_warm),
        ),
        (
            f"rebuild, {SMALL_PIN[0]} -> {SMALL_PIN[1]}",
            f"{plain_pin:.0f} s ({kept('plain')})",
            f"{recipe_pin.seconds:.0f} s ({kept('recipe')}; relock, check)",
            _ratio(recipe_pin.seconds, plain_pin),
            f"{assemble_pin.seconds:.0f} s ({kept('assemble')}; relock, check)",
            _ratio(assemble_pin.seconds, plain_pin),
        ),
        (
            "final image size",
            _size_note(
                engine.inspect_image(plain).size, base_size, _installed_bytes(engine, plain)
            ),
            _size_note(engine.inspect_image(r_id).size, base_size, _installed_bytes(engine, r_id)),
            "",
            _size_note(engine.inspect_image(a_id).size, base_size, _installed_bytes(engine, a_id)),
            "",
        ),
        (
            "reprobox peak memory (cold)",
            "",
            f"{recipe_cold.rss_mb:.0f} MB",
            "",
            f"{assemble_cold.rss_mb:.0f} MB",
            "",
        ),
        (
            f"same ID in {COLD_ROUNDS} --no-cache builds",
            "",
            "(tests/test_reproducible.py)",
            "",
            "yes" if same_id else "NO",
            "",
        ),
        (
            "the recipe's image ID",
            "",
            "",
            "",
            "yes" if one_image else "NO",
            "",
        ),
    ]
    ok = bool(torch_kept["assemble"] and torch_kept["recipe"] and same_id and one_image)
    return rows, ok


def _cuda_rows(engine: DockerEngine, folder: Path) -> list[tuple[str, ...]]:
    spec = folder / "cuda" / "spec.yaml"
    spec.parent.mkdir()
    spec.write_text(CUDA.read_text())
    _reprobox("lock", str(spec))
    _forget_earlier_images([spec])
    held = _held_layers()
    _settle()
    assembled = _reprobox("build", str(spec), "--no-cache", "--no-check")
    image = assembled.report["image_id"]
    _cold_or_exit(engine, image, held, "the cold CUDA build")
    base = assembled.report["base"]
    size = engine.inspect_image(image).size
    installed = _installed_bytes(engine, image)
    base_size = engine.inspect_image(base).size
    with contextlib.closing(docker.from_env()) as client:
        client.images.remove(image, force=True)  # 5 GB: room for the plain build's 8 GB
    ctx = _plain_context(folder / "cuda", spec, base)
    _settle()
    plain_cold, plain = _timed_build(engine, ctx, nocache=True)
    plain_size = engine.inspect_image(plain).size
    plain_installed = _installed_bytes(engine, plain)
    with contextlib.closing(docker.from_env()) as client:
        client.images.remove(plain, force=True)
    return [
        (
            "CUDA example, cold, --no-check",
            f"{plain_cold:.0f} s",
            "",
            "",
            f"{assembled.seconds:.0f} s, peak memory {assembled.rss_mb:.0f} MB",
            _ratio(assembled.seconds, plain_cold),
        ),
        (
            "CUDA example, image size",
            _size_note(plain_size, base_size, plain_installed),
            "",
            "",
            _size_note(size, base_size, installed),
            "",
        ),
    ]


def main() -> int:
    """Run every build and print one table."""
    engine = DockerEngine()
    engine.ping()
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="reprobox-bench-") as tmp:
        rows, ok = _cpu_rows(engine, Path(tmp))
        if os.environ.get("BENCH_CUDA") == "1":
            rows += _cuda_rows(engine, Path(tmp))
    load_after = os.getloadavg()
    header = (
        "",
        "plain Dockerfile",
        "reprobox build --recipe",
        "ratio",
        "reprobox build (assembled)",
        "ratio",
    )
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for row in [header, *rows]:
        print(" | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)))
    print(
        f"load average (1 min) {load_before[0]:.1f} before, {load_after[0]:.1f} after; "
        f"{os.cpu_count()} CPUs"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
