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
fails, 2 on a usage error. The parent uses the standard library only; torch is imported in
the runs. REPROBOX_INFERENCE_CHAOS=batch_variant makes the output projection's reduction
depend on the batch size: the negative control for batch invariance.
"""

import argparse
import hashlib
import importlib
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

__all__ = ["check", "main"]

_CHAOS = "REPROBOX_INFERENCE_CHAOS"
_CHECKPOINT_SEED = 1_000_003  # the weights stand for a checkpoint: fixed, never the hook's seed
_VOCAB = 256
_PAD = 0
_NEW_TOKENS = 12
_TEMPERATURE, _TOP_K, _TOP_P = 0.8, 20, 0.9
_TARGET_LENGTH = 8
# Prompt lengths after the target (prompt 0): up to the target's length, then longer ones.
_OTHER_LENGTHS = (5, 3, 7, 6, 4, 2, 8, 11, 13)
# name: (prompt indices in batch order, extra left padding, what the variant changes). The
# "batch" ones leave the target unpadded, so only the batch around it changes; the
# "padding" ones give it pad tokens (alone, and among longer prompts in a real mixed batch).
_VARIANTS: dict[str, tuple[tuple[int, ...], int, str]] = {
    "alone": ((0,), 0, "reference"),
    "batch-2": ((1, 0), 0, "batch"),
    "batch-4": ((1, 2, 0, 3), 0, "batch"),
    "batch-8": ((1, 2, 3, 4, 0, 5, 6, 7), 0, "batch"),
    "left-padded": ((0,), 5, "padding"),
    "batch-4-padded": ((8, 1, 0, 9), 0, "padding"),
}
_TAIL = 2000  # characters of a failed run's output kept in the report


class UsageError(Exception):
    """Bad arguments: exit 2."""


# --------------------------------------------------------------------------- in a run


def _prompt(index: int) -> list[int]:
    length = _TARGET_LENGTH if index == 0 else _OTHER_LENGTHS[index - 1]
    return [1 + (37 * index + 11 * at + index * at) % (_VOCAB - 1) for at in range(length)]


def _tensor_bytes(tensor: Any) -> bytes:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).tolist())  # no numpy: an image may not have it


def _sha256(tensor: Any) -> str:
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


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


def _transformers_model() -> tuple[Any, dict[str, Any]]:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # from a config: nothing may be downloaded
    transformers = importlib.import_module("transformers")
    config = transformers.LlamaConfig(
        vocab_size=_VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        pad_token_id=_PAD,
        bos_token_id=1,
        eos_token_id=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config)
    info = {
        "transformers": transformers.__version__,
        "class": type(model).__name__,
        "attention": getattr(model.config, "_attn_implementation", None),
    }
    return model, info


class _Session:
    """One model in one fresh interpreter: builds it, runs the variants, compares them."""

    def __init__(self, torch: Any, kind: str, device: Any, seed: int) -> None:
        self.torch, self.kind, self.device, self.seed = torch, kind, device, seed
        # The weights stand for a checkpoint file: drawn on the CPU from a fixed seed in a
        # fork of the CPU generator, so neither the hook's seed nor the sampling touches them
        # (torch.manual_seed would reseed the GPU generators too, and they are not forked).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_CHECKPOINT_SEED)
            if kind == "transformers":
                model, info = _transformers_model()
            else:
                decoder = _sibling("reprobox_decoder")
                model = decoder.build(torch, vocab=_VOCAB, moe=kind == "torch-moe")
                info = {"class": "reprobox_decoder", "moe": kind == "torch-moe"}
        self.model = model.to(device).eval()
        digest = hashlib.sha256()
        for name, tensor in sorted(self.model.state_dict().items()):
            digest.update(name.encode() + _tensor_bytes(tensor))
        parameters = sum(p.numel() for p in self.model.parameters())
        self.info = {**info, "parameters": parameters, "weights_sha256": digest.hexdigest()}

    def break_batch_invariance(self) -> None:
        """The negative control: split the output projection's sum into batch-size parts."""

        def split_k(module: Any, inputs: tuple[Any, ...], output: Any) -> Any:
            hidden = inputs[0]
            parts = max(1, min(hidden.shape[0], hidden.shape[-1]))
            pieces = zip(
                hidden.tensor_split(parts, -1), module.weight.tensor_split(parts, -1), strict=True
            )
            total = sum(h @ w.T for h, w in pieces)
            return total if module.bias is None else total + module.bias

        self.model.get_output_embeddings().register_forward_hook(split_k)

    def _generate(self, ids: Any, mask: Any, how: str, order: tuple[int, ...]) -> tuple[Any, ...]:
        torch = self.torch
        if self.kind == "transformers":
            transformers = importlib.import_module("transformers")
            sampled = how != "greedy"
            config = transformers.GenerationConfig(
                max_new_tokens=_NEW_TOKENS,
                min_new_tokens=_NEW_TOKENS,
                do_sample=sampled,
                temperature=_TEMPERATURE if sampled else None,
                top_k=_TOP_K if sampled else None,
                top_p=_TOP_P if sampled else None,
                pad_token_id=_PAD,
                eos_token_id=None,
            )
            out = self.model.generate(
                input_ids=ids,
                attention_mask=mask,
                generation_config=config,
                return_dict_in_generate=True,
                output_logits=True,
            )
            return out.sequences[:, -_NEW_TOKENS:], list(out.logits), None
        decoder = _sibling("reprobox_decoder")
        generators = None
        if how == "sampled_generator":
            # Each request's own seed, from the run's seed and the prompt, not its batch.
            generators = [
                torch.Generator(device=self.device).manual_seed(self.seed * 1000 + i) for i in order
            ]
        sampling = None if how == "greedy" else decoder.Sampling(_TEMPERATURE, _TOP_K, _TOP_P)
        return tuple(
            decoder.generate(
                torch,
                self.model,
                ids,
                mask,
                new_tokens=_NEW_TOKENS,
                sampling=sampling,
                generators=generators,
            )
        )

    def variant(self, name: str, how: str) -> dict[str, Any]:
        """One batch: the target's tokens and per-step logits (kept as tensors), MoE drops."""
        torch = self.torch
        order, extra, _ = _VARIANTS[name]
        prompts = [_prompt(i) for i in order]
        width = max(len(p) for p in prompts) + extra
        ids = torch.tensor([[_PAD] * (width - len(p)) + p for p in prompts], device=self.device)
        mask = torch.tensor(
            [[0] * (width - len(p)) + [1] * len(p) for p in prompts], device=self.device
        )
        row = order.index(0)
        with torch.no_grad():
            tokens, logits, dropped = self._generate(ids, mask, how, order)
        batch = hashlib.sha256(_tensor_bytes(tokens))
        for step in logits:
            batch.update(_tensor_bytes(step.float()))
        record: dict[str, Any] = {
            "tokens": [int(t) for t in tokens[row]],
            "logits_sha256": [_sha256(step[row].float()) for step in logits],
            "batch_sha256": batch.hexdigest(),
        }
        if self.kind == "torch-moe":
            record["moe_dropped"] = [step[row] for step in dropped]
        return {"record": record, "logits": [step[row].float().cpu() for step in logits]}

    def compare(self, alone: dict[str, Any], other: dict[str, Any], name: str) -> dict[str, Any]:
        """Where the target inside variant `name` first parts from the target alone, and why."""
        torch = self.torch
        pairs = zip(alone["logits"], other["logits"], strict=True)
        logits_step = next((s for s, (a, b) in enumerate(pairs) if not torch.equal(a, b)), None)
        tokens = zip(alone["record"]["tokens"], other["record"]["tokens"], strict=True)
        token_step = next((s for s, (a, b) in enumerate(tokens) if a != b), None)
        result: dict[str, Any] = {
            "identical": logits_step is None and token_step is None,
            "logits_differ_from_step": logits_step,
            "tokens_differ_from_step": token_step,
        }
        if logits_step is not None:
            a, b = alone["logits"][logits_step], other["logits"][logits_step]
            differ = (a != b).nonzero()
            result |= {
                "position": _TARGET_LENGTH + logits_step,  # of the token these logits predict
                "first_vocab_index": int(differ[0, 0]),
                "values_differing": int(differ.shape[0]),
                "max_abs_difference": float((a - b).abs().max()),
                "cause": _cause(alone["record"], other["record"], logits_step, name),
            }
        return result

    def measure(self) -> dict[str, Any]:
        """Every mode: the variants' records, and each compared with the target alone."""
        measured: dict[str, Any] = {"batch_invariance": {}}
        for how in _modes(self.kind):
            if how == "sampled":  # the global generator couples a batch's rows: run to run only
                measured[how] = {"batch-8": self.variant("batch-8", how)["record"]}
                continue
            runs = {name: self.variant(name, how) for name in _VARIANTS}
            measured[how] = {name: run["record"] for name, run in runs.items()}
            measured["batch_invariance"][how] = {
                name: self.compare(runs["alone"], run, name)
                for name, run in runs.items()
                if name != "alone"
            }
        return measured


