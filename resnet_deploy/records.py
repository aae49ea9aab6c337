"""Typed records for the JSON blocks the tool writes and reads back: frozen dataclasses with
``to_json()`` (the exact JSON block) and ``from_json()`` (tolerant of blocks written by earlier versions:
a missing key is None).

- manifest blocks: ``SourceModel`` (``source_model``), ``ParityCheck`` (``validation``: the parity check
  against the float model), ``Int8Calibration`` (``calibration``);
- the accuracy-aware INT8 record (``int8_accuracy``): ``Int8Record`` with its ``Try`` rows, ``SearchLog``,
  ``Analysis``, ``Fallback``, ``Int8Result`` and ``QatVerdict``.

The manifest (``artifact.Manifest``) keeps each block as the JSON it reads and writes, and hands out these
records (``manifest.parity``, ``manifest.int8_record``, ...), so code reads fields, not string keys.
The JSON names stay those of the manifest format (``val_top1`` is the tuning split's top-1, as it was
named before the split had its own name).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar


def _json(v: Any) -> Any:
    if isinstance(v, Record):
        return v.to_json()
    if isinstance(v, (list, tuple)):
        return [_json(x) for x in v]
    if isinstance(v, dict):
        return {k: _json(x) for k, x in v.items()}
    return v


class Record:
    """``to_json``/``from_json`` for a frozen dataclass: fields in order under their own names, except those
    with ``json=False`` metadata (in memory only); ``OMIT_NONE`` fields are left out when None. A field with
    ``record`` metadata holds a record (or, with ``many``, a list of them)."""

    OMIT_NONE: ClassVar[tuple[str, ...]] = ()

    def to_json(self) -> dict:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if not f.metadata.get("json", True) or (v is None and f.name in self.OMIT_NONE):
                continue
            out[f.name] = _json(v)
        return out

    @classmethod
    def from_json(cls, d: dict | None):
        if d is None:
            return None
        if not isinstance(d, dict):
            raise TypeError(f"{cls.__name__}: expected a JSON object, got {type(d).__name__}")
        kw = {}
        for f in fields(cls):
            if f.name not in d or not f.metadata.get("json", True):
                continue
            v, sub = d[f.name], f.metadata.get("record")
            if sub is not None and v is not None:
                v = [sub.from_json(x) for x in v] if f.metadata.get("many") else sub.from_json(v)
            kw[f.name] = v
        return cls(**kw)


def nested(cls, many: bool = False, **kw):
    """A field holding a ``cls`` record (``many``: a list of them)."""
    return field(metadata={"record": cls, "many": many}, **kw)


# Manifest blocks ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SourceModel(Record):
    """The float model an artifact was made from (``source_model``). ``path`` is relative to the manifest's
    folder (absolute only where no relative path exists), ``abs_path`` where it was at export."""

    path: str | None = None
    abs_path: str | None = None
    sha256: str | None = None
    architecture: str | None = None
    width: float | None = None
    stem: str | None = None
    has_metadata: bool | None = None


@dataclass(frozen=True)
class ParityCheck(Record):
    """The parity check of an artifact against the float model on the first test images (the manifest's
    ``validation`` block). ``*_logit_diff`` hold the differences whatever the output is; a model whose outputs
    are probabilities also has them as ``*_prob_diff``. FP32: ``tolerance`` and ``passed``; lossy precisions:
    an expected agreement, recorded, not enforced (``passed`` None)."""

    OMIT_NONE = ("max_abs_prob_diff", "mean_abs_prob_diff", "tolerance", "expected_top1_agreement", "note",
                 "below_expectation")

    max_abs_logit_diff: float | None = None
    mean_abs_logit_diff: float | None = None
    top1_agreement: float | None = None
    output: str = "logits"  # or "probabilities"
    max_abs_prob_diff: float | None = None
    mean_abs_prob_diff: float | None = None
    samples: int | None = None
    images: str | None = None  # e.g. "test[:256]"
    top1_accuracy: float | None = None
    float_top1_accuracy: float | None = None
    runtime: str | None = None
    tolerance: dict | None = None  # FP32: {"max_abs_logit_diff": limit}
    passed: bool | None = None
    expected_top1_agreement: float | None = None
    note: str | None = None
    below_expectation: bool | None = None

    @property
    def unit(self) -> str:
        """``prob`` or ``logit``: what the differences are in."""
        return "prob" if self.output == "probabilities" else "logit"

    @property
    def max_abs_diff(self) -> float | None:
        return self.max_abs_logit_diff

    @property
    def mean_abs_diff(self) -> float | None:
        return self.mean_abs_logit_diff


@dataclass(frozen=True)
class Int8Calibration(Record):
    """How an INT8 file's ranges were found (the manifest's ``calibration`` block); the ONNX INT8 file's also
    carries its scheme: the types, the target CPU, who chose each and why (``onnx_rules.OnnxInt8Settings``)."""

    OMIT_NONE = ("reader_batch", "pre_process", "float_layers", "nodes_to_exclude", "activation_type", "weight_type",
                 "reduce_range", "target", "requested_target", "chosen_by", "reason", "cpu", "scheme",
                 "optimum_preset")

    tool: str | None = None
    method: str | None = None
    activations: str | None = None
    weights: str | None = None
    activation_type: str | None = None
    weight_type: str | None = None
    reduce_range: bool | None = None
    target: str | None = None
    requested_target: str | None = None
    chosen_by: dict | None = None
    reason: dict | None = None
    cpu: dict | None = None
    scheme: str | None = None
    optimum_preset: str | None = None
    pre_process: str | None = None
    reader_batch: int | None = None
    sample: dict | None = None
    float_layers: list | None = None
    nodes_to_exclude: list | None = None

    @property
    def activation_kind(self) -> str:
        """uint8 or int8; manifests written before the scheme rule say only ``activations: "uint8 per-tensor"``."""
        return self.activation_type or (self.activations or "uint8").split()[0]


# The accuracy-aware INT8 record ------------------------------------------------------------------------
@dataclass(frozen=True)
class Setting(Record):
    """One calibration setting the search tries."""

    calib_samples: int
    method: str = "minmax"
    per_channel: bool = True
    activations: str = "int8"  # "int16": TFLite 16x8 (int16 activations, int8 weights)


@dataclass(frozen=True)
class Score(Record):
    """An INT8 file scored on the tuning split against the float model: top-1, its drop in percentage points
    (positive = worse) and top-1 agreement with the float model."""

    val_top1: float
    val_drop_pp: float
    val_agreement: float


@dataclass(frozen=True)
class Try(Record):
    """One INT8 file the search made and scored; ``file`` is where it was (in memory only)."""

    phase: str
    calib_samples: int
    method: str
    per_channel: bool
    calib_indices_sha256_16: str
    float_layers: list
    val_top1: float
    val_drop_pp: float
    val_agreement: float
    convert_s: float
    eval_s: float
    file: Path | None = field(default=None, metadata={"json": False}, compare=False)
    activations: str = "int8"
    val_kl: float | None = None  # mean KL(float || this file) per tuning image, nats
    gain_vs: str | None = None  # the try this one is compared with (the plain export, or the fallback's best)
    kl_gain: list | None = None  # [mean, low, high] of the paired per-image KL reduction over gain_vs (95 %)
    val_change_interval_pp: list | None = None  # paired bootstrap 95 % interval of the top-1 change vs float

    OMIT_NONE: ClassVar[tuple[str, ...]] = ("val_kl", "gain_vs", "kl_gain", "val_change_interval_pp")

    @property
    def setting(self) -> Setting:
        return Setting(self.calib_samples, self.method, self.per_channel, self.activations)

    @property
    def score(self) -> Score:
        return Score(self.val_top1, self.val_drop_pp, self.val_agreement)


@dataclass(frozen=True)
class SearchLog(Record):
    time_budget_s: float
    stopped: str
    tries: list = nested(Try, many=True)
    winner: dict | None = None  # the winning setting and its score


@dataclass(frozen=True)
class Analysis(Record):
    """The per-layer INT8 error table (``int8_analysis``); ``layers`` are its ranked rows."""

    images: str
    tool: str
    score: str
    layers: list


@dataclass(frozen=True)
class Fallback(Record):
    needed: bool
    tries: int
    float_layers: list
    manual_float_layers: list
    latency: dict | None = None  # the float layers' cost at batch 1: before/after ms, ratio


@dataclass(frozen=True)
class Int8Result(Record):
    met_budget: bool
    note: str
    val_top1: float
    val_drop_pp: float
    val_agreement: float
    calibration: dict  # the chosen Setting


@dataclass(frozen=True)
class QatVerdict(Record):
    """The QAT INT8 file against the accuracy-aware PTQ one on the tuning split: QAT is kept only when it wins."""

    OMIT_NONE = ("fine_tuning",)

    keep: bool
    winner: str
    margin_pp: float
    note: str
    qat: dict  # its Score
    ptq: dict
    fine_tuning: dict | None = None


@dataclass(frozen=True)
class Int8Record(Record):
    """The manifest's ``int8_accuracy`` block: the tuning split (``validation``, its recipe) and, for an
    accuracy-aware export, the search, the analysis, the fallback and the result; for ``--analyze`` alone, the
    analysis only."""

    OMIT_NONE = ("budget_pp", "float_val_top1", "selection", "search", "fallback", "result", "seconds", "qat")

    validation: dict  # the tuning split's recipe
    analysis: Analysis = nested(Analysis)
    budget_pp: float | None = None
    float_val_top1: float | None = None
    selection: str | None = None
    search: SearchLog | None = nested(SearchLog, default=None)
    fallback: Fallback | None = nested(Fallback, default=None)
    result: Int8Result | None = nested(Int8Result, default=None)
    seconds: float | None = None
    calibration_indices_sha256_16: str | None = None
    validation_indices_sha256_16: str | None = None
    disjoint: bool | None = None
    qat: QatVerdict | None = nested(QatVerdict, default=None)

    @property
    def searched(self) -> bool:
        """An accuracy-aware record (not ``--analyze`` alone)."""
        return self.result is not None
