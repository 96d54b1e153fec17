"""Rendering: golden Dockerfiles for every example, byte-identical re-renders, inert values."""

from __future__ import annotations

import hashlib
import os
import re
import shlex
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from engine_admin import remove_image

from reprobox.bootstrap import BaseImage
from reprobox.docker_engine import DockerEngine
from reprobox.dockerfile import dockerfile_quote, from_reference, shell_word
from reprobox.errors import EXIT_BAD_INPUT, ReproboxError
from reprobox.locked import IndexSettings, Lock, LockedWheel
from reprobox.lockfile import LockFile, format_lock
from reprobox.render import (
    _environment,
    _inputs_sha256,
    _wheel_plan,
    _write_tree,
    render_context,
    starter_spec,
)
from reprobox.spec import Spec
from reprobox.spec_load import load_spec, parse_spec

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
    render_context(spec, LockFile.of(lock), out, base_ref=spec.base.image or BASE_ID)
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
    ctx_a = render_context(spec_a, LockFile.of(lock_a), tmp_path / "a", base_ref=BASE_ID)
    ctx_b = render_context(spec_b, LockFile.of(lock_b), tmp_path / "b", base_ref=BASE_ID)
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
    ctx_c = render_context(spec_a, LockFile.of(heavier), tmp_path / "c", base_ref=BASE_ID)
    assert ctx_c.source_date_epoch != ctx_a.source_date_epoch


def test_the_inputs_digest_names_what_the_context_holds(tmp_path: Path) -> None:
    """`build` skips the engine's build where this digest and the image it gave are known: it
    is the same wherever the context is written, and moves with any pin, file or wheel."""
    demo = (ROOT / "images" / "demo-cpu.yaml").read_text()
    spec = parse_spec(demo)
    lock = fake_lock(spec)
    wheels: dict[str, Path] = {}
    (tmp_path / "wheels").mkdir()

    def digest(folder: str, the_spec: Spec = spec, the_lock: Lock = lock) -> str:
        for wheel in the_lock.wheels:
            wheels[wheel.sha256] = tmp_path / "wheels" / wheel.filename
            wheels[wheel.sha256].write_bytes(b"stands in for a wheel")
        rendered = render_context(
            the_spec, LockFile.of(the_lock), tmp_path / folder, base_ref=BASE_ID, wheels=wheels
        )
        return rendered.inputs_sha256

    first = digest("a")
    assert digest("b") == first, "where it is written changes nothing"
    # The controls: a pin, a file's bytes, the modes written, the base, a wheel's sha256, the
    # wheels' absence.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr("reprobox.render._spec_text", lambda spec: "other: text\n")
        assert digest("g") != first
    # Written under another umask, the context holds the same modes (COPY keeps them: the
    # recipe's `/opt/reprobox` layer would follow the host's umask).
    for umask in (0o077, 0o002):
        mask = os.umask(umask)
        try:
            assert digest(f"h{umask:o}") == first
        finally:
            os.umask(mask)
        written = tmp_path / f"h{umask:o}" / "image"
        assert {p.stat().st_mode & 0o777 for p in written.rglob("*") if p.is_file()} == {0o644}
        assert written.stat().st_mode & 0o777 == 0o755
    # A mode that differs is another input (the digest read again from the context as it
    # lies, first unchanged).
    plan = _wheel_plan(lock)

    def read_again(out: Path) -> str:
        files = {
            path.relative_to(out).as_posix(): path.read_text(encoding="utf-8")
            for path in out.rglob("*")
            if path.is_file() and path.relative_to(out).as_posix() not in plan
        }
        return _inputs_sha256(out, files, plan)

    assert read_again(tmp_path / "a") == first
    (tmp_path / "a" / "image" / "reprobox_hook.py").chmod(0o600)
    assert read_again(tmp_path / "a") != first
    other_pin = parse_spec(demo.replace("numpy==2.4.6", "numpy==2.4.5"))
    assert digest("c", other_pin, fake_lock(other_pin)) != first
    assert (
        render_context(spec, LockFile.of(lock), tmp_path / "d", base_ref=BASE_ID).inputs_sha256
        != first
    )
    assert (
        render_context(
            spec, LockFile.of(lock), tmp_path / "e", base_ref="sha256:" + "9" * 64, wheels=wheels
        ).inputs_sha256
        != first
    )
    other_wheel = replace(lock.wheels[0], sha256="f" * 64)
    assert digest("f", spec, replace(lock, wheels=(other_wheel, *lock.wheels[1:]))) != first


