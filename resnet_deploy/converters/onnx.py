"""ONNX artifacts: FP32 (tf2onnx ``from_keras``), FP16 (float I/O kept) and INT8 (ONNX Runtime static
quantization, QDQ, per-channel weights).

``from_keras`` is used, not ``from_function``: the latter turns the ``Normalization`` layer's mean and
variance into extra graph inputs that ONNX Runtime refuses. Every graph is checked to
have exactly one input and one output, and the batch dimension is named ``batch`` (dynamic).
INT8 activations default to uint8 on x86 (ONNX Runtime's fast U8S8 kernels) and int8 on arm64, and
weights to 7 bits (``reduce_range``) on x86 CPUs without VNNI, where 8-bit weights saturate ONNX
Runtime's VPMADDUBSW kernels (``onnx_rules``); ``options.scheme`` overrides them on ``--target host``.
The manifest's ``calibration`` block records ``activation_type``, ``weight_type``, ``reduce_range``, who
chose each (``chosen_by``) and why (``reason``).
``OnnxInt8`` prepares the float graph once and quantizes it for each try of the accuracy-aware search;
``options.search.float_layers`` become ``nodes_to_exclude`` (those convolutions compute in float).

One conversion per export: tf2onnx runs for the FP32 file only (for a large model in a second process
beside the TFLite conversions: ``onnx_process``); the FP16 and INT8 files are made from that file and
committed after it has passed the parity check (``session.ExportSession.onnx_fp32``), and their
manifests name it (``options.converter.converted_from``). The INT8 scheme comes from ``--target`` (``onnx_rules``) and must
be the one the planned file name carries.
"""

from __future__ import annotations

import contextlib
import io
import shutil
import tempfile
from collections import Counter
from pathlib import Path

import numpy as np

from resnet_deploy.artifact import TensorSpec
from resnet_deploy.config import Precision
from resnet_deploy.converters.base import ONNX_COMPUTE_OPS, ArtifactPlan, ConvertResult
from resnet_deploy.converters.onnx_process import INPUT_NAME, to_onnx
from resnet_deploy.errors import ExportError

_CALIB = {"minmax": "MinMax", "entropy": "Entropy", "percentile": "Percentile", "minmax-bc": "MinMax"}
_ELEM = {1: "float32", 10: "float16", 3: "int8", 2: "uint8"}


def float_source(session, model, opset: int, as_path: bool = False):
    """The float graph FP16 and INT8 are made from, and where it came from: the session's FP32 ONNX file where
    there is one (``as_path``: the file itself, not loaded; then also its name and sha256 for the manifest),
    else a fresh tf2onnx conversion of ``model`` (and None). Files made from the FP32 file are committed only
    after it has passed the parity check."""
    import onnx

    fp32 = session.onnx_fp32
    if fp32 is None:
        return to_onnx(model, opset), None
    origin = {"artifact": fp32.path.name, "sha256": fp32.sha256,
              "note": "made from the FP32 ONNX file of this export, committed after it passed validation "
                      "(one tf2onnx run per export)"}
    return (fp32.path if as_path else onnx.load(str(fp32.path))), origin


def convert(session, plan: ArtifactPlan) -> ConvertResult:
    """Write ``plan.target`` at ``plan.path``: make the file for its precision, then check it and read it back."""
    make = {Precision.FP32: _fp32, Precision.FP16: _fp16, Precision.INT8: _int8}.get(plan.target.precision)
    if make is None:
        raise ExportError(f"ONNX has no {plan.target.precision.value} target here.", expected="fp32, fp16 or int8")
    settings = {"converter": "tf2onnx.convert.from_keras", "opset": plan.options.opset, "dynamic_batch": True}
    extra, cal = make(session, plan)
    return _checked(plan, {**settings, **extra}, cal)


def _fp32(session, plan: ArtifactPlan) -> tuple[dict, None]:
    """tf2onnx's graph (from the process started beside the TFLite conversions, or converted now), kept by the
    session as the source of the FP16 and INT8 files."""
    import onnx

    proc, extra = session.take_onnx_process(), {}
    if proc is not None:
        shutil.move(proc.result(), plan.path)
        extra["process"] = "a second process, beside the TFLite conversions (onnx_process)"
    else:
        onnx.save(to_onnx(plan.model, plan.options.opset), str(plan.path))
    session.keep_onnx_fp32(Path(plan.path))
    return extra, None


def _fp16(session, plan: ArtifactPlan) -> tuple[dict, None]:
    import onnx
    from onnxruntime.transformers.float16 import convert_float_to_float16

    proto, origin = float_source(session, plan.model, plan.options.opset)
    half = convert_float_to_float16(proto, keep_io_types=True)
    _topological_sort(half.graph)  # the tool appends its input Casts at the end of the node list
    onnx.save(half, str(plan.path))
    extra = {"converted_from": origin} if origin else {}
    return {**extra, "fp16": "onnxruntime.transformers.float16.convert_float_to_float16", "io": "float32"}, None


