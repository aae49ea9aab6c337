"""Which converter op computes which Keras layer, found by what the op computes: its weights.

Layer and node names cannot be trusted: a Keras 2 ``.h5`` has default names (``conv2d``, ``conv2d_1``, ...) that
TFLite fuses into tensor names such as ``model/activation_1/Relu;model/batch_normalization_1/...;model/conv2d_1/``,
``quant_pre_process`` renames ONNX nodes, and a SavedModel has no Keras layers at all. A converter never changes
*what* a convolution computes, though: its kernel reaches the TFLite op and the ONNX node with the output channels
first, each channel possibly scaled (a folded BatchNormalization, a per-channel int8 quantization). So each op's
weight is compared with every Keras kernel of the same shape, channel by channel, by |cosine| (blind to a scale per
output channel, of either sign); the op belongs to the layer whose kernel it matches, and to no layer when none
matches or two match equally well.

Keras kernels are read from the model's layers (nested models included) or, for a SavedModel loaded as a
``TFSMLayer``, from its variables named ``conv2d_1/kernel`` or ``conv2d_1_kernel`` (and ``depthwise_kernel``):
the "layer" is then the variable's prefix (``conv2d_1``).

Every kernel is brought to the same canonical form, rows = output channels:

- Keras Conv2D ``(kh, kw, I, O)``, TFLite CONV_2D ``(O, kh, kw, I)``, ONNX Conv ``(O, I, kh, kw)``: ``(O, kh*kw*I)``;
- Keras Dense ``(I, O)``, TFLite FULLY_CONNECTED ``(O, I)``, ONNX MatMul ``(I, O)`` / Gemm: ``(O, I)``;
- Keras DepthwiseConv2D ``(kh, kw, C, 1)``, TFLite DEPTHWISE_CONV_2D ``(1, kh, kw, C)``, ONNX grouped Conv
  ``(C, 1, kh, kw)``: ``(C, kh*kw)``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_deploy.errors import ExportError

KERNEL_CLASSES = ("Conv2D", "DepthwiseConv2D", "Dense")
MATCH_COSINE = 0.98  # median |cosine| over output channels of an op's weights and a Keras kernel
MARGIN = 0.005  # the best match must beat the second by this much, or the op is ambiguous


@dataclass(frozen=True)
class Kernel:
    layer: str
    kind: str  # "conv", "dense", "depthwise"
    rows: np.ndarray  # (output channels, the rest), canonical order


@dataclass
class Mapping:
    """``{op or node name: Keras layer or None}`` for a converted graph's weighted compute ops, and the Keras
    compute layers that no op computes (``unplaced``) or that two kernels fit equally (``ambiguous``)."""

    where: str  # "TFLite" / "ONNX"
    node_layer: dict[str, str | None]
    layers: list[str]  # every Keras compute layer, in model order
    ambiguous: dict[str, list[str]] = field(default_factory=dict)  # node -> the layers it fits equally

    @property
    def unplaced(self) -> list[str]:
        placed = set(self.node_layer.values())
        return [l for l in self.layers if l not in placed]

    def nodes_for(self, layers) -> list[str]:
        """The node names that compute ``layers``; a layer that no node computes is an error, said before any
        file is quantized."""
        layers = list(layers)
        unknown = [l for l in layers if l not in self.layers]
        missing = [l for l in layers if l in self.layers and l in self.unplaced]
        if unknown:
            raise ExportError(f"{', '.join(unknown)} {'is' if len(unknown) == 1 else 'are'} not a conv or dense layer "
                              "of this model, so cannot be kept in float.",
                              expected=f"names of its compute layers, e.g. {', '.join(self.layers[:6])}",
                              fix="take the names from the table of --analyze")
        if missing:
            raise ExportError(f"No {self.where} op computes the layer(s) {missing}: their weights match no op's "
                              "weights in the converted graph" + (f" (ops fitting several layers equally: "
                                                                  f"{self.ambiguous})" if self.ambiguous else "") + ".",
                              expected="every layer kept in float found in the converted graph by its weights",
                              fix="keep other layers in float (--int8-float-layers), or report this model")
        return [n for n, l in self.node_layer.items() if l in layers]

    def layers_of(self, nodes) -> list[str | None]:
        return [self.node_layer.get(n) for n in nodes]


# Keras ------------------------------------------------------------------------------------------------------
def keras_kernels(model) -> dict[str, Kernel]:
    """Every conv/dense kernel of ``model`` in canonical form, keyed by layer name (model order)."""
    out: dict[str, Kernel] = {}
    for layer in _flat_layers(model):
        cls = type(layer).__name__
        if cls not in KERNEL_CLASSES:
            continue
        attr = "depthwise_kernel" if cls == "DepthwiseConv2D" else "kernel"
        k = getattr(layer, attr, None)
        if k is None:
            continue
        kind = {"Conv2D": "conv", "Dense": "dense", "DepthwiseConv2D": "depthwise"}[cls]
        out[layer.name] = Kernel(layer.name, kind, _keras_rows(np.asarray(k), kind))
    if not out:  # a SavedModel behind a TFSMLayer: its variables (``conv2d_1/kernel`` or ``conv2d_1_kernel``)
        for v in getattr(model, "weights", []):
            name = str(getattr(v, "path", None) or v.name).split(":")[0]
            name = name.rsplit("/", 1)[-1] if name.startswith(("tfsm_layer", "TFSMLayer")) else name
            for suffix, kind in (("depthwise_kernel", "depthwise"), ("kernel", None)):
                if name.endswith(("/" + suffix, "_" + suffix)) and len(v.shape) in (2, 4):
                    layer = name[:-len(suffix) - 1]
                    kind = kind or ("conv" if len(v.shape) == 4 else "dense")
                    out[layer] = Kernel(layer, kind, _keras_rows(np.asarray(v), kind))
                    break
    return out


def _flat_layers(model):
    for layer in getattr(model, "layers", []):
        if getattr(layer, "layers", None) and type(layer).__name__ not in KERNEL_CLASSES:
            yield from _flat_layers(layer)
        else:
            yield layer


def _keras_rows(k: np.ndarray, kind: str) -> np.ndarray:
    k = np.asarray(k, np.float32)
    if kind == "conv":
        return np.moveaxis(k, -1, 0).reshape(k.shape[-1], -1)
    if kind == "dense":
        return k.T
    kh, kw, c, m = k.shape
    return np.moveaxis(k.reshape(kh, kw, c * m), -1, 0).reshape(c * m, kh * kw)


# Matching ------------------------------------------------------------------------------------------------------
def _unit(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    rows = rows.astype(np.float64)
    norm = np.linalg.norm(rows, axis=1)
    return rows / np.where(norm > 0, norm, 1)[:, None], norm > 0


def fit(rows: np.ndarray, kernel: Kernel) -> float:
    """Median |cosine| over output channels between an op's weight rows and a Keras kernel's (0 if the shapes
    differ); channels that are all zero in either are left out."""
    if rows.shape != kernel.rows.shape:
        return 0.0
    a, ok_a = _unit(rows)
    b, ok_b = _unit(kernel.rows)
    ok = ok_a & ok_b
    if not ok.any():
        return 0.0
    return float(np.median(np.abs(np.sum(a[ok] * b[ok], axis=1))))


def match(weights: dict[str, np.ndarray], kernels: dict[str, Kernel], where: str) -> Mapping:
    """``weights``: ``{node: canonical rows}`` of a graph's compute ops."""
    node_layer: dict[str, str | None] = {}
    ambiguous: dict[str, list[str]] = {}
    for node, rows in weights.items():
        fits = sorted(((fit(rows, k), name) for name, k in kernels.items()), reverse=True)
        fits = [(c, n) for c, n in fits if c >= MATCH_COSINE]
        if not fits:
            node_layer[node] = None
        elif len(fits) > 1 and fits[0][0] - fits[1][0] < MARGIN:
            # the same kernel used twice is one layer (a shared layer): only different kernels are ambiguous
            same = [n for c, n in fits if fits[0][0] - c < MARGIN]
            node_layer[node] = None
            ambiguous[node] = same
        else:
            node_layer[node] = fits[0][1]
    return Mapping(where, node_layer, list(kernels), ambiguous)


