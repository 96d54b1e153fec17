"""The spec contract: the BRIEF's example as written, and one precise error per kind of mistake."""

from __future__ import annotations

import itertools
import json
import os
import re
import time
import typing
from pathlib import Path

import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import BaseModel

from reprobox._text import unsafe_character
from reprobox.dockerfile import dockerfile_quote
from reprobox.errors import EXIT_BAD_INPUT, SpecError
from reprobox.spec import MAX_SCRIPT_BYTES, Spec, Text
from reprobox.spec_load import load_spec, parse_spec

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
    if unsafe_character(value) is not None:
        with pytest.raises(SpecError, match=r"USER_VALUE.*control or invisible character"):
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


# -- one rule for every string (issue 12) ------------------------------------------------------

# Each field, a valid value for it, and the demo with that value set (by key path).
VALID_FIELDS: list[tuple[tuple[str | int, ...], str]] = [
    (("name",), "demo-cpu"),
    (("base", "bootstrap"), "debian:bookworm"),
    (("python",), "3.11"),
    (("torch", "version"), "2.13.0"),
    (("torch", "cuda"), "cpu"),
    (("transformers",), "4.46.3"),
    (("packages", 0), "numpy==2.4.6"),
    (("apt", 0), "curl"),
    (("env", "GOOD_KEY"), "value"),
    (("determinism", "gomp_cpu_affinity"), "0"),
    (("determinism", "cublas_workspace_config"), ":4096:8"),
    (("index", "url"), "https://pypi.org/simple"),
    (("index", "extra_urls", 0), "https://download.pytorch.org/whl/cpu"),
    (("index", "find_links", 0), "/srv/wheels"),
    (("source_url",), "https://github.com/example/project"),
]


def _demo_with(path: tuple[str | int, ...], value: object) -> str:
    """The demo spec with the value at `path` set, as JSON (which is YAML): every escape exact."""
    data = yaml.safe_load(DEMO)
    node = data
    for part, following in itertools.pairwise(path):
        if isinstance(node, dict) and part not in node:
            node[part] = [] if isinstance(following, int) else {}
        node = node[part]
    last = path[-1]
    if isinstance(node, list):
        assert isinstance(last, int)
        node[last:] = [value]
    else:
        node[last] = value
    return json.dumps(data)


@pytest.mark.parametrize(("path", "value"), VALID_FIELDS, ids=str)
def test_each_field_accepts_its_plain_value(path: tuple[str | int, ...], value: str) -> None:
    spec = parse_spec(_demo_with(path, value))
    assert spec.name == "demo-cpu"


@pytest.mark.parametrize("tail", ["\n", "\r", "\r\n", "\x85", "\u2028", "\t", "\x00", "\u202e"])
@pytest.mark.parametrize(("path", "value"), VALID_FIELDS, ids=str)
def test_no_field_accepts_a_line_break_or_control_character(
    path: tuple[str | int, ...], value: str, tail: str
) -> None:
    # `re.match("...$")` let "curl\n" through: `$` matches before a final newline.
    message = _error(_demo_with(path, value + tail))
    assert "control or invisible character" in message
    assert str(path[0]) in message


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("env", "KEY\nRUN id"), "x"),
        (("env", "TRAILING\n"), "x"),
        (("base", "image"), "ubuntu@sha256:" + "0" * 64 + "\n"),
        (("base", "image"), "ubuntu@sha256:" + "0" * 64 + " AS x"),
    ],
)
def test_keys_and_references_are_matched_whole(path: tuple[str | int, ...], value: str) -> None:
    data = yaml.safe_load(DEMO)
    if path[0] == "base":
        data["base"] = {"image": value}
    else:
        data["env"] = {path[1]: value}
    message = _error(json.dumps(data))
    assert str(path[0]) in message


