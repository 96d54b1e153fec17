"""export and import: `import` trusts no archive (bounded reads, every layer verified, only
reprobox exports, no tag moved without --force, no base planted) and `export -o` is checked before
any work. Unit tests with small real archives and the FakeEngine (which reads real archives), then
the real engine end to end; the base-planting case runs on the real engine in test_bootstrap.py.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import resource
import subprocess
import sys
import tarfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from cli import reprobox
from engine_admin import remove_image
from fakes import FakeEngine, context

from reprobox.cli_format import report
from reprobox.docker_engine import DockerEngine
from reprobox.errors import EXIT_BAD_INPUT, ReproboxError
from reprobox.export_import import export_image as export_stage
from reprobox.export_import import import_image as import_stage
from reprobox.export_import import verify_archive
from reprobox.labels import recorded_fingerprints

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "images" / "demo-cpu.yaml"
SPEC = b"version: 1\nname: demo\n"
#: Import and export need no cache of their own.
UNUSED_CACHE = Path("/nonexistent/reprobox-cache")


def import_image(path: Path, *, engine: FakeEngine, **flags: bool) -> dict[str, Any]:
    """`reprobox import --json`'s report, the stage run with the fake engine."""
    return report(import_stage(context(engine, UNUSED_CACHE), path, **flags))


def export_image(image: str, output: Path, *, engine: FakeEngine) -> dict[str, Any]:
    """`reprobox export --json`'s report, the stage run with the fake engine."""
    return report(export_stage(context(engine, UNUSED_CACHE), image, output))


LOCK = b"# reprobox-lock: 1\n"


def _layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = os.urandom(1024)
        info = tarfile.TarInfo("opt/file")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def _export_like(
    path: Path,
    *,
    labels: Mapping[str, str] | None = None,
    side: Mapping[str, bytes] | None = None,
    tags: Sequence[str] = ("demo:1",),
    manifest: bytes | None = None,
) -> tuple[Path, str]:
    """An archive shaped like `reprobox export`'s: one image, its spec and lock, matching labels."""
    layer = _layer()
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    if labels is None:
        labels = {
            "reprobox.spec-sha256": hashlib.sha256(SPEC).hexdigest(),
            "reprobox.lock-sha256": hashlib.sha256(LOCK).hexdigest(),
        }
    config = json.dumps(
        {"config": {"Labels": dict(labels)}, "rootfs": {"type": "layers", "diff_ids": [diff_id]}}
    ).encode()
    config_hex = hashlib.sha256(config).hexdigest()
    entries = [{"Config": f"{config_hex}.json", "RepoTags": list(tags), "Layers": ["l/layer.tar"]}]
    members = {
        f"{config_hex}.json": config,
        "l/layer.tar": layer,
        "manifest.json": manifest if manifest is not None else json.dumps(entries).encode(),
    }
    if side is None:
        side = {"reprobox/spec.yaml": SPEC, "reprobox/reprobox.lock": LOCK}
    members.update(side)
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path, f"sha256:{config_hex}"


def _refused(path: Path, engine: FakeEngine, **flags: bool) -> str:
    with pytest.raises(ReproboxError) as caught:
        import_image(path, engine=engine, **flags)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert not any(call[0] == "load" for call in engine.calls), "the engine loaded it anyway"
    return caught.value.render()


def test_a_reprobox_export_is_imported(tmp_path: Path) -> None:
    path, image_id = _export_like(tmp_path / "a.tar")
    engine = FakeEngine()
    report = import_image(path, engine=engine)
    assert report["image_ids"] == [image_id]
    assert report["reprobox_export"] is True
    assert engine.inspect_image("demo:1").id == image_id


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        ({"side": {}}, "has no reprobox/spec.yaml member"),
        ({"side": {"reprobox/spec.yaml": SPEC}}, "has no reprobox/reprobox.lock member"),
        ({"labels": {}}, "has no reprobox.spec-sha256 label"),
        (
            {"side": {"reprobox/spec.yaml": b"name: other\n", "reprobox/reprobox.lock": LOCK}},
            "does not match the image's reprobox.spec-sha256",
        ),
    ],
    ids=["plain-docker-save", "no-lock", "no-labels", "spec-swapped"],
)
def test_anything_but_a_reprobox_export_needs_allow_foreign(
    tmp_path: Path, change: dict[str, object], expected: str
) -> None:
    path, image_id = _export_like(tmp_path / "a.tar", **change)  # type: ignore[arg-type]
    message = _refused(path, FakeEngine())
    assert "is not a reprobox export" in message
    assert expected in message
    assert "--allow-foreign" in message
    engine = FakeEngine()
    report = import_image(path, engine=engine, allow_foreign=True)
    assert report["image_ids"] == [image_id]
    assert report["reprobox_export"] is False


