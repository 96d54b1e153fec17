"""reprobox self-check: train twice in fresh interpreters and compare the runs bit for bit.

The parent process uses the standard library only. It starts each run as a new interpreter
(``sys.executable``, the same environment), the way a user's program starts, so what makes
the runs reproducible is the image's ENV and the seed-on-import hook: nothing here seeds an
RNG or sets a determinism flag. Each training run exercises dropout, a shuffling DataLoader
with two workers and random augmentation, a convolution, matmuls, an embedding, an
index_add scatter and AdamW, and records every step's loss (float.hex) and a sha256 of the
final model and optimizer state.

``python reprobox_selfcheck.py --steps N [--device auto|cpu|cuda] [--script PATH --output-dir DIR]
[--json-out FILE]`` prints a JSON report; exit 0 when the runs match, 1 when they differ or
deterministic mode is asked for and not on, 2 on a usage error, 3 when ``--device cuda`` finds
no usable GPU (the report's ``device_missing`` says why: never a CPU run in its place).

REPROBOX_SELFCHECK_CHAOS adds a genuinely nondeterministic term to training, the negative
control that shows the check can fail: ``index_put`` races CPU threads (index_put_ with
accumulate, 2 threads), ``index_add`` races CUDA atomics (index_add_ and scatter_add_ into one
element from many threads; needs ``--device cuda``).
"""

import argparse
import hashlib
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import threading
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
    "REPROBOX_INFERENCE_CHAOS",
)
_CHAOS = "REPROBOX_SELFCHECK_CHAOS"
_CHAOS_KINDS = {"index_put": "cpu", "index_add": "cuda"}  # chaos -> the device it races on
_TAIL = 2000  # characters of a failed run's stderr kept in the report
_EXIT_DEVICE_MISSING = 3


class _UsageError(Exception):
    """Bad arguments: exit 2."""


class _DeviceMissingError(Exception):
    """--device cuda, and no GPU torch can use here: exit 3, never a CPU run instead."""


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


def _chaos_term(torch: Any, device: Any) -> Any:
    """A sum whose low bits change from call to call: racing atomic adds."""
    if _chaos() == "index_add":
        return _cuda_chaos_term(torch, device)
    return _cpu_chaos_term(torch)


def _cuda_chaos_term(torch: Any, device: Any) -> Any:
    """CUDA atomics: index_add_ and scatter_add_ of 2**20 values into one element.

    With deterministic mode off both use atomicAdd, whose order (so the float32 rounding)
    follows thread scheduling. Probabilistic, like any race: every step adds a new draw.
    """
    strict = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_deterministic_debug_mode(0)
    try:
        n = 1 << 20
        values = torch.sin(torch.arange(n, dtype=torch.float32, device=device)) * 1000
        index = torch.zeros(n, dtype=torch.long, device=device)
        added = torch.zeros(1, device=device).index_add_(0, index, values)
        scattered = torch.zeros(1, device=device).scatter_add_(0, index, values)
        total = added + scattered
    finally:
        torch.set_deterministic_debug_mode(("warn" if warn_only else "error") if strict else 0)
    return (total - total.floor()) * 1e-2


