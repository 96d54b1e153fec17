"""reprobox self-check: train twice in fresh interpreters and compare the runs bit for bit.

The parent process uses the standard library only. It starts each run as a new interpreter
(``sys.executable``, the same environment), the way a user's program starts, so what makes
the runs reproducible is the image's ENV and the seed-on-import hook: nothing here seeds an
RNG or sets a determinism flag. Each training run exercises dropout, a shuffling DataLoader
with two workers and random augmentation, a convolution, matmuls, an embedding, an
index_add scatter and AdamW, and records every step's loss (float.hex) and a sha256 of the
final model and optimizer state.

``python reprobox_selfcheck.py --steps N [--script PATH --output-dir DIR] [--json-out FILE]``
prints a JSON report; exit 0 when the runs match, 1 when they differ or deterministic mode
is asked for and not on, 2 on a usage error. REPROBOX_SELFCHECK_CHAOS=index_put adds a
genuinely nondeterministic term to training: the negative control that shows the check can
fail.
"""

import argparse
import hashlib
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["main"]

# The environment that decides reproducibility; the report shows what each run saw.
_ENV_SEEN = (
    "PYTHONHASHSEED",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OMP_DYNAMIC",
    "MKL_DYNAMIC",
    "GOMP_CPU_AFFINITY",
    "CUBLAS_WORKSPACE_CONFIG",
    "ATEN_CPU_CAPABILITY",
    "MKL_CBWR",
    "ONEDNN_MAX_CPU_ISA",
    "OPENBLAS_CORETYPE",
    "NPY_DISABLE_CPU_FEATURES",
    "REPROBOX_CPU",
    "REPROBOX_SEED",
    "REPROBOX_DISABLE",
    "REPROBOX_DETERMINISTIC",
    "REPROBOX_WARN_ONLY",
    "REPROBOX_FILL_UNINITIALIZED_MEMORY",
    "REPROBOX_SELFCHECK_CHAOS",
)
_CHAOS = "REPROBOX_SELFCHECK_CHAOS"
_TAIL = 2000  # characters of a failed run's stderr kept in the report


class _UsageError(Exception):
    """Bad arguments: exit 2."""


# --------------------------------------------------------------------------- in a run


class _AugmentedShapes:
    """A small map-style dataset whose items are randomly augmented on every access.

    A plain class at module level (not a torch Dataset subclass) so that DataLoader workers
    started with spawn or forkserver can unpickle it without this module importing torch.
    """

    def __init__(self, size: int) -> None:
        torch = _torch()
        # Drawn from torch's global generator, which only the hook has seeded.
        self.images = torch.randn(size, 1, 12, 12)
        self.tokens = torch.randint(0, 32, (size, 6))
        self.labels = torch.randint(0, 4, (size,))

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[Any, Any, Any]:
        import random

        torch = _torch()
        # Python's random and torch's RNG inside a worker: seeded per worker by DataLoader
        # from a base seed that the main process draws from the hook-seeded generator.
        image = self.images[index]
        if random.random() < 0.5:  # noqa: S311 - augmentation, not cryptography
            image = image.flip(-1)
        image = torch.roll(image, random.randint(-2, 2), dims=-2)  # noqa: S311
        image = image + 0.1 * torch.randn_like(image)
        return image, self.tokens[index], self.labels[index]


def _torch() -> Any:
    """torch, imported where a run needs it (never in the parent), and typed loosely.

    torch's own annotations are partial (``Tensor.backward`` has none), and this file is
    checked with mypy --strict: the small training loop reads better without casts.
    """
    import torch

    return torch


def _model(torch: Any) -> Any:
    nn = torch.nn
    functional = torch.nn.functional
    module: Any = nn.Module

    class Net(module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 8, 3, padding=1)
            self.embed = nn.Embedding(32, 16)
            self.hidden = nn.Linear(8 * 6 * 6 + 16, 64)
            self.dropout = nn.Dropout(0.2)
            self.out = nn.Linear(64, 4)

        def forward(self, images: Any, tokens: Any) -> Any:
            features = functional.max_pool2d(functional.relu(self.conv(images)), 2).flatten(1)
            # Bag of token embeddings by scatter: index_add into each sample's row.
            batch, length = tokens.shape
            owner = torch.arange(batch, device=tokens.device).repeat_interleave(length)
            bags = torch.zeros(batch, 16, device=tokens.device)
            bags = bags.index_add(0, owner, self.embed(tokens.flatten()))
            hidden = self.dropout(functional.relu(self.hidden(torch.cat([features, bags], 1))))
            return self.out(hidden)

    return Net()