# -- the second wall: every value quoted where it enters the Dockerfile (issue 12) -------------

#: Values that would change a Dockerfile or a shell command if they went in unquoted.
NASTY = [
    '" && RUN id && "',
    "$(id) ${HOME} $HOME `id`",
    "trailing backslash \\",
    "\\",
    "\\\\",
    '\\"',
    "\\$HOME",
    "# not a comment",
    "it's 'single' and \"double\"",
    "a;b|c&d>e<f*g?h[i]j{k}l~m!n",
    "-rf",
    " leading and trailing ",
    "ünïcödé ✓",
]


@pytest.mark.parametrize("value", ["a\nRUN id", "a\rb", "x\u2028y", "\x00", "\u202e"])
@pytest.mark.parametrize("name", ["dq", "key", "sh", "ref"])
def test_every_filter_refuses_line_breaks_and_control_characters(name: str, value: str) -> None:
    with pytest.raises(ReproboxError, match="refusing to render"):
        _environment().filters[name](value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("key", "A B"),
        ("key", "A=B"),
        ("key", ""),
        ("key", '"A"'),
        ("sh", "-x"),
        ("sh", ""),
        ("ref", "base AS torch"),
        ("ref", "$BASE"),
        ("ref", "--platform=linux/arm64 base"),
        ("ref", "Base:1"),
    ],
)
def test_unquotable_places_refuse_anything_but_a_plain_word(name: str, value: str) -> None:
    with pytest.raises(ReproboxError, match="refusing to render"):
        _environment().filters[name](value)


@pytest.mark.parametrize("value", NASTY)
def test_shell_words_stay_one_literal_word(value: str) -> None:
    if value.startswith("-"):
        return  # refused above: an option is never a package
    assert shlex.split(f"apt-get install {shell_word(value)} && true") == [
        "apt-get",
        "install",
        value,
        "&&",
        "true",
    ]


def test_from_takes_ids_pinned_references_and_stage_names() -> None:
    for ref in [
        BASE_ID,
        "torch",
        "reprobox/base:bookworm",
        f"nvidia/cuda:12.4.1@sha256:{'0' * 64}",
    ]:
        assert from_reference(ref) == ref


@pytest.mark.docker
def test_the_engine_reads_quoted_values_back_literally(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    """The engine's own reading, not ours: ENV, LABEL and RUN words come back exactly as given."""
    words = [v for v in NASTY if not v.startswith("-")]
    template = (
        "FROM {{ base | ref }}\n"
        "RUN printf '%s\\n' {{ words | map('sh') | join(' ') }} > /words.txt\n"
        "ENV {% for v in words %}V{{ loop.index }}={{ v | dq }} {% endfor %}\n\n"
        "LABEL {% for v in words %}{{ ('x.v' ~ loop.index) | key }}={{ v | dq }} {% endfor %}\n"
    )
    context = tmp_path / "ctx"
    context.mkdir()
    dockerfile = _environment().from_string(template).render(base=debian_base.image_id, words=words)
    (context / "Dockerfile").write_text(dockerfile)
    image = docker_engine.build(context)
    try:
        config = docker_engine.inspect_image(image)
        env = dict(item.split("=", 1) for item in config.env)
        assert [env[f"V{i}"] for i in range(1, len(words) + 1)] == words
        assert [config.labels[f"x.v{i}"] for i in range(1, len(words) + 1)] == words
        result = docker_engine.run(image, ["cat", "/words.txt"], timeout_s=60)
        assert result.stdout.split("\n")[:-1] == words
    finally:
        remove_image(docker_engine, image, force=True)


# -- validate first, write atomically (issue 12) -----------------------------------------------


def _demo() -> Spec:
    return load_spec(ROOT / "images" / "demo-cpu.yaml")


def test_render_into_a_file_is_refused_and_the_file_kept(tmp_path: Path) -> None:
    target = tmp_path / "ctx"
    target.write_text("mine")
    with pytest.raises(ReproboxError, match="not a directory") as caught:
        _render(_demo(), target)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert target.read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]


