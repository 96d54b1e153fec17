"""`determinism.cpu` on the host side: the ENV that pins an image's CPU code paths.

The in-image half (templates/image/reprobox_cpu.py) lowers these pins on hosts that cannot run
them and names the device class; its `PINS["v3"]` row must equal `PORTABLE_X86_64` (a test
holds them together). What each variable selects, and what it costs, is in docs/cpu.md.
"""

from __future__ import annotations

from packaging.version import InvalidVersion, Version

__all__ = ["CPU_ENV", "NUMPY_ABOVE_V3", "PORTABLE_X86_64", "cpu_env"]

#: x86-64-v3 (AVX2 + FMA) for every selector torch's and numpy's libraries have: ATen's
#: kernels, oneDNN, MKL (COMPATIBLE: the one branch that runs the same code on Intel and AMD)
#: and OpenBLAS (numpy's BLAS; torch's on aarch64).
PORTABLE_X86_64 = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "COMPATIBLE",
    "OPENBLAS_CORETYPE": "Haswell",
}
#: numpy 2.4's own SIMD loops above v3 (its wheels dispatch X86_V3, X86_V4, AVX512_ICL,
#: AVX512_SPR); earlier numpy names them differently and warns about names it does not know.
NUMPY_ABOVE_V3 = "X86_V4 AVX512_ICL AVX512_SPR"
_NUMPY_NAMES_FROM = Version("2.4")

#: Every variable `cpu_env` may set: the spec's `env` may not set them.
CPU_ENV = frozenset({"REPROBOX_CPU", *PORTABLE_X86_64, "NPY_DISABLE_CPU_FEATURES"})


def cpu_env(setting: str, arch: str, numpy_version: str | None) -> dict[str, str]:
    """The ENV for `determinism.cpu: setting` in an image for `arch` with that numpy (if any).

    `native` sets only REPROBOX_CPU (the libraries pick the host's best code paths); `portable`
    pins x86-64-v3 on x86_64 and nothing yet on other architectures.
    """
    env = {"REPROBOX_CPU": setting}
    if setting != "portable" or arch != "x86_64":
        return env
    env |= PORTABLE_X86_64
    try:
        numpy = Version(numpy_version) if numpy_version is not None else None
    except InvalidVersion:
        numpy = None
    if numpy is not None and numpy >= _NUMPY_NAMES_FROM:
        env["NPY_DISABLE_CPU_FEATURES"] = NUMPY_ABOVE_V3
    return env
