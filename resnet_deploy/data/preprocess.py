"""The one preprocessing definition.

Models built by resnet-deploy carry their normalisation as their first layer and take RGB pixel
values 0..255 (``Preprocessing.pixels()``), so artifacts need no preprocessing code on a device.
A foreign model that expects other inputs declares it with ``Preprocessing(scale=..., mean=...,
std=...)``; training, calibration, evaluation and every runtime call ``preprocess`` with the
spec recorded in the model's metadata or the artifact's manifest.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from resnet_deploy.data.constants import CIFAR10_MEAN, CIFAR10_STD
from resnet_deploy.errors import ResnetDeployError


@dataclass(frozen=True)
class Preprocessing:
    """x_model = (pixels * scale - mean) / std, applied per channel to RGB NHWC pixels 0..255.

    ``mean``/``std`` are in the units *after* scaling; ``None`` means no normalisation.
    """

    scale: float = 1.0
    mean: tuple[float, float, float] | None = None
    std: tuple[float, float, float] | None = None
    layout: str = "NHWC"
    color: str = "RGB"

    def __post_init__(self):
        if not (self.scale > 0):
            raise ResnetDeployError(f"Preprocessing scale must be positive, got {self.scale}.",
                                    fix="use 1.0 for 0..255 inputs or 1/255 for 0..1 inputs")
        if (self.mean is None) != (self.std is None):
            raise ResnetDeployError("Preprocessing needs both mean and std, or neither.",
                                    fix="give --mean and --std together")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                if len(v) != 3:
                    raise ResnetDeployError(f"Preprocessing {name} needs 3 values (R, G, B), got {v}.")
                object.__setattr__(self, name, tuple(float(a) for a in v))
        if self.std is not None and min(self.std) <= 0:
            raise ResnetDeployError(f"Preprocessing std must be positive, got {self.std}.")
        if self.layout != "NHWC":
            raise ResnetDeployError(f"Only NHWC layout is supported, got {self.layout}.")

    # Presets -----------------------------------------------------------------------------
    @classmethod
    def pixels(cls) -> "Preprocessing":
        """Raw RGB pixels 0..255 as float32: the convention of models built by resnet-deploy."""
        return cls()

    @classmethod
    def unit_range(cls) -> "Preprocessing":
        """Pixels scaled to 0..1."""
        return cls(scale=1 / 255)

    @classmethod
    def standardized(cls) -> "Preprocessing":
        """Pixels standardised with the CIFAR-10 training mean/std."""
        return cls(scale=1.0, mean=CIFAR10_MEAN, std=CIFAR10_STD)

    @property
    def is_identity(self) -> bool:
        return self.scale == 1.0 and self.mean is None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["mean"] = list(self.mean) if self.mean else None
        d["std"] = list(self.std) if self.std else None
        d["convention"] = "x = (pixels * scale - mean) / std, pixels RGB 0..255"
        return d

    @classmethod
    def from_dict(cls, d: dict | None) -> "Preprocessing":
        if not d:
            return cls.pixels()
        return cls(scale=float(d.get("scale", 1.0)), mean=d.get("mean"), std=d.get("std"),
                   layout=d.get("layout", "NHWC"), color=d.get("color", "RGB"))


def preprocess(pixels: np.ndarray, spec: Preprocessing | None = None) -> np.ndarray:
    """uint8 (or float) RGB NHWC pixels 0..255 -> float32 model input, per ``spec``."""
    spec = spec or Preprocessing.pixels()
    x = np.asarray(pixels, dtype=np.float32)
    if spec.scale != 1.0:
        x = x * np.float32(spec.scale)
    if spec.mean is not None:
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return x
