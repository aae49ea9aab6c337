"""Choices shared by every stage, as ``str`` Enums (so they print and serialise as text).

Stage-specific configurations are frozen dataclasses that live beside the code that uses them
(``training/recipe.py``, ``converters/options.py``, ``bench/options.py``) and validate themselves
in ``__post_init__``.
"""

from __future__ import annotations

from enum import Enum


class Format(str, Enum):
    KERAS = "keras"
    TFLITE = "tflite"
    ONNX = "onnx"

    @classmethod
    def from_path(cls, path) -> "Format":
        from pathlib import Path

        from resnet_deploy.errors import ModelError

        p = Path(path)
        suffix = p.suffix.lower()
        if suffix in (".keras", ".h5", ".hdf5") or (p.is_dir() and (p / "saved_model.pb").exists()):
            return cls.KERAS
        if suffix == ".tflite":
            return cls.TFLITE
        if suffix == ".onnx":
            return cls.ONNX
        raise ModelError(
            f"Cannot tell the format of {p}.",
            expected="a .keras/.h5 file or SavedModel folder, a .tflite file, or a .onnx file",
            fix="rename the file with its real extension or pass a supported artifact",
        )


class Precision(str, Enum):
    FP32 = "fp32"
    FP16 = "fp16"
    DYNAMIC_INT8 = "dynamic_int8"  # int8 weights, float activations
    INT8 = "int8"  # full integer: int8 weights and activations
