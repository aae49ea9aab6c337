"""ONNX export rules shared by ``ExportOptions`` and the CLI's ``--help``: the opset range tf2onnx can
write and the automatic INT8 quantization settings per CPU.

Framework-free on purpose (the CLI imports it to print ``--help`` instantly).

INT8 rule (ONNX Runtime's own guidance in ``quantize_static``'s docstring, and measured here, see
docs/export.md):

- x86 without VNNI: ONNX Runtime's U8S8 kernels multiply with VPMADDUBSW, which adds pairs of
  u8*s8 products into a *saturating* 16-bit sum before widening; with full 8-bit weights those sums
  clip and accuracy collapses (tiny test ResNet: top-1 agreement 0.705 instead of 0.96).
  ``reduce_range`` quantizes weights to 7 bits, which keeps every pair sum inside int16.
- x86 with VNNI (avx512_vnni or avx_vnni): VPDPBUSD accumulates in 32 bits, no saturation: 8-bit weights.
- arm64: int8 activations (S8S8 is ONNX Runtime's fast path there), 8-bit weights.

The exporting CPU decides the automatic choice; an artifact for another CPU is made with
``--onnx-reduce-range`` / ``--no-onnx-reduce-range`` and ``--onnx-activation-type``.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field

# QDQ with per-channel weights (QuantizeLinear/DequantizeLinear ``axis``) needs opset 13.
MIN_OPSET = 13
# tf2onnx 1.17: constants.OPSET_TO_IR_VERSION stops at 18 and Graph.make_model refuses any opset not in it
# ("Opset N is not supported yet. Please use a lower opset").
MAX_OPSET = 18
DEFAULT_OPSET = 17

ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPE = "int8"  # symmetric, per-channel; not an option
VNNI_FLAGS = ("avx512_vnni", "avx512vnni", "avx_vnni")  # /proc/cpuinfo names (envinfo reads them)
_ARM = ("arm64", "aarch64", "armv8l")
_X86 = ("x86_64", "amd64", "x86", "i386", "i686", "x64")

USER, AUTOMATIC, FIXED = "user", "automatic", "fixed"


def _machine(machine: str | None) -> str:
    return (machine or platform.machine()).lower()


def is_arm(machine: str | None = None) -> bool:
    return _machine(machine) in _ARM


def is_x86(machine: str | None = None) -> bool:
    return _machine(machine) in _X86


def _flags(flags) -> list[str] | None:
    """The given flags, or this machine's (``envinfo.read_cpu_flags``); None when they are unknown."""
    if flags is None:
        from resnet_deploy.envinfo import read_cpu_flags

        flags = read_cpu_flags()
    return None if flags is None else list(flags)


def has_vnni(flags=None) -> bool | None:
    """Whether the CPU flags (default: this machine's) include VNNI; None when the flags are unknown."""
    fl = _flags(flags)
    return None if fl is None else any(f in VNNI_FLAGS for f in fl)


def default_onnx_activation_type(machine: str | None = None) -> str:
    """uint8 activations on x86 (ONNX Runtime's fast U8S8 kernels: 3.8x S8S8 on a residual net, see
    DESIGN.md), int8 on arm64 (where S8S8 is the fast path)."""
    return "int8" if is_arm(machine) else "uint8"


def default_onnx_reduce_range(machine: str | None = None, flags=None) -> bool:
    """7-bit weights on x86 CPUs without VNNI (VPMADDUBSW saturation), and on x86 CPUs whose flags are
    unknown (the safe side); 8-bit everywhere else."""
    return is_x86(machine) and has_vnni(flags) is not True


