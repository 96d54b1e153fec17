"""Rendering: golden Dockerfiles for every example, byte-identical re-renders, inert values."""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import replace
from pathlib import Path

import pytest

from reprobox._lockfile import IndexSettings, Lock, LockedWheel, format_lock
from reprobox.errors import ReproboxError
from reprobox.render import dockerfile_quote, render_context, starter_spec
from reprobox.spec import Spec, load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = Path(__file__).parent / "golden"
EXAMPLES = sorted((ROOT / "images").glob("*.yaml"))
BASE_ID = "sha256:" + "b" * 64


def _wheel(name: str, version: str, group: str, tag: str = "py3-none-any") -> LockedWheel:
    filename = f"{name.replace('-', '_')}-{version}-{tag}.whl"
    digest = hashlib.sha256(filename.encode()).hexdigest()
    return LockedWheel(name, version, filename, f"https://files.example/{filename}", digest, group)


def fake_lock(spec: Spec) -> Lock:
    """A lock shaped like a real one, made without resolving (rendering is what is tested here)."""
    torch_version = spec.torch.version + ("+cpu" if not spec.torch.is_cuda else "")
    wheels = [
        _wheel("pip", "26.3", "installer"),
        _wheel("torch", torch_version, "torch", "cp311-cp311-manylinux_2_28_x86_64"),
        _wheel("filelock", "4.2.11", "torch"),
    ]
    if spec.torch.is_cuda:
        wheels.append(
            _wheel(
                "nvidia-cudnn-cu12",
                spec.torch.cudnn or "9.1.0.70",
                "torch",
                "py3-none-manylinux2014_x86_64",
            )
        )
    if spec.transformers:
        wheels.append(_wheel("transformers", spec.transformers, "rest"))
    for pin in spec.packages:
        name, version = pin.split("==")
        wheels.append(_wheel(name, version, "rest"))
    return Lock(
        spec_sha256=spec.sha256,
        python=spec.python,
        arch="x86_64",
        glibc="2.36",
        platforms=("manylinux_2_28_x86_64",),
        index=IndexSettings(("https://pypi.org/simple",)),
        resolver="pip 26.3",
        installer="pip==26.3",
        reprobox_version="0.1.0",
        wheels=tuple(sorted(wheels, key=lambda w: w.name)),
        torch_cuda=spec.torch.cuda if spec.torch.is_cuda else None,
        torch_cudnn=spec.torch.cudnn,
    )


def _render(spec: Spec, out: Path) -> str:
    lock = fake_lock(spec)
    render_context(spec, lock, format_lock(lock), out, base_ref=spec.base.image or BASE_ID)
    return (out / "Dockerfile").read_text()


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_golden_dockerfile(path: Path, tmp_path: Path) -> None:
    spec = load_spec(path).model_copy(update={"source": None})  # no machine path in the golden
    rendered = _render(spec, tmp_path / "ctx")
    golden = GOLDEN / f"{path.stem}.Dockerfile"
    if os.environ.get("REPROBOX_UPDATE_GOLDEN") == "1":
        golden.write_text(rendered)
    assert rendered == golden.read_text(), (
        f"re-render with REPROBOX_UPDATE_GOLDEN=1 if {golden.name} should change"
    )


