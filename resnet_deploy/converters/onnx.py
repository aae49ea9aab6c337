"""ONNX artifacts: FP32 (tf2onnx ``from_keras``), FP16 (float I/O kept) and INT8 (ONNX Runtime static
quantization, QDQ, per-channel weights).

``from_keras`` is used, not ``from_function``: the latter turns the ``Normalization`` layer's mean and
variance into extra graph inputs that ONNX Runtime refuses (DESIGN.md). Every graph is checked to
have exactly one input and one output, and the batch dimension is named ``batch`` (dynamic).
INT8 activations default to uint8 on x86 (ONNX Runtime's fast U8S8 kernels) and int8 on arm64, and
weights to 7 bits (``reduce_range``) on x86 CPUs without VNNI, where 8-bit weights saturate ONNX
Runtime's VPMADDUBSW kernels (``onnx_rules``); ``options.onnx_activation_type`` and
``options.onnx_reduce_range`` override them. The manifest's ``calibration`` block records
``activation_type``, ``weight_type``, ``reduce_range``, who chose each (``chosen_by``) and why (``reason``).
``OnnxInt8`` prepares the float graph once and quantizes it for each try of the accuracy-aware search;
``options.int8_float_layers`` become ``nodes_to_exclude`` (those convolutions compute in float).

One conversion per export: tf2onnx runs for the FP32 file only (for a large model in a second process
beside the TFLite conversions: ``onnx_process``); the FP16 and INT8 files are made from that file and
committed after it has passed validation (``base.ExportWork.onnx_fp32``), and their manifests name it
(``options.converter.converted_from``). The INT8 scheme comes from ``--target`` (``onnx_rules``) and must
be the one the planned file name carries.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections import Counter
from pathlib import Path

from resnet_deploy.artifact import TensorSpec
from resnet_deploy.config import Precision
from resnet_deploy.converters.base import ONNX_COMPUTE_OPS, ConvertResult
from resnet_deploy.errors import ExportError

INPUT_NAME = "image"
_CALIB = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile"}
_ELEM = {1: "float32", 10: "float16", 3: "int8", 2: "uint8"}


def to_onnx(model, opset: int):
    """The float ONNX ModelProto of a Keras model: one input ``image`` (dynamic batch), one output."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name=INPUT_NAME),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    except Exception as exc:
        raise ExportError(f"tf2onnx could not convert the model: {type(exc).__name__}: {str(exc)[:400]}",
                          expected="a Keras model made of ops tf2onnx supports",
                          fix="try another --opset, or export TFLite only with --formats tflite") from exc
    inputs = [i.name for i in proto.graph.input]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ExportError(f"The ONNX graph has inputs {inputs} and {len(proto.graph.output)} outputs.",
                          expected="exactly one image input and one logits output",
                          fix="model constants must not become graph inputs; report this model")
    for v in (proto.graph.input[0], proto.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def float_source(model, options, work=None, as_path: bool = False):
    """The float graph FP16 and INT8 are made from: the export's FP32 ONNX file where there is one (then also its
    name and sha256 for the manifest; ``as_path``: the file itself, not loaded), else a fresh tf2onnx
    conversion. FP16 and INT8 files made from it are committed only after it has passed validation."""
    import onnx

    fp32 = work.onnx_fp32 if work is not None else None
    if fp32 is not None:
        from resnet_deploy.fileio import sha256_file

        sha = work.onnx_fp32_sha256 or sha256_file(fp32)  # the FP32 manifest's, read from the very file
        return Path(fp32) if as_path else onnx.load(str(fp32)), {"artifact": Path(fp32).name, "sha256": sha,
                                      "note": "made from the FP32 ONNX file of this export, committed after it passed validation "
                                              "(one tf2onnx run per export)"}
    return to_onnx(model, options.opset), None


def convert(model, out_path: Path, target, options, calibration=None, work=None) -> ConvertResult:
    import onnx

    p = target.precision
    settings = {"converter": "tf2onnx.convert.from_keras", "opset": options.opset, "dynamic_batch": True}
    if p is Precision.FP32:
        proc, proto = work.onnx_process if work is not None else None, None
        if proc is not None:  # started beside the TFLite conversions (onnx_process)
            work.onnx_process = None
            made = proc.result()
            settings["process"] = "a second process, beside the TFLite conversions (onnx_process)"
        else:
            proto = to_onnx(model, options.opset)
    else:
        proto, source = float_source(model, options, work, as_path=p is Precision.INT8)
        if source is not None:
            settings["converted_from"] = source
    cal = None
    if p is Precision.FP32:
        if proto is None:
            shutil.move(made, out_path)
        else:
            onnx.save(proto, str(out_path))
        if work is not None:  # the source of this export's FP16 and INT8 files
            work.keep_onnx_fp32(Path(out_path))
    elif p is Precision.FP16:
        from onnxruntime.transformers.float16 import convert_float_to_float16

        half = convert_float_to_float16(proto, keep_io_types=True)
        _topological_sort(half.graph)  # the tool appends its input Casts at the end of the node list
        onnx.save(half, str(out_path))
        settings.update(fp16="onnxruntime.transformers.float16.convert_float_to_float16", io="float32")
    elif p is Precision.INT8:
        cal = _quantize(model, proto, Path(out_path), options, calibration)
        if getattr(target, "scheme", None) and cal["scheme"] != target.scheme:
            raise ExportError(f"The ONNX INT8 file was quantized as {cal['scheme']}, but its planned name says "
                              f"{target.scheme}.", expected="the scheme the plan named (the CPU flags changed "
                              "during the export?)", fix="export again, or pass --target explicitly")
        settings.update(target=cal["target"], scheme=cal["scheme"], quant_format="QDQ", per_channel=options.onnx_per_channel,
                        activation_type=cal["activation_type"], weight_type=cal["weight_type"],
                        reduce_range=cal["reduce_range"], float_layers=list(options.int8_float_layers))
    else:
        raise ExportError(f"ONNX has no {p.value} target here.", expected="fp32, fp16 or int8")
    onnx.checker.check_model(str(out_path))
    written = onnx.load(str(out_path), load_external_data=False)
    in_spec, out_spec = io_specs(written)
    ops = op_report(written)
    if p is Precision.INT8 and sorted(ops["float_compute_ops"]) != sorted(cal.get("nodes_to_exclude", [])):
        raise ExportError(f"The INT8 ONNX model leaves {ops['float_compute_ops']} outside QDQ pairs "
                          f"(layers to keep float: {list(options.int8_float_layers) or 'none'}).",
                          expected="every Conv/Gemm/MatMul reading dequantized int8 tensors, except the layers "
                                   "kept float on purpose", fix="report this model")
    return ConvertResult(in_spec, out_spec, settings, ops, cal)


class OnnxInt8:
    """The float graph prepared once (``quant_pre_process`` into a temporary folder), then quantized for
    any calibration sample, calibration method, per-channel choice and set of Keras layers kept in float
    (``nodes_to_exclude``). A context manager: the temporary folder goes with it."""

    def __init__(self, proto, options, layer_index: dict):
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        self.options, self.index = options, layer_index
        self._tmp = tempfile.TemporaryDirectory(prefix="rd-onnx-")
        self.dir = Path(self._tmp.name)
        fp32, self.pre = self.dir / "fp32.onnx", self.dir / "pre.onnx"
        if isinstance(proto, (str, Path)):  # the export's FP32 file: read as it is
            fp32 = Path(proto)
        else:
            onnx.save(proto, str(fp32))
        quant_pre_process(str(fp32), str(self.pre), skip_symbolic_shape=False)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tmp.cleanup()

    def compute_nodes(self) -> dict[str, str | None]:
        """``{node name: Keras layer}`` for every Conv/Gemm/MatMul of the prepared graph."""
        import onnx

        from resnet_deploy.converters.int8_analysis import onnx_node_layer

        return {n.name: onnx_node_layer(n, self.index) for n in onnx.load(str(self.pre)).graph.node
                if n.op_type in ONNX_COMPUTE_OPS}

    def quantize(self, out_path: Path, calibration, method: str, per_channel: bool, float_layers=()) -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from resnet_deploy.converters.calibration import onnx_reader
        from resnet_deploy.converters.int8_analysis import nodes_for_layers

        if calibration is None:
            raise ExportError("ONNX INT8 needs calibration images.", fix="pass --data with CIFAR-10")
        q = self.options.onnx_int8()
        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        exclude = nodes_for_layers(list(float_layers), self.compute_nodes(), self.index, "ONNX") if float_layers else []
        batch = even_batch(len(calibration))  # the histogram calibrators stack batches: sizes must match
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            quantize_static(str(self.pre), str(out_path), onnx_reader(calibration, INPUT_NAME, batch),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=types[q.activation_type], weight_type=types[q.weight_type],
                            reduce_range=q.reduce_range, nodes_to_exclude=exclude,
                            calibrate_method=getattr(CalibrationMethod, _CALIB[method]))
        weights = f"{q.weight_type} " + ("per-channel" if per_channel else "per-tensor")
        cal = {"tool": "onnxruntime.quantization.quantize_static", "method": method,
               "activations": f"{q.activation_type} per-tensor",
               "weights": weights + (" (7-bit range, reduce_range)" if q.reduce_range else ""),
               **q.to_dict(),  # activation_type, weight_type, reduce_range, chosen_by, reason, cpu, scheme
               "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process",
               "reader_batch": batch, "sample": calibration.recipe}
        if float_layers:
            cal.update(float_layers=list(float_layers), nodes_to_exclude=exclude)
        return cal

    def analyze(self, qdq_path: Path, images) -> list[dict]:
        from resnet_deploy.converters.int8_analysis import onnx_layer_errors

        return onnx_layer_errors(self.pre, qdq_path, images, INPUT_NAME, self.index, self.dir)


def _quantize(model, proto, out_path: Path, options, calibration) -> dict:
    from resnet_deploy.converters.int8_analysis import keras_layer_index

    with OnnxInt8(proto, options, keras_layer_index(model)) as q:
        return q.quantize(out_path, calibration, options.calib_method, options.onnx_per_channel,
                          options.int8_float_layers)


def even_batch(n: int, cap: int = 16) -> int:
    """The largest batch size <= cap that divides n (ONNX Runtime's entropy/percentile calibrators
    fail on a short last batch)."""
    return max(b for b in range(1, min(cap, n) + 1) if n % b == 0)


def _topological_sort(graph) -> None:
    """Reorder ``graph.node`` so every node comes after the producers of its inputs (ONNX requires it)."""
    ready = {i.name for i in graph.input} | {t.name for t in graph.initializer} | {""}
    pending, ordered = list(graph.node), []
    while pending:
        rest = [n for n in pending if not all(i in ready for i in n.input)]
        done = [n for n in pending if all(i in ready for i in n.input)]
        if not done:
            raise ExportError("The FP16 ONNX graph has a cycle or a dangling input.", fix="report this model")
        for n in done:
            ready.update(n.output)
        ordered += done
        pending = rest
    new = [type(n)() for n in ordered]
    for dst, src in zip(new, ordered):
        dst.CopyFrom(src)
    del graph.node[:]
    graph.node.extend(new)


def _tensor_spec(v) -> TensorSpec:
    t = v.type.tensor_type
    shape = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
    return TensorSpec(v.name, shape, _ELEM.get(t.elem_type, str(t.elem_type)))


def _graph(model):
    """The graph of an ONNX file or of a loaded ModelProto."""
    import onnx

    return model.graph if isinstance(model, onnx.ModelProto) else onnx.load(str(model), load_external_data=False).graph


def io_specs(path) -> tuple[TensorSpec, TensorSpec]:
    g = _graph(path)
    return _tensor_spec(g.input[0]), _tensor_spec(g.output[0])


def op_report(path) -> dict:
    """Op-type counts, QDQ pairs, and the compute ops (Conv/Gemm/MatMul) whose data and weight inputs do
    not both come from DequantizeLinear (or that are not integer QOperators)."""
    g = _graph(path)
    producer = {o: n.op_type for n in g.node for o in n.output}
    counts = Counter(n.op_type for n in g.node)
    float_compute, int_compute = [], 0
    for n in g.node:
        if n.op_type in ONNX_COMPUTE_OPS:
            if all(producer.get(i) == "DequantizeLinear" for i in n.input[:2]):
                int_compute += 1
            else:
                float_compute.append(n.name or n.op_type)
        elif n.op_type in ("QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger"):
            int_compute += 1
    return {"op_counts": dict(sorted(counts.items())), "quantize_linear": counts.get("QuantizeLinear", 0),
            "dequantize_linear": counts.get("DequantizeLinear", 0), "integer_compute_ops": int_compute,
            "float_compute_ops": float_compute}