@dataclass(frozen=True)
class OnnxInt8Settings:
    """The ONNX INT8 quantization types, who chose each and why (recorded in the manifest)."""

    activation_type: str  # "uint8" | "int8"
    weight_type: str  # "int8"
    reduce_range: bool  # 7-bit weights
    chosen_by: dict = field(default_factory=dict)  # key -> "user" | "automatic" | "fixed"
    reason: dict = field(default_factory=dict)  # key -> sentence
    cpu: dict = field(default_factory=dict)  # the CPU the automatic choices were made for

    @property
    def scheme(self) -> str:
        """``U8S8``, ``S8S8``...: activation type then weight type, as ONNX Runtime names them."""
        short = {"uint8": "U8", "int8": "S8"}
        return short[self.activation_type] + short[self.weight_type]

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scheme"] = self.scheme
        return d


def onnx_int8_settings(activation_type: str | None, reduce_range: bool | None, machine: str | None = None,
                       flags=None) -> OnnxInt8Settings:
    """Resolve the ONNX INT8 settings: a value given by the user wins, ``None`` means automatic for the
    exporting CPU (``machine``/``flags`` default to this one's)."""
    m = _machine(machine)
    flags = _flags(flags)
    vnni = [f for f in flags or () if f in VNNI_FLAGS]
    cpu_text = (f"the exporting CPU ({m}, flags read: {', '.join(flags) or 'none'})" if flags is not None
                else f"the exporting CPU ({m}, flags unknown: /proc/cpuinfo unreadable)")
    chosen, reason = {}, {}

    if activation_type is not None:
        act, chosen["activation_type"] = activation_type, USER
        reason["activation_type"] = f"user: {activation_type} given (--onnx-activation-type / ExportOptions)"
    else:
        act, chosen["activation_type"] = default_onnx_activation_type(m), AUTOMATIC
        reason["activation_type"] = (
            "automatic: int8 on arm64, where S8S8 is ONNX Runtime's fast path" if is_arm(m) else
            "automatic: uint8 on x86 (and other non-arm64 CPUs): ONNX Runtime runs U8S8 QDQ residual nets "
            "through its fast uint8 kernels, S8S8 keeps many convolutions in float there (DESIGN.md)")

    chosen["weight_type"] = FIXED
    if reduce_range is not None:
        rr, chosen["reduce_range"] = bool(reduce_range), USER
        flag = "--onnx-reduce-range" if rr else "--no-onnx-reduce-range"
        reason["reduce_range"] = f"user: {flag} given (ExportOptions.onnx_reduce_range={rr})"
    else:
        rr, chosen["reduce_range"] = default_onnx_reduce_range(m, flags), AUTOMATIC
        if rr and flags is None:
            reason["reduce_range"] = (
                f"automatic: {cpu_text} is x86 and VNNI cannot be confirmed, so the safe side: 7-bit weights "
                "(ONNX Runtime's U8S8 kernels saturate with 8-bit weights on x86 without VNNI, docs/export.md); "
                "pass --no-onnx-reduce-range for a VNNI (or arm64) target")
        elif rr:
            reason["reduce_range"] = (
                f"automatic: {cpu_text} is x86 without VNNI, where ONNX Runtime's U8S8 kernels use VPMADDUBSW, "
                "whose 16-bit pair sums saturate with 8-bit weights (tiny ResNet agreement 0.705 vs 0.960 with "
                "7-bit weights, docs/export.md); pass --no-onnx-reduce-range for a VNNI (or arm64) target")
        elif is_x86(m):
            reason["reduce_range"] = (
                f"automatic: {cpu_text} has VNNI ({', '.join(vnni)}), which accumulates u8*s8 products in 32 bits "
                "without saturation: full 8-bit weights; pass --onnx-reduce-range if this file will run on x86 "
                "CPUs without VNNI")
        else:
            reason["reduce_range"] = (
                f"automatic: {cpu_text} is not x86: the VPMADDUBSW saturation that reduce_range works around is "
                "x86-only, so full 8-bit weights")
    reason["weight_type"] = ("fixed: symmetric int8 weights (not an option)" +
                             (", quantized to 7 bits (-64..64) because reduce_range is on" if rr else ", full 8 bits"))
    return OnnxInt8Settings(act, WEIGHT_TYPE, rr, chosen, reason,
                            {"machine": m, "flags": flags, "vnni": None if flags is None else bool(vnni)})