def _string_fields(
    model: type[BaseModel], prefix: str = ""
) -> list[tuple[str, tuple[object, ...]]]:
    """Every str anywhere in a field's annotation (dict keys, tuple items, optionals), with its metadata."""
    found: list[tuple[str, tuple[object, ...]]] = []

    def walk(name: str, annotation: object, metadata: tuple[object, ...]) -> None:
        origin = typing.get_origin(annotation)
        if origin is typing.Annotated:
            base, *extra = typing.get_args(annotation)
            walk(name, base, (*metadata, *extra))
        elif annotation is str:
            found.append((name, metadata))
        elif isinstance(annotation, type) and issubclass(annotation, BaseModel):
            found.extend(_string_fields(annotation, f"{name}."))
        else:
            for arg in typing.get_args(annotation):
                walk(name, arg, metadata)

    for field_name, field in model.model_fields.items():
        if field.exclude:
            continue
        walk(prefix + field_name, field.annotation, tuple(field.metadata))
    return found


def test_every_string_field_goes_through_the_one_rule() -> None:
    fields = _string_fields(Spec)
    assert len(fields) >= 18  # the walk finds them (dict keys and values, tuple items included)
    bare = [name for name, metadata in fields if not any(isinstance(m, Text) for m in metadata)]
    assert bare == [], f"string fields without Text(...): {bare}"


@pytest.mark.parametrize(
    ("path", "value", "expected"),
    [
        (("version",), True, "valid integer"),
        (("version",), 1.0, "valid integer"),
        (("version",), "1", "valid integer"),
        (("version",), 2, "unsupported spec version"),
        (("determinism", "seed"), True, "valid integer"),
        (("determinism", "threads"), 2.0, "valid integer"),
        (("selfcheck", "steps"), "20", "valid integer"),
        (("determinism", "deterministic_algorithms"), 1, "valid boolean"),
        (("determinism", "deterministic_algorithms"), "yes", "valid boolean"),
        (("name",), 7, "valid string"),
        (("packages",), "numpy==2.4.6", "valid tuple"),
    ],
)
def test_types_are_strict(path: tuple[str | int, ...], value: object, expected: str) -> None:
    assert expected in _error(_demo_with(path, value))


def test_yaml_booleans_are_not_version_1() -> None:
    # PyYAML reads YAML 1.1: yes, on and true are all the boolean True, which == 1 in Python.
    for spelling in ("true", "yes", "on", "1.0", '"1"'):
        message = _error(DEMO.replace("version: 1", f"version: {spelling}"))
        assert message.startswith("spec.yaml:1: version:"), message
    assert parse_spec(DEMO).version == 1


def test_credentials_in_urls_are_refused() -> None:
    message = _error(_demo_with(("source_url",), "https://user:token@github.com/x/y"))
    assert "credentials" in message
    assert "source_url" in message
    assert "credentials" in _error(
        _demo_with(("index", "url"), "https://u:p@mirror.example/simple")
    )


# -- bounded YAML (issue 12) -------------------------------------------------------------------


def _laughs(levels: int = 9) -> str:
    lines = ["a: &a [" + ",".join(["lol"] * 9) + "]"]
    for previous, name in zip("abcdefghi", "bcdefghij"[: levels - 1], strict=False):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{previous}"] * 9) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_at_once() -> None:
    bomb = _laughs()
    assert len(bomb) < 400  # the was 388 bytes; the plain safe loader expands it to 9**9
    started = time.monotonic()
    message = _error(bomb)
    assert time.monotonic() - started < 2
    assert "more than 16 aliases" in message
    assert message.startswith("spec.yaml:3:")  # the line where the limit was crossed


def test_a_few_aliases_are_fine() -> None:
    text = DEMO.replace("apt: []", "apt: &shared []").replace(
        "env: {}", "env: {}\nx_alias: *shared"
    )
    assert "x_alias: unknown key" in _error(text)  # read as YAML, refused as a spec key


@pytest.mark.parametrize(
    "text",
    [
        "a: " + "[" * 10_000 + "]" * 10_000 + "\n",
        "a: " + "{b: " * 2_000 + "1" + "}" * 2_000 + "\n",
        "a: &x [1, *x]\n",
        DEMO.replace("apt: []", "apt: &x [*x]"),
    ],
    ids=["deep-lists", "deep-mappings", "self-alias", "self-alias-in-spec"],
)
def test_deep_or_endless_nesting_is_refused(text: str) -> None:
    message = _error(text)
    assert "nest more than 32 levels" in message


