"""The inference check on the host, in a venv with the seed-on-import hook (the pure-torch models).

Every way it passes has a way it must fail beside it: sampling with the hook switched off, a
batch-variant op when batch invariance is required, and the MoE layer's capacity routing
changing a prompt's tokens with its batch. The transformers path runs in the image
(test_inference_image.py), where transformers is installed.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from hooked_venv import SELFCHECK, TEMPLATES, clean_env, make_venv

from reprobox.check import selfcheck_argv
from reprobox.errors import SpecError
from reprobox.spec_load import parse_spec

INFERENCE = TEMPLATES / "reprobox_inference.py"
ROOT = Path(__file__).resolve().parent.parent
DEMO = (ROOT / "images" / "demo-cpu.yaml").read_text()


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_venv(tmp_path_factory.mktemp("inference") / "venv")


def inference(python: Path, *args: str, **env: str) -> tuple[int, dict[str, Any]]:
    done = subprocess.run(
        [str(python), str(INFERENCE), "--model", "torch", *args],
        capture_output=True,
        text=True,
        env=clean_env(**env),
        timeout=600,
        check=False,
    )
    assert done.returncode in (0, 1), done.stderr
    report: dict[str, Any] = json.loads(done.stdout)
    assert (done.returncode == 0) == report["passed"]
    return done.returncode, report


@pytest.fixture(scope="module")
def moe(venv: Path) -> dict[str, Any]:
    """The decoder and its MoE twin, at the configured 1 thread (invariance reported only)."""
    code, report = inference(venv, "--moe", "--threads", "1")
    assert code == 0, report["failures"]
    return report


def test_two_fresh_runs_generate_the_same_tokens_and_logits(moe: dict[str, Any]) -> None:
    first, second = moe["runs"]
    assert first["evidence_sha256"] == second["evidence_sha256"] == moe["evidence_sha256"]
    measured = first["models"]["torch"]["threads"]["1"]
    for how in ("greedy", "sampled_generator"):
        alone = measured[how]["alone"]
        assert len(alone["tokens"]) == len(alone["logits_sha256"]) == 12
        assert all(0 <= token < 256 for token in alone["tokens"])
    # Sampling and greedy decoding part ways: the sampled path really samples.
    assert measured["greedy"]["alone"]["tokens"] != measured["sampled_generator"]["alone"]["tokens"]
    assert len(measured["sampled"]["batch-8"]["tokens"]) == 12
    # The evidence digest is over run 1 as reported, less the digest (timings are not evidence).
    evidence = {k: v for k, v in first.items() if k != "evidence_sha256"}
    canonical = json.dumps(evidence, sort_keys=True, separators=(",", ":")).encode()
    assert hashlib.sha256(canonical).hexdigest() == moe["evidence_sha256"]


def test_moe_capacity_routing_changes_a_prompt_with_its_batch(moe: dict[str, Any]) -> None:
    invariance = moe["batch_invariance"]
    assert invariance["configured_threads"] == 1
    differs = invariance["threads"]["1"]["differs"]
    routed = [d for d in differs if d["model"] == "torch-moe" and d["variant"].startswith("batch-")]
    assert routed, differs
    assert all(d["cause"].startswith("MoE capacity routing") for d in routed)
    # Not only the low bits: the prompt's greedy tokens change inside some batch.
    greedy = [d for d in routed if d["mode"] == "greedy"]
    assert any(d["tokens_differ_from_step"] is not None for d in greedy)
    assert invariance["batch_invariant"] is False
    assert moe["passed"] is True  # reported, not required


def test_the_dense_decoder_is_batch_invariant_at_one_thread_here(moe: dict[str, Any]) -> None:
    # Measured on this project's machine (torch 2.13 CPU, 1 thread): the target alone and
    # inside batches of 2, 4 and 8 gives the same bits; padding it does not.
    differs = moe["batch_invariance"]["threads"]["1"]["differs"]
    dense = [d for d in differs if d["model"] == "torch"]
    assert {d["variant"] for d in dense} == {"left-padded", "batch-4-padded"}
    assert all(d["cause"].startswith("left padding") for d in dense)


@pytest.fixture(scope="module")
def required(venv: Path) -> dict[str, Any]:
    code, report = inference(venv, "--require-batch-invariance", "--threads", "1")
    assert code == 0, report["failures"]
    return report


def test_required_batch_invariance_passes_where_it_holds(required: dict[str, Any]) -> None:
    assert required["batch_invariance"]["required"] is True
    assert required["batch_invariance"]["batch_invariant"] is True
    # Padding is reported, never required: it is a separate cause with its own remedy.
    assert required["batch_invariance"]["padding_invariant"] is False


def test_a_batch_variant_op_fails_required_batch_invariance(venv: Path) -> None:
    code, report = inference(
        venv,
        "--require-batch-invariance",
        "--threads",
        "1",
        REPROBOX_INFERENCE_CHAOS="batch_variant",
    )
    assert code == 1
    assert report["first_difference"] is None  # still reproducible run to run
    failures = report["failures"]
    assert failures
    assert all(f.startswith("batch invariance is required") for f in failures)
    assert {"batch-2", "batch-4", "batch-8"} <= {
        d["variant"] for d in report["batch_invariance"]["threads"]["1"]["differs"]
    }


def test_the_same_chaos_is_only_reported_when_not_required(venv: Path) -> None:
    code, report = inference(venv, "--threads", "1", REPROBOX_INFERENCE_CHAOS="batch_variant")
    assert code == 0
    assert report["batch_invariance"]["batch_invariant"] is False


def test_sampling_without_the_hook_differs_run_to_run(venv: Path) -> None:
    code, report = inference(venv, "--threads", "1", REPROBOX_DISABLE="1")
    assert code == 1
    difference = report["first_difference"]
    # Torch's global generator starts from a random seed in every process without the hook;
    # greedy decoding and the explicitly seeded per-request generators do not care.
    assert difference["what"].startswith("inference torch sampled (batch-8, 1 thread(s))")
    first, second = (run["models"]["torch"]["threads"]["1"] for run in report["runs"])
    assert first["greedy"] == second["greedy"]
    assert first["sampled_generator"] == second["sampled_generator"]
    assert first["sampled"]["batch-8"]["tokens"] != second["sampled"]["batch-8"]["tokens"]


def test_another_seed_samples_other_tokens(venv: Path, required: dict[str, Any]) -> None:
    code, report = inference(venv, "--threads", "1", REPROBOX_SEED="1")
    assert code == 0
    now = report["runs"][0]["models"]["torch"]["threads"]["1"]
    before = required["runs"][0]["models"]["torch"]["threads"]["1"]
    assert now["greedy"] == before["greedy"]  # the weights are a fixed checkpoint
    assert now["sampled"] != before["sampled"]
    assert now["sampled_generator"] != before["sampled_generator"]
    assert report["evidence_sha256"] != required["evidence_sha256"]


def test_the_selfcheck_folds_inference_in_and_fails_on_it(venv: Path) -> None:
    done = subprocess.run(
        [str(venv), str(SELFCHECK), "--steps", "2", "--inference", "--require-batch-invariance"],
        capture_output=True,
        text=True,
        env=clean_env(REPROBOX_INFERENCE_CHAOS="batch_variant"),
        timeout=600,
        check=False,
    )
    assert done.returncode == 1, done.stderr
    report = json.loads(done.stdout)
    assert report["passed"] is False
    assert report["first_difference"] is None  # training and generation agree run to run
    assert report["failures"]
    assert all(f.startswith("inference: batch invariance is required") for f in report["failures"])
    inference_part = report["inference"]
    run = report["runs"][0]
    training = {k: run[k] for k in ("losses", "state_sha256")} | {
        "device_class": report["device_class"]
    }
    training_fp = hashlib.sha256(
        json.dumps(training, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    folded = {"selfcheck": training_fp, "inference": inference_part["evidence_sha256"]}
    expected = hashlib.sha256(
        json.dumps(folded, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()
    assert report["fingerprint"] == expected != training_fp
    assert [r["inference_sha256"] for r in report["runs"]] == [
        inference_part["evidence_sha256"]
    ] * 2


@pytest.mark.parametrize(
    ("program", "args"),
    [
        (INFERENCE, ["--threads", "0"]),
        (INFERENCE, ["--threads", "two"]),
        (SELFCHECK, ["--require-batch-invariance"]),
        (SELFCHECK, ["--inference-moe"]),
    ],
)
def test_usage_errors_exit_2(venv: Path, program: Path, args: list[str]) -> None:
    done = subprocess.run(
        [str(venv), str(program), *args],
        capture_output=True,
        text=True,
        env=clean_env(),
        check=False,
    )
    assert done.returncode == 2, done.stderr
    assert "error:" in done.stderr
    assert done.stdout == ""


def test_an_unknown_chaos_is_a_usage_error(venv: Path) -> None:
    done = subprocess.run(
        [str(venv), str(INFERENCE)],
        capture_output=True,
        text=True,
        env=clean_env(REPROBOX_INFERENCE_CHAOS="everything"),
        check=False,
    )
    assert done.returncode == 2
    assert "batch_variant" in done.stderr


# --------------------------------------------------------------------------- logic


@pytest.fixture(scope="module")
def module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("reprobox_inference", INFERENCE)
    assert spec is not None
    assert spec.loader is not None
    loaded = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded)
    return loaded


def record(tokens: list[int], hashes: list[str]) -> dict[str, Any]:
    return {"tokens": tokens, "logits_sha256": hashes, "batch_sha256": "b"}


def run_with(greedy_alone: dict[str, Any]) -> dict[str, Any]:
    return {
        "configured_threads": 1,
        "models": {
            "torch": {
                "model": {"weights_sha256": "w"},
                "threads": {"1": {"greedy": {"alone": greedy_alone}, "batch_invariance": {}}},
            }
        },
    }


def test_first_difference_names_mode_variant_threads_and_step(module: ModuleType) -> None:
    a = run_with(record([5, 6, 7], ["x", "y", "z"]))
    b = run_with(record([5, 6, 9], ["x", "Y", "z"]))
    assert module._first_difference(a, a) is None
    difference = module._first_difference(a, b)
    assert difference == {
        "step": 1,
        "what": "inference torch greedy (alone, 1 thread(s)): logits",
        "a": "y",
        "b": "Y",
    }
    c = run_with(record([5, 6, 9], ["x", "y", "z"]))
    assert module._first_difference(a, c)["what"].endswith(": tokens")


def test_required_invariance_fails_only_for_batch_variants_at_the_configured_count(
    module: ModuleType,
) -> None:
    batch = {"group": "batch", "identical": False, "logits_differ_from_step": 2, "cause": "c"}
    padding = batch | {"group": "padding"}
    same = {"group": "batch", "identical": True}
    run = run_with(record([1], ["x"]))
    measured = run["models"]["torch"]["threads"]
    measured["1"]["batch_invariance"] = {"greedy": {"batch-2": same, "left-padded": padding}}
    measured["2"] = {"batch_invariance": {"greedy": {"batch-2": batch, "left-padded": padding}}}
    summary, failures = module._invariance(run, True)
    assert failures == []  # padding at 1 thread, batch only at 2: neither is required
    assert summary["batch_invariant"] is True
    assert summary["padding_invariant"] is False
    assert summary["threads"]["2"]["batch_invariant"] is False
    measured["1"]["batch_invariance"]["greedy"]["batch-2"] = batch
    _, failures = module._invariance(run, True)
    assert len(failures) == 1
    assert (
        "at 1 thread(s) torch greedy inside batch-2 differs from alone from step 2" in failures[0]
    )
    assert module._invariance(run, False)[1] == []


# --------------------------------------------------------------------------- the spec


def test_inference_is_off_by_default_and_adds_nothing_to_the_argv() -> None:
    spec = parse_spec(DEMO)
    assert spec.selfcheck.inference is False
    assert not any(arg.startswith("--inference") for arg in selfcheck_argv(spec))


def test_the_inference_keys_reach_the_argv_label() -> None:
    text = DEMO + "  inference: true\n  require_batch_invariance: true\n  inference_moe: true\n"
    argv = selfcheck_argv(parse_spec(text))
    assert argv[-3:] == ["--inference", "--require-batch-invariance", "--inference-moe"]


def test_inference_options_without_inference_are_refused() -> None:
    with pytest.raises(SpecError, match="require_batch_invariance only applies"):
        parse_spec(DEMO + "  require_batch_invariance: true\n")
    with pytest.raises(SpecError, match="did you mean 'inference'"):
        parse_spec(DEMO + "  inferance: true\n")


# --------------------------------------------------------------------------- build and check


def test_a_failure_says_why_even_when_the_runs_agree() -> None:
    from reprobox import cli_format

    report = {"failures": ["inference: batch invariance is required, but ..."]}
    assert cli_format._why_failed(report) == "inference: batch invariance is required, but ..."
    older = {"failures": [], "first_difference": {"step": 3, "what": "loss"}}
    assert cli_format._why_failed(older) == 'the two runs differ at {"step": 3, "what": "loss"}'
    lines = cli_format._inference_lines({"inference": {"summary": ["a", "  b"]}})
    assert lines == "\na\n  b"
    assert cli_format._inference_lines({}) == ""


def test_check_names_inference_when_only_its_evidence_differs_from_the_record() -> None:
    from reprobox.compare import first_trace_difference

    recorded = {"losses": ["0x1p+0"], "state_sha256": "s", "inference_sha256": "old"}
    here = {"losses": ["0x1p+0"], "state_sha256": "s", "inference_sha256": "new"}
    assert first_trace_difference(recorded, here) == {
        "step": None,
        "what": "inference",
        "a": "old",
        "b": "new",
    }
    here["inference_sha256"] = "old"
    assert first_trace_difference(recorded, here) is None


def test_a_run_to_run_difference_in_inference_becomes_the_first_difference() -> None:
    spec = importlib.util.spec_from_file_location("reprobox_selfcheck", SELFCHECK)
    assert spec is not None
    assert spec.loader is not None
    selfcheck = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(selfcheck)
    module = importlib.util.spec_from_file_location("reprobox_inference", INFERENCE)
    assert module is not None
    assert module.loader is not None
    inference = importlib.util.module_from_spec(module)
    module.loader.exec_module(inference)
    difference = {"step": 1, "what": "inference torch sampled (batch-8, 1 thread(s)): logits"}
    inference_part = {
        "failures": ["the inference runs differ at ...", "batch invariance is required, but ..."],
        "first_difference": difference,
        "evidence_sha256": "e",
        "runs": [{"evidence_sha256": "e"}, {"evidence_sha256": "f"}],
    }
    report: dict[str, Any] = {
        "failures": [],
        "first_difference": None,
        "fingerprint": "t",
        "runs": [{}, {}],
        "settings": {"env": {}},
        "probe": {"cpu": "raised"},
    }
    judged = selfcheck._judge(inference.fold_into_selfcheck(report, inference_part))
    assert judged["passed"] is False
    assert judged["first_difference"] == difference
    assert judged["failures"] == [
        "inference: batch invariance is required, but ...",
        f"the runs differ at step 1: {difference['what']}",
    ]
    assert [run["inference_sha256"] for run in judged["runs"]] == ["e", "f"]
