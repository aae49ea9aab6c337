"""Issue #23: Keras layers tied to TFLite ops and ONNX nodes by what they compute (their weights), on models this
project did not build: Keras 2 (``tf_keras``) files with default layer names, a Sequential model, one input feeding
several convolutions, a SavedModel. The expected answers are computed another way here: the float weights read back
through LiteRT's interpreter (``get_tensor``) or ONNX's ``numpy_helper``, compared with ``np.allclose`` after
undoing the known layouts, not with the module's cosine matcher.
"""

from __future__ import annotations

import os

import numpy as np
import pytest

from resnet_deploy.converters.int8_mapping import Kernel, keras_kernels, match
from resnet_deploy.errors import ExportError


# ----------------------------------------------------------------------------------------------
# The matcher, on numpy alone
# ----------------------------------------------------------------------------------------------
def test_matching_is_blind_to_per_channel_scale_sign_and_int8_rounding_but_not_to_the_kernel():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(16, 27)), rng.normal(size=(16, 27))
    kernels = {"conv2d": Kernel("conv2d", "conv", a), "conv2d_1": Kernel("conv2d_1", "conv", b),
               "dense": Kernel("dense", "dense", rng.normal(size=(10, 16)))}
    scale = rng.uniform(-2, 2, size=(16, 1))  # a folded BatchNormalization, negative gammas included
    folded = b * scale
    int8 = np.round(folded / np.abs(folded).max(1, keepdims=True) * 127)  # per-channel int8, scales dropped
    m = match({"op_a": int8, "op_b": a * 3.0, "op_c": rng.normal(size=(16, 27))}, kernels, "TFLite")
    assert m.node_layer == {"op_a": "conv2d_1", "op_b": "conv2d", "op_c": None}
    assert m.unplaced == ["dense"]
    assert m.nodes_for(["conv2d_1"]) == ["op_a"]


def test_a_layer_that_cannot_be_placed_is_a_clear_error_before_quantizing():
    rng = np.random.default_rng(1)
    k = rng.normal(size=(8, 9))
    kernels = {"conv2d": Kernel("conv2d", "conv", k), "conv2d_1": Kernel("conv2d_1", "conv", k.copy())}
    m = match({"op": k}, kernels, "ONNX")  # two layers with the same kernel: the op fits both equally
    assert m.node_layer == {"op": None} and sorted(m.ambiguous["op"]) == ["conv2d", "conv2d_1"]
    with pytest.raises(ExportError, match=r"No ONNX op computes the layer\(s\) \['conv2d'\]") as e:
        m.nodes_for(["conv2d"])
    assert e.value.fix
    with pytest.raises(ExportError, match="not a conv or dense layer"):
        m.nodes_for(["batch_normalization"])


# ----------------------------------------------------------------------------------------------
# Real converters on Keras 2 models written as their authors would
# ----------------------------------------------------------------------------------------------
def _keras2_resnet_with_default_names():
    """A tiny ResNet of the MLPerf Tiny style: conv shortcut made after the block, softmax head."""
    import tf_keras
    from tf_keras.layers import Activation, BatchNormalization, Conv2D, Dense, GlobalAveragePooling2D, Input, add

    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(0)
    inputs = Input(shape=(32, 32, 3))
    x = Activation("relu")(BatchNormalization()(Conv2D(8, 3, padding="same")(inputs)))
    y = Activation("relu")(BatchNormalization()(Conv2D(8, 3, strides=2, padding="same")(x)))
    y = BatchNormalization()(Conv2D(8, 3, padding="same")(y))
    x = Conv2D(8, 1, strides=2)(x)
    x = Activation("relu")(add([x, y]))
    out = Dense(10, activation="softmax")(GlobalAveragePooling2D()(x))
    model = tf_keras.Model(inputs, out)
    _randomize_batchnorm(model)
    return model


def _keras2_sequential():
    import tf_keras
    from tf_keras.layers import Activation, Conv2D, Dense, Flatten, MaxPooling2D

    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(1)
    return tf_keras.Sequential([Conv2D(8, 3, padding="same", input_shape=(32, 32, 3)), Activation("relu"),
                                Conv2D(8, 3), Activation("relu"), MaxPooling2D(4), Flatten(), Dense(16),
                                Activation("relu"), Dense(10), Activation("softmax")])


def _keras2_shared_input():
    import tf_keras
    from tf_keras.layers import Concatenate, Conv2D, Dense, GlobalAveragePooling2D, Input, Rescaling

    tf_keras.backend.clear_session()
    tf_keras.utils.set_random_seed(2)
    inputs = Input(shape=(32, 32, 3))
    x = Rescaling(1 / 127.5, offset=-1)(inputs)
    x = Concatenate()([Conv2D(4, k, padding="same", activation="relu")(x) for k in (1, 3, 5)])
    return tf_keras.Model(inputs, Dense(10, activation="softmax")(GlobalAveragePooling2D()(x)))


def _randomize_batchnorm(model):
    """Trained-looking BatchNormalization statistics (negative gammas too), so folding changes the kernels."""
    rng = np.random.default_rng(3)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            n = layer.get_weights()[0].shape[0]
            layer.set_weights([rng.uniform(-1.5, 1.5, n), rng.normal(0, .1, n), rng.normal(0, .2, n),
                               rng.uniform(.5, 2, n)])


def _save_h5(model, path):
    model.save(path)  # Keras 2 HDF5 with Keras' default layer names
    return path


