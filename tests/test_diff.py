"""diff_images and format_diff: synthetic docker-archives, a fake engine, then the real engine."""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path
from typing import Any

import pytest
from archives import (
    BUILD_TIME,
    ArchiveEngine,
    Entry,
    directory,
    layer,
    raw_config,
    sha256,
    write_archive,
)
from engine_admin import remove_image

from reprobox.bootstrap import BaseImage
from reprobox.cli_format import format_diff, report
from reprobox.diff import ImageDiff, diff_images
from reprobox.docker_engine import DockerEngine
from reprobox.errors import ReproboxError

BASE = layer(directory("etc"), Entry("etc/os-release", b"debian"))
APP = (
    directory("opt"),
    Entry("opt/app.py", b"print('hi')\n", mode=0o755),
    Entry("opt/link", type=tarfile.SYMTYPE, linkname="app.py"),
    Entry("opt/data", b"1234"),
)

Row = tuple[str, int | None, str, str, str | None, str | None]


def _json(diff: ImageDiff) -> dict[str, Any]:
    """`reprobox diff --json`'s report, less its text summary."""
    form = report(diff)
    assert form.pop("summary") == format_diff(diff)
    return form


def archive(tmp_path: Path, name: str, layers: list[bytes], **config: Any) -> Path:
    path = tmp_path / f"{name}.tar"
    write_archive(path, {**raw_config(layers), **config}, layers)
    return path


def rows(diff: ImageDiff) -> list[Row]:
    return [(d.section, d.layer, d.path, d.field, d.a, d.b) for d in diff.differences]


def test_same_content_is_identical_even_when_config_bytes_differ(tmp_path: Path) -> None:
    layers = [BASE, layer(*APP)]
    a = archive(tmp_path, "a", layers)
    b = tmp_path / "b.tar"
    write_archive(b, raw_config(layers), layers, indent=2)  # the same JSON, other bytes
    diff = diff_images(str(a), str(b))
    assert diff.a.image_id != diff.b.image_id
    assert diff.identical
    assert format_diff(diff).endswith("\nidentical")
    # One changed byte in one file is found.
    changed = archive(tmp_path, "c", [BASE, layer(*APP[:3], Entry("opt/data", b"1235"))])
    assert rows(diff_images(str(a), str(changed)))[-1][2:4] == ("/opt/data", "sha256")


def test_each_file_attribute_is_compared(tmp_path: Path) -> None:
    app_b = layer(
        directory("opt", mtime=BUILD_TIME + 1),
        Entry("opt/app.py", b"print('hi')\n", mode=0o644, uid=1000, uname="alice"),
        Entry("opt/link", type=tarfile.SYMTYPE, linkname="other.py"),
        Entry("opt/data", b"4321"),
        Entry("opt/.wh.gone"),
    )
    a = archive(tmp_path, "a", [BASE, layer(*APP)])
    b = archive(tmp_path, "b", [BASE, app_b])
    assert rows(diff_images(str(a), str(b))) == [
        ("layer", 2, "", "diff_id", sha256(layer(*APP)), sha256(app_b)),
        ("file", 2, "/opt", "mtime", "2027-01-15T08:00:00Z", "2027-01-15T08:00:01Z"),
        ("file", 2, "/opt/.wh.gone", "exists", None, "whiteout"),
        ("file", 2, "/opt/app.py", "mode", "0755", "0644"),
        ("file", 2, "/opt/app.py", "uid", "0", "1000"),
        ("file", 2, "/opt/app.py", "uname", "builder", "alice"),
        ("file", 2, "/opt/data", "sha256", sha256(b"1234")[7:], sha256(b"4321")[7:]),
        ("file", 2, "/opt/link", "linkname", "app.py", "other.py"),
    ]


def test_config_fields_and_extra_layers_are_listed(tmp_path: Path) -> None:
    a = archive(tmp_path, "a", [BASE])
    config = raw_config([BASE, layer(*APP)])
    config["config"]["Labels"] = {"org.opencontainers.image.version": "2"}
    config["config"]["Env"].append("PYTHONHASHSEED=0")
    b = archive(tmp_path, "b", [BASE, layer(*APP)], config=config["config"])
    found = rows(diff_images(str(a), str(b)))
    assert found == [
        ("config", None, "config.Env[1]", "value", None, '"PYTHONHASHSEED=0"'),
        ("config", None, 'config.Labels["org.example.base"]', "value", '"yes"', None),
        ("config", None, 'config.Labels["org.opencontainers.image.version"]', "value", None, '"2"'),
        # A field that one side lacks is one row, not one per leaf below it.
        (
            "config",
            None,
            "history[1]",
            "value",
            None,
            json.dumps(config["history"][1], sort_keys=True),
        ),
        ("layer", 2, "", "exists", None, sha256(layer(*APP))),
    ]


