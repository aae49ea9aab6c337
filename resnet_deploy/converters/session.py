"""The export session: what one export does once and every artifact of a format reuses.

A context manager around one temporary folder, which goes with it:

- ``saved_model(model)``: the float model traced once into a SavedModel, the very export
  ``TFLiteConverter.from_keras_model`` writes on each call under Keras 3 (an ``ExportArchive`` whose
  ``serve`` endpoint calls the model with ``training=False``); every TFLite file of this model is converted
  from it (``tflite_converter``: one ``from_saved_model`` converter, reused).
- ``start_onnx_process``/``take_onnx_process``: tf2onnx started in a second process beside the TFLite
  conversions (``onnx_process``), handed over once to the FP32 ONNX conversion.
- ``keep_onnx_fp32``/``onnx_fp32``: the FP32 ONNX file of this export (a private link to the converted
  file, so its commit may rename it meanwhile) with its sha256; the FP16 and INT8 ONNX files are made from
  it, so tf2onnx runs once per export.

A session without a model (``ExportSession()``) has no SavedModel and no FP32 ONNX file: the converters
then convert from the model they are given (the QAT twin, a single file).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

from resnet_deploy.converters.onnx_process import OnnxProcess


@dataclass(frozen=True)
class OnnxSource:
    """The FP32 ONNX file of this export, which its FP16 and INT8 files are made from."""

    path: Path
    sha256: str


class ExportSession:
    def __init__(self, model=None):
        self.model = model
        self._tmp = tempfile.TemporaryDirectory(prefix="rd-export-")
        self._saved_model: Path | None = None
        self._tflite_converter = None
        self._onnx_process: OnnxProcess | None = None
        self._onnx_fp32: OnnxSource | None = None

    def __enter__(self) -> "ExportSession":
        return self

    def __exit__(self, *exc) -> None:
        if self._onnx_process is not None:  # an export that ended before it needed the file (error, Ctrl-C)
            self._onnx_process.close()
        self._tmp.cleanup()

    @property
    def folder(self) -> Path:
        return Path(self._tmp.name)

    # TFLite ----------------------------------------------------------------------------------------
    @property
    def traced(self) -> bool:
        """Whether the float model has been traced into its SavedModel yet."""
        return self._saved_model is not None

    def saved_model(self, model) -> Path | None:
        """The SavedModel of ``model`` when it is this session's float model (None for another model, such as
        the QAT twin, and when Keras cannot export it: the caller then converts from the model itself)."""
        if model is None or model is not self.model:
            return None
        if self._saved_model is None:
            self._saved_model = _trace(model, self.folder / "saved_model")
            if self._saved_model is None:  # the converter's own path copes (it falls back to freezing the model)
                self.model = None
        return self._saved_model

    def tflite_converter(self, model, fresh: bool = False):
        """A ``TFLiteConverter.from_saved_model`` of ``model``'s SavedModel: the session's one converter, reused
        for each TFLite file (each ``from_saved_model`` loads the whole SavedModel again), or with ``fresh`` a new
        one (for the QuantizationDebugger, which changes the converter it is given). None where there is no
        SavedModel. The caller sets every conversion setting before each ``convert()``."""
        saved = self.saved_model(model)
        if saved is None:
            return None
        import tensorflow as tf

        if fresh:
            return tf.lite.TFLiteConverter.from_saved_model(str(saved))
        if self._tflite_converter is None:
            self._tflite_converter = tf.lite.TFLiteConverter.from_saved_model(str(saved))
        return self._tflite_converter

    # ONNX ------------------------------------------------------------------------------------------
    def start_onnx_process(self, model_path: Path, opset: int, trust: bool) -> None:
        """Start the FP32 ONNX conversion of ``model_path`` in a second process now."""
        self._onnx_process = OnnxProcess(model_path, opset, trust, self.folder / "tf2onnx-fp32.onnx")

    def take_onnx_process(self) -> OnnxProcess | None:
        """The tf2onnx process started for this export, handed over once (None when there is none)."""
        proc, self._onnx_process = self._onnx_process, None
        return proc

    def keep_onnx_fp32(self, path: Path) -> None:
        """Keep the just-converted FP32 ONNX file (a hard link, or a copy across file systems) under its own name
        in this session's folder, with its sha256, as the source of the FP16 and INT8 files."""
        import os
        import shutil

        from resnet_deploy.fileio import sha256_file

        kept = self.folder / Path(path).name
        kept.unlink(missing_ok=True)
        try:
            os.link(path, kept)
        except OSError:
            shutil.copyfile(path, kept)
        self._onnx_fp32 = OnnxSource(kept, sha256_file(kept))

    @property
    def onnx_fp32(self) -> OnnxSource | None:
        return self._onnx_fp32


def _trace(model, path: Path) -> Path | None:
    """``model`` written as a SavedModel at ``path`` the way ``from_keras_model`` writes it; None when Keras
    cannot export it."""
    import contextlib
    import functools
    import io

    import keras
    import tensorflow as tf

    try:
        archive = keras.export.ExportArchive()
        archive.track(model)
        spec = [tf.TensorSpec(t.shape, t.dtype, name=t.name) for t in model.inputs]
        archive.add_endpoint("serve", functools.partial(model.__call__, training=False),
                             spec if len(spec) == 1 else [spec])
        with contextlib.redirect_stdout(io.StringIO()):
            archive.write_out(str(path), verbose=False)
    except Exception:
        return None
    return path
