"""ONNX export rules shared by ``ExportOptions`` and the CLI's ``--help``: the opset range tf2onnx can
write and the INT8 quantization scheme per target CPU.

Framework-free on purpose (the CLI imports it to print ``--help`` instantly).

An ONNX INT8 file is made for a **target** (``--target``), named after Optimum's
``AutoQuantizationConfig`` presets, and its **scheme** (activation type, weight type, weight range) is
part of the file name (``model_int8_u8s8.onnx``) and of the manifest's ``calibration`` block:

=========== ===================== ============ ============================================================
target      Optimum preset         scheme       why
=========== ===================== ============ ============================================================
x86-vnni    avx512_vnni            u8s8         VPDPBUSD accumulates u8*s8 in 32 bits: full 8-bit weights
x86-avx2    avx2 / avx512          u8s8-rr7     VPMADDUBSW adds u8*s8 pairs into a *saturating* int16: 8-bit
            (reduce_range=True)                 weights clip, so weights are quantized to 7 bits (``reduce_range``)
arm64       arm64                  s8s8         ONNX Runtime's fast QDQ path on arm64 (Optimum picks u8s8)
host        (this CPU)             one of the above, from this CPU's architecture and flags
=========== ===================== ============ ============================================================

uint8 activations on x86 because ONNX Runtime's U8S8 kernels are its fast x86 path. The measurements
behind each choice are in docs/export.md; the strings written into manifests state the rule, not the
figures. ``reduce_range`` is used only where it is needed (U8S8 on x86 without VNNI), never
with int8 activations. ``--onnx-activation-type`` / ``--onnx-reduce-range`` still override the host's
choice; with an explicit target, an override that contradicts it is refused (``check_int8_choices``).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from resnet_deploy.envinfo import is_arm, is_x86, known_flags, machine_name, vnni_flags

# QDQ with per-channel weights (QuantizeLinear/DequantizeLinear ``axis``) needs opset 13.
MIN_OPSET = 13
# tf2onnx 1.17: constants.OPSET_TO_IR_VERSION stops at 18 and Graph.make_model refuses any opset not in it
# ("Opset N is not supported yet. Please use a lower opset").
MAX_OPSET = 18
DEFAULT_OPSET = 17

ACTIVATION_TYPES = ("uint8", "int8")
WEIGHT_TYPE = "int8"  # symmetric, per-channel; not an option

USER, AUTOMATIC, FIXED, TARGET = "user", "automatic", "fixed", "target"
HOST = "host"

@dataclass(frozen=True)
class Int8Target:
    """What an ONNX INT8 file for one CPU family is made of."""

    name: str
    activation_type: str
    reduce_range: bool  # with uint8 activations only
    optimum: str  # the Optimum preset it corresponds to
    why: str


INT8_TARGETS = {t.name: t for t in (
    Int8Target("x86-vnni", "uint8", False, "AutoQuantizationConfig.avx512_vnni",
               "x86 with VNNI (avx512_vnni or avx_vnni): ONNX Runtime's U8S8 kernels (uint8 activations, its "
               "fast x86 path) accumulate with VPDPBUSD in 32 bits, no saturation: full 8-bit weights"),
    Int8Target("x86-avx2", "uint8", True, "AutoQuantizationConfig.avx2 / avx512 with reduce_range=True",
               "x86 without VNNI (AVX2, AVX-512 without VNNI): ONNX Runtime's U8S8 kernels multiply with "
               "VPMADDUBSW, whose 16-bit pair sums saturate with 8-bit weights: weights quantized to 7 bits "
               "(reduce_range)"),
    Int8Target("arm64", "int8", False, "AutoQuantizationConfig.arm64 (Optimum keeps uint8 activations there)",
               "arm64: int8 activations, ONNX Runtime's fast QDQ path there; no VPMADDUBSW, so full 8-bit "
               "weights"),
)}
TARGET_CHOICES = (HOST, *INT8_TARGETS)
_SHORT = {"uint8": "u8", "int8": "s8"}


def scheme_name(activation_type: str, weight_type: str = WEIGHT_TYPE, reduce_range: bool = False) -> str:
    """``u8s8``, ``s8s8``, ``u8s8-rr7`` (8-bit storage, weights in the 7-bit range of reduce_range): the
    activation then the weight type, as ONNX Runtime names its kernels; part of the INT8 file's name."""
    return _SHORT[activation_type] + _SHORT[weight_type] + ("-rr7" if reduce_range else "")


