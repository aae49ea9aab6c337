"""Classify images with any artifact: top-k classes with names and probabilities.

Nothing in the artifact or beside it is taken on faith (``resnet_deploy.untrusted``):

- the artifact must be a regular file (or a SavedModel folder); its manifest (or the .keras model's
  metadata sidecar) is read bounded and checked field by field (``untrusted.read_sidecar``), and an
  artifact's sha256 must be the one its manifest records;
- the model is loaded and run in a child process under a memory cap (``max_memory``, ``--max-memory``)
  and a timeout (``timeout_s``); a crash, an out-of-memory failure or a hang is one ``ModelRunError``;
- its outputs must be finite, one per class name; a model whose sidecar says it outputs
  probabilities must produce rows that are probabilities.

The child applies the checked preprocessing, so the same 32x32 pixels go to every format. Class
names come from the sidecar (CIFAR-10's names when a file has none).

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
from resnet_deploy.untrusted import DEFAULT_MAX_MEMORY, DEFAULT_TIMEOUT_S

SUM_TOLERANCE = 2e-2  # an INT8 artifact's dequantized probabilities sum to 1 within a few 1/256 steps


@dataclass
class ArtifactInfo:
    path: Path
    format: str
    precision: str | None
    class_names: list[str]
    declared_output: str | None  # "logits", "probabilities" or None (not stated)
    sidecar: Path | None  # the manifest / metadata file read, None when there is none
    preprocessing: dict | None = None  # the checked Preprocessing.to_dict(); None: raw pixels 0..255
    decoding: dict | None = None  # an image-folder export's {"size": (h, w), "fit"} (images.declared_decoding)


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

    @property
    def resize_method(self) -> str:
        from resnet_deploy.predict.images import resize_method

        return resize_method(self.fit, (self.artifact.decoding or {}).get("size"))
    accuracy: list[dict] = field(default_factory=list)  # one entry per labelled source

    def to_dict(self) -> dict:
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
            "scores": self.scores, "top_k": self.top_k, "resize": {"fit": self.fit, "method": self.resize_method},
            "predictions": preds, "accuracy": self.accuracy,
            "errors": [e.to_dict() for e in self.inputs.errors], "notes": list(self.inputs.notes),
        }


def artifact_info(path: str | os.PathLike) -> ArtifactInfo:
    """Format, precision, class names, preprocessing and the declared output kind, from the artifact's
    sidecar, every field checked; an artifact's sha256 is compared with its manifest's."""
    from resnet_deploy.config import Format
    from resnet_deploy.data.constants import CLASS_NAMES
    from resnet_deploy.errors import UntrustedFileError
    from resnet_deploy.terminal import safe
    from resnet_deploy.untrusted import check_regular, read_sidecar

    from resnet_deploy.untrusted.files import os_error

    try:
        path = resolve_artifact(path)
        fmt = Format.from_path(path)
        missing = not path.exists()
        if missing and os.path.lexists(path):  # a link to nothing, or a loop of links: say which
            os.stat(path)
    except OSError as exc:  # a name too long, a path through a file, a loop of links
        e = os_error(path, exc, "model")
        raise PredictError(e.what, expected=e.expected, fix=e.fix) from None
    if missing:
        raise PredictError(f"The artifact {safe(path)} does not exist.",
                           expected="a .tflite or .onnx file written by `resnet-deploy export`, or a .keras model",
                           fix="check the path (export writes <model>_<precision>.tflite/.onnx beside the model)")
    try:
        check_regular(path, "model", allow_dir=fmt is Format.KERAS)
        side = read_sidecar(path, fmt.value)
    except UntrustedFileError as exc:
        raise PredictError(exc.what, expected=exc.expected, fix=exc.fix) from None
    precision = "fp32" if fmt is Format.KERAS else side.precision
    from resnet_deploy.predict.images import declared_decoding

    return ArtifactInfo(path, fmt.value, precision, list(side.class_names or CLASS_NAMES), side.declared_output,
                        side.path, side.preprocessing, declared_decoding(side.doc))


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


def softmax(z: np.ndarray) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def looks_like_probabilities(out: np.ndarray) -> bool:
    """Every row non-negative, at most 1, and summing to 1 (within ``SUM_TOLERANCE``)."""
    out = np.asarray(out, np.float64)
    return bool(len(out)) and bool(np.all(out >= -1e-6) and np.all(out <= 1 + 1e-6)
                                   and np.all(np.abs(out.sum(axis=1) - 1) <= SUM_TOLERANCE))


def to_probabilities(out: np.ndarray, declared: str | None, source: str | os.PathLike = "the model"
                     ) -> tuple[np.ndarray, str]:
    """(probabilities, how they were obtained). Non-finite outputs are refused, and so is a declared
    "probabilities" output whose rows are not probabilities."""
    from resnet_deploy.terminal import safe

    out = np.asarray(out)
    bad = ~np.isfinite(out).all(axis=1) if out.ndim == 2 else np.zeros(0, bool)
    if bad.any():
        raise PredictError(f"{safe(source)} output NaN or infinity for {int(bad.sum())} of {len(out)} image(s).",
                           expected="finite scores for every image",
                           fix="the file is damaged or was exported from a broken model: re-export it")
    if declared == "logits":
        return softmax(out), "softmax of the logits (the sidecar says logits)"
    if declared == "probabilities":
        if len(out) and not looks_like_probabilities(out):
            sums = np.asarray(out, np.float64).sum(axis=1)
            raise PredictError(
                f"The sidecar of {safe(source)} says the model outputs probabilities, but its rows are not: they sum "
                f"to {sums.min():.4g} .. {sums.max():.4g} and range over {out.min():.4g} .. {out.max():.4g}.",
                expected=f"rows of values in [0, 1] that sum to 1 (within {SUM_TOLERANCE:g})",
                fix='correct the sidecar\'s "output_kind" (to "logits"), or delete the sidecar')
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


def classify(artifact: str | os.PathLike, inputs: list[str | os.PathLike], top_k: int = 3, fit: str | None = None,
             limit: int | None = None, batch_size: int = 256, threads: int | None = None,
             runtime: str | None = None, max_memory: int | None = DEFAULT_MAX_MEMORY,
             timeout_s: float | None = DEFAULT_TIMEOUT_S) -> Result:
    """Run ``artifact`` on every readable input, in ``runtime`` (default: its format's own; an .onnx file
    also runs in ``"openvino"``), in a child process capped at ``max_memory`` bytes (None: no cap) that
    may go ``timeout_s`` seconds without progress. Inputs that cannot be read are in
    ``result.inputs.errors``; an artifact that cannot be used, or a runtime that cannot run it or is not
    installed, raises ``PredictError`` before any image is read; a model that crashes, runs out of memory
    or hangs raises ``ModelRunError``."""
    from resnet_deploy.data.preprocess import Preprocessing
    from resnet_deploy.untrusted import run_model

    if limit is not None and limit < 1:
        raise PredictError(f"--limit {limit} selects no image.", expected="a positive number", fix="e.g. --limit 100")
    if batch_size < 1:
        raise PredictError(f"--batch-size {batch_size} is not positive.", expected="1 or more", fix="e.g. 256")
    if timeout_s is not None and not timeout_s > 0:
        raise PredictError(f"--timeout {timeout_s} is not a positive number of seconds.", expected="seconds > 0",
                           fix="e.g. --timeout 300")
    info = artifact_info(artifact)
    if runtime is not None:
        _check_runtime(runtime, info)
    n_classes = len(info.class_names)
    if not 1 <= top_k <= n_classes:
        raise PredictError(f"--top-k {top_k} is out of range for {n_classes} classes.",
                           expected=f"1 to {n_classes}", fix="e.g. --top-k 3")
    size = info.decoding["size"] if info.decoding else None  # an image-folder model: its size, and its policy
    fit = fit or (info.decoding["fit"] if info.decoding else "crop")  # unless --fit says otherwise
    data = collect([Path(p) for p in inputs], fit=fit, limit=limit, num_classes=n_classes, max_memory=max_memory,
                   size=size)
    ran_in = None
    out = np.zeros((0, n_classes), np.float32)
    if len(data):
        run = run_model(info.path, data.pixels, preprocessing=info.preprocessing or Preprocessing.pixels().to_dict(),
                        n_classes=n_classes, runtime=runtime, threads=threads, batch_size=batch_size,
                        max_memory=max_memory, timeout_s=timeout_s)
        ran_in, out = run.runtime, run.outputs
    probs, scores = to_probabilities(out, info.declared_output, info.path)
    top = top_k_indices(probs, top_k)
    return Result(info, ran_in, scores, top_k, fit, data, probs, top, accuracy_by_source(data, top))