def test_a_rejected_render_writes_nothing(tmp_path: Path) -> None:
    spec = _demo()
    lock = fake_lock(spec)
    evil = LockedWheel("evil", "1", "../../evil.whl", "https://x/evil.whl", "0" * 64, "rest")
    bad = replace(lock, wheels=(*lock.wheels, evil))
    with pytest.raises(ReproboxError, match="not a plain wheel name"):
        render_context(spec, LockFile.of(bad), tmp_path / "out" / "ctx", base_ref=BASE_ID)
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ReproboxError, match="refusing to render"):
        render_context(spec, LockFile.of(lock), tmp_path / "ctx", base_ref="x\nRUN id")
    assert list(tmp_path.iterdir()) == []


def test_a_folder_filled_after_the_check_is_not_replaced(tmp_path: Path) -> None:
    """The rename is the lock: it never replaces a non-empty folder, whoever filled it."""
    target = tmp_path / "ctx"
    target.mkdir()
    (target / "theirs.txt").write_text("first")
    with pytest.raises(ReproboxError, match="not empty") as caught:
        _write_tree(target, {"Dockerfile": "FROM x\n"}, {}, None)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert [p.name for p in target.iterdir()] == ["theirs.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]  # no temporary folder left


def test_an_empty_folder_is_filled_and_keeps_ordinary_permissions(tmp_path: Path) -> None:
    (tmp_path / "ctx").mkdir()
    _render(_demo(), tmp_path / "ctx")
    assert (tmp_path / "ctx" / "Dockerfile").is_file()
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "ctx").stat().st_mode & 0o777 == 0o777 & ~mask


def test_two_renders_racing_into_one_new_folder_one_wins(tmp_path: Path) -> None:
    spec = _demo()
    lock = fake_lock(spec)
    target = tmp_path / "ctx"
    barrier = threading.Barrier(8)

    def one(_: int) -> str:
        barrier.wait()
        try:
            render_context(spec, LockFile.of(lock), target, base_ref=BASE_ID)
        except ReproboxError as err:
            return f"refused {err.exit_code}"
        return "wrote"

    with ThreadPoolExecutor(8) as pool:
        outcomes = sorted(pool.map(one, range(8)))
    assert outcomes == [f"refused {EXIT_BAD_INPUT}"] * 7 + ["wrote"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ctx"]
    assert (target / "Dockerfile").is_file()


@pytest.mark.parametrize(
    "change",
    [
        {"version": "1\x00"},
        {"version": "1 --index-url=http://evil"},
        {"name": "evil\nRUN id"},
        {"sha256": "z" * 64},
        {"filename": ".hidden.whl"},
        {"group": "../x"},
    ],
    ids=["nul-version", "option-in-version", "newline-name", "bad-hash", "dot-file", "bad-group"],
)
def test_a_lock_entry_that_is_not_plain_is_refused_before_writing(
    tmp_path: Path, change: dict[str, Any]
) -> None:
    spec = _demo()
    lock = fake_lock(spec)
    evil = replace(_wheel("evil", "1", "rest"), **change)
    bad = replace(lock, wheels=(*lock.wheels, evil))
    with pytest.raises(ReproboxError, match="not a plain") as caught:
        render_context(spec, LockFile(bad, format_lock(lock)), tmp_path / "ctx", base_ref=BASE_ID)
    assert "relock" in caught.value.render()
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert list(tmp_path.iterdir()) == []
