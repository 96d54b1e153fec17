"""`reprobox init --from FILE`: a spec of exact pins from requirements.txt, pyproject.toml, uv.lock
and pylock.toml, and clear refusals of what cannot be pinned.

Files whose requirements are all exact need no network: nothing is resolved. Ranges, and the
uv.lock / pylock.toml that uv itself writes, are `network` tests.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from cli import reprobox

from reprobox.errors import EXIT_BAD_INPUT, ReproboxError
from reprobox.init_from import spec_from_project
from reprobox.lockfile import read_lockfile
from reprobox.spec import Spec
from reprobox.spec_load import parse_spec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def _spec(text: str) -> Spec:
    return parse_spec(text)


def _write(folder: Path, name: str, text: str) -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


# --- requirements.txt ---------------------------------------------------------------------------


def test_a_pinned_requirements_file_becomes_a_spec_of_the_same_pins(tmp_path: Path) -> None:
    _write(tmp_path, "base.txt", "tokenizers==0.20.3\n")
    path = _write(
        tmp_path,
        "requirements.txt",
        "# a paper's environment\n"
        "--index-url https://mirror.example/simple\n"
        "-f ./wheels\n"
        "-r base.txt\n"
        "torch==2.5.1+cu121 \\\n    --hash=sha256:" + "a" * 64 + "\n"
        "transformers==4.46.3\n"
        "accelerate[torch]==1.1.1  # used for training\n"
        "nvidia-cudnn-cu12==9.1.0.70\n"
        "triton==3.1.0\n"
        'colorama==0.4.6; sys_platform == "win32"\n'
        'tomli==2.0.1; python_version < "3.11"\n'
        "pip==24.0\n",
    )
    text = spec_from_project(path, arch="x86_64")
    spec = _spec(text)
    assert spec.torch.version == "2.5.1"
    assert spec.torch.cuda == "12.1"  # from the +cu121 label
    assert spec.transformers == "4.46.3"
    # Exact pins as written; markers evaluated for the image (Linux, Python 3.11); torch's CUDA
    # stack and pip left to the lock and to reprobox.
    assert spec.packages == ("accelerate[torch]==1.1.1", "tokenizers==0.20.3")
    assert spec.index.url == "https://mirror.example/simple"
    assert spec.index.find_links == ("./wheels",)  # as written: relative to the spec
    assert spec.base.bootstrap == "debian:bookworm"
    assert "# Every requirement was pinned already; nothing was resolved." in text
    assert "nvidia-cudnn-cu12, triton" in text


def test_pypi_torch_without_a_label_takes_that_release_s_pypi_cuda(tmp_path: Path) -> None:
    path = _write(tmp_path, "requirements.txt", "torch==2.5.1\n")
    assert _spec(spec_from_project(path, arch="x86_64")).torch.cuda == "12.4"
    assert _spec(spec_from_project(path, cuda="cpu", arch="x86_64")).torch.cuda == "cpu"


@pytest.mark.parametrize(
    ("line", "problem"),
    [
        ("-e ./src", "an editable install is a local checkout"),
        ("--editable=git+https://github.com/x/foo#egg=foo", "an editable install"),
        ("./vendor/foo", "a local path is not on any index"),
        ("foo @ file:///wheels/foo-1.0-py3-none-any.whl", "a local path is not on any index"),
        ("git+https://github.com/x/foo@main#egg=foo", "a VCS URL without a commit"),
        ("foo @ git+https://github.com/x/foo", "a VCS URL without a commit"),
        (f"foo @ git+https://github.com/x/foo@{COMMIT}", "a VCS URL is not a wheel on an index"),
        ("foo @ https://example.com/foo-1.0-py3-none-any.whl", "a direct URL"),
        ("-c constraints.txt", "a constraints file would change what resolves"),
        ("--no-binary :all:", "not one reprobox can carry into a spec"),
        ("--pre", "not one reprobox can carry into a spec"),
    ],
)
def test_what_cannot_be_pinned_is_refused_naming_file_and_line(
    tmp_path: Path, line: str, problem: str
) -> None:
    path = _write(tmp_path, "requirements.txt", f"numpy==2.4.6\n\n{line}\n")
    out = tmp_path / "spec.yaml"
    done = reprobox("init", "--from", path, "-o", out)
    assert done.code == EXIT_BAD_INPUT, done.stderr
    assert f"{path}:3: " in done.stderr
    assert problem in done.stderr
    assert "Traceback" not in done.stderr
    assert not out.exists()  # nothing written


def test_init_from_writes_the_spec_and_never_overwrites_one(tmp_path: Path) -> None:
    path = _write(tmp_path, "requirements.txt", "torch==2.13.0+cpu\nnumpy==2.4.6\n")
    out = tmp_path / "spec.yaml"
    done = reprobox("init", "--from", path, "-o", out, "--name", "Paper Code")
    assert done.code == 0, done.stderr
    spec = _spec(out.read_text(encoding="utf-8"))
    assert (spec.name, spec.torch.version, spec.torch.cuda) == ("paper-code", "2.13.0", "cpu")
    again = reprobox("init", "--from", path, "-o", out)
    assert again.code == EXIT_BAD_INPUT
    assert "already exists" in again.stderr


def test_a_python_no_bootstrap_base_has_needs_a_base_image(tmp_path: Path) -> None:
    path = _write(tmp_path, "requirements.txt", "torch==2.5.1\n")
    with pytest.raises(ReproboxError, match="no Debian base"):
        spec_from_project(path, python="3.12", arch="x86_64")
    image = "nvidia/cuda:12.4.1-runtime-ubuntu22.04@sha256:" + "0" * 64
    spec = _spec(spec_from_project(path, python="3.12", base_image=image, arch="x86_64"))
    assert (spec.python, spec.base.image) == ("3.12", image)


# --- pyproject.toml ------------------------------------------------------------------------------

_PYPROJECT = """\
[project]
name = "paper_code"
version = "0.1"
dependencies = [
    "torch==2.13.0+cpu",
    "numpy==2.4.6",
    'tomli==2.0.1; python_version < "3.11"',
]