def _cpu_chaos_term(torch: Any) -> Any:
    """CPU threads: index_put_ with accumulate, two threads adding into one element at once.

    Two Python threads (torch lets go of the GIL), each allowed onto every CPU of this host:
    torch's own second thread would be bound by GOMP_CPU_AFFINITY, and an image's list of one
    CPU puts it on the first thread's CPU, where the two take turns instead of racing
    (measured: 1 distinct sum in 200 calls there, about 110 with two CPUs).
    """
    strict = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.set_deterministic_debug_mode(0)
    try:
        n = 1 << 20
        values = torch.sin(torch.arange(n, dtype=torch.float32)) * 1000
        index = torch.zeros(n // 2, dtype=torch.long)
        total = torch.zeros(1)
        start = threading.Barrier(2)

        def add(part: Any) -> None:
            if hasattr(os, "sched_setaffinity"):  # this thread only; the kernel keeps cpusets
                os.sched_setaffinity(0, range(os.cpu_count() or 1))
            start.wait()
            total.index_put_((index,), part, accumulate=True)

        workers = [threading.Thread(target=add, args=(half,)) for half in values.chunk(2)]
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join()
    finally:
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


def _gpu(torch: Any, device: Any) -> dict[str, Any] | None:
    """The GPU a CUDA run used, and the driver under it: what explains a cross-host mismatch."""
    if device.type != "cuda":
        return None
    properties = torch.cuda.get_device_properties(device)
    return {
        "name": properties.name,
        "compute_capability": f"{properties.major}.{properties.minor}",
        "sm_count": properties.multi_processor_count,
        "memory_bytes": properties.total_memory,
        "driver": _nvidia_driver(),
        "driver_cuda": _driver_cuda(),
    }


def _nvidia_driver() -> str | None:
    """The NVIDIA driver's version, from NVML (the toolkit mounts it) or the kernel module."""
    import ctypes

    try:
        nvml = ctypes.CDLL("libnvidia-ml.so.1")
        if nvml.nvmlInit_v2() == 0:
            buffer = ctypes.create_string_buffer(96)
            found = nvml.nvmlSystemGetDriverVersion(buffer, len(buffer)) == 0
            nvml.nvmlShutdown()
            if found:
                return str(buffer.value.decode("ascii", "replace"))
    except (OSError, AttributeError):
        pass
    try:
        text = Path("/proc/driver/nvidia/version").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return None
    found = re.search(r"Kernel Module(?:\s+for\s+\S+)?\s+(\d+(?:\.\d+)+)", text)
    return found[1] if found else None


def _driver_cuda() -> str | None:
    """The newest CUDA the driver supports (cuDriverGetVersion), e.g. '12.4'."""
    import ctypes

    try:
        version = ctypes.c_int(0)
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) != 0:
            return None
    except (OSError, AttributeError):
        return None
    return f"{version.value // 1000}.{version.value % 1000 // 10}"


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
        probes["cuda"] = lambda: _cuda_probe(torch, device)
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


def _cuda_probe(torch: Any, device: Any) -> None:
    # histc first; AvgPool3d's backward in case a release gave histc a deterministic kernel
    # (which ops raise changes between releases). Under strict mode the first one raises.
    torch.histc(torch.ones(8, device=device), bins=4)
    volume = torch.ones(1, 1, 4, 4, 4, device=device, requires_grad=True)
    torch.nn.functional.avg_pool3d(volume, 2).sum().backward()


def _cpu_facts() -> dict[str, Any]:
    import reprobox_cpu

    return dict(reprobox_cpu.cpu_facts())


def _environment(torch: Any, device: Any) -> dict[str, Any]:
    """What this interpreter saw: device, versions, settings, and the probe's outcome."""
    hook = sys.modules.get("reprobox_hook")
    cudnn = torch.backends.cudnn
    return {
        "device_class": _device_class(torch, device),
        "gpu": _gpu(torch, device),
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
    elif name == "cuda":
        missing = _cuda_missing(torch)
        if missing is not None:
            raise _DeviceMissingError(missing)
    return torch.device(name)


def _cuda_missing(torch: Any) -> str | None:
    """Why torch cannot train on a GPU here, or None when it can."""
    if torch.version.cuda is None:
        return f"torch {torch.__version__} here is a CPU build: it has no CUDA"
    try:
        torch.cuda.init()  # raises with torch's own reason: no driver, a driver too old...
    except Exception as error:  # RuntimeError or AssertionError: reported whole
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) cannot use CUDA: {error}"
    if torch.cuda.device_count() < 1:
        return f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
    return None


def _chaos() -> str:
    chaos = os.environ.get(_CHAOS, "")
    if chaos and chaos not in _CHAOS_KINDS:
        known = ", ".join(repr(kind) for kind in _CHAOS_KINDS)
        raise _UsageError(f"{_CHAOS}={chaos!r}: the chaos there is: {known}")
    return chaos


