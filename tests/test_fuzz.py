"""Fuzz the spec loader and the renderer: random and mutated specs end in a Dockerfile whose
instructions are exactly the template's (values read back as the builder reads them), or in
exit 2 with nothing written. Never another exit code, never a traceback.

Library level (parse_spec + render_context with a lock made up for the spec, so no resolver
runs) for many examples; CLI level (`reprobox render --no-wheels` with a lock the test writes)
for a few, for the exit codes and the streams. Both bounded: about 30 s together here.
"""

from __future__ import annotations

import itertools
import json
import re
import shlex
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import yaml
from dockerfile_parse import DockerfileParser
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from test_render import BASE_ID, _wheel

from reprobox.errors import EXIT_BAD_INPUT, ReproboxError
from reprobox.locked import IndexSettings, Lock
from reprobox.lockfile import LockFile, format_lock
from reprobox.render import image_env, render_context
from reprobox.spec import Spec
from reprobox.spec_load import parse_spec

ROOT = Path(__file__).resolve().parent.parent
DEMO = yaml.safe_load((ROOT / "images" / "demo-cpu.yaml").read_text())
IMAGE = "nvidia/cuda:12.4.1-runtime-ubuntu22.04@sha256:" + "0" * 64
VENV_ENV = {
    "VIRTUAL_ENV": "/opt/venv",
    "PATH": "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
}

# Where values go, and what could turn a value into an instruction, a word or a substitution.
PATHS: list[tuple[str | int, ...]] = [
    ("version",),
    ("name",),
    ("base", "bootstrap"),
    ("base", "image"),
    ("python",),
    ("torch", "version"),
    ("torch", "cuda"),
    ("torch", "cudnn"),
    ("transformers",),
    ("packages", 0),
    ("packages", 1),
    ("apt", 0),
    ("apt", 1),
    ("env", "USER_KEY"),
    ("env", "OTHER"),
    ("determinism", "seed"),
    ("determinism", "threads"),
    ("determinism", "gomp_cpu_affinity"),
    ("determinism", "cublas_workspace_config"),
    ("determinism", "deterministic_algorithms"),
    ("selfcheck", "steps"),
    ("index", "url"),
    ("index", "find_links", 0),
    ("source_url",),
]
FRAGMENTS = [
    "\n",
    "\nRUN id\n",
    "\r",
    "\\",
    "\\\n",
    '"',
    "'",
    "$",
    "${HOME}",
    "$(id)",
    "`id`",
    "#",
    " ",
    "\t",
    ";",
    "&&",
    "\x00",
    "\x1b[31m",
    "\u2028",
    "\u202e",
    "\ud800",
    "AS x",
    "--",
    "=",
    "@sha256:" + "0" * 64,
]
PLAIN = [
    "demo",
    "2.13.0",
    "numpy==2.4.6",
    "curl",
    "debian:bookworm",
    "https://pypi.org/simple",
    IMAGE,
    "3.11",
    "cpu",
    "0-3",
    ":4096:8",
]

