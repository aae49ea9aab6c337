"""What `resnet-deploy export` should make, as one frozen, self-validating dataclass in four parts.

``ExportOptions`` holds what to write (formats, precisions, where, the parity check) and four parts:

- ``scheme`` (``SchemeOptions``): the ONNX INT8 target CPU and its overrides (``onnx_rules``);
- ``calibration`` (``CalibrationOptions``): the INT8 calibration sample and method;
- ``search`` (``Int8SearchOptions``): accuracy-aware INT8 on the *tuning split* of training images;
- ``qat`` (``QatOptions``): quantization-aware fine-tuning.

Three different things were once all called "validation"; here each has its own name: the **parity
check** runs every artifact beside the float model on ``parity_samples`` *test* images (``--parity-samples``),
the **tuning split** is the set of *training* images accuracy-aware INT8 decides on
(``--tuning-samples``), and ``train --val-split`` keeps the usual meaning of a validation split.

``ExportOptions(...)`` also takes the flat keyword names of earlier versions (``calib_samples=300``,
``int8_target="arm64"``, ``validate_samples=256``, ``val_samples=5000``, ...) and reads them back as
attributes, so scripts written against them keep working; ``FLAT_NAMES`` lists them. ``to_dict()``
writes the flat names: it is the manifest's ``options.export`` block, whose format does not change.

``ExportOptions.targets()`` turns the switches into the ordered list of (format, precision, variant)
artifacts; the pipeline, the CLI and the bench helper all read the same list, so file names are
predictable: ``<model-stem>_<precision>[_qat].<tflite|onnx>`` in ``out_dir``, and the ONNX INT8 file carries
its scheme, ``<model-stem>_int8_<scheme>.onnx`` (``u8s8``, ``s8s8``, ``u8s8-rr7``: ``onnx_rules``), resolved
from ``scheme.target`` (``--target``) when the plan is made.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from resnet_deploy.config import Format, Precision
from resnet_deploy.converters.onnx_rules import (ACTIVATION_TYPES, DEFAULT_OPSET, HOST, MAX_OPSET, MIN_OPSET,
                                                 TARGET_CHOICES, OnnxInt8Settings, check_int8_choices,
                                                 onnx_int8_settings)
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.errors import ExportError

CALIB_METHODS = ("minmax", "entropy", "percentile", "minmax-bc")  # -bc: ONNX bias correction after minmax
DEFAULT_MAX_DROP = 0.10  # accuracy-aware INT8: tuning-split top-1 pp an INT8 file may lose
EXPORT_FORMATS = (Format.TFLITE, Format.ONNX)

__all__ = ["ACTIVATION_TYPES", "CALIB_METHODS", "EXPORT_FORMATS", "MAX_OPSET", "MIN_OPSET", "TARGET_CHOICES",
           "CalibrationOptions", "ExportOptions", "Int8SearchOptions", "QatOptions", "SchemeOptions", "Target",
           "parse_formats"]


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


# The four parts ---------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SchemeOptions:
    """The ONNX INT8 file's target CPU family (``onnx_rules.TARGET_CHOICES``; ``host`` = this CPU), which sets its
    scheme; on ``host`` a value here overrides the target's (None = the target's)."""

    target: str = HOST
    activation_type: str | None = None
    reduce_range: bool | None = None  # 7-bit weights (x86 without VNNI)

    def __post_init__(self):
        _check(self.activation_type is None or self.activation_type in ACTIVATION_TYPES,
               f"Unknown ONNX activation type {self.activation_type!r}.", "uint8 or int8")
        _check(self.reduce_range is None or isinstance(self.reduce_range, bool),
               f"onnx_reduce_range {self.reduce_range!r} is not True, False or None.",
               "True (7-bit weights), False (8-bit) or None (automatic)")
        check_int8_choices(self.target, self.activation_type, self.reduce_range)

    def settings(self, machine: str | None = None, flags=None) -> OnnxInt8Settings:
        """The resolved scheme (``host``: this CPU, or ``machine``/``flags``), with the user's overrides."""
        return onnx_int8_settings(self.activation_type, self.reduce_range, machine, flags, target=self.target)


