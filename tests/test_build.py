"""End to end on the real engine: build the CPU example, prove it, and show every check can fail."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from cli import reprobox
from engine_admin import add_labels, remove_image

from reprobox.check import run_selfcheck, selfcheck_argv
from reprobox.docker_engine import DockerEngine
from reprobox.spec_load import load_spec

pytestmark = pytest.mark.docker

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "images" / "demo-cpu.yaml"


def spec_copy(tmp: Path, name: str, replace: dict[str, str] | None = None) -> Path:
    """The demo spec, edited, in a directory of its own (its lock is written beside it)."""
    text = DEMO.read_text()
    for old, new in (replace or {}).items():
        assert old in text
        text = text.replace(old, new)
    folder = tmp / name
    folder.mkdir()
    path = folder / "spec.yaml"
    path.write_text(text)
    return path


@dataclass(frozen=True)
class Built:
    spec: Path
    report: dict[str, Any]

    @property
    def tag(self) -> str:
        tag: str = self.report["tags"][0]
        return tag


@pytest.fixture(scope="module")
def demo(docker_engine: DockerEngine, tmp_path_factory: pytest.TempPathFactory) -> Built:
    """The CPU example, built and self-checked once for this module (the default route:
    assembled from the wheels, the recipe's image)."""
    spec = spec_copy(tmp_path_factory.mktemp("demo"), "demo")
    result = reprobox("build", str(spec), "--json")
    assert result.code == 0, result.stderr
    return Built(spec, result.json())


def labels(engine: DockerEngine, ref: str) -> dict[str, str]:
    return dict(engine.inspect_image(ref).labels)


def test_build_passes_and_records_its_proof(demo: Built, docker_engine: DockerEngine) -> None:
    report = demo.report
    assert report["passed"] is True
    check = report["selfcheck"]
    assert check["passed"] is True
    fingerprint = check.get("fingerprint") or next(iter(check["fingerprints"].values()))
    assert len(fingerprint) == 64
    image_labels = labels(docker_engine, demo.tag)
    device_class = check.get("device_class") or next(iter(check["fingerprints"]))
    assert device_class.startswith("cpu-x86_64-v3-rcp")  # the demo is portable (the default)
    assert image_labels[f"reprobox.fingerprint.{device_class}"] == fingerprint
    settings = json.loads(image_labels[f"reprobox.settings.{device_class}"])
    assert settings["env"]["MKL_CBWR"] == "COMPATIBLE"
    assert settings["cpu"]["level"] in ("v3", "v4")
    assert image_labels["reprobox.spec-sha256"] == load_spec(demo.spec).sha256
    assert image_labels["reprobox.lock-sha256"] == report["lock_sha256"]
    assert image_labels["org.opencontainers.image.title"] == "demo-cpu"
    assert image_labels["org.opencontainers.image.created"].endswith("T00:00:00Z")
    assert docker_engine.inspect_image(demo.tag).id == report["image_id"]
    lock_text = demo.spec.with_suffix(".lock").read_text()
    assert "torch==2.13.0+cpu \\" in lock_text


def test_image_holds_the_environment_and_no_build_debris(
    demo: Built, docker_engine: DockerEngine
) -> None:
    env = dict(e.split("=", 1) for e in docker_engine.inspect_image(demo.tag).env)
    for key, value in {
        "PYTHONHASHSEED": "0",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "OMP_DYNAMIC": "FALSE",
        "MKL_DYNAMIC": "FALSE",
        "GOMP_CPU_AFFINITY": "0",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "REPROBOX_SEED": "0",
    }.items():
        assert env[key] == value
    probe = docker_engine.run(
        demo.tag,
        [
            "sh",
            "-c",
            "ls /reprobox-build /reprobox-delta 2>&1; find / -name '*.whl' -not -path '/proc/*' -not -path '/usr/share/python-wheels/*' | head -3;"
            " python -c 'import torch, numpy; print(torch.__version__, numpy.__version__)'",
        ],
        timeout_s=120,
    )
    assert "No such file or directory" in probe.stdout  # both build-only folders are absent
    assert ".whl" not in probe.stdout
    assert probe.stdout.strip().endswith("2.13.0+cpu 2.4.6")


def test_rebuild_with_nothing_changed_reuses_the_proof(demo: Built) -> None:
    again = reprobox("build", str(demo.spec), "--json")
    assert again.code == 0, again.stderr
    report = again.json()
    assert report["image_id"] == demo.report["image_id"]
    assert report["selfcheck"]["reused"] is True
    # Every layer from the layer cache and the image already in the engine: nothing is built,
    # written or sent to it.
    assert "==> build" not in again.stderr
    assert "==> write" not in again.stderr
    assert "load (" not in again.stderr
    assert report["built_id"] == demo.report["built_id"]


def test_check_reproduces_the_recorded_fingerprint(demo: Built) -> None:
    result = reprobox("check", demo.tag, "--json")
    assert result.code == 0, result.stderr
    report = result.json()
    assert report["matches_recorded"] is True
    assert report["passed"] is True


def test_check_names_the_first_step_that_differs_from_the_record(
    demo: Built, docker_engine: DockerEngine
) -> None:
    recorded = labels(docker_engine, demo.tag)
    device_class = next(k for k in recorded if k.startswith("reprobox.trace.")).split(".", 2)[2]
    trace = json.loads(recorded[f"reprobox.trace.{device_class}"])
    trace["losses"][3] = float.hex(1.0)
    tampered = add_labels(
        docker_engine,
        demo.report["image_id"],
        {
            f"reprobox.fingerprint.{device_class}": "0" * 64,
            f"reprobox.trace.{device_class}": json.dumps(trace),
        },
    )
    try:
        result = reprobox("check", tampered, "--json")
        assert result.code == 1, result.stderr
        report = result.json()
        assert report["matches_recorded"] is False
        # The self-check's numbering: step 4 is the fourth loss (the one changed above).
        assert report["first_difference"]["step"] == 4
        assert report["first_difference"]["what"] == "loss"
        assert report["first_difference"]["a"] == float.hex(1.0)
        assert report["verdict"] == "differs"
        # The settings both sides saw come along; here they are the same.
        assert report["settings"]["recorded"]["env"] == report["settings"]["here"]["env"]
        assert report["settings"]["differences"] == {}
        text = reprobox("check", tampered)
        assert "differs from the 0000" in text.stdout
        assert "first difference from the recorded run" in text.stdout
        assert "both sides saw the same settings" in text.stdout
    finally:
        remove_image(docker_engine, tampered, force=True)


def test_a_different_seed_gives_a_different_fingerprint(
    demo: Built, docker_engine: DockerEngine
) -> None:
    argv = selfcheck_argv(load_spec(demo.spec))
    base = run_selfcheck(docker_engine, demo.tag, argv)
    other = run_selfcheck(docker_engine, demo.tag, argv, env={"REPROBOX_SEED": "1"})
    assert base.passed
    assert other.passed
    assert other.fingerprint != base.fingerprint


def test_a_nondeterministic_workload_is_caught(demo: Built, docker_engine: DockerEngine) -> None:
    argv = selfcheck_argv(load_spec(demo.spec))
    result = run_selfcheck(
        docker_engine, demo.tag, argv, env={"REPROBOX_SELFCHECK_CHAOS": "index_put"}
    )
    assert not result.passed
    assert result.first_difference is not None


def test_deterministic_mode_is_verified_on_and_its_absence_fails(
    demo: Built, docker_engine: DockerEngine
) -> None:
    argv = selfcheck_argv(load_spec(demo.spec))
    on = run_selfcheck(docker_engine, demo.tag, argv)
    assert on.report["deterministic_mode_verified"] is True
    off = run_selfcheck(docker_engine, demo.tag, argv, env={"REPROBOX_DISABLE": "1"})
    assert not off.passed
    assert off.report["deterministic_mode_verified"] is False


HOOK_PROBE = (
    "import random, numpy, torch; "
    "print(random.random(), numpy.random.rand(), torch.rand(3).tolist(), "
    "torch.are_deterministic_algorithms_enabled())"
)


def test_hook_seeds_every_fresh_interpreter_in_the_image(
    demo: Built, docker_engine: DockerEngine
) -> None:
    def run(argv: list[str], env: dict[str, str] | None = None) -> str:
        result = docker_engine.run(demo.tag, argv, env=env, timeout_s=120)
        assert result.exit_code == 0, result.stderr
        return result.stdout

    first, second = run(["python", "-c", HOOK_PROBE]), run(["python", "-c", HOOK_PROBE])
    assert first == second
    assert first.strip().endswith("True")
    off = [run(["python", "-c", HOOK_PROBE], {"REPROBOX_DISABLE": "1"}) for _ in range(2)]
    assert off[0] != off[1]
    assert off[0].strip().endswith("False")
    # Debian's own python3 (not the venv), whose distribution sitecustomize shadows site-packages.
    system = "import random; print(random.random())"
    assert run(["/usr/bin/python3", "-c", system]) == run(["/usr/bin/python3", "-c", system])
    assert run(["/usr/bin/python3", "-c", system], {"REPROBOX_DISABLE": "1"}) != run(
        ["/usr/bin/python3", "-c", system], {"REPROBOX_DISABLE": "1"}
    )


DATALOADER = """
import torch
from torch.utils.data import DataLoader, Dataset

class Noisy(Dataset):
    def __len__(self): return 16
    def __getitem__(self, i): return torch.rand(2) + i

if __name__ == "__main__":
    batches = [b.tolist() for b in DataLoader(Noisy(), batch_size=4, shuffle=True, num_workers=2)]
    print(batches)
"""


def test_dataloader_workers_are_reproducible_in_the_image(
    demo: Built, docker_engine: DockerEngine
) -> None:
    argv = ["python", "-c", DATALOADER]
    runs = [docker_engine.run(demo.tag, argv, timeout_s=120) for _ in range(2)]
    assert runs[0].exit_code == 0, runs[0].stderr
    assert runs[0].stdout == runs[1].stdout
    off = [
        docker_engine.run(demo.tag, argv, env={"REPROBOX_DISABLE": "1"}, timeout_s=120)
        for _ in range(2)
    ]
    assert off[0].stdout != off[1].stdout


def test_build_without_check_then_check_says_nothing_is_recorded(tmp_path: Path) -> None:
    spec = spec_copy(tmp_path, "nocheck", {"seed: 0": "seed: 7"})
    built = reprobox("build", str(spec), "--no-check", "--json")
    assert built.code == 0, built.stderr
    assert built.json()["selfcheck"] is None
    checked = reprobox("check", built.json()["tags"][0])
    assert checked.code == 5, checked.stderr  # the runs agree, but there is nothing to compare with
    assert (
        "no fingerprint is recorded for this host's device class cpu-x86_64-v3-" in checked.stdout
    )
    assert "neither a failure nor a proof" in checked.stdout


USER_SCRIPT_OK = """
import os, sys, random, torch
out = os.environ["REPROBOX_OUTPUT_DIR"]
model = torch.nn.Linear(4, 2)
loss = model(torch.randn(8, 4)).pow(2).mean()
loss.backward()
print("loss", loss.item().hex(), random.random())
torch.save(model.state_dict(), os.path.join(out, "model.pt"))
"""

USER_SCRIPT_BAD = """
import os
print(os.urandom(8).hex())
"""


def test_user_script_self_check_passes_and_fails(
    tmp_path: Path, docker_engine: DockerEngine
) -> None:
    good = spec_copy(tmp_path, "good", {"  # script: train.py": "  script: train.py"})
    (good.parent / "train.py").write_text(USER_SCRIPT_OK)
    result = reprobox("build", str(good), "--json")
    assert result.code == 0, result.stderr
    assert result.json()["selfcheck"]["passed"] is True

    bad = spec_copy(
        tmp_path, "bad", {"  # script: train.py": "  script: train.py", "seed: 0": "seed: 3"}
    )
    (bad.parent / "train.py").write_text(USER_SCRIPT_BAD)
    result = reprobox("build", str(bad), "--json")
    assert result.code == 1
    report = result.json()
    assert report["passed"] is False
    assert report["tags"] == []
    assert "differ" in report["summary"]
    assert docker_engine.inspect_image(report["built_id"]).tags == (), "a failed check tags nothing"


def test_no_engine_is_exit_3_with_what_to_do(tmp_path: Path) -> None:
    spec = spec_copy(tmp_path, "dead", {})
    result = reprobox("build", str(spec), env={"DOCKER_HOST": "unix:///nonexistent/docker.sock"})
    assert result.code == 3
    assert "make setup" in result.stderr
    assert "Traceback" not in result.stderr
    assert not spec.with_suffix(".lock").exists(), "nothing is written when the engine is missing"