def host_target(machine: str | None = None, flags=None) -> tuple[str, str]:
    """The target ``host`` stands for on this CPU (or the given ``machine``/``flags``), and why."""
    m, fl = machine_name(machine), known_flags(flags)
    cpu = (f"this CPU ({m}, flags read: {', '.join(fl) or 'none'})" if fl is not None
           else f"this CPU ({m}, flags unknown: /proc/cpuinfo unreadable)")
    if is_arm(m):
        return "arm64", f"{cpu} is arm64"
    if is_x86(m):
        vnni = vnni_flags(fl)
        if vnni:
            return "x86-vnni", f"{cpu} is x86 with VNNI ({', '.join(vnni)})"
        if fl is None:
            return "x86-avx2", f"{cpu} is x86 and VNNI cannot be confirmed, so the safe side"
        return "x86-avx2", f"{cpu} is x86 without VNNI"
    from resnet_deploy.errors import ExportError

    raise ExportError(f"--target host: this CPU ({m}) is neither x86 nor arm64, so no ONNX INT8 scheme is known "
                      "to be fast and exact on it.", expected=f"--target one of {', '.join(INT8_TARGETS)}",
                      fix="pass --target for the CPU the ONNX INT8 file will run on")


def check_int8_choices(target: str, activation_type: str | None, reduce_range: bool | None) -> None:
    """Refuse what cannot be made, before any work: an unknown target, reduce_range with int8 activations,
    and an explicit target contradicted by an override (a ``host`` export may override freely)."""
    from resnet_deploy.errors import ExportError

    if target not in TARGET_CHOICES:
        raise ExportError(f"Unknown --target {target!r}.", expected=f"one of {', '.join(TARGET_CHOICES)}",
                          fix="--target host (this CPU) or the CPU family the ONNX INT8 file will run on")
    if activation_type == "int8" and reduce_range:
        raise ExportError("--onnx-reduce-range was given with int8 activations (S8S8).",
                          expected="reduce_range only with uint8 activations: it works around the saturation of "
                                   "ONNX Runtime's U8S8 kernels on x86 without VNNI, which S8S8 does not have",
                          fix="drop --onnx-reduce-range, or use --onnx-activation-type uint8")
    rule = INT8_TARGETS.get(target)
    if rule is None:
        return
    what = []
    if activation_type is not None and activation_type != rule.activation_type:
        what.append(f"--onnx-activation-type {activation_type}")
    if reduce_range is not None and reduce_range != rule.reduce_range:
        what.append("--onnx-reduce-range" if reduce_range else "--no-onnx-reduce-range")
    if what:
        others = "; ".join(f"{t.name}: {scheme_name(t.activation_type, WEIGHT_TYPE, t.reduce_range)}"
                           for t in INT8_TARGETS.values())
        raise ExportError(f"--target {target} writes {scheme_name(rule.activation_type, WEIGHT_TYPE, rule.reduce_range)} "
                          f"({rule.activation_type} activations, {'7' if rule.reduce_range else '8'}-bit weights), "
                          f"but {' and '.join(what)} contradicts it.",
                          expected=f"either a --target ({others}) or overrides on --target host",
                          fix=f"drop {' and '.join(what)} (the target sets it), or pick the target that matches")


