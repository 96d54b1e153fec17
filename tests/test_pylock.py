"""The lock as pylock.toml (PEP 751): valid by packaging's strict reader, installed by uv and pip.

The install tests use two small wheels made here (one needs the other), so they need no network;
the network test in test_lock.py installs part of the real CPU example's pylock the same way.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import tomllib
import zipfile
from hashlib import sha256
from pathlib import Path

import pytest
from packaging.markers import Environment, default_environment
from packaging.pylock import Package, Pylock, PylockSelectError, is_valid_pylock_path
from replay import FakeRunner, ensure_lock, resolve

from reprobox._platform import manylinux_platforms
from reprobox._pylock import format_pylock
from reprobox.lock import resolve as real_resolve
from reprobox.locked import IndexSettings, Lock, LockedWheel
from reprobox.lockfile import pylock_path, write_pylock
from reprobox.spec_load import load_spec

CPU_SPEC = Path(__file__).resolve().parent.parent / "images" / "demo-cpu.yaml"

HOST_PYTHON = f"{sys.version_info.major}.{sys.version_info.minor}"


def _cpu_lock() -> Lock:
    return resolve(load_spec(CPU_SPEC), runner=FakeRunner.recorded("cpu"), arch="x86_64")


def _image_environment(lock: Lock) -> Environment:
    return {
        **default_environment(),
        "implementation_name": "cpython",
        "python_version": lock.python,
        "python_full_version": f"{lock.python}.0",
        "sys_platform": "linux",
        "platform_machine": lock.arch,
    }


def test_pylock_names_follow_pep_751() -> None:
    cases = {
        "a/demo-cpu.lock": "a/pylock.demo-cpu.toml",
        "cuda-12.4.lock": "pylock.cuda-12-4.toml",  # a PEP 751 name holds no dot
        "x.y.z": "pylock.x-y-z.toml",
    }
    for lock, expected in cases.items():
        path = pylock_path(Path(lock))
        assert path == Path(expected)
        assert is_valid_pylock_path(path)


def test_pylock_is_valid_pep_751_with_hashes_sizes_and_reprobox_facts() -> None:
    lock = _cpu_lock()
    text = format_pylock(lock, "demo-cpu.lock")
    assert text == format_pylock(_cpu_lock(), "demo-cpu.lock")  # the same bytes every time
    assert text.startswith("# Written by reprobox beside demo-cpu.lock")
    data = tomllib.loads(text)
    pylock = Pylock.from_dict(data)  # packaging's strict reader of PEP 751
    assert str(pylock.lock_version) == "1.0"
    assert pylock.created_by == "reprobox"
    assert str(pylock.requires_python) == "==3.11.*"
    by_name: dict[str, Package] = {p.name: p for p in pylock.packages}
    assert sorted(by_name) == sorted(w.name for w in lock.wheels)
    for wheel in lock.wheels:
        package = by_name[wheel.name]
        assert str(package.version) == wheel.version
        (file,) = package.wheels or ()
        assert (file.name, file.url, file.size) == (wheel.filename, wheel.url, wheel.size)
        assert file.size is not None
        assert dict(file.hashes) == {"sha256": wheel.sha256}
        assert package.tool == {"reprobox": {"group": wheel.group}}
    facts = data["tool"]["reprobox"]
    assert facts["spec-sha256"] == lock.spec_sha256
    assert (facts["python"], facts["arch"], facts["glibc"]) == ("3.11", "x86_64", "2.36")
    assert facts["platforms"] == list(lock.platforms)
    assert facts["find-links"] == list(lock.index.find_links)


def test_pylock_selects_every_wheel_for_the_image_and_nothing_elsewhere() -> None:
    lock = _cpu_lock()
    pylock = Pylock.from_dict(tomllib.loads(format_pylock(lock, "demo-cpu.lock")))
    chosen = list(pylock.select(environment=_image_environment(lock)))
    assert sorted(p.name for p, _ in chosen) == sorted(w.name for w in lock.wheels)
    other: Environment = {
        **_image_environment(lock),
        "python_version": "3.12",
        "python_full_version": "3.12.0",
    }
    with pytest.raises(PylockSelectError):
        list(pylock.select(environment=other))


def test_ensure_lock_writes_the_pylock_beside_the_lock_and_restores_it(tmp_path: Path) -> None:
    spec_path = tmp_path / "demo-cpu.yaml"
    spec_path.write_bytes(CPU_SPEC.read_bytes())
    lock_path = tmp_path / "demo-cpu.lock"
    lock = ensure_lock(load_spec(spec_path), lock_path, runner=FakeRunner.recorded("cpu")).lock
    pylock = tmp_path / "pylock.demo-cpu.toml"
    assert pylock.read_text(encoding="utf-8") == format_pylock(lock, "demo-cpu.lock")
    pylock.unlink()
    ensure_lock(load_spec(spec_path), lock_path, runner=FakeRunner([]))  # no pip run: from the lock
    assert pylock.read_text(encoding="utf-8") == format_pylock(lock, "demo-cpu.lock")


# --- installed by uv and by pip, into fresh venvs ---------------------------------------------


def _wheel(folder: Path, name: str, requires: str = "") -> LockedWheel:
    """A small real wheel of `name` 1.0 (a module that prints its name), locked by file URL."""
    module = name.replace("-", "_")
    path = folder / f"{module}-1.0-py3-none-any.whl"
    info = f"{module}-1.0.dist-info"
    metadata = f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n"
    if requires:
        metadata += f"Requires-Dist: {requires}\n"
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr(f"{module}.py", f"NAME = {name!r}\n")
        archive.writestr(f"{info}/METADATA", metadata)
        archive.writestr(
            f"{info}/WHEEL",
            "Wheel-Version: 1.0\nGenerator: t\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
        )
        archive.writestr(f"{info}/RECORD", "")
    data = path.read_bytes()
    return LockedWheel(
        name, "1.0", path.name, path.as_uri(), sha256(data).hexdigest(), "rest", len(data)
    )


def _small_lock(folder: Path) -> Lock:
    folder.mkdir()
    wheels = (_wheel(folder, "probe-app", "probe-lib==1.0"), _wheel(folder, "probe-lib"))
    return Lock(
        "0" * 64, HOST_PYTHON, "x86_64", "2.36", manylinux_platforms("x86_64", "2.36"),
        IndexSettings((), ()), "pip 26.3", "pip==26.3", "0", wheels, None, None,
    )  # fmt: skip


def _venv(path: Path) -> Path:
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True)
    return path / "bin" / "python"


def _uv_install(
    python: Path, pylock: Path, tmp: Path, *, offline: bool = True
) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "UV_CACHE_DIR": str(tmp / "uv-cache"), "UV_NO_CONFIG": "1"}
    return subprocess.run(
        [sys.executable, "-m", "uv", "pip", "install", *(["--offline"] if offline else []),
         "--python", str(python), "-r", str(pylock)],
        capture_output=True, text=True, check=False, env=env,
    )  # fmt: skip


def _pip_install(python: Path, pylock: Path) -> subprocess.CompletedProcess[str]:
    # pip 26.3 (reprobox's own) installing into the fresh venv's interpreter.
    return subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--isolated",
         "--no-index", "--disable-pip-version-check", "-r", str(pylock)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip


def _imports(python: Path) -> str:
    done = subprocess.run(
        [str(python), "-c", "import probe_app, probe_lib; print(probe_app.NAME, probe_lib.NAME)"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    return done.stdout.strip()


@pytest.mark.parametrize("tool", ["uv", "pip"])
def test_the_pylock_installs_into_a_fresh_venv(tool: str, tmp_path: Path) -> None:
    lock = _small_lock(tmp_path / "wheels")
    pylock = write_pylock(lock, tmp_path / "small.lock")
    assert pylock.name == "pylock.small.toml"
    python = _venv(tmp_path / "venv")
    assert _imports(python) == ""  # nothing there before
    done = _uv_install(python, pylock, tmp_path) if tool == "uv" else _pip_install(python, pylock)
    assert done.returncode == 0, done.stderr
    assert _imports(python) == "probe-app probe-lib"


@pytest.mark.parametrize("tool", ["uv", "pip"])
def test_a_pylock_whose_hash_does_not_match_is_refused(tool: str, tmp_path: Path) -> None:
    lock = _small_lock(tmp_path / "wheels")
    wrong = dataclasses.replace(lock.wheels[1], sha256="f" * 64)
    pylock = write_pylock(
        dataclasses.replace(lock, wheels=(lock.wheels[0], wrong)), tmp_path / "x.lock"
    )
    python = _venv(tmp_path / "venv")
    done = _uv_install(python, pylock, tmp_path) if tool == "uv" else _pip_install(python, pylock)
    assert done.returncode != 0
    assert "f" * 64 in done.stderr
    assert _imports(python) == ""


@pytest.mark.network
def test_network_part_of_the_real_cpu_pylock_installs_with_uv_and_pip(tmp_path: Path) -> None:
    # jinja2 and markupsafe of the CPU example, as the real resolver locked them: one wheel
    # from a file index or PyPI, one from PyPI's file host (each install fetches it).
    lock = real_resolve(load_spec(CPU_SPEC))
    wanted = {"jinja2", "markupsafe"}
    part = dataclasses.replace(lock, wheels=tuple(w for w in lock.wheels if w.name in wanted))
    pylock = write_pylock(part, tmp_path / "part.lock")
    for tool in ("uv", "pip"):
        python = _venv(tmp_path / tool)
        if tool == "uv":
            done = _uv_install(python, pylock, tmp_path, offline=False)
        else:
            done = _pip_install(python, pylock)
        assert done.returncode == 0, done.stderr
        listed = subprocess.run(
            [str(python), "-c", "import jinja2, markupsafe; print(jinja2.__version__)"],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert listed.stdout.strip() == part.wheels[0].version
