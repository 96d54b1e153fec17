"""reprobox CPU facts: what this CPU computes with, and the device class that follows from it.

Standard library only. The seed-on-import hook uses it just before torch or numpy first load
(to lower ISA pins this CPU cannot honour), the self-check to name the device class.

The CPU is asked with the CPUID instruction itself, run from a few bytes of machine code, not
read from /proc/cpuinfo: the kernel's file describes the host even under qemu-user, while CPUID
is what torch (ATen), oneDNN, MKL and OpenBLAS dispatch on. The same code runs RCPPS and
RSQRTPS over fixed inputs: the ISA bounds their error but leaves their bits to the chip (this
AMD EPYC and qemu differ), and MKL's sqrt in its COMPATIBLE branch starts from RSQRTPS, so
hosts share a class only where those bits agree.

Device classes (two hosts share one only if the image's settings make them compute the same):

- ``cpu-x86_64-v3-rcp<8 hex>``: `determinism.cpu: portable` on an x86-64-v3 host (AVX2, FMA);
  the pins put that level into effect, Intel or AMD alike. A host below v3 gets ``v2`` or
  ``v1`` (the hook lowered the pins to what it can run).
- ``cpu-x86_64-<level>-<vendor>-native-<8 hex>-rcp<8 hex>``: `native`; the host's own code
  paths, so its vendor and a digest of its ISA extensions are part of the class.
- ``cpu-x86_64-<level>-<vendor>-custom-<8 hex>-rcp<8 hex>``: pins that match neither setting
  (changed at run time); the digest covers them.
- ``cpu-<machine>-<setting>-<8 hex>``: other architectures (aarch64), by their feature list.
"""

import os
import struct

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Callable, Mapping, MutableMapping

__all__ = [
    "ISA_VARIABLES",
    "PINS",
    "adapt_pins",
    "cpu_facts",
    "device_class",
]

#: The environment that selects CPU code paths in torch's and numpy's libraries.
ISA_VARIABLES = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "MKL_CBWR",
    "OPENBLAS_CORETYPE",
    "NPY_DISABLE_CPU_FEATURES",
)

#: `determinism.cpu: portable` per x86-64 level. The image's ENV holds the v3 row; the hook
#: lowers it to the row of the level a host can run (ATen and OpenBLAS do not check: asked for
#: AVX2 on a CPU without it, they die of SIGILL). COMPATIBLE is MKL's one branch that gives the
#: same code on Intel and AMD (AVX2 falls back to AUTO on AMD). SSE41 for every level below v3,
#: so SSE4.2 hosts with and without AVX run the same oneDNN kernels.
PINS: "dict[str, dict[str, str]]" = {
    "v3": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "COMPATIBLE",
        "OPENBLAS_CORETYPE": "Haswell",
    },
    "v2": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_CBWR": "COMPATIBLE",
        "OPENBLAS_CORETYPE": "Nehalem",
    },
    "v1": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_CBWR": "COMPATIBLE",
        "OPENBLAS_CORETYPE": "Prescott",
    },
}
#: numpy 2.4's dispatch targets above v3 (its baseline is v2); disabling targets a CPU lacks
#: is allowed, so this value holds for every level.
NUMPY_ABOVE_V3 = "X86_V4 AVX512_ICL AVX512_SPR"

# cpuid_fn(leaf, subleaf, uint32 out[4]); xgetbv_fn() -> XCR0 (only where OSXSAVE is set);
# approx_fn(const float *in, float *rsqrt_out, float *rcp_out, uint64 n), n a multiple of 4.
# Assembled from: push rbx; mov r8,rdx; mov eax,edi; mov ecx,esi; cpuid; mov [r8],eax;
# mov [r8+4],ebx; mov [r8+8],ecx; mov [r8+12],edx; pop rbx; ret | xor ecx,ecx; xgetbv;
# shl rdx,32; or rax,rdx; ret | loop: movups xmm0,[rdi]; rsqrtps xmm1,xmm0; rcpps xmm2,xmm0;
# movups [rsi],xmm1; movups [rdx],xmm2; add rdi,16; add rsi,16; add rdx,16; sub rcx,4;
# jnz loop; ret
_CODE = bytes.fromhex(
    "534989d089f889f10fa241890041895804418948084189500c5bc3"
    "31c90f01d048c1e2204809d0c3"
    "0f10070f52c80f53d00f110e0f11124883c7104883c6104883c2104883e90475dfc3"
)
_CPUID_AT, _XGETBV_AT, _APPROX_AT = 0x00, 0x1B, 0x28