def _train(steps: int, device_name: str) -> dict[str, Any]:
    torch = _torch()
    device = _pick_device(torch, device_name)
    chaos = _chaos()
    if chaos and _CHAOS_KINDS[chaos] != device.type:
        raise _UsageError(f"{_CHAOS}={chaos} races on {_CHAOS_KINDS[chaos]}, not {device.type}")
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
                model.hidden.weight.add_(_chaos_term(torch, device).to(device))
        losses.append(float(loss.item()).hex())
    del batches, loader  # stop the workers before the probe runs
    return {
        "losses": losses,
        "state_sha256": _state_sha256(torch, model, optimizer),
        # The CPUs this run's main thread may use once torch loaded (libgomp places it).
        "cpus": sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
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


def _device_missing(report: dict[str, Any], outcomes: list[dict[str, Any]]) -> dict[str, Any]:
    """The report of a check that never started: the device it was told to use is not here."""
    reason = next(o["device_missing"] for o in outcomes if "device_missing" in o)
    failures = [f"--device cuda: no usable GPU: {reason}"]
    return {**report, **_nothing_seen(), "runs": [], "device_missing": reason, "failures": failures}


def _side_by_side(arguments: list[str], workdir: Path) -> list[_Child]:
    """Both runs at once: most of a run is importing torch, the runs share nothing, and each
    reads its thread counts from the same environment either way.

    GOMP_CPU_AFFINITY pins each run to the CPUs it names once torch loads, so two runs would
    take turns there (affinity "0", one thread: 6.5 s for the pair on 2 CPUs, 3.1 s unpinned).
    Where the hook says enough CPUs are left beside those (`spare_cpus`), the second run starts
    on them and its hook maps the list there, as on any host whose CPUs the list does not name;
    the first run, whose settings the report shows, starts as the image's user would. The
    thread count is fixed by OMP_NUM_THREADS in both (spare_cpus asks for it), and
    `_placement_failures` says so if the two runs saw different settings all the same.
    """
    hook = sys.modules.get("reprobox_hook")
    spare_cpus: Callable[[], list[int]] | None = getattr(hook, "spare_cpus", None)
    spare = spare_cpus() if spare_cpus is not None else []
    children: list[_Child] = []
    try:
        children.append(_Child(arguments, workdir, "run-1"))
        children.append(_started_on(spare, arguments, workdir, "run-2"))
    except BaseException:
        for child in children:  # never a run left behind in a folder about to be removed
            child.process.kill()
            child.process.wait()
        raise
    return children


def _started_on(cpus: list[int], arguments: list[str], workdir: Path, label: str) -> _Child:
    """A run started with `cpus` as its CPU mask (inherited); as it is, if that cannot be set."""
    if not cpus:
        return _Child(arguments, workdir, label)
    allowed = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, cpus)  # this thread's mask only; the child inherits it
    except OSError:  # a seccomp profile, a cpuset changed meanwhile: side by side as they are
        return _Child(arguments, workdir, label)
    try:
        return _Child(arguments, workdir, label)
    finally:
        os.sched_setaffinity(0, allowed)


def _placement_failures(runs: list[dict[str, Any]]) -> list[str]:
    """The settings placement must not change, where the second run saw others than the first
    (the check's own doing, not the image's: said so, not left to read as a difference)."""
    first, second = runs

    def seen(run: dict[str, Any]) -> dict[str, Any]:
        torch = run["settings"]["torch"]
        return {
            "device class": run["device_class"],
            "thread count": torch["num_threads"],
            "CPU capability": torch["cpu_capability"],
        }

    pairs = [(name, a, seen(second)[name]) for name, a in seen(first).items()]
    return [
        f"the second run, started on CPUs {second.get('cpus')}, saw {name} {b!r} where the "
        f"first saw {a!r}"
        for name, a, b in pairs
        if a != b
    ]


def _check_training(steps: int, device: str, workdir: Path) -> dict[str, Any]:
    arguments = ["--train", "--steps", str(steps), "--device", device]
    runs = [child.outcome() for child in _side_by_side(arguments, workdir)]
    report: dict[str, Any] = {"mode": "training", "steps": steps}
    if any("device_missing" in run for run in runs):
        return _device_missing(report, runs)
    failures = [f"{run['error']}: {run['stderr_tail']}" for run in runs if "error" in run]
    if failures:
        return {**report, **_nothing_seen(), "runs": runs, "failures": failures}
    first, second = runs
    placement = _placement_failures(runs)
    evidence = {
        "losses": first["losses"],
        "state_sha256": first["state_sha256"],
        "device_class": first["device_class"],
        **_cpu_side(first),
    }
    return {
        **report,
        **_environment_part(first),
        "fingerprint": _fingerprint(evidence),
        "runs": [{"losses": r["losses"], "state_sha256": r["state_sha256"]} for r in runs],
        "run_cpus": [r.get("cpus") for r in runs],
        "first_difference": _first_loss_difference(first, second),
        "device_missing": None,
        "failures": placement,
    }


