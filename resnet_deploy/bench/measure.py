"""The measurement of one file: ``FileSession`` opens it once and then answers the run's requests,
in whatever process it lives in (its own child process, see ``bench.child``, or the caller's):

- ``open``: import the engine, load the file through the runner of its format with the preprocessing
  resolved for the run (``bench.contract``), check its I/O against a CIFAR-10 classifier and against
  its manifest, time the first inference;
- ``series(batch, n)``: ``n`` timed calls at one batch size (one block of an interleaved round);
- ``memory()``: what loading and running the file added to its process (``latency.MemoryMeter``);
- ``logits(images)``: the test-set pass, in chunks, with a heartbeat after each.

Every request returns plain data (picklable); failures raise ``ResnetDeployError``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from resnet_deploy.data.constants import IMAGE_SHAPE, NUM_CLASSES
from resnet_deploy.errors import BenchError

ACCURACY_CHUNK = 1024  # test images between two heartbeats of the accuracy pass (rounded to whole batches)
Progress = Callable[[str], None]


@dataclass(frozen=True)
class FileSpec:
    """How to open one file: everything the child needs, nothing it must guess."""

    path: Path
    preprocessing: dict  # Preprocessing.to_dict() of the run's input contract for this file
    threads: int
    runtime: str | None = None  # runtimes.DEFAULT_RUNTIME of the file's format when None
    eval_batch_size: int = 256
    latency_images: np.ndarray | None = None  # uint8 NHWC images timed batches are cut from
    manifest_input: dict | None = None  # the manifest's input TensorSpec (dtype, scale, zero_point), if any
    num_classes: int = NUM_CLASSES  # class scores expected: an image folder's class count, else CIFAR-10's
    image_shape: tuple = IMAGE_SHAPE  # (H, W, 3) the run decodes images to: the model's input size


class FileSession:
    def __init__(self, spec: FileSpec, reset_peak: bool = False):
        self.spec = spec
        self.reset_peak = reset_peak
        self.runner = None
        self.meter = None
        self._batches: dict[int, np.ndarray] = {}

    def open(self, progress: Progress) -> dict:
        from resnet_deploy.bench.latency import MemoryMeter
        from resnet_deploy.config import Format
        from resnet_deploy.data.preprocess import Preprocessing, preprocess
        from resnet_deploy.runtimes import open_runner

        t0 = time.perf_counter()
        fmt = Format.from_path(self.spec.path)
        _import_engine(fmt, self.spec.runtime)  # the engine's import is part of what a user pays before the first inference
        import_s = time.perf_counter() - t0
        self.meter = MemoryMeter(reset=self.reset_peak)  # the baseline: imports done, latency images here
        t0 = time.perf_counter()
        self.runner = open_runner(self.spec.path, preprocessing=Preprocessing.from_dict(self.spec.preprocessing),
                                  threads=self.spec.threads, batch_size=self.spec.eval_batch_size,
                                  runtime=self.spec.runtime)
        self.runner.load()
        load_s = time.perf_counter() - t0
        io = self.runner.io_spec()
        check_io(self.spec.path, io, self.spec.num_classes, tuple(self.spec.image_shape))
        check_manifest_input(self.spec.path, io, self.spec.manifest_input)
        x1 = preprocess(self._images()[:1], self.runner.preprocessing)
        t1 = time.perf_counter()
        first = self.runner.predict_preprocessed(x1)
        first_s = time.perf_counter() - t1
        check_logits(first, 1, self.spec.path, self.spec.num_classes)
        progress("loaded")
        return {"runtime": self.runner.describe(), "io": io.to_dict(), "supports_batch": self.runner.supports_batch,
                "timing": {"import_s": import_s, "load_s": load_s, "first_run_s": first_s,
                           "first_inference_s": load_s + first_s}}

    def series(self, batch: int, n: int, progress: Progress) -> np.ndarray:
        """Seconds of each of ``n`` calls on one preprocessed batch of ``batch`` images."""
        from resnet_deploy.data.preprocess import preprocess

        if batch not in self._batches:
            self._batches[batch] = preprocess(cycle(self._images(), batch), self.runner.preprocessing)
        x, call = self._batches[batch], self.runner.predict_preprocessed
        times = np.empty(n, np.float64)
        for i in range(n):
            t0 = time.perf_counter_ns()
            call(x)
            times[i] = (time.perf_counter_ns() - t0) / 1e9
        progress(f"batch {batch} x {n}")
        return times

    def memory(self, progress: Progress) -> dict:
        return self.meter.read()

    def logits(self, images: np.ndarray, progress: Progress) -> dict:
        t0 = time.perf_counter()
        bs = self.spec.eval_batch_size
        chunk = bs * max(1, ACCURACY_CHUNK // bs)
        parts = []
        for i in range(0, len(images), chunk):
            parts.append(self.runner.predict(images[i:i + chunk], batch_size=bs))
            progress(f"accuracy {min(i + chunk, len(images))}/{len(images)}")
        logits = np.concatenate(parts) if parts else np.zeros((0, self.spec.num_classes), np.float32)
        check_logits(logits, len(images), self.spec.path, self.spec.num_classes)
        return {"logits": logits, "accuracy_pass_s": time.perf_counter() - t0}

    def close(self, progress: Progress | None = None) -> None:
        if self.runner is not None:
            self.runner.close()
            self.runner = None

    def _images(self) -> np.ndarray:
        if self.spec.latency_images is not None and len(self.spec.latency_images):
            return self.spec.latency_images
        return np.random.default_rng(0).integers(0, 256, (1, *self.spec.image_shape), dtype=np.uint8)


REQUESTS = ("open", "series", "memory", "logits", "close")  # what a FileSession answers


def _import_engine(fmt, runtime: str | None = None) -> None:
    import importlib

    from resnet_deploy.runtimes import engine_module

    importlib.import_module(engine_module(fmt, runtime))


def check_io(path: Path, io, num_classes: int = NUM_CLASSES, image_shape: tuple = IMAGE_SHAPE) -> None:
    """A clear error for a model that does not take the run's images (CIFAR-10's 32x32x3, or an image folder's
    at the reference model's input size) and return one score per class."""
    in_shape, out_shape = tuple(io.input.shape), tuple(io.output.shape)
    dims_ok = len(in_shape) == 4 and all(d is None or d == e for d, e in zip(in_shape[1:], image_shape))
    out_ok = len(out_shape) == 2 and out_shape[-1] in (None, num_classes)
    if not dims_ok or not out_ok:
        kind = "a CIFAR-10 classifier" if tuple(image_shape) == IMAGE_SHAPE and num_classes == NUM_CLASSES \
            else "a classifier of the run's images"
        raise BenchError(f"{path} takes input {_fmt(in_shape)} and returns {_fmt(out_shape)}.",
                         expected=f"{kind}: input "
                                  f"(N, {', '.join(map(str, image_shape))}) NHWC, output (N, {num_classes}) scores",
                         fix="bench artifacts exported from one model, on the data it was made for (--data)")


