"""End to end: an image with transformers pinned passes the inference check twice, one fingerprint.

Built once for the module (tests/data/inference/spec.yaml: torch 2.13.0 CPU, transformers
5.23.0), then checked several ways: by `build`, by `reprobox check` (two self-checks, one
fingerprint), and with the hook off, where transformers' sampling must differ run to run.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli import reprobox

from reprobox.docker_engine import DockerEngine

pytestmark = [pytest.mark.docker, pytest.mark.network]

SPEC = Path(__file__).resolve().parent / "data" / "inference" / "spec.yaml"


@dataclass(frozen=True)
class Built:
    build: dict[str, Any]  # `reprobox build --json` (its self-check may be reused from before)
    check: dict[str, Any]  # `reprobox check TAG --json`: the self-check rerun, always

    @property
    def tag(self) -> str:
        tag: str = self.build["tags"][0]
        return tag

    @property
    def inference(self) -> dict[str, Any]:
        found: dict[str, Any] = self.check["selfcheck"]["inference"]
        return found


@pytest.fixture(scope="module")
def built(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Built:
    folder = tmp_path_factory.mktemp("inference")
    shutil.copy(SPEC, folder / "spec.yaml")
    build = reprobox("build", str(folder / "spec.yaml"), "--json")
    assert build.code == 0, build.stderr + build.stdout
    tag = build.json()["tags"][0]
    check = reprobox("check", tag, "--json")
    assert check.code == 0, check.stderr + check.stdout
    return Built(build.json(), check.json())


def test_build_and_check_pass_with_one_fingerprint(
    built: Built, docker_engine: DockerEngine
) -> None:
    assert built.build["passed"] is True
    labels = docker_engine.inspect_image(built.tag).labels
    assert "--inference" in json.loads(labels["reprobox.selfcheck.argv"])
    device_class = built.check["device_class"]
    assert device_class.startswith("cpu-x86_64-")
    recorded = labels[f"reprobox.fingerprint.{device_class}"]
    assert built.check["passed"] is True
    assert built.check["matches_recorded"] is True
    assert built.check["fingerprint"] == recorded
    trace = json.loads(labels[f"reprobox.trace.{device_class}"])
    assert trace["inference_sha256"] == built.inference["evidence_sha256"]


def test_transformers_generate_runs_and_is_identical_run_to_run(built: Built) -> None:
    inference = built.inference
    assert inference["passed"] is True
    assert inference["first_difference"] is None
    model = inference["models"]["transformers"]
    assert model["transformers"] == "5.23.0"
    assert model["class"] == "LlamaForCausalLM"
    first, second = inference["runs"]
    assert first["evidence_sha256"] == second["evidence_sha256"] == inference["evidence_sha256"]
    measured = first["models"]["transformers"]["threads"]["1"]
    assert set(measured) == {"greedy", "sampled", "batch_invariance"}
    assert len(measured["greedy"]["alone"]["tokens"]) == 12
    assert len(measured["sampled"]["batch-8"]["logits_sha256"]) == 12
    runs = built.check["selfcheck"]["runs"]
    assert [run["inference_sha256"] for run in runs] == [inference["evidence_sha256"]] * 2


def test_batch_invariance_is_stated_for_one_and_two_threads(built: Built) -> None:
    invariance = built.inference["batch_invariance"]
    assert invariance["required"] is False
    assert invariance["configured_threads"] == 1
    assert set(invariance["threads"]) == {"1", "2"}
    for threads in ("1", "2"):
        entry = invariance["threads"][threads]
        parted = {d["variant"] for d in entry["differs"]}
        assert entry["batch_invariant"] == parted.isdisjoint({"batch-2", "batch-4", "batch-8"})
        assert entry["padding_invariant"] == parted.isdisjoint({"left-padded", "batch-4-padded"})
        assert f"{threads} thread(s): batch " in built.check["summary"]
        assert f"{threads} thread(s): padding " in built.check["summary"]


def test_transformers_sampling_without_the_hook_differs_run_to_run(
    built: Built, docker_engine: DockerEngine
) -> None:
    program = ["python", "/opt/reprobox/reprobox_inference.py", "--threads", "1"]
    done = docker_engine.run(built.tag, program, env={"REPROBOX_DISABLE": "1"}, timeout_s=600)
    assert done.exit_code == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is False
    assert report["first_difference"]["what"].startswith("inference transformers sampled")
    first, second = (run["models"]["transformers"]["threads"]["1"] for run in report["runs"])
    assert first["greedy"] == second["greedy"]  # the weights and greedy decoding need no seed
