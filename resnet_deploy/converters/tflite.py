"""TFLite artifacts: FP32, FP16, dynamic-range INT8 and full-integer INT8 (float or int8 I/O).

``convert(session, plan)`` writes one ``.tflite`` file and returns its I/O specs and an op report read back
from the flatbuffer: for INT8 targets, every CONV_2D / FULLY_CONNECTED must have integer inputs, or the
conversion fails.

Under Keras 3, ``TFLiteConverter.from_keras_model`` writes the model into a temporary SavedModel on
*every* call (about 5 s of the 6 s a ResNet20 file took). Within an export the float model is traced
into a SavedModel once (``session.ExportSession.saved_model``, the same ``ExportArchive`` TensorFlow builds)
and each file is converted from it with ``from_saved_model``; other models (the tf_keras QAT twin) and
sessions without the model still go through ``from_keras_model``.

The op report reads the flatbuffer through its published schema (``ai_edge_litert.schema_py_generated``),
not the interpreter's private ``_get_ops_details``; ``tests/test_converters.py`` pins the schema module.

Accuracy-aware INT8 and layers kept in float (``search.float_layers``, chosen by hand or by the
accuracy-aware fallback) go through ``TFLiteInt8``: TensorFlow's ``QuantizationDebugger`` calibrates once and
re-quantizes with ``denylisted_nodes`` (selective quantization), so those layers compute in float and every
other conv/dense op stays integer; the op report must then list exactly those layers as float.
"""

from __future__ import annotations

import contextlib
import io
from collections import Counter
from pathlib import Path

import numpy as np

from resnet_deploy.config import Precision
from resnet_deploy.converters.base import TFLITE_COMPUTE_OPS, ArtifactPlan, ConvertResult
from resnet_deploy.errors import ExportError

_FROM_SAVED_MODEL = ("tf.lite.TFLiteConverter.from_saved_model (the model traced once per export, as "
                     "from_keras_model traces it: keras ExportArchive, training=False)")


def convert(session, plan: ArtifactPlan) -> ConvertResult:
    """Write ``plan.target`` at ``plan.path``: set the converter up for its precision, convert, check the file."""
    import tensorflow as tf

    p = plan.target.precision
    if p is Precision.INT8 and plan.options.calibration.activations == "int16" and not plan.target.qat:
        return _convert_16x8(session, plan)
    if p is Precision.INT8 and (plan.options.search.float_layers or plan.options.int8_aware) and not plan.target.qat:
        return _convert_selective(session, plan)
    conv, how = _run(lambda: _converter(session, plan.model), plan.target.tag)
    settings = {"converter": how, "tensorflow": tf.__version__, **_configure_for(conv, plan)}
    Path(plan.path).write_bytes(_run(conv.convert, plan.target.tag))
    ops = op_report(plan.path)
    if p is Precision.INT8 and ops["float_compute_ops"]:
        raise ExportError(f"The INT8 TFLite model still computes {ops['float_compute_ops']} in float.",
                          expected="every conv/dense op integer in a full-integer model",
                          fix="report this model; a layer the converter cannot quantize is in the way")
    cal = _calibration_block(plan.calibration) if p is Precision.INT8 else None
    return ConvertResult(*io_specs(plan.path), settings, ops, cal)


def _configure_for(conv, plan: ArtifactPlan) -> dict:
    """Set ``conv`` up for the plan's precision; returns the settings the manifest records."""
    import tensorflow as tf

    p = plan.target.precision
    if p is Precision.FP16:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.target_spec.supported_types = [tf.float16]
        return {"weights": "float16", "compute": "float32 (weights dequantized at load)"}
    if p is Precision.DYNAMIC_INT8:
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        return {"weights": "int8", "activations": "float32 (dynamic-range)"}
    if p is Precision.INT8:
        _require_calibration(plan.calibration)
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = plan.calibration.representative_dataset
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
        if plan.options.int8_io:
            conv.inference_input_type = tf.int8
            conv.inference_output_type = tf.int8
        return {"weights": "int8 per-channel", "activations": "int8", "io": "int8" if plan.options.int8_io else "float32",
                "qat": plan.target.qat}
    return {}


def _converter(session, model, fresh: bool = False):
    """A TFLiteConverter for ``model`` with every setting at its default, and how it was made: the session's
    converter of the shared SavedModel where there is one (``fresh``: a new one of it), else
    ``from_keras_model``."""
    import tensorflow as tf

    conv = session.tflite_converter(model, fresh=fresh)
    if conv is None:
        return tf.lite.TFLiteConverter.from_keras_model(model), "tf.lite.TFLiteConverter.from_keras_model"
    _reset(conv)
    return conv, _FROM_SAVED_MODEL


def _reset(conv) -> None:
    """Put back every setting ``convert`` changes (a converter is reused for the export's TFLite files)."""
    import tensorflow as tf

    conv.optimizations = set()
    conv.target_spec = tf.lite.TargetSpec()
    conv.representative_dataset = None
    conv.inference_input_type = tf.float32
    conv.inference_output_type = tf.float32


