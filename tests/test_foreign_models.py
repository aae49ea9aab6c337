"""Models this project did not build: Keras 2 files in tests/data/foreign, written as their authors would.

``benchmarks/make_foreign_models.py`` made them with ``tf_keras`` (default layer names ``conv2d``,
``conv2d_1``, ..., ``dense``; softmax heads; raw, 0..1 or standardised inputs; conv shortcuts; a Sequential
model; one input feeding three convolutions; a SavedModel folder) and trained them briefly on real CIFAR-10;
``models.json`` there records each one's recipe, test accuracy and the export flags its input convention
needs. Here, on the synthetic data of ``conftest.py`` (no real data needed):

- each loads through the project's loading path and computes what Keras 2 (``tf_keras``) computes;
- ``resnet-deploy export FILE --int8`` writes TFLite and ONNX FP32 and INT8 files that reproduce the Keras 2
  model (FP32) or agree with it (INT8), checked with plain LiteRT / ONNX Runtime loops;
- issue #23: keeping named layers in float (``--int8-float-layers``, the path the accuracy-aware fallback
  takes) keeps exactly those layers in float, checked by matching each float convolution's weights to the
  Keras layer's, not by names; and ``--accuracy-aware`` exports a foreign ResNet8 at all.

The files are not committed (training them takes CPU-minutes the shared machine did not have); the module
skips unless ``tests/data/foreign`` or ``$RESNET_DEPLOY_FOREIGN_MODELS`` holds them with their ``models.json``.
``tests/test_int8_mapping.py`` builds foreign-style models in the test itself and needs no files.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

FOREIGN = Path(os.environ.get("RESNET_DEPLOY_FOREIGN_MODELS") or Path(__file__).resolve().parent / "data" / "foreign")
if not (FOREIGN / "models.json").exists():  # the files are made by benchmarks/make_foreign_models.py (real data)
    pytest.skip(f"no foreign models in {FOREIGN} (make them with benchmarks/make_foreign_models.py, or point "
                "RESNET_DEPLOY_FOREIGN_MODELS at a folder of them)", allow_module_level=True)
INDEX = json.loads((FOREIGN / "models.json").read_text())
NAMES = [n for n in ["resnet8", "resnet20", "sequential_cnn", "shared_input", "resnet8_savedmodel"] if n in INDEX]
COMPUTE = ("Conv2D", "Dense")
runner = CliRunner()


# ----------------------------------------------------------------------------------------------
# Independent helpers: the author's preprocessing, Keras 2, plain runtime loops, weights
# ----------------------------------------------------------------------------------------------
def author_input(x_uint8: np.ndarray, name: str) -> np.ndarray:
    """What the model's author feeds it, from models.json's convention and export flags (not the project's
    ``preprocess``)."""
    rec = INDEX[name]
    x = x_uint8.astype(np.float32)
    if rec["inputs"] == "unit":
        return x / 255
    if rec["inputs"] == "standardised":
        flags = rec["export_flags"]
        mean, std = (np.array(flags[flags.index(f) + 1].split(","), np.float32) for f in ("--mean", "--std"))
        return (x - mean) / std
    assert rec["inputs"] == "pixels"
    return x


def keras2(name: str):
    """The model as ``tf_keras`` loads it; for the SavedModel, the .h5 file it was saved from."""
    import tf_keras

    rec = INDEX[name]
    return tf_keras.models.load_model(FOREIGN / rec.get("from", rec["file"]), compile=False)


def keras2_outputs(name: str, x: np.ndarray) -> np.ndarray:
    return np.asarray(keras2(name)(x, training=False))


def run_tflite(path: Path, x: np.ndarray) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=2)
    inp = it.get_input_details()[0]
    it.resize_tensor_input(inp["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(inp["index"], x)
    it.invoke()
    return np.array(it.get_tensor(it.get_output_details()[0]["index"]))


def run_onnx(path: Path, x: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


def _unit_rows(w: np.ndarray) -> np.ndarray:
    w = w.reshape(w.shape[0], -1).astype(np.float64)
    return w / (np.linalg.norm(w, axis=1, keepdims=True) + 1e-12)


def keras_kernels(name: str) -> dict[str, np.ndarray]:
    """Every conv/dense kernel of the Keras 2 model, output channels first: (O, kh, kw, I) or (O, I)."""
    out = {}
    for layer in keras2(name).layers:
        if type(layer).__name__ in COMPUTE:
            k = layer.get_weights()[0]
            out[layer.name] = np.transpose(k, (3, 0, 1, 2)) if k.ndim == 4 else k.T
    return out


def layer_by_weights(w: np.ndarray, kernels: dict[str, np.ndarray]) -> str | None:
    """The Keras layer whose kernel ``w`` (output channels first, any layout of the rest that ``kernels``
    shares) is, up to a scale per output channel (a folded BatchNormalization): what the op computes."""
    best, best_cos = None, 0.99
    for name, k in kernels.items():
        if k.shape != w.shape:
            continue
        cos = float(np.median(np.abs((_unit_rows(k) * _unit_rows(w)).sum(1))))
        if cos > best_cos:
            best, best_cos = name, cos
    return best


def float_layers_tflite(path: Path, kernels: dict[str, np.ndarray]) -> tuple[list[str | None], int]:
    """(the Keras layers of the CONV_2D / FULLY_CONNECTED ops with float weights, the number of such ops with
    integer weights), read from the flatbuffer with LiteRT's published schema."""
    from ai_edge_litert import schema_py_generated as schema

    model = schema.ModelT.InitFromPackedBuf(path.read_bytes(), 0)
    g = model.subgraphs[0]
    op_names = {v: k for k, v in vars(schema.BuiltinOperator).items() if not k.startswith("_")}
    produced_by = {o: op for op in g.operators for o in op.outputs}
    floats, ints = [], 0
    for op in g.operators:
        code = model.operatorCodes[op.opcodeIndex]
        kind = op_names[max(code.builtinCode, code.deprecatedBuiltinCode)]
        if kind not in ("CONV_2D", "FULLY_CONNECTED"):
            continue
        t = g.tensors[op.inputs[1]]
        src = produced_by.get(op.inputs[1])  # float weights may come out of a DEQUANTIZE op
        if src is not None and op_names[max(model.operatorCodes[src.opcodeIndex].builtinCode,
                                            model.operatorCodes[src.opcodeIndex].deprecatedBuiltinCode)] == "DEQUANTIZE":
            t = g.tensors[src.inputs[0]]
            data = np.frombuffer(bytes(model.buffers[t.buffer].data), {1: np.float16, 9: np.int8}[t.type])
            floats.append(layer_by_weights(data.astype(np.float32).reshape(t.shape), kernels))
        elif t.type == schema.TensorType.FLOAT32:
            data = np.frombuffer(bytes(model.buffers[t.buffer].data), np.float32).reshape(t.shape)
            floats.append(layer_by_weights(data, kernels))  # TFLite kernels are (O, kh, kw, I) / (O, I)
        else:
            ints += 1
    return floats, ints


