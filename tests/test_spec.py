"""The spec contract: the BRIEF's example as written, and one precise error per kind of mistake."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from reprobox.errors import EXIT_BAD_INPUT, SpecError
from reprobox.render import dockerfile_quote
from reprobox.spec import load_spec, parse_spec

ROOT = Path(__file__).resolve().parent.parent
DEMO = (ROOT / "images" / "demo-cpu.yaml").read_text()
BRIEF = ROOT.parent / "shared" / "BRIEF.md"


def _error(text: str) -> str:
    with pytest.raises(SpecError) as info:
        parse_spec(text, Path("spec.yaml"))
    assert info.value.exit_code == EXIT_BAD_INPUT
    return info.value.render()


def test_brief_example_is_accepted_as_written() -> None:
    if BRIEF.exists():  # the shared brief sits beside the checkout; the example is its copy
        block = re.search(r"```yaml\n(.*?)```", BRIEF.read_text(), re.S)
        assert block is not None
        assert block.group(1) == DEMO
    spec = parse_spec(DEMO)
    assert spec.name == "demo-cpu"
    assert spec.base.suite == "bookworm"
    assert spec.torch.version == "2.13.0"
    assert spec.torch.cuda == "cpu"
    assert spec.packages == ("numpy==2.4.6",)
    assert spec.determinism.cublas_workspace_config == ":4096:8"
    assert spec.determinism.hash_seed == 0
    assert spec.selfcheck.steps == 20


def test_every_example_spec_loads() -> None:
    specs = sorted((ROOT / "images").glob("*.yaml"))
    assert len(specs) >= 2
    for path in specs:
        assert load_spec(path).name


def test_spec_is_frozen() -> None:
    spec = parse_spec(DEMO)
    with pytest.raises(ValueError, match="frozen"):
        spec.name = "other"


def test_malformed_yaml_names_file_and_line() -> None:
    message = _error(DEMO.replace("name: demo-cpu", "name: [demo-cpu"))
    assert message.startswith("spec.yaml:3: the spec is not valid YAML")


def test_unknown_key_suggests_the_nearest() -> None:
    message = _error(DEMO.replace("  threads: 1", "  thread: 1"))
    assert "spec.yaml:17: determinism.thread: unknown key; did you mean 'threads'?" in message


def test_unknown_top_level_key_suggests_the_nearest() -> None:
    message = _error(DEMO.replace("packages:", "pakages:"))
    assert "spec.yaml:11: pakages: unknown key; did you mean 'packages'?" in message


def test_wrong_type_says_what_was_expected() -> None:
    message = _error(DEMO.replace("  steps: 20", "  steps: twenty"))
    assert "spec.yaml:22: selfcheck.steps: Input should be a valid integer" in message


def test_unquoted_python_version_is_explained() -> None:
    message = _error(DEMO.replace('python: "3.11"', "python: 3.11"))
    assert "spec.yaml:6: python:" in message
    assert 'put it in quotes, e.g. "3.11"' in message


@pytest.mark.parametrize("pin", ["numpy>=2", "numpy", "numpy~=2.4", "numpy==2.*", "numpy<3"])
def test_version_range_is_refused(pin: str) -> None:
    message = _error(DEMO.replace("numpy==2.4.6", pin))
    assert "spec.yaml:12: packages[0]:" in message
    assert "reprobox pins exactly" in message


def test_torch_range_is_refused() -> None:
    message = _error(DEMO.replace('version: "2.13.0"', 'version: ">=2"'))
    assert "torch.version: '>=2' is a range; reprobox pins exactly" in message


def test_python_torch_does_not_support() -> None:
    message = _error(DEMO.replace('python: "3.11"', 'python: "3.9"'))
    assert "spec.yaml:6: python: torch 2.13 was not released for Python 3.9" in message
    assert "hint: set python to one of 3.10, 3.11, 3.12, 3.13, 3.14" in message


def test_cuda_variant_never_shipped() -> None:
    text = DEMO.replace('version: "2.13.0"', 'version: "2.5.1"').replace(
        "cuda: cpu ", 'cuda: "12.6"'
    )
    message = _error(text)
    assert "spec.yaml:9: torch.cuda: torch 2.5 was never shipped for CUDA 12.6" in message
    assert "cpu, 11.8, 12.1, 12.4" in message


def test_unknown_torch_release() -> None:
    message = _error(DEMO.replace('version: "2.13.0"', 'version: "9.9.9"'))
    assert "torch 9.9.9 is not a release reprobox knows" in message


def test_bootstrap_python_must_match_the_suite() -> None:
    text = DEMO.replace('version: "2.13.0"', 'version: "2.5.1"').replace(
        'python: "3.11"', 'python: "3.12"'
    )
    assert "a debian:bookworm base has Python 3.11, not 3.12" in _error(text)


def test_cudnn_on_a_cpu_build_is_refused() -> None:
    message = _error(DEMO.replace('  # cudnn: "9.1.0.70"', '  cudnn: "9.1.0.70"'))
    assert "torch.cudnn: a CPU build of torch has no cuDNN" in message


def test_duplicate_key_is_refused() -> None:
    message = _error(DEMO.replace("  steps: 20", "  steps: 20\n  steps: 30"))
    assert "selfcheck.steps: key given twice" in message


def test_missing_key_and_wrong_version() -> None:
    message = _error(DEMO.replace("version: 1\n", "version: 2\n").replace("name: demo-cpu\n", ""))
    assert "spec.yaml:1: version: unsupported spec version 2" in message
    assert "name: required key is missing" in message


def test_base_needs_exactly_one_source() -> None:
    text = DEMO.replace(
        "  bootstrap: debian:bookworm",
        "  bootstrap: debian:bookworm\n  image: debian@sha256:" + "a" * 64,
    )
    assert "give exactly one of 'image'" in _error(text)


def test_base_image_must_be_pinned_by_digest() -> None:
    text = DEMO.replace(
        "  bootstrap: debian:bookworm", "  image: nvidia/cuda:12.4.1-runtime-ubuntu22.04"
    )
    assert "is not pinned by digest" in _error(text)
    pinned = DEMO.replace(
        "  bootstrap: debian:bookworm",
        "  image: nvidia/cuda:12.4.1-runtime-ubuntu22.04@sha256:" + "0" * 64,
    )
    assert parse_spec(pinned).base.image is not None


def test_reserved_env_is_refused() -> None:
    message = _error(DEMO.replace("env: {}", "env: {PYTHONHASHSEED: '1'}"))
    assert "env key 'PYTHONHASHSEED' is set by reprobox from 'determinism'" in message


def test_missing_file_and_script() -> None:
    with pytest.raises(SpecError, match="no such spec file"):
        load_spec(Path("/nonexistent/spec.yaml"))


def test_missing_selfcheck_script(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(DEMO.replace("  # script: train.py", "  script: train.py"))
    with pytest.raises(SpecError, match=r"selfcheck.script: .*train.py does not exist"):
        load_spec(path)


# -- hostile strings ---------------------------------------------------------------------------

HOSTILE = [
    "x\nRUN rm -rf /",
    "x \\\nRUN id",
    "$(id)",
    "`id`",
    '" && id && "',
    "' ; id ; '",
    "# comment",
    "${HOME}",
    "a\rb",
]
DANGEROUS = re.compile(r"[\n\r\\$`\"'# ;]")


@pytest.mark.parametrize("value", HOSTILE)
@pytest.mark.parametrize(
    "template",
    [
        "packages:\n  - {v!r}",
        "apt: [{v!r}]",
        "name: {v!r}",
        "determinism:\n  gomp_cpu_affinity: {v!r}",
        "base:\n  image: {v!r}",
        "selfcheck:\n  script: {v!r}",
        "index:\n  url: {v!r}",
    ],
)
def test_hostile_strings_are_refused_outside_env(template: str, value: str) -> None:
    key = template.split(":", maxsplit=1)[0]
    text = _replace_section(DEMO, key, template.format(v=value))
    with pytest.raises(SpecError) as info:
        parse_spec(text)
    # Refused for the value itself, not for YAML the test got wrong.
    assert "not valid YAML" not in info.value.render()
    assert key in info.value.render()


def _replace_section(document: str, key: str, section: str) -> str:
    """`document` with its top-level `key:` section (and its indented lines) replaced."""
    lines = document.split("\n")
    try:
        start = next(i for i, line in enumerate(lines) if line.startswith(f"{key}:"))
    except StopIteration:
        return document + section + "\n"
    end = start + 1
    while end < len(lines) and lines[end].startswith(" "):
        end += 1
    return "\n".join([*lines[:start], section, *lines[end:]])


def _undo_quote(quoted: str) -> str:
    """Read a double-quoted Dockerfile word back the way the builder's lexer does."""
    assert quoted.startswith('"')
    assert quoted.endswith('"')
    body, out, i = quoted[1:-1], [], 0
    while i < len(body):
        if body[i] == "\\" and i + 1 < len(body) and body[i + 1] in '\\"$':
            out.append(body[i + 1])
            i += 2
        else:
            assert body[i] not in '"$\n', "unescaped special character"
            out.append(body[i])
            i += 1
    return "".join(out)


@settings(max_examples=300, deadline=None)
@given(st.text(st.characters(codec="utf-8", exclude_characters="\x00")))
def test_env_values_are_refused_or_inert(value: str) -> None:
    text = DEMO.replace("env: {}", "env:\n  USER_VALUE: " + _yaml_dq(value))
    if re.search(r"[\x00-\x1f\x7f]", value):
        with pytest.raises(SpecError, match=r"USER_VALUE.*control character"):
            parse_spec(text)
        return
    rendered = dockerfile_quote(parse_spec(text).env["USER_VALUE"])
    assert not re.search(r"[\n\r]", rendered)
    assert _undo_quote(rendered) == value


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1))
def test_package_pins_never_carry_special_characters(value: str) -> None:
    text = DEMO.replace("  - numpy==2.4.6", "  - " + _yaml_dq(value))
    try:
        spec = parse_spec(text)
    except SpecError:
        return
    assert not DANGEROUS.search(spec.packages[0])


def _yaml_dq(value: str) -> str:
    escaped = "".join(
        ch if ch.isprintable() and ch not in '"\\' else f"\\U{ord(ch):08x}" for ch in value
    )
    return f'"{escaped}"'