# (name, leaf, subleaf, register index eax=0 ebx=1 ecx=2 edx=3, bit)
_FLAGS = (
    ("sse3", 1, 0, 2, 0),
    ("pclmulqdq", 1, 0, 2, 1),
    ("ssse3", 1, 0, 2, 9),
    ("fma", 1, 0, 2, 12),
    ("cx16", 1, 0, 2, 13),
    ("sse4_1", 1, 0, 2, 19),
    ("sse4_2", 1, 0, 2, 20),
    ("movbe", 1, 0, 2, 22),
    ("popcnt", 1, 0, 2, 23),
    ("aes", 1, 0, 2, 25),
    ("osxsave", 1, 0, 2, 27),
    ("avx", 1, 0, 2, 28),
    ("f16c", 1, 0, 2, 29),
    ("sse2", 1, 0, 3, 26),
    ("bmi1", 7, 0, 1, 3),
    ("avx2", 7, 0, 1, 5),
    ("bmi2", 7, 0, 1, 8),
    ("avx512f", 7, 0, 1, 16),
    ("avx512dq", 7, 0, 1, 17),
    ("avx512ifma", 7, 0, 1, 21),
    ("avx512cd", 7, 0, 1, 28),
    ("sha", 7, 0, 1, 29),
    ("avx512bw", 7, 0, 1, 30),
    ("avx512vl", 7, 0, 1, 31),
    ("avx512vbmi", 7, 0, 2, 1),
    ("avx512vbmi2", 7, 0, 2, 6),
    ("gfni", 7, 0, 2, 8),
    ("vaes", 7, 0, 2, 9),
    ("vpclmulqdq", 7, 0, 2, 10),
    ("avx512vnni", 7, 0, 2, 11),
    ("avx512bitalg", 7, 0, 2, 12),
    ("avx512vpopcntdq", 7, 0, 2, 14),
    ("amx_bf16", 7, 0, 3, 22),
    ("avx512fp16", 7, 0, 3, 23),
    ("amx_tile", 7, 0, 3, 24),
    ("amx_int8", 7, 0, 3, 25),
    ("avx_vnni", 7, 1, 0, 4),
    ("avx512bf16", 7, 1, 0, 5),
    ("lahf_lm", 0x80000001, 0, 2, 0),
    ("abm", 0x80000001, 0, 2, 5),
)
# XCR0: the OS saves SSE+AVX state (bits 1, 2); AVX-512 state (5, 6, 7); AMX tiles (17, 18).
_AVX_STATE, _AVX512_STATE, _AMX_STATE = 0x6, 0xE0, 0x60000
_AVX_FLAGS = frozenset({"avx", "avx2", "fma", "f16c", "vaes", "vpclmulqdq", "avx_vnni"})
_V2 = ("cx16", "lahf_lm", "popcnt", "sse3", "sse4_1", "sse4_2", "ssse3")
_V3 = ("avx", "avx2", "bmi1", "bmi2", "f16c", "fma", "abm", "movbe")
_V4 = ("avx512f", "avx512bw", "avx512cd", "avx512dq", "avx512vl")
_VENDORS = {
    "GenuineIntel": "intel",
    "AuthenticAMD": "amd",
    "HygonGenuine": "hygon",
    "CentaurHauls": "centaur",
    "  Shanghai  ": "zhaoxin",
}

_cached: "dict[str, object]" = {}