def float_layers_onnx(path: Path, kernels: dict[str, np.ndarray]) -> tuple[list[str | None], int]:
    """(the Keras layers of the Conv / MatMul / Gemm nodes whose weight is a float initializer rather than the
    output of a DequantizeLinear, the number of quantized ones)."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in g.initializer}
    produced_by = {o: n for n in g.node for o in n.output}
    floats, ints = [], 0
    for n in g.node:
        if n.op_type not in ("Conv", "MatMul", "Gemm"):
            continue
        src = produced_by.get(n.input[1])
        if src is not None and src.op_type == "DequantizeLinear":
            ints += 1
            continue
        w = inits.get(n.input[1])
        if w is None:
            continue  # an activation x activation product: no weights
        if n.op_type == "Conv":
            w = np.transpose(w, (0, 2, 3, 1))  # (O, I, kh, kw) -> (O, kh, kw, I)
        elif not (n.op_type == "Gemm" and any(a.name == "transB" and a.i for a in n.attribute)):
            w = w.T  # MatMul / Gemm weights are (I, O)
        floats.append(layer_by_weights(w.astype(np.float32), kernels))
    return floats, ints


def export_cli(*args):
    from resnet_deploy.cli import app

    return runner.invoke(app, ["export", *map(str, args)], env={"COLUMNS": "200"})


# ----------------------------------------------------------------------------------------------
# The files themselves
# ----------------------------------------------------------------------------------------------
def test_the_foreign_models_are_what_models_json_says():
    """Each file is there, small, with its sha256; the .h5 files have Keras' default layer names and a softmax
    head; their recorded test accuracy (measured by make_foreign_models.py with a plain loop) is a classifier's."""
    import hashlib

    for name in NAMES:
        rec, path = INDEX[name], FOREIGN / INDEX[name]["file"]
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        assert sum(p.stat().st_size for p in files) == rec["bytes"] < 1_500_000, name
        if path.is_file():
            assert hashlib.sha256(path.read_bytes()).hexdigest() == rec["sha256"], name
        assert 0.6 <= rec["test_top1"] <= 0.95 and rec["test_images"] >= 9000, name
        if path.suffix == ".h5":
            assert [n for n in rec["layers"] if n.startswith("conv2d")][:2] == ["conv2d", "conv2d_1"], name
            assert any(n.startswith("dense") for n in rec["layers"]), name


