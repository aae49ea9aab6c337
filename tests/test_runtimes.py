"""Runners: every engine takes the same RGB pixels and returns float logits."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_deploy.config import Format
from resnet_deploy.errors import ModelError, ResnetDeployError
from resnet_deploy.runtimes import open_runner
from resnet_deploy.runtimes.base import dequantize, quantize


def test_quantize_round_trip_and_saturation():
    x = np.array([-300.0, -1.0, 0.0, 0.49, 1.0, 300.0], np.float32)
    q = quantize(x, 0.5, -3, np.int8)
    np.testing.assert_array_equal(q, [-128, -5, -3, -2, -1, 127])
    np.testing.assert_allclose(dequantize(q, 0.5, -3)[1:5], [-1.0, 0.0, 0.5, 1.0])
    assert quantize(np.array([255.0]), 1.0, 0, np.uint8)[0] == 255


def test_format_from_path(tmp_path):
    assert Format.from_path("a.tflite") is Format.TFLITE and Format.from_path("a.onnx") is Format.ONNX
    assert Format.from_path("a.keras") is Format.KERAS
    with pytest.raises(ModelError, match="Cannot tell the format"):
        Format.from_path(tmp_path / "a.pt")


@pytest.fixture(scope="module")
def images(cifar):
    return cifar.test.x[:10]


def test_keras_runner_matches_the_model_and_checks_shapes(tiny_model_path, images):
    from resnet_deploy.models.io import load_model

    model = load_model(tiny_model_path)
    with open_runner(tiny_model_path) as r:
        got = r.predict(images, batch_size=3)
        assert got.dtype == np.float32 and got.shape == (10, 10)
        np.testing.assert_allclose(got, np.asarray(model(images.astype(np.float32), training=False)), atol=1e-5)
        np.testing.assert_allclose(r.predict(images[0]), got[:1], atol=1e-5)  # one HWC image
        with pytest.raises(ResnetDeployError, match="shape"):
            r.predict(np.zeros((2, 28, 28, 3), np.uint8))


def test_litert_runner_resizes_batches_and_matches_keras(tmp_path, tiny_model_path, images):
    import tensorflow as tf

    from resnet_deploy.models.io import load_model

    model = load_model(tiny_model_path)
    path = tmp_path / "m.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_keras_model(model).convert())
    ref = np.asarray(model(images.astype(np.float32), training=False))
    with open_runner(path, threads=1) as r:
        for bs in (1, 4, 10):
            np.testing.assert_allclose(r.predict(images, batch_size=bs), ref, atol=1e-4)


def test_corrupt_artifacts_get_clear_errors(tmp_path):
    for name in ("bad.tflite", "bad.onnx"):
        p = tmp_path / name
        p.write_bytes(b"\x00garbage" * 10)
        with pytest.raises(ResnetDeployError, match="cannot load"):
            with open_runner(p):
                pass
    with pytest.raises(ResnetDeployError, match="does not exist"):
        with open_runner(tmp_path / "missing.tflite"):
            pass


def test_integer_tensors_without_quantization_parameters_hold_raw_values():
    # TFLite reports an integer tensor without quantization parameters as scale 0, zero point 0.
    x = np.array([-4.0, 0.0, 12.4, 12.6, 255.0, 300.0], np.float32)
    with np.errstate(all="raise"):  # no division by zero on the way
        np.testing.assert_array_equal(quantize(x, 0.0, 0, np.uint8), [0, 0, 12, 13, 255, 255])
        np.testing.assert_array_equal(quantize(x, 0.0, 0, np.int8), [-4, 0, 12, 13, 127, 127])
        q = np.array([-7, 0, 100], np.int8)
        np.testing.assert_array_equal(dequantize(q, 0.0, 0), [-7.0, 0.0, 100.0])  # not all zeros


def test_litert_runner_feeds_a_raw_uint8_input(tmp_path, images):
    """A model whose uint8 input has no quantization parameters takes the pixels as they are."""
    import tensorflow as tf

    w = np.random.default_rng(0).normal(size=(3, 10)).astype(np.float32)

    @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.uint8)])
    def model(x):
        return tf.matmul(tf.reduce_mean(tf.cast(x, tf.float32), axis=[1, 2]), w)

    path = tmp_path / "raw_uint8.tflite"
    path.write_bytes(tf.lite.TFLiteConverter.from_concrete_functions([model.get_concrete_function()], model)
                     .convert())
    with open_runner(path, threads=1) as r:
        assert r.describe()["input_dtype"] == "uint8" and r.describe()["input_quantization"] == [0.0, 0]
        want = images.astype(np.float32).mean(axis=(1, 2)) @ w
        np.testing.assert_allclose(r.predict(images, batch_size=4), want, rtol=1e-4, atol=1e-3)
        # out-of-range values saturate instead of wrapping around
        x = np.full((1, 32, 32, 3), 300.0, np.float32)
        np.testing.assert_allclose(r.predict_preprocessed(x), np.full((1, 3), 255.0) @ w, rtol=1e-4)


@pytest.mark.parametrize("dtype,onnx_type", [(np.uint8, "UINT8"), (np.int8, "INT8")])
def test_onnx_runner_rounds_and_saturates_integer_input(tmp_path, dtype, onnx_type):
    import onnx
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [helper.make_node("Cast", ["x"], ["y"], to=TensorProto.FLOAT)], "cast",
        [helper.make_tensor_value_info("x", getattr(TensorProto, onnx_type), ["N", 32, 32, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 32, 32, 3])])
    path = tmp_path / f"cast_{onnx_type.lower()}.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), path)
    x = np.zeros((1, 32, 32, 3), np.float32)
    x[0, 0, 0] = [-300.0, 12.6, 300.0]
    info = np.iinfo(dtype)
    with open_runner(path, threads=1) as r:
        got = r.predict_preprocessed(x)
    np.testing.assert_array_equal(got[0, 0, 0], [info.min, 13, info.max])  # a bare cast wraps these around


def test_io_spec_reports_the_engines_own_tensors(tmp_path, tiny_model_path, images):
    """``io_spec()`` is what the engine says, read here straight from the Interpreter and the session."""
    import onnxruntime as ort
    import tensorflow as tf
    from ai_edge_litert.interpreter import Interpreter

    from resnet_deploy.data.preprocess import Preprocessing
    from resnet_deploy.models.io import load_model

    model = load_model(tiny_model_path)
    conv = tf.lite.TFLiteConverter.from_keras_model(model)
    conv.optimizations = [tf.lite.Optimize.DEFAULT]
    conv.representative_dataset = lambda: ([images[i:i + 1].astype(np.float32)] for i in range(10))
    conv.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    conv.inference_input_type = conv.inference_output_type = tf.int8
    path = tmp_path / "q.tflite"
    path.write_bytes(conv.convert())
    bare = Interpreter(model_path=str(path))
    (d,) = bare.get_input_details()
    with open_runner(path, preprocessing=Preprocessing.unit_range()) as r:
        spec = r.io_spec()
    assert spec.input.dtype == "int8" and spec.output.dtype == "int8"
    assert (spec.input.scale, spec.input.zero_point) == (pytest.approx(d["quantization"][0]), d["quantization"][1])
    assert spec.input.shape[1:] == (32, 32, 3) and spec.output.shape[-1] == 10
    assert spec.preprocessing == Preprocessing.unit_range()
    with open_runner(tiny_model_path) as r:
        k = r.io_spec()
    assert k.input.shape == (None, 32, 32, 3) and k.output.shape == (None, 10) and k.input.scale is None
    onnx_path = tmp_path / "m.onnx"
    import tf2onnx

    tf2onnx.convert.from_keras(model, output_path=str(onnx_path))
    sess_in = ort.InferenceSession(str(onnx_path)).get_inputs()[0]
    with open_runner(onnx_path) as r:
        o = r.io_spec()
    assert o.input.name == sess_in.name and o.input.dtype == "float32" and o.input.shape[1:] == (32, 32, 3)
    assert o.to_dict()["input"]["shape"][0] is None