def _cpu_side(run: dict[str, Any]) -> dict[str, Any]:
    """What of the CPU changes a CUDA run's results, beside the GPU's class.

    The data (torch.randn, the workers' augmentation) is made on the CPU, and ATen's kernel
    choice moves its bits; the device class names only the GPU. A CPU run's class is the CPU's.
    """
    if not str(run["device_class"]).startswith("cuda-"):
        return {}
    return {"cpu_capability": run["settings"]["torch"]["cpu_capability"]}


def _nothing_seen() -> dict[str, Any]:
    """The report's keys for a check that never got as far as a result."""
    keys = (
        "device_class",
        "gpu",
        "versions",
        "settings",
        "probe",
        "fingerprint",
        "first_difference",
        "device_missing",
    )
    return dict.fromkeys(keys)


def _environment_part(run: dict[str, Any]) -> dict[str, Any]:
    keys = ("device_class", "gpu", "versions", "settings", "probe")
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
    if "device_missing" in probe:
        return _device_missing(report, [probe])
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
        "device_missing": None,
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
    report.setdefault("run_cpus", None)  # a training check's report has them
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
    parser.add_argument(
        "--inference", action="store_true", help="also check generation (reprobox_inference.py)"
    )
    parser.add_argument(
        "--require-batch-invariance",
        action="store_true",
        help="with --inference: fail unless a prompt's output is the same alone and in batches",
    )
    parser.add_argument(
        "--inference-moe",
        action="store_true",
        help="with --inference: add the decoder with a capacity-limited mixture-of-experts layer",
    )
    # Internal: what the parent asks of each fresh interpreter.
    parser.add_argument("--train", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    return parser


def _run_in_child(args: argparse.Namespace) -> None:
    if args.result is None:
        raise _UsageError("--result is required with --train and --probe")
    try:
        child = _train(args.steps, args.device) if args.train else _probe(args.device)
    except _DeviceMissingError as missing:
        child = {"device_missing": str(missing)}
    args.result.write_text(json.dumps(child), encoding="utf-8")


def _check(args: argparse.Namespace) -> dict[str, Any]:
    chaos = _chaos()
    if chaos and args.device != "auto" and _CHAOS_KINDS[chaos] != args.device:
        raise _UsageError(f"{_CHAOS}={chaos} races on {_CHAOS_KINDS[chaos]}, not {args.device}")
    if args.steps < 1:
        raise _UsageError("--steps must be at least 1")
    if (args.script is None) != (args.output_dir is None):
        raise _UsageError("--script and --output-dir go together")
    if (args.require_batch_invariance or args.inference_moe) and not args.inference:
        raise _UsageError("--require-batch-invariance and --inference-moe go with --inference")
    with tempfile.TemporaryDirectory(prefix="reprobox-selfcheck-") as scratch:
        if args.script is not None:
            report = _check_script(args.script, args.output_dir, args.device, Path(scratch))
        else:
            report = _check_training(args.steps, args.device, Path(scratch))
        if args.inference:
            report = _check_inference(args, Path(scratch), report)
    return _judge(report)


def _check_inference(
    args: argparse.Namespace, workdir: Path, report: dict[str, Any]
) -> dict[str, Any]:
    """The generation check (reprobox_inference.py, beside this), folded into `report`."""
    import importlib.util

    path = Path(__file__).with_name("reprobox_inference.py")
    spec = importlib.util.spec_from_file_location("reprobox_inference", path)
    if spec is None or spec.loader is None or not path.is_file():
        raise _UsageError(f"--inference: {path} is missing")
    inference = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(inference)
    try:
        result = inference.check(
            workdir,
            device=args.device,
            moe=args.inference_moe,
            require_batch_invariance=args.require_batch_invariance,
        )
    except inference.UsageError as error:
        raise _UsageError(str(error)) from None
    folded: dict[str, Any] = inference.fold_into_selfcheck(report, result)
    return folded


def main(argv: list[str] | None = None) -> int:
    """Run the self-check; print the JSON report; 0 pass, 1 fail, 2 usage error, 3 no GPU."""
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
    if report["device_missing"] is not None:
        return _EXIT_DEVICE_MISSING
    return 0 if report["passed"] else 1


if __name__ == "__main__":
    sys.exit(main())
