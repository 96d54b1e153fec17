"""reprobox inference check: generate twice in fresh interpreters; compare runs and batches.

A small causal language model with random weights (no download) generates a fixed set of
prompts of different lengths, left-padded: greedily, and by seeded sampling (temperature,
top-k, top-p). The model is transformers' Llama made from a config through
``AutoModelForCausalLM.from_config`` when transformers imports, else the small decoder in
reprobox_decoder.py; ``--moe`` adds that decoder with a top-1 mixture-of-experts layer that
has a capacity limit. The weights stand for a checkpoint file: they come from a fixed seed,
never from the hook. Sampling draws on torch's global generator (which only the hook seeds),
as ``generate(do_sample=True)`` does, and with the decoder also on one explicit
``torch.Generator`` per request.

Three claims, kept apart:

- run to run: two fresh interpreters give the same token ids and the same logits (sha256 of
  every step's logits) for everything, greedy and sampled. Required for ``passed``.
- batch invariance: one prompt (the target) gives the same tokens and logits alone as inside
  batches of 2, 4 and 8 with shorter prompts around it. Reported; required only with
  ``--require-batch-invariance``, at the configured thread count.
- padding invariance: the same with extra left padding (alone, and among longer prompts).
  Reported only: it has a cause and a remedy of its own.

Each comparison names the first step and position where the logits part, the first step
where the tokens part, and why where it can tell (MoE capacity routing). Invariance is
measured at the configured thread count and, on CPU, at 1 and 2 threads.

``python reprobox_inference.py [--device auto|cpu|cuda] [--moe] [--require-batch-invariance]
[--threads 1,2] [--json-out FILE]`` prints a JSON report: exit 0 when it passes, 1 when it
fails, 2 on a usage error. This file uses the standard library only: the runs it starts
import torch and reprobox_generation.py (and reprobox_decoder.py). The self-check imports it
and calls ``check()`` and ``fold_into_selfcheck()``. REPROBOX_INFERENCE_CHAOS=batch_variant makes the output projection's reduction
depend on the batch size: the negative control for batch invariance.
"""

import argparse
import hashlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import ModuleType
from typing import Any

__all__ = ["UsageError", "check", "fold_into_selfcheck", "main"]

_CHAOS = "REPROBOX_INFERENCE_CHAOS"
_TAIL = 2000  # characters of a failed run's output kept in the report


class UsageError(Exception):
    """Bad arguments: exit 2."""


