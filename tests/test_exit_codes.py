"""One test per row of README's exit-code table: the real CLI in a fresh process, its code, its
message, and (for bad input) that nothing was written. Rows that need an engine are `docker`."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import inspect
import itertools
import json
import os
import pkgutil
import shutil
import socket
import socketserver
import subprocess
import threading
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest
from archives import Entry, layer, raw_config, write_archive
from cli import Cli, reprobox
from conftest import skip_or_fail
from engine_admin import remove_image
from fakes import FakeEngine
from test_render import fake_lock
from test_stages import engine_with_base, project

from reprobox import cli
from reprobox.docker_engine import DockerEngine
from reprobox.engine import RunResult
from reprobox.errors import (
    EXIT_BAD_INPUT,
    EXIT_CHECK_FAILED,
    EXIT_INTERNAL,
    EXIT_MISSING,
    EXIT_OK,
    EXIT_UNRECORDED,
    ContainerTimeoutError,
    ReproboxError,
)
from reprobox.lockfile import format_lock
from reprobox.spec_load import load_spec

ROOT = Path(__file__).resolve().parent.parent
DEMO = (ROOT / "images" / "demo-cpu.yaml").read_text()


def _project(folder: Path, spec_text: str = DEMO, *, lock: bool = True) -> Path:
    """A spec (and a lock made for it without resolving) in `folder`; the spec's path."""
    folder.mkdir(parents=True, exist_ok=True)
    spec_path = folder / "spec.yaml"
    spec_path.write_text(spec_text)
    if lock:
        locked = fake_lock(load_spec(spec_path))
        (folder / "spec.lock").write_text(format_lock(locked))
    return spec_path


def _files(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def _bad_input_writes_nothing(
    folder: Path, *argv: str | Path, env: dict[str, str] | None = None
) -> Cli:
    before = _files(folder)
    done = reprobox(*argv, env=env)
    assert done.code == EXIT_BAD_INPUT, done.stderr
    assert "\nreprobox: error: " in "\n" + done.stderr
    assert "Traceback" not in done.stderr
    assert _files(folder) == before, "exit 2 changed files"
    return done


# -- 0 ------------------------------------------------------------------------------------------


def test_0_render_writes_the_context(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    done = reprobox("render", spec, "-o", tmp_path / "ctx", "--no-wheels")
    assert done.code == EXIT_OK, done.stderr
    assert (tmp_path / "ctx" / "Dockerfile").is_file()


# -- 1 ------------------------------------------------------------------------------------------


def test_1_two_images_differ(tmp_path: Path) -> None:
    paths = []
    for name, data in (("a", b"1"), ("b", b"2")):
        layers = [layer(Entry("opt/data", data))]
        write_archive(tmp_path / f"{name}.tar", raw_config(layers), layers)
        paths.append(tmp_path / f"{name}.tar")
    done = reprobox("diff", *paths)
    assert done.code == EXIT_CHECK_FAILED, done.stderr
    assert "/opt/data" in done.stdout


# -- 2: bad input, and nothing written ------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (("apt: []", 'apt: ["curl\\nRUN id"]'), "control or invisible character"),
        (("numpy==2.4.6", '"numpy==2.4.6\\n"'), "packages[0]"),
        (("version: 1", "version: true"), "version"),
        (("env: {}", 'env: {"KEY\\n": x}'), "env"),
        (("apt: []", "apt: &a [*a]"), "nest more than 32 levels"),
    ],
    ids=["newline-in-apt", "newline-in-pin", "version-true", "newline-in-env-key", "self-alias"],
)
def test_2_a_hostile_spec_writes_no_lock_and_no_context(
    tmp_path: Path, change: tuple[str, str], expected: str
) -> None:
    spec = _project(tmp_path, DEMO.replace(*change), lock=False)
    done = _bad_input_writes_nothing(tmp_path, "render", spec, "-o", tmp_path / "ctx")
    assert expected in done.stderr


