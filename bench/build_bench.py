"""Build figures for the README: reprobox beside a plain hand-written Dockerfile, in one run.

Cold build, rebuild with nothing changed, rebuild after one small pin changed, final image size
against base + installed packages, and self-check time. Both builds use the same engine, the
same base and the same verified wheels (containers here cannot reach PyPI, so the plain
Dockerfile installs from copied wheels as well, as a hand-written offline build would).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from reprobox.cache import WheelCache
from reprobox.context import default_cache_dir
from reprobox.docker_engine import DockerEngine
from reprobox.lockfile import read_lockfile

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "images" / "demo-cpu.yaml"
SMALL_PIN = ("numpy==2.4.6", "numpy==2.4.5")

PLAIN = """\
FROM {base}
COPY wheels/ /wheels/
RUN python3 -m venv --without-pip /opt/venv \\
 && /opt/venv/bin/python /wheels/{pip}/pip install --no-index --find-links /wheels {requirements}
ENV PATH=/opt/venv/bin:$PATH
"""


def _reprobox(*argv: str) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "reprobox", *argv, "--json"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        sys.exit(f"reprobox {' '.join(argv)} failed ({done.returncode}):\n{done.stderr[-3000:]}")
    report: dict[str, Any] = json.loads(done.stdout)
    return report


def _timed_reprobox(*argv: str) -> tuple[float, dict[str, Any]]:
    started = time.monotonic()
    report = _reprobox(*argv)
    return time.monotonic() - started, report


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


def _size(engine: DockerEngine, ref: str) -> int:
    return engine.inspect_image(ref).size


def _installed_bytes(engine: DockerEngine, ref: str) -> int:
    result = engine.run(ref, ["du", "-sb", "/opt/venv", "/opt/reprobox"], timeout_s=300)
    return sum(int(line.split()[0]) for line in result.stdout.splitlines())


def _from_earlier_run(engine: DockerEngine, ref: str, started: str) -> str:
    """A note when `ref` was made before this run began: its time is a cache hit, not a build."""
    created = engine.inspect_image(ref).created
    return " [layer cache from an earlier run]" if created < started else ""


def _layers(engine: DockerEngine, ref: str) -> list[str]:
    return list(engine.inspect_image(ref).diff_ids)


def main() -> int:
    """Run both builds and print one table."""
    engine = DockerEngine()
    engine.ping()
    started = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S")
    rows: list[tuple[str, str, str]] = []
    with tempfile.TemporaryDirectory(prefix="reprobox-bench-") as tmp:
        folder = Path(tmp)
        spec = folder / "spec.yaml"
        spec.write_text(DEMO.read_text())
        _reprobox("lock", str(spec))

        cold, report = _timed_reprobox("build", str(spec), "--no-cache")
        check_s = report["selfcheck"]["report"].get("seconds")
        warm, again = _timed_reprobox("build", str(spec))
        base = report["base"]

        spec.write_text(DEMO.read_text().replace(*SMALL_PIN))
        pin, changed = _timed_reprobox("build", str(spec), "--relock")
        torch_kept = (
            _layers(engine, report["image_id"])[1] == _layers(engine, changed["image_id"])[1]
        )

        spec.write_text(DEMO.read_text())
        _reprobox("lock", str(spec), "--relock")
        ctx = _plain_context(folder, spec, base)
        plain_cold, plain = _timed_build(engine, ctx, nocache=True)
        plain_warm, _ = _timed_build(engine, ctx, nocache=False)
        spec.write_text(DEMO.read_text().replace(*SMALL_PIN))
        _reprobox("lock", str(spec), "--relock")
        ctx = _plain_context(folder, spec, base)
        plain_pin, plain_changed = _timed_build(engine, ctx, nocache=False)
        plain_note = _from_earlier_run(engine, plain_changed, started)
        plain_torch = (
            "kept"
            if _layers(engine, plain)[-1] == _layers(engine, plain_changed)[-1]
            else "reinstalled"
        )
        ours_note = _from_earlier_run(engine, changed["built_id"], started)

        image_size = _size(engine, report["image_id"])
        base_size = _size(engine, base)
        installed = _installed_bytes(engine, report["image_id"])
        plain_size = _size(engine, plain)
        plain_installed = _installed_bytes(engine, plain)

    rows += [
        (
            "cold build (no layer cache)",
            f"{cold:.0f} s (self-check {check_s} s)",
            f"{plain_cold:.0f} s (no check)",
        ),
        (
            "rebuild, nothing changed",
            f"{warm:.1f} s (self-check reused: {again['selfcheck'].get('reused')})",
            f"{plain_warm:.1f} s",
        ),
        (
            f"rebuild, {SMALL_PIN[0]} -> {SMALL_PIN[1]}",
            f"{pin:.0f} s, torch layer reused: {'yes' if torch_kept else 'NO'} (relock + self-check included){ours_note}",
            f"{plain_pin:.0f} s (torch {plain_torch}){plain_note}",
        ),
        (
            "final image size",
            f"{_mb(image_size)} = base {_mb(base_size)} + installed {_mb(installed)} "
            f"{100 * (image_size / (base_size + installed) - 1):+.1f}%",
            f"{_mb(plain_size)}, {100 * (plain_size / (base_size + plain_installed) - 1):+.1f}% over base + installed",
        ),
    ]
    width = max(len(r[0]) for r in rows)
    print(f"{'':{width}}  reprobox | plain Dockerfile")
    for label, ours, theirs in rows:
        print(f"{label:{width}}  {ours} | {theirs}")
    return 0 if torch_kept else 1


if __name__ == "__main__":
    raise SystemExit(main())
