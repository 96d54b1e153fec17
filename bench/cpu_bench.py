"""What `determinism.cpu` costs: portable against native, side by side, on this host.

Runs fresh interpreters with each setting's ENV (what an image built with it holds, via
reprobox.cpu.cpu_env) and times a 1-thread 1024x1024 float32 matmul in torch (MKL) and in
numpy (OpenBLAS), `import torch` with the seed hook (portable asks CPUID first), then the
in-image self-check (hook installed in a throwaway venv) with the demo's 20 steps. Settings alternate run by run, so drift in the machine's load hits both
alike; medians of wall time and of CPU time (user + system of the children, which other load
disturbs far less) are printed with the ratio portable / native.

    python bench/cpu_bench.py [--repeats 3] [--steps 20] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

from reprobox.cpu import cpu_env

__all__ = ["main"]

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "image"
SETTINGS = ("native", "portable")
MATMUL = """
import json, time, numpy, torch
torch.set_num_threads(1)
a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
x, y = a.numpy(), b.numpy()
def best(f, n=15):
    f()
    times = []
    for _ in range(n):
        t = time.perf_counter(); f(); times.append(time.perf_counter() - t)
    return 2 * 1024**3 / min(times) / 1e9
print(json.dumps({"torch_gflops": best(lambda: a @ b), "numpy_gflops": best(lambda: x @ y)}))
"""


def _env(setting: str) -> dict[str, str]:
    import numpy

    drop = ("REPROBOX_", "PYTHON", "OMP_", "MKL_", "ATEN_", "ONEDNN_", "OPENBLAS_", "NPY_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env |= {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    env |= {"PYTHONHASHSEED": "0", "OMP_DYNAMIC": "FALSE", "MKL_DYNAMIC": "FALSE"}
    return env | cpu_env(setting, platform.machine(), numpy.__version__)


def _venv(root: Path) -> Path:
    """A venv with the hook installed (.pth mode) that sees this interpreter's packages."""
    base: str = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(root)], check=True)
    python = root / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (Path(purelib) / "_bench_packages.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    install = [str(python), str(TEMPLATES / "reprobox_hook.py"), "install", "--mode", "pth"]
    subprocess.run([*install, "--site", purelib], check=True, capture_output=True)
    return python


def _timed(argv: list[str], env: dict[str, str]) -> tuple[float, float, str]:
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    started = time.perf_counter()
    done = subprocess.run(argv, env=env, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - started
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if done.returncode != 0:
        raise SystemExit(f"{argv[1]} failed:\n{done.stderr[-2000:]}")
    cpu = after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime
    return wall, cpu, done.stdout


def main(argv: list[str] | None = None) -> int:
    """Time each setting; print a table (or --json)."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    results: dict[str, dict[str, list[float]]] = {s: {} for s in SETTINGS}
    classes: dict[str, str] = {}
    with tempfile.TemporaryDirectory(prefix="cpu-bench-") as tmp:
        python = _venv(Path(tmp) / "venv")
        selfcheck = [str(python), str(TEMPLATES / "reprobox_selfcheck.py")]
        for _ in range(args.repeats):
            for setting in SETTINGS:
                env, seen = _env(setting), results[setting]
                _, _, out = _timed([str(python), "-c", MATMUL], env)
                for key, value in json.loads(out).items():
                    seen.setdefault(key, []).append(value)
                for _ in range(5):
                    _, cpu, _ = _timed([str(python), "-c", "import torch"], env)
                    seen.setdefault("import_torch_cpu_ms", []).append(cpu * 1000)
                wall, cpu, out = _timed([*selfcheck, "--steps", str(args.steps)], env)
                seen.setdefault("selfcheck_wall_s", []).append(wall)
                seen.setdefault("selfcheck_cpu_s", []).append(cpu)
                classes[setting] = json.loads(out)["device_class"]
    medians = {s: {k: statistics.median(v) for k, v in r.items()} for s, r in results.items()}
    if args.json:
        print(json.dumps({"medians": medians, "device_classes": classes}, indent=2))
        return 0
    print(f"{args.repeats} runs each, medians; self-check with {args.steps} steps")
    print(f"{'':28} {'native':>10} {'portable':>10} {'portable/native':>16}")
    for key in medians["native"]:
        a, b = medians["native"][key], medians["portable"][key]
        print(f"{key:28} {a:10.1f} {b:10.1f} {b / a:16.2f}")
    for setting, name in classes.items():
        print(f"device class, {setting}: {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