words = st.one_of(
    st.sampled_from(PLAIN),
    st.text(max_size=12),
    st.builds(
        lambda a, b, c: a + b + c,
        st.sampled_from(PLAIN),
        st.sampled_from(FRAGMENTS),
        st.sampled_from(["", *PLAIN, *FRAGMENTS]),
    ),
)
values = st.one_of(
    words,
    words,
    st.integers(-(2**40), 2**40),
    st.booleans(),
    st.none(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.lists(words, max_size=3),
    st.dictionaries(words, words, max_size=3),
)


def _set(data: dict[str, Any], path: tuple[str | int, ...], value: object) -> None:
    node: Any = data
    for part, following in itertools.pairwise(path):
        if isinstance(node, dict):
            if not isinstance(node.get(part), dict | list):
                node[part] = [] if isinstance(following, int) else {}
            node = node[part]
        else:
            return
    last = path[-1]
    if isinstance(node, list) and isinstance(last, int):
        node[last:] = [value]
    elif isinstance(node, dict):
        node[last] = value


@st.composite
def spec_texts(draw: st.DrawFn) -> str:
    """The demo spec, changed: a base image with apt packages or not, values replaced, keys
    added or dropped, written as JSON or YAML, and now and then raw characters spliced in."""
    data: dict[str, Any] = json.loads(json.dumps(DEMO))
    if draw(st.booleans()):
        data["base"] = {"image": IMAGE}
        data["apt"] = draw(st.lists(st.sampled_from(["curl", "libgomp1=12.2.0-14"]), max_size=2))
    if draw(st.booleans()):  # env values are the one free text: give them many tries
        data["env"] = draw(st.dictionaries(st.sampled_from(["A", "B_2", "HF_HOME"]), words))
    for _ in range(draw(st.integers(0, 4))):
        _set(data, draw(st.sampled_from(PATHS)), draw(values))
    if draw(st.integers(0, 9)) == 0:
        data[draw(words)] = draw(values)
    if draw(st.integers(0, 9)) == 0:
        data.pop(draw(st.sampled_from(sorted(data))), None)
    if draw(st.booleans()):
        text = json.dumps(data)
    else:
        text = yaml.safe_dump(data, allow_unicode=draw(st.booleans()))
    if draw(st.integers(0, 4)) == 0:
        at = draw(st.integers(0, len(text)))
        text = text[:at] + draw(st.text(max_size=6)) + text[at:]
    return text


def _lock(spec: Spec) -> Lock:
    """A lock shaped like a real one for this spec (rendering is what is tested, not resolving)."""
    wheels = [
        _wheel("pip", "26.3", "installer"),
        _wheel("torch", spec.torch.version, "torch", "cp311-cp311-manylinux_2_28_x86_64"),
    ]
    for pin in spec.packages:
        name, version = pin.split("==", 1)
        wheels.append(_wheel(re.sub(r"\[.*\]", "", name).lower(), version, "rest"))
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
        wheels=tuple(sorted({w.name: w for w in wheels}.values(), key=lambda w: w.name)),
        torch_cuda=spec.torch.cuda if spec.torch.is_cuda else None,
        torch_cudnn=spec.torch.cudnn,
    )


_PAIR = r'\s*([A-Za-z_][A-Za-z0-9_.-]*)="((?:[^"\\$]|\\.)*)"'


def _builder_pairs(value: str) -> dict[str, str]:
    r"""ENV/LABEL `k="v" ...` read as the builder's lexer reads double quotes: only `\"`, `\\`
    and `\$` escapes, no bare `$` (it would substitute), nothing outside the pairs."""
    assert re.fullmatch(rf"(?:{_PAIR})+\s*", value), value
    pairs = {}
    for key, quoted in re.findall(_PAIR, value):
        assert key not in pairs
        pairs[key] = re.sub(r'\\(["\\$])', r"\1", quoted)
    return pairs


def _instructions(path: Path) -> list[dict[str, Any]]:
    parser = DockerfileParser(str(path / "Dockerfile"))
    return [dict(i) for i in parser.structure if i["instruction"] != "COMMENT"]


def _reference(with_apt: bool) -> list[dict[str, Any]]:
    data: dict[str, Any] = json.loads(json.dumps(DEMO))
    if with_apt:
        data["base"], data["apt"] = {"image": IMAGE}, ["curl"]
    spec = parse_spec(json.dumps(data))
    with tempfile.TemporaryDirectory() as tmp:
        lock = _lock(spec)
        render_context(spec, LockFile.of(lock), Path(tmp) / "ctx", base_ref=BASE_ID)
        return _instructions(Path(tmp) / "ctx")


REFERENCE = {flag: _reference(flag) for flag in (False, True)}


