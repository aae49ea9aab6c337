"""ONNX artifacts through ONNX Runtime: CPU, or the CUDA provider when it is present."""

from __future__ import annotations

import numpy as np

from resnet_deploy.errors import ResnetDeployError
from resnet_deploy.artifact import TensorSpec
from resnet_deploy.runtimes.base import Runner, quantize

_ORT_TYPES = {"tensor(float)": np.float32, "tensor(float16)": np.float16, "tensor(int8)": np.int8,
              "tensor(uint8)": np.uint8}


def to_input_dtype(x: np.ndarray, dtype) -> np.ndarray:
    """Float input as the model's input type; an integer input gets the values rounded and saturated
    to its range (``base.quantize`` with no quantization parameters: a bare cast would wrap 256 to 0
    and -1 to 255). Quantization parameters of an integer input are not applied here: ONNX keeps them
    in QuantizeLinear nodes inside the graph."""
    if np.issubdtype(dtype, np.integer):
        return quantize(x, 0.0, 0, dtype)
    return x.astype(dtype, copy=False)


class OnnxRunner(Runner):
    name = "onnxruntime"

    def __init__(self, *args, providers: list[str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.providers = providers

    def _load_impl(self) -> None:
        import onnxruntime as ort

        opts = ort.SessionOptions()
        if self.threads:
            opts.intra_op_num_threads = self.threads
            opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        available = ort.get_available_providers()
        providers = self.providers or [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]
        try:
            self.session = ort.InferenceSession(str(self.path), sess_options=opts, providers=providers)
        except Exception as exc:  # onnxruntime raises its own Fail/InvalidGraph/InvalidProtobuf types
            raise ResnetDeployError(f"ONNX Runtime cannot load {self.path}: {str(exc).strip()[:300]}",
                                    expected="a complete, valid .onnx model",
                                    fix="re-export the artifact; the file may be truncated or not ONNX") from exc
        ins, outs = self.session.get_inputs(), self.session.get_outputs()
        if len(ins) != 1 or len(outs) != 1:
            names = [i.name for i in ins]
            raise ResnetDeployError(f"{self.path} has inputs {names} and {len(outs)} outputs.",
                                    expected="exactly one image input and one logits output",
                                    fix="export with `resnet-deploy export` (constants must not become graph inputs)")
        self.input_name, self.output_name = ins[0].name, outs[0].name
        self.input_dtype = _ORT_TYPES.get(ins[0].type, np.float32)
        batch = ins[0].shape[0]
        self._fixed_batch = batch if isinstance(batch, int) else None

    @property
    def supports_batch(self) -> bool:
        return self._fixed_batch is None

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        out = self.session.run([self.output_name], {self.input_name: to_input_dtype(x, self.input_dtype)})[0]
        return out.astype(np.float32, copy=False)

    def _io_impl(self) -> tuple[TensorSpec, TensorSpec]:
        """Integer inputs carry no quantization here: ONNX keeps it in QuantizeLinear nodes in the graph."""
        def info(t) -> TensorSpec:
            shape = tuple(d if isinstance(d, int) else None for d in t.shape)
            return TensorSpec(t.name, shape, np.dtype(_ORT_TYPES.get(t.type, np.float32)).name)

        return info(self.session.get_inputs()[0]), info(self.session.get_outputs()[0])

    def describe(self) -> dict:
        return {"runtime": self.name, "threads": self.threads, "providers": self.session.get_providers()}