def test_an_existing_tag_is_never_moved_without_force(tmp_path: Path) -> None:
    engine = FakeEngine()
    mine = engine.add_image({"config": {"Labels": {"mine": "1"}}}, "demo:1")
    path, image_id = _export_like(tmp_path / "a.tar")
    message = _refused(path, engine)
    assert "would move demo:1" in message
    assert "--force" in message
    assert engine.inspect_image("demo:1").id == mine
    import_image(path, engine=engine, force=True)
    assert engine.inspect_image("demo:1").id == image_id
    # The control: re-importing the same image moves nothing, so needs no --force.
    import_image(path, engine=engine)


@pytest.mark.parametrize(
    ("tag", "expected"),
    [
        ("reprobox/base:bookworm-0123456789ab", "bases are made on this host only"),
        ("demo:1\nRUN", "malformed tag"),
        ("Demo:1", "malformed tag"),
        ("demo", "malformed tag"),
    ],
)
def test_base_and_malformed_tags_are_refused(tmp_path: Path, tag: str, expected: str) -> None:
    path, _ = _export_like(tmp_path / "a.tar", tags=[tag])
    assert expected in _refused(path, FakeEngine(), allow_foreign=True, force=True)


def test_a_deeply_nested_manifest_is_exit_2(tmp_path: Path) -> None:
    path, _ = _export_like(tmp_path / "a.tar", manifest=b"[" * 200_000 + b"]" * 200_000)
    with pytest.raises(ReproboxError, match="not JSON") as caught:
        verify_archive(path)
    assert caught.value.exit_code == EXIT_BAD_INPUT


def test_a_manifest_of_the_wrong_shape_is_exit_2(tmp_path: Path) -> None:
    for manifest in (b"{}", b"[]", b'[{"Config": 1}]', b'[{"Config": "x", "Layers": "abc"}]'):
        path, _ = _export_like(tmp_path / "a.tar", manifest=manifest)
        with pytest.raises(ReproboxError) as caught:
            verify_archive(path)
        assert caught.value.exit_code == EXIT_BAD_INPUT


_BOMB_MEMBER = 256 << 20  # 256 times the manifest limit; the whole file gzips to about 250 KB


class _Spaces(io.RawIOBase):
    def __init__(self, size: int) -> None:
        self.left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: memoryview) -> int:  # type: ignore[override]
        n = min(len(buffer), self.left)
        buffer[:n] = b" " * n
        self.left -= n
        return n


def _gzip_bomb(path: Path) -> Path:
    """A gzip'd docker-archive whose manifest.json unpacks to 256 MiB."""
    with gzip.open(path, "wb", compresslevel=1) as raw, tarfile.open(fileobj=raw, mode="w") as tar:
        info = tarfile.TarInfo("manifest.json")
        info.size = _BOMB_MEMBER
        tar.addfile(info, io.BufferedReader(_Spaces(_BOMB_MEMBER), 1 << 20))
    return path


# The peak is VmHWM, this process's own high-water mark: ru_maxrss would not do, Linux carries the
# parent's high-water mark over fork/vfork and exec, so a big pytest process would show as the child's.
_MEASURE = """
import sys
from pathlib import Path
from reprobox.errors import ReproboxError
from reprobox.{module} import {function}
try:
    {function}({args})
except ReproboxError as err:
    print(err.exit_code, err.message.splitlines()[0])
status = Path("/proc/self/status").read_text().splitlines()
print(next(int(line.split()[1]) for line in status if line.startswith("VmHWM:")) // 1024)
"""


@pytest.mark.parametrize(
    ("module", "function", "args"),
    [
        ("export_import", "verify_archive", "Path(sys.argv[1])"),
        ("diff", "diff_images", "sys.argv[1], sys.argv[1], engine=None"),
    ],
    ids=["import", "diff"],
)
def test_a_gzip_bomb_manifest_is_refused_in_bounded_memory(
    tmp_path: Path, module: str, function: str, args: str
) -> None:
    bomb = _gzip_bomb(tmp_path / "bomb.tar.gz")
    assert bomb.stat().st_size < 2 << 20
    code = _MEASURE.format(module=module, function=function, args=args)
    done = subprocess.run(
        [sys.executable, "-c", code, str(bomb)], capture_output=True, text=True, check=True
    )
    verdict, peak_mb = done.stdout.splitlines()
    baseline = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024
    assert int(peak_mb) < 200, f"peak {peak_mb} MB (this test process: {baseline} MB)"
    assert verdict.startswith(f"{EXIT_BAD_INPUT} "), done.stdout
    assert "more than 1048576" in verdict


def test_export_into_a_directory_is_refused_before_any_work(tmp_path: Path) -> None:
    engine = FakeEngine()
    with pytest.raises(ReproboxError, match="is a directory") as caught:
        export_image("demo:1", tmp_path, engine=engine)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert engine.calls == []  # not even an inspect: the 10 s save never starts
    (tmp_path / "file").write_text("x")
    with pytest.raises(ReproboxError, match="not a directory"):
        export_image("demo:1", tmp_path / "file" / "out.tar", engine=engine)
    assert engine.calls == []