def _check_rendered(
    spec: Spec, lock: Lock, out: Path, base_ref: str, labels: Mapping[str, str]
) -> None:
    """The Dockerfile holds exactly the template's instructions, with the spec's values inert."""
    apt = spec.base.image is not None and bool(spec.apt)
    got, expected = _instructions(out), REFERENCE[apt]
    assert [i["instruction"] for i in got] == [i["instruction"] for i in expected]
    froms = [i["value"] for i in got if i["instruction"] == "FROM"]
    assert froms == [f"{base_ref} AS torch", "torch AS rest", base_ref]
    for mine, theirs in zip(got, expected, strict=True):
        kind = mine["instruction"]
        if kind == "ENV":
            pairs = _builder_pairs(mine["value"])
            assert pairs == VENV_ENV | dict(image_env(spec, lock))
        elif kind == "LABEL":
            assert _builder_pairs(mine["value"]) == dict(labels)
        elif kind == "RUN" and "apt-get install" in mine["value"]:
            argv = shlex.split(mine["value"])
            start = argv.index("--no-install-recommends") + 1
            assert argv[start : argv.index("&&", start)] == list(spec.apt)
        elif kind != "FROM":
            assert mine["value"] == theirs["value"]


def _library_run(text: str) -> str:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "ctx"
        try:
            spec = parse_spec(text, Path("fuzz.yaml"))
            lock = _lock(spec)
            base_ref = spec.base.image or BASE_ID
            ctx = render_context(spec, LockFile.of(lock), out, base_ref=base_ref)
        except ReproboxError as err:
            code, message = err.exit_code, err.render()
        else:
            _check_rendered(spec, lock, out, base_ref, dict(ctx.labels))
            return "exit 0"
        assert code == EXIT_BAD_INPUT, message
        assert list(Path(tmp).iterdir()) == [], "a refused spec wrote something"
        return "exit 2"


def _assert_both_outcomes(run: Callable[[str], str]) -> None:
    """The fuzz is only worth something if its strategy reaches both outcomes."""
    assert run(json.dumps(DEMO)) == "exit 0"
    assert run(json.dumps(DEMO | {"apt": ["curl\nRUN id"]})) == "exit 2"


def test_the_library_fuzz_can_tell_both_outcomes_apart() -> None:
    _assert_both_outcomes(_library_run)


@settings(
    max_examples=600,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(spec_texts())
def test_specs_render_the_templates_instructions_or_exit_2(text: str) -> None:
    event(_library_run(text))


def _cli_run(text: str, folder: Path) -> str:
    spec_path, lock_path, out = folder / "spec.yaml", folder / "spec.lock", folder / "ctx"
    spec_path.write_text(text, encoding="utf-8", errors="surrogatepass")
    try:
        spec = parse_spec(text)
        lock_text = format_lock(_lock(spec))
    except ReproboxError:
        lock_text = format_lock(_lock(parse_spec(json.dumps(DEMO))))
    lock_path.write_text(lock_text)
    before = sorted(p.name for p in folder.iterdir())
    argv = ["render", str(spec_path), "--lock", str(lock_path), "-o", str(out), "--no-wheels"]
    done = subprocess.run(
        [sys.executable, "-m", "reprobox", *argv],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode in {0, EXIT_BAD_INPUT}, done.stderr
    assert "Traceback" not in done.stderr
    assert "internal error" not in done.stderr
    assert lock_path.read_text() == lock_text, "the lock changed"
    if done.returncode == EXIT_BAD_INPUT:
        assert sorted(p.name for p in folder.iterdir()) == before, "exit 2 wrote something"
        assert done.stderr.startswith("reprobox: error: ")
        return "exit 2"
    assert (out / "Dockerfile").is_file()
    return "exit 0"


def test_the_cli_fuzz_can_tell_both_outcomes_apart(tmp_path: Path) -> None:
    counter = iter(range(2))
    _assert_both_outcomes(lambda text: _cli_run(text, _fresh(tmp_path, next(counter))))


def _fresh(root: Path, n: int) -> Path:
    folder = root / str(n)
    folder.mkdir()
    return folder


@settings(
    max_examples=12,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(spec_texts())
def test_the_cli_renders_or_exits_2_and_writes_nothing(tmp_path: Path, text: str) -> None:
    with tempfile.TemporaryDirectory(dir=tmp_path) as tmp:
        _cli_run(text, Path(tmp))