[project.optional-dependencies]
plot = ["pyparsing==3.2.0"]

[dependency-groups]
test = ["iniconfig==2.0.0"]
dev = [{include-group = "test"}, "six==1.17.0"]
"""


def test_pyproject_dependencies_and_the_groups_asked_for(tmp_path: Path) -> None:
    path = _write(tmp_path, "pyproject.toml", _PYPROJECT)
    plain = _spec(spec_from_project(path, arch="x86_64"))
    assert plain.name == "paper-code"
    assert plain.packages == ("numpy==2.4.6",)
    grouped = _spec(spec_from_project(path, groups=["plot", "dev"], arch="x86_64"))
    assert grouped.packages == (
        "iniconfig==2.0.0",  # through dev's include-group
        "numpy==2.4.6",
        "pyparsing==3.2.0",
        "six==1.17.0",
    )


def test_pyproject_refuses_an_unknown_group_and_a_path_dependency(tmp_path: Path) -> None:
    path = _write(tmp_path, "pyproject.toml", _PYPROJECT)
    with pytest.raises(
        ReproboxError, match="no optional dependencies or dependency group named 'gpu'"
    ) as err:
        spec_from_project(path, groups=["gpu"], arch="x86_64")
    assert err.value.hint == "known: dev, plot, test"
    local = _write(
        tmp_path,
        "pyproject.toml",
        _PYPROJECT.replace('"numpy==2.4.6",', '"mylib @ file:///src/mylib",'),
    )
    with pytest.raises(
        ReproboxError, match=r"pyproject.toml:6: mylib @ file:///src/mylib cannot be pinned"
    ):
        spec_from_project(local, arch="x86_64")


# --- uv.lock ------------------------------------------------------------------------------------

_UV_LOCK = """\
version = 1
revision = 3
requires-python = ">=3.11"

[[package]]
name = "colorama"
version = "0.4.6"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "numpy"
version = "2.4.6"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "paper-code"
version = "0.1.0"
source = { virtual = "." }
dependencies = [
    { name = "numpy" },
    { name = "colorama", marker = "sys_platform == 'win32'" },
    { name = "torch" },
]

[package.dev-dependencies]
dev = [{ name = "six" }]

[[package]]
name = "six"
version = "1.17.0"
source = { registry = "https://pypi.org/simple" }

[[package]]
name = "torch"
version = "2.13.0"
source = { registry = "https://pypi.org/simple" }
dependencies = [{ name = "nvidia-cublas", marker = "sys_platform == 'linux'" }]

[[package]]
name = "nvidia-cublas"
version = "13.1.0.3"
source = { registry = "https://pypi.org/simple" }
"""


def test_uv_lock_pins_the_project_closure_for_the_image(tmp_path: Path) -> None:
    path = _write(tmp_path, "uv.lock", _UV_LOCK)
    spec = _spec(spec_from_project(path, cuda="cpu", arch="x86_64"))
    assert spec.torch.version == "2.13.0"
    assert spec.packages == ("numpy==2.4.6",)  # no colorama (Windows), no CUDA stack
    dev = _spec(spec_from_project(path, groups=["dev"], cuda="cpu", arch="x86_64"))
    assert dev.packages == ("numpy==2.4.6", "six==1.17.0")


def test_uv_lock_refuses_a_git_source_even_at_a_commit(tmp_path: Path) -> None:
    text = _UV_LOCK.replace(
        'name = "six"\nversion = "1.17.0"\nsource = { registry = "https://pypi.org/simple" }',
        f'name = "six"\nversion = "1.17.0"\nsource = {{ git = "https://github.com/x/six?rev=main#{COMMIT}" }}',
    )
    path = _write(tmp_path, "uv.lock", text)
    with pytest.raises(ReproboxError) as err:
        spec_from_project(path, groups=["dev"], cuda="cpu", arch="x86_64")
    assert f"{path}:29: six @ git+https://github.com/x/six" in err.value.message
    assert "a VCS URL is not a wheel on an index" in err.value.message


# --- pylock.toml --------------------------------------------------------------------------------

_PYLOCK = """\
lock-version = "1.0"
created-by = "hand"
requires-python = ">=3.11"