def _require_calibration(calibration) -> None:
    if calibration is None:
        raise ExportError("Full-integer INT8 needs calibration images.", fix="pass --data with CIFAR-10")


def _run(fn, tag: str):
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # Keras 3 prints the SavedModel it traces
            return fn()
    except ExportError:
        raise
    except Exception as exc:  # the converter raises ConverterError and friends
        raise ExportError(f"TFLite conversion ({tag}) failed: {type(exc).__name__}: {str(exc)[:400]}",
                          expected="a Keras model made of TFLite builtin ops",
                          fix="check the model's layers; custom layers need a TFLite implementation") from exc


def _calibration_block(calibration) -> dict:
    return {"tool": "TFLite representative_dataset", "method": "minmax (TFLite default)",
            "activations": "int8 per-tensor", "weights": "int8 per-channel (symmetric)",
            "sample": calibration.recipe}


class TFLiteInt8:
    """One calibration of ``model`` (``QuantizationDebugger``), quantized again for any set of float layers.

    Calibration is the slow part (about 20 s for a ResNet34); ``quantize(float_layers)`` only re-runs
    TensorFlow's MLIR quantizer with ``denylisted_nodes``, in well under a second."""

    def __init__(self, session, model, calibration):
        import tensorflow as tf

        from resnet_deploy.converters.int8_mapping import keras_kernels, tflite_mapping

        _require_calibration(calibration)
        conv, self.how = _run(lambda: _converter(session, model, fresh=True), "int8 calibration")
        conv.optimizations = [tf.lite.Optimize.DEFAULT]
        conv.representative_dataset = calibration.representative_dataset
        # float kernels allowed, so denylisted layers can run in float
        conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8, tf.lite.OpsSet.TFLITE_BUILTINS]
        self.calibration = calibration
        self.kernels = keras_kernels(model)
        self.debugger = _run(lambda: tf.lite.experimental.QuantizationDebugger(
            converter=conv, debug_dataset=lambda: iter(())), "int8 calibration")
        # which op computes which Keras layer, by weights (int8_mapping): denylisted_nodes takes the ops'
        # output tensor names, and the analysis table names layers through it
        self.mapping = tflite_mapping(self.debugger.calibrated_model, self.kernels)

    def op_names(self) -> dict[str, str | None]:
        """``{output tensor name: Keras layer}`` of the calibrated model's conv/dense ops."""
        return dict(self.mapping.node_layer)

    def quantize(self, float_layers=()) -> bytes:
        """The INT8 model with ``float_layers`` computing in float; the layers that compute in float are read
        back from the result by their weights and must be exactly those."""
        import tensorflow as tf

        from resnet_deploy.converters.int8_mapping import check_float_layers, tflite_float_layers

        layers = list(dict.fromkeys(float_layers))
        nodes = self.mapping.nodes_for(layers) if layers else None
        self.debugger.options = tf.lite.experimental.QuantizationDebugOptions(denylisted_nodes=nodes)
        out = _run(self.debugger.get_nondebug_quantized_model, "int8 quantization")
        check_float_layers(tflite_float_layers(out, self.kernels), layers, "TFLite", "conv/dense op integer")
        return out

    def analyze(self, images: np.ndarray) -> list[dict]:
        from resnet_deploy.converters.int8_analysis import tflite_layer_errors

        return _run(lambda: tflite_layer_errors(self.debugger, images, self.mapping.node_layer), "int8 analysis")


def _convert_selective(session, plan: ArtifactPlan) -> ConvertResult:
    """Full-integer INT8 except ``search.float_layers``, which compute in float (checked by weights in
    ``TFLiteInt8.quantize``)."""
    import tensorflow as tf

    layers = list(plan.options.search.float_layers)
    q = TFLiteInt8(session, plan.model, plan.calibration)
    Path(plan.path).write_bytes(q.quantize(layers))
    ops = op_report(plan.path)
    if len(ops["float_compute_ops"]) != len(q.mapping.nodes_for(layers) if layers else []):
        raise ExportError(f"The INT8 TFLite model computes {ops['float_compute_ops']} in float; "
                          f"{len(layers)} layer(s) were to stay float: {layers}.",
                          expected="exactly the listed layers in float, every other conv/dense op integer",
                          fix="list only conv/dense layers in --int8-float-layers (names from --analyze)")
    settings = {"converter": q.how, "tensorflow": tf.__version__, "weights": "int8 per-channel", "activations": "int8",
                "io": "float32", "qat": plan.target.qat, "float_layers": layers,
                "selective": "tf.lite.experimental.QuantizationDebugger denylisted_nodes",
                "layer_mapping": "by weights (int8_mapping)"}
    return ConvertResult(*io_specs(plan.path), settings, ops,
                         dict(_calibration_block(plan.calibration), float_layers=layers))


