"""Seeded, class-balanced samples: calibration images come from the *training* split only.

An image folder's training split (``folder_data.FolderData``) is drawn from the same way, on its labels
in the folder's order; only the images drawn are decoded. Written from an array with
``write_image_folder``, a folder gives the array's indices, hence the same images.

Accuracy-aware INT8 adds a validation split, also drawn from the training split (the test split
only reports): ``validation_split`` draws it first, and ``calibration_sample(..., exclude=...)``
keeps the calibration images disjoint from it.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from resnet_deploy.data.constants import NUM_CLASSES
from resnet_deploy.data.sources import Split
from resnet_deploy.errors import DataError


def class_balanced_indices(y: np.ndarray, n: int, seed: int = 0,
                           exclude: np.ndarray | None = None) -> np.ndarray:
    """``n`` indices into ``y``, as equal per class as possible (the remainder goes to randomly
    chosen classes), drawn without replacement with ``seed``. Sorted ascending. Indices in
    ``exclude`` (e.g. a validation split) are never drawn, so two samples can be kept disjoint."""
    y = np.asarray(y)
    classes = np.unique(y)
    if exclude is not None and len(exclude):
        keep = np.ones(len(y), dtype=bool)
        keep[np.asarray(exclude, dtype=np.int64)] = False
        pool_idx = np.flatnonzero(keep)
        return pool_idx[class_balanced_indices(y[pool_idx], n, seed)]
    if n < 1:
        raise DataError(f"Cannot draw {n} calibration images.", expected="a positive count",
                        fix="pass --calib-samples 1 or more (a few hundred is typical)")
    if n > len(y):
        raise DataError(f"Cannot draw {n} images from a split of {len(y)}.",
                        expected=f"at most {len(y)}", fix="lower --calib-samples")
    rng = np.random.default_rng(seed)
    per = np.full(len(classes), n // len(classes))
    per[rng.choice(len(classes), n % len(classes), replace=False)] += 1
    chosen = []
    for c, k in zip(classes, per):
        pool = np.flatnonzero(y == c)
        if k > len(pool):
            raise DataError(f"Class {int(c)} has only {len(pool)} images, {k} were asked for.",
                            fix="lower --calib-samples")
        chosen.append(rng.choice(pool, k, replace=False))
    return np.sort(np.concatenate(chosen))


def indices_hash(idx: np.ndarray) -> str:
    """A short, stable fingerprint of a sample (sha256 of the int64 indices), for manifests."""
    return hashlib.sha256(np.asarray(idx, dtype="<i8").tobytes()).hexdigest()[:16]


@dataclass(frozen=True)
class CalibrationSample:
    x: np.ndarray  # uint8 pixels, (n, 32, 32, 3)
    y: np.ndarray
    indices: np.ndarray  # into the training split
    seed: int
    num_classes: int = NUM_CLASSES
    skipped: tuple = ()  # image-folder files drawn that could not be decoded (left out, counted)

    @property
    def recipe(self) -> dict:
        counts = np.bincount(self.y, minlength=self.num_classes)
        out = {
            "split": "train",
            "samples": int(len(self.indices)),
            "seed": self.seed,
            "class_balanced": True,
            "per_class": counts.tolist(),
            "indices_sha256_16": indices_hash(self.indices),
        }
        if self.skipped:
            out["skipped"] = [s.to_dict() for s in self.skipped[:20]]
            out["skipped_count"] = len(self.skipped)
        return out


def _gather(train, idx: np.ndarray, seed: int) -> CalibrationSample:
    """The sample ``idx`` of ``train``: an array split's rows, or an image folder's images decoded now
    (``FolderData.gather``: only these images; a file that cannot be decoded is left out and recorded)."""
    if hasattr(train, "gather"):
        x, y, kept, skipped = train.gather(idx)
        return CalibrationSample(x, y, kept, seed, train.num_classes, tuple(skipped))
    return CalibrationSample(train.x[idx], train.y[idx], idx, seed)


def calibration_sample(train: "Split | FolderData", n: int, seed: int = 0,
                       exclude: np.ndarray | None = None) -> CalibrationSample:
    """``n`` class-balanced training images; indices in ``exclude`` (the validation split) are never drawn."""
    if train.name != "train":
        raise DataError(f"Calibration must come from the training split, got {train.name!r}.",
                        fix="evaluation uses the test split; calibrate on training images")
    n_excluded = 0 if exclude is None else len(exclude)
    if n_excluded and n > len(train) - n_excluded:
        raise DataError(f"Cannot draw {n} calibration images beside a validation split of {n_excluded}: the "
                        f"training split has {len(train)} images.",
                        expected=f"calibration + validation images <= {len(train)}",
                        fix="lower --calib-samples or --val-samples")
    idx = class_balanced_indices(train.y, n, seed, exclude=exclude)
    return _gather(train, idx, seed)


def validation_split(train: "Split | FolderData", n: int, seed: int = 0) -> CalibrationSample:
    """The accuracy-aware INT8 validation split: ``n`` class-balanced *training* images drawn with ``seed``.
    It is the only data that decides a setting; calibration samples are drawn disjoint from it."""
    if train.name != "train":
        raise DataError(f"The INT8 validation split must come from the training split, got {train.name!r}.",
                        fix="the test split only reports; pass the training split")
    if not 1 <= n < len(train):
        raise DataError(f"Cannot draw a validation split of {n} from {len(train)} training images.",
                        expected=f"1 to {len(train) - 1} images, leaving some for calibration",
                        fix="choose --val-samples (a few thousand on the full CIFAR-10 training split)")
    idx = class_balanced_indices(train.y, n, seed)
    return _gather(train, idx, seed)
