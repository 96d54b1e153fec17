"""The inference check's runs: one fresh interpreter generates, measures and compares.

Imported by reprobox_inference.py in each run it starts (``--run``), never in its parent;
standard library and torch (transformers where installed). ``run()`` returns the run's
evidence: per model and thread count, every variant's token ids and per-step logits sha256,
and the target prompt compared alone against each variant.
"""

import hashlib
import importlib
import importlib.util
import os
import time
from types import ModuleType
from typing import Any

__all__ = ["run"]

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


def _prompt(index: int) -> list[int]:
    length = _TARGET_LENGTH if index == 0 else _OTHER_LENGTHS[index - 1]
    return [1 + (37 * index + 11 * at + index * at) % (_VOCAB - 1) for at in range(length)]


def _tensor_bytes(tensor: Any) -> bytes:
    import torch

    flat = tensor.detach().to("cpu").contiguous().reshape(-1)
    return bytes(flat.view(torch.uint8).tolist())  # no numpy: an image may not have it


def _sha256(tensor: Any) -> str:
    return hashlib.sha256(_tensor_bytes(tensor)).hexdigest()


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

    def __init__(self, torch: Any, decoder: ModuleType, kind: str, device: Any, seed: int) -> None:
        self.torch, self.decoder = torch, decoder
        self.kind, self.device, self.seed = kind, device, seed
        # The weights stand for a checkpoint file: drawn on the CPU from a fixed seed in a
        # fork of the CPU generator, so neither the hook's seed nor the sampling touches them
        # (torch.manual_seed would reseed the GPU generators too, and they are not forked).
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(_CHECKPOINT_SEED)
            if kind == "transformers":
                model, info = _transformers_model()
            else:
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
        decoder = self.decoder
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
            "group": _VARIANTS[name][2],
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


def run(
    decoder: ModuleType, *, device: str, model: str, moe: bool, threads: list[int], chaos: str
) -> dict[str, Any]:
    """One fresh interpreter's evidence: every model, every thread count, every mode."""
    import torch

    name = device
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    where = torch.device(name)
    seed = int(os.environ.get("REPROBOX_SEED", "0") or 0)
    configured = torch.get_num_threads()
    # CPU thread counts change CPU kernels only; on a GPU the configured count is enough.
    survey = [configured] if where.type == "cuda" else sorted({configured, *threads})
    models: dict[str, Any] = {}
    seconds: dict[str, float] = {}  # not evidence: the parent takes it out before comparing
    for kind in _models(model, moe):
        session = _Session(torch, decoder, kind, where, seed)
        if chaos == "batch_variant":
            session.break_batch_invariance()
        by_threads = {}
        for count in survey:
            torch.set_num_threads(count)
            started = time.perf_counter()
            try:
                by_threads[str(count)] = session.measure()
            finally:
                torch.set_num_threads(configured)
            seconds[f"{kind} at {count} thread(s)"] = round(time.perf_counter() - started, 3)
        models[kind] = {"model": session.info, "threads": by_threads}
    return {
        "device": where.type,
        "configured_threads": configured,
        "seed": seed,
        "chaos": chaos or None,
        "torch": torch.__version__,
        "models": models,
        "seconds": seconds,
    }