def test_foreign_labels_reach_reports_only_when_well_formed() -> None:
    labels = {
        "reprobox.fingerprint.cpu-x86_64": "ab" * 32,
        "reprobox.fingerprint.cuda-sm90": "\x1b]0;pwned\x07" + "a" * 50,
        "reprobox.fingerprint.\x1b[2J": "cd" * 32,
        "reprobox.fingerprint.gpu": "not hex",
    }
    assert recorded_fingerprints(labels) == {"cpu-x86_64": "ab" * 32}


# --- archives: verified in full before the engine sees them ---------------------------------------


def _saved(path: Path, layer: bytes) -> Path:
    """A one-layer docker-archive as `docker save` writes it."""
    diff_id = "sha256:" + hashlib.sha256(layer).hexdigest()
    config = json.dumps({"rootfs": {"type": "layers", "diff_ids": [diff_id]}}).encode()
    config_name = hashlib.sha256(config).hexdigest() + ".json"
    manifest = [{"Config": config_name, "RepoTags": ["x:1"], "Layers": ["abc/layer.tar"]}]
    with tarfile.open(path, "w") as tar:
        for name, data in (
            (config_name, config),
            ("abc/layer.tar", layer),
            ("manifest.json", json.dumps(manifest).encode()),
        ):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return path


def _random_layer() -> bytes:
    out = io.BytesIO()
    with tarfile.open(fileobj=out, mode="w") as tar:
        data = os.urandom(4096)
        info = tarfile.TarInfo("opt/file")
        info.size = len(data)
        tar.addfile(info, io.BytesIO(data))
    return out.getvalue()


def test_a_sound_archive_verifies(tmp_path: Path) -> None:
    contents = verify_archive(_saved(tmp_path / "a.tar", _random_layer()))
    assert contents.tags == ("x:1",)
    assert len(contents.image_ids) == 1


@pytest.mark.parametrize("damage", ["flip", "truncate", "not-a-tar"])
def test_a_damaged_archive_is_refused_before_loading(tmp_path: Path, damage: str) -> None:
    path = _saved(tmp_path / "a.tar", _random_layer())
    data = bytearray(path.read_bytes())
    if damage == "flip":
        at = data.index(b"opt/file") + 1024  # inside the layer's file data
        data[at] ^= 0xFF
    elif damage == "truncate":
        del data[len(data) // 2 :]
    else:
        data = bytearray(b"hello, not an archive" * 100)
    path.write_bytes(bytes(data))
    with pytest.raises(ReproboxError) as caught:
        verify_archive(path)
    assert caught.value.exit_code == EXIT_BAD_INPUT
    assert "nothing was loaded" in caught.value.message


# --- the real engine ------------------------------------------------------------------------------


def _spec(folder: Path, name: str) -> Path:
    """The CPU example under another name (its own cheap top layers)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "spec.yaml"
    path.write_text(DEMO.read_text().replace("name: demo-cpu", f"name: {name}"))
    return path


@pytest.mark.docker
def test_export_then_import_on_a_clean_engine_then_check(
    docker_engine: DockerEngine, tmp_path: Path
) -> None:
    spec = _spec(tmp_path / "spec", "reprobox-publish-test")
    built = reprobox("build", spec, "--json")
    assert built.code == 0, built.stderr
    tag, image_id = built.json()["tags"][0], built.json()["image_id"]
    archive = tmp_path / "out" / "demo.tar"
    exported = reprobox("export", tag, "-o", archive, "--json")
    assert exported.code == 0, exported.stderr
    assert exported.json()["members"] == ["reprobox/reprobox.lock", "reprobox/spec.yaml"]
    labels = docker_engine.inspect_image(image_id).labels
    with tarfile.open(archive) as tar:
        lock, spec_inside = (
            tar.extractfile(f"reprobox/{n}") for n in ("reprobox.lock", "spec.yaml")
        )
        assert lock is not None
        assert spec_inside is not None
        assert hashlib.sha256(lock.read()).hexdigest() == labels["reprobox.lock-sha256"]
        assert "name: reprobox-publish-test" in spec_inside.read().decode()

    remove_image(docker_engine, image_id, force=True)
    assert not docker_engine.image_exists(image_id)
    damaged = tmp_path / "damaged.tar"
    with archive.open("rb") as source, damaged.open("wb") as out:
        out.write(source.read(archive.stat().st_size * 3 // 5))
    refused = reprobox("import", damaged)
    assert refused.code == EXIT_BAD_INPUT
    assert "nothing was loaded" in refused.stderr
    assert not docker_engine.image_exists(image_id), "nothing half-loaded"

    imported = reprobox("import", archive, "--json")
    assert imported.code == 0, imported.stderr
    assert imported.json()["image_ids"] == [image_id]
    assert imported.json()["tags"] == [tag]
    assert imported.json()["lock_matches_label"] is True
    check = reprobox("check", tag, "--json")
    assert check.code == 0, check.stderr
    assert check.json()["matches_recorded"] is True
