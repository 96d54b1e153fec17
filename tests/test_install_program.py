"""The recipe's install step (templates/build/reprobox_install.py), without an engine.

It installs with the pypa/installer that `build --assemble` writes its layers with, so that the
rendered Dockerfile gives the assembled image's files. The engine-built proof (`reprobox diff` of
the two images) is in test_assemble.py.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path
from types import ModuleType

import pytest
from test_assemble_layers import (
    EPOCH,
    SITE,
    _locked,
    _target,
    _urlsafe,
    _wheel,
    disk_files,
    layer_files,
)
from test_compile_program import _interpreters

from reprobox.errors import BadInputError
from reprobox.layer_tar import LayerIndex
from reprobox.locked import LockedWheel, requirements_text
from reprobox.pylayer import _Spool, write_wheels
from reprobox.render import _pypa_installer_files

PROGRAM = Path(__file__).parents[1] / "templates" / "build" / "reprobox_install.py"


def _program() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reprobox_install_program", PROGRAM)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _small_wheel(path: Path, name: str, files: dict[str, bytes]) -> Path:
    """A wheel of `files` (and its metadata) named `name` 1.0."""
    dist = f"{name}-1.0"
    files = {
        **files,
        f"{dist}.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.0\n".encode(),
        f"{dist}.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{n},sha256={_urlsafe(d)},{len(d)}" for n, d in files.items()]
    with zipfile.ZipFile(path, "w") as archive:
        for member, data in files.items():
            archive.writestr(member, data)
        archive.writestr(
            f"{dist}.dist-info/RECORD", "\n".join([*record, f"{dist}.dist-info/RECORD,,"]) + "\n"
        )
    return path


def _wheels(folder: Path) -> list[tuple[LockedWheel, Path]]:
    """The fixture wheel of test_assemble_layers and a second one that ships the same
    namespace file (written once)."""
    folder.mkdir(parents=True, exist_ok=True)
    first = _wheel(folder / "demo_pkg-1.0-py3-none-any.whl")
    second = _small_wheel(
        folder / "ns_extra-1.0-py3-none-any.whl",
        "ns_extra",
        {"demo_pkg/__init__.py": b"def main():\n    return 0\n", "ns_extra/x.py": b"Z = 1\n"},
    )
    return [(_locked(first, "demo-pkg")[0], first), (_locked(second, "ns-extra")[0], second)]


def test_the_recipe_installs_the_files_the_assembled_layer_holds(tmp_path: Path) -> None:
    wheels = _wheels(tmp_path / "wheels")
    target = _target(tmp_path / "unused")
    layer_path = tmp_path / "layer.tar"
    index = LayerIndex("opt/venv")
    with contextlib.closing(_Spool(tmp_path)) as spool:
        write_wheels(
            (index, spool),
            None,
            spool_dir=tmp_path,
            target=target,
            wheels=[w for w, _ in wheels],
            files={w.sha256: p for w, p in wheels},
        )
        index.write(layer_path, EPOCH)
    layer = layer_files(layer_path)

    root = tmp_path / "root"
    program = _program()
    schemes = {
        w.name: {key: str(root / value) for key, value in target.scheme(w.name).items()}
        for w, _ in wheels
    }
    python_files = program.install_wheels(
        [(w.name, p) for w, p in wheels],
        schemes,
        "/opt/venv/bin/python",
        root=root / "opt" / "venv",
    )
    disk = disk_files(root)
    assert disk == layer
    assert f"{SITE[1:]}/ns_extra-1.0.dist-info/RECORD" in disk
    assert not [name for name in disk if name.endswith(("/INSTALLER", "/REQUESTED"))]
    # Each `.py` file once, though two wheels ship one of them.
    assert sorted(python_files) == sorted(
        str(root / name) for name in layer if name.endswith(".py")
    )
    assert len(python_files) == len(set(python_files))


def _run_program(
    tmp_path: Path, python: str, requirements: str, *folders: Path, delta: bool = False
) -> subprocess.CompletedProcess[str]:
    pypa = tmp_path / "pypa"
    if not pypa.exists():
        for name, text in _pypa_installer_files().items():
            path = pypa / name.removeprefix("build/pypa/")
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(text, encoding="utf-8")
    listing = tmp_path / "requirements.txt"
    listing.write_text(requirements, encoding="utf-8")
    argv = [
        python,
        str(PROGRAM),
        "--venv",
        str(tmp_path / "venv"),
        "--installer",
        str(tmp_path / "no-pip"),
        "--pypa",
        str(pypa),
        *(arg for folder in folders for arg in ("--wheels", str(folder))),
        "--requirements",
        str(listing),
        "--skeleton",
        str(tmp_path / "venv-skeleton.txt"),
        *(["--delta", str(tmp_path / "delta")] if delta else []),
    ]
    return subprocess.run(argv, capture_output=True, text=True, check=False, timeout=300)


def _py310_and_later() -> list[str]:
    found = []
    for python in _interpreters():
        version = subprocess.run(
            [python, "-c", "import sys; print(sys.version_info >= (3, 10))"],
            capture_output=True,
            text=True,
            check=True,
        )
        if version.stdout.strip() == "True":
            found.append(python)
    return found


@pytest.mark.parametrize("python", _py310_and_later())
def test_the_program_installs_the_hashed_wheels_and_compiles_them(
    tmp_path: Path, python: str
) -> None:
    wheels = _wheels(tmp_path / "wheels")
    done = _run_program(
        tmp_path, python, requirements_text([w for w, _ in wheels]), tmp_path / "wheels"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "2 wheels installed by pypa/installer" in done.stdout
    site = next((tmp_path / "venv" / "lib").glob("python3.*/site-packages"))
    assert (site / "ns_extra-1.0.dist-info" / "RECORD").is_file()
    assert not (site / "demo_pkg-1.0.dist-info" / "INSTALLER").exists()
    pycs = sorted(p.name for p in (site / "demo_pkg" / "__pycache__").glob("*.pyc"))
    assert len(pycs) == 1
    assert pycs[0].startswith("__init__.")
    with (site / "demo_pkg" / "__pycache__" / pycs[0]).open("rb") as pyc:
        flags = int.from_bytes(pyc.read(8)[4:8], "little")
    assert flags == 0b01  # hash-based, unchecked
    tool = (tmp_path / "venv" / "bin" / "demo-tool").read_bytes()
    assert tool.startswith(f"#!{tmp_path / 'venv' / 'bin' / 'python'}\n".encode())


def test_a_wheel_the_requirements_do_not_hash_is_not_installed(tmp_path: Path) -> None:
    wheels = _wheels(tmp_path / "wheels")
    first = wheels[0][0]
    other = LockedWheel(first.name, first.version, first.filename, first.url, "0" * 64, "rest")
    done = _run_program(tmp_path, sys.executable, requirements_text([other]), tmp_path / "wheels")
    assert done.returncode != 0
    assert "no wheel with the sha256 of demo-pkg==1.0" in done.stderr
    assert not list((tmp_path / "venv").glob("lib/python3.*/site-packages/demo_pkg"))


def test_two_different_files_at_one_path_are_refused(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    wheels = []
    for name, body in (("aa_one", b"A = 1\n"), ("bb_two", b"A = 2\n")):
        path = _small_wheel(folder / f"{name}-1.0-py3-none-any.whl", name, {"shared/mod.py": body})
        digest = hashlib.sha256(path.read_bytes()).hexdigest()
        wheels.append(
            LockedWheel(
                name.replace("_", "-"), "1.0", path.name, "https://x.invalid/", digest, "rest"
            )
        )
    done = _run_program(tmp_path, sys.executable, requirements_text(wheels), folder)
    assert done.returncode != 0
    assert "two different files at" in done.stderr
    assert "shared/mod.py" in done.stderr


@pytest.mark.parametrize(
    "line",
    [
        "demo-pkg>=1.0 --hash=sha256:" + "0" * 64,
        "demo-pkg==1.0",
        "demo-pkg==1.0 --hash=md5:" + "0" * 32,
        "--index-url https://example.invalid/simple",
    ],
)
def test_a_requirement_that_is_not_pinned_and_hashed_is_refused(tmp_path: Path, line: str) -> None:
    _wheels(tmp_path / "wheels")
    done = _run_program(tmp_path, sys.executable, line + "\n", tmp_path / "wheels")
    assert done.returncode != 0
    assert "not a pinned, hashed requirement" in done.stderr


def _one(folder: Path, name: str, files: dict[str, bytes], **extra: bytes) -> LockedWheel:
    """A wheel of `files` in `folder`, locked; `extra` members go in as they are named."""
    folder.mkdir(parents=True, exist_ok=True)
    path = _small_wheel(folder / f"{name}-1.0-py3-none-any.whl", name, {**files, **extra})
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    return LockedWheel(
        name.replace("_", "-"), "1.0", path.name, "https://x.invalid/", digest, "rest"
    )


@pytest.mark.parametrize("python", _py310_and_later())
def test_a_file_the_upper_stage_replaces_gets_its_own_pyc(tmp_path: Path, python: str) -> None:
    """The rest stage replaces a `.py` file of the torch stage: its pyc is compiled again, not
    the lower one kept (an unchecked-hash pyc is never compared with its source)."""
    lower = _one(tmp_path / "lower", "aa_low", {"shared/mod.py": b"VALUE = 'lower'\n"})
    done = _run_program(tmp_path, python, requirements_text([lower]), tmp_path / "lower")
    assert done.returncode == 0, done.stderr
    upper = _one(tmp_path / "upper", "bb_up", {"shared/mod.py": b"VALUE = 'upper'\n"})
    done = _run_program(
        tmp_path, python, requirements_text([upper]), tmp_path / "upper", delta=True
    )
    assert done.returncode == 0, done.stderr
    site = next((tmp_path / "venv" / "lib").glob("python3.*/site-packages"))
    run = subprocess.run(
        [str(tmp_path / "venv" / "bin" / "python"), "-c", "import shared.mod as m; print(m.VALUE)"],
        capture_output=True,
        text=True,
        check=True,
        cwd=tmp_path,
        env={"PYTHONPATH": ""},
    )
    assert run.stdout.strip() == "upper"
    pyc = next((site / "shared" / "__pycache__").glob("mod.*.pyc"))
    assert b"upper" in pyc.read_bytes()
    delta = tmp_path / "delta" / pyc.relative_to("/")
    assert delta.is_file(), "the replaced file's pyc goes to the upper layer"


@pytest.mark.parametrize(
    "extra",
    [
        # Through the venv's lib64 link, onto another wheel's file.
        {"evil-1.0.data/data/lib64/python3.X/site-packages/demo_pkg/__init__.py": b"X = 1\n"},
        # A console script named like the venv's own interpreter.
        {"evil-1.0.dist-info/entry_points.txt": b"[console_scripts]\npython = evil:main\n"},
        # The venv's own configuration.
        {"evil-1.0.data/data/pyvenv.cfg": b"home = /tmp\n"},
    ],
    ids=["through-lib64", "bin-python", "pyvenv-cfg"],
)
def test_a_wheel_may_not_replace_the_venvs_own_files_in_either_route(
    tmp_path: Path, extra: dict[str, bytes]
) -> None:
    version = f"{sys.version_info[0]}.{sys.version_info[1]}"
    extra = {name.replace("3.X", version): data for name, data in extra.items()}
    evil = _one(tmp_path / "wheels", "evil", {"evil.py": b"def main():\n    return 0\n"}, **extra)
    # The recipe's step, in the rest stage (the venv and its skeleton list made before).
    done = _run_program(tmp_path, sys.executable, "", tmp_path / "wheels")
    assert done.returncode == 0, done.stderr
    if "lib64" in next(iter(extra)):
        assert (tmp_path / "venv" / "lib64").is_symlink(), "CPython's venv on Linux makes it"
    done = _run_program(
        tmp_path, sys.executable, requirements_text([evil]), tmp_path / "wheels", delta=True
    )
    assert done.returncode != 0
    assert "the venv's own" in done.stderr or "would land through a link" in done.stderr
    # The assembled route, with the same venv's skeleton.
    skeleton = tmp_path / "skeleton.tar"
    with tarfile.open(skeleton, "w") as tar:
        tar.add(tmp_path / "venv", arcname="venv")
    target = _target(skeleton)
    with (
        contextlib.closing(_Spool(tmp_path)) as spool,
        pytest.raises(BadInputError, match=r"the venv's own|would land through a link"),
    ):
        write_wheels(
            (LayerIndex("opt/venv"), spool),
            None,
            spool_dir=tmp_path,
            target=target,
            wheels=[evil],
            files={evil.sha256: tmp_path / "wheels" / evil.filename},
        )


def test_two_requirements_with_one_sha256_are_refused(tmp_path: Path) -> None:
    wheels = _wheels(tmp_path / "wheels")
    first = wheels[0][0]
    twin = LockedWheel("twin", "1.0", first.filename, first.url, first.sha256, "rest")
    done = _run_program(
        tmp_path, sys.executable, requirements_text([first, twin]), tmp_path / "wheels"
    )
    assert done.returncode != 0
    assert "shares its sha256 with another requirement" in done.stderr