def _chaos_term(torch: Any) -> Any:
    """A sum whose low bits change from call to call: atomic adds racing on two threads."""
    strict = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    threads = torch.get_num_threads()
    torch.set_deterministic_debug_mode(0)
    torch.set_num_threads(max(2, threads))
    try:
        n = 1 << 16
        values = torch.sin(torch.arange(n, dtype=torch.float32)) * 1000
        index = torch.zeros(n, dtype=torch.long)
        total = torch.zeros(1).index_put_((index,), values, accumulate=True)
    finally:
        torch.set_num_threads(threads)
        torch.set_deterministic_debug_mode(("warn" if warn_only else "error") if strict else 0)
    # Only the fraction: it carries the varying low bits at a size that shows in the weights.
    return (total - total.floor()) * 1e-2


def _state_sha256(torch: Any, model: Any, optimizer: Any) -> str:
    """sha256 over every tensor's bytes and every hyper-parameter, in a fixed key order."""
    digest = hashlib.sha256()

    def add(name: str, value: Any) -> None:
        if isinstance(value, torch.Tensor):
            tensor = value.detach().to("cpu").contiguous().reshape(-1)
            digest.update(f"{name}:{tensor.dtype}:{tuple(value.shape)}\n".encode())
            digest.update(bytes(tensor.view(torch.uint8).tolist()))
        else:
            digest.update(f"{name}={value!r}\n".encode())

    for key, tensor in sorted(model.state_dict().items()):
        add(f"model.{key}", tensor)
    saved = optimizer.state_dict()
    for index, slots in sorted(saved["state"].items()):
        for key, value in sorted(slots.items()):
            add(f"optimizer.state.{index}.{key}", value)
    for number, group in enumerate(saved["param_groups"]):
        for key, value in sorted(group.items()):
            add(f"optimizer.group.{number}.{key}", value)
    return digest.hexdigest()


def _device_class(torch: Any, device: Any) -> str:
    if device.type == "cuda":
        properties = torch.cuda.get_device_properties(device)
        sm = f"{properties.major}{properties.minor}"
        return f"cuda-sm{sm}-{properties.multi_processor_count}sm"
    # Beside this file and the hook (mypy checks it on its own): CPUID and the pins seen.
    import reprobox_cpu  # type: ignore[import-not-found]

    return str(reprobox_cpu.device_class(os.environ))


def _probe_deterministic_mode(torch: Any, device: Any) -> dict[str, Any]:
    """Run ops that have no deterministic implementation: strict mode must refuse them."""
    import warnings

    probes: dict[str, Callable[[], object]] = {
        # put_ without accumulate raises under strict mode on CPU (checked on torch 2.13).
        "cpu": lambda: torch.zeros(4).put_(torch.tensor([0, 0]), torch.tensor([1.0, 2.0])),
    }
    if device.type == "cuda":
        probes["cuda"] = lambda: torch.histc(torch.ones(8, device=device), bins=4)
    outcomes = {}
    for name, probe in probes.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                probe()
            except RuntimeError as error:
                outcomes[name] = "raised" if "deterministic" in str(error) else f"failed: {error}"
                continue
        warned = any("deterministic" in str(w.message) for w in caught)
        outcomes[name] = "warned" if warned else "ran"
    return outcomes


def _cpu_facts() -> dict[str, Any]:
    import reprobox_cpu

    return dict(reprobox_cpu.cpu_facts())


