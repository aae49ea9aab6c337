"""The OpenVINO runner on the tiny model's real ONNX exports (FP32, FP16, QDQ INT8): its logits against a
plain ``onnxruntime.InferenceSession`` loop written here (not the tool's ONNX runner), the precision it
records (read back from the compiled model, not echoed from the request), the clear error when OpenVINO
is missing, and ``predict --runtime openvino``."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from resnet_deploy.errors import ResnetDeployError
from tests.conftest import export_tiny_onnx

pytest.importorskip("openvino")


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, tiny_model_path, small_npz_dir) -> dict[str, Path]:
    """The tiny model exported to ONNX FP32, FP16 and INT8 through the real converters."""
    return export_tiny_onnx(tmp_path_factory.mktemp("ov_export"), tiny_model_path, small_npz_dir)


@pytest.fixture(scope="module")
def images(cifar) -> np.ndarray:
    return cifar.test.x[:200]


def _plain_onnxruntime(path: Path, pixels: np.ndarray) -> np.ndarray:
    """The expected logits: ONNX Runtime called directly, one image at a time, on raw float pixels (the
    tiny model's manifests declare raw pixels 0..255, and its graph takes float32 NHWC)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    assert sess.get_inputs()[0].type == "tensor(float)"
    return np.concatenate([sess.run(None, {name: pixels[i:i + 1].astype(np.float32)})[0] for i in range(len(pixels))])


def test_manifests_declare_raw_pixels(onnx_export):
    """The premise of ``_plain_onnxruntime``: no preprocessing outside the graph."""
    from resnet_deploy.artifact import read_manifest

    for prec in ("fp32", "fp16", "int8"):
        p = read_manifest(onnx_export[prec]).preprocessing_spec
        assert p.scale == 1.0 and p.mean is None and p.std is None


@pytest.mark.parametrize("prec", ["fp32", "fp16", "int8"])
def test_openvino_runner_agrees_with_a_plain_onnxruntime_loop(prec, onnx_export, images):
    from resnet_deploy.runtimes import open_runner

    expected = _plain_onnxruntime(onnx_export[prec], images)
    with open_runner(onnx_export[prec], runtime="openvino", threads=1, batch_size=64) as r:
        got = r.predict(images)
        d = r.describe()
        io = r.io_spec()
    assert got.shape == expected.shape == (len(images), 10) and got.dtype == np.float32
    assert d["runtime"] == "openvino" and d["device"] == "CPU" and d["inference_precision"] == "f32"
    assert d["num_threads"] == 1 and d["num_streams"] == 1
    assert io.input.shape == (None, 32, 32, 3) and io.output.shape == (None, 10)
    scale = float(np.abs(expected).max())
    agreement = float(np.mean(got.argmax(1) == expected.argmax(1)))
    if prec == "fp32":
        assert np.abs(got - expected).max() <= 1e-4 * max(scale, 1.0), np.abs(got - expected).max()
        assert d["executed_precision"] == "f32" and d["quantized_share"] == 0.0
    elif prec == "fp16":  # both widen the fp16 weights; their float arithmetic differs only in order
        assert np.abs(got - expected).max() <= 1e-2 * max(scale, 1.0)
        assert d["executed_precision"] == "f32"
    else:  # two int8 engines round differently at a few activations: near-identical top-1, not equal logits
        assert agreement >= 0.95, agreement
        assert d["quantized_share"] > 0.5 and d["executed_precision"] in ("u8", "i8"), d
        assert d["compute_precisions"].get("f32", 0) + d["compute_precisions"].get("bf16", 0) < \
            d["compute_precisions"].get("u8", 0) + d["compute_precisions"].get("i8", 0)


def test_the_recorded_precision_is_read_back_from_openvino_not_echoed(onnx_export, images):
    """Asking for bf16 on a CPU that has it must be *recorded* as bf16: the record reads what OpenVINO
    compiled. (That is also what happens when the f32 hint is left out on such a CPU.)"""
    import openvino as ov

    from resnet_deploy.runtimes.openvino_runner import OpenVINORunner

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bf16 support: OpenVINO runs f32 whatever the hint")
    with OpenVINORunner(onnx_export["fp32"], threads=1, inference_precision="bf16") as r:
        d = r.describe()
        got = r.predict(images[:32])
    assert d["requested_precision"] == "bf16" and d["inference_precision"] == "bf16"
    assert d["executed_precision"] == "bf16", d["compute_precisions"]
    expected = _plain_onnxruntime(onnx_export["fp32"], images[:32])
    assert np.abs(got - expected).max() > 1e-5  # bf16 arithmetic shows: this is not the f32 run


def test_missing_openvino_is_a_clear_error(onnx_export, monkeypatch):
    from resnet_deploy import runtimes
    from resnet_deploy.runtimes.openvino_runner import OpenVINORunner

    monkeypatch.setitem(sys.modules, "openvino", None)  # `import openvino` now raises ImportError
    with pytest.raises(ResnetDeployError) as err:
        OpenVINORunner(onnx_export["fp32"]).load()
    assert "not installed" in err.value.what and "resnet-deploy[openvino]" in err.value.fix and err.value.expected
    monkeypatch.setattr(runtimes, "is_installed", lambda name: name != "openvino")
    with pytest.raises(ResnetDeployError) as err:
        runtimes.open_runner(onnx_export["fp32"], runtime="openvino")
    assert "not installed" in err.value.what and "resnet-deploy[openvino]" in err.value.fix
    assert runtimes.available_runtimes(runtimes.Format.ONNX) == ("onnxruntime",)


def test_runtimes_are_listed_per_format_and_wrong_ones_refused(onnx_export):
    from resnet_deploy.config import Format
    from resnet_deploy.runtimes import available_runtimes, open_runner, runtimes_for

    assert runtimes_for(Format.ONNX) == ("onnxruntime", "openvino")
    assert available_runtimes(Format.ONNX) == ("onnxruntime", "openvino")
    assert runtimes_for(Format.TFLITE) == ("litert",)
    with pytest.raises(ResnetDeployError, match="cannot run onnx files") as err:
        open_runner(onnx_export["fp32"], runtime="litert")
    assert "onnxruntime, openvino" in err.value.expected
    with pytest.raises(ResnetDeployError, match="not a runtime") as err:
        open_runner(onnx_export["fp32"], runtime="tensorrt")
    assert err.value.fix
    with pytest.raises(ResnetDeployError, match="cannot run keras files"):
        open_runner(onnx_export["model"], runtime="openvino")


def test_predict_runs_an_onnx_artifact_in_openvino(onnx_export, images, tmp_path):
    from typer.testing import CliRunner

    from resnet_deploy.cli import app
    from resnet_deploy.predict import PredictError, classify, softmax

    np.savez(tmp_path / "t.npz", x=images[:50], y=np.zeros(50, np.uint8))
    res = classify(onnx_export["int8"], [tmp_path / "t.npz"], top_k=3, runtime="openvino")
    assert res.runtime == "openvino"
    expected = softmax(_plain_onnxruntime(onnx_export["int8"], images[:50]))
    assert np.mean(res.top[:, 0] == expected.argmax(1)) >= 0.95
    assert np.abs(res.probabilities - expected).max() < 0.05
    with pytest.raises(PredictError, match="cannot run tflite files|cannot run keras files"):
        classify(onnx_export["model"], [tmp_path / "t.npz"], runtime="openvino")
    cli = CliRunner().invoke(app, ["predict", str(onnx_export["fp32"]), str(tmp_path / "t.npz"), "--runtime",
                                   "openvino", "--json"])
    assert cli.exit_code == 0, cli.output
    assert '"runtime": "openvino"' in cli.stdout
    bad = CliRunner().invoke(app, ["predict", str(onnx_export["fp32"]), str(tmp_path / "t.npz"), "--runtime",
                                   "tensorrt"])
    assert bad.exit_code == 2 and "not a runtime" in bad.output
