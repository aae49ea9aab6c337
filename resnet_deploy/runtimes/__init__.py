"""Load an artifact and predict on float images: Keras, LiteRT, ONNX Runtime, OpenVINO.

Each format has a default runtime (``DEFAULT_RUNTIME``); an ONNX file can also run in OpenVINO
(``open_runner(path, runtime="openvino")``). ``runtimes_for(fmt)`` lists the runtimes that can run a
format, ``available_runtimes(fmt)`` those of them installed here, and ``check_runtime`` turns an
unknown, unsuitable or missing runtime into a clear error before any work.
"""

from __future__ import annotations

import importlib.util
import os
from typing import NamedTuple

from resnet_deploy.config import Format
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.errors import ResnetDeployError
from resnet_deploy.runtimes.base import Runner

class _Runtime(NamedTuple):
    module: str  # the runner's module
    cls: str  # its Runner class
    package: str  # the Python package the runtime needs (found without importing it)
    engine: str  # the module a user of the runtime imports (bench times its import before loading a file)
    install: str  # how to install it


_RUNNERS = {
    "keras": _Runtime("resnet_deploy.runtimes.keras_runner", "KerasRunner", "keras", "keras",
                      "pip install resnet-deploy"),
    "litert": _Runtime("resnet_deploy.runtimes.litert_runner", "LiteRTRunner", "ai_edge_litert",
                       "ai_edge_litert.interpreter", "pip install resnet-deploy"),
    "onnxruntime": _Runtime("resnet_deploy.runtimes.onnx_runner", "OnnxRunner", "onnxruntime", "onnxruntime",
                            "pip install resnet-deploy"),
    "openvino": _Runtime("resnet_deploy.runtimes.openvino_runner", "OpenVINORunner", "openvino", "openvino",
                         "pip install 'resnet-deploy[openvino]'"),
}
RUNTIMES_BY_FORMAT = {Format.KERAS: ("keras",), Format.TFLITE: ("litert",), Format.ONNX: ("onnxruntime", "openvino")}
DEFAULT_RUNTIME = {fmt: names[0] for fmt, names in RUNTIMES_BY_FORMAT.items()}


def runtimes_for(fmt: Format) -> tuple[str, ...]:
    """Every runtime that can run ``fmt``, the default first."""
    return RUNTIMES_BY_FORMAT[Format(fmt)]


def is_installed(runtime: str) -> bool:
    """Whether the runtime's Python package can be imported here (found without importing it)."""
    try:
        return importlib.util.find_spec(_RUNNERS[runtime].package) is not None
    except (ImportError, ValueError):
        return False


def available_runtimes(fmt: Format) -> tuple[str, ...]:
    """The runtimes for ``fmt`` that are installed here, the default first."""
    return tuple(r for r in runtimes_for(fmt) if is_installed(r))


def check_runtime(runtime: str, fmt: Format | None = None, option: str = "--runtime") -> str:
    """``runtime`` when it is known, runs ``fmt`` (when given) and is installed; else a ResnetDeployError."""
    known = sorted(_RUNNERS)
    if runtime not in _RUNNERS:
        raise ResnetDeployError(f"{option} {runtime!r} is not a runtime resnet-deploy knows.",
                                expected=", ".join(known) if fmt is None else
                                f"for {Format(fmt).value} files: {', '.join(runtimes_for(fmt))}",
                                fix=f"pass one of {', '.join(runtimes_for(fmt) if fmt is not None else known)}")
    if fmt is not None and runtime not in runtimes_for(fmt):
        raise ResnetDeployError(f"{option} {runtime} cannot run {Format(fmt).value} files.",
                                expected=f"for {Format(fmt).value} files: {', '.join(runtimes_for(fmt))}",
                                fix=f"leave {option} out (default {DEFAULT_RUNTIME[Format(fmt)]}) or pass one of those")
    if not is_installed(runtime):
        raise ResnetDeployError(f"The {runtime} runtime is not installed (no Python package "
                                f"{_RUNNERS[runtime].package!r}).",
                                expected=f"{runtime} installed, to run artifacts in it",
                                fix=_RUNNERS[runtime].install)
    return runtime


def _resolve(fmt: Format, runtime: str | None) -> _Runtime:
    """``runtime`` checked to run ``fmt`` (``check_runtime``), or the format's own when None."""
    return _RUNNERS[check_runtime(runtime, fmt) if runtime is not None else DEFAULT_RUNTIME[Format(fmt)]]


def runner_class(fmt: Format, runtime: str | None = None) -> type[Runner]:
    """The Runner class of ``runtime`` (default: the format's own), checked to run ``fmt``."""
    entry = _resolve(fmt, runtime)
    return getattr(importlib.import_module(entry.module), entry.cls)


def engine_module(fmt: Format, runtime: str | None = None) -> str:
    """The module a program running ``fmt`` files in ``runtime`` (default: the format's own) imports."""
    return _resolve(fmt, runtime).engine


def open_runner(path: str | os.PathLike, preprocessing: Preprocessing | None = None,
                threads: int | None = None, batch_size: int = 256, runtime: str | None = None) -> Runner:
    """A runner for ``path`` chosen by its format, in ``runtime`` (default: the format's own, see
    ``DEFAULT_RUNTIME``). Preprocessing: given, else the artifact's manifest (or a model's metadata),
    else raw pixels 0..255 (the convention of resnet-deploy's models)."""
    fmt = Format.from_path(path)
    cls = runner_class(fmt, runtime)
    if preprocessing is None:
        preprocessing = recorded_preprocessing(path, fmt)
    return cls(path, preprocessing=preprocessing, threads=threads, batch_size=batch_size)


def recorded_preprocessing(path, fmt: Format) -> Preprocessing:
    if fmt is Format.KERAS:
        from resnet_deploy.models.io import read_metadata

        meta = read_metadata(path)
        return Preprocessing.from_dict(meta.get("preprocessing") if meta else None)
    from resnet_deploy.artifact import read_manifest

    m = read_manifest(path)
    return m.preprocessing_spec if m else Preprocessing.pixels()


__all__ = ["Runner", "open_runner", "runner_class", "recorded_preprocessing", "runtimes_for", "available_runtimes",
           "check_runtime", "engine_module", "is_installed", "DEFAULT_RUNTIME", "RUNTIMES_BY_FORMAT"]
