"""`reprobox build --assemble` end to end on the real engine, against the recipe's own build.

The assembled image must be the image a `docker build` of the rendered Dockerfile gives once
normalised: the same layers byte for byte (packages, installer metadata, launchers, bytecode,
/opt/reprobox and hook, in the normaliser's order) and the same config, so the same image ID;
and come out the same twice.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli import reprobox

from reprobox.bootstrap import BaseImage
from reprobox.docker_engine import DockerEngine

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "images" / "demo-cpu.yaml"


@dataclass(frozen=True)
class Built:
    spec: Path
    report: dict[str, Any]
    stderr: str


def _spec(folder: Path, replace: tuple[str, str] | None = None) -> Path:
    text = DEMO.read_text()
    if replace is not None:
        assert replace[0] in text
        text = text.replace(*replace)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(text)
    return path


def _build(spec: Path, *options: str) -> Built:
    result = reprobox("build", str(spec), "--json", *options)
    assert result.code == 0, result.stderr
    return Built(spec, result.json(), result.stderr)


@pytest.fixture(scope="module")
def recipe(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The demo, built from its rendered Dockerfile (the recipe) and normalised."""
    return _build(_spec(tmp_path_factory.mktemp("assemble") / "demo"), "--recipe")


@pytest.fixture(scope="module")
def assembled(recipe: Built) -> Built:
    """The same spec and lock, assembled, ignoring every cache."""
    return _build(recipe.spec, "--assemble", "--no-cache")


def _fingerprint(report: dict[str, Any]) -> str:
    check = report["selfcheck"]
    return str(check.get("fingerprint") or next(iter(check["fingerprints"].values())))


def _diff(a: str, b: str) -> list[dict[str, Any]]:
    result = reprobox("diff", a, b, "--json")
    assert result.code in (0, 1), result.stderr
    rows: list[dict[str, Any]] = result.json()["differences"]
    return rows


def test_the_assembled_image_trains_to_the_recipes_fingerprint(
    recipe: Built, assembled: Built, docker_engine: DockerEngine
) -> None:
    assert assembled.report["passed"] is True
    assert _fingerprint(assembled.report) == _fingerprint(recipe.report)
    # Written by reprobox, not built: the recipe's image all the same.
    assert assembled.report["content_id"] == recipe.report["content_id"]
    assert assembled.report["tags"] == recipe.report["tags"]
    assert "docker build" not in assembled.stderr
    assert "write the torch and rest layers" in assembled.stderr  # --no-cache: written, not reused
    probe = docker_engine.run(
        assembled.report["image_id"],
        [
            "sh",
            "-c",
            "find / -name '*.whl' -not -path '/proc/*' -not -path '/usr/share/python-wheels/*'"
            " | head -3; pip list --format json",
        ],
        timeout_s=120,
    )
    assert ".whl" not in probe.stdout
    versions = {p["name"]: p["version"] for p in json.loads(probe.stdout)}
    assert (versions["torch"], versions["numpy"], versions["pip"]) == (
        "2.13.0+cpu",
        "2.4.6",
        "26.3",
    )


def test_the_recipe_rebuilt_with_nothing_changed_is_not_sent_to_the_engine(
    recipe: Built,
) -> None:
    again = _build(recipe.spec, "--recipe")
    assert "unchanged: not sent to the engine again" in again.stderr
    assert "==> build" not in again.stderr
    assert again.report["built_id"] == recipe.report["built_id"] != recipe.report["content_id"]
    assert again.report["image_id"] == recipe.report["image_id"]


def test_the_default_route_assembles_the_recipes_image(recipe: Built) -> None:
    default = _build(recipe.spec)  # neither --assemble nor --recipe
    assert default.report["content_id"] == recipe.report["content_id"]
    assert "route: the recipe" not in default.stderr
    assert "==> build" not in default.stderr


def test_the_assembled_image_is_the_recipes_layer_for_layer(
    recipe: Built, assembled: Built, docker_engine: DockerEngine
) -> None:
    # The same files, owners, modes, times and bytes (the recipe installs with the same
    # pypa/installer, templates/build/reprobox_install.py), in the same order: every layer's
    # diff ID is the recipe's, not only the config that names them.
    ours = docker_engine.inspect_image(assembled.report["content_id"]).diff_ids
    theirs = docker_engine.inspect_image(recipe.report["content_id"]).diff_ids
    assert ours == theirs
    assert len(ours) == 5  # the base's, torch's closure, the rest, /opt/reprobox, the hook
    assert _diff(recipe.report["image_id"], assembled.report["image_id"]) == []