class _Machine:
    """The machine code above, mapped executable once per process."""

    def __init__(self) -> None:
        import ctypes
        import mmap

        self._ctypes = ctypes
        # Written while writable, then made executable: no page is ever both (W^X policies).
        self._page = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE)
        self._page.write(_CODE)
        address = ctypes.addressof(ctypes.c_char.from_buffer(self._page))
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mprotect.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        if libc.mprotect(address, mmap.PAGESIZE, mmap.PROT_READ | mmap.PROT_EXEC) != 0:
            raise OSError(ctypes.get_errno(), "mprotect refused an executable page")
        u32, u64, ptr = ctypes.c_uint32, ctypes.c_uint64, ctypes.c_void_p
        self._cpuid = ctypes.CFUNCTYPE(None, u32, u32, ptr)(address + _CPUID_AT)
        self._xgetbv = ctypes.CFUNCTYPE(u64)(address + _XGETBV_AT)
        self._approx = ctypes.CFUNCTYPE(None, ptr, ptr, ptr, u64)(address + _APPROX_AT)

    def cpuid(self, leaf: int, subleaf: int = 0) -> "tuple[int, int, int, int]":
        out = (self._ctypes.c_uint32 * 4)()
        self._cpuid(leaf, subleaf, out)
        return (out[0], out[1], out[2], out[3])

    def xgetbv(self) -> int:
        return int(self._xgetbv())

    def approximations(self) -> bytes:
        """RSQRTPS then RCPPS of 8192 inputs: every 12-bit mantissa prefix, both exponent parities."""
        from array import array

        step = 1 << 11  # float32 bit patterns 1.0 + k/4096 and 2.0 + k/2048, k < 4096
        bits = array("I", range(0x3F800000, 0x40000000, step))
        bits.extend(range(0x40000000, 0x40800000, step))
        n = len(bits)
        source = (self._ctypes.c_float * n).from_buffer(bits)
        rsqrt, rcp = (self._ctypes.c_float * n)(), (self._ctypes.c_float * n)()
        self._approx(source, rsqrt, rcp, n)
        return bytes(rsqrt) + bytes(rcp)


def _digest(data: bytes) -> str:
    import hashlib  # only the self-check's class needs it, not the hook

    return hashlib.sha256(data).hexdigest()[:8]


def _machine() -> str:
    return os.uname().machine.lower()


def _x86_facts(approximations: bool = True) -> "dict[str, object]":
    machine = _Machine()
    top, b, c, d = machine.cpuid(0)
    vendor = struct.pack("<III", b, d, c).decode("ascii", "replace")
    top_ext = machine.cpuid(0x80000000)[0]
    registers: dict[tuple[int, int], tuple[int, int, int, int]] = {}
    flags = []
    for name, leaf, subleaf, register, bit in _FLAGS:
        if leaf > (top_ext if leaf >= 0x80000000 else top):
            continue
        if leaf == 7 and subleaf == 1 and machine.cpuid(7)[0] < 1:
            continue
        if (leaf, subleaf) not in registers:
            registers[leaf, subleaf] = machine.cpuid(leaf, subleaf)
        if registers[leaf, subleaf][register] >> bit & 1:
            flags.append(name)
    xcr0 = machine.xgetbv() if "osxsave" in flags else 0
    # A CPU feature the OS does not save state for cannot be used, and libraries check XCR0.
    if xcr0 & _AVX_STATE != _AVX_STATE:
        flags = [f for f in flags if f not in _AVX_FLAGS and not f.startswith(("avx512", "amx"))]
    elif xcr0 & _AVX512_STATE != _AVX512_STATE:
        flags = [f for f in flags if not f.startswith(("avx512", "amx"))]
    if xcr0 & _AMX_STATE != _AMX_STATE:
        flags = [f for f in flags if not f.startswith("amx")]
    return {
        "source": "cpuid",
        "vendor": _VENDORS.get(vendor, "other"),
        "vendor_id": vendor,
        "flags": sorted(flags),
        "rcp": _digest(machine.approximations()) if approximations else None,
    }


def _proc_cpuinfo() -> "dict[str, str]":
    """The first processor's block of /proc/cpuinfo (the only read where CPUID cannot run)."""
    fields: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as file:  # noqa: PTH123
            for line in file:
                if not line.strip():
                    if fields:
                        break
                    continue
                key, _, value = line.partition(":")
                fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return fields


def _fallback_facts(error: str) -> "dict[str, object]":
    fields = _proc_cpuinfo()
    vendor = fields.get("vendor_id", "")
    aliases = {"sse4_1": "sse4_1", "pni": "sse3", "lm": "lm"}
    flags = sorted({aliases.get(f, f) for f in fields.get("flags", "").split()})
    return {
        "source": "/proc/cpuinfo",
        "source_error": error,
        "vendor": _VENDORS.get(vendor, "other"),
        "vendor_id": vendor,
        "flags": flags,
        "rcp": "na",  # unknown: RCPPS could not be run
    }