def _environment(torch: Any, device: Any) -> dict[str, Any]:
    """What this interpreter saw: device, versions, settings, and the probe's outcome."""
    hook = sys.modules.get("reprobox_hook")
    cudnn = torch.backends.cudnn
    return {
        "device_class": _device_class(torch, device),
        "versions": {
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "cudnn": cudnn.version() if cudnn.is_available() else None,
            "python": platform.python_version(),
        },
        "settings": {
            "env": {name: os.environ.get(name) for name in _ENV_SEEN},
            "torch": {
                "deterministic_algorithms": torch.are_deterministic_algorithms_enabled(),
                "warn_only": torch.is_deterministic_algorithms_warn_only_enabled(),
                "cudnn_deterministic": cudnn.deterministic,
                "cudnn_benchmark": cudnn.benchmark,
                "fill_uninitialized_memory": torch.utils.deterministic.fill_uninitialized_memory,
                "num_threads": torch.get_num_threads(),
                "num_interop_threads": torch.get_num_interop_threads(),
                "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            },
            "cpu": _cpu_facts(),
            "hook": hook.state() if hook is not None else None,
        },
        # Last: the probe must not touch anything the runs compare.
        "probe": _probe_deterministic_mode(torch, device),
    }


def _pick_device(torch: Any, name: str) -> Any:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def _chaos() -> str:
    chaos = os.environ.get(_CHAOS, "")
    if chaos not in ("", "index_put"):
        raise _UsageError(f"{_CHAOS}={chaos!r}: the only chaos there is is 'index_put'")
    return chaos


def _train(steps: int, device_name: str) -> dict[str, Any]:
    torch = _torch()
    device = _pick_device(torch, device_name)
    chaos = _chaos()
    dataset = _AugmentedShapes(256)
    loader = torch.utils.data.DataLoader(
        dataset, batch_size=16, shuffle=True, num_workers=2, persistent_workers=True
    )
    model = _model(torch).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=1e-2)
    losses: list[str] = []
    batches = iter(loader)
    model.train()
    while len(losses) < steps:
        try:
            images, tokens, labels = next(batches)
        except StopIteration:  # a new epoch: the sampler reshuffles
            batches = iter(loader)
            continue
        logits = model(images.to(device), tokens.to(device))
        loss = torch.nn.functional.cross_entropy(logits, labels.to(device))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if chaos:
            # Into a hidden layer's weights: a constant added to every logit would cancel
            # out of the cross-entropy and prove nothing.
            with torch.no_grad():
                model.hidden.weight.add_(_chaos_term(torch).to(device))
        losses.append(float(loss.item()).hex())
    del batches, loader  # stop the workers before the probe runs
    return {
        "losses": losses,
        "state_sha256": _state_sha256(torch, model, optimizer),
        **_environment(torch, device),
    }


def _probe(device_name: str) -> dict[str, Any]:
    torch = _torch()
    return _environment(torch, _pick_device(torch, device_name))


# --------------------------------------------------------------------------- the parent


class _Child:
    """This file started in a fresh interpreter, its output going to a file in `workdir`."""

    def __init__(self, arguments: list[str], workdir: Path, label: str) -> None:
        self.label = label
        self.result, self.log = workdir / f"{label}.json", workdir / f"{label}.log"
        command = [sys.executable, str(Path(__file__).resolve()), *arguments]
        with self.log.open("wb") as output:  # a file, not a pipe: no deadlock on a chatty run
            self.process = subprocess.Popen(
                [*command, "--result", str(self.result)],
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=output,
            )

    def outcome(self) -> dict[str, Any]:
        """Wait; return what the child wrote, or why it wrote nothing."""
        returncode = self.process.wait()
        if returncode != 0 or not self.result.exists():
            tail = self.log.read_text(encoding="utf-8", errors="replace")[-_TAIL:]
            return {"error": f"{self.label} exited with {returncode}", "stderr_tail": tail}
        loaded: dict[str, Any] = json.loads(self.result.read_text(encoding="utf-8"))
        return loaded


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _fingerprint(evidence: dict[str, Any]) -> str:
    return _sha256(json.dumps(evidence, sort_keys=True, separators=(",", ":")).encode())