def _sibling(name: str) -> ModuleType:
    """A module beside this file, by its path: found even where sys.path lacks this folder."""
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, Path(__file__).with_name(f"{name}.py"))
    if spec is None or spec.loader is None:
        raise UsageError(f"{name}.py is missing beside {Path(__file__).name}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _digest(value: Any) -> str:
    return hashlib.sha256(
        json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    ).hexdigest()


def _first_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """The first place two runs part: model, threads, mode, variant, step."""
    for kind in sorted(set(a["models"]) | set(b["models"])):
        model_a, model_b = a["models"].get(kind, {}), b["models"].get(kind, {})
        if model_a.get("model") != model_b.get("model"):
            return {
                "step": None,
                "what": f"inference {kind}: the model's weights",
                "a": model_a.get("model"),
                "b": model_b.get("model"),
            }
        for threads in sorted(model_a["threads"], key=int):
            modes_a, modes_b = model_a["threads"][threads], model_b["threads"].get(threads, {})
            for how in sorted(set(modes_a) - {"batch_invariance"}):
                for variant in sorted(modes_a.get(how, {})):
                    ra, rb = modes_a[how][variant], modes_b.get(how, {}).get(variant, {})
                    if ra == rb:
                        continue
                    where = f"inference {kind} {how} ({variant}, {threads} thread(s))"
                    for step, pair in enumerate(
                        zip(ra["logits_sha256"], rb.get("logits_sha256", []), strict=False)
                    ):
                        if pair[0] != pair[1]:
                            return {
                                "step": step,
                                "what": f"{where}: logits",
                                "a": pair[0],
                                "b": pair[1],
                            }
                    return {
                        "step": None,
                        "what": f"{where}: tokens",
                        "a": ra["tokens"],
                        "b": rb.get("tokens"),
                    }
    if a != b:
        return {
            "step": None,
            "what": "inference: the runs' reports",
            "a": _digest(a),
            "b": _digest(b),
        }
    return None


def _invariance(run: dict[str, Any], required: bool) -> tuple[dict[str, Any], list[str]]:
    """Batch and padding invariance per thread count; the failures when batch is required."""
    configured = str(run["configured_threads"])
    table: dict[str, Any] = {}
    failures: list[str] = []
    for kind, model in sorted(run["models"].items()):
        for threads, measured in sorted(model["threads"].items(), key=lambda item: int(item[0])):
            entry = table.setdefault(
                threads, {"batch_invariant": True, "padding_invariant": True, "differs": []}
            )
            for how, comparisons in sorted(measured["batch_invariance"].items()):
                for variant, compared in comparisons.items():
                    if compared["identical"]:
                        continue
                    group = compared["group"]
                    entry[f"{group}_invariant"] = False
                    entry["differs"].append(
                        {"model": kind, "mode": how, "variant": variant, **compared}
                    )
                    if required and group == "batch" and threads == configured:
                        failures.append(
                            f"batch invariance is required, but at {threads} thread(s) {kind} {how} "
                            f"inside {variant} differs from alone from step "
                            f"{compared['logits_differ_from_step']}: {compared['cause']}"
                        )
    report = {
        "required": required,
        "configured_threads": int(configured),
        "batch_invariant": table[configured]["batch_invariant"],
        "padding_invariant": table[configured]["padding_invariant"],
        "threads": table,
    }
    return report, failures


def _said(differs: list[dict[str, Any]], group: str) -> str:
    parted = [d for d in differs if d["group"] == group]
    if not parted:
        return "invariant"
    shown = []
    for d in parted:
        tokens = d["tokens_differ_from_step"]
        tokens_said = "tokens same" if tokens is None else f"tokens from step {tokens}"
        shown.append(
            f"{d['model']} {d['mode']} {d['variant']}: logits from step {d['logits_differ_from_step']}, {tokens_said}"
        )
    return "NOT invariant (" + "; ".join(shown) + ")"


def _summary_lines(report: dict[str, Any]) -> list[str]:
    difference = report["first_difference"]
    lines = [
        "inference: greedy and sampled generation identical run to run"
        if difference is None
        else f"inference: the runs differ at {difference['what']}, step {difference['step']}"
    ]
    invariance = report["batch_invariance"]
    for threads, entry in sorted(invariance["threads"].items(), key=lambda item: int(item[0])):
        lines.append(f"  {threads} thread(s): batch {_said(entry['differs'], 'batch')}")
        lines.append(f"  {threads} thread(s): padding {_said(entry['differs'], 'padding')}")
    return lines


def _child_env() -> dict[str, str]:
    """This environment, with OpenMP's idle threads sleeping instead of spinning.

    The runs measure at 2 threads even where the image pins every thread to one CPU
    (GOMP_CPU_AFFINITY=0): spinning there cost 61 s instead of 3 s on this project's
    machine. The wait policy changes no result (same evidence both ways, measured).
    """
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY") or "PASSIVE"}


class _Child:
    """This file in a fresh interpreter, writing its evidence to a file in `workdir`."""

    def __init__(self, arguments: list[str], workdir: Path, label: str) -> None:
        self.label = label
        self.result, self.log = workdir / f"{label}.json", workdir / f"{label}.log"
        command = [
            sys.executable,
            str(Path(__file__).resolve()),
            *arguments,
            "--result",
            str(self.result),
        ]
        with self.log.open("wb") as output:  # a file, not a pipe: a chatty run cannot block
            self.process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=output, stderr=output, env=_child_env()
            )

    def outcome(self) -> dict[str, Any]:
        returncode = self.process.wait()
        if returncode != 0 or not self.result.exists():
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-_TAIL:]
            return {
                "error": f"inference {self.label} exited with {returncode}",
                "stderr_tail": tail,
            }
        loaded: dict[str, Any] = json.loads(self.result.read_text(encoding="utf-8"))
        return loaded


def _threads(text: str) -> list[int]:
    try:
        numbers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"--threads {text!r}: write thread counts such as 1,2") from None
    if not numbers or not all(1 <= n <= 1024 for n in numbers):
        raise UsageError(f"--threads {text!r}: each count must be from 1 to 1024")
    return numbers