def check_manifest_input(path: Path, io, declared: dict | None) -> None:
    """The file's own input tensor must be the one its manifest declares (dtype, and the quantization of
    an integer input): a manifest that describes another file would feed it wrongly scaled images."""
    if not declared:
        return
    got = io.input
    same = declared.get("dtype") == got.dtype
    if same and got.scale is not None and declared.get("scale") is not None:
        same = np.isclose(float(declared["scale"]), got.scale, rtol=1e-6) and \
            int(declared.get("zero_point") or 0) == int(got.zero_point or 0)
    if not same:
        raise BenchError(f"{path} takes {got.dtype} input (scale {got.scale}, zero point {got.zero_point}), but its "
                         f"manifest declares {declared.get('dtype')} (scale {declared.get('scale')}, zero point "
                         f"{declared.get('zero_point')}).",
                         expected="the input tensor the manifest was written for",
                         fix="re-export the artifact, or delete its manifest to bench it with defaults")


def check_logits(logits: np.ndarray, n: int, path: Path, num_classes: int = NUM_CLASSES) -> None:
    if logits.shape != (n, num_classes) or not np.all(np.isfinite(logits)):
        bad = "non-finite values" if logits.shape == (n, num_classes) else f"shape {logits.shape}"
        raise BenchError(f"{path} returned {bad} for {n} images.",
                         expected=f"({n}, {num_classes}) finite logits", fix="re-export the artifact")


def cycle(images: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(images))
    return np.concatenate([images] * reps)[:n] if reps > 1 else images[:n]


def _fmt(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")" if shape is not None else "?"