# TFLite ---------------------------------------------------------------------------------------------------------
TFLITE_WEIGHTED = ("CONV_2D", "DEPTHWISE_CONV_2D", "FULLY_CONNECTED")


def tflite_weights(model, float_only: bool = False) -> dict[str, np.ndarray]:
    """``{output tensor name: canonical weight rows}`` of a .tflite file's (path or bytes) conv/dense ops;
    ``float_only``: only the ops that compute in float (float inputs)."""
    from ai_edge_litert import schema_py_generated as schema

    buf = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
    m = schema.Model.GetRootAs(buf, 0)
    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    dtypes = {schema.TensorType.FLOAT32: np.float32, schema.TensorType.FLOAT16: np.float16,
              schema.TensorType.INT8: np.int8, schema.TensorType.UINT8: np.uint8, schema.TensorType.INT16: np.int16}
    codes = []
    for i in range(m.OperatorCodesLength()):
        c = m.OperatorCodes(i)
        codes.append(builtin.get(max(c.BuiltinCode(), c.DeprecatedBuiltinCode()), "CUSTOM"))
    g = m.Subgraphs(0)
    producer = {}
    ops = []
    for i in range(g.OperatorsLength()):
        op = g.Operators(i)
        ins = list(op.InputsAsNumpy()) if op.InputsLength() else []
        outs = list(op.OutputsAsNumpy()) if op.OutputsLength() else []
        ops.append((codes[op.OpcodeIndex()], ins, outs))
        for o in outs:
            producer[int(o)] = (codes[op.OpcodeIndex()], ins)

    def data(t_index: int):
        t = g.Tensors(t_index)
        b = m.Buffers(t.Buffer())
        if b is None or b.DataLength() == 0 or t.Type() not in dtypes:
            return None
        return np.frombuffer(b.DataAsNumpy().tobytes(), dtypes[t.Type()]).reshape(t.ShapeAsNumpy())

    out = {}
    for name, ins, outs in ops:
        if name not in TFLITE_WEIGHTED or len(ins) < 2 or not outs:
            continue
        if float_only and g.Tensors(int(ins[0])).Type() not in (schema.TensorType.FLOAT32,):
            continue
        w_index = int(ins[1])
        w = data(w_index)
        if w is None and w_index in producer and producer[w_index][0] == "DEQUANTIZE":
            w = data(int(producer[w_index][1][0]))
        if w is None:
            continue
        w = w.astype(np.float32)
        if name == "DEPTHWISE_CONV_2D":
            rows = w.reshape(-1, w.shape[-1]).T
        else:
            rows = w.reshape(w.shape[0], -1)
        out[g.Tensors(int(outs[0])).Name().decode()] = rows
    return out


