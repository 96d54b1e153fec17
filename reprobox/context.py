"""What every stage is given: the engine, where the cache lives, and where progress goes.

The CLI builds one `Context` per command (`Context.for_command`) and passes it down; a stage
never makes its own engine, cache path or reporter, so tests give it a fake engine and a
temporary cache. The engine is asked who it is once per command (`engine_info`).
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from reprobox.engine import Engine, EngineInfo
from reprobox.errors import BadInputError, MissingError
from reprobox.progress import Reporter

__all__ = ["CacheLayout", "Context", "default_cache_dir", "usable_cache_dir"]


def default_cache_dir() -> Path:
    """$REPROBOX_CACHE_DIR, else $XDG_CACHE_HOME/reprobox, else ~/.cache/reprobox."""
    explicit = os.environ.get("REPROBOX_CACHE_DIR")
    if explicit:
        return Path(explicit).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "reprobox"


def usable_cache_dir(root: Path) -> Path:
    """The cache folder, made if missing and proven writable; exit 2 if it names a file, 3 if
    it cannot be made or written (read-only, no permission, disk full)."""
    hint = "set REPROBOX_CACHE_DIR to a writable folder (default ~/.cache/reprobox)"
    try:
        root.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise BadInputError(f"the cache folder {root} is not a folder", hint=hint) from None
    except OSError as exc:
        raise MissingError(
            f"cannot make the cache folder {root}: {exc.strerror or exc}", hint=hint
        ) from None
    try:
        fd, probe = tempfile.mkstemp(prefix=".probe-", dir=root)
        os.close(fd)
        Path(probe).unlink()
    except OSError as exc:
        raise MissingError(
            f"cannot write to the cache folder {root}: {exc.strerror or exc}", hint=hint
        ) from None
    return root


@dataclass(frozen=True)
class CacheLayout:
    """The folders under the cache root, each with one job."""

    root: Path

    @property
    def bases(self) -> Path:
        """Scratch space for bootstrapping bases, and the record of the bases this host made."""
        return self.root / "bases"

    @property
    def builds(self) -> Path:
        """The reuse index: what each raw engine build became."""
        return self.root / "builds"

    @property
    def contexts(self) -> Path:
        """Build contexts while they are sent (beside the wheels, so wheels are hard-linked)."""
        return self.root / "contexts"

    @property
    def work(self) -> Path:
        """Scratch space for saved and rewritten image archives."""
        return self.root / "work"

    def usable(self) -> Path:
        """The root, made and proven writable (exit 2 or 3 before any long work)."""
        return usable_cache_dir(self.root)


@dataclass
class Context:
    """The engine, the cache layout and the reporter of one command."""

    engine: Engine
    cache: CacheLayout
    reporter: Reporter
    _info: EngineInfo | None = field(default=None, init=False, repr=False)

    @classmethod
    def for_command(
        cls, engine: Engine | None = None, *, docker_context: str | None = None
    ) -> Context:
        """The context of a CLI command: `engine`, else the Docker Engine the docker CLI would
        use (`--context`, DOCKER_HOST, DOCKER_CONTEXT, the current context), connected lazily."""
        from reprobox.docker_engine import engine_for

        chosen = engine or engine_for(docker_context)
        return cls(chosen, CacheLayout(default_cache_dir()), Reporter())

    def engine_info(self) -> EngineInfo:
        """Who the engine is, asked once per command; EngineError (exit 3) when none answers."""
        if self._info is None:
            self._info = self.engine.ping()
        return self._info

    def note_engine(self) -> EngineInfo:
        """`engine_info`, also noted in the progress display."""
        info = self.engine_info()
        self.reporter.note(
            f"Docker Engine {info.server_version} (API {info.api_version}, {info.arch}) at "
            f"{info.host}"
        )
        return info