def _first_loss_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    for step, (loss_a, loss_b) in enumerate(zip(a["losses"], b["losses"], strict=False), 1):
        if loss_a != loss_b:
            return {"step": step, "what": "loss", "a": loss_a, "b": loss_b}
    if len(a["losses"]) != len(b["losses"]):
        count_a, count_b = str(len(a["losses"])), str(len(b["losses"]))
        return {"step": None, "what": "number of steps", "a": count_a, "b": count_b}
    if a["state_sha256"] != b["state_sha256"]:
        step = len(a["losses"])
        return {"step": step, "what": "final state", "a": a["state_sha256"], "b": b["state_sha256"]}
    return None


def _check_training(steps: int, device: str, workdir: Path) -> dict[str, Any]:
    arguments = ["--train", "--steps", str(steps), "--device", device]
    # Side by side: most of a run is importing torch, the runs share nothing, and each
    # reads its thread counts from the same environment either way.
    children = [_Child(arguments, workdir, label) for label in ("run-1", "run-2")]
    runs = [child.outcome() for child in children]
    report: dict[str, Any] = {"mode": "training", "steps": steps}
    failures = [f"{run['error']}: {run['stderr_tail']}" for run in runs if "error" in run]
    if failures:
        return {**report, **_nothing_seen(), "runs": runs, "failures": failures}
    first, second = runs
    evidence = {
        "losses": first["losses"],
        "state_sha256": first["state_sha256"],
        "device_class": first["device_class"],
    }
    return {
        **report,
        **_environment_part(first),
        "fingerprint": _fingerprint(evidence),
        "runs": [{"losses": r["losses"], "state_sha256": r["state_sha256"]} for r in runs],
        "first_difference": _first_loss_difference(first, second),
        "failures": [],
    }


def _nothing_seen() -> dict[str, Any]:
    """The report's keys for a check that never got as far as a result."""
    keys = ("device_class", "versions", "settings", "probe", "fingerprint", "first_difference")
    return dict.fromkeys(keys)


