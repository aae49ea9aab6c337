"""CIFAR-10 sources, preprocessing and the calibration sampler."""

from resnet_deploy.data.constants import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES
from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.data.sampler import CalibrationSample, calibration_sample, class_balanced_indices, indices_hash
from resnet_deploy.data.sources import Cifar10, Split, channel_stats, load_cifar10

__all__ = [
    "CIFAR10_MEAN", "CIFAR10_STD", "CLASS_NAMES", "IMAGE_SHAPE", "NUM_CLASSES", "Preprocessing", "preprocess",
    "CalibrationSample", "calibration_sample", "class_balanced_indices", "indices_hash", "Cifar10", "Split",
    "channel_stats", "load_cifar10",
]
