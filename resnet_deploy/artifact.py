"""The manifest that travels with every exported artifact (``<artifact>.json``).

It carries the recipe that made the artifact and everything a runtime needs to feed it the same
images as the float model: format, precision, I/O dtypes and quantization parameters,
preprocessing, class names, the source model and its sha256, the artifact's sha256 and size,
the calibration recipe, the parity check's figures, tool and library versions, and for accuracy-aware
INT8 the record of how its calibration and float layers were chosen (``int8_accuracy``).

The manifest keeps each block as the JSON it reads and writes (the file format), and hands out typed
records of them (``records``): ``parity``, ``source``, ``int8_calibration``, ``int8_record``.

``TensorSpec`` is the one description of a model input or output: the manifest's ``input``/``output``
and what a runner reports of the loaded model (``Runner.io_spec``).
"""

from __future__ import annotations

import datetime as _dt
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from resnet_deploy import __version__
from resnet_deploy.data.constants import CLASS_NAMES
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.errors import ResnetDeployError
from resnet_deploy.fileio import sha256_file, sidecar_path, write_json_atomic
from resnet_deploy.records import Int8Calibration, Int8Record, ParityCheck, SourceModel

MANIFEST_VERSION = 1


def _view(record, block: str, doc: str) -> property:
    """A read-only typed record of one JSON block of the manifest (None when the block is absent)."""
    return property(lambda self: record.from_json(getattr(self, block)), doc=doc)


@dataclass(frozen=True)
class TensorSpec:
    """One model input or output: shape (None for a dynamic dimension), dtype ("float32", "int8", "uint8",
    "float16") and, for an integer tensor, its quantization (real = scale * (q - zero_point); scale 0: raw
    integers; None: not an integer tensor, or ONNX, which keeps it in QuantizeLinear nodes)."""

    name: str
    shape: tuple
    dtype: str
    scale: float | None = None
    zero_point: int | None = None

    def __post_init__(self):
        object.__setattr__(self, "shape", tuple(self.shape))

    def to_dict(self) -> dict:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "TensorSpec":
        return cls(**d)


@dataclass
class Manifest:
    format: str  # keras | tflite | onnx
    precision: str  # fp32 | fp16 | dynamic_int8 | int8
    artifact: str  # file name, relative to the manifest
    sha256: str
    size_bytes: int
    input: TensorSpec
    output: TensorSpec
    preprocessing: dict = field(default_factory=lambda: Preprocessing.pixels().to_dict())
    class_names: list = field(default_factory=lambda: list(CLASS_NAMES))
    # {"path": relative to this manifest's folder (absolute only where no relative path exists),
    #  "abs_path": where it was at export, "sha256", "architecture", "width", "stem", "has_metadata"}
    source_model: dict | None = None
    # INT8 only: sampler recipe, method; ONNX INT8 also activation_type, weight_type, reduce_range, target,
    # requested_target, scheme, chosen_by and reason (user or automatic, and why), cpu (what "host" was resolved on)
    calibration: dict | None = None
    options: dict = field(default_factory=dict)  # converter options that made it
    validation: dict | None = None  # parity figures against the float model
    # accuracy-aware INT8 / --analyze: validation split recipe and hash, calibration hash, the search's tries
    # and winner, the per-layer error table, the float fallback layers, latency cost, budget met or not
    int8_accuracy: dict | None = None
    tool: dict = field(default_factory=lambda: {"name": "resnet-deploy", "version": __version__})
    libraries: dict = field(default_factory=dict)
    machine: dict = field(default_factory=dict)
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    manifest_version: int = MANIFEST_VERSION

    def to_dict(self) -> dict:
        d = asdict(self)
        d["input"], d["output"] = self.input.to_dict(), self.output.to_dict()
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "Manifest":
        d = dict(d)
        known = {f for f in cls.__dataclass_fields__}
        d["input"] = TensorSpec.from_dict(d["input"])
        d["output"] = TensorSpec.from_dict(d["output"])
        return cls(**{k: v for k, v in d.items() if k in known})

    # Typed views of the blocks (``records``) ---------------------------------------------------
    parity = _view(ParityCheck, "validation", "The parity check against the float model (``validation``).")
    source = _view(SourceModel, "source_model", "The float model the artifact was made from.")
    int8_calibration = _view(Int8Calibration, "calibration", "How the INT8 ranges were found, and the ONNX scheme.")
    int8_record = _view(Int8Record, "int8_accuracy", "How accuracy-aware INT8 (or ``--analyze``) chose this file.")

    @property
    def model_output(self) -> dict:
        """What the float model outputs (``options.model_output``: kind, last layer, note), {} when unrecorded."""
        return (self.options or {}).get("model_output") or {}

    @property
    def preprocessing_spec(self) -> Preprocessing:
        return Preprocessing.from_dict(self.preprocessing)

    def save(self, artifact_path: str | os.PathLike) -> Path:
        side = sidecar_path(artifact_path)
        write_json_atomic(side, self.to_dict())
        return side


def read_manifest(artifact_path: str | os.PathLike) -> Manifest | None:
    """The artifact's manifest, or None when the file has none (it still benches with defaults)."""
    from resnet_deploy.untrusted.files import read_json

    side = sidecar_path(artifact_path)
    if not side.exists():
        return None
    doc = read_json(side, "manifest")  # a regular file (a FIFO never blocks), bounded size and depth, an object
    try:
        return Manifest.from_dict(doc)
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise ResnetDeployError(f"The manifest {side} is unreadable: {type(exc).__name__}: {exc}",
                                expected="the JSON written by `resnet-deploy export`",
                                fix="re-export the artifact, or delete the manifest to bench with defaults") from exc


def file_facts(path: str | os.PathLike) -> dict[str, Any]:
    p = Path(path)
    size = sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) if p.is_dir() else p.stat().st_size
    return {"sha256": sha256_file(p), "size_bytes": size}
