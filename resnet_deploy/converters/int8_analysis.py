"""Per-layer INT8 error analysis with the libraries made for it, and the names that tie a converter's
nodes to the Keras layers a user knows.

- TFLite: ``tf.lite.experimental.QuantizationDebugger``. Its NumericVerify ops run each quantized op
  beside its float twin *on the same (quantized) input*, so the error is the op's own, not what earlier
  layers passed on. We rank by the relative RMSE ``rmse / std(float output)`` (``layer_direct_compare_metrics``)
  and also record the debugger's ``rmse/scale`` (about 0.29 for pure rounding, 1/sqrt(12)).
- ONNX: ``onnxruntime.quantization.qdq_loss_debug``: the float and the QDQ model run on the same images
  with every activation saved, matched per tensor; the signal-to-quantization-noise ratio (SQNR, dB)
  at each quantized tensor is the accumulated error, so a node's own share is the SQNR it *loses*
  between its input and its output (``added_noise_db``), which is what we rank by.

Which Keras layer a node computes is found by its weights (``int8_mapping``), never by its name.
Both return rows ``{"layer", "node", "op", "score", ...}`` sorted most sensitive first; ``score`` is
comparable within one table (higher = worse), not across formats.
"""

from __future__ import annotations

import math

import numpy as np

from resnet_deploy.converters.base import ONNX_COMPUTE_OPS

COMPUTE_CLASSES = ("Conv2D", "DepthwiseConv2D", "Dense", "Conv2DTranspose", "SeparableConv2D")


# Keras layer names ------------------------------------------------------------------------------------
def keras_layer_index(model) -> dict[str, tuple[str, str | None]]:
    """``{layer name: (class name, name of the layer feeding it or None)}``; a SavedModel's kernels (no Keras
    layers: ``int8_mapping.keras_kernels`` reads its variables) are listed by their variable path."""
    from resnet_deploy.converters.int8_mapping import keras_kernels

    out = {}
    for layer in model.layers:
        src = None
        try:
            node = layer._inbound_nodes[0]
            ins = node.input_tensors if hasattr(node, "input_tensors") else node.inbound_layers
            ins = ins if isinstance(ins, (list, tuple)) else [ins]
            if len(ins) == 1:
                hist = getattr(ins[0], "_keras_history", None)
                src = hist[0].name if hist else getattr(ins[0], "name", None)
        except (AttributeError, IndexError, TypeError):
            src = None
        out[layer.name] = (type(layer).__name__, src)
    kinds = {"conv": "Conv2D", "dense": "Dense", "depthwise": "DepthwiseConv2D"}
    for name, k in keras_kernels(model).items():  # nested models' and SavedModels' kernels
        out.setdefault(name, (kinds[k.kind], None))
    return out


# TFLite ---------------------------------------------------------------------------------------------------
def _relative_rmse(f, q, scale, zero_point) -> float:
    """NaN (ranked worst) where the float output is not finite, never a RuntimeWarning on the terminal."""
    with _quiet_numpy():
        deq = (np.asarray(q, np.float64) - zero_point) * scale
        f = np.asarray(f, np.float64)
        return float(np.sqrt(np.mean((f - deq) ** 2)) / max(float(np.std(f)), 1e-12))


def _quiet_numpy():
    """Invalid/overflow arithmetic yields NaN/inf silently (the score is then ranked worst); numpy's
    RuntimeWarnings and their ``warnings`` twins stay off the terminal."""
    import contextlib
    import warnings

    stack = contextlib.ExitStack()
    stack.enter_context(np.errstate(invalid="ignore", over="ignore", divide="ignore"))
    stack.enter_context(warnings.catch_warnings())
    warnings.simplefilter("ignore", RuntimeWarning)
    return stack


def tflite_layer_errors(debugger, images: np.ndarray, node_layer: dict) -> list[dict]:
    """Per-op errors of a ``QuantizationDebugger`` on ``images`` (float, preprocessed), ranked; ``node_layer``:
    ``{op output tensor name: Keras layer}`` (``int8_mapping``, by weights)."""
    import tensorflow as tf

    debugger.options = tf.lite.experimental.QuantizationDebugOptions(
        layer_direct_compare_metrics={"relative_rmse": _relative_rmse})
    debugger._data_gen = lambda: ([images[i:i + 1]] for i in range(len(images)))
    with _quiet_numpy():  # the debugger's own metrics subtract infinities on saturated ops
        debugger.run()
    rows = []
    for name, stats in debugger.layer_statistics.items():
        node, _ = debugger._get_operand_name_and_index(name)
        op = debugger._quant_interpreter._get_op_details(  # the op that wrote the verified tensor
            debugger._defining_op[debugger._numeric_verify_op_details[name]["inputs"][0]])["op_name"]
        scale = float(debugger._quant_interpreter._get_tensor_details(
            debugger._numeric_verify_op_details[name]["inputs"][0], subgraph_index=0)
            ["quantization_parameters"]["scales"][0])
        rel = float(stats["relative_rmse"])
        rows.append({"layer": node_layer.get(node), "node": node, "op": op, "score": round(rel, 6),
                     "relative_rmse": round(rel, 6),
                     "rmse_over_scale": round(math.sqrt(float(stats["mean_squared_error"])) / scale, 4)
                     if scale else None, "max_abs_error": round(float(stats["max_abs_error"]), 6)})
    return rank(rows)


