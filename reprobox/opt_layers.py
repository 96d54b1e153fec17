"""The two small layers above the venv in an assembled image: /opt/reprobox, written on this
host, and the hook installed into the base's Python, read back from one container's changes.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from pathlib import Path

from reprobox.context import Context
from reprobox.engine import Change, FinishedContainer
from reprobox.errors import EngineError
from reprobox.layer_tar import Layer, LayerWriter, ancestors, tar_stream
from reprobox.pycompile import engine_tar

__all__ = ["files_layer", "hook_layer", "hook_paths"]


def files_layer(image_dir: Path, dest: Path, epoch: int) -> Layer:
    """/opt/reprobox: the rendered `image/` folder, sorted, 0644 files and 0755 folders."""
    writer = LayerWriter(dest, epoch, root="opt/reprobox")
    try:
        writer.directory("opt/reprobox")
        for path in sorted(image_dir.rglob("*"), key=lambda p: p.relative_to(image_dir).as_posix()):
            name = "opt/reprobox/" + path.relative_to(image_dir).as_posix()
            if path.is_dir():
                writer.directory(name)
            else:
                with path.open("rb") as data:
                    writer.file(name, data, path.stat().st_size)
        return writer.close()
    except BaseException:
        writer.abort()
        raise


def hook_layer(
    ctx: Context,
    base: str,
    sources: Sequence[Path],
    dest: Path,
    epoch: int,
    *,
    cancel: threading.Event | None = None,
) -> Layer:
    """What `python3 reprobox_hook.py install` changes in the base, as a layer.

    Times are clamped to the epoch (the normaliser's rule); folders keep the container's modes
    and, where older than the epoch, their times. Setting `cancel` removes the container.
    """
    files = tar_stream([(f"opt/reprobox/{path.name}", path) for path in sources], epoch)
    argv = ["python3", "/opt/reprobox/reprobox_hook.py", "install"]
    with ctx.engine.run_kept(base, argv, timeout_s=300, files=files, cancel=cancel) as box:
        if box.result.exit_code != 0:
            raise EngineError(
                f"installing the hook in {base} failed (exit {box.result.exit_code}): "
                f"{box.result.stderr.strip()[-2000:]}"
            )
        paths = hook_paths(box.changes())
        dir_meta: dict[str, tuple[int, float]] = {}
        for parent in sorted({a for p in paths for a in ancestors(p)}):
            dir_meta[parent] = box.stat("/" + parent)
        writer = LayerWriter(dest, epoch, root="", dir_meta=dir_meta)
        try:
            for name in paths:
                _copy_from(box, name, writer, dest.with_suffix(".part"))
            return writer.close()
        except BaseException:
            writer.abort()
            raise


def hook_paths(changes: Sequence[Change]) -> list[str]:
    """The files and links the hook's install added or changed; not /opt/reprobox (layer 3,
    put there for the install to run), but /opt/... elsewhere (a Python under /opt/conda)."""
    deleted = [c.path for c in changes if c.kind == "deleted"]
    if deleted:
        raise EngineError(f"installing the hook deleted {', '.join(deleted[:5])}: not expected")
    paths = {
        c.path.strip("/")
        for c in changes
        if c.path.strip("/")
        and not (c.path == "/opt/reprobox" or c.path.startswith("/opt/reprobox/"))
    }
    if not any(p.startswith("opt/") for p in paths):
        paths.discard("opt")  # changed only by /opt/reprobox
    # A changed path that is the parent of another is a folder: it comes as an ancestor.
    return sorted(p for p in paths if not any(q.startswith(p + "/") for q in paths))


def _copy_from(box: FinishedContainer, name: str, writer: LayerWriter, part: Path) -> None:
    try:
        box.get_archive("/" + name, part)
        with engine_tar(part) as tar:
            member = tar.getmember(Path(name).name)
            data = tar.extractfile(member) if member.isfile() else None
            if member.isdir():
                writer.directory(name)
            elif member.issym():
                writer.symlink(name, member.linkname, mtime=member.mtime)
            elif data is not None:
                writer.file(name, data, member.size, mode=member.mode & 0o7777, mtime=member.mtime)
            else:
                _not_a_file(name)
    finally:
        part.unlink(missing_ok=True)


def _not_a_file(name: str) -> None:
    raise EngineError(f"installing the hook made /{name}, not a file, link or folder")
