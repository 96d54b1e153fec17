"""The context a command gives every stage: its cache follows the environment, its engine is
asked who it is once."""

from __future__ import annotations

from pathlib import Path

import pytest
from fakes import FakeEngine, context

from reprobox.context import Context, default_cache_dir


def test_cache_root_comes_from_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("REPROBOX_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    assert Context.for_command(FakeEngine()).cache.root == tmp_path / "elsewhere"
    monkeypatch.delenv("REPROBOX_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert default_cache_dir() == tmp_path / "xdg" / "reprobox"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert default_cache_dir() == Path.home() / ".cache" / "reprobox"


def test_the_engine_is_asked_who_it_is_once_per_command(tmp_path: Path) -> None:
    engine = FakeEngine()
    ctx = context(engine, tmp_path)
    first, second = ctx.engine_info(), ctx.note_engine()
    assert first is second
    assert [call for call, _ in engine.calls] == ["ping"]


def test_the_cache_folders_each_have_their_place(tmp_path: Path) -> None:
    layout = context(FakeEngine(), tmp_path / "c").cache
    folders = [layout.bases, layout.builds, layout.contexts, layout.work]
    assert all(folder.parent == tmp_path / "c" for folder in folders)
    assert len(set(folders)) == 4
    assert not (tmp_path / "c").exists(), "naming a folder makes nothing"
    assert layout.usable() == tmp_path / "c"
    assert (tmp_path / "c").is_dir()
