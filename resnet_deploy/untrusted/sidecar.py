"""The JSON beside a model or artifact, checked field by field before anything uses it.

An artifact's manifest (``model_int8.tflite.json``) and a float model's metadata (``model.keras.json``)
are read with ``files.read_json`` (bounded size and depth, an object at the top), then every field a
command relies on is checked: types, finite and plausible numbers (the preprocessing through
``Preprocessing.from_dict``), class names (a list of distinct, non-empty strings), the declared output
kind, and for an artifact its format and sha256, which is compared with the file's own. Fields nobody
reads are left alone. Anything wrong is an ``UntrustedFileError`` naming the file and the field.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

from resnet_deploy.errors import ResnetDeployError, UntrustedFileError
from resnet_deploy.terminal import safe

MAX_CLASSES = 100_000
MAX_NAME_CHARS = 256
OUTPUT_KINDS = ("logits", "probabilities")


@dataclass(frozen=True)
class Sidecar:
    """What a command may use from a sidecar, checked (``read_sidecar``)."""

    path: Path | None  # the JSON file read; None when there is none
    format: str | None
    precision: str | None
    sha256: str | None  # an artifact's, already compared with the file
    class_names: tuple[str, ...] | None  # None: not given (CIFAR-10's apply)
    preprocessing: dict | None  # Preprocessing.to_dict() of the checked spec; None: raw pixels 0..255
    declared_output: str | None  # "logits", "probabilities" or None (not stated)
    doc: dict  # the whole document, for fields checked elsewhere


def read_sidecar(path: str | os.PathLike, fmt: str, verify_sha256: bool = True) -> Sidecar:
    """The checked sidecar of the model or artifact at ``path`` (``fmt``: keras, tflite or onnx): an
    artifact's manifest must record the file's own sha256 (``verify_sha256``); a missing sidecar gives
    an empty ``Sidecar`` (the defaults apply)."""
    from resnet_deploy.fileio import sidecar_path
    from resnet_deploy.untrusted.files import check_regular, check_sha256, read_json

    side = sidecar_path(path)
    if not os.path.lexists(side):
        return Sidecar(None, None, None, None, None, None, None, {})
    check_regular(side, "manifest")
    what = "metadata file" if fmt == "keras" else "manifest"
    doc = read_json(side, what)
    checked = check_fields(doc, side, artifact=fmt != "keras")
    declared_format = checked["format"]
    if declared_format is not None and fmt != "keras" and declared_format != fmt:
        raise _bad(side, f"format {declared_format!r}, but {safe(Path(path).name)} is a {fmt} file",
                   "the manifest written with this file")
    sha = checked["sha256"]
    if fmt != "keras" and verify_sha256:
        check_sha256(path, sha, side)
    return Sidecar(side, declared_format, checked["precision"], sha, checked["class_names"], checked["preprocessing"],
                   checked["declared_output"], doc)


def check_fields(doc: dict, side: str | os.PathLike, artifact: bool) -> dict:
    """The fields of ``doc`` that commands use, checked; raises ``UntrustedFileError``."""
    from resnet_deploy.config import Precision
    from resnet_deploy.data.preprocess import Preprocessing

    out = {"format": _opt_str(doc, "format", side), "precision": _opt_str(doc, "precision", side)}
    precisions = tuple(p.value for p in Precision)
    if artifact and out["precision"] is not None and out["precision"] not in precisions:  # a model's: its training's
        raise _bad(side, f"precision {out['precision']!r} is not one of {', '.join(precisions)}")
    out["sha256"] = doc.get("sha256")
    if artifact and out["sha256"] is None:
        raise _bad(side, "no sha256 of the file it describes", "the manifest export writes (it records the sha256)",
                   fix='re-export the artifact, or add "sha256": "<sha256sum of the file>" to the manifest')
    out["class_names"] = check_class_names(doc.get("class_names"), side)
    try:
        pre = doc.get("preprocessing")
        out["preprocessing"] = None if pre is None else Preprocessing.from_dict(pre).to_dict()
    except ResnetDeployError as exc:
        raise _bad(side, f"preprocessing: {exc.what}", exc.expected) from None
    out["declared_output"] = declared_output(doc, side)
    for key in ("input", "output"):  # a manifest's tensors; a metadata file's "output" is a sentence
        if doc.get(key) is not None and (artifact or not isinstance(doc[key], str)):
            check_tensor_spec(doc[key], key, side)
    return out


def check_class_names(names, side) -> tuple[str, ...] | None:
    """A list of 1 to 100,000 distinct, non-empty strings of at most 256 characters, or None."""
    if names is None:
        return None
    if not isinstance(names, list):
        raise _bad(side, f"class_names is a {type(names).__name__} ({safe(repr(names))[:60]}), not a list",
                   'a list of names, one per model output: ["airplane", "automobile", ...]')
    if not 1 <= len(names) <= MAX_CLASSES:
        raise _bad(side, f"class_names has {len(names)} entries", f"1 to {MAX_CLASSES:,} names")
    for i, n in enumerate(names):
        if not isinstance(n, str) or not n.strip() or len(n) > MAX_NAME_CHARS:
            shown = safe(repr(n))[:60]
            raise _bad(side, f"class_names[{i}] is {shown}",
                       f"non-empty strings of at most {MAX_NAME_CHARS} characters")
    if len(set(names)) != len(names):
        dup = next(n for n in names if names.count(n) > 1)
        raise _bad(side, f"class_names names {safe(repr(dup))[:60]} more than once", "one distinct name per class")
    return tuple(names)


def declared_output(doc: dict, side) -> str | None:
    """What the sidecar says the model outputs: ``output_kind`` ("logits"/"probabilities"), or the model
    metadata's ``output`` text ("logits (no softmax)"); None when it says nothing."""
    kind = doc.get("output_kind")
    if kind is not None:
        if kind not in OUTPUT_KINDS:
            raise _bad(side, f"output_kind {safe(repr(kind))[:60]}", " or ".join(OUTPUT_KINDS))
        return kind
    text = doc.get("output")
    if isinstance(text, str):
        t = text.lower()
        if "logit" in t:
            return "logits"
        if "probabilit" in t or ("softmax" in t and "no softmax" not in t):
            return "probabilities"
    return None


