"""Runners: every engine takes the same RGB pixels and returns float logits."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_deploy.config import Format
from resnet_deploy.errors import ModelError, ResnetDeployError
from resnet_deploy.runtimes import open_runner
from resnet_deploy.runtimes.litert_runner import dequantize, quantize


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
