"""CIFAR-10 constants, defined once for training, calibration, evaluation and metadata."""

from __future__ import annotations

CLASS_NAMES: tuple[str, ...] = (
    "airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck",
)  # official batches.meta order
NUM_CLASSES = 10
IMAGE_SHAPE = (32, 32, 3)  # height, width, channels (NHWC, RGB)

PER_CLASS = {"train": 5_000, "test": 1_000}

# Per-channel mean and standard deviation of the training split, in pixel units (0..255),
# i.e. the usual (0.4914, 0.4822, 0.4465) / (0.2470, 0.2435, 0.2616) times 255.
CIFAR10_MEAN = (125.307, 122.961, 113.8575)  # pixel units, RGB
CIFAR10_STD = (62.9932, 62.0887, 66.7048)  # pixel units, RGB