def test_a_large_spec_file_is_refused_before_parsing(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_text(DEMO + "#" * (1 << 20) + "\n")
    with pytest.raises(SpecError, match=r"larger than 1048576 bytes"):
        load_spec(path)
    assert "1048576 bytes" in _error(DEMO + "#" * (1 << 20))


def test_many_values_are_refused() -> None:
    text = DEMO.replace("apt: []", "apt: [" + ", ".join(["curl"] * 25_000) + "]")
    assert "more than 20000 values" in _error(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (DEMO + "? [a, b]\n: 1\n", "a key must be a plain word"),
        (DEMO + '"bad\\nkey": 1\n', "control or invisible character"),
        (DEMO.replace("name: demo-cpu", "name: demo\x07cpu"), "U+0007"),
        (DEMO.replace("name: demo-cpu", 'name: "demo\\x1b[31m"'), "U+001B"),
    ],
    ids=["complex-key", "control-in-key", "raw-bell", "escape-sequence"],
)
def test_odd_keys_and_raw_control_characters_are_refused_with_their_line(
    text: str, expected: str
) -> None:
    message = _error(text)
    assert expected in message
    assert re.match(r"spec\.yaml:[0-9]+:", message)


def test_a_spec_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "spec.yaml"
    path.write_bytes(DEMO.encode() + b"# \xff\xfe\n")
    with pytest.raises(SpecError, match="not UTF-8"):
        load_spec(path)


# -- the self-check script policy (issue 12) ---------------------------------------------------


def _spec_with_script(folder: Path, script: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(DEMO.replace("  # script: train.py", f"  script: {json.dumps(script)}"))
    return path


def test_a_script_inside_the_folder_is_read_at_load(tmp_path: Path) -> None:
    path = _spec_with_script(tmp_path / "repo", "sub/train.py")
    (tmp_path / "repo" / "sub").mkdir()
    (tmp_path / "repo" / "sub" / "train.py").write_text("print('hi')\n")
    (tmp_path / "repo" / "link.py").symlink_to("sub/train.py")  # a link that stays inside
    spec = load_spec(path)
    assert spec.script_text == "print('hi')\n"
    assert load_spec(_spec_with_script(tmp_path / "repo", "link.py")).script_text == "print('hi')\n"


@pytest.mark.parametrize(
    ("script", "make", "expected"),
    [
        ("../outside.py", "outside", "outside the spec's folder"),
        ("train.py", "symlink-out", "outside the spec's folder"),
        ("train.py", "symlink-secret", "outside the spec's folder"),
        ("train.py", "dir", "not a regular file"),
        ("train.py", "fifo", "not a regular file"),
        ("train.py", "large", "too large"),
        ("train.py", "latin1", "not UTF-8"),
        ("train.py", "loop", "cannot be resolved"),
        ("/etc/passwd.py", "none", "relative to the spec's folder"),
    ],
)
def test_a_script_outside_the_policy_is_refused(
    tmp_path: Path, script: str, make: str, expected: str
) -> None:
    repo = tmp_path / "repo"
    path = _spec_with_script(repo, script)
    target = repo / "train.py"
    secret = tmp_path / "home" / ".docker" / "config.json"
    secret.parent.mkdir(parents=True)
    secret.write_text('{"auths": {"r": {"auth": "c2VjcmV0"}}}')
    (tmp_path / "outside.py").write_text("print('outside')\n")
    if make == "symlink-out":
        target.symlink_to(tmp_path / "outside.py")
    elif make == "symlink-secret":
        target.symlink_to(secret)
    elif make == "dir":
        target.mkdir()
    elif make == "fifo":
        os.mkfifo(target)
    elif make == "large":
        target.write_text("#" * (MAX_SCRIPT_BYTES + 1))
    elif make == "latin1":
        target.write_bytes(b"print('caf\xe9')\n")
    elif make == "loop":
        target.symlink_to(repo / "loop.py")
        (repo / "loop.py").symlink_to(target)
    with pytest.raises(SpecError) as caught:
        load_spec(path)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert expected in caught.value.render()
    assert "selfcheck.script" in caught.value.render()
