"""Load an artifact and predict on float images: Keras, LiteRT, ONNX Runtime."""

from __future__ import annotations

import os

from resnet_deploy.config import Format
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.runtimes.base import Runner


def runner_class(fmt: Format) -> type[Runner]:
    if fmt is Format.KERAS:
        from resnet_deploy.runtimes.keras_runner import KerasRunner

        return KerasRunner
    if fmt is Format.TFLITE:
        from resnet_deploy.runtimes.litert_runner import LiteRTRunner

        return LiteRTRunner
    from resnet_deploy.runtimes.onnx_runner import OnnxRunner

    return OnnxRunner


def open_runner(path: str | os.PathLike, preprocessing: Preprocessing | None = None,
                threads: int | None = None, batch_size: int = 256) -> Runner:
    """A runner for ``path`` chosen by its format. Preprocessing: given, else the artifact's manifest
    (or a model's metadata), else raw pixels 0..255 (the convention of resnet-deploy's models)."""
    fmt = Format.from_path(path)
    if preprocessing is None:
        preprocessing = recorded_preprocessing(path, fmt)
    return runner_class(fmt)(path, preprocessing=preprocessing, threads=threads, batch_size=batch_size)


def recorded_preprocessing(path, fmt: Format) -> Preprocessing:
    if fmt is Format.KERAS:
        from resnet_deploy.models.io import read_metadata

        meta = read_metadata(path)
        return Preprocessing.from_dict(meta.get("preprocessing") if meta else None)
    from resnet_deploy.artifact import read_manifest

    m = read_manifest(path)
    return m.preprocessing_spec if m else Preprocessing.pixels()


__all__ = ["Runner", "open_runner", "runner_class", "recorded_preprocessing"]