def test_2_an_alias_bomb_ends_at_once(tmp_path: Path) -> None:
    levels = ["a: &a [" + ",".join(["lol"] * 9) + "]"]
    levels += [
        f"{n}: &{n} [" + ",".join([f"*{p}"] * 9) + "]" for p, n in itertools.pairwise("abcdefghi")
    ]
    spec = _project(tmp_path, "\n".join(levels) + "\n", lock=False)
    done = _bad_input_writes_nothing(tmp_path, "lock", spec)
    assert "more than 16 aliases" in done.stderr


def test_2_a_script_linked_to_a_secret_is_refused_before_anything(tmp_path: Path) -> None:
    secret = tmp_path / "home" / ".docker" / "config.json"
    secret.parent.mkdir(parents=True)
    secret.write_text('{"auths": {"registry": {"auth": "c2VjcmV0"}}}')
    repo = tmp_path / "repo"
    spec = _project(repo, DEMO.replace("  # script: train.py", "  script: train.py"), lock=False)
    (repo / "train.py").symlink_to(secret)
    done = _bad_input_writes_nothing(tmp_path, "render", spec, "-o", repo / "ctx")
    assert "outside the spec's folder" in done.stderr
    assert "c2VjcmV0" not in done.stderr + done.stdout


def test_2_render_into_a_file(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    (tmp_path / "out").write_text("mine")
    done = _bad_input_writes_nothing(
        tmp_path, "render", spec, "-o", tmp_path / "out", "--no-wheels"
    )
    assert "not a directory" in done.stderr


def test_2_render_into_a_non_empty_folder_writes_no_lock(tmp_path: Path) -> None:
    spec = _project(tmp_path, lock=False)  # no lock: the old order wrote one before refusing
    (tmp_path / "ctx").mkdir()
    (tmp_path / "ctx" / "keep.txt").write_text("mine")
    done = _bad_input_writes_nothing(tmp_path, "render", spec, "-o", tmp_path / "ctx")
    assert "is not empty" in done.stderr


def test_2_a_cache_dir_that_is_a_file(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    (tmp_path / "cache").write_text("not a folder")
    env = {"REPROBOX_CACHE_DIR": str(tmp_path / "cache")}
    done = _bad_input_writes_nothing(tmp_path, "render", spec, "-o", tmp_path / "ctx", env=env)
    assert "is not a folder" in done.stderr


def test_2_export_into_a_directory_before_any_work(tmp_path: Path) -> None:
    done = _bad_input_writes_nothing(tmp_path, "export", "any-image:1", "-o", tmp_path)
    assert "is a directory" in done.stderr


def test_2_a_download_larger_than_the_lock_says(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    lock = fake_lock(load_spec(spec))
    wheel = tmp_path / "served" / "big.whl"
    wheel.parent.mkdir()
    wheel.write_bytes(b"\0" * 10_000)
    wheels = tuple(dataclasses.replace(w, url=wheel.as_uri(), size=100) for w in lock.wheels)
    (tmp_path / "spec.lock").write_text(format_lock(dataclasses.replace(lock, wheels=wheels)))
    env = {"REPROBOX_CACHE_DIR": str(tmp_path / "cache")}
    done = reprobox("render", spec, "-o", tmp_path / "ctx", env=env)
    assert done.code == EXIT_BAD_INPUT, done.stderr
    assert "more than 100 bytes (the size the lock records)" in done.stderr
    assert not (tmp_path / "ctx").exists()
    assert [p for p in (tmp_path / "cache").rglob("*") if p.is_file()] == []


@pytest.mark.docker
def test_2_import_of_an_archive_that_is_not_a_reprobox_export(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    layers = [layer(Entry("opt/data", b"foreign"))]
    archive = tmp_path / "foreign.tar"
    write_archive(archive, raw_config(layers), layers)
    done = _bad_input_writes_nothing(tmp_path, "import", archive)
    assert "is not a reprobox export" in done.stderr
    assert "--allow-foreign" in done.stderr


@pytest.mark.docker
def test_2_check_of_an_image_whose_selfcheck_label_is_not_json(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    (tmp_path / "Dockerfile").write_text(
        'FROM scratch\nLABEL reprobox.selfcheck.argv="{not json"\n'
    )
    image = docker_engine.build(tmp_path)
    try:
        done = reprobox("check", image)
        assert done.code == EXIT_BAD_INPUT, done.stderr
        assert "reprobox.selfcheck.argv label is not the self-check command" in done.stderr
    finally:
        remove_image(docker_engine, image, force=True)


def test_2_assemble_of_what_it_cannot_build_yet(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--assemble` with `apt:` on a pinned base.image: refused before locking, nothing written."""
    spec_path = project(tmp_path / "p")  # a pinned base.image
    spec_path.write_text(spec_path.read_text() + "apt:\n  - curl\n")
    lock = spec_path.with_suffix(".lock")
    lock.unlink(missing_ok=True)
    monkeypatch.setenv("REPROBOX_CACHE_DIR", str(tmp_path / "cache"))
    engine = FakeEngine()
    assert cli.main(["build", str(spec_path), "--assemble"], engine=engine) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "`--assemble` does not install `apt:` packages on a pinned `base.image` yet" in err
    assert not lock.exists()
    assert engine.runs == []


def test_2_assemble_with_a_layer_cache_bound_that_is_not_a_size(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """REPROBOX_ASSEMBLE_CACHE_GB is read before locking: a bad one writes nothing."""
    spec_path = project(tmp_path / "p")
    lock = spec_path.with_suffix(".lock")
    lock.unlink(missing_ok=True)
    monkeypatch.setenv("REPROBOX_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setenv("REPROBOX_ASSEMBLE_CACHE_GB", "20GB")
    engine = FakeEngine()
    assert cli.main(["build", str(spec_path), "--assemble"], engine=engine) == EXIT_BAD_INPUT
    assert "REPROBOX_ASSEMBLE_CACHE_GB='20GB' is not a size in gigabytes" in capsys.readouterr().err
    assert not lock.exists()
    assert engine.runs == []


def test_2_a_build_step_that_fails_on_what_the_spec_asks_for(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The recipe and the wheels are reprobox's own: a RUN step fails on the spec's input."""
    spec_path = project(tmp_path / "p")
    monkeypatch.setenv("REPROBOX_CACHE_DIR", str(tmp_path / "cache"))
    said = "ERROR: numpy-2.4.6 is not a supported wheel on this platform"
    engine = engine_with_base(fail_on={"--requirements /reprobox-build/rest.txt": said})
    assert cli.main(["build", str(spec_path), "--recipe"], engine=engine) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    assert "reprobox: error: docker build failed at step" in err
    assert "  step: RUN " in err
    assert f"  | {said}" in err
    assert "Traceback" not in err
    assert engine.runs == [], "nothing ran after the failed step"


# -- 3: the environment lacks something -----------------------------------------------------------


def test_3_no_engine(tmp_path: Path) -> None:
    done = reprobox("check", "x:1", env={"DOCKER_HOST": f"unix://{tmp_path}/no.sock"})
    assert done.code == EXIT_MISSING, done.stderr


@contextlib.contextmanager
def _read_only(folder: Path) -> Iterator[None]:
    """`folder` made unwritable even for root (the immutable attribute), or a skip."""
    folder.mkdir(exist_ok=True)
    if os.geteuid() != 0:
        folder.chmod(0o555)
        try:
            yield
        finally:
            folder.chmod(0o755)
        return
    if (
        shutil.which("chattr") is None
        or subprocess.run(
            ["chattr", "+i", str(folder)], capture_output=True, check=False
        ).returncode
    ):
        pytest.skip("cannot make a folder read-only for root here (chattr +i failed)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


def test_3_a_read_only_cache_dir(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    with _read_only(tmp_path / "cache"):
        env = {"REPROBOX_CACHE_DIR": str(tmp_path / "cache")}
        done = reprobox("render", spec, "-o", tmp_path / "ctx", env=env)
    assert done.code == EXIT_MISSING, done.stderr
    assert "cannot write to the cache folder" in done.stderr
    assert not (tmp_path / "ctx").exists()


@contextlib.contextmanager
def _full_disk(folder: Path) -> Iterator[Path]:
    """A 16 KiB tmpfs at `folder`: a real filesystem that runs out of room (root only)."""
    folder.mkdir()
    if os.geteuid() != 0:
        skip_or_fail("mounting a tmpfs needs root (CI runs as root)")
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=16k", "tmpfs", str(folder)],
        capture_output=True,
        text=True,
        check=False,
    )
    if mounted.returncode:
        skip_or_fail(f"cannot mount a tmpfs here: {mounted.stderr.strip()}")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


def test_3_a_full_disk_is_named_not_a_bug(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    with _full_disk(tmp_path / "full") as full:
        done = reprobox("render", spec, "-o", full / "ctx", "--no-wheels")
        left = sorted(p.name for p in full.iterdir())
    assert done.code == EXIT_MISSING, done.stderr
    assert "no space left on the device" in done.stderr
    assert "internal error" not in done.stderr
    assert "Traceback" not in done.stderr
    assert left == [], "a render that ran out of room left files behind"


def test_3_a_wheel_server_that_does_not_answer(tmp_path: Path) -> None:
    spec = _project(tmp_path)
    lock = fake_lock(load_spec(spec))
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    wheels = tuple(
        dataclasses.replace(w, url=f"http://127.0.0.1:{port}/{w.filename}") for w in lock.wheels
    )
    (tmp_path / "spec.lock").write_text(format_lock(dataclasses.replace(lock, wheels=wheels)))
    env = {"REPROBOX_CACHE_DIR": str(tmp_path / "cache")}
    done = reprobox("render", spec, "-o", tmp_path / "ctx", env=env)
    assert done.code == EXIT_MISSING, done.stderr
    assert "check the network" in done.stderr


class _Garbage(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.recv(65536)
        self.request.sendall(b"\x00\xffgarbage, not HTTP\r\n\r\n")


@pytest.mark.docker
def test_3_a_registry_that_answers_garbage(docker_engine: DockerEngine, tmp_path: Path) -> None:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _Garbage)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, args=(0.05,), daemon=True).start()
    try:
        spec = _project(tmp_path)
        to = f"127.0.0.1:{server.server_address[1]}/team/demo"
        done = reprobox("publish", spec, "--to", to, env={"DOCKER_CONFIG": str(tmp_path)})
    finally:
        server.shutdown()
        server.server_close()
    assert done.code == EXIT_MISSING, done.stderr
    assert "does not speak HTTP" in done.stderr


def test_3_a_container_past_its_time_limit(capsys: pytest.CaptureFixture[str]) -> None:
    """The engine stopped the self-check's container (tests/test_engine.py shows the real one
    doing so): nothing was compared, so not a failed check."""
    argv = ["python", "/opt/reprobox/reprobox_selfcheck.py", "--steps", "4"]
    labels = {"reprobox.selfcheck.argv": json.dumps(argv), "reprobox.cuda": "cpu"}

    def hang(image: str, argv: Sequence[str], env: Mapping[str, str]) -> RunResult:
        raise ContainerTimeoutError(
            f"running `{' '.join(argv)}` in {image}: still running after 3600 s, stopped",
            hint="raise the time limit, or make the command do less",
        )

    engine = FakeEngine(run_handler=hang)
    engine.add_image({"config": {"Labels": labels}}, "img:1")
    assert cli.main(["check", "img:1"], engine=engine) == EXIT_MISSING
    err = capsys.readouterr().err
    assert "still running after 3600 s, stopped" in err
    assert "Traceback" not in err


# -- 4: a bug in reprobox -----------------------------------------------------------------------


def test_4_any_other_exception_is_an_internal_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(args: object, ctx: object) -> int:
        raise KeyError("a bug")

    monkeypatch.setattr(cli, "_cmd_init", broken)
    assert cli.main(["init"]) == EXIT_INTERNAL
    err = capsys.readouterr().err
    assert err.startswith("reprobox: internal error: KeyError")
    assert "Traceback" not in err
    assert cli.main(["--debug", "init"]) == EXIT_INTERNAL
    assert "Traceback" in capsys.readouterr().err


def test_every_error_class_lives_in_errors_with_one_exit_meaning() -> None:
    """Each ReproboxError subclass is defined in reprobox.errors, and its exit code is a class
    property (1, 2 or 3), so an error's class says what kind of problem it is."""
    package = Path(cli.__file__).parent
    for info in pkgutil.iter_modules([str(package)]):
        if info.name != "__main__":  # that one runs the CLI
            importlib.import_module(f"reprobox.{info.name}")
    found: list[type[ReproboxError]] = []
    todo: list[type[ReproboxError]] = [ReproboxError]
    while todo:
        cls = todo.pop()
        found.append(cls)
        todo.extend(cls.__subclasses__())
    assert len(found) > 10
    for cls in found:
        assert cls.__module__ == "reprobox.errors", f"{cls.__name__} lives in {cls.__module__}"
        assert cls.exit_code in {EXIT_CHECK_FAILED, EXIT_BAD_INPUT, EXIT_MISSING}, cls
    assert "exit_code" not in inspect.signature(ReproboxError.__init__).parameters


def test_5_check_on_a_host_class_the_image_recorded_nothing_for(
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The check stage and the CLI as they are, over a fake engine whose image recorded a fingerprint
    # for another device class: the runs agree here, so neither 0 nor 1 (the real thing, on
    # emulated CPUs, is in tests/test_cpu_portability.py).
    from fakes import FakeEngine

    report = {
        "passed": True, "fingerprint": "f" * 64, "device_class": "cpu-x86_64-v3-rcp00000000",
        "first_difference": None, "failures": [], "runs": [{"losses": ["0x1p-1"]}],
    }  # fmt: skip
    engine = FakeEngine(run_handler=lambda *_: RunResult(0, json.dumps(report), ""))
    labels = {
        "reprobox.selfcheck.argv": json.dumps(
            ["python", "/opt/reprobox/reprobox_selfcheck.py", "--steps", "1"]
        ),
        "reprobox.cuda": "cpu",
        "reprobox.fingerprint.cpu-x86_64-v2-rcp00000000": "e" * 64,
    }
    engine.add_image({"config": {"Labels": labels}}, "demo:1")
    assert cli.main(["check", "demo:1", "--json"], engine=engine) == EXIT_UNRECORDED
    out = json.loads(capsys.readouterr().out)
    assert (out["verdict"], out["matches_recorded"]) == ("unrecorded", None)
    assert out["device_class"] == "cpu-x86_64-v3-rcp00000000"
    assert out["recorded_classes"] == ["cpu-x86_64-v2-rcp00000000"]


def test_the_readme_table_has_a_row_per_code_and_names_tests_that_exist() -> None:
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("| exit |") :].split("\n\n", 1)[0]
    codes = [line.split("|")[1].strip() for line in table.splitlines()[2:]]
    assert codes == ["0", "1", "2", "3", "4", "5", "130"]
    here = {
        name.removeprefix("test_").split("_", 1)[0]
        for name in globals()
        if name.startswith("test_")
    }
    assert {"0", "1", "2", "3", "4", "5"} <= here  # a test per row, named after its code


@pytest.mark.parametrize(
    "argv",
    [
        ("check", "demo:1\nRUN id"),
        ("check", "--json", "Demo:Latest"),
        ("export", "demo:1 extra", "-o", "out.tar"),
        ("diff", "demo:1", "\x1b[2Jdemo:2"),
        ("build", "spec.yaml", "--tag", "not a tag"),
    ],
    ids=["newline", "upper-case", "space", "escape", "build-tag"],
)
def test_2_an_image_name_that_is_no_reference_is_refused_before_the_engine(
    tmp_path: Path, argv: tuple[str, ...], monkeypatch: pytest.MonkeyPatch
) -> None:
    _project(tmp_path)
    monkeypatch.chdir(tmp_path)
    # No engine at all: the name is refused before one is asked (else this would be exit 3).
    env = {"DOCKER_HOST": f"unix://{tmp_path}/no.sock"}
    done = _bad_input_writes_nothing(tmp_path, *argv, env=env)
    assert "is not an image name or ID" in done.stderr
    assert "\x1b" not in done.stderr