@pytest.mark.parametrize("name", NAMES)
def test_loads_through_the_public_path_and_computes_what_keras2_computes(name, synthetic_arrays):
    """``models.io.load_model`` (Keras 3 reading a Keras 2 .h5, or the SavedModel wrapped in a TFSMLayer) gives
    the outputs ``tf_keras`` gives for the same file (for the SavedModel: for the .h5 it was saved from)."""
    from resnet_deploy.models.io import load_model

    model = load_model(FOREIGN / INDEX[name]["file"])
    x = author_input(synthetic_arrays["test"][0][:20], name)
    got = np.asarray(model(x, training=False))
    np.testing.assert_allclose(got, keras2_outputs(name, x), atol=1e-5)
    np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-5)  # a softmax head: probabilities


# ----------------------------------------------------------------------------------------------
# Plain --int8 export
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=NAMES)
def plain_export(request, tmp_path_factory, synthetic_npz_dir):
    """``resnet-deploy export FILE --int8`` with the flags of the model's input convention, on synthetic data."""
    name = request.param
    out = tmp_path_factory.mktemp(f"foreign_{name}")
    r = export_cli(FOREIGN / INDEX[name]["file"], "--int8", *INDEX[name]["export_flags"], "--calib-samples", 100,
                   "--validate-samples", 30, "--out", out, "--data", synthetic_npz_dir)
    return name, r, out


