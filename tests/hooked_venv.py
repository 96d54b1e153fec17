"""A throwaway venv with the seed-on-import hook installed (its .pth mode), for host tests.

torch and numpy come from the dev venv: a path line in a .pth file puts its site-packages on
sys.path without running the .pth files in it (the dev venv's editable-install finder alone
costs 25 ms per start and would blur what the hook costs).
"""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["HOOK", "SELFCHECK", "clean_env", "make_venv"]

TEMPLATES = Path(__file__).resolve().parents[1] / "templates" / "image"
HOOK = TEMPLATES / "reprobox_hook.py"
SELFCHECK = TEMPLATES / "reprobox_selfcheck.py"


def make_venv(dest: Path, *, hook: bool = True) -> Path:
    """Make a venv at `dest` that sees the dev venv's packages; return its python."""
    base: str = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", "--without-pip", str(dest)], check=True)
    python = dest / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    dev_packages = sysconfig.get_paths()["purelib"]
    (Path(purelib) / "_reprobox_dev_packages.pth").write_text(dev_packages + "\n")
    if hook:
        install = [str(python), str(HOOK), "install", "--mode", "pth", "--site", purelib]
        subprocess.run(install, check=True, capture_output=True)
    return python


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without any reprobox or Python settings, plus what an image sets."""
    drop = ("REPROBOX_", "PYTHON", "OMP_", "MKL_", "CUBLAS_", "VIRTUAL_ENV")
    env = {key: value for key, value in os.environ.items() if not key.startswith(drop)}
    # As the image's ENV does: one thread (two cores shared with DataLoader workers crawl
    # otherwise) and a fixed hash seed.
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONHASHSEED="0")
    env.update(extra)
    return env