def check_tensor_spec(spec, key: str, side) -> None:
    """``input``/``output``: an object; shape a list of positive ints or nulls; dtype a string; scale a
    finite number > 0 or null; zero_point an integer or null."""
    if not isinstance(spec, dict):
        raise _bad(side, f"{key} is a {type(spec).__name__}, not an object", '{"name", "shape", "dtype", ...}')
    shape = spec.get("shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) <= 8 and all(
            d is None or (isinstance(d, int) and not isinstance(d, bool) and d >= -1) for d in shape)):
        raise _bad(side, f"{key}.shape {safe(repr(shape))[:60]}", "a list of dimensions (integers, null when dynamic)")
    if spec.get("dtype") is not None and not isinstance(spec["dtype"], str):
        raise _bad(side, f"{key}.dtype {safe(repr(spec['dtype']))[:60]}", 'a dtype name such as "float32"')
    scale = spec.get("scale")
    if scale is not None and not (_is_number(scale) and math.isfinite(scale) and scale > 0):
        raise _bad(side, f"{key}.scale {safe(repr(scale))[:60]}", "a finite number > 0, or null")
    zp = spec.get("zero_point")
    if zp is not None and not (isinstance(zp, int) and not isinstance(zp, bool) and -(1 << 31) <= zp < 1 << 31):
        raise _bad(side, f"{key}.zero_point {safe(repr(zp))[:60]}", "an integer, or null")


def _is_number(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _opt_str(doc: dict, key: str, side) -> str | None:
    v = doc.get(key)
    if v is not None and not isinstance(v, str):
        raise _bad(side, f"{key} is a {type(v).__name__} ({safe(repr(v))[:60]}), not a string")
    return v


def _bad(side, why: str, expected: str | None = None, fix: str | None = None) -> UntrustedFileError:
    kind = "manifest" if str(side).endswith((".tflite.json", ".onnx.json")) else "metadata file"
    return UntrustedFileError(f"The {kind} {safe(side)} is unusable: {why.rstrip('.')}.",
                              expected=expected or "the JSON written by `resnet-deploy export` or `train`",
                              fix=fix or "re-export the artifact (or restore the file), or delete the sidecar to "
                                         "use the defaults")


__all__ = ["Sidecar", "read_sidecar", "check_fields", "check_class_names", "declared_output", "check_tensor_spec"]