def _level(flags: "list[str]") -> str:
    have = set(flags)
    if not have.issuperset(_V2):
        return "v1"
    if not have.issuperset(_V3):
        return "v2"
    return "v4" if have.issuperset(_V4) else "v3"


def cpu_facts(approximations: bool = True) -> "dict[str, object]":
    """What this CPU is: architecture, vendor, flags, x86-64 level, approximation digest.

    Without `approximations` the digest is left out (None): what the hook needs costs less.
    """
    if _cached and (_cached.get("rcp") is not None or not approximations):
        return dict(_cached)
    machine = _machine()
    if machine in ("x86_64", "amd64"):
        try:
            facts = _x86_facts(approximations)
        except Exception as error:  # no executable page (a W^X policy), no ctypes
            facts = _fallback_facts(f"{type(error).__name__}: {error}")
        facts["level"] = _level(facts["flags"])  # type: ignore[arg-type]
        facts["arch"] = "x86_64"
    else:
        fields = _proc_cpuinfo()
        features = sorted(fields.get("Features", fields.get("flags", "")).split())
        facts = {"source": "/proc/cpuinfo", "arch": machine, "flags": features}
        for key in ("CPU implementer", "CPU architecture"):
            if key in fields:
                facts[key.lower().replace(" ", "_")] = fields[key]
    _cached.update(facts)
    return dict(facts)


def _setting(env: "Mapping[str, str]") -> str:
    return env.get("REPROBOX_CPU", "").strip() or "unset"


def _portable_level(level: str) -> str:
    return "v3" if level == "v4" else level


def _expected(level: str) -> "dict[str, str]":
    return dict(PINS[_portable_level(level)])


def _level_only() -> "dict[str, object]":
    return cpu_facts(approximations=False)


def adapt_pins(
    env: "MutableMapping[str, str]", facts: "Callable[[], dict[str, object]]" = _level_only
) -> "dict[str, list[str]]":
    """Lower the portable pins in `env` to a level this CPU can run; return what changed.

    Only `determinism.cpu: portable` images are touched, and only pins still at the image's
    v3 values: a value someone set on purpose is theirs. On a v3 or v4 host nothing changes.
    """
    if _setting(env) != "portable" or _machine() not in ("x86_64", "amd64"):
        return {}
    if any(env.get(key) != value for key, value in PINS["v3"].items()):
        return {}
    level = str(facts()["level"])
    target = _expected(level)
    changed = {}
    for key, value in target.items():
        if env.get(key) != value:
            changed[key] = [env.get(key, ""), value]
            env[key] = value
    return changed


def _pins_seen(env: "Mapping[str, str]") -> "dict[str, str]":
    return {key: env.get(key, "") for key in ISA_VARIABLES}


def device_class(env: "Mapping[str, str]", facts: "dict[str, object] | None" = None) -> str:
    """The device class of this CPU under the settings in `env` (see the module docstring)."""
    facts = cpu_facts() if facts is None else facts
    setting = _setting(env)
    flags = [str(f) for f in facts.get("flags", [])]  # type: ignore[attr-defined]
    if facts.get("arch") != "x86_64":
        return f"cpu-{facts.get('arch')}-{setting}-{_digest(' '.join(flags).encode())}"
    level, rcp, vendor = str(facts["level"]), str(facts["rcp"]), str(facts["vendor"])
    pins = _pins_seen(env)
    numpy_pin = pins.pop("NPY_DISABLE_CPU_FEATURES")
    portable = _expected(level)
    if setting == "portable" and pins == portable and numpy_pin in ("", NUMPY_ABOVE_V3):
        return f"cpu-x86_64-{_portable_level(level)}-rcp{rcp}"
    isa = _digest(" ".join(flags).encode())
    if setting == "native" and not any(pins.values()) and not numpy_pin:
        return f"cpu-x86_64-{level}-{vendor}-native-{isa}-rcp{rcp}"
    seen = " ".join(f"{k}={v}" for k, v in sorted({**pins, "numpy": numpy_pin}.items()))
    return f"cpu-x86_64-{level}-{vendor}-custom-{_digest(f'{seen} {isa}'.encode())}-rcp{rcp}"


if __name__ == "__main__":
    import json
    import sys

    report = {"facts": cpu_facts(), "device_class": device_class(os.environ)}
    sys.stdout.write(json.dumps(report, indent=2, sort_keys=True) + "\n")