def _int8(session, plan: ArtifactPlan) -> tuple[dict, dict]:
    """QDQ quantization of the float graph, in the scheme the plan's file name carries."""
    from resnet_deploy.converters.int8_mapping import keras_kernels

    source, origin = float_source(session, plan.model, plan.options.opset, as_path=True)
    o = plan.options
    with OnnxInt8(source, o, keras_kernels(plan.model)) as q:
        cal = q.quantize(Path(plan.path), plan.calibration, o.calibration.method, o.calibration.per_channel,
                         o.search.float_layers)
    if plan.target.scheme and cal["scheme"] != plan.target.scheme:
        raise ExportError(f"The ONNX INT8 file was quantized as {cal['scheme']}, but its planned name says "
                          f"{plan.target.scheme}.", expected="the scheme the plan named (the CPU flags changed "
                          "during the export?)", fix="export again, or pass --target explicitly")
    extra = {"converted_from": origin} if origin else {}
    return {**extra, "target": cal["target"], "scheme": cal["scheme"], "quant_format": "QDQ",
            "per_channel": o.calibration.per_channel, "activation_type": cal["activation_type"],
            "weight_type": cal["weight_type"], "reduce_range": cal["reduce_range"],
            "float_layers": list(o.search.float_layers)}, cal


def _checked(plan: ArtifactPlan, settings: dict, cal: dict | None) -> ConvertResult:
    """The written file checked by ONNX and read back: I/O specs and the op report; an INT8 file leaves no
    compute op outside QDQ pairs but the layers kept float on purpose."""
    import onnx

    onnx.checker.check_model(str(plan.path))
    written = onnx.load(str(plan.path), load_external_data=False)
    ops = op_report(written)
    if cal is not None and sorted(ops["float_compute_ops"]) != sorted(cal.get("nodes_to_exclude", [])):
        raise ExportError(f"The INT8 ONNX model leaves {ops['float_compute_ops']} outside QDQ pairs "
                          f"(layers to keep float: {list(plan.options.search.float_layers) or 'none'}).",
                          expected="every Conv/Gemm/MatMul reading dequantized int8 tensors, except the layers "
                                   "kept float on purpose", fix="report this model")
    return ConvertResult(*io_specs(written), settings, ops, cal)


class OnnxInt8:
    """The float graph prepared once (``quant_pre_process`` into a temporary folder), then quantized for
    any calibration sample, calibration method, per-channel choice and set of Keras layers kept in float
    (``nodes_to_exclude``). A context manager: the temporary folder goes with it."""

    def __init__(self, proto, options, kernels: dict):
        import onnx
        from onnxruntime.quantization.shape_inference import quant_pre_process

        from resnet_deploy.converters.int8_mapping import onnx_mapping

        self.options, self.kernels = options, kernels
        self._tmp = tempfile.TemporaryDirectory(prefix="rd-onnx-")
        self.dir = Path(self._tmp.name)
        fp32, self.pre = self.dir / "fp32.onnx", self.dir / "pre.onnx"
        if isinstance(proto, (str, Path)):  # the export's FP32 file: read as it is
            fp32 = Path(proto)
        else:
            onnx.save(proto, str(fp32))
        quant_pre_process(str(fp32), str(self.pre), skip_symbolic_shape=False)
        # which node computes which Keras layer, by weights (int8_mapping), in the graph that is quantized
        self.mapping = onnx_mapping(self.pre, kernels)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._tmp.cleanup()

    def compute_nodes(self) -> dict[str, str | None]:
        """``{node name: Keras layer}`` for every weighted Conv/Gemm/MatMul of the prepared graph."""
        return dict(self.mapping.node_layer)

    def quantize(self, out_path: Path, calibration, method: str, per_channel: bool, float_layers=()) -> dict:
        from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

        from resnet_deploy.converters.calibration import onnx_reader
        from resnet_deploy.converters.int8_mapping import check_float_layers, onnx_float_layers

        if calibration is None:
            raise ExportError("ONNX INT8 needs calibration images.", fix="pass --data with CIFAR-10")
        q = self.options.onnx_int8()
        types = {"uint8": QuantType.QUInt8, "int8": QuantType.QInt8}
        float_layers = list(dict.fromkeys(float_layers))
        exclude = self.mapping.nodes_for(float_layers) if float_layers else []
        batch = even_batch(len(calibration))  # the histogram calibrators stack batches: sizes must match
        with contextlib.redirect_stdout(io.StringIO()):  # the histogram calibrators print their progress
            quantize_static(str(self.pre), str(out_path), onnx_reader(calibration, INPUT_NAME, batch),
                            quant_format=QuantFormat.QDQ, per_channel=per_channel,
                            activation_type=types[q.activation_type], weight_type=types[q.weight_type],
                            reduce_range=q.reduce_range, nodes_to_exclude=exclude,
                            calibrate_method=getattr(CalibrationMethod, _CALIB[method]))
        corrected = correct_biases(self.pre, out_path, calibration) if method.endswith("-bc") else None
        check_float_layers(onnx_float_layers(out_path, self.kernels), float_layers, "ONNX",
                           "Conv/Gemm/MatMul quantized")
        weights = f"{q.weight_type} " + ("per-channel" if per_channel else "per-tensor")
        cal = {"tool": "onnxruntime.quantization.quantize_static", "method": method,
               "activations": f"{q.activation_type} per-tensor",
               "weights": weights + (" (7-bit range, reduce_range)" if q.reduce_range else ""),
               **q.to_dict(),  # activation_type, weight_type, reduce_range, chosen_by, reason, cpu, scheme
               "pre_process": "onnxruntime.quantization.shape_inference.quant_pre_process",
               "reader_batch": batch, "sample": calibration.recipe}
        if float_layers:
            cal.update(float_layers=list(float_layers), nodes_to_exclude=exclude)
        if corrected is not None:
            cal["bias_correction"] = corrected
        return cal

    def analyze(self, qdq_path: Path, images) -> list[dict]:
        from resnet_deploy.converters.int8_analysis import onnx_layer_errors

        return onnx_layer_errors(self.pre, qdq_path, images, INPUT_NAME, self.mapping.node_layer, self.dir)


