"""Classify images with any artifact: top-k classes with names and probabilities.

The artifact's runner (``resnet_deploy.runtimes.open_runner``) applies the preprocessing recorded in
its manifest (or the .keras model's metadata sidecar), so the same 32x32 pixels go to every format.
Class names come from the same sidecar (CIFAR-10's names when a file has none).

Probabilities: resnet-deploy's models output logits (the metadata says ``"output": "logits (no
softmax)"``), so predict applies a softmax. A model whose sidecar says it outputs probabilities, or,
without such a statement, whose every output row is non-negative and sums to 1 (a softmax last
layer), is used as it is: a second softmax would flatten its probabilities towards uniform.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_deploy.predict.images import Inputs, PredictError, collect

SUM_TOLERANCE = 2e-2  # an INT8 artifact's dequantized probabilities sum to 1 within a few 1/256 steps


@dataclass
class ArtifactInfo:
    path: Path
    format: str
    precision: str | None
    class_names: list[str]
    declared_output: str | None  # "logits", "probabilities" or None (not stated)
    sidecar: Path | None  # the manifest / metadata file read, None when there is none


@dataclass
class Result:
    artifact: ArtifactInfo
    runtime: str | None
    scores: str  # how the probabilities were obtained
    top_k: int
    fit: str
    inputs: Inputs
    probabilities: np.ndarray  # (N, classes)
    top: np.ndarray  # (N, k) class indices, most likely first
    accuracy: list[dict] = field(default_factory=list)  # one entry per labelled source

    def to_dict(self) -> dict:
        from resnet_deploy.predict.images import RESIZE_METHOD

        names = self.artifact.class_names
        preds = []
        for i, name in enumerate(self.inputs.names):
            label = int(self.inputs.labels[i])
            entry = {"input": name,
                     "top": [{"class": names[c], "index": int(c), "probability": float(self.probabilities[i, c])}
                             for c in self.top[i]]}
            if label >= 0:
                entry["label"] = {"class": names[label], "index": label}
                entry["correct"] = bool(self.top[i, 0] == label)
            preds.append(entry)
        a = self.artifact
        return {
            "artifact": str(a.path), "format": a.format, "precision": a.precision, "runtime": self.runtime,
            "sidecar": str(a.sidecar) if a.sidecar else None, "class_names": list(names),
            "scores": self.scores, "top_k": self.top_k, "resize": {"fit": self.fit, "method": RESIZE_METHOD[self.fit]},
            "predictions": preds, "accuracy": self.accuracy,
            "errors": [e.to_dict() for e in self.inputs.errors], "notes": list(self.inputs.notes),
        }


def artifact_info(path: str | os.PathLike) -> ArtifactInfo:
    """Format, precision, class names and the declared output kind, from the artifact's sidecar."""
    from resnet_deploy.config import Format
    from resnet_deploy.data.constants import CLASS_NAMES
    from resnet_deploy.fileio import sidecar_path

    path = resolve_artifact(path)
    fmt = Format.from_path(path)
    if not path.exists():
        raise PredictError(f"The artifact {path} does not exist.",
                           expected="a .tflite or .onnx file written by `resnet-deploy export`, or a .keras model",
                           fix="check the path (export writes <model>_<precision>.tflite/.onnx beside the model)")
    side = sidecar_path(path)
    if fmt is Format.KERAS:
        from resnet_deploy.models.io import read_metadata

        meta = read_metadata(path) or {}
        precision = "fp32"
        names = meta.get("class_names")
        declared = _declared_output(meta)
    else:
        from resnet_deploy.artifact import read_manifest

        m = read_manifest(path)
        meta = m.to_dict() if m else {}
        precision = m.precision if m else None
        names = m.class_names if m else None
        declared = _declared_output(meta)
    return ArtifactInfo(path, fmt.value, precision, list(names or CLASS_NAMES), declared,
                        side if side.exists() else None)


ARTIFACT_SUFFIXES = (".tflite", ".onnx", ".keras", ".h5", ".hdf5")


def resolve_artifact(spec: str | os.PathLike) -> Path:
    """A path, or a pretrained model's short name (``resnet20-cifar10``) as the other commands take it."""
    path = Path(spec)
    if path.exists() or path.suffix.lower() in ARTIFACT_SUFFIXES:
        return path
    from resnet_deploy.models.pretrained import resolve_model

    return Path(resolve_model(spec))  # a ModelError listing the pretrained names when it is none


def _check_runtime(runtime: str, info: ArtifactInfo) -> None:
    from resnet_deploy.config import Format
    from resnet_deploy.errors import ResnetDeployError
    from resnet_deploy.runtimes import check_runtime

    try:
        check_runtime(runtime, Format(info.format), option="--runtime")
    except ResnetDeployError as exc:
        raise PredictError(exc.what, expected=exc.expected, fix=exc.fix) from None


