"""A corpus of real stacks, torch 2.1 to 2.13: each must lock, hashed and sized, with torch and its
CUDA / cuDNN as the spec says (`network`: PyPI's metadata only, no CUDA wheel is downloaded).

The stacks are what papers and fine-tuning repositories pin (transformers, accelerate, peft,
datasets, sentencepiece) on Python 3.10 to 3.12. Python 3.11 stacks bootstrap Debian bookworm;
the others name a `base.image` by digest, which the lock never pulls (it assumes glibc 2.28), so
the digest is a stand-in. CPU builds older than 2.13 live only on PyTorch's index, which these
machines cannot reach, so the older stacks lock PyPI's default CUDA builds. All stacks are locked
at once by a module fixture, a few pip runs in parallel.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import pytest

from reprobox.errors import LockError
from reprobox.lock import resolve
from reprobox.locked import Lock
from reprobox.spec import Spec
from reprobox.spec_load import parse_spec

_IMAGE = "python:{python}-slim-bookworm@sha256:" + "5" * 64
_PARALLEL = 6


@dataclass(frozen=True)
class Stack:
    name: str
    python: str
    torch: str
    cuda: str
    transformers: str
    packages: tuple[str, ...] = ()
    cudnn: str | None = None
    refused: str | None = None  # the stack must not lock: the error says this

    def spec(self) -> Spec:
        base = (
            'bootstrap: "debian:bookworm"'
            if self.python == "3.11"
            else f'image: "{_IMAGE.format(python=self.python)}"'
        )
        cudnn = f', cudnn: "{self.cudnn}"' if self.cudnn else ""
        packages = "".join(f'\n  - "{pin}"' for pin in self.packages)
        return parse_spec(
            f'version: 1\nname: {self.name}\nbase: {{{base}}}\npython: "{self.python}"\n'
            f'torch: {{version: "{self.torch}", cuda: "{self.cuda}"{cudnn}}}\n'
            f'transformers: "{self.transformers}"\npackages:{packages or " []"}\n'
        )


STACKS = (
    # The seeds' example: it failed to lock (safetensors' unrequested 'torch' extra).
    Stack("seeds-torch-2-1", "3.11", "2.1.2", "12.1", "4.36.2"),
    Stack("torch-2-2-py310", "3.10", "2.2.2", "12.1", "4.38.2",
          ("accelerate==0.27.2", "datasets==2.18.0", "numpy==1.26.4")),
    Stack("torch-2-3-py312", "3.12", "2.3.1", "12.1", "4.41.2",
          ("peft==0.11.1", "accelerate==0.30.1", "sentencepiece==0.2.0", "numpy==1.26.4")),
    Stack("torch-2-4-py311", "3.11", "2.4.1", "12.1", "4.44.2",
          ("accelerate==0.33.0", "datasets==2.21.0")),
    Stack("torch-2-5-py312", "3.12", "2.5.1", "12.4", "4.46.3",
          ("peft==0.13.2", "sentencepiece==0.2.0"), cudnn="9.1.0.70"),
    Stack("torch-2-6-py310", "3.10", "2.6.0", "12.4", "4.49.0",
          ("accelerate==1.4.0", "datasets==3.3.2")),
    Stack("torch-2-7-py311", "3.11", "2.7.1", "12.6", "4.53.3",
          ("peft==0.15.2", "accelerate==1.7.0")),
    Stack("torch-2-8-py312", "3.12", "2.8.0", "12.8", "4.55.4",
          ("accelerate==1.10.0", "datasets==4.0.0")),
    Stack("torch-2-9-py310", "3.10", "2.9.1", "12.8", "4.57.1",
          ("peft==0.17.1", "sentencepiece==0.2.1")),
    Stack("torch-2-11-py311", "3.11", "2.11.0", "13.0", "5.5.0", ("accelerate==1.12.0",)),
    Stack("torch-2-13-cpu", "3.11", "2.13.0", "cpu", "5.24.0",
          ("accelerate==1.15.0", "peft==0.21.2", "datasets==5.2.0", "sentencepiece==0.2.3")),
    # A real mismatch: transformers 4.52 asks for torch<2.7 through its 'torch' extra.
    Stack("refused-transformers-4-52-on-torch-2-7", "3.11", "2.7.1", "12.6", "4.52.4",
          refused="transformers 4.52.4 needs torch<2.7,>=2.1 (through its 'torch' extra), but the "
          "spec pins torch 2.7.1"),
)  # fmt: skip


@dataclass(frozen=True)
class _Locked:
    lock: Lock | None
    error: Exception | None
    seconds: float


def _lock(stack: Stack) -> _Locked:
    started = time.monotonic()
    try:
        return _Locked(resolve(stack.spec()), None, time.monotonic() - started)
    except Exception as exc:  # reported by the stack's own test
        return _Locked(None, exc, time.monotonic() - started)


@pytest.fixture(scope="module")
def corpus() -> Mapping[str, _Locked]:
    """Every stack locked once, `_PARALLEL` at a time."""
    with ThreadPoolExecutor(max_workers=_PARALLEL) as pool:
        return dict(zip((s.name for s in STACKS), pool.map(_lock, STACKS), strict=True))


@pytest.mark.network
@pytest.mark.parametrize("stack", STACKS, ids=[s.name for s in STACKS])
def test_network_a_real_stack_locks_as_its_spec_says(
    stack: Stack, corpus: Mapping[str, _Locked]
) -> None:
    locked = corpus[stack.name]
    if stack.refused is not None:
        assert isinstance(locked.error, LockError), locked.error
        assert stack.refused in locked.error.message
        return
    if locked.error is not None:
        raise locked.error
    lock = locked.lock
    assert lock is not None
    assert lock.python == stack.python
    torch = lock.wheel("torch")
    assert torch is not None
    assert torch.version == (stack.torch + "+cpu" if stack.cuda == "cpu" else stack.torch)
    transformers = lock.wheel("transformers")
    assert transformers is not None
    assert transformers.version == stack.transformers
    for pin in stack.packages:
        name, version = pin.split("==")
        wheel = lock.wheel(name)
        assert wheel is not None, pin
        assert wheel.version == version, pin
    for wheel in lock.wheels:
        assert len(wheel.sha256) == 64, wheel.name
        assert wheel.size is not None, wheel.name
        assert wheel.size > 0, wheel.name
        assert wheel.filename.endswith(".whl"), wheel.name
    if stack.cuda == "cpu":
        assert (lock.torch_cuda, lock.torch_cudnn) == (None, None)
        assert not any(w.name.startswith("nvidia-") for w in lock.wheels)
    else:
        assert lock.torch_cuda is not None
        assert lock.torch_cuda.startswith(stack.cuda + ".")
        assert lock.torch_cudnn is not None
        cudnn = next(w for w in lock.wheels if w.name.startswith("nvidia-cudnn"))
        assert (cudnn.version, cudnn.group) == (lock.torch_cudnn, "torch")
    if stack.cudnn is not None:
        assert lock.torch_cudnn == stack.cudnn