def test_plain_int8_export_writes_files_that_reproduce_the_keras2_model(plain_export, synthetic_arrays):
    """Four files, each with a manifest that records the preprocessing the flags gave; the FP32 files reproduce
    Keras 2's probabilities and the INT8 files agree with its top-1 on the 300 synthetic test images
    (plain LiteRT / ONNX Runtime loops on the author's own preprocessing)."""
    name, r, out = plain_export
    assert r.exit_code == 0, r.output
    stem = Path(INDEX[name]["file"]).stem
    files = {p.name: p for p in out.iterdir() if p.suffix in (".tflite", ".onnx")}
    (onnx_int8,) = [n for n in files if n.startswith(f"{stem}_int8_") and n.endswith(".onnx")]
    assert sorted(files) == sorted([f"{stem}_fp32.tflite", f"{stem}_int8.tflite", f"{stem}_fp32.onnx", onnx_int8])
    x = author_input(synthetic_arrays["test"][0], name)
    ref = keras2_outputs(name, x)
    for fname, path in files.items():
        m = json.loads(Path(f"{path}.json").read_text())
        pre = m["preprocessing"]
        flags = INDEX[name]["export_flags"]
        if "--mean" in flags:
            np.testing.assert_allclose(pre["mean"], [float(v) for v in flags[flags.index("--mean") + 1].split(",")])
            np.testing.assert_allclose(pre["std"], [float(v) for v in flags[flags.index("--std") + 1].split(",")])
        else:
            assert pre["mean"] is None and pre["scale"] == pytest.approx(1 / 255 if "0-1" in flags else 1.0)
        got = run_tflite(path, x) if path.suffix == ".tflite" else run_onnx(path, x)
        if "_fp32" in fname:
            np.testing.assert_allclose(got, ref, atol=1e-4, err_msg=fname)
        else:
            agree = float((got.argmax(1) == ref.argmax(1)).mean())
            assert agree >= 0.85, (fname, agree)
            assert np.abs(got - ref).mean() < 0.05, fname


# ----------------------------------------------------------------------------------------------
# Issue #23: layers kept in float are found by their weights (int8_mapping), not by name and order
# ----------------------------------------------------------------------------------------------
FLOAT_LAYERS = ("conv2d_1", "conv2d_4")  # resnet8: a first-stack conv and the second stack's second conv


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_named_float_layers_are_the_ones_kept_in_float_on_a_foreign_resnet8(fmt, tmp_path, synthetic_npz_dir):
    """``--int8-float-layers conv2d_1,conv2d_4`` (what the accuracy-aware fallback does with its choice) on the
    foreign ResNet8: exactly those two convolutions compute in float, identified by their weights (each float
    op's kernel matched to the Keras kernel it was folded from), every other conv/dense op stays integer.
    Before the fix TFLite refused its own file (five float ops for two layers) and ONNX silently kept
    ``conv2d`` in float too (Keras 3 renames the loaded model's tensors, so the names were off by one)."""
    r = export_cli(FOREIGN / "resnet8.h5", "--int8", "--formats", fmt, "--int8-float-layers", ",".join(FLOAT_LAYERS),
                   "--calib-samples", 100, "--validate-samples", 30, "--out", tmp_path, "--data", synthetic_npz_dir)
    assert r.exit_code == 0, r.output
    kernels = keras_kernels("resnet8")
    (path,) = [p for p in tmp_path.iterdir() if p.name.startswith("resnet8_int8") and p.suffix == f".{fmt}"]
    floats, ints = (float_layers_tflite if fmt == "tflite" else float_layers_onnx)(path, kernels)
    assert sorted(floats) == sorted(FLOAT_LAYERS), floats
    assert ints == len(kernels) - len(FLOAT_LAYERS)


@pytest.mark.slow  # a calibration search, a per-layer analysis and a fallback: minutes on two cores
def test_accuracy_aware_export_of_a_foreign_resnet8(tmp_path, synthetic_npz_dir):
    """``--int8 --accuracy-aware`` on the foreign ResNet8 writes its INT8 files (the fallback's float layers
    are placed on the right ops, or said to be unplaceable before any conversion)."""
    r = export_cli(FOREIGN / "resnet8.h5", "--int8", "--accuracy-aware", "--int8-max-drop", 0, "--val-samples", 400,
                   "--calib-samples", 100, "--search-calib-samples", "", "--analysis-samples", 100,
                   "--int8-max-float-layers", 4, "--validate-samples", 30, "--out", tmp_path,
                   "--data", synthetic_npz_dir)
    assert r.exit_code == 0, r.output
    assert (tmp_path / "resnet8_int8.tflite").exists()
    assert any(p.name.startswith("resnet8_int8_") and p.suffix == ".onnx" for p in tmp_path.iterdir())