def _declared_output(meta: dict) -> str | None:
    """What a sidecar says the model outputs: ``output_kind`` ("logits"/"probabilities"), or the model
    metadata's ``output`` text ("logits (no softmax)")."""
    kind = meta.get("output_kind")
    if kind in ("logits", "probabilities"):
        return kind
    text = meta.get("output")
    if isinstance(text, str):
        t = text.lower()
        if "logit" in t:
            return "logits"
        if "probabilit" in t or ("softmax" in t and "no softmax" not in t):
            return "probabilities"
    return None


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def looks_like_probabilities(out: np.ndarray) -> bool:
    """Every row non-negative, at most 1, and summing to 1 (within ``SUM_TOLERANCE``)."""
    out = np.asarray(out, np.float64)
    return bool(len(out)) and bool(np.all(out >= -1e-6) and np.all(out <= 1 + 1e-6)
                                   and np.all(np.abs(out.sum(axis=1) - 1) <= SUM_TOLERANCE))


def to_probabilities(out: np.ndarray, declared: str | None) -> tuple[np.ndarray, str]:
    """(probabilities, how they were obtained)."""
    if declared == "logits":
        return softmax(out), "softmax of the logits (the sidecar says logits)"
    if declared == "probabilities":
        return np.asarray(out, np.float64), "the model's own (the sidecar says probabilities)"
    if looks_like_probabilities(out):
        return np.asarray(out, np.float64), "the model's own (every output row sums to 1)"
    return softmax(out), "softmax of the outputs (rows do not sum to 1: logits)"


def top_k_indices(probs: np.ndarray, k: int) -> np.ndarray:
    """(N, k) class indices by falling probability; ties keep the lower index first."""
    return np.argsort(-probs, axis=1, kind="stable")[:, :k]


def accuracy_by_source(inputs: Inputs, top: np.ndarray) -> list[dict]:
    out = []
    sources = np.asarray(inputs.sources, dtype=object)
    for src in dict.fromkeys(inputs.sources):
        sel = (sources == src) & (inputs.labels >= 0)
        n = int(sel.sum())
        if not n:
            continue
        y = inputs.labels[sel]
        top1 = int((top[sel, 0] == y).sum())
        topk = int((top[sel] == y[:, None]).any(axis=1).sum())
        out.append({"source": src, "images": n, "top1_correct": top1, "top1": top1 / n,
                    "topk_correct": topk, "topk": topk / n, "k": int(top.shape[1])})
    return out


def classify(artifact: str | os.PathLike, inputs: list[str | os.PathLike], top_k: int = 3, fit: str = "crop",
             limit: int | None = None, batch_size: int = 256, threads: int | None = None,
             runtime: str | None = None) -> Result:
    """Run ``artifact`` on every readable input, in ``runtime`` (default: its format's own; an .onnx file
    also runs in ``"openvino"``). Inputs that cannot be read are in ``result.inputs.errors``; an artifact
    that cannot be used, or a runtime that cannot run it or is not installed, raises ``PredictError``
    (or the runtime's ``ResnetDeployError``) before any image is read."""
    if limit is not None and limit < 1:
        raise PredictError(f"--limit {limit} selects no image.", expected="a positive number", fix="e.g. --limit 100")
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size} is not positive.", expected="1 or more", fix="e.g. 256")
    info = artifact_info(artifact)
    if runtime is not None:
        _check_runtime(runtime, info)
    n_classes = len(info.class_names)
    if not 1 <= top_k <= n_classes:
        raise PredictError(f"--top-k {top_k} is out of range for {n_classes} classes.",
                           expected=f"1 to {n_classes}", fix="e.g. --top-k 3")
    data = collect([Path(p) for p in inputs], fit=fit, limit=limit, num_classes=n_classes)
    ran_in = None
    out = np.zeros((0, n_classes), np.float32)
    if len(data):
        from resnet_deploy.runtimes import open_runner

        with open_runner(info.path, threads=threads, batch_size=batch_size, runtime=runtime) as runner:
            ran_in = runner.name
            out = runner.predict(data.pixels)
        if out.ndim != 2 or out.shape[1] != n_classes:
            where = f"its sidecar {info.sidecar.name}" if info.sidecar else "CIFAR-10 (no sidecar found)"
            raise PredictError(f"{info.path} outputs shape {out.shape[1:]}, but {where} names {n_classes} classes.",
                               expected="one score per class name",
                               fix="use the manifest written with this artifact by `resnet-deploy export`")
    probs, scores = to_probabilities(out, info.declared_output)
    top = top_k_indices(probs, top_k)
    return Result(info, ran_in, scores, top_k, fit, data, probs, top, accuracy_by_source(data, top))