def tflite_mapping(model_bytes, kernels: dict[str, Kernel]) -> Mapping:
    return match(tflite_weights(model_bytes), kernels, "TFLite")


def check_float_layers(got: list, wanted: list, fmt: str, integer_ops: str) -> None:
    """After quantizing: the layers the written file computes in float (``got``, read back by their weights) must
    be exactly ``wanted``; else an ExportError naming both (``fmt``: TFLite/ONNX; ``integer_ops``: what the other
    ops are expected to be)."""
    if sorted(map(str, got)) != sorted(wanted):
        raise ExportError(f"The INT8 {fmt} model computes the layers {got} in float; {wanted or 'none'} were to stay "
                          "float (matched by weights).",
                          expected=f"exactly the listed layers in float, every other {integer_ops}",
                          fix="report this model, with the layers you kept float (--int8-float-layers)")


def tflite_float_layers(model_bytes, kernels: dict[str, Kernel]) -> list[str | None]:
    """The Keras layers of the conv/dense ops of a .tflite file that compute in float (None: an op whose
    weights match no layer)."""
    return list(match(tflite_weights(model_bytes, float_only=True), kernels, "TFLite").node_layer.values())


# ONNX ------------------------------------------------------------------------------------------------------------
ONNX_WEIGHTED = ("Conv", "MatMul", "Gemm")


def onnx_weights(graph, float_only: bool = False) -> dict[str, np.ndarray]:
    """``{node name: canonical weight rows}`` of an ONNX graph's Conv / MatMul / Gemm nodes with a constant
    weight (an initializer, possibly behind DequantizeLinear or Transpose); ``float_only``: only those whose
    weight is not dequantized."""
    from onnx import numpy_helper

    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}

    def const(name, hops: int = 3):
        if name in inits:
            return numpy_helper.to_array(inits[name]), False
        n = producer.get(name)
        if n is None or hops == 0:
            return None, False
        if n.op_type == "DequantizeLinear":
            w, _ = const(n.input[0], hops - 1)
            return w, True
        if n.op_type == "Transpose":
            w, q = const(n.input[0], hops - 1)
            perm = next((list(a.ints) for a in n.attribute if a.name == "perm"), None)
            return (None if w is None else np.transpose(w, perm)), q
        if n.op_type == "Constant":
            return numpy_helper.to_array(n.attribute[0].t), False
        return None, False

    out = {}
    for i, n in enumerate(graph.node):
        if n.op_type not in ONNX_WEIGHTED or len(n.input) < 2:
            continue
        w, quantized = const(n.input[1])
        if w is None or (float_only and quantized):
            continue
        w = np.asarray(w, np.float32)
        if n.op_type == "Conv":
            group = next((a.i for a in n.attribute if a.name == "group"), 1)
            if w.ndim != 4:
                continue
            rows = w.reshape(w.shape[0], -1) if (group > 1 and w.shape[1] == 1) else \
                np.transpose(w, (0, 2, 3, 1)).reshape(w.shape[0], -1)
        elif n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute):
            rows = w
        else:
            if w.ndim != 2:
                continue
            rows = w.T
        out[n.name or f"{n.op_type}#{i}"] = rows
    return out


def onnx_mapping(model, kernels: dict[str, Kernel]) -> Mapping:
    """``model``: a path or ModelProto."""
    return match(onnx_weights(_onnx_graph(model)), kernels, "ONNX")


def onnx_float_layers(model, kernels: dict[str, Kernel]) -> list[str | None]:
    return list(match(onnx_weights(_onnx_graph(model), float_only=True), kernels, "ONNX").node_layer.values())


def _onnx_graph(model):
    import onnx

    return model.graph if isinstance(model, onnx.ModelProto) else onnx.load(str(model)).graph