def check(
    workdir: Path,
    *,
    device: str = "auto",
    model: str = "auto",
    moe: bool = False,
    require_batch_invariance: bool = False,
    threads: str = "1,2",
) -> dict[str, Any]:
    """Run the inference check twice in fresh interpreters; the report, with `passed`."""
    _threads(threads)
    if os.environ.get(_CHAOS, "") not in ("", "batch_variant"):
        raise UsageError(
            f"{_CHAOS}={os.environ[_CHAOS]!r}: the only chaos there is is 'batch_variant'"
        )
    arguments = [
        "--run",
        "--device",
        device,
        "--model",
        model,
        "--threads",
        threads,
        *(["--moe"] if moe else []),
    ]
    started = time.perf_counter()
    # One after the other: a run measures at 2 threads too, and two runs side by side on a
    # 2-core machine left OpenMP threads spinning against each other (26 s instead of 6 s).
    runs = [_Child(arguments, workdir, f"inference-{n}").outcome() for n in (1, 2)]
    report: dict[str, Any] = {
        "options": {"device": device, "model": model, "moe": moe, "threads": threads}
    }
    errors = [f"{run['error']}: {run['stderr_tail']}" for run in runs if "error" in run]
    if errors:
        return {
            **report,
            "passed": False,
            "failures": errors,
            "first_difference": None,
            "runs": [],
            "evidence_sha256": None,
        }
    timings = [run.pop("seconds", None) for run in runs]
    first, second = runs
    difference = _first_difference(first, second)
    invariance, failures = _invariance(first, require_batch_invariance)
    if difference is not None:  # first, always: the self-check relies on it
        failures.insert(
            0, f"the inference runs differ at {difference['what']}, step {difference['step']}"
        )
    report |= {
        "models": {kind: model["model"] for kind, model in first["models"].items()},
        "configured_threads": first["configured_threads"],
        "evidence_sha256": _digest(first),
        # Run 2 in full only where it differs: otherwise its digest says it is run 1.
        "runs": [
            {"evidence_sha256": _digest(run), **(run if n == 0 or difference else {})}
            for n, run in enumerate(runs)
        ],
        "first_difference": difference,
        "batch_invariance": invariance,
        "failures": failures,
        "passed": not failures,
        "seconds": round(time.perf_counter() - started, 3),
        "run_seconds": timings,
    }
    report["summary"] = _summary_lines(report)
    return report


def fold_into_selfcheck(report: dict[str, Any], inference: dict[str, Any]) -> dict[str, Any]:
    """The self-check's report with this check folded in: failures, and evidence in the fingerprint.

    Only when it ran, so the fingerprints of training-only images stay what they were. A
    difference between the runs becomes the report's first difference where training had none
    (the self-check then words that failure itself).
    """
    report["inference"] = inference
    failures = inference["failures"]
    if report["first_difference"] is None and inference["first_difference"] is not None:
        report["first_difference"] = inference["first_difference"]
        failures = failures[1:]  # check() puts the runs' difference first
    report["failures"] += [f"inference: {failure}" for failure in failures]
    evidence = inference["evidence_sha256"]
    if report["fingerprint"] is not None and evidence is not None:
        report["fingerprint"] = _digest({"selfcheck": report["fingerprint"], "inference": evidence})
    for run, digest in zip(report["runs"], inference["runs"], strict=False):
        run["inference_sha256"] = digest["evidence_sha256"]
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reprobox_inference",
        description="Generate twice in fresh interpreters; compare the runs, and one prompt alone and in batches.",
    )
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument(
        "--model",
        choices=["auto", "transformers", "torch"],
        default="auto",
        help="auto: transformers when it imports, else the decoder here",
    )
    parser.add_argument(
        "--moe",
        action="store_true",
        help="also the decoder with a capacity-limited top-1 MoE layer",
    )
    parser.add_argument(
        "--require-batch-invariance",
        action="store_true",
        help="fail unless outputs are batch invariant at the configured thread count",
    )
    parser.add_argument(
        "--threads",
        default="1,2",
        help="CPU thread counts to measure batch invariance at, besides the configured one",
    )
    parser.add_argument("--json-out", type=Path, help="also write the report to this file")
    # Internal: what the parent asks of each fresh interpreter.
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def _run_in_child(args: argparse.Namespace) -> None:
    if args.result is None:
        raise UsageError("--result is required with --run")
    evidence = _sibling("reprobox_generation").run(
        _sibling("reprobox_decoder"),
        device=args.device,
        model=args.model,
        moe=args.moe,
        threads=_threads(args.threads),
        chaos=os.environ.get(_CHAOS, ""),
    )
    args.result.write_text(json.dumps(evidence), encoding="utf-8")


def main(argv: list[str] | None = None) -> int:
    """Run the inference check; print the JSON report; 0 pass, 1 fail, 2 usage error."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        if args.run:
            _run_in_child(args)
            return 0
        with tempfile.TemporaryDirectory(prefix="reprobox-inference-") as scratch:
            report = check(
                Path(scratch),
                device=args.device,
                model=args.model,
                moe=args.moe,
                require_batch_invariance=args.require_batch_invariance,
                threads=args.threads,
            )
    except UsageError as error:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"reprobox_inference: error: {error}\n")
        return 2
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