def quantize_16x8(session, model, calibration) -> bytes:
    """The whole model in 16x8: int16 activations, int8 weights (``EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_
    INT16_WEIGHTS_INT8``), float I/O. The converter applies it to every op: it has no per-layer 16x8 (a
    ``QuantizationDebugger`` denylist only leaves ops in float), so 16x8 is a whole-file alternative to keeping
    layers float. LiteRT's XNNPACK delegate does not run int16 ops: they run on the reference kernels."""
    import tensorflow as tf

    _require_calibration(calibration)
    conv, _ = _run(lambda: _converter(session, model, fresh=True), "16x8 quantization")
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = calibration.representative_dataset
    conv.target_spec.supported_ops = [tf.lite.OpsSet.EXPERIMENTAL_TFLITE_BUILTINS_ACTIVATIONS_INT16_WEIGHTS_INT8]
    return _run(conv.convert, "16x8 quantization")


def _convert_16x8(session, plan: ArtifactPlan) -> ConvertResult:
    import tensorflow as tf

    if plan.options.search.float_layers:
        raise ExportError("16x8 TFLite files keep no layer in float here.",
                          expected="--int8-float-layers or 16x8, not both", fix="drop --int8-float-layers")
    Path(plan.path).write_bytes(quantize_16x8(session, plan.model, plan.calibration))
    ops = op_report(plan.path)
    if ops["float_compute_ops"]:
        raise ExportError(f"The 16x8 TFLite model still computes {ops['float_compute_ops']} in float.",
                          expected="every conv/dense op integer (int16 activations, int8 weights)",
                          fix="report this model")
    settings = {"converter": "tf.lite.TFLiteConverter (16x8)", "tensorflow": tf.__version__,
                "weights": "int8 per-channel", "activations": "int16 (16x8)", "io": "float32", "qat": False}
    return ConvertResult(*io_specs(plan.path), settings, ops,
                         dict(_calibration_block(plan.calibration), activations="int16 per-tensor (16x8)"))


def _interpreter(path):
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    # without the XNNPACK delegate, so the op list is the flatbuffer's own
    it = Interpreter(model_path=str(path), experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    return it


def io_specs(path) -> tuple:
    """The file's input and output ``TensorSpec`` as it declares them (a dynamic batch is None)."""
    from resnet_deploy.runtimes.litert_runner import tensor_spec

    it = _interpreter(path)
    return tensor_spec(it.get_input_details()[0], signature=True), tensor_spec(it.get_output_details()[0], signature=True)


def read_graph(model) -> tuple[list[dict], list[dict]]:
    """The main subgraph's operators (``index``, ``op_name``, ``inputs``, ``outputs``) and tensors (``name``,
    ``dtype``) of a .tflite file (path or bytes), read with the flatbuffer schema LiteRT publishes."""
    from ai_edge_litert import schema_py_generated as schema

    buf = model if isinstance(model, (bytes, bytearray)) else Path(model).read_bytes()
    m = schema.Model.GetRootAs(buf, 0)
    builtin = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    types = {v: k.lower() for k, v in vars(schema.TensorType).items() if not k.startswith("_")}
    codes = []
    for i in range(m.OperatorCodesLength()):
        c = m.OperatorCodes(i)
        code = max(c.BuiltinCode(), c.DeprecatedBuiltinCode())  # schema v3a: the larger of the two fields
        custom = c.CustomCode()
        codes.append(custom.decode() if code == schema.BuiltinOperator.CUSTOM and custom else builtin[code])
    g = m.Subgraphs(0)
    tensors = [{"name": g.Tensors(i).Name().decode(), "dtype": types[g.Tensors(i).Type()]}
               for i in range(g.TensorsLength())]
    ops = [{"index": i, "op_name": codes[g.Operators(i).OpcodeIndex()],
            "inputs": [int(v) for v in g.Operators(i).InputsAsNumpy()] if g.Operators(i).InputsLength() else [],
            "outputs": [int(v) for v in g.Operators(i).OutputsAsNumpy()] if g.Operators(i).OutputsLength() else []}
           for i in range(g.OperatorsLength())]
    return ops, tensors


def op_report(path) -> dict:
    """Op-type counts, and which compute ops (conv/dense) read float inputs or weights."""
    ops, tensors = read_graph(path)
    dtypes = {i: t["dtype"] for i, t in enumerate(tensors)}
    counts: Counter = Counter()
    float_compute, int_compute = [], 0
    for op in ops:
        name = op["op_name"]
        counts[name] += 1
        if name in TFLITE_COMPUTE_OPS:
            in_types = [dtypes[i] for i in op["inputs"][:2] if i >= 0]
            if all(t in ("int8", "uint8", "int16") for t in in_types):
                int_compute += 1
            else:
                float_compute.append(f"{name}#{op['index']}({','.join(in_types)})")
    return {"op_counts": dict(sorted(counts.items())), "integer_compute_ops": int_compute,
            "float_compute_ops": float_compute}