@dataclass(frozen=True)
class CalibrationOptions:
    """The INT8 calibration sample (class-balanced training images) and the ONNX calibrator."""

    samples: int = 300
    seed: int = 0
    method: str = "minmax"  # ONNX Runtime's calibrator; TFLite uses its own min/max
    per_channel: bool = True  # ONNX INT8 weights per channel
    activations: str = "int8"  # TFLite: "int16" is 16x8 (int16 activations, int8 weights), whole model

    def __post_init__(self):
        _check(self.activations in ("int8", "int16"), f"Unknown activation type {self.activations!r}.",
               "int8 or int16 (TFLite 16x8)")
        _check(self.method in CALIB_METHODS, f"Unknown calibration method {self.method!r}.", " / ".join(CALIB_METHODS))
        _check(self.samples >= 1, f"--calib-samples {self.samples} is too small.", "1 or more (a few hundred is typical)")


@dataclass(frozen=True)
class Int8SearchOptions:
    """Accuracy-aware INT8 (``int8_search``): a tuning split of training images decides the calibration and
    which layers stay float; a ``max_drop`` budget (tuning-split top-1 pp) turns it on, 0.10 by default."""

    accuracy_aware: bool = False
    max_drop: float | None = None  # None: DEFAULT_MAX_DROP when accuracy_aware
    tuning_samples: int = 5000  # class-balanced training images, disjoint from every calibration sample
    tuning_seed: int = 0
    search_time: float = 600.0  # seconds per INT8 target for the calibration search and the fallback
    search_calib_samples: tuple[int, ...] = (1000,)  # tried beside the calibration's samples
    max_float_layers: int = 8  # the fallback tries at most this many layers in float
    float_layers: tuple[str, ...] = ()  # Keras layer names kept float by hand (a denylist)
    analyze: bool = False  # per-layer INT8 error table in the manifest (also on with accuracy_aware)
    analysis_samples: int = 200  # tuning-split images the per-layer analysis runs on

    def __post_init__(self):
        object.__setattr__(self, "float_layers", tuple(self.float_layers))
        object.__setattr__(self, "search_calib_samples", tuple(int(n) for n in self.search_calib_samples))
        d = self.max_drop
        _check(d is None or (isinstance(d, (int, float)) and 0 <= d < 100),
               f"--int8-max-drop {d} is not a top-1 drop in percentage points.",
               "a number from 0 to 100, e.g. 0.10 (the default): the tuning-split top-1 an INT8 file may lose",
               "pass --int8-max-drop 0.1, or leave it out for a plain INT8 export")
        _check(self.tuning_samples >= 10 and self.analysis_samples >= 1 and self.max_float_layers >= 0
               and self.search_time > 0 and all(n >= 1 for n in self.search_calib_samples),
               "Accuracy-aware INT8 settings are out of range.",
               "--tuning-samples >= 10, --analysis-samples >= 1, --int8-max-float-layers >= 0, a positive "
               "--search-time and calibration sizes >= 1")

    @property
    def requested(self) -> list[str]:
        """The flags of this part that were given (each needs an INT8 target)."""
        return [flag for flag, on in (("--int8-max-drop", self.max_drop is not None),
                                      ("--accuracy-aware", self.accuracy_aware),
                                      ("--int8-float-layers", bool(self.float_layers)),
                                      ("--analyze", self.analyze)) if on]

    @property
    def budget(self) -> float:
        """The tuning-split top-1 budget in percentage points."""
        return DEFAULT_MAX_DROP if self.max_drop is None else float(self.max_drop)