def rank(rows: list[dict]) -> list[dict]:
    rows = sorted(rows, key=lambda r: -(r["score"] if np.isfinite(r["score"]) else 1e9))  # NaN/inf: worst
    for i, r in enumerate(rows, 1):
        r["rank"] = i
    return rows


# ONNX -----------------------------------------------------------------------------------------------------
def onnx_layer_errors(float_path, qdq_path, images: np.ndarray, input_name: str, node_layer: dict,
                      work_dir) -> list[dict]:
    """Per compute node (Conv/Gemm/MatMul) of the float graph: SQNR of the float vs QDQ activations at its
    input and output (``qdq_loss_debug``) and the noise it adds, ranked."""
    import onnx

    sqnr = _onnx_sqnr(float_path, qdq_path, images, input_name, work_dir)
    graph = onnx.load(str(float_path)).graph
    producer = {o: n for n in graph.node for o in n.output}
    consumers: dict[str, list] = {}
    for n in graph.node:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    rows = []
    for n in graph.node:
        if n.op_type not in ONNX_COMPUTE_OPS:
            continue
        s_in = _walk(n.input[0], sqnr, lambda t: [producer[t]] if t in producer else [], lambda m: m.input[:1])
        s_out = _walk(n.output[0], sqnr, lambda t: consumers.get(t, []), lambda m: m.output[:1])
        if s_out is None:
            continue
        added = (s_in if s_in is not None else 100.0) - s_out
        rows.append({"layer": node_layer.get(n.name), "node": n.name, "op": n.op_type, "score": round(added, 3),
                     "added_noise_db": round(added, 3), "sqnr_in_db": None if s_in is None else round(s_in, 3),
                     "sqnr_out_db": round(s_out, 3)})
    return rank(rows)


def _onnx_sqnr(float_path, qdq_path, images: np.ndarray, input_name: str, work_dir, chunk: int = 25) -> dict:
    """SQNR (dB) of the QDQ model's activations against the float model's, per quantized tensor, over
    ``images``. Activations are collected ``chunk`` images at a time and reduced to sums of squares, so a
    ResNet34's activations never sit in memory for all images at once."""
    from onnxruntime.quantization.qdq_loss_debug import (collect_activations, create_activation_matching,
                                                         modify_model_output_intermediate_tensors)

    aug = {}
    for tag, path in (("float", float_path), ("qdq", qdq_path)):
        aug[tag] = f"{work_dir}/{tag}_aug.onnx"
        modify_model_output_intermediate_tensors(str(path), aug[tag])
    signal: dict[str, float] = {}
    noise: dict[str, float] = {}
    for i in range(0, len(images), chunk):
        part = _Reader(images[i:i + chunk], input_name)
        acts = {tag: collect_activations(path, part) for tag, path in aug.items()}
        for t, m in create_activation_matching(acts["qdq"], acts["float"]).items():
            if not m.get("float"):
                continue
            f = np.concatenate([a.ravel() for a in m["float"]]).astype(np.float64)
            q = np.concatenate([a.ravel() for a in m["post_qdq"]]).astype(np.float64)
            with _quiet_numpy():
                signal[t] = signal.get(t, 0.0) + float(f @ f)
                noise[t] = noise.get(t, 0.0) + float((f - q) @ (f - q))
    eps = np.finfo(np.float64).eps
    return {t: 10 * math.log10(max(signal[t], eps) / max(noise[t], eps)) for t in signal
            if math.isfinite(signal[t]) and math.isfinite(noise[t])}


_PASS_THROUGH = ("Relu", "Clip", "Transpose", "Reshape", "Squeeze", "Flatten", "BatchNormalization", "Identity")


def _walk(tensor, sqnr: dict, step, follow, depth: int = 6):
    """The SQNR at ``tensor``, or at the nearest matched tensor reached through pass-through ops."""
    for _ in range(depth):
        if tensor in sqnr:
            return sqnr[tensor]
        nxt = [m for m in step(tensor) if m.op_type in _PASS_THROUGH]
        if len(nxt) != 1 or not follow(nxt[0]):
            return None
        tensor = follow(nxt[0])[0]
    return None


class _Reader:
    """Iterable of ``{input: batch}`` dicts (what ``collect_activations`` reads)."""

    def __init__(self, images: np.ndarray, input_name: str, batch: int = 50):
        self.images, self.input_name, self.batch = images, input_name, batch

    def __iter__(self):
        for i in range(0, len(self.images), self.batch):
            yield {self.input_name: self.images[i:i + self.batch]}
