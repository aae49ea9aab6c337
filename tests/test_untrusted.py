"""Issue 22: untrusted files. Each case of the issue's "What was found" list, with the answer it now gets: a
clean refusal (exit 2, what / expected / fix, no traceback, no signal, no hang) or a correct answer, and the
memory of the process that opened the file under its cap.

The hostile files are built here, small and fast, without TensorFlow: ONNX graphs with ``onnx.helper``, an
INT8 TFLite classifier with LiteRT's own flatbuffer schema, PNGs and zips byte by byte. The model always runs
in predict's child process (``untrusted.run_model``), so even a segfault there cannot take the test down.
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import stat
import subprocess
import sys
import time
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from resnet_deploy.cli import app

REPO = Path(__file__).resolve().parents[1]
CIFAR = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
runner = CliRunner()


# ----------------------------------------------------------------------------------------------
# Builders
# ----------------------------------------------------------------------------------------------
def onnx_classifier(path: Path, *, in_shape=("N", 32, 32, 3), extra=None, nan=False, softmax=False,
                    seed=0) -> Path:
    """X (N,32,32,3) float pixels -> flatten -> MatMul W (3072, 10) -> Y logits; ``extra()`` adds nodes whose
    scalar output "z" is added to the logits (how a bomb rides along), ``nan`` adds NaN."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    feat = int(np.prod(in_shape[1:]))
    w = np.random.default_rng(seed).normal(0, 0.003, (feat, 10)).astype(np.float32)
    inits = [nh.from_array(w, "W"), nh.from_array(np.array([-1, feat], np.int64), "flat")]
    nodes = [h.make_node("Reshape", ["X", "flat"], ["F"]), h.make_node("MatMul", ["F", "W"], ["L0"])]
    last = "L0"
    if nan:
        inits.append(nh.from_array(np.full(10, np.nan, np.float32), "B"))
        nodes.append(h.make_node("Add", [last, "B"], ["L1"]))
        last = "L1"
    if extra is not None:
        more_nodes, more_inits = extra()
        nodes += more_nodes
        inits += more_inits
        nodes.append(h.make_node("Add", [last, "z"], ["L2"]))
        last = "L2"
    if softmax:
        nodes.append(h.make_node("Softmax", [last], ["L3"], axis=1))
        last = "L3"
    nodes.append(h.make_node("Identity", [last], ["Y"]))
    graph = h.make_graph(nodes, "g", [h.make_tensor_value_info("X", T.FLOAT, list(in_shape))],
                         [h.make_tensor_value_info("Y", T.FLOAT, ["N", 10])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def constant_of_shape_bomb():
    """500 bytes of graph that materialise 4 GiB at load: ConstantOfShape([2**30]) summed to a scalar."""
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    return ([h.make_node("ConstantOfShape", ["shape"], ["big"], value=h.make_tensor("v", T.FLOAT, [1], [1.0])),
             h.make_node("ReduceSum", ["big"], ["z"], keepdims=0)],
            [nh.from_array(np.array([1 << 30], np.int64), "shape")])


def sparse_external_bomb(folder: Path, gib: int = 4):
    """An initializer of ``gib`` GiB kept in a sparse external file ``big.bin`` in the model's own folder."""
    import onnx
    from onnx import TensorProto as T
    from onnx import helper as h

    n = (gib << 30) // 4
    t = onnx.TensorProto(name="big", data_type=T.FLOAT, dims=[n], data_location=onnx.TensorProto.EXTERNAL)
    for k, v in (("location", "big.bin"), ("offset", "0"), ("length", str(n * 4))):
        e = t.external_data.add()
        e.key, e.value = k, v
    with open(folder / "big.bin", "wb") as f:
        f.truncate(n * 4)  # sparse: no block is written
    return lambda: ([h.make_node("ReduceSum", ["big"], ["z"], keepdims=0)], [t])


def int8_tflite(path: Path, in_scale: float = 1.0, out_scale: float = 0.05, seed: int = 0) -> Path:
    """A full-integer TFLite classifier written with LiteRT's flatbuffer schema (no TensorFlow): float
    (N,32,32,3) -> QUANTIZE int8 -> RESHAPE (N,3072) -> FULLY_CONNECTED int8 (10) -> DEQUANTIZE float."""
    import flatbuffers
    from ai_edge_litert import schema_py_generated as S

    def tensor(name, shape, ttype, buffer, scale=None, zp=None):
        t = S.TensorT()
        t.name, t.shape, t.type, t.buffer = name, list(shape), ttype, buffer
        if scale is not None:
            q = S.QuantizationParametersT()
            q.scale, q.zeroPoint = [scale], [zp]
            t.quantization = q
        return t

    def op(code, ins, outs, opt_type=0, opt=None):
        o = S.OperatorT()
        o.opcodeIndex, o.inputs, o.outputs = code, ins, outs
        if opt is not None:
            o.builtinOptionsType, o.builtinOptions = opt_type, opt
        return o

    rng = np.random.default_rng(seed)
    m = S.ModelT()
    m.version = 3
    codes = []
    for bc in (S.BuiltinOperator.QUANTIZE, S.BuiltinOperator.RESHAPE, S.BuiltinOperator.FULLY_CONNECTED,
               S.BuiltinOperator.DEQUANTIZE):
        c = S.OperatorCodeT()
        c.builtinCode, c.deprecatedBuiltinCode, c.version = bc, min(bc, 127), 1
        codes.append(c)
    m.operatorCodes = codes
    bufs = [S.BufferT() for _ in range(4)]  # 0: empty, 1: weights, 2: bias, 3: the reshape target
    bufs[1].data = list(rng.integers(-127, 128, (10, 3072), dtype=np.int8).view(np.uint8).ravel())
    bufs[2].data = list(np.zeros(10, np.int32).view(np.uint8))
    bufs[3].data = list(np.array([-1, 3072], np.int32).view(np.uint8))
    m.buffers = bufs
    w_scale = 0.002
    sg = S.SubGraphT()
    sg.tensors = [tensor("x", (1, 32, 32, 3), S.TensorType.FLOAT32, 0),
                  tensor("xq", (1, 32, 32, 3), S.TensorType.INT8, 0, in_scale, -128),
                  tensor("shape", (2,), S.TensorType.INT32, 3),
                  tensor("xr", (1, 3072), S.TensorType.INT8, 0, in_scale, -128),
                  tensor("w", (10, 3072), S.TensorType.INT8, 1, w_scale, 0),
                  tensor("b", (10,), S.TensorType.INT32, 2, in_scale * w_scale, 0),
                  tensor("yq", (1, 10), S.TensorType.INT8, 0, out_scale, 0),
                  tensor("y", (1, 10), S.TensorType.FLOAT32, 0)]
    sg.inputs, sg.outputs = [0], [7]
    ro = S.ReshapeOptionsT()
    ro.newShape = [-1, 3072]
    sg.operators = [op(0, [0], [1]), op(1, [1, 2], [3], S.BuiltinOptions.ReshapeOptions, ro),
                    op(2, [3, 4, 5], [6], S.BuiltinOptions.FullyConnectedOptions, S.FullyConnectedOptionsT()),
                    op(3, [6], [7])]
    m.subgraphs = [sg]
    b = flatbuffers.Builder(1024)
    b.Finish(m.Pack(b), file_identifier=b"TFL3")
    path.write_bytes(bytes(b.Output()))
    return path


def manifest(artifact: Path, **fields) -> Path:
    """A manifest as export writes one (the fields predict reads), with ``fields`` replacing or adding."""
    fmt = artifact.suffix[1:]
    doc = {"format": fmt, "precision": "int8" if fmt == "tflite" else "fp32", "artifact": artifact.name,
           "sha256": hashlib.sha256(artifact.read_bytes()).hexdigest(), "size_bytes": artifact.stat().st_size,
           "input": {"name": "x", "shape": [None, 32, 32, 3], "dtype": "float32"},
           "output": {"name": "y", "shape": [None, 10], "dtype": "float32"},
           "preprocessing": {"scale": 1.0, "mean": None, "std": None, "layout": "NHWC", "color": "RGB"},
           "class_names": list(CIFAR), "output_kind": "logits"}
    doc.update(fields)
    side = artifact.with_name(artifact.name + ".json")
    side.write_text(json.dumps(doc))
    return side


def pngs(folder: Path, n: int = 3, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(n):
        p = folder / f"img{i}.png"
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(p)
        out.append(p)
    return out


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG whose IHDR declares ``width`` x ``height`` RGB pixels and whose data is a few bytes: decoding it
    would allocate the declared size, reading its header costs nothing."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64))
                     + chunk(b"IEND", b""))
    return path


# ----------------------------------------------------------------------------------------------
# Running the CLI
# ----------------------------------------------------------------------------------------------
def flat(text: str) -> str:
    return " ".join(text.split())


def predict(*args, **env):
    """``resnet-deploy predict ARGS`` in this process (the model still runs in its own child)."""
    return runner.invoke(app, ["predict", *map(str, args)], env={"COLUMNS": "200", **env})


def assert_refused(result, *needles: str) -> str:
    """Exit 2 from a ResnetDeployError (no traceback); every needle in the message; returns it flattened."""
    text = flat(result.output)
    assert result.exit_code == 2, (result.exit_code, text, result.exception)
    assert "Traceback" not in text and "Expected:" in text and "Fix:" in text, text
    for needle in needles:
        assert needle in text, (needle, text)
    return text


MEASURE = ("import resource, subprocess, sys\n"
           "r = subprocess.run(sys.argv[1:])\n"
           "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
           "sys.exit(r.returncode)\n")


def cli_process(*args, timeout: float = 300, env: dict | None = None) -> tuple[subprocess.CompletedProcess, int]:
    """``resnet-deploy ARGS`` as a user's shell runs it, in a wrapper that reports the peak resident memory of
    every process under it (the CLI and the child that opened the file): (completed process, peak bytes)."""
    e = {k: v for k, v in os.environ.items() if k != "RESNET_DEPLOY_VERBOSE"}
    e.update(COLUMNS="200", **(env or {}))
    proc = subprocess.run([sys.executable, "-c", MEASURE, sys.executable, "-m", "resnet_deploy.cli", *map(str, args)],
                          capture_output=True, text=True, env=e, cwd=REPO, timeout=timeout)
    peak = next(int(line.split()[1]) for line in proc.stderr.splitlines() if line.startswith("PEAK_RSS_KIB"))
    return proc, peak * 1024


# ----------------------------------------------------------------------------------------------
# Small files, huge memory: refused under the cap, named in the error
# ----------------------------------------------------------------------------------------------
def test_onnx_that_materialises_gigabytes_at_load_is_stopped_by_the_default_cap(tmp_path):
    """Issue: a 500-byte ONNX graph whose ConstantOfShape needs 4 GiB took the machine past 4 GB. Now its
    process is capped at the default 2 GiB: one error naming the file and the cap, peak memory far below."""
    model = onnx_classifier(tmp_path / "bomb.onnx", extra=constant_of_shape_bomb)
    pngs(tmp_path / "img", 1)
    proc, peak = cli_process("predict", model, tmp_path / "img" / "img0.png")
    err = flat(proc.stderr)
    assert proc.returncode == 2, err
    assert "Traceback" not in err and "bomb.onnx needed more memory" in err and "its cap is 2 GiB: --max-memory" in err
    assert peak < 2 << 30, peak


def test_sparse_external_weights_of_4_gib_are_stopped_by_the_cap(tmp_path):
    """Issue: an ONNX whose external weight file is a sparse 4 GiB file in its own folder."""
    model = onnx_classifier(tmp_path / "sparse.onnx", extra=sparse_external_bomb(tmp_path))
    img = pngs(tmp_path / "img", 1)[0]
    proc, peak = cli_process("predict", model, img, "--max-memory", "512M")
    err = flat(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "sparse.onnx needed more memory" in err and "its cap is 512 MiB" in err
    assert peak < 512 << 20, peak


def _keras_zip(path: Path, config: bytes | None = None, config_size: int | None = None) -> Path:
    """A .keras zip (config.json, metadata.json, model.weights.h5); ``config_size`` patches the size its
    directory declares for config.json (what Python's zipfile then lets a reader expand it to)."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.15.1"}))
        zf.writestr("config.json", config if config is not None else b"{}")
        zf.writestr("model.weights.h5", b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    if config_size is not None:
        data = bytearray(path.read_bytes())
        with zipfile.ZipFile(path) as zf:
            info = zf.getinfo("config.json")
        # the uncompressed size in the local header (at +22) and in the central directory entry (at +24)
        data[info.header_offset + 22:info.header_offset + 26] = config_size.to_bytes(4, "little")
        pos = data.find(b"PK\x01\x02")
        while data[pos + 46:pos + 46 + int.from_bytes(data[pos + 28:pos + 30], "little")] != b"config.json":
            pos = data.find(b"PK\x01\x02", pos + 4)
        data[pos + 24:pos + 28] = config_size.to_bytes(4, "little")
        path.write_bytes(bytes(data))
    return path


@pytest.mark.parametrize("how", ["declared", "real"])
def test_keras_zip_bomb_is_refused_before_keras_reads_it(tmp_path, how):
    """Issue: a 5 MB .keras whose config.json expands to 3.9 GiB (Keras' own limit is 4 GiB). "declared": the
    zip's directory says 3.9 GiB (what Python's zipfile holds a reader to); "real": a config.json that truly
    deflates from 200 MB. Both refused from the zip's directory, before Keras or TensorFlow is imported."""
    from resnet_deploy.errors import ModelError
    from resnet_deploy.models.io import check_model_file

    if how == "declared":
        bomb = _keras_zip(tmp_path / "bomb.keras", config_size=int(3.9 * (1 << 30)))
    else:
        bomb = _keras_zip(tmp_path / "bomb.keras", config=b" " * (200 << 20))
    assert bomb.stat().st_size < 5 << 20
    with pytest.raises(ModelError, match="config.json expands to"):
        check_model_file(bomb)
    img = pngs(tmp_path / "img", 1)[0]
    started = time.monotonic()
    text = assert_refused(predict(bomb, img), "bomb.keras: config.json expands to")
    assert ("3.9 GiB" if how == "declared" else "200 MiB") in text
    assert time.monotonic() - started < 120  # no TensorFlow import, no decompression


def test_png_declaring_huge_dimensions_is_refused_from_its_header(tmp_path):
    """Issue: a PNG with huge declared dimensions that stays under Pillow's own limit (89 M pixels warn,
    179 M refuse). 13,000 x 13,000 = 169 M pixels: refused before decoding, the other images still run."""
    from resnet_deploy.predict.images import load_image

    big = png_header_only(tmp_path / "big.png", 13_000, 13_000)
    with pytest.raises(Exception, match="over the budget of 40 megapixels"):
        load_image(big)
    model = onnx_classifier(tmp_path / "m.onnx")
    good = pngs(tmp_path / "img", 1)[0]
    r = predict(model, big, good, "--json")
    assert r.exit_code == 2 and "Traceback" not in r.output
    doc = json.loads(r.stdout)
    assert [p["input"] for p in doc["predictions"]] == [str(good)]
    assert "169 megapixels" in doc["errors"][0]["error"] and "--max-memory" in doc["errors"][0]["fix"]


def test_a_large_jpeg_is_decoded_at_reduced_scale_and_a_large_png_refused_under_a_small_cap(tmp_path):
    """--max-memory 64M allows 4 M pixels an image: a 2,400 x 2,000 JPEG (4.8 M) is decoded at half scale by
    libjpeg and classified like its own half-size decode; the same pixels as PNG are refused."""
    from resnet_deploy.predict.images import fit_image, load_image, pixel_budget

    assert pixel_budget(64 << 20) == 4 << 20
    rng = np.random.default_rng(3)
    small = rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)
    big = np.repeat(np.repeat(small, 100, axis=0), 100, axis=1)  # 2,000 x 2,400, flat 100x100 blocks
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    Image.fromarray(big).save(tmp_path / "big.png")
    got = load_image(tmp_path / "big.jpg", max_pixels=pixel_budget(64 << 20))
    with Image.open(tmp_path / "big.jpg") as img:
        img.draft("RGB", (1200, 1000))
        assert img.size == (1200, 1000)
        want = fit_image(img.convert("RGB"))
    assert np.array_equal(got, want)
    with pytest.raises(Exception, match="over the budget"):
        load_image(tmp_path / "big.png", max_pixels=pixel_budget(64 << 20))
    np.testing.assert_array_equal(load_image(tmp_path / "big.png"), fit_image(Image.fromarray(big)))


def test_high_bit_depth_images_are_scaled_in_integer_arithmetic():
    """No float64 pass: 16-bit grayscale becomes round(v / 257) exactly, float images float32-rounded."""
    from resnet_deploy.predict.images import to_rgb

    v = np.array([[0, 128, 129, 385, 65535, 32896, 1000, 60000]], np.uint16)
    got = np.asarray(to_rgb(Image.fromarray(v)))[..., 0]
    assert got.dtype == np.uint8
    np.testing.assert_array_equal(got, [[0, 0, 1, 1, 255, 128, 4, 233]])  # round(v / 257), ties up
    f = np.array([[-5.0, 0.4, 0.6, 254.5, 300.0, np.nan]], np.float32)
    np.testing.assert_array_equal(np.asarray(to_rgb(Image.fromarray(f)))[..., 0], [[0, 0, 1, 254, 255, 0]])


def test_npz_declaring_gigabytes_is_refused_from_its_header(tmp_path):
    """An .npz whose x.npy header declares 200,000 x 256 x 256 x 3 bytes (39 GB) but holds a few bytes: refused
    from the header; --limit reads only the rows asked for."""
    from numpy.lib import format as npy

    from resnet_deploy.predict.images import load_npz

    path = tmp_path / "bomb.npz"
    with zipfile.ZipFile(path, "w") as zf:
        with zf.open("x.npy", "w") as f:
            npy.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": (200_000, 256, 256, 3)})
            f.write(b"\0" * 100)
    text = assert_refused(predict(onnx_classifier(tmp_path / "m.onnx"), path), "declares (200000, 256, 256, 3)")
    assert "left for .npz arrays" in text
    ok = tmp_path / "ok.npz"
    x = np.random.default_rng(0).integers(0, 256, (50, 32, 32, 3), dtype=np.uint8)
    np.savez(ok, x=x, y=np.arange(50) % 10)
    got, y = load_npz(ok, limit=7)
    np.testing.assert_array_equal(got, x[:7])
    np.testing.assert_array_equal(y, np.arange(7))


# ----------------------------------------------------------------------------------------------
# predict is as strict as bench
# ----------------------------------------------------------------------------------------------
def test_a_bit_flipped_int8_file_beside_its_manifest_is_refused(tmp_path):
    """Issue: a bit-flipped INT8 file beside its manifest answered "frog 78.9 %" with exit 0: the manifest's
    sha256 was never compared. The intact file is classified as LiteRT classifies it; the flipped one refused."""
    good = int8_tflite(tmp_path / "model_int8.tflite")
    manifest(good)
    img = pngs(tmp_path / "img", 2)
    r = predict(good, *img, "--json", "-k", "10")
    assert r.exit_code == 0, r.output
    probs = np.array([[t["probability"] for t in sorted(p["top"], key=lambda t: t["index"])]
                      for p in json.loads(r.stdout)["predictions"]])
    np.testing.assert_allclose(probs, _softmax(_litert_logits(good, img)), atol=1e-6)
    data = bytearray(good.read_bytes())
    data[len(data) // 2] ^= 0x10  # one weight bit
    good.write_bytes(bytes(data))
    assert_refused(predict(good, *img), "model_int8.tflite has sha256", "the file was changed, damaged or replaced")


def _litert_logits(path: Path, images: list[Path]) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    x = np.stack([np.asarray(Image.open(p).convert("RGB")) for p in images]).astype(np.float32)
    it = Interpreter(model_path=str(path))
    d = it.get_input_details()[0]
    it.resize_tensor_input(d["index"], list(x.shape))
    it.allocate_tensors()
    it.set_tensor(d["index"], x)
    it.invoke()
    return it.get_tensor(it.get_output_details()[0]["index"])


def _softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_a_tflite_file_that_segfaults_litert_is_one_clean_error(tmp_path):
    """Issue: damaged TFLite files killed predict with a segfault and no message. An INT8 file whose input scale
    is 0 makes LiteRT's QUANTIZE crash with SIGSEGV (checked here first, in a process of its own); predict
    reports it as an error naming the file, exit 2."""
    bad = int8_tflite(tmp_path / "damaged.tflite", in_scale=0.0)
    probe = subprocess.run([sys.executable, "-c", (
        "import sys, numpy as np\nfrom ai_edge_litert.interpreter import Interpreter\n"
        "it = Interpreter(model_path=sys.argv[1]); it.allocate_tensors()\n"
        "d = it.get_input_details()[0]; it.set_tensor(d['index'], np.full(d['shape'], 100, d['dtype'])); it.invoke()"),
        str(bad)], capture_output=True, timeout=120)
    assert probe.returncode == -11, probe  # the file really crashes LiteRT
    img = pngs(tmp_path / "img", 1)[0]
    proc, _ = cli_process("predict", bad, img)
    err = flat(proc.stderr)
    assert proc.returncode == 2 and "Traceback" not in err, err
    assert "litert crashed (SIGSEGV)" in err and "damaged.tflite" in err and "Fix:" in err


BAD_MANIFESTS = {
    "a JSON string": '"just a string"',
    "a list": "[1, 2, 3]",
    "a number": "42",
    "invalid JSON": "{not json",
    "not UTF-8": b"\xff\xfe{}",
    "class_names a string": {"class_names": "cat"},
    "class_names of numbers": {"class_names": list(range(10))},
    "class_names repeated": {"class_names": ["cat"] * 10},
    "preprocessing a list": {"preprocessing": [1, 2, 3]},
    "preprocessing std NaN": {"preprocessing": {"scale": 1.0, "mean": [0, 0, 0], "std": [float("nan"), 1, 1]}},
    "preprocessing scale Infinity": {"preprocessing": {"scale": float("inf")}},
    "preprocessing std 1e-300": {"preprocessing": {"scale": 1.0, "mean": [0, 0, 0], "std": [1e-300, 1, 1]}},
    "preprocessing mean -Infinity": {"preprocessing": {"scale": 1.0, "mean": [float("-inf"), 0, 0], "std": [1, 1, 1]}},
    "preprocessing scale a string": {"preprocessing": {"scale": "1"}},
    "precision a number": {"precision": 8},
    "precision unknown": {"precision": "int3"},
    "sha256 a list": {"sha256": [1, 2]},
    "sha256 missing": {"sha256": None},
    "input a string": {"input": "x"},
    "output scale NaN": {"output": {"shape": [None, 10], "dtype": "int8", "scale": float("nan")}},
    "output_kind unknown": {"output_kind": "vibes"},
    "format of another file": {"format": "onnx"},
    "nested 200,000 levels": "[" * 200_000 + "]" * 200_000,
    "nested 100 levels in a field": {"options": json.loads("[" * 100 + "]" * 100)},
    "over 16 MiB": {"padding": "x" * (17 << 20)},
}


@pytest.mark.parametrize("case", list(BAD_MANIFESTS))
def test_malformed_manifests_are_refused_cleanly(tmp_path, case):
    """Issue: malformed manifests (wrong types, a JSON string, a list) gave ValueError, TypeError or
    AttributeError tracebacks in predict; one nested 200,000 levels deep gave RecursionError; std NaN, scale
    Infinity and std 1e-300 passed and gave every image the same answer."""
    model = int8_tflite(tmp_path / "m.tflite")
    bad = BAD_MANIFESTS[case]
    side = manifest(model)
    if isinstance(bad, dict):
        doc = json.loads(side.read_text())
        doc.update(bad)
        side.write_text(json.dumps({k: v for k, v in doc.items() if v is not None}))
    else:
        side.write_bytes(bad if isinstance(bad, bytes) else bad.encode())
    img = pngs(tmp_path / "img", 1)[0]
    started = time.monotonic()
    text = assert_refused(predict(model, img))
    assert "m.tflite.json" in text and time.monotonic() - started < 60, text  # refused before any model ran


def test_declared_probabilities_that_are_logits_are_refused(tmp_path):
    """Issue: a sidecar calling a logits model's output "probabilities" printed "cat 464.4 %". The same claim on
    a model with a softmax is checked and believed."""
    logits = onnx_classifier(tmp_path / "logits.onnx")
    manifest(logits, output_kind="probabilities")
    img = pngs(tmp_path / "img", 2)
    assert_refused(predict(logits, *img), "says the model outputs probabilities, but its rows are not")
    soft = onnx_classifier(tmp_path / "soft.onnx", softmax=True)
    manifest(soft, output_kind="probabilities")
    r = predict(soft, *img, "--json")
    assert r.exit_code == 0, r.output
    doc = json.loads(r.stdout)
    assert doc["scores"] == "the model's own (the sidecar says probabilities)"
    assert all(0 <= t["probability"] <= 1 for p in doc["predictions"] for t in p["top"])


def test_class_names_must_match_the_model(tmp_path):
    """Issue: class_names given as a string became ten one-letter names. A string is refused before the model
    runs; three names for a model of ten outputs are refused once its output width is known."""
    model = onnx_classifier(tmp_path / "m.onnx")
    img = pngs(tmp_path / "img", 1)[0]
    manifest(model, class_names="cataloguer")
    assert_refused(predict(model, img), "class_names is a str")
    manifest(model, class_names=["cat", "dog", "frog"])
    assert_refused(predict(model, img, "-k", "1"), "m.onnx outputs shape (N, 10)", "Expected: (N, 3)")


def test_nan_outputs_are_refused(tmp_path):
    """Issue: an ONNX whose output is NaN printed "nan%"."""
    model = onnx_classifier(tmp_path / "nan.onnx", nan=True)
    img = pngs(tmp_path / "img", 2)
    assert_refused(predict(model, *img), "nan.onnx output NaN or infinity for 2 of 2 image(s)")


@pytest.mark.parametrize("shape,needle", [(("N", 64, 64, 3), "takes inputs of shape (N, 64, 64, 3)"),
                                          (("N", 3, 32, 32), "(N, 3, 32, 32) (channels first, NCHW)")])
def test_models_for_other_input_shapes_get_a_clear_error(tmp_path, shape, needle):
    """Issue: models whose input is not 32x32 gave tracebacks. predict resizes every image to 32x32, so it
    refuses them, saying so (it does not resize to a model's own input size)."""
    model = onnx_classifier(tmp_path / "m.onnx", in_shape=shape)
    text = assert_refused(predict(model, pngs(tmp_path / "img", 1)[0]), needle)
    assert "does not resize" in text


def test_fifos_and_devices_are_refused_not_waited_on(tmp_path):
    """Issue: a FIFO named x.png hung predict forever. As an image, an artifact or a manifest, a FIFO is refused
    at once (and /dev/zero, which never ends, too); the other images still run."""
    model = onnx_classifier(tmp_path / "m.onnx")
    good = pngs(tmp_path / "img", 1)[0]
    fifo = tmp_path / "x.png"
    os.mkfifo(fifo)
    started = time.monotonic()
    r = predict(model, fifo, "/dev/zero", good, "--json")
    assert r.exit_code == 2 and time.monotonic() - started < 120, r.output
    doc = json.loads(r.stdout)
    assert len(doc["predictions"]) == 1
    errors = {e["input"]: e["error"] for e in doc["errors"]}
    assert "is a FIFO (named pipe), not a regular file" in errors[str(fifo)]
    assert "is a character device" in errors["/dev/zero"]
    os.mkfifo(tmp_path / "fifo.onnx")
    assert_refused(predict(tmp_path / "fifo.onnx", good), "is a FIFO (named pipe), not a regular file")
    os.mkfifo(tmp_path / "m.onnx.json")
    assert_refused(predict(model, good), "m.onnx.json is a FIFO")


def test_a_hanging_model_process_is_stopped_by_the_timeout(tmp_path):
    """The timeout covers the child's start-up: an interpreter that never comes up is stopped after --timeout
    (sitecustomize sleeping before anything else runs stands in for a hang at start-up)."""
    site = tmp_path / "site"
    site.mkdir()
    (site / "sitecustomize.py").write_text("import time\ntime.sleep(600)\n")
    model = onnx_classifier(tmp_path / "m.onnx")
    img = pngs(tmp_path / "img", 1)[0]
    from resnet_deploy.errors import ModelRunError
    from resnet_deploy.untrusted import run_model

    x = np.asarray(Image.open(img))[None]
    old = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = str(site)
    try:
        started = time.monotonic()
        with pytest.raises(ModelRunError) as exc:
            run_model(model, x, preprocessing=None, n_classes=10, timeout_s=3)
    finally:
        if old is None:
            os.environ.pop("PYTHONPATH")
        else:
            os.environ["PYTHONPATH"] = old
    assert exc.value.kind == "timeout" and time.monotonic() - started < 60
    assert "made no progress for 3 s" in exc.value.what and "starting" in exc.value.what


# ----------------------------------------------------------------------------------------------
# Terminal injection
# ----------------------------------------------------------------------------------------------
def test_strings_from_files_are_escaped_on_the_terminal_and_exact_in_json(tmp_path):
    """Issue: class names from a manifest and image file names were printed raw: ESC sequences cleared the
    screen or set the window title, an embedded newline forged "FAKE: accuracy 100%"."""
    model = onnx_classifier(tmp_path / "m.onnx")
    names = [f"c{i}\x1b[2J\x1b]0;pwned\x07" for i in range(9)] + ["ten\nFAKE: accuracy 100%"]
    manifest(model, class_names=names)
    folder = tmp_path / "img"
    img = pngs(folder, 1)[0]
    evil = folder / "a\x1b[2Jb\nFAKE: accuracy 100%.png"
    img.rename(evil)
    r = predict(model, evil, "-k", "10")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\x07" not in r.output
    assert not any(line.startswith("FAKE") for line in r.output.splitlines()), r.output
    assert "\\x1b[2J" in r.output and "ten\\nFAKE: accuracy 100%" in r.output
    doc = json.loads(predict(model, evil, "-k", "10", "--json").stdout)
    assert doc["class_names"] == names and doc["predictions"][0]["input"] == str(evil)  # exact


def test_undecodable_file_names_print_as_byte_escapes(tmp_path):
    from resnet_deploy.terminal import safe

    model = onnx_classifier(tmp_path / "m.onnx")
    folder = tmp_path / "img"
    img = pngs(folder, 1)[0]
    odd = Path(os.fsdecode(bytes(folder) + b"/\xff\xfe.png"))
    img.rename(odd)
    r = predict(model, odd)
    assert r.exit_code == 0 and "\\xff\\xfe.png" in r.output, r.output
    assert safe("plain name.png") == "plain name.png" and safe(safe("\x1b\n")) == safe("\x1b\n") == "\\x1b\\n"
    assert safe("\u202egnp.exe") == "\\u202egnp.exe"  # a bidi override shown, not obeyed


# ----------------------------------------------------------------------------------------------
# The reference cache cannot lie
# ----------------------------------------------------------------------------------------------
def _cache_setup(tmp_path):
    from resnet_deploy.bench import reference_cache as rc
    from resnet_deploy.data.preprocess import Preprocessing

    model = onnx_classifier(tmp_path / "float.onnx", seed=5)
    rng = np.random.default_rng(7)
    x = rng.integers(0, 256, (120, 32, 32, 3), dtype=np.uint8)
    y = rng.integers(0, 10, 120)
    pre = Preprocessing.pixels()
    key = rc.cache_key(hashlib.sha256(model.read_bytes()).hexdigest(), rc.data_fingerprint(x, y), pre, len(x))
    return rc, model, x, y, pre, key


def test_the_reference_cache_spot_check_catches_planted_logits(tmp_path):
    """Issue: with the key recomputed from public inputs and planted logits that always say "airplane", bench
    reported the float model at 10 % and passed a gate. Now every hit re-runs the float model on random cached
    images: honest logits pass, planted ones (right key, right checksum) are discarded and the run says so."""
    rc, model, x, y, pre, key = _cache_setup(tmp_path)
    root = tmp_path / "cache"
    rerun = rc.rerun_in_child(model, x, pre)
    honest = rerun(np.arange(len(x)))  # the float model on every image, in its own process
    assert rc.store(key, honest, root) is not None
    notes: list[str] = []
    np.testing.assert_array_equal(rc.load_verified(key, len(x), root, rerun=rerun, notes=notes), honest)
    assert "random test images re-run through the float model match" in notes[-1]
    planted = np.tile(np.eye(10, dtype=np.float32)[0] * 20, (len(x), 1))  # "airplane" on every image
    rc.store(key, planted, root)  # what an attacker who can write the folder writes: key and checksum right
    assert rc.load(key, len(x), root) is not None  # the entry itself is well-formed
    notes = []
    assert rc.load_verified(key, len(x), root, rerun=rerun, notes=notes) is None
    assert "were discarded" in notes[-1] and "another top class" in notes[-1]
    assert not rc.cache_path(key, root).exists()


def test_a_cache_entry_is_bound_to_its_parts_and_its_checksum(tmp_path):
    rc, model, x, y, pre, key = _cache_setup(tmp_path)
    root = tmp_path / "cache"
    logits = np.random.default_rng(1).normal(0, 3, (len(x), 10)).astype(np.float32)
    path = rc.store(key, logits, root)
    np.testing.assert_array_equal(rc.load(key, len(x), root), logits)
    # edited logits, meta kept: the checksum no longer matches
    with np.load(path) as z:
        meta = z["meta"]
    np.savez(path, logits=logits + 1, meta=meta)
    notes: list[str] = []
    assert rc.load(key, len(x), root, notes=notes) is None and "recorded sha256" in notes[-1]
    assert not path.exists()  # discarded
    # an entry for another model, renamed onto this key
    other = rc.cache_key("0" * 64, rc.data_fingerprint(x, y), pre, len(x))
    rc.store(other, logits, root).rename(rc.cache_path(key, root))
    notes = []
    assert rc.load(key, len(x), root, notes=notes) is None and "do not give its name" in notes[-1]
    # an entry of the old format (logits only) and a FIFO in an entry's place: refused, never waited on
    np.savez(rc.cache_path(key, root), logits=logits)
    assert rc.load(key, len(x), root) is None
    os.mkfifo(rc.cache_path(key, root))
    assert rc.load(key, len(x), root) is None


# ----------------------------------------------------------------------------------------------
# Paths and the environment
# ----------------------------------------------------------------------------------------------
def _char_device(path: Path) -> Path:
    """A /dev/full replica (character device 1:7)."""
    try:
        os.mknod(path, stat.S_IFCHR | 0o666, os.makedev(1, 7))
    except PermissionError:
        pytest.skip("creating a device node needs root")
    return path


def test_force_never_replaces_a_device_and_the_refusal_does_not_suggest_it(tmp_path):
    """Issue: --force replaced a character device (a /dev/full replica) with a regular file, and the refusal
    without --force suggested --force."""
    from resnet_deploy.errors import OutputExistsError
    from resnet_deploy.fileio import atomic_path, check_can_write

    dev = _char_device(tmp_path / "report.json")
    for force in (False, True):
        with pytest.raises(OutputExistsError) as exc:
            check_can_write(dev, force, "report")
        assert "character device" in exc.value.what and "--force" not in exc.value.render()
    with pytest.raises(OutputExistsError):  # a writer that skipped the check: the commit refuses too
        with atomic_path(dev) as tmp:
            tmp.write_text("{}")
    for args in (["--json", str(dev)], ["--json", str(dev), "--force"]):  # a .json name: --json PATH either way
        r = runner.invoke(app, ["bench", str(tmp_path / "m.tflite"), *args], env={"COLUMNS": "200"})
        text = assert_refused(r, "is a character device")
        assert "--force" not in text.split("Fix:")[1]
    assert stat.S_ISCHR(dev.stat().st_mode)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json"]


def test_names_too_long_are_clear_errors_and_a_legal_long_out_still_locks(tmp_path):
    """Issue: names too long gave OSError tracebacks, and the lock's prefix pushed a legal 250-character --out
    over 255 bytes."""
    from resnet_deploy.errors import OutputWriteError
    from resnet_deploy.fileio import aside_path, check_can_write, lock_path, output_lock

    out = tmp_path / ("o" * 250)
    with output_lock(out, "test") as lock:
        assert len(lock.name) <= 255 and lock.exists() and lock.parent == tmp_path
    assert lock_path(out) == lock and len(aside_path(tmp_path / ("p" * 255)).name) <= 255
    with pytest.raises(OutputWriteError, match="300 bytes long"):
        check_can_write(tmp_path / ("q" * 300), False)
    r = runner.invoke(app, ["bench", str(tmp_path / "m.tflite"), "--json", str(tmp_path / ("r" * 300 + ".json"))],
                      env={"COLUMNS": "200"})
    assert_refused(r, "305 bytes long")
    model = onnx_classifier(tmp_path / "m.onnx")
    r = predict(model, tmp_path / ("s" * 300 + ".png"))
    assert r.exit_code == 2 and "Traceback" not in r.output and "too long a name" in flat(r.output)
    assert_refused(predict(tmp_path / ("t" * 300 + ".onnx"), model), "too long a name")


def _tiny_tmpfs(path: Path) -> bool:
    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def test_a_full_disk_is_a_clear_error_and_nothing_is_half_written(tmp_path):
    """Issue: a disk-full error after a whole bench run was a traceback. On a real 64 KiB tmpfs a report that
    does not fit is an OutputWriteError (exit 2 in the CLI), the earlier report of that name is unchanged and no
    stage is left behind."""
    from resnet_deploy.errors import OutputWriteError
    from resnet_deploy.fileio import write_json_atomic

    disk = tmp_path / "disk"
    if not _tiny_tmpfs(disk):
        pytest.skip("mounting a tmpfs needs root in a container that allows it")
    try:
        write_json_atomic(disk / "report.json", {"ok": True})
        with pytest.raises(OutputWriteError) as exc:
            write_json_atomic(disk / "report.json", {"rows": ["x" * 1000] * 200})
        assert "no space left on device (ENOSPC)" in exc.value.what and exc.value.exit_code == 2
        assert json.loads((disk / "report.json").read_text()) == {"ok": True}
        assert sorted(p.name for p in disk.iterdir()) == ["report.json"]
    finally:
        subprocess.run(["umount", str(disk)], check=False)


@pytest.mark.parametrize("home", ["", None])
def test_an_empty_or_missing_home_puts_the_cache_in_a_private_temp_folder_and_says_so(tmp_path, home):
    """Issue: with HOME='' the cache went to /.cache at the root."""
    env = {k: v for k, v in os.environ.items() if k not in ("HOME", "RESNET_DEPLOY_CACHE", "KERAS_HOME")}
    if home is not None:
        env["HOME"] = home
    env["TMPDIR"] = str(tmp_path)
    code = ("from resnet_deploy.bench.reference_cache import cache_root\n"
            "from resnet_deploy.data.sources import keras_cache_dir\n"
            "print(cache_root()); print(keras_cache_dir())\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    cache, keras_dir = map(Path, proc.stdout.split())
    private = tmp_path / f"resnet-deploy-{os.getuid()}"
    assert cache == private / ".cache" / "resnet-deploy" and keras_dir == private / ".keras" / "datasets"
    assert stat.S_IMODE(private.stat().st_mode) == 0o700
    assert proc.stderr.count("note: $HOME is") == 1 and str(private) in proc.stderr


def test_bench_child_that_cannot_start_its_interpreter_does_not_block_the_parent(tmp_path):
    """Issue: when bench's child could not start its interpreter, the parent blocked forever writing the job
    (the spec with its latency images, more than a pipe holds) into the pipe, and --timeout never applied. An
    "interpreter" that hangs is killed after the timeout; one that exits at once is a start error."""
    import multiprocessing.spawn as spawn
    from multiprocessing import resource_tracker

    from resnet_deploy.bench.child import ChildWorker, WorkerFailed
    from resnet_deploy.bench.measure import FileSpec

    model = int8_tflite(tmp_path / "m.tflite")
    resource_tracker.ensure_running()  # with the real interpreter, before it is swapped
    spec = FileSpec(path=model, preprocessing={"scale": 1.0}, threads=1,
                    latency_images=np.zeros((1000, 32, 32, 3), np.uint8))  # 3 MB: far more than a pipe buffer
    real = spawn.get_executable()
    try:
        for body, kind, needle in (("exec sleep 600", "timeout", "made no progress within 2 s"),
                                   ("exit 127", "crash", "could not start (exit code 127")):
            fake = tmp_path / f"python-{kind}"
            fake.write_text(f"#!/bin/sh\n{body}\n")
            fake.chmod(0o755)
            spawn.set_executable(str(fake))
            started = time.monotonic()
            worker = ChildWorker(spec, timeout_s=2)
            with pytest.raises(WorkerFailed) as exc:
                worker.call("open")
            assert exc.value.error["kind"] == kind and needle in exc.value.error["what"], exc.value.error
            assert time.monotonic() - started < 30 and not worker.proc.is_alive()
    finally:
        spawn.set_executable(real)


def test_max_memory_values(tmp_path):
    from resnet_deploy.untrusted import parse_memory

    assert parse_memory("2G") == 2 << 30 and parse_memory("512M") == 512 << 20 and parse_memory("1.5GiB") == 3 << 29
    model = onnx_classifier(tmp_path / "m.onnx")
    img = pngs(tmp_path / "img", 1)[0]
    assert_refused(predict(model, img, "--max-memory", "lots"), "--max-memory 'lots' is not an amount of memory")
    assert_refused(predict(model, img, "--max-memory", "12"), "is below 64 MiB")
    # 99999999T overflowed setrlimit in the child, reported as "could not start ... reinstall resnet-deploy"
    text = assert_refused(predict(model, img, "--max-memory", "99999999T"), "is more than a memory limit can hold")
    assert "could not start" not in text and "reinstall" not in text
    from resnet_deploy.untrusted.limits import lower

    lower(resource.RLIMIT_CORE, 1 << 80)  # lowering to more than a C long holds is no change, not an OverflowError


@pytest.mark.parametrize("case", ["nested 200,000 levels", "a FIFO", "a list", "over 16 MiB"])
def test_bench_reads_manifests_through_the_same_loader(tmp_path, case):
    """bench read manifests with a plain json.loads(read_text()): a manifest nested 200,000 levels deep was a
    RecursionError traceback and a FIFO in a manifest's place blocked bench forever. Both are refused now (the
    file is reported as unusable, nothing is searched for or run), as predict refuses them."""
    model = onnx_classifier(tmp_path / "m.onnx")
    side = tmp_path / "m.onnx.json"
    if case == "a FIFO":
        os.mkfifo(side)
    else:
        side.write_text({"a list": "[1, 2]", "over 16 MiB": json.dumps({"pad": "x" * (17 << 20)}),
                         "nested 200,000 levels": "[" * 200_000 + "]" * 200_000}[case])
    started = time.monotonic()
    r = runner.invoke(app, ["bench", str(model), "--data", str(tmp_path / "no-data")], env={"COLUMNS": "200"})
    text = assert_refused(r, "m.onnx.json")
    assert time.monotonic() - started < 60 and "Traceback" not in text
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx", "m.onnx.json"]


def test_bench_checks_a_cache_hit_by_re_running_the_float_model(tmp_path):
    """Issue: planted logits with a recomputed key made bench report the float model at 10 %. load_verified
    existed but bench read the cache with the plain load; its cache lookup now re-runs the float model on random
    cached images (in a capped child), so planted logits are discarded, said in the notes, and honest ones used."""
    from types import SimpleNamespace

    from resnet_deploy.bench.run import _cached_reference

    rc, model, x, y, pre, key = _cache_setup(tmp_path)

    class Split(SimpleNamespace):
        def __len__(self):
            return len(self.x)

    def lookup():
        ref = SimpleNamespace(role="reference", error=None, sha256=hashlib.sha256(model.read_bytes()).hexdigest(),
                              path=model, logits=None, notes=[])
        notes: list[str] = []
        got = _cached_reference([ref], SimpleNamespace(preprocessing=pre), Split(x=x, y=y),
                                SimpleNamespace(cache=True, cache_dir=tmp_path / "cache", threads=1), notes)
        return got, ref, notes

    root = tmp_path / "cache"
    planted = np.tile(np.eye(10, dtype=np.float32)[0] * 20, (len(x), 1))  # "airplane" everywhere
    rc.store(key, planted, root)
    got, ref, notes = lookup()
    assert got["logits"] is None and ref.logits is None and any("were discarded" in n for n in notes), notes
    assert not rc.cache_path(key, root).exists()
    import onnxruntime as ort

    honest = ort.InferenceSession(str(model)).run(None, {"X": x.astype(np.float32)})[0]  # pixels 0..255
    rc.store(key, honest, root)
    got, ref, notes = lookup()
    np.testing.assert_array_equal(got["logits"], honest)
    assert any("random test images re-run through the float model match" in n for n in notes), notes


def test_bench_escapes_file_names_in_its_report_and_its_errors(tmp_path):
    """bench printed a file's name raw in its report table and in error messages: ESC sequences reached the
    terminal and a newline in a name forged a line. Both go through terminal.safe now; --json stays exact."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 20)):
        np.savez(data / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)
    model = onnx_classifier(tmp_path / "e\x1b[2Jx\nFAKE: accuracy 100%.onnx")
    r = runner.invoke(app, ["bench", str(model), "--data", str(data), "--limit", "20", "--no-latency", "--no-cache",
                            "--in-process", "--json-output", str(tmp_path / "r.json")], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    assert json.loads((tmp_path / "r.json").read_text())["results"][0]["path"] == str(model)  # exact in JSON
    assert "\x1b" not in r.output and "e\\x1b[2Jx\\nFAKE" in r.output
    assert not any(line.lstrip().startswith("FAKE") for line in r.output.splitlines()), r.output
    r = runner.invoke(app, ["bench", str(tmp_path / "gone\x1b]0;pwned\x07.onnx"), "--data", str(data)],
                      env={"COLUMNS": "200"})
    text = assert_refused(r, "gone\\x1b]0;pwned\\x07.onnx does not exist")
    assert "\x1b" not in text and "\x07" not in text


def test_bench_caps_each_files_process_and_names_the_cap(tmp_path):
    """bench's children ran with no memory cap: the 500-byte ONNX that materialises 4 GiB at load took the machine
    past 4 GB under bench as it did under predict. Each file's process is now capped (--max-memory, default 4G):
    the file is one error entry naming the cap, the other file is still measured, peak memory stays under it."""
    data = tmp_path / "data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("test", 20)):
        np.savez(data / f"{split}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=np.arange(n) % 10)
    bomb = onnx_classifier(tmp_path / "bomb.onnx", extra=constant_of_shape_bomb)
    fine = onnx_classifier(tmp_path / "fine.onnx")
    proc, peak = cli_process("bench", bomb, fine, "--data", data, "--limit", "20", "--no-latency", "--no-cache",
                             "--max-memory", "1G", "--json-output", tmp_path / "r.json")
    text = flat(proc.stdout + proc.stderr)
    assert "Traceback" not in text, text
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["options"]["max_memory"] == 1 << 30
    rows = {Path(r["path"]).name: r for r in doc["results"]}
    assert rows["fine.onnx"]["error"] is None and rows["fine.onnx"]["accuracy"]["images"] == 20
    err = rows["bomb.onnx"]["error"]
    assert err is not None and "--max-memory 1 GiB" in (err["what"] + err["fix"]), err
    assert peak < 1 << 30, peak
    r = runner.invoke(app, ["bench", str(fine), "--data", str(data), "--max-memory", "lots"])
    assert_refused(r, "--max-memory 'lots' is not an amount of memory")