def test_assembling_twice_without_any_cache_gives_the_same_image(
    recipe: Built, assembled: Built
) -> None:
    again = _build(recipe.spec, "--assemble", "--no-cache")
    assert again.report["content_id"] == assembled.report["content_id"]
    assert again.report["image_id"] == assembled.report["image_id"]
    # The lock records both routes' IDs, each compared with its own.
    assert again.report["reproducible"]["matches"] is True
    # Either route records, and compares with, the one line.
    lock = recipe.spec.with_suffix(".lock").read_text()
    assert f"# image-id: {recipe.report['content_id']}\n" in lock
    assert "assembled-image-id" not in lock
    reused = _build(recipe.spec, "--assemble")
    assert reused.report["image_id"] == assembled.report["image_id"]
    assert reused.report["selfcheck"]["reused"] is True
    assert "load (" not in reused.stderr  # nothing sent to the engine


def test_a_small_pin_change_rewrites_only_the_rest_layer(
    recipe: Built, assembled: Built, docker_engine: DockerEngine, tmp_path: Path
) -> None:
    spec = _spec(tmp_path / "pin", ("numpy==2.4.6", "numpy==2.4.5"))
    # A value of this run's own, so no earlier run's image is reused and the load is seen.
    text = spec.read_text()
    assert "env: {}" in text
    spec.write_text(text.replace("env: {}", f"env: {{PIN_TEST_RUN: '{uuid.uuid4().hex}'}}"))
    changed = _build(spec, "--assemble")
    assert re.search(r"torch layer sha256:[0-9a-f]+ from the cache", changed.stderr)
    # Written now, or kept from an earlier run with this numpy (the cache outlives a session).
    assert re.search(
        r"write the rest layer|rest layer sha256:[0-9a-f]+ from the cache", changed.stderr
    )
    sent = re.search(r"load \(([0-9.]+) MB sent", changed.stderr)
    assert sent is not None
    assert float(sent[1]) < 200  # not torch's ~900 MB
    before = docker_engine.inspect_image(assembled.report["image_id"]).diff_ids
    after = docker_engine.inspect_image(changed.report["image_id"]).diff_ids
    assert after[:2] == before[:2]
    assert after[2] != before[2]
    # The negative control of the layer-for-layer test: another numpy is another image, its
    # files show as rows of the rest layer.
    assert changed.report["content_id"] != recipe.report["content_id"]
    rows = _diff(recipe.report["image_id"], changed.report["image_id"])
    assert any(r["section"] == "file" and "numpy" in r["path"] for r in rows)


