"""Runner shape shared by every engine (after Polygraphy's backend runners).

A runner is a context manager: ``with open_runner(path) as r: logits = r.predict(pixels)``.
``predict`` takes uint8 or float RGB NHWC pixels 0..255, checks them, applies the artifact's
recorded preprocessing, and calls the engine's ``_predict_impl`` batch by batch; engines that
take integer input quantize it themselves, so callers always pass the same images. Timing lives
in ``bench``, not here.
"""

from __future__ import annotations

import abc
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnet_deploy.artifact import TensorSpec
from resnet_deploy.data.constants import IMAGE_SHAPE
from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.errors import ResnetDeployError


def quantize(x: np.ndarray, scale: float, zero_point: int, dtype) -> np.ndarray:
    """real -> integer: round(x / scale) + zero_point, saturated to ``dtype``. Scale 0 (no quantization
    parameters): ``x`` already holds the integer values, rounded and saturated the same way."""
    info = np.iinfo(dtype)
    q = np.round(x / scale) + zero_point if scale else np.round(x)
    return np.clip(q, info.min, info.max).astype(dtype)


def dequantize(q: np.ndarray, scale: float, zero_point: int) -> np.ndarray:
    """integer -> real: (q - zero_point) * scale; scale 0 (no quantization parameters): the raw values."""
    if not scale:
        return q.astype(np.float32)
    return (q.astype(np.float32) - zero_point) * np.float32(scale)


TensorInfo = TensorSpec  # the name of earlier versions: one tensor-spec type, the manifest's


@dataclass(frozen=True)
class IOSpec:
    """What a runner feeds its model and reads back (after Polygraphy's ``get_input_metadata``): the
    preprocessing it applies to RGB pixels 0..255, and the engine's own input and output tensors."""

    preprocessing: Preprocessing
    input: TensorSpec
    output: TensorSpec

    def to_dict(self) -> dict:
        return {"preprocessing": self.preprocessing.to_dict(), "input": self.input.to_dict(),
                "output": self.output.to_dict()}


class Runner(abc.ABC):
    name = "base"

    def __init__(self, path: str | os.PathLike, preprocessing: Preprocessing | None = None,
                 threads: int | None = None, batch_size: int = 256):
        self.path = Path(path)
        self.preprocessing = preprocessing or Preprocessing.pixels()
        self.threads = threads
        self.batch_size = batch_size
        self._loaded = False

    # Lifecycle ---------------------------------------------------------------------------
    def __enter__(self) -> "Runner":
        self.load()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def load(self) -> None:
        if not self.path.exists():
            raise ResnetDeployError(f"{self.path} does not exist.", fix="check the path")
        self._load_impl()
        self._loaded = True

    def close(self) -> None:
        self._loaded = False

    # Inference ---------------------------------------------------------------------------
    def predict(self, pixels: np.ndarray, batch_size: int | None = None) -> np.ndarray:
        """Float32 logits (N, classes) for RGB NHWC pixels 0..255."""
        if not self._loaded:
            raise RuntimeError(f"{type(self).__name__}.predict called before load() / with-block")
        pixels = np.asarray(pixels)
        if pixels.ndim == 3:
            pixels = pixels[None]
        want = self.image_shape()
        if pixels.ndim != 4 or tuple(pixels.shape[1:]) != want:
            raise ResnetDeployError(f"{self.name} got images of shape {pixels.shape}.",
                                    expected=f"(N, {', '.join(map(str, want))}) RGB pixels 0..255")
        bs = batch_size or self.batch_size
        if not self.supports_batch:
            bs = 1
        outs = [self.predict_preprocessed(preprocess(pixels[i:i + bs], self.preprocessing))
                for i in range(0, len(pixels), bs)]
        return np.concatenate(outs).astype(np.float32, copy=False)

    def image_shape(self) -> tuple:
        """(H, W, 3): the loaded model's NHWC input size (any HxW: an image-folder model); CIFAR-10's 32x32x3
        where the model leaves a dimension dynamic or its input is not NHWC RGB."""
        try:
            shape = tuple(self._io_impl()[0].shape)
        except Exception:  # a runner that cannot say: the CIFAR-10 convention
            return IMAGE_SHAPE
        if len(shape) != 4 or shape[-1] != 3:
            return IMAGE_SHAPE
        return tuple(int(d) if isinstance(d, (int, np.integer)) and d > 0 else e
                     for d, e in zip(shape[1:], IMAGE_SHAPE))

    def predict_preprocessed(self, x: np.ndarray) -> np.ndarray:
        """One batch of already-preprocessed float32 input; the hot path bench times."""
        return self._predict_impl(x)

    @property
    def supports_batch(self) -> bool:
        return True

    def io_spec(self) -> IOSpec:
        """The loaded model's input contract: preprocessing, input and output tensors (after load())."""
        if not self._loaded:
            raise RuntimeError(f"{type(self).__name__}.io_spec called before load() / with-block")
        tensor_in, tensor_out = self._io_impl()
        return IOSpec(self.preprocessing, tensor_in, tensor_out)

    @abc.abstractmethod
    def _io_impl(self) -> tuple[TensorSpec, TensorSpec]: ...

    @abc.abstractmethod
    def _load_impl(self) -> None: ...

    @abc.abstractmethod
    def _predict_impl(self, x: np.ndarray) -> np.ndarray: ...

    def describe(self) -> dict:
        return {"runtime": self.name, "threads": self.threads}