[[packages]]
name = "numpy"
version = "2.4.6"
wheels = [{ url = "https://files.example/numpy-2.4.6-cp311-cp311-manylinux_2_27_x86_64.manylinux_2_28_x86_64.whl", hashes = { sha256 = "%s" } }]

[[packages]]
name = "torch"
version = "2.13.0"
marker = "sys_platform == 'linux'"
wheels = [{ url = "https://files.example/torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl", hashes = { sha256 = "%s" } }]

[[packages]]
name = "pywin32"
version = "311"
marker = "sys_platform == 'win32'"
wheels = [{ url = "https://files.example/pywin32-311-cp311-cp311-win_amd64.whl", hashes = { sha256 = "%s" } }]
""".replace("%s", "a" * 64)


def test_pylock_pins_what_it_selects_for_the_image(tmp_path: Path) -> None:
    path = _write(tmp_path, "pylock.toml", _PYLOCK)
    spec = _spec(spec_from_project(path, cuda="cpu", arch="x86_64"))
    assert spec.torch.version == "2.13.0"
    assert spec.packages == ("numpy==2.4.6",)


def test_pylock_refuses_a_vcs_package_and_a_file_that_is_not_pep_751(tmp_path: Path) -> None:
    vcs = _PYLOCK + (
        '\n[[packages]]\nname = "mylib"\n'
        f'vcs = {{ type = "git", url = "https://github.com/x/mylib", commit-id = "{COMMIT}" }}\n'
    )
    path = _write(tmp_path, "pylock.toml", vcs)
    with pytest.raises(
        ReproboxError, match=r"pylock.toml:2\d: mylib @ https://github.com/x/mylib cannot be pinned"
    ):
        spec_from_project(path, cuda="cpu", arch="x86_64")
    broken = _write(tmp_path, "pylock.x.toml", _PYLOCK.replace('lock-version = "1.0"\n', ""))
    with pytest.raises(ReproboxError, match=r"not a valid pylock\.toml"):
        spec_from_project(broken, cuda="cpu", arch="x86_64")


# --- with the real resolver and uv ----------------------------------------------------------------


@pytest.mark.network
def test_network_ranges_are_resolved_once_for_the_image_and_said_so(tmp_path: Path) -> None:
    path = _write(tmp_path, "requirements.txt", "torch==2.13.0+cpu\nnumpy>=2.2,<2.3\n")
    text = spec_from_project(path, arch="x86_64")
    (pin,) = _spec(text).packages
    assert pin.startswith("numpy==2.2.")
    said = " ".join(text.replace("#", " ").split())  # the comment, unwrapped
    assert f"numpy <2.3,>=2.2 -> {pin.removeprefix('numpy==')}" in said
    assert "by pip for the image's platform (Python 3.11, Linux x86_64, glibc 2.36)" in said


_PROJECT = """\
[project]
name = "paper-code"
version = "0.1.0"
requires-python = ">=3.11"
dependencies = ["torch==2.5.1", "transformers==4.46.3", "numpy>=2,<2.3"]

[dependency-groups]
dev = ["six==1.17.0"]
"""


def _uv(*argv: str, cwd: Path) -> None:
    env = {**os.environ, "UV_CACHE_DIR": str(cwd / ".uv-cache")}
    done = subprocess.run(
        [sys.executable, "-m", "uv", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


@pytest.mark.network
def test_network_uv_lock_and_its_pylock_become_the_same_spec_and_it_locks(tmp_path: Path) -> None:
    _write(tmp_path, "pyproject.toml", _PROJECT)
    _uv("lock", "--python", "3.11", cwd=tmp_path)
    _uv("export", "--format", "pylock.toml", "--group", "dev", "-o", "pylock.toml", cwd=tmp_path)
    spec_path = tmp_path / "spec.yaml"
    done = reprobox("init", "--from", tmp_path / "uv.lock", "--group", "dev", "-o", spec_path)
    assert done.code == 0, done.stderr
    from_uv = spec_path.read_text(encoding="utf-8")
    from_pylock = spec_from_project(tmp_path / "pylock.toml", name="paper-code")
    # The same pins from both of uv's files (only the first comment line names the file).
    assert from_uv.splitlines()[1:] == from_pylock.splitlines()[1:]
    spec = _spec(from_uv)
    assert (spec.torch.version, spec.torch.cuda, spec.transformers) == ("2.5.1", "12.4", "4.46.3")
    assert "six==1.17.0" in spec.packages
    # ... and the spec locks, with the versions uv chose.
    locked = reprobox("lock", spec_path)
    assert locked.code == 0, locked.stderr
    lock = read_lockfile(tmp_path / "spec.lock").lock
    numpy = next(p for p in spec.packages if p.startswith("numpy=="))
    assert lock.wheel("numpy") is not None
    assert f"numpy=={lock.wheel('numpy').version}" == numpy  # type: ignore[union-attr]
    assert lock.torch_cudnn == "9.1.0.70"
