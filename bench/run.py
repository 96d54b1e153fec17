"""`make bench`: every figure the README quotes, one benchmark after another."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
BENCHES = [
    ("seed-on-import hook: start-up cost", "hook_startup.py"),
    ("determinism.cpu: portable against native", "cpu_bench.py"),
    ("lock and fetch", "lock_bench.py"),
    ("build: reprobox beside a plain Dockerfile", "build_bench.py"),
]


def main() -> int:
    """Run each benchmark in its own interpreter; fail if any fails."""
    failed = []
    for title, script in BENCHES:
        print(f"\n== {title} ({script})", flush=True)
        if subprocess.run([sys.executable, str(HERE / script)], check=False).returncode != 0:
            failed.append(script)
    if failed:
        print(f"\nfailed: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
