"""What every converter returns (the same shape for each format)."""

from __future__ import annotations

from dataclasses import dataclass, field

from resnet_deploy.artifact import TensorSpec


@dataclass
class ConvertResult:
    input: TensorSpec
    output: TensorSpec
    settings: dict = field(default_factory=dict)  # converter settings that made the file
    ops: dict = field(default_factory=dict)  # op-type counts and the integer check (quantized targets)
    calibration: dict | None = None  # how INT8 ranges were found (method, types, sample recipe)


# Ops that carry the arithmetic: all of them must be integer in a full-integer artifact.
TFLITE_COMPUTE_OPS = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED", "BATCH_MATMUL", "TRANSPOSE_CONV")
ONNX_COMPUTE_OPS = ("Conv", "Gemm", "MatMul", "ConvTranspose")