@dataclass(frozen=True)
class OnnxInt8Settings:
    """The ONNX INT8 quantization types, the target they were made for, who chose each and why
    (recorded in the manifest's ``calibration`` block)."""

    activation_type: str  # "uint8" | "int8"
    weight_type: str  # "int8"
    reduce_range: bool  # 7-bit weights
    target: str = "x86-vnni"  # resolved: x86-vnni | x86-avx2 | arm64
    requested_target: str = HOST  # as given: host or a target
    chosen_by: dict = field(default_factory=dict)  # key -> "user" | "target" | "automatic" | "fixed"
    reason: dict = field(default_factory=dict)  # key -> sentence
    cpu: dict = field(default_factory=dict)  # the exporting CPU (``host`` is resolved from it)

    @property
    def scheme(self) -> str:
        """``u8s8``, ``s8s8``, ``u8s8-rr7`` (``scheme_name``)."""
        return scheme_name(self.activation_type, self.weight_type, self.reduce_range)

    @property
    def optimum(self) -> str:
        return INT8_TARGETS[self.target].optimum

    def describe(self) -> str:
        """One line for the export's output."""
        host = (f"host -> {self.target} ({self.reason['host']})" if self.requested_target == HOST
                else f"{self.target} (--target)")
        bits = "7-bit (reduce_range)" if self.reduce_range else "8-bit"
        over = [k for k in ("activation_type", "reduce_range") if self.chosen_by.get(k) == USER]
        return (f"ONNX INT8 target {host}: scheme {self.scheme} ({self.activation_type} activations, {bits} "
                f"{self.weight_type} weights" + (f"; {' and '.join(over)} given by the user" if over else "") + ")")

    def to_dict(self) -> dict:
        d = asdict(self)
        d["scheme"] = self.scheme
        d["optimum_preset"] = self.optimum
        return d


def onnx_int8_settings(activation_type: str | None, reduce_range: bool | None, machine: str | None = None,
                       flags=None, target: str = HOST) -> OnnxInt8Settings:
    """Resolve the ONNX INT8 settings: ``target`` (``host``: this CPU, or ``machine``/``flags``) gives the
    scheme, and on ``host`` a value given by the user overrides it."""
    check_int8_choices(target, activation_type, reduce_range)
    m, fl = machine_name(machine), known_flags(flags)
    chosen, reason = {}, {}
    if target == HOST:
        resolved, why = host_target(m, fl)
        reason["host"] = why
        chosen["target"] = AUTOMATIC
        reason["target"] = f"automatic (--target host): {why}, so {resolved}: {INT8_TARGETS[resolved].why}"
    else:
        resolved = target
        chosen["target"] = USER
        reason["target"] = f"user: --target {target}: {INT8_TARGETS[target].why}"
    rule = INT8_TARGETS[resolved]
    by = AUTOMATIC if target == HOST else TARGET

    if activation_type is not None:
        act, chosen["activation_type"] = activation_type, USER
        reason["activation_type"] = f"user: {activation_type} given (--onnx-activation-type / ExportOptions)"
    else:
        act, chosen["activation_type"] = rule.activation_type, by
        reason["activation_type"] = f"{by}: {rule.activation_type} for {resolved}"

    chosen["weight_type"] = FIXED
    if reduce_range is not None:
        rr, chosen["reduce_range"] = bool(reduce_range), USER
        flag = "--onnx-reduce-range" if rr else "--no-onnx-reduce-range"
        reason["reduce_range"] = f"user: {flag} given (ExportOptions.onnx_reduce_range={rr})"
    else:
        rr, chosen["reduce_range"] = rule.reduce_range and act == "uint8", by
        if rule.reduce_range and act != "uint8":
            reason["reduce_range"] = f"{by}: off: reduce_range is never used with int8 activations (S8S8)"
        elif rr:
            reason["reduce_range"] = (
                f"{by}: on for {resolved}: ONNX Runtime's U8S8 kernels use VPMADDUBSW there, whose 16-bit pair "
                "sums saturate with 8-bit weights (docs/export.md); --target x86-vnni or arm64 for a CPU with VNNI "
                "or an arm64 CPU")
        elif resolved == "x86-vnni":
            reason["reduce_range"] = (f"{by}: off for {resolved}: VNNI accumulates u8*s8 products in 32 bits "
                                      "without saturation, full 8-bit weights; --target x86-avx2 for x86 CPUs "
                                      "without VNNI")
        else:
            reason["reduce_range"] = (f"{by}: off for {resolved}: the VPMADDUBSW saturation that reduce_range "
                                      "works around is x86-only, full 8-bit weights")
    reason["weight_type"] = ("fixed: symmetric int8 weights (not an option)" +
                             (", quantized to 7 bits (-64..64) because reduce_range is on" if rr else ", full 8 bits"))
    return OnnxInt8Settings(act, WEIGHT_TYPE, rr, resolved, target, chosen, reason,
                            {"machine": m, "flags": fl, "vnni": None if fl is None else bool(vnni_flags(fl))})
