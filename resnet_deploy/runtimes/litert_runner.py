"""TFLite artifacts through LiteRT (``ai_edge_litert``; XNNPACK is on by default).

Integer I/O is handled here from the tensor details: float inputs are quantized with the
input's scale/zero-point and integer outputs are dequantized, so callers always pass float.
An integer tensor without quantization parameters (scale 0, as TFLite reports it) holds raw
integer values: the input is rounded and saturated to the dtype, the output only widened to float.
"""

from __future__ import annotations

import numpy as np

from resnet_deploy.errors import ResnetDeployError
from resnet_deploy.artifact import TensorSpec
from resnet_deploy.runtimes.base import Runner, dequantize, quantize


class LiteRTRunner(Runner):
    name = "litert"

    def _load_impl(self) -> None:
        from ai_edge_litert.interpreter import Interpreter

        try:
            self.interpreter = Interpreter(model_path=str(self.path), num_threads=self.threads)
            self.interpreter.allocate_tensors()
        except (ValueError, RuntimeError) as exc:
            raise ResnetDeployError(f"LiteRT cannot load {self.path}: {str(exc).strip()[:300]}",
                                    expected="a complete .tflite flatbuffer",
                                    fix="re-export the artifact; the file may be truncated or not TFLite") from exc
        ins, outs = self.interpreter.get_input_details(), self.interpreter.get_output_details()
        if len(ins) != 1 or len(outs) != 1:
            raise ResnetDeployError(f"{self.path} has {len(ins)} inputs and {len(outs)} outputs.",
                                    expected="one image input and one logits output")
        self.input_detail, self.output_detail = ins[0], outs[0]
        self._batch = int(self.input_detail["shape"][0])

    def _resize(self, n: int) -> None:
        if n != self._batch:
            self.interpreter.resize_tensor_input(self.input_detail["index"], [n, *self.input_detail["shape"][1:]])
            self.interpreter.allocate_tensors()
            self.input_detail = self.interpreter.get_input_details()[0]
            self.output_detail = self.interpreter.get_output_details()[0]
            self._batch = n

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        self._resize(len(x))
        d = self.input_detail
        if np.issubdtype(d["dtype"], np.integer):
            scale, zp = d["quantization"]
            x = quantize(x, scale, zp, d["dtype"])
        else:
            x = x.astype(d["dtype"], copy=False)
        self.interpreter.set_tensor(d["index"], x)
        self.interpreter.invoke()
        o = self.output_detail
        y = self.interpreter.get_tensor(o["index"])
        if np.issubdtype(o["dtype"], np.integer):
            scale, zp = o["quantization"]
            y = dequantize(y, scale, zp)
        return y

    def _io_impl(self) -> tuple[TensorSpec, TensorSpec]:
        return tensor_spec(self.input_detail), tensor_spec(self.output_detail)

    def describe(self) -> dict:
        d = self.input_detail
        return {"runtime": self.name, "threads": self.threads, "input_dtype": np.dtype(d["dtype"]).name,
                "input_quantization": list(d["quantization"])}


def tensor_spec(d: dict, signature: bool = False) -> TensorSpec:
    """A LiteRT tensor detail as a ``TensorSpec``; ``signature``: the shape as the file declares it (None for a
    dynamic dimension), not as allocated."""
    dtype = np.dtype(d["dtype"])
    dims = d.get("shape_signature", d["shape"]) if signature else d["shape"]
    shape = tuple(None if int(v) < 0 else int(v) for v in dims)
    if np.issubdtype(dtype, np.integer):
        scale, zp = d["quantization"]
        return TensorSpec(d["name"], shape, dtype.name, float(scale), int(zp))
    return TensorSpec(d["name"], shape, dtype.name)