@dataclass(frozen=True)
class QatOptions:
    """Quantization-aware fine-tuning (``qat``); ``epochs`` 0: none."""

    epochs: int = 0
    samples: int = 2000
    learning_rate: float = 1e-5  # low: QAT starts from the float model and should stay near it
    batch_size: int = 64

    def __post_init__(self):
        _check(self.epochs >= 0 and self.samples >= 1 and self.batch_size >= 1 and self.learning_rate > 0,
               "QAT settings are out of range.",
               "--qat-epochs >= 0, --qat-samples >= 1, a positive learning rate and batch size")


_PARTS = {"scheme": SchemeOptions, "calibration": CalibrationOptions, "search": Int8SearchOptions,
          "qat": QatOptions}
# The flat names of earlier versions (and of the manifest's options.export block): name -> (part, field)
FLAT_NAMES = {
    "int8_target": ("scheme", "target"), "onnx_activation_type": ("scheme", "activation_type"),
    "onnx_reduce_range": ("scheme", "reduce_range"),
    "onnx_per_channel": ("calibration", "per_channel"), "calib_samples": ("calibration", "samples"),
    "calib_seed": ("calibration", "seed"), "calib_method": ("calibration", "method"),
    "accuracy_aware": ("search", "accuracy_aware"), "int8_max_drop": ("search", "max_drop"),
    "val_samples": ("search", "tuning_samples"), "val_seed": ("search", "tuning_seed"),
    "search_time": ("search", "search_time"), "search_calib_samples": ("search", "search_calib_samples"),
    "int8_max_float_layers": ("search", "max_float_layers"), "int8_float_layers": ("search", "float_layers"),
    "analyze": ("search", "analyze"), "analysis_samples": ("search", "analysis_samples"),
    "qat_epochs": ("qat", "epochs"), "qat_samples": ("qat", "samples"),
    "qat_learning_rate": ("qat", "learning_rate"), "qat_batch_size": ("qat", "batch_size"),
}
_RENAMED = {"validate_samples": "parity_samples"}  # top-level fields of earlier versions