def _instructions(dockerfile: str) -> list[str]:
    """Dockerfile instructions, continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for line in dockerfile.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        pending += line
        if pending.endswith("\\"):
            pending = pending[:-1]
            continue
        out.append(pending)
        pending = ""
    return out


def test_dockerfile_pins_everything_the_spec_says(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "images" / "cuda-12.4.yaml")
    instructions = _instructions(_render(spec, tmp_path / "ctx"))
    froms = [i for i in instructions if i.startswith("FROM ")]
    assert froms == [f"FROM {BASE_ID} AS torch", "FROM torch AS rest", f"FROM {BASE_ID}"]
    env = next(i for i in instructions if i.startswith("ENV "))
    for expected in [
        'PYTHONHASHSEED="1234"',
        'OMP_NUM_THREADS="4"',
        'MKL_NUM_THREADS="4"',
        'OMP_DYNAMIC="FALSE"',
        'MKL_DYNAMIC="FALSE"',
        'GOMP_CPU_AFFINITY="0-3"',
        'CUBLAS_WORKSPACE_CONFIG=":4096:8"',
        'REPROBOX_SEED="1234"',
        'NVIDIA_VISIBLE_DEVICES="all"',
        'NVIDIA_DRIVER_CAPABILITIES="compute,utility"',
        'NVIDIA_REQUIRE_CUDA="cuda>=12.4 driver>=525.60.13"',
        'HF_HUB_OFFLINE="1"',
    ]:
        assert expected in env
    assert instructions[-1].startswith("LABEL "), "labels go last"
    labels = _pairs(instructions, "LABEL")
    assert labels["org.opencontainers.image.title"] == "cuda-12-4"
    assert labels["reprobox.spec-sha256"] == spec.sha256
    assert re.fullmatch("[0-9a-f]{64}", labels["reprobox.lock-sha256"])
    assert re.fullmatch(r"202[0-4]-[0-9-]{5}T00:00:00Z", labels["org.opencontainers.image.created"])
    requirements = (tmp_path / "ctx" / "requirements" / "torch.txt").read_text()
    assert "nvidia-cudnn-cu12==9.1.0.70 \\\n    --hash=sha256:" in requirements
    assert "transformers==4.46.3" in (tmp_path / "ctx" / "requirements" / "rest.txt").read_text()


def test_cpu_image_sets_no_nvidia_variables(tmp_path: Path) -> None:
    dockerfile = _render(load_spec(ROOT / "images" / "demo-cpu.yaml"), tmp_path / "ctx")
    assert "NVIDIA_" not in dockerfile


def test_build_only_files_stay_out_of_the_final_stage(tmp_path: Path) -> None:
    instructions = _instructions(
        _render(load_spec(ROOT / "images" / "demo-cpu.yaml"), tmp_path / "ctx")
    )
    final = instructions[max(i for i, ins in enumerate(instructions) if ins.startswith("FROM ")) :]
    copies = [i for i in final if i.startswith("COPY ")]
    assert copies == [
        "COPY --from=torch /opt/venv /opt/venv",
        "COPY --from=rest /reprobox-delta/ /",
        "COPY image/ /opt/reprobox/",
    ]


def test_render_twice_is_byte_identical(tmp_path: Path) -> None:
    spec = load_spec(ROOT / "images" / "demo-cpu.yaml")

    def tree(root: Path) -> dict[str, bytes]:
        return {
            str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
        }

    _render(spec, tmp_path / "a")
    _render(spec, tmp_path / "b")
    first, second = tree(tmp_path / "a"), tree(tmp_path / "b")
    assert first == second
    assert {
        "Dockerfile",
        "image/reprobox_hook.py",
        "image/reprobox_selfcheck.py",
        "image/reprobox_inference.py",
        "image/reprobox_generation.py",
        "image/reprobox_decoder.py",
        "image/reprobox.lock",
    } <= set(first)


def test_render_refuses_a_non_empty_directory(tmp_path: Path) -> None:
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "keep.txt").write_text("mine")
    with pytest.raises(ReproboxError, match="is not empty"):
        _render(load_spec(ROOT / "images" / "demo-cpu.yaml"), tmp_path / "ctx")
    assert (tmp_path / "ctx" / "keep.txt").read_text() == "mine"


HOSTILE_ENV = {
    "NEWLINE_FREE_BUT_NASTY": '" && RUN id && "',
    "SUBSTITUTION": "$(id) ${HOME} $HOME `id`",
    "CONTINUATION": "trailing backslash \\",
    "HASH": "# not a comment",
    "QUOTES": 'it\'s "quoted"',
}


def _pairs(instructions: list[str], keyword: str = "ENV") -> dict[str, str]:
    """The one ENV (or LABEL) instruction read back as the builder reads it; fails on anything else in it."""
    (env,) = [i for i in instructions if i.startswith(f"{keyword} ")]
    word = r'([A-Za-z_][A-Za-z0-9_.-]*)="((?:[^"\\$]|\\["\\$])*)"'
    assert re.fullmatch(rf"{keyword}(?:\s+{word})+\s*", env), env
    return {k: re.sub(r'\\(["\\$])', r"\1", v) for k, v in re.findall(word, env)}


def test_hostile_env_values_add_no_instruction(tmp_path: Path) -> None:
    demo = (ROOT / "images" / "demo-cpu.yaml").read_text()
    plain = _instructions(_render(parse_spec(demo), tmp_path / "plain"))
    env_yaml = "env:\n" + "".join(
        f"  {k}: {dockerfile_quote(v)}\n".replace("\\$", "$") for k, v in HOSTILE_ENV.items()
    )
    spec = parse_spec(demo.replace("env: {}", env_yaml.rstrip("\n")))
    assert dict(spec.env) == HOSTILE_ENV
    hostile = _instructions(_render(spec, tmp_path / "hostile"))
    assert [i.split()[0] for i in hostile] == [i.split()[0] for i in plain], (
        "same instructions, in order"
    )
    assert _pairs(hostile) == _pairs(plain) | HOSTILE_ENV


def test_starter_spec_renders(tmp_path: Path) -> None:
    for torch, cuda in [("2.13.0", "cpu"), ("2.5.1", "12.4"), ("2.5.1", "cpu")]:
        text = starter_spec(torch=torch, cuda=cuda)
        spec = parse_spec(text)
        assert spec.torch.version == torch
        assert spec.torch.cuda == cuda
        _render(spec, tmp_path / f"{torch}-{cuda}")


def test_starter_spec_refuses_an_impossible_combination() -> None:
    with pytest.raises(ReproboxError, match=r"never shipped for CUDA 12\.6"):
        starter_spec(torch="2.5.1", cuda="12.6")


def _torch_stage(dockerfile: str) -> list[str]:
    instructions = _instructions(dockerfile)
    return instructions[
        : next(i for i, ins in enumerate(instructions) if ins.startswith("FROM torch AS rest"))
    ]


def test_a_small_pin_change_leaves_the_torch_stage_and_its_dates_alone(tmp_path: Path) -> None:
    demo = (ROOT / "images" / "demo-cpu.yaml").read_text()
    spec_a = parse_spec(demo)
    spec_b = parse_spec(demo.replace("numpy==2.4.6", "numpy==2.4.5"))
    lock_a, lock_b = fake_lock(spec_a), fake_lock(spec_b)
    ctx_a = render_context(spec_a, lock_a, format_lock(lock_a), tmp_path / "a", base_ref=BASE_ID)
    ctx_b = render_context(spec_b, lock_b, format_lock(lock_b), tmp_path / "b", base_ref=BASE_ID)
    assert ctx_a.lock_sha256 != ctx_b.lock_sha256
    # Same instructions and same inputs for the torch stage: the engine's cache holds, and the
    # normalised torch layer (mtimes clamped to the epoch) stays byte for byte the same.
    assert _torch_stage((tmp_path / "a" / "Dockerfile").read_text()) == _torch_stage(
        (tmp_path / "b" / "Dockerfile").read_text()
    )
    assert (tmp_path / "a" / "requirements" / "torch.txt").read_bytes() == (
        tmp_path / "b" / "requirements" / "torch.txt"
    ).read_bytes()
    assert ctx_a.source_date_epoch == ctx_b.source_date_epoch
    # The control: a change inside torch's closure moves the epoch.
    heavier = replace(lock_a, wheels=(*lock_a.wheels, _wheel("sympy", "1.14.0", "torch")))
    ctx_c = render_context(spec_a, heavier, format_lock(heavier), tmp_path / "c", base_ref=BASE_ID)
    assert ctx_c.source_date_epoch != ctx_a.source_date_epoch
