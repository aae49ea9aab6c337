"""What every converter returns (the same shape for each format)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

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


class ExportWork:
    """What one export does once and every artifact of a format reuses (a context manager: its temporary
    folder goes with it).

    - ``saved_model(model)``: the float model traced once into a SavedModel, the very export
      ``TFLiteConverter.from_keras_model`` writes on each call under Keras 3 (an ``ExportArchive`` whose
      ``serve`` endpoint calls the model with ``training=False``); every TFLite file of this model is
      converted from it with ``from_saved_model``.
    - ``onnx_fp32``: the FP32 ONNX file of this export (``keep_onnx_fp32``: a private link to the converted
      file, so its commit may rename it meanwhile); the FP16 and INT8 ONNX files are made from it, so tf2onnx
      runs once per export. They convert while it is validated and are committed only after it has passed
      (``export._export_all`` commits in order and stops at the first failure).
    """

    def __init__(self, model=None):
        import tempfile

        self.model = model
        self.onnx_fp32: Path | None = None
        self.onnx_fp32_sha256: str | None = None
        self.onnx_process = None  # onnx_process.OnnxProcess: tf2onnx started beside the TFLite conversions
        self._tmp = tempfile.TemporaryDirectory(prefix="rd-export-")
        self._saved_model: Path | None = None
        self._tflite_converter = None
        self.seconds: dict[str, float] = {}  # shared steps, for the manifest and benchmarks/export_time.py

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.onnx_process is not None:  # an export that ended before it needed the file (error, Ctrl-C)
            self.onnx_process.close()
        self._tmp.cleanup()

    def start_onnx_process(self, model_path: Path, opset: int, trust: bool) -> None:
        """Start the FP32 ONNX conversion of ``model_path`` in a second process now (``onnx_process``)."""
        from resnet_deploy.converters.onnx_process import OnnxProcess

        self.onnx_process = OnnxProcess(model_path, opset, trust, Path(self._tmp.name) / "tf2onnx-fp32.onnx")

    def keep_onnx_fp32(self, path: Path) -> None:
        """Keep the just-converted FP32 ONNX file (a hard link, or a copy across file systems) under its own name
        in this export's folder, with its sha256, as the source of the FP16 and INT8 files."""
        import os
        import shutil

        from resnet_deploy.fileio import sha256_file

        kept = Path(self._tmp.name) / Path(path).name
        kept.unlink(missing_ok=True)
        try:
            os.link(path, kept)
        except OSError:
            shutil.copyfile(path, kept)
        self.onnx_fp32, self.onnx_fp32_sha256 = kept, sha256_file(kept)

    def tflite_converter(self, model):
        """One ``TFLiteConverter.from_saved_model`` of ``model``'s SavedModel, reused for each TFLite file (each
        ``from_saved_model`` loads the whole SavedModel again); None where there is no SavedModel. The caller
        sets every conversion setting before each ``convert()`` (``tflite._configure``)."""
        saved = self.saved_model(model)
        if saved is None:
            return None
        if self._tflite_converter is None:
            import tensorflow as tf

            self._tflite_converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        return self._tflite_converter

    def saved_model(self, model) -> Path | None:
        """The SavedModel of ``model`` when it is this export's float model (None for another model, such as
        the QAT twin, and when Keras cannot export it: the caller then converts from the model itself)."""
        if model is not self.model or self.model is None:
            return None
        if self._saved_model is None:
            import contextlib
            import functools
            import io
            import time

            import keras
            import tensorflow as tf

            t0 = time.perf_counter()
            path = Path(self._tmp.name) / "saved_model"
            try:
                archive = keras.export.ExportArchive()
                archive.track(model)
                spec = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in model.inputs]
                archive.add_endpoint("serve", functools.partial(model.__call__, training=False),
                                     spec if len(spec) == 1 else [spec])
                with contextlib.redirect_stdout(io.StringIO()):
                    archive.write_out(str(path), verbose=False)
            except Exception:  # the converter's own path copes (it falls back to freezing the model)
                self.model = None
                return None
            self._saved_model = path
            self.seconds["saved_model"] = round(time.perf_counter() - t0, 3)
        return self._saved_model
