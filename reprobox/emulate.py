"""Run an image's self-check on an emulated x86-64 CPU with qemu-user, every interpreter included.

`reprobox check IMAGE --emulate-cpu MODEL`: the host's `qemu-x86_64-static` and a small shell
script are put into the fresh container through the engine's API (nothing is bind-mounted, so
a remote engine works the same). Before the self-check starts, the script replaces the image's
Python interpreter with a wrapper that re-enters qemu, so the check's parent, its two runs,
DataLoader workers and anything else started from a python path run on the emulated CPU;
forked children stay inside the emulator by themselves.

Emulation predicts which code paths a CPU takes: CPUID answers as MODEL would, and the libraries
dispatch on that. It does not reproduce every hardware approximation: qemu computes RCPPS and
RSQRTPS exactly where chips use lookup tables, so an emulated CPU and the real one can differ
in bits (the device class says so: it carries a digest of those results).
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path

from reprobox.errors import BadInputError, EngineError, MissingError

__all__ = ["ROOT", "Emulation", "cpu_models", "emulation", "qemu_binary"]

ROOT = "/opt/reprobox-emulate"
_QEMU = "qemu-x86_64-static"
_MODEL = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
_X86_ARCHES = frozenset({"amd64", "x86_64"})

# Runs as the container's command: wraps the interpreter(s), then execs the self-check.
# The wrapper passes its own path as argv[0] (-0), so a venv's python still finds its venv.
_ENTER = """\
#!/bin/sh
# reprobox --emulate-cpu {model}: every Python interpreter in this container runs under qemu-user.
set -e
for name in python python3; do
  link=$(command -v "$name" 2>/dev/null) || continue
  real=$(readlink -f "$link")
  [ -e "$real.reprobox-native" ] && continue
  mv "$real" "$real.reprobox-native"
  printf '#!/bin/sh\\nexec {root}/{qemu} -cpu {model} -0 "$0" %s "$@"\\n' "$real.reprobox-native" > "$real"
  chmod 755 "$real"
done
exec "$@"
"""


@dataclass(frozen=True)
class Emulation:
    """What a container needs to run its command on an emulated CPU."""

    model: str
    archive: bytes  # a tar stream to unpack at /
    argv_prefix: tuple[str, ...]  # put before the command


def qemu_binary() -> Path:
    """The host's qemu-x86_64-static (Debian's qemu-user-static), or MissingError (exit 3)."""
    found = shutil.which(_QEMU)
    if found is None:
        raise MissingError(
            f"{_QEMU} is not installed: --emulate-cpu needs qemu-user",
            hint="install it: `apt-get install qemu-user-static` (scripts/setup-host does)",
        )
    return Path(found)


def cpu_models(qemu: Path) -> frozenset[str]:
    """The CPU models this qemu emulates (`qemu-x86_64-static -cpu help`)."""
    listing = subprocess.run(
        [str(qemu), "-cpu", "help"], capture_output=True, text=True, check=False, timeout=60
    ).stdout
    return frozenset(
        parts[1]
        for parts in (line.split() for line in listing.splitlines())
        if parts[:1] == ["x86"]
    )


def emulation(model: str, engine_arch: str) -> Emulation:
    """Check `model` and the engine, and make the files that emulate it in a container."""
    if engine_arch.lower() not in _X86_ARCHES:
        raise EngineError(
            f"--emulate-cpu emulates x86-64 CPUs; the Docker Engine runs {engine_arch}",
            hint="use an engine on an x86-64 host",
        )
    qemu = qemu_binary()
    known = cpu_models(qemu)
    if not _MODEL.fullmatch(model) or model not in known:
        examples = ", ".join(m for m in ("Haswell", "EPYC-Rome", "Nehalem") if m in known)
        raise BadInputError(
            f"--emulate-cpu {model!r}: {qemu} knows no such CPU model",
            hint=f"`{_QEMU} -cpu help` lists them (e.g. {examples or 'none found'})",
        )
    script = _ENTER.format(model=model, root=ROOT, qemu=_QEMU)
    return Emulation(
        model, _archive(qemu.read_bytes(), script.encode()), ("/bin/sh", f"{ROOT}/enter")
    )


def _archive(qemu: bytes, enter: bytes) -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
        directory = tarfile.TarInfo(ROOT.lstrip("/"))
        directory.type, directory.mode = tarfile.DIRTYPE, 0o755
        tar.addfile(directory)
        for name, data in ((_QEMU, qemu), ("enter", enter)):
            info = tarfile.TarInfo(f"{ROOT.lstrip('/')}/{name}")
            info.size, info.mode = len(data), 0o755
            tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()
