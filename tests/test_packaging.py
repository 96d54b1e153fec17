"""The package as users get it: a built wheel, installed into a fresh venv, renders a context."""

from __future__ import annotations

import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.network
def test_built_wheel_ships_the_templates_and_renders(tmp_path: Path) -> None:
    dist = tmp_path / "dist"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(dist), str(ROOT)],
        check=True,
        capture_output=True,
    )
    (wheel,) = dist.glob("reprobox-*.whl")
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)], check=True, capture_output=True
    )
    work = tmp_path / "work"
    work.mkdir()
    # Run from elsewhere, so nothing can come from the checkout.
    starter = subprocess.run(
        [str(env_dir / "bin" / "reprobox"), "init"],
        cwd=work,
        check=True,
        capture_output=True,
        text=True,
    )
    (work / "spec.yaml").write_text(starter.stdout)
    rendered = subprocess.run(
        [str(python), "-m", "reprobox", "render", "spec.yaml", "-o", "ctx", "--no-wheels"],
        cwd=work,
        capture_output=True,
        text=True,
        check=False,
    )
    assert rendered.returncode == 0, rendered.stderr
    for name in [
        "Dockerfile",
        "build/reprobox_install.py",
        "image/reprobox_hook.py",
        "image/reprobox_selfcheck.py",
        "image/reprobox_inference.py",
        "image/reprobox_generation.py",
        "image/reprobox_decoder.py",
    ]:
        assert (work / "ctx" / name).is_file(), name
    program = subprocess.run(
        [
            str(python),
            "-c",
            "from importlib import resources; print(resources.files('reprobox.templates')"
            ".joinpath('build/reprobox_compile.py').is_file())",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    assert program.stdout.strip() == "True", "--assemble's compile program is installed"
    located = subprocess.run(
        [str(python), "-c", "import reprobox; print(reprobox.__file__)"],
        cwd=work,
        capture_output=True,
        text=True,
        check=True,
    )
    assert str(env_dir) in located.stdout
