"""What `resnet-deploy export` should make, as one frozen, self-validating dataclass.

``ExportOptions.targets()`` turns the switches into the ordered list of (format, precision,
variant) artifacts; the pipeline, the CLI and the bench helper all read the same list, so file
names are predictable: ``<model-stem>_<precision>[_qat].<tflite|onnx>`` in ``out_dir``, and the ONNX
INT8 file carries its scheme, ``<model-stem>_int8_<scheme>.onnx`` (``u8s8``, ``s8s8``, ``u8s8-rr7``:
``onnx_rules``), resolved from ``int8_target`` (``--target``) when the plan is made.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from resnet_deploy.config import Format, Precision
from resnet_deploy.converters.onnx_rules import (ACTIVATION_TYPES, DEFAULT_OPSET, HOST, MAX_OPSET, MIN_OPSET,
                                                 TARGET_CHOICES, OnnxInt8Settings, check_int8_choices,
                                                 onnx_int8_settings)
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.errors import ExportError

CALIB_METHODS = ("minmax", "entropy", "percentile")
DEFAULT_MAX_DROP = 0.10  # accuracy-aware INT8: validation top-1 pp an INT8 file may lose
EXPORT_FORMATS = (Format.TFLITE, Format.ONNX)

__all__ = ["ACTIVATION_TYPES", "CALIB_METHODS", "EXPORT_FORMATS", "MAX_OPSET", "MIN_OPSET", "TARGET_CHOICES",
           "ExportOptions", "Target", "parse_formats"]


@dataclass(frozen=True)
class Target:
    """One artifact to write; ``scheme`` is the ONNX INT8 quantization scheme (``u8s8``...), part of its name."""

    format: Format
    precision: Precision
    qat: bool = False
    scheme: str | None = None

    @property
    def tag(self) -> str:
        return self.precision.value + ("_qat" if self.qat else "") + (f"_{self.scheme}" if self.scheme else "")

    def file_name(self, stem: str) -> str:
        return f"{stem}_{self.tag}.{self.format.value}"


@dataclass(frozen=True)
class ExportOptions:
    formats: tuple[Format, ...] = EXPORT_FORMATS
    fp16: bool = False
    int8: bool = False
    dynamic_int8: bool = False  # TFLite dynamic-range (int8 weights, float activations)
    int8_io: bool = False  # TFLite full-integer: int8 input/output instead of float
    out_dir: Path | None = None  # default: the model's folder
    force: bool = False
    opset: int = DEFAULT_OPSET
    # ONNX INT8: the target CPU family (onnx_rules.TARGET_CHOICES; "host" = this CPU) sets the scheme;
    # on "host", a value here overrides it (None = the target's); the manifest records who chose what, and why
    int8_target: str = HOST
    onnx_activation_type: str | None = None
    onnx_reduce_range: bool | None = None  # 7-bit weights (x86 without VNNI)
    onnx_per_channel: bool = True
    calib_samples: int = 300
    calib_seed: int = 0
    calib_method: str = "minmax"
    validate_samples: int = 256
    fp32_tolerance: float = 1e-3  # max |logit diff| allowed, relative to max(1, max |float logit|)
    # Accuracy-aware INT8 (int8_search): a validation split of training images decides the calibration
    # and which layers stay float; ``int8_max_drop`` (validation top-1 pp) turns it on, 0.10 by default
    accuracy_aware: bool = False
    int8_max_drop: float | None = None  # None: DEFAULT_MAX_DROP when accuracy_aware
    val_samples: int = 5000  # class-balanced training images, disjoint from every calibration sample
    val_seed: int = 0
    search_time: float = 600.0  # seconds per INT8 target for the calibration search and the fallback
    search_calib_samples: tuple[int, ...] = (1000,)  # tried beside calib_samples
    int8_max_float_layers: int = 8  # the fallback tries at most this many layers in float
    int8_float_layers: tuple[str, ...] = ()  # Keras layer names kept float by hand (a denylist)
    analyze: bool = False  # per-layer INT8 error table in the manifest (also on with accuracy_aware)
    analysis_samples: int = 200  # validation images the per-layer analysis runs on
    qat_epochs: int = 0
    qat_samples: int = 2000
    qat_learning_rate: float = 1e-5  # low: QAT starts from the float model and should stay near it
    qat_batch_size: int = 64
    preprocessing: Preprocessing | None = None  # for models without metadata
    trust_model: bool = False  # run a SavedModel whose serving function has ops outside models.io.SAFE_OPS
    # tf2onnx in a second process beside the TFLite conversions (onnx_process); None: for large models only
    parallel_onnx: bool | None = None

    def __post_init__(self):
        fmts = tuple(Format(f) if not isinstance(f, Format) else f for f in self.formats)
        bad = [f.value for f in fmts if f not in EXPORT_FORMATS]
        if not fmts or bad:
            raise ExportError(f"Cannot export to {bad or 'no format'}.",
                              expected="--formats with tflite and/or onnx, e.g. tflite,onnx")
        object.__setattr__(self, "formats", tuple(dict.fromkeys(fmts)))
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        _check(isinstance(self.opset, int) and MIN_OPSET <= self.opset <= MAX_OPSET,
               f"ONNX opset {self.opset} is not supported.",
               f"an opset from {MIN_OPSET} to {MAX_OPSET} ({MIN_OPSET}: QDQ per-channel weights; {MAX_OPSET}: the "
               "highest tf2onnx 1.17 writes)", f"use --opset {DEFAULT_OPSET} (the default) or another in "
               f"{MIN_OPSET}..{MAX_OPSET}")
        _check(self.onnx_activation_type is None or self.onnx_activation_type in ACTIVATION_TYPES,
               f"Unknown ONNX activation type {self.onnx_activation_type!r}.", "uint8 or int8")
        _check(self.onnx_reduce_range is None or isinstance(self.onnx_reduce_range, bool),
               f"onnx_reduce_range {self.onnx_reduce_range!r} is not True, False or None.",
               "True (7-bit weights), False (8-bit) or None (automatic)")
        check_int8_choices(self.int8_target, self.onnx_activation_type, self.onnx_reduce_range)
        _check(self.int8_target == HOST or (self.int8 and Format.ONNX in fmts),
               f"--target {self.int8_target} was given without an ONNX INT8 file to make.",
               "--target with --int8 and the onnx format (it sets the ONNX INT8 scheme; TFLite INT8 is the same "
               "file on every CPU)", "add --int8 (and onnx to --formats), or drop --target")
        _check(self.calib_method in CALIB_METHODS, f"Unknown calibration method {self.calib_method!r}.",
               " / ".join(CALIB_METHODS))
        _check(self.calib_samples >= 1, f"--calib-samples {self.calib_samples} is too small.",
               "1 or more (a few hundred is typical)")
        _check(self.validate_samples >= 1, f"--validate-samples {self.validate_samples} is too small.",
               "1 or more test images (256 by default)")
        _check(self.fp32_tolerance > 0, f"FP32 tolerance {self.fp32_tolerance} must be positive.", "e.g. 1e-3")
        _check(self.qat_epochs >= 0 and self.qat_samples >= 1 and self.qat_batch_size >= 1
               and self.qat_learning_rate > 0, "QAT settings are out of range.",
               "--qat-epochs >= 0, --qat-samples >= 1, a positive learning rate and batch size")
        self._check_int8_accuracy()
        _check(not (self.int8_io and not self.int8 and not self.qat_epochs),
               "--int8-io was given without --int8.", "--int8-io together with --int8 (or --qat-epochs)",
               "add --int8")

    def _check_int8_accuracy(self) -> None:
        object.__setattr__(self, "int8_float_layers", tuple(self.int8_float_layers))
        object.__setattr__(self, "search_calib_samples", tuple(int(n) for n in self.search_calib_samples))
        d = self.int8_max_drop
        _check(d is None or (isinstance(d, (int, float)) and 0 <= d < 100),
               f"--int8-max-drop {d} is not a top-1 drop in percentage points.",
               "a number from 0 to 100, e.g. 0.10 (the default): the validation top-1 an INT8 file may lose",
               "pass --int8-max-drop 0.1, or leave it out for a plain INT8 export")
        wants = [flag for flag, on in (("--int8-max-drop", d is not None), ("--accuracy-aware", self.accuracy_aware),
                                       ("--int8-float-layers", bool(self.int8_float_layers)),
                                       ("--analyze", self.analyze)) if on]
        _check(not wants or self.int8, f"{' and '.join(wants)} given without an INT8 target.",
               "--int8 (accuracy-aware INT8, its budget, float layers and the analysis apply to INT8 files only)",
               "add --int8, or drop " + " and ".join(wants))
        _check(not (self.int8_io and (self.int8_aware or self.int8_float_layers)),
               "--int8-io cannot be combined with accuracy-aware INT8 or --int8-float-layers.",
               "float input/output when layers may stay float (TFLite's selective quantization keeps float I/O)",
               "drop --int8-io, or export a plain INT8 file with integer I/O")
        _check(self.val_samples >= 10 and self.analysis_samples >= 1 and self.int8_max_float_layers >= 0
               and self.search_time > 0 and all(n >= 1 for n in self.search_calib_samples),
               "Accuracy-aware INT8 settings are out of range.",
               "--val-samples >= 10, --analysis-samples >= 1, --int8-max-float-layers >= 0, a positive "
               "--search-time and calibration sizes >= 1")

    @property
    def int8_aware(self) -> bool:
        """Accuracy-aware INT8: asked for with ``accuracy_aware`` or by giving a budget."""
        return bool(self.int8 and (self.accuracy_aware or self.int8_max_drop is not None))

    @property
    def max_drop(self) -> float:
        """The validation top-1 budget in percentage points."""
        return DEFAULT_MAX_DROP if self.int8_max_drop is None else float(self.int8_max_drop)

    @property
    def needs_validation_split(self) -> bool:
        return bool(self.int8 and (self.int8_aware or self.analyze))

    # Plan ----------------------------------------------------------------------------------
    def targets(self) -> list[Target]:
        """The artifacts these options make, in export order."""
        out = []
        for fmt in self.formats:
            out.append(Target(fmt, Precision.FP32))
            if self.fp16:
                out.append(Target(fmt, Precision.FP16))
            if self.dynamic_int8 and fmt is Format.TFLITE:
                out.append(Target(fmt, Precision.DYNAMIC_INT8))
            if self.int8:
                out.append(Target(fmt, Precision.INT8, scheme=self.onnx_int8().scheme if fmt is Format.ONNX
                                  else None))
            if self.qat_epochs and fmt is Format.TFLITE:
                out.append(Target(fmt, Precision.INT8, qat=True))
        return out

    def onnx_int8(self, machine: str | None = None, flags=None) -> OnnxInt8Settings:
        """The ONNX INT8 scheme for ``int8_target`` (``host``: this CPU, or ``machine``/``flags``), with the
        user's overrides."""
        return onnx_int8_settings(self.onnx_activation_type, self.onnx_reduce_range, machine, flags,
                                  target=self.int8_target)

    @property
    def needs_calibration(self) -> bool:
        return any(t.precision is Precision.INT8 for t in self.targets())

    def to_dict(self) -> dict:
        d = asdict(self)
        d["formats"] = [f.value for f in self.formats]
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        d["preprocessing"] = self.preprocessing.to_dict() if self.preprocessing else None
        d["int8_float_layers"] = list(self.int8_float_layers)
        d["search_calib_samples"] = list(self.search_calib_samples)
        return d


def _check(ok: bool, what: str, expected: str, fix: str | None = None) -> None:
    if not ok:
        raise ExportError(what, expected=expected, fix=fix)


def parse_formats(text: str) -> tuple[Format, ...]:
    """``"tflite,onnx"`` -> (Format.TFLITE, Format.ONNX), with a clear error for anything else."""
    out = []
    for part in (p.strip().lower() for p in text.split(",")):
        if not part:
            continue
        try:
            fmt = Format(part)
        except ValueError:
            fmt = None
        if fmt not in EXPORT_FORMATS:
            raise ExportError(f"Unknown export format {part!r}.", expected="tflite and/or onnx, comma-separated",
                              fix="e.g. --formats tflite,onnx")
        out.append(fmt)
    if not out:
        raise ExportError("--formats is empty.", expected="tflite and/or onnx, comma-separated")
    return tuple(out)