def _cause(alone: dict[str, Any], other: dict[str, Any], step: int, variant: str) -> str:
    drops = alone.get("moe_dropped"), other.get("moe_dropped")
    if drops[0] is not None and drops[1] is not None and drops[0][step] != drops[1][step]:
        return (
            f"MoE capacity routing: at step {step} the experts' capacity dropped this prompt's "
            f"tokens {drops[1][step]} inside {variant}, {drops[0][step]} alone"
        )
    if _VARIANTS[variant][2] == "padding":
        return "left padding: the same prompt with pad tokens before it (a longer key dimension)"
    return "the batch's shape: a reduction (matmul, attention, norm) summed in another order"


def _modes(kind: str) -> tuple[str, ...]:
    # transformers' generate() takes no generator: its sampling uses the global one only.
    if kind == "transformers":
        return ("greedy", "sampled")
    return ("greedy", "sampled", "sampled_generator")


def _models(kind: str, moe: bool) -> list[str]:
    if kind == "auto":
        kind = "transformers" if importlib.util.find_spec("transformers") else "torch"
    return [kind, *(["torch-moe"] if moe else [])]


def _run(args: argparse.Namespace) -> dict[str, Any]:
    """One fresh interpreter's evidence: every model, every thread count, every mode."""
    import torch

    name = args.device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    seed = int(os.environ.get("REPROBOX_SEED", "0") or 0)
    chaos = os.environ.get(_CHAOS, "")
    configured = torch.get_num_threads()
    # CPU thread counts change CPU kernels only; on a GPU the configured count is enough.
    survey = [configured] if device.type == "cuda" else sorted({configured, *args.threads})
    models: dict[str, Any] = {}
    seconds: dict[str, float] = {}  # not evidence: the parent takes it out before comparing
    for kind in _models(args.model, args.moe):
        session = _Session(torch, kind, device, seed)
        if chaos == "batch_variant":
            session.break_batch_invariance()
        by_threads = {}
        for threads in survey:
            torch.set_num_threads(threads)
            started = time.perf_counter()
            try:
                by_threads[str(threads)] = session.measure()
            finally:
                torch.set_num_threads(configured)
            seconds[f"{kind} at {threads} thread(s)"] = round(time.perf_counter() - started, 3)
        models[kind] = {"model": session.info, "threads": by_threads}
    return {
        "device": device.type,
        "configured_threads": configured,
        "seed": seed,
        "chaos": chaos or None,
        "torch": torch.__version__,
        "models": models,
        "seconds": seconds,
    }


# --------------------------------------------------------------------------- the parent


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
            for how in _modes(kind):
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
                    group = _VARIANTS[variant][2]
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
    parted = [d for d in differs if _VARIANTS[d["variant"]][2] == group]
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
    args.threads = _threads(args.threads)
    args.result.write_text(json.dumps(_run(args)), encoding="utf-8")


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