def _kernel_rows(model2) -> dict[str, np.ndarray]:
    """The test's own view of each conv/dense kernel of the Keras 2 model, output channels first, flattened in
    (kh, kw, I) order: what a TFLite filter (O, kh, kw, I) holds up to a per-channel scale."""
    out = {}
    for layer in model2.layers:
        if type(layer).__name__ in ("Conv2D", "Dense"):
            k = layer.get_weights()[0]
            out[layer.name] = (np.transpose(k, (3, 0, 1, 2)) if k.ndim == 4 else k.T).reshape(k.shape[-1], -1)
    return out


def _same_up_to_channel_scale(w: np.ndarray, k: np.ndarray) -> bool:
    if w.shape != k.shape:
        return False
    ratio = w / np.where(np.abs(k) > 1e-8, k, np.nan)
    per_channel = np.nanmedian(ratio, axis=1, keepdims=True)
    return bool(np.allclose(w, k * per_channel, rtol=1e-3, atol=1e-5))


def _float_layers_by_interpreter(path, kernels: dict[str, np.ndarray]) -> list[str]:
    """The Keras layers of the conv/dense ops that run in float, through LiteRT's interpreter."""
    from ai_edge_litert.interpreter import Interpreter, OpResolverType

    it = Interpreter(model_path=str(path),
                     experimental_op_resolver_type=OpResolverType.BUILTIN_WITHOUT_DEFAULT_DELEGATES)
    it.allocate_tensors()
    tensors = {t["index"]: t for t in it.get_tensor_details()}
    found = []
    for op in it._get_ops_details():
        if op["op_name"] not in ("CONV_2D", "FULLY_CONNECTED") or tensors[op["inputs"][0]]["dtype"] != np.float32:
            continue
        w = it.get_tensor(op["inputs"][1]).astype(np.float64)
        w = w.reshape(w.shape[0], -1)
        found += [name for name, k in kernels.items() if _same_up_to_channel_scale(w, k)]
    return sorted(found)


def _calibration(n: int = 8, scale: float = 255.0):
    from resnet_deploy.converters.calibration import Calibration

    x = np.random.default_rng(0).uniform(0, scale, (n, 32, 32, 3)).astype(np.float32)
    return Calibration(x, {"indices_sha256_16": "synthetic"})


@pytest.mark.parametrize("build,float_layers", [(_keras2_resnet_with_default_names, ["conv2d_1", "conv2d_3", "dense"]),
                                                (_keras2_sequential, ["conv2d_1", "dense_1"]),
                                                (_keras2_shared_input, ["conv2d_1", "conv2d_2"])],
                         ids=["resnet_h5", "sequential_h5", "shared_input_h5"])
def test_tflite_float_layers_of_keras2_files_are_the_layers_named(build, float_layers, tmp_path):
    from resnet_deploy.converters.session import ExportSession
    from resnet_deploy.converters.tflite import TFLiteInt8
    from resnet_deploy.models.io import load_model

    model2 = build()
    path = _save_h5(model2, tmp_path / "m.h5")
    model = load_model(path)  # the project's loader (Keras 3 reading a Keras 2 file)
    kernels = _kernel_rows(model2)
    with ExportSession(model) as session:
        q = TFLiteInt8(session, model, _calibration())
        assert q.mapping.unplaced == [] and sorted(q.mapping.node_layer.values()) == sorted(kernels)
        out = tmp_path / "sel.tflite"
        out.write_bytes(q.quantize(float_layers))
    assert _float_layers_by_interpreter(out, kernels) == sorted(float_layers)


def test_onnx_float_layers_of_a_keras2_savedmodel_are_the_layers_named(tmp_path):
    """A SavedModel has no Keras layers: its kernel variables name them (``conv2d_1``)."""
    import onnx
    from onnx import numpy_helper

    from resnet_deploy.converters.onnx import OnnxInt8
    from resnet_deploy.converters.onnx_process import to_onnx
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.models.io import load_model

    model2 = _keras2_resnet_with_default_names()
    model2.save(tmp_path / "sm", save_format="tf")
    model = load_model(tmp_path / "sm", trust=True)
    kernels = keras_kernels(model)
    assert {"conv2d", "conv2d_1", "conv2d_2", "conv2d_3", "dense"} <= set(kernels), sorted(kernels)
    with OnnxInt8(to_onnx(model, 13), ExportOptions(formats=("onnx",), int8=True), kernels) as q:
        assert q.mapping.unplaced == []
        q.quantize(tmp_path / "q.onnx", _calibration(), "minmax", True, ["conv2d_3", "dense"])
    g = onnx.load(str(tmp_path / "q.onnx")).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    mine = _kernel_rows(model2)
    floats = []
    for n in g.node:
        if n.op_type in ("Conv", "MatMul", "Gemm") and n.input[1] in inits:  # float weight: not dequantized
            w = inits[n.input[1]].astype(np.float64)
            w = np.transpose(w, (0, 2, 3, 1)).reshape(w.shape[0], -1) if n.op_type == "Conv" else w.T
            floats += [name for name, k in mine.items() if _same_up_to_channel_scale(w, k)]
    assert sorted(floats) == ["conv2d_3", "dense"]


def test_analysis_leaks_no_runtime_warning(recwarn):
    from resnet_deploy.converters.int8_analysis import _relative_rmse

    with np.errstate(all="warn"):
        v = _relative_rmse(np.array([np.inf, 1.0]), np.array([3, 1]), 0.1, 0)
    assert not np.isfinite(v)
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning)]


os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
