"""What the seed-on-import hook adds to starting Python, and to `import torch`.

Makes a throwaway venv that sees this interpreter's packages, installs the hook into it
(.pth mode), and times fresh interpreters with the hook's .pth file in place and moved
away, alternating so that drift in the machine's load hits both sides alike. Reports the
medians of wall time (perf_counter around each run) and of CPU time (the child's user +
system time, which other load on the machine disturbs far less), the median of the paired
differences, and the targets: under 3 ms added to `python -c pass`, under 2% added to
`python -c "import torch"`.

    python bench/hook_startup.py [--runs 60] [--torch-runs 10] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

__all__ = ["main"]

HOOK = Path(__file__).resolve().parents[1] / "templates" / "image" / "reprobox_hook.py"
# (label, code, target, unit): what is timed and what it may cost at most.
CASES = (
    ("python -c pass", "pass", 3.0, "ms"),
    ('python -c "import torch"', "import torch", 2.0, "%"),
)


def _venv(root: Path) -> tuple[Path, Path]:
    """A venv with the hook installed; return its python and the hook's .pth file."""
    base: str = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = Path(
        subprocess.run(
            [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # A path line: this interpreter's packages (torch) without running their .pth files.
    (purelib / "_bench_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [str(python), str(HOOK), "install", "--mode", "pth", "--site", str(purelib)]
    subprocess.run(install, check=True, capture_output=True)
    return python, purelib / "reprobox_hook.pth"


def _env() -> dict[str, str]:
    # As in an image: one thread, a fixed hash seed; nothing of this shell's reprobox settings.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("REPROBOX_", "PYTHON"))}
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    return env


def _seconds(python: Path, code: str, env: dict[str, str]) -> tuple[float, float]:
    """Wall and CPU seconds of one fresh interpreter running `code`."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    subprocess.run([python, "-c", code], check=True, env=env)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return wall, cpu


def _figures(on: list[float], off: list[float]) -> dict[str, float]:
    added = statistics.median(a - b for a, b in zip(on, off, strict=True)) * 1e3
    without = statistics.median(off) * 1e3
    return {
        "without_ms": round(without, 2),
        "with_ms": round(statistics.median(on) * 1e3, 2),
        "added_ms": round(added, 2),
        "added_percent": round(100 * added / without, 2),
    }


def _measure(python: Path, pth: Path, code: str, runs: int) -> dict[str, dict[str, float]]:
    env = _env()
    parked = pth.with_suffix(".off")
    on: list[tuple[float, float]] = []
    off: list[tuple[float, float]] = []
    for n in range(runs + 2):  # two warm-up pairs: page cache, __pycache__
        pth.rename(parked)
        without = _seconds(python, code, env)
        parked.rename(pth)
        with_hook = _seconds(python, code, env)
        if n >= 2:
            off.append(without)
            on.append(with_hook)
    return {
        clock: _figures([pair[i] for pair in on], [pair[i] for pair in off])
        for i, clock in enumerate(("wall", "cpu"))
    }


def main(argv: list[str] | None = None) -> int:
    """Print the figures (a missed target is shown, not an error: timings are not tests)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--runs", type=int, default=60, help="pairs for python -c pass")
    parser.add_argument("--torch-runs", type=int, default=10, help="pairs for import torch")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="reprobox-bench-") as scratch:
        python, pth = _venv(Path(scratch) / "venv")
        results = {}
        for (label, code, target, unit), runs in zip(
            CASES, (args.runs, args.torch_runs), strict=True
        ):
            clocks = _measure(python, pth, code, runs)
            for figures in clocks.values():
                cost = figures["added_ms"] if unit == "ms" else figures["added_percent"]
                figures["met"] = cost < target
            results[label] = {**clocks, "target": f"< {target:g} {unit}", "runs": runs}
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    print(f"seed-on-import hook start-up cost (Python {sys.version.split()[0]}, median of pairs)")
    for label, result in results.items():
        print(f"  {label}  ({result['runs']} pairs, target {result['target']})")
        for clock in ("wall", "cpu"):
            r = result[clock]
            print(
                f"    {clock:4}  without {r['without_ms']:8.1f} ms   with {r['with_ms']:8.1f} ms"
                f"   added {r['added_ms']:6.2f} ms ({r['added_percent']:5.2f}%)"
                f"   {'met' if r['met'] else 'MISSED'}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
