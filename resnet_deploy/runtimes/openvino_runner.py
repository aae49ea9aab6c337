"""ONNX artifacts through OpenVINO on the CPU (``pip install 'resnet-deploy[openvino]'``).

OpenVINO reads the same ``.onnx`` files ONNX Runtime runs (FP32, FP16, QDQ INT8). It is compiled for
the CPU device with one stream, the requested threads (``INFERENCE_NUM_THREADS``) and the latency
hint, and with ``INFERENCE_PRECISION_HINT=f32``: on CPUs with AVX512-BF16 or AMX, OpenVINO otherwise
runs an "FP32" model in bf16 without saying so (its default inference precision there), and a benchmark would compare a bf16 run
with ONNX Runtime's f32 one.

What ran is read back, not assumed: ``describe()`` gives the compiled model's inference precision and
the precision every compute node (convolution, fully connected, matmul) of OpenVINO's runtime graph
executed in (``runtimePrecision``: ``u8``/``i8`` for a quantized node, ``f32``, ``bf16``, ``f16``), so a
QDQ INT8 file whose convolutions fell back to float, or an FP32 one run in bf16, shows in the report.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from resnet_deploy.errors import ResnetDeployError
from resnet_deploy.artifact import TensorSpec
from resnet_deploy.runtimes.base import Runner

INSTALL_FIX = "pip install 'resnet-deploy[openvino]' (or pip install openvino)"
DEVICE = "CPU"
# OpenVINO runtime-graph layer types that do the arithmetic; their precision is the one that matters
COMPUTE_LAYERS = ("Convolution", "GroupConvolution", "Deconvolution", "FullyConnected", "MatMul")
_QUANTIZED = ("u8", "i8")


def import_openvino():
    """The ``openvino`` module, or a ResnetDeployError saying how to install it."""
    try:
        import openvino
    except ImportError as exc:
        raise ResnetDeployError(f"The OpenVINO runtime is not installed ({exc}).",
                                expected="the openvino package, to run .onnx artifacts in OpenVINO",
                                fix=INSTALL_FIX) from exc
    return openvino


class OpenVINORunner(Runner):
    name = "openvino"

    def __init__(self, *args, inference_precision: str = "f32", **kwargs):
        super().__init__(*args, **kwargs)
        self.inference_precision = inference_precision  # the hint asked for; what ran is in describe()

    def _config(self) -> dict:
        cfg = {"NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY",
               "INFERENCE_PRECISION_HINT": self.inference_precision}
        if self.threads:
            cfg["INFERENCE_NUM_THREADS"] = int(self.threads)
        return cfg

    def _load_impl(self) -> None:
        ov = import_openvino()
        core = ov.Core()
        try:
            model = core.read_model(str(self.path))
            self.compiled = core.compile_model(model, DEVICE, self._config())
        except RuntimeError as exc:  # OpenVINO reports parse and compile failures as RuntimeError
            raise ResnetDeployError(f"OpenVINO cannot load {self.path}: {str(exc).strip()[:300]}",
                                    expected="a complete, valid .onnx model",
                                    fix="re-export the artifact; the file may be truncated or not ONNX") from exc
        ins, outs = self.compiled.inputs, self.compiled.outputs
        if len(ins) != 1 or len(outs) != 1:
            raise ResnetDeployError(f"{self.path} has {len(ins)} inputs and {len(outs)} outputs.",
                                    expected="exactly one image input and one logits output",
                                    fix="export with `resnet-deploy export` (constants must not become graph inputs)")
        self.input_port, self.output_port = ins[0], outs[0]
        self.input_dtype = np.dtype(self.input_port.get_element_type().to_dtype())
        shape = self.input_port.get_partial_shape()
        self._fixed_batch = shape[0].get_length() if shape.rank.is_static and shape[0].is_static else None
        self.request = self.compiled.create_infer_request()
        self._version = ov.get_version()
        self._precision = executed_precisions(self.compiled)

    @property
    def supports_batch(self) -> bool:
        return self._fixed_batch is None

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        from resnet_deploy.runtimes.onnx_runner import to_input_dtype

        x = np.ascontiguousarray(to_input_dtype(x, self.input_dtype))
        self.request.infer({0: x})
        return np.array(self.request.get_output_tensor(0).data, dtype=np.float32)  # a copy: the buffer is reused

    def _io_impl(self) -> tuple[TensorSpec, TensorSpec]:
        def info(port) -> TensorSpec:
            ps = port.get_partial_shape()
            shape = tuple(d.get_length() if d.is_static else None for d in ps) if ps.rank.is_static else ()
            names = port.get_names()  # a graph input can carry several names: the plainest one
            name = min(sorted(names), key=len) if names else ""
            return TensorSpec(name, shape, np.dtype(port.get_element_type().to_dtype()).name)

        return info(self.input_port), info(self.output_port)

    def describe(self) -> dict:
        c = self.compiled
        return {"runtime": self.name, "threads": self.threads, "device": DEVICE, "version": self._version,
                "requested_precision": self.inference_precision,
                "inference_precision": _type_name(c.get_property("INFERENCE_PRECISION_HINT")),
                "num_threads": _int_or_none(c.get_property("INFERENCE_NUM_THREADS")),
                "num_streams": _int_or_none(c.get_property("NUM_STREAMS")),
                "performance_hint": str(c.get_property("PERFORMANCE_HINT")),
                **self._precision}


def executed_precisions(compiled) -> dict:
    """What OpenVINO's runtime graph executes: per compute layer type, how many nodes ran in each
    precision (``runtimePrecision`` of ``get_runtime_model()``), and a summary over all of them:
    ``executed_precision`` (the precision most compute nodes ran in, ``"mixed"`` when no one has
    more than half of them) and ``quantized_share`` (the share of compute nodes that ran in u8/i8)."""
    by_layer: dict[str, Counter] = {}
    for op in compiled.get_runtime_model().get_ordered_ops():
        rt = op.get_rt_info()
        layer = _rt_str(rt, "layerType")
        if layer in COMPUTE_LAYERS:
            by_layer.setdefault(layer, Counter())[_rt_str(rt, "runtimePrecision") or "?"] += 1
    total = Counter()
    for c in by_layer.values():
        total.update(c)
    n = sum(total.values())
    top, count = total.most_common(1)[0] if n else ("none", 0)
    return {"compute_nodes": {k: dict(v) for k, v in by_layer.items()},
            "compute_precisions": dict(total),
            "executed_precision": top if n and count * 2 > n else ("mixed" if n else "none"),
            "quantized_share": sum(total[p] for p in _QUANTIZED) / n if n else 0.0}


def precision_summary(describe: dict) -> str | None:
    """One line for the report from an OpenVINO ``describe()``: None for other runtimes."""
    if "compute_precisions" not in describe:
        return None
    counts = describe["compute_precisions"]
    n = sum(counts.values())
    parts = ", ".join(f"{p} {k}" for p, k in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (f"OpenVINO {DEVICE}, inference precision {describe.get('inference_precision')} "
            f"(asked {describe.get('requested_precision')}); its {n} compute nodes (conv/fc) ran in: {parts or '-'}")


def _rt_str(rt, key: str) -> str | None:
    if key not in rt:
        return None
    v = rt[key]
    return v.astype(str) if hasattr(v, "astype") else str(v)


def _type_name(t) -> str:
    """An OpenVINO element type as its short name (``f32``, ``bf16``, ``f16``)."""
    name = getattr(t, "get_type_name", None)
    return name() if callable(name) else str(t)


def _int_or_none(v):
    try:
        return int(v)
    except (TypeError, ValueError):
        return None
