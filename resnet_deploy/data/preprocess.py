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
        object.__setattr__(self, "scale", _number(self.scale, "scale"))
        if not self.scale > 0:
            raise PreprocessingError(f"Preprocessing scale must be positive, got {self.scale}.",
                                     expected="a finite number > 0",
                                     fix="use 1.0 for 0..255 inputs or 1/255 for 0..1 inputs")
        if (self.mean is None) != (self.std is None):
            raise PreprocessingError("Preprocessing needs both mean and std, or neither.",
                                     fix="give --mean and --std together")
        for name in ("mean", "std"):
            v = getattr(self, name)
            if v is not None:
                if isinstance(v, (str, bytes, dict)) or not hasattr(v, "__len__") or len(v) != 3:
                    raise PreprocessingError(f"Preprocessing {name} needs 3 values (R, G, B), got {v!r}.",
                                             expected="three finite numbers", fix=f"e.g. {name} [125.3, 123.0, 113.9]")
                object.__setattr__(self, name, tuple(_number(a, name) for a in v))
        if self.std is not None and not min(self.std) > 0:
            raise PreprocessingError(f"Preprocessing std must be positive, got {self.std}.",
                                     expected="three finite numbers > 0 (in the units after scaling)",
                                     fix="e.g. CIFAR-10's 63.0, 62.1, 66.7 for 0..255 pixels")
        self._check_range()
        if self.layout != "NHWC":
            raise PreprocessingError(f"Only NHWC layout is supported, got {self.layout!r}.", expected="NHWC")
        if self.color != "RGB":
            raise PreprocessingError(f"Only RGB channel order is supported, got {self.color!r}.", expected="RGB",
                                     fix="export the model for RGB input (its manifest must say color RGB)")

    def _check_range(self) -> None:
        """What 0..255 pixels become must be usable numbers: a spread of 1e-3 to 1e6 per channel (not every
        image squeezed onto one value, not float32 overflow) and an offset of at most 1e6 spreads."""
        std = self.std or (1.0, 1.0, 1.0)
        mean = self.mean or (0.0, 0.0, 0.0)
        for c in range(3):
            spread = 255 * self.scale / std[c]
            offset = abs(mean[c]) / std[c]
            if not (SPREAD_RANGE[0] <= spread <= SPREAD_RANGE[1]) or offset > SPREAD_RANGE[1]:
                raise PreprocessingError(
                    f"Preprocessing scale {self.scale:g}, mean {mean[c]:g}, std {std[c]:g} (channel {'RGB'[c]}) "
                    f"turns pixels 0..255 into a span of {spread:.3g} around {0.0 - mean[c] / std[c]:.3g}.",
                    expected=f"a span of {SPREAD_RANGE[0]:g} to {SPREAD_RANGE[1]:g} (e.g. 255 for raw pixels, 1 "
                             "for 0..1, about 4 for standardised inputs): anything else gives every image the "
                             "same answer or overflows float32",
                    fix="check scale, mean and std (mean and std are in the units after scaling)")

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
        """The spec a manifest or metadata file records; anything malformed is a ``PreprocessingError``."""
        if d is None or d == {}:
            return cls.pixels()
        if not isinstance(d, dict):
            raise PreprocessingError(f"Preprocessing must be a JSON object, got {type(d).__name__} {_short(d)}.",
                                     expected='{"scale": 1.0, "mean": null, "std": null}',
                                     fix="re-export the artifact (or delete the sidecar to use raw pixels 0..255)")
        for key in ("layout", "color"):
            if not isinstance(d.get(key, ""), str):
                raise PreprocessingError(f"Preprocessing {key} must be a string, got {_short(d.get(key))}.")
        return cls(scale=d.get("scale", 1.0), mean=d.get("mean"), std=d.get("std"),
                   layout=d.get("layout", "NHWC"), color=d.get("color", "RGB"))


class PreprocessingError(ResnetDeployError):
    """A preprocessing spec that cannot be applied: wrong types, non-finite or implausible numbers."""


SPREAD_RANGE = (1e-3, 1e6)  # what the 0..255 pixel range may become after preprocessing, per channel


def _number(v, name: str) -> float:
    """``v`` as a finite float; a bool, a string, None or NaN/inf is a ``PreprocessingError``."""
    import math
    import numbers

    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise PreprocessingError(f"Preprocessing {name} must be a number, got {type(v).__name__} {_short(v)}.",
                                 expected="finite numbers", fix="re-export the artifact, or fix the value")
    f = float(v)
    if not math.isfinite(f) or abs(f) > 3.4e38:
        raise PreprocessingError(f"Preprocessing {name} must be finite, got {v!r}.",
                                 expected="finite numbers (NaN or infinity gives every image the same answer)",
                                 fix="re-export the artifact, or fix the value")
    return f


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def preprocess(pixels: np.ndarray, spec: Preprocessing | None = None) -> np.ndarray:
    """uint8 (or float) RGB NHWC pixels 0..255 -> float32 model input, per ``spec``."""
    spec = spec or Preprocessing.pixels()
    x = np.asarray(pixels, dtype=np.float32)
    if spec.scale != 1.0:
        x = x * np.float32(spec.scale)
    if spec.mean is not None:
        x = (x - np.asarray(spec.mean, np.float32)) / np.asarray(spec.std, np.float32)
    return x