def correct_biases(float_path, qdq_path, calibration, batch: int = 50) -> dict:
    """Empirical bias correction of a QDQ file, in place: for every Conv with a bias, the mean per output channel of
    its output over the calibration images is measured in the float graph and in the quantized one, and the bias
    is moved by the difference (rounded in the int32 bias's own scale), so quantization no longer shifts each
    channel's mean (the expected-error correction of Nagel et al. 2019, NNCF's fast bias correction, measured in
    one pass for every layer). Returns what was done, for the manifest."""
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    from resnet_deploy.converters.int8_mapping import Kernel, match, onnx_weights

    q = onnx.load(str(qdq_path))
    f = onnx.load(str(float_path))
    inits = {i.name: i for i in q.graph.initializer}
    producer = {o: n for n in q.graph.node for o in n.output}
    # each quantized Conv paired with its float twin by weights (ONNX Runtime renames a Conv's output when it
    # removes the Relu after it, so names do not pair them)
    f_nodes = {n.name: n for n in f.graph.node if n.op_type == "Conv"}
    twins = match({k: v for k, v in onnx_weights(q.graph).items()},
                  {k: Kernel(k, "conv", v) for k, v in onnx_weights(f.graph).items() if k in f_nodes}, "ONNX").node_layer
    convs = [n for n in q.graph.node if n.op_type == "Conv" and len(n.input) > 2 and twins.get(n.name)]
    names = [n.output[0] for n in convs]
    f_names = [f_nodes[twins[n.name]].output[0] for n in convs]
    if not names:
        return {"method": "none: no Conv with a bias"}

    def channel_means(model, names) -> dict[str, np.ndarray]:
        m = onnx.ModelProto()
        m.CopyFrom(model)
        have = {o.name for o in m.graph.output}
        m.graph.output.extend([helper.make_tensor_value_info(t, onnx.TensorProto.FLOAT, None)
                               for t in names if t not in have])
        so = ort.SessionOptions()
        so.log_severity_level = 3
        sess = ort.InferenceSession(m.SerializeToString(), so, providers=["CPUExecutionProvider"])
        sums: dict[str, np.ndarray] = {}
        counts: dict[str, int] = {}
        inp = sess.get_inputs()[0].name
        for i in range(0, len(calibration), batch):
            outs = sess.run(names, {inp: calibration.x[i:i + batch]})
            for t, v in zip(names, outs):  # (N, C, H, W)
                sums[t] = sums.get(t, 0) + np.asarray(v, np.float64).sum(axis=(0, 2, 3))
                counts[t] = counts.get(t, 0) + v.shape[0] * v.shape[2] * v.shape[3]
        return {t: s / counts[t] for t, s in sums.items()}

    mf, mq = channel_means(f, f_names), channel_means(q, names)
    moved = []
    for n, t, ft in zip(convs, names, f_names):
        shift = mq[t] - mf[ft]  # per output channel: what quantization added to its mean
        b = n.input[2]
        dq = producer.get(b)
        if dq is not None and dq.op_type == "DequantizeLinear" and dq.input[0] in inits and dq.input[1] in inits:
            old = numpy_helper.to_array(inits[dq.input[0]])
            scale = numpy_helper.to_array(inits[dq.input[1]]).astype(np.float64)
            new = np.clip(np.round(old - shift / scale), -2 ** 31, 2 ** 31 - 1).astype(old.dtype)
            inits[dq.input[0]].CopyFrom(numpy_helper.from_array(new, dq.input[0]))
        elif b in inits:
            old = numpy_helper.to_array(inits[b])
            inits[b].CopyFrom(numpy_helper.from_array((old - shift).astype(old.dtype), b))
        else:
            continue
        moved.append(n.name)
    onnx.save(q, str(qdq_path))
    return {"method": "empirical bias correction (per-channel mean of each Conv output, float vs quantized, "
                      "over the calibration images, one pass)", "convs_corrected": len(moved)}


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
