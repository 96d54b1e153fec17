"""scripts/gpu-proof, here with --device cpu (CI has no GPU): every control it runs, and the
environment it sets, which must stay the one a reprobox image carries."""

from __future__ import annotations

import json
import subprocess
import sys
from importlib.machinery import SourceFileLoader
from importlib.util import module_from_spec, spec_from_loader
from pathlib import Path
from typing import Any

import pytest

from reprobox.render import image_env
from reprobox.spec_load import parse_spec

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "gpu-proof"


def _script() -> Any:
    loader = SourceFileLoader("gpu_proof", str(SCRIPT))
    spec = spec_from_loader("gpu_proof", loader)
    assert spec is not None
    module = module_from_spec(spec)
    loader.exec_module(module)
    return module


SPEC = """\
version: 1
name: proof
base:
  bootstrap: debian:bookworm
python: "3.11"
torch:
  version: "{torch}"
  cuda: "{cuda}"
determinism:
  seed: {seed}
  threads: {threads}
  gomp_cpu_affinity: "{affinity}"
  cublas_workspace_config: "{cublas}"
  deterministic_algorithms: {deterministic}
  warn_only: {warn_only}
  fill_uninitialized_memory: {fill}
  cpu: {cpu}
{hash_seed}"""


@pytest.mark.parametrize(
    "settings",
    [
        {"torch": "2.13.0", "cuda": "cpu"},
        {"torch": "2.5.1", "cuda": "12.4", "seed": 1234, "threads": 4, "affinity": "0-3"},
        {"seed": 9, "cublas": ":16:8", "deterministic": "false", "warn_only": "true"},
        {"fill": "false", "hash_seed": 77},
        {"cpu": "native"},
    ],
)
def test_the_proof_sets_the_environment_an_image_carries(settings: dict[str, Any]) -> None:
    values: dict[str, Any] = {
        "torch": "2.13.0",
        "cuda": "cpu",
        "seed": 0,
        "threads": 1,
        "affinity": "0",
        "cublas": ":4096:8",
        "deterministic": "true",
        "warn_only": "false",
        "fill": "true",
        "hash_seed": None,
        "cpu": "portable",
        **settings,
    }
    hash_seed = values["hash_seed"]
    text = SPEC.format(
        **{**values, "hash_seed": "" if hash_seed is None else f"  python_hash_seed: {hash_seed}\n"}
    )
    spec = parse_spec(text)
    wanted = {k: v for k, v in image_env(spec) if not k.startswith("NVIDIA_")}
    proof = _script().determinism_env(
        seed=values["seed"],
        threads=values["threads"],
        gomp_cpu_affinity=values["affinity"],
        cublas_workspace_config=values["cublas"],
        deterministic_algorithms=values["deterministic"] == "true",
        warn_only=values["warn_only"] == "true",
        fill_uninitialized_memory=values["fill"] == "true",
        hash_seed=hash_seed,
        cpu=values["cpu"],
        arch="x86_64",
    )
    assert proof == wanted, "scripts/gpu-proof's determinism_env has drifted from image_env"


def _proof(tmp: Path, *args: str) -> tuple[subprocess.CompletedProcess[str], dict[str, Any]]:
    out = tmp / "summary.json"
    done = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    summary: dict[str, Any] = json.loads(out.read_text())
    return done, summary


def test_the_cpu_proof_passes_and_each_control_fails_as_it_must(tmp_path: Path) -> None:
    done, summary = _proof(
        tmp_path, "--device", "cpu", "--steps", "4", "--chaos-tries", "5", "--raw-calls", "40"
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.startswith("gpu-proof: PROVEN on cpu-")
    assert summary["proven"] is True
    assert summary["problems"] == []
    checks = summary["checks"]
    first, second = checks["selfcheck"]
    assert first["passed"]
    assert second["passed"]
    assert first["fingerprint"] == second["fingerprint"] == summary["fingerprint"]
    for run in (first, second):  # the generation check ran in both, and passed
        assert run["inference"]["summary"], run
        assert run["inference"]["failures"] == []
        assert run["inference"]["first_difference"] is None
    assert summary["hook"]["active"] is True, "the hook ran in the scratch venv"
    chaos = checks["chaos"]
    assert chaos["kind"] == "index_put"
    assert chaos["tries"][-1]["exit_code"] == 1
    assert (
        chaos["tries"][-1]["first_difference"]["a"] != chaos["tries"][-1]["first_difference"]["b"]
    )
    assert checks["hook_off"]["exit_code"] == 1
    assert checks["hook_off"]["deterministic_mode_verified"] is False
    raw = checks["raw"]
    assert raw["off"]["index_put_"] >= 2
    assert raw["on"]["index_put_"] == 1
    assert raw["refused"] == {"put_": "raised"}
    assert summary["environment"]["OMP_NUM_THREADS"] == "1"
    assert summary["seconds"] < 300


def test_the_cuda_proof_on_a_host_without_a_gpu_says_so(tmp_path: Path) -> None:
    done, summary = _proof(tmp_path, "--device", "cuda", "--steps", "1", "--no-inference")
    assert done.returncode == 3, done.stdout + done.stderr
    assert done.stdout.startswith("gpu-proof: NO DEVICE: --device cuda:")
    assert "is a CPU build: it has no CUDA" in summary["device_missing"]
    assert summary["proven"] is False
    assert len(summary["checks"]["selfcheck"]) == 1, "it stops at the first self-check"