def test_a_failure_while_the_layer_is_written_stops_the_compile_container_at_once(
    docker_engine: DockerEngine,
    debian_base: BaseImage,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An error (or Ctrl-C) in the writing thread removes the compile container within seconds;
    it is not waited for until it ends (here it would sleep for ten minutes)."""
    from test_assemble_layers import _locked, _target, _wheel

    from reprobox import pycompile, pylayer

    wheel_path = _wheel(tmp_path / "demo_pkg-1.0-py3-none-any.whl")
    wheel, digest = _locked(wheel_path, "demo-pkg")
    monkeypatch.setattr(pycompile, "_COMPILE", "sleep 600")
    first_pass = pylayer.write_wheels

    running: list[set[str]] = []
    interrupted: list[float] = []

    def fail_in_the_second_pass(layer: Any, sources: Any, **kwargs: Any) -> list[str]:
        if layer is not None:
            deadline = time.monotonic() + 60
            while not (_containers_of(debian_base.ref) - before) and time.monotonic() < deadline:
                time.sleep(0.2)
            time.sleep(1)  # started, not only created
            running.append(_containers_of(debian_base.ref) - before)
            interrupted.append(time.monotonic())
            raise KeyboardInterrupt
        return first_pass(layer, sources, **kwargs)

    monkeypatch.setattr(pylayer, "write_wheels", fail_in_the_second_pass)
    before = _containers_of(debian_base.ref)
    with pytest.raises(KeyboardInterrupt):
        pylayer.python_layer(
            docker_engine,
            debian_base.ref,
            _target(tmp_path / "unused-skeleton.tar"),
            [wheel],
            {digest: wheel_path},
            dest=tmp_path / "layer.tar",
            epoch=0,
            bottom=False,
        )
    assert time.monotonic() - interrupted[0] < 15, "not the container's ten minutes"
    assert running[0], "the compile container was there when the writing thread stopped"
    assert _containers_of(debian_base.ref) == before, "the compile container is removed"
    assert not (tmp_path / "layer.tar").exists()


def test_the_hook_container_is_not_started_once_the_build_has_failed(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    """The hook's container runs beside the Python layers; when they fail, `cancel` is set and
    the hook's container goes (here: set before it starts, so it never starts)."""
    import threading

    from reprobox.context import Context
    from reprobox.errors import ContainerCancelledError
    from reprobox.opt_layers import hook_layer

    hook = tmp_path / "reprobox_hook.py"
    hook.write_text("raise SystemExit(0)\n")
    cancel = threading.Event()
    cancel.set()
    before = _containers_of(debian_base.ref)
    with pytest.raises(ContainerCancelledError):
        hook_layer(
            Context.for_command(docker_engine),
            debian_base.ref,
            [hook],
            tmp_path / "hook.tar",
            0,
            cancel=cancel,
        )
    assert _containers_of(debian_base.ref) == before
    assert not (tmp_path / "hook.tar").exists()


def _containers_of(image: str) -> set[str]:
    listed = subprocess.run(
        ["docker", "ps", "-aq", "--no-trunc", "--filter", f"ancestor={image}"],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(listed.stdout.split())


def test_no_cache_asks_the_base_for_its_venv_paths_again(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    """A kept answer is used as it is; `fresh` (what `--no-cache` passes) asks the base again."""
    from reprobox import pylayer

    asked = pylayer.probe_target(docker_engine, debian_base.ref, tmp_path)
    kept = tmp_path / "paths.json"
    answer = json.loads(kept.read_text())
    kept.write_text(json.dumps({**answer, "cache_tag": "cpython-399"}))
    assert pylayer.probe_target(docker_engine, debian_base.ref, tmp_path).cache_tag == "cpython-399"
    again = pylayer.probe_target(docker_engine, debian_base.ref, tmp_path, fresh=True)
    assert again == asked
    assert json.loads(kept.read_text()) == answer


def _py_wheel(folder: Path, dist: str, files: dict[str, bytes]) -> tuple[Any, dict[str, Path]]:
    """A wheel of `files` (and its metadata) locked as the lock names it, and where it is."""
    import hashlib
    import zipfile

    from test_assemble_layers import _locked, _urlsafe

    path = folder / f"{dist}-1.0-py3-none-any.whl"
    files = {
        **files,
        f"{dist}-1.0.dist-info/METADATA": f"Metadata-Version: 2.1\nName: {dist}\nVersion: 1.0\n".encode(),
        f"{dist}-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\n"
        b"Root-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = [f"{name},sha256={_urlsafe(data)},{len(data)}" for name, data in files.items()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
        archive.writestr(f"{dist}-1.0.dist-info/RECORD", "\n".join(record) + "\n")
    wheel, digest = _locked(path, dist)
    assert digest == hashlib.sha256(path.read_bytes()).hexdigest()
    return wheel, {digest: path}


def _pycs(layer: Path) -> dict[str, bytes]:
    import tarfile

    with tarfile.open(layer) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar
            if m.isfile() and m.name.endswith(".pyc")
        }


@pytest.mark.parametrize("shared", [False, True], ids=["apart", "same-path"])
def test_layers_written_together_hold_what_each_written_alone_holds(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path, shared: bool
) -> None:
    """One compile container for two layers gives each the bytes of its own compile. Where two
    wheels ship a `.py` file at the same path (with other contents), each layer's pyc is of its
    own copy: the layers are then compiled in a container each."""
    from test_assemble_layers import _target

    from reprobox import pylayer

    other = "alpha/extra.py" if shared else "beta/__init__.py"
    alpha = {"alpha/__init__.py": b"A = 'alpha'\n"}
    if shared:  # the same path in both wheels, with other contents
        alpha[other] = b"B = 'first'\n"
    first, first_files = _py_wheel(tmp_path, "alpha", alpha)
    second, second_files = _py_wheel(tmp_path, "beta", {other: b"B = 'beta' * 3\n"})
    files = {**first_files, **second_files}
    target = _target(tmp_path / "unused-skeleton.tar")
    together = pylayer.python_layers(
        docker_engine,
        debian_base.ref,
        target,
        [
            pylayer.LayerJob([first], tmp_path / "together-1.tar", bottom=False),
            pylayer.LayerJob([second], tmp_path / "together-2.tar", bottom=False),
        ],
        files,
        epoch=0,
    )
    alone = [
        pylayer.python_layer(
            docker_engine,
            debian_base.ref,
            target,
            [wheel],
            files,
            dest=tmp_path / f"alone-{n}.tar",
            epoch=0,
            bottom=False,
        )
        for n, wheel in enumerate([first, second], 1)
    ]
    assert [layer.diff_id for layer in together] == [layer.diff_id for layer in alone]
    pycs = [_pycs(layer.path) for layer in together]
    assert all(pycs), "each layer holds pycs"
    pyc = f"opt/venv/lib/python3.11/site-packages/{other.rpartition('/')[0]}/__pycache__/"
    pyc += other.rpartition("/")[2].removesuffix(".py") + ".cpython-311.pyc"
    assert pyc in pycs[1]
    if shared:  # each layer's pyc is of its own copy
        assert pycs[0][pyc] != pycs[1][pyc]
        assert b"first" in pycs[0][pyc]
        assert b"beta" in pycs[1][pyc]