def test_list_indices_sort_as_numbers(tmp_path: Path) -> None:
    a = archive(tmp_path, "a", [BASE])
    config = raw_config([BASE])
    config["config"]["Env"] += [f"X{n}=1" for n in range(12)]
    b = archive(tmp_path, "b", [BASE], config=config["config"])
    paths = [d.path for d in diff_images(str(a), str(b)).differences]
    assert paths == [f"config.Env[{n}]" for n in range(1, 13)]


def test_format_diff_caps_the_rows_and_says_how_many_are_left(tmp_path: Path) -> None:
    many = [Entry(f"opt/f{n:03}", str(n).encode()) for n in range(50)]
    a = archive(tmp_path, "a", [layer(*many)])
    b = archive(tmp_path, "b", [layer(*(Entry(e.name, e.data, mtime=1) for e in many))])
    diff = diff_images(str(a), str(b))
    assert len(diff.differences) == 51  # the layer's diff ID, then 50 mtimes
    text = format_diff(diff, max_rows=10)
    assert "51 differences: 1 in layers, 50 in files (50 mtime)" in text
    assert "layer 1 /opt/f008  mtime" in text
    assert "/opt/f009" not in text
    assert text.endswith("... 41 more not shown (--json lists them all)")
    assert len(text.splitlines()) == 2 + 1 + 1 + 10 + 1


def test_json_form_lists_everything(tmp_path: Path) -> None:
    a = archive(tmp_path, "a", [BASE])
    b = archive(tmp_path, "b", [layer(Entry("etc/os-release", b"ubuntu"))])
    form = json.loads(json.dumps(_json(diff_images(str(a), str(b)))))
    assert form["identical"] is False
    assert form["a"]["ref"] == str(a)
    assert form["a"]["layers"] == 1
    assert {
        "section": "file",
        "layer": 1,
        "path": "/etc",
        "field": "exists",
        "a": "dir",
        "b": None,
    } in form["differences"]
    same = _json(diff_images(str(a), str(a)))
    assert (same["identical"], same["differences"]) == (True, [])


def test_engine_references_are_saved_once_and_equal_ids_skip_the_save(tmp_path: Path) -> None:
    engine = ArchiveEngine(tmp_path)
    (one,) = engine.load(archive(tmp_path, "one", [BASE]))
    engine.tag(one, "example/one:1")
    diff = diff_images("example/one:1", one, engine=engine)
    assert diff.identical
    assert not [call for call in engine.calls if call[0] == "save"]
    other = archive(tmp_path, "other", [BASE, layer(*APP)])
    assert not diff_images(one, str(other), engine=engine).identical
    assert [call for call in engine.calls if call[0] == "save"] == [("save", one)]


def test_bad_references_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(ReproboxError, match="no engine to save it from"):
        diff_images("example/missing:1", "example/missing:2")
    junk = tmp_path / "junk.tar"
    junk.write_bytes(b"not a tar")
    with pytest.raises(ReproboxError, match="is not a docker-archive"):
        diff_images(str(junk), str(junk))
    two = tmp_path / "two.tar"
    write_archive(two, raw_config([BASE]), [BASE])
    with tarfile.open(two) as tar:
        manifest = tar.extractfile("manifest.json")
        assert manifest is not None
        entry = json.loads(manifest.read())[0]
    doubled = tmp_path / "doubled.tar"
    _rewrite_manifest(two, doubled, [entry, entry])
    with pytest.raises(ReproboxError, match="holds 2 images"):
        diff_images(str(doubled), str(two))


def _rewrite_manifest(src: Path, dest: Path, manifest: list[dict[str, Any]]) -> None:
    with tarfile.open(src) as old, tarfile.open(dest, "w") as new:
        for member in old.getmembers():
            data = old.extractfile(member)
            if member.name == "manifest.json":
                blob = json.dumps(manifest).encode()
                member.size, data = len(blob), io.BytesIO(blob)
            new.addfile(member, data)


@pytest.mark.docker
def test_the_engine_by_tag_id_and_archive(
    docker_engine: DockerEngine, debian_base: BaseImage, tmp_path: Path
) -> None:
    saved = tmp_path / "base.tar"
    docker_engine.save([debian_base.ref], saved)
    assert diff_images(debian_base.ref, debian_base.image_id, engine=docker_engine).identical
    assert diff_images(str(saved), debian_base.ref, engine=docker_engine).identical
    context = tmp_path / "context"
    context.mkdir()
    (context / "Dockerfile").write_text(
        f"FROM {debian_base.image_id}\nRUN echo changed > /etc/motd\n"
    )
    built = docker_engine.build(context)
    try:
        diff = diff_images(str(saved), built, engine=docker_engine)
        assert ("layer", 2, "", "exists") in [
            (d.section, d.layer, d.path, d.field) for d in diff.differences
        ]
        assert "config container" in format_diff(diff)
    finally:
        remove_image(docker_engine, built, force=True)
