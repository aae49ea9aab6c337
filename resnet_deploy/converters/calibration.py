"""The one calibration sample every INT8 converter reads.

CIFAR-10 *training* images (or an image folder's ``train/`` split, decoded at the model's input size with the
run's resize policy: only the images drawn are decoded), class-balanced and seeded (``data.calibration_sample``),
passed through the same ``preprocess`` as evaluation. The TFLite representative dataset and the ONNX Runtime
calibration reader iterate over the same float array, and the recipe (split, count, seed, per-class
counts, hash of the indices, preprocessing) goes into every INT8 manifest.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.data.sampler import calibration_sample, indices_hash
from resnet_deploy.data.sources import Split


@dataclass(frozen=True)
class Calibration:
    x: np.ndarray  # float32 model inputs (preprocessed), (n, 32, 32, 3)
    recipe: dict
    indices: np.ndarray | None = None  # into the training split

    def __len__(self) -> int:
        return len(self.x)

    def batches(self, batch_size: int = 1):
        """Float32 batches in a fixed order (the converters calibrate on identical data)."""
        for i in range(0, len(self.x), batch_size):
            yield self.x[i:i + batch_size]

    def representative_dataset(self):
        """For ``TFLiteConverter.representative_dataset``: one image per step."""
        for b in self.batches(1):
            yield [b]


def build_calibration(train: "Split | FolderData", n: int, seed: int, spec: Preprocessing,
                      exclude: np.ndarray | None = None) -> Calibration:
    """The calibration sample, preprocessed; ``exclude``: training indices never drawn (the validation split)."""
    sample = calibration_sample(train, n, seed, exclude=exclude)
    recipe = dict(sample.recipe)
    if exclude is not None:
        recipe["disjoint_from"] = f"validation split ({len(exclude)} training images, indices {indices_hash(exclude)})"
    recipe["preprocessing"] = spec.to_dict()
    if hasattr(train, "decoding"):  # an image folder: which one, and how its images became model input
        recipe["source"] = {"layout": "image-folder", "root": str(train.folder.root), "split": train.name}
        recipe["decoding"] = train.decoding.record()
    return Calibration(preprocess(sample.x, spec), recipe, sample.indices)


def onnx_reader(calibration: Calibration, input_name: str, batch_size: int = 16):
    """An ``onnxruntime.quantization.CalibrationDataReader`` over the calibration sample."""
    from onnxruntime.quantization import CalibrationDataReader

    class _Reader(CalibrationDataReader):
        def __init__(self):
            self._it = iter(calibration.batches(batch_size))

        def get_next(self):
            b = next(self._it, None)
            return None if b is None else {input_name: b}

        def rewind(self):
            self._it = iter(calibration.batches(batch_size))

    return _Reader()