@dataclass(frozen=True, init=False)
class ExportOptions:
    formats: tuple[Format, ...] = EXPORT_FORMATS
    fp16: bool = False
    int8: bool = False
    dynamic_int8: bool = False  # TFLite dynamic-range (int8 weights, float activations)
    int8_io: bool = False  # TFLite full-integer: int8 input/output instead of float
    out_dir: Path | None = None  # default: the model's folder
    force: bool = False
    opset: int = DEFAULT_OPSET
    parity_samples: int = 256  # test images each artifact is checked on against the float model
    fp32_tolerance: float = 1e-3  # max |logit diff| allowed, relative to max(1, max |float logit|)
    preprocessing: Preprocessing | None = None  # for models without metadata
    trust_model: bool = False  # run a SavedModel whose serving function has ops outside models.io.SAFE_OPS
    # tf2onnx in a second process beside the TFLite conversions (onnx_process); None: for large models only
    parallel_onnx: bool | None = None
    scheme: SchemeOptions = field(default_factory=SchemeOptions)
    calibration: CalibrationOptions = field(default_factory=CalibrationOptions)
    search: Int8SearchOptions = field(default_factory=Int8SearchOptions)
    qat: QatOptions = field(default_factory=QatOptions)

    def __init__(self, **given):
        """Keyword arguments only: the fields above, or the flat names of ``FLAT_NAMES`` (folded into their part)."""
        flat: dict[str, dict] = {part: {} for part in _PARTS}
        for name in list(given):
            if name in FLAT_NAMES:
                part, key = FLAT_NAMES[name]
                flat[part][key] = given.pop(name)
            elif name in _RENAMED:
                given[_RENAMED[name]] = given.pop(name)
        for f in fields(self):
            if f.name in _PARTS:
                part = given.pop(f.name, None) or _PARTS[f.name]()
                value = replace(part, **flat[f.name]) if flat[f.name] else part
            else:
                value = given.pop(f.name, f.default)
            object.__setattr__(self, f.name, value)
        if given:
            raise TypeError(f"ExportOptions got unknown options: {', '.join(sorted(given))}")
        self._check()

    def __getattr__(self, name: str):
        """The flat names of earlier versions, read through their part (``options.calib_samples``)."""
        if name in FLAT_NAMES:
            part, key = FLAT_NAMES[name]
            return getattr(getattr(self, part), key)
        if name in _RENAMED:
            return getattr(self, _RENAMED[name])
        raise AttributeError(f"'ExportOptions' object has no attribute {name!r}")

    def _check(self) -> None:
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
        _check(self.scheme.target == HOST or (self.int8 and Format.ONNX in fmts),
               f"--target {self.scheme.target} was given without an ONNX INT8 file to make.",
               "--target with --int8 and the onnx format (it sets the ONNX INT8 scheme; TFLite INT8 is the same "
               "file on every CPU)", "add --int8 (and onnx to --formats), or drop --target")
        _check(self.parity_samples >= 1, f"--parity-samples {self.parity_samples} is too small.",
               "1 or more test images (256 by default)")
        _check(self.fp32_tolerance > 0, f"FP32 tolerance {self.fp32_tolerance} must be positive.", "e.g. 1e-3")
        wants = self.search.requested
        _check(not wants or self.int8, f"{' and '.join(wants)} given without an INT8 target.",
               "--int8 (accuracy-aware INT8, its budget, float layers and the analysis apply to INT8 files only)",
               "add --int8, or drop " + " and ".join(wants))
        _check(not (self.int8_io and (self.int8_aware or self.search.float_layers)),
               "--int8-io cannot be combined with accuracy-aware INT8 or --int8-float-layers.",
               "float input/output when layers may stay float (TFLite's selective quantization keeps float I/O)",
               "drop --int8-io, or export a plain INT8 file with integer I/O")
        _check(not (self.int8_io and not self.int8 and not self.qat.epochs),
               "--int8-io was given without --int8.", "--int8-io together with --int8 (or --qat-epochs)",
               "add --int8")

    @property
    def int8_aware(self) -> bool:
        """Accuracy-aware INT8: asked for with ``search.accuracy_aware`` or by giving a budget."""
        return bool(self.int8 and (self.search.accuracy_aware or self.search.max_drop is not None))

    @property
    def max_drop(self) -> float:
        """The tuning-split top-1 budget in percentage points."""
        return self.search.budget

    @property
    def needs_tuning_split(self) -> bool:
        """Whether the export draws the tuning split (accuracy-aware INT8, or ``--analyze``)."""
        return bool(self.int8 and (self.int8_aware or self.search.analyze))

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
            if self.qat.epochs and fmt is Format.TFLITE:
                out.append(Target(fmt, Precision.INT8, qat=True))
        return out

    def onnx_int8(self, machine: str | None = None, flags=None) -> OnnxInt8Settings:
        """The ONNX INT8 scheme for ``scheme.target`` (``host``: this CPU, or ``machine``/``flags``), with the
        user's overrides."""
        return self.scheme.settings(machine, flags)

    @property
    def needs_calibration(self) -> bool:
        return any(t.precision is Precision.INT8 for t in self.targets())

    def with_int8_choice(self, calibration: CalibrationOptions, float_layers) -> "ExportOptions":
        """These options with the calibration and float layers an INT8 search chose."""
        return replace(self, calibration=calibration, search=replace(self.search, float_layers=tuple(float_layers)))

    def to_dict(self) -> dict:
        """The flat dict of the manifest's ``options.export`` block (the names of ``FLAT_NAMES``)."""
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in _PARTS}
        for name, (part, key) in FLAT_NAMES.items():
            d[name] = getattr(getattr(self, part), key)
        d["validate_samples"] = d.pop("parity_samples")
        d["formats"] = [f.value for f in self.formats]
        d["out_dir"] = str(self.out_dir) if self.out_dir else None
        d["preprocessing"] = self.preprocessing.to_dict() if self.preprocessing else None
        d["int8_float_layers"] = list(self.search.float_layers)
        d["search_calib_samples"] = list(self.search.search_calib_samples)
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
