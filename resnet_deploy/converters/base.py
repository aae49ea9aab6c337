"""What every converter takes and returns (the same shape for each format).

A converter is a function ``convert(session, plan) -> ConvertResult``: ``session`` is the export's
``session.ExportSession`` (what is done once per export), ``plan`` one ``ArtifactPlan`` (the file to write,
the model it comes from, the options and calibration it is made with).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from resnet_deploy.artifact import TensorSpec
from resnet_deploy.records import Int8Record

# Ops that carry the arithmetic: all of them must be integer in a full-integer artifact.
TFLITE_COMPUTE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV")
ONNX_COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")


@dataclass(frozen=True)
class ArtifactPlan:
    """One file to make: ``target`` written at ``path`` from ``model`` (the float model, or the QAT twin) with
    ``options`` (an INT8 search's choices folded in) and ``calibration``. ``int8_record`` and ``qat`` go into its
    manifest (``int8_accuracy``, ``options.qat``)."""

    target: Any  # options.Target
    path: Path
    model: Any
    options: Any  # options.ExportOptions
    calibration: Any = None  # calibration.Calibration, for INT8 targets
    int8_record: Int8Record | None = None
    qat: dict | None = None

    def at(self, path: Path) -> "ArtifactPlan":
        """The same plan, writing ``path`` (the export converts into a stage folder)."""
        return replace(self, path=Path(path))


@dataclass(frozen=True)
class ConvertResult:
    """What a converter read back from the file it wrote."""

    input: TensorSpec
    output: TensorSpec
    settings: dict = field(default_factory=dict)  # converter settings that made the file
    ops: dict = field(default_factory=dict)  # op-type counts and the integer check (quantized targets)
    calibration: dict | None = None  # how INT8 ranges were found (the manifest's calibration block)