def _environment_part(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("device_class", "versions", "settings", "probe")
    return {key: run[key] for key in keys}


def _output_files(directory: Path) -> dict[str, str]:
    return {
        path.relative_to(directory).as_posix(): _sha256(path.read_bytes())
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    }


def _run_script(script: Path, output: Path) -> dict[str, Any]:
    output.mkdir(parents=True, exist_ok=True)
    completed = subprocess.run(
        [sys.executable, str(script), str(output)],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        env={**os.environ, "REPROBOX_OUTPUT_DIR": str(output)},
        check=False,
    )
    return {
        "returncode": completed.returncode,
        "stdout": completed.stdout,
        "stderr_tail": completed.stderr.decode("utf-8", "replace")[-_TAIL:],
        "files": _output_files(output),
    }


def _first_script_difference(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    if a["stdout"] != b["stdout"]:
        lines_a, lines_b = a["stdout"].splitlines(), b["stdout"].splitlines()
        for line_a, line_b in zip([*lines_a, b""], [*lines_b, b""], strict=False):
            if line_a != line_b:
                shown = (
                    line_a.decode("utf-8", "replace")[:200],
                    line_b.decode("utf-8", "replace")[:200],
                )
                return {"step": None, "what": "stdout", "a": shown[0], "b": shown[1]}
    for name in sorted(set(a["files"]) | set(b["files"])):
        hash_a, hash_b = a["files"].get(name, "missing"), b["files"].get(name, "missing")
        if hash_a != hash_b:
            return {"step": None, "what": f"file {name}", "a": hash_a, "b": hash_b}
    return None


def _check_script(script: Path, output_dir: Path, device: str, workdir: Path) -> dict[str, Any]:
    if not script.is_file():
        raise _UsageError(f"--script {script}: no such file")
    outputs = [output_dir / f"run-{n}" for n in (1, 2)]
    for output in outputs:
        if output.exists() and any(output.iterdir()):
            raise _UsageError(f"{output} is not empty; each run needs an empty output directory")
    # The probe imports torch while the script runs; the script's runs go one at a time,
    # since a user's script may share more than its output directory (a cache, a port).
    prober = _Child(["--probe", "--device", device], workdir, "probe")
    runs = [_run_script(script, output) for output in outputs]
    probe = prober.outcome()
    report: dict[str, Any] = {"mode": "script", "script": str(script)}
    failures = [
        f"run {n} of {script.name} exited with {run['returncode']}: {run['stderr_tail']}"
        for n, run in enumerate(runs, 1)
        if run["returncode"] != 0
    ]
    if "error" in probe:
        failures.append(f"{probe['error']}: {probe['stderr_tail']}")
        return {**report, **_nothing_seen(), "runs": [], "failures": failures}
    summaries = [{"stdout_sha256": _sha256(run["stdout"]), "files": run["files"]} for run in runs]
    evidence = {**summaries[0], "device_class": probe["device_class"]}
    return {
        **report,
        **_environment_part(probe),
        "fingerprint": _fingerprint(evidence),
        "runs": summaries,
        "first_difference": _first_script_difference(*runs),
        "failures": failures,
    }


def _judge(report: dict[str, Any]) -> dict[str, Any]:
    """Add deterministic_mode_verified and passed; say why a check failed."""
    failures: list[str] = report["failures"]
    env = (report["settings"] or {}).get("env", {})
    asked = (env.get("REPROBOX_DETERMINISTIC") or "1").strip().lower() not in ("0", "false", "no")
    strict = (env.get("REPROBOX_WARN_ONLY") or "0").strip().lower() in ("0", "false", "no")
    probe = report["probe"] or {}
    expected = "raised" if strict else "warned"
    verified = bool(probe) and all(outcome == expected for outcome in probe.values())
    report["deterministic_mode_verified"] = verified
    if asked and probe and not verified:
        failures.append(
            f"deterministic mode was asked for (warn_only={int(not strict)}) but is not on: "
            f"ops without a deterministic implementation gave {probe}, expected {expected}"
        )
    difference = report["first_difference"]
    if difference is not None:
        where = "" if difference["step"] is None else f" at step {difference['step']}"
        failures.append(f"the runs differ{where}: {difference['what']}")
    report["passed"] = not failures
    return report


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="reprobox_selfcheck",
        description="Train twice in fresh interpreters and compare the runs bit for bit.",
    )
    parser.add_argument("--steps", type=int, default=20, help="training steps per run")
    parser.add_argument("--script", type=Path, help="a training script to run twice instead")
    parser.add_argument("--output-dir", type=Path, help="where --script runs write (run-1, run-2)")
    parser.add_argument("--json-out", type=Path, help="also write the report to this file")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    # Internal: what the parent asks of each fresh interpreter.
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def _run_in_child(args: argparse.Namespace) -> None:
    if args.result is None:
        raise _UsageError("--result is required with --train and --probe")
    child = _train(args.steps, args.device) if args.train else _probe(args.device)
    args.result.write_text(json.dumps(child), encoding="utf-8")


def _check(args: argparse.Namespace) -> dict[str, Any]:
    _chaos()
    if args.steps < 1:
        raise _UsageError("--steps must be at least 1")
    if (args.script is None) != (args.output_dir is None):
        raise _UsageError("--script and --output-dir go together")
    with tempfile.TemporaryDirectory(prefix="reprobox-selfcheck-") as scratch:
        if args.script is not None:
            report = _check_script(args.script, args.output_dir, args.device, Path(scratch))
        else:
            report = _check_training(args.steps, args.device, Path(scratch))
    return _judge(report)


def main(argv: list[str] | None = None) -> int:
    """Run the self-check; print the JSON report; 0 pass, 1 fail, 2 usage error."""
    parser = _parser()
    args = parser.parse_args(argv)
    started = time.perf_counter()
    try:
        if args.train or args.probe:
            _run_in_child(args)
            return 0
        report = _check(args)
    except _UsageError as error:
        parser.print_usage(sys.stderr)
        sys.stderr.write(f"reprobox_selfcheck: error: {error}\n")
        return 2
    report["seconds"] = round(time.perf_counter() - started, 3)
    text = json.dumps(report, indent=2, sort_keys=True)
    if args.json_out is not None:
        args.json_out.write_text(text + "\n", encoding="utf-8")
    print(text)
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
