"""Machine and library facts: the CPU model and its ISA flags, what kind of CPU it is (x86, arm64, VNNI),
the library versions and the usable cores. Printed beside every figure; the export's ONNX INT8 rule
(``converters.onnx_rules``) and bench's saturation check (``bench.selection``) read the CPU facts here.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform

_PACKAGES = (
    "resnet-deploy", "tensorflow", "keras", "tf-keras", "tensorflow-model-optimization", "tf2onnx",
    "onnx", "onnxruntime", "onnxruntime-gpu", "ai-edge-litert", "openvino", "numpy", "jax", "torch",
)
# /proc/cpuinfo names of the 8-bit dot-product instructions that accumulate u8*s8 products in 32 bits
VNNI_FLAGS = ("avx512_vnni", "avx512vnni", "avx_vnni")
ARM_MACHINES = ("arm64", "aarch64", "armv8l")
X86_MACHINES = ("x86_64", "amd64", "x86", "i386", "i686", "x64")
_INTERESTING_FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512vnni", "avx_vnni", "avx512_bf16",
                      "avx512_fp16", "amx_tile", "amx_int8", "amx_bf16", "asimddp", "i8mm")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def read_cpu_flags() -> list[str] | None:
    """The ISA flags that decide inference speed (AVX-512, VNNI, BF16, AMX), as /proc/cpuinfo names them;
    None when they cannot be read (no /proc/cpuinfo: macOS, Windows, a sandbox)."""
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith(("flags", "Features")):
                    have = set(line.split(":", 1)[1].split())
                    return [f for f in _INTERESTING_FLAGS if f in have]
    except OSError:
        pass
    return None


def machine_name(machine: str | None = None) -> str:
    """``machine`` (default: this one's, ``platform.machine()``), lower-case."""
    return (machine or platform.machine()).lower()


def is_arm(machine: str | None = None) -> bool:
    return machine_name(machine) in ARM_MACHINES


def is_x86(machine: str | None = None) -> bool:
    return machine_name(machine) in X86_MACHINES


def known_flags(flags=None) -> list[str] | None:
    """The given flags, or this machine's (``read_cpu_flags``); None when they are unknown."""
    if flags is None:
        flags = read_cpu_flags()
    return None if flags is None else list(flags)


def vnni_flags(flags=None) -> list[str]:
    """The VNNI flags among ``flags`` (default: this machine's); empty when none or unknown."""
    return [f for f in known_flags(flags) or () if f in VNNI_FLAGS]


def has_vnni(flags=None) -> bool | None:
    """Whether the CPU flags (default: this machine's) include VNNI; None when the flags are unknown."""
    fl = known_flags(flags)
    return None if fl is None else bool(vnni_flags(fl))


def cpu_flags() -> list[str]:
    """``read_cpu_flags`` for display: an empty list when unknown."""
    return read_cpu_flags() or []


def library_versions(packages=_PACKAGES) -> dict[str, str]:
    out = {}
    for name in packages:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def usable_cores() -> int:
    """The cores this process may run on (its CPU affinity; the machine's count where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def machine_info() -> dict:
    return {
        "cpu": cpu_model(),
        "cpu_flags": cpu_flags(),
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "os": platform.platform(terse=True),
        "keras_backend": os.environ.get("KERAS_BACKEND", "tensorflow"),
    }


def machine_banner() -> str:
    """Two lines every benchmark prints beside its figures: the CPU with its flags, the library versions."""
    m = machine_info()
    return (f"machine: {m['cpu']}, {m['cpu_count']} cores, flags: {' '.join(m['cpu_flags'])}\n"
            "versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()))
