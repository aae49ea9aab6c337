"""`resnet-deploy predict`: image loading and resizing, top-k probabilities against an independent
evaluation of the same artifact (its engine called directly), labels and accuracy, per-file errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from resnet_deploy.cli import app
from resnet_deploy.predict.images import fit_image, load_image, to_rgb

runner = CliRunner()
REPO = Path(__file__).resolve().parents[1]


def cli_env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "RESNET_DEPLOY_VERBOSE")}
    env.update(COLUMNS="80", PYTHONWARNINGS="default", **extra)  # as a user's shell: no test-suite quieting
    return env


def run_cli(*args, **env) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "resnet_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, env=cli_env(**env), cwd=REPO, timeout=600)


_EXPORTS: dict = {}  # one export per session, shared with test_cli's terminal test


@pytest.fixture(scope="session")
def exported(tmp_path_factory, tiny_model_path, cifar_dir):
    """The tiny model exported by the CLI (FP32 + INT8, TFLite + ONNX), as a user at 80 columns runs it."""
    key = (str(tiny_model_path), str(cifar_dir))
    if key not in _EXPORTS:
        out = tmp_path_factory.mktemp("exported")
        proc = run_cli("export", tiny_model_path, "--int8", "--calib-samples", 20, "--validate-samples", 32,
                       "--out", out, "--data", cifar_dir)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        _EXPORTS[key] = (out, proc)
    return _EXPORTS[key]


@pytest.fixture(scope="module")
def test_pngs(tmp_path_factory, cifar):
    """The first 12 real test images written as 32x32 PNGs, with their pixels and labels."""
    d = tmp_path_factory.mktemp("pngs")
    x, y = cifar.test.x[:12], cifar.test.y[:12].astype(np.int64)
    paths = []
    for i, img in enumerate(x):
        p = d / f"test{i:02d}.png"
        Image.fromarray(img).save(p)
        paths.append(p)
    return paths, x, y


def softmax(z):
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def engine_logits(path: Path, x: np.ndarray) -> np.ndarray:
    """The artifact's logits from its engine called directly (pixels 0..255 as float32: resnet-deploy's
    models carry their normalisation inside), not through resnet_deploy's runners."""
    x = x.astype(np.float32)
    if path.suffix == ".keras":
        import keras

        model = keras.saving.load_model(path, compile=False)
        return np.asarray(model(x, training=False))
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(path))
        inp, out = it.get_input_details()[0], it.get_output_details()[0]
        assert inp["dtype"] == np.float32  # float I/O (the export above has no --int8-io)
        it.resize_tensor_input(inp["index"], list(x.shape))
        it.allocate_tensors()
        it.set_tensor(inp["index"], x)
        it.invoke()
        return it.get_tensor(out["index"])
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# Images --------------------------------------------------------------------------------------------
def test_png_round_trip_of_32x32_pixels_is_exact(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    Image.fromarray(x).save(tmp_path / "a.png")
    assert np.array_equal(load_image(tmp_path / "a.png"), x)


def test_shrinking_is_the_box_filter_mean_of_the_centred_square():
    rng = np.random.default_rng(1)
    wide = rng.integers(0, 256, (64, 96, 3), dtype=np.uint8)  # H=64, W=96: the centred square is columns 16..79
    got = fit_image(Image.fromarray(wide), "crop").astype(int)
    square = wide[:, 16:80].astype(float)
    want = np.floor(square.reshape(32, 2, 32, 2, 3).mean(axis=(1, 3)) + 0.5)
    assert got.shape == (32, 32, 3)
    assert np.abs(got - want).max() <= 1  # Pillow's fixed-point rounding


def test_an_image_with_one_side_of_32_is_cropped_to_its_centred_square(tmp_path):
    """A 32x64 or 64x32 image (a phone photo's EXIF rotation makes one): its centred square already measures
    32x32, so nothing is resized, but it must still be cut out. It was not: the whole image reached the model
    ("onnxruntime got images of shape (1, 64, 32, 3)")."""
    rng = np.random.default_rng(5)
    tall = rng.integers(0, 256, (64, 32, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_image(Image.fromarray(tall), "crop"), tall[16:48])
    np.testing.assert_array_equal(fit_image(Image.fromarray(tall.transpose(1, 0, 2)), "crop"),
                                  tall.transpose(1, 0, 2)[:, 16:48])
    wide = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated 90 degrees clockwise: 32 wide, 64 high
    Image.fromarray(wide).save(tmp_path / "rot.png", exif=exif)
    np.testing.assert_array_equal(load_image(tmp_path / "rot.png"), np.rot90(wide, k=-1)[16:48])


def test_stretch_keeps_the_whole_image():
    rng = np.random.default_rng(2)
    img = rng.integers(0, 256, (32, 64, 3), dtype=np.uint8)  # twice as wide: pairs of columns are averaged
    got = fit_image(Image.fromarray(img), "stretch").astype(int)
    want = np.floor(img.astype(float).reshape(32, 32, 2, 3).mean(axis=2) + 0.5)
    assert np.abs(got - want).max() <= 1


def test_enlarging_a_flat_image_stays_flat_and_in_range():
    img = np.full((8, 8, 3), (10, 200, 255), np.uint8)
    got = fit_image(Image.fromarray(img))
    assert got.shape == (32, 32, 3) and np.array_equal(got, np.broadcast_to(img[0, 0], (32, 32, 3)))


def test_colour_modes_become_rgb():
    rgba = np.zeros((32, 32, 4), np.uint8)
    rgba[..., 0] = 200
    rgba[:16, :, 3] = 255  # top half opaque red-ish, bottom half fully transparent
    got = np.asarray(to_rgb(Image.fromarray(rgba)))
    assert (got[:16] == (200, 0, 0)).all() and (got[16:] == 255).all()  # transparency on white
    gray = np.arange(32 * 32, dtype=np.uint8).reshape(32, 32)
    got = np.asarray(to_rgb(Image.fromarray(gray)))
    assert (got == gray[..., None]).all()
    g16 = np.full((32, 32), 65535, np.uint16)
    assert (np.asarray(to_rgb(Image.fromarray(g16))) == 255).all()


# Predictions ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["model.keras", "model_fp32.tflite", "model_int8.tflite", "model_fp32.onnx",
                                  "model_int8_*.onnx"])  # the ONNX INT8 name carries its scheme (export --target)
def test_predict_matches_the_engine_on_the_same_pixels(name, exported, tiny_model_path, test_pngs):
    out_dir, _ = exported
    artifact = tiny_model_path if name == "model.keras" else next(out_dir.glob(name))
    paths, x, _ = test_pngs
    result = runner.invoke(app, ["predict", str(artifact), *map(str, paths), "--top-k", "4", "--json"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    want = softmax(engine_logits(artifact, x))
    assert doc["class_names"][3] == "cat" and "softmax" in doc["scores"]
    assert [p["input"] for p in doc["predictions"]] == [str(p) for p in paths]
    for i, pred in enumerate(doc["predictions"]):
        order = np.argsort(-want[i], kind="stable")[:4]
        got_idx = [t["index"] for t in pred["top"]]
        got_p = np.array([t["probability"] for t in pred["top"]])
        np.testing.assert_allclose(got_p, want[i][got_idx], atol=1e-5)  # the probabilities of those classes
        np.testing.assert_allclose(got_p, want[i][order], atol=1e-5)  # and they are the top 4
        assert all(t["class"] == doc["class_names"][t["index"]] for t in pred["top"])
        assert "label" not in pred


def test_npz_with_labels_prints_accuracy(exported, cifar, tmp_path):
    out_dir, _ = exported
    artifact = out_dir / "model_fp32.tflite"
    x, y = cifar.test.x[:40], cifar.test.y[:40].astype(np.int64)
    np.savez(tmp_path / "t.npz", x=x, y=y)
    logits = engine_logits(artifact, x)
    top1 = int((logits.argmax(1) == y).sum())
    top3 = int((np.argsort(-logits, 1)[:, :3] == y[:, None]).any(1).sum())
    result = runner.invoke(app, ["predict", str(artifact), str(tmp_path / "t.npz"), "--json"])
    assert result.exit_code == 0, result.output
    acc = json.loads(result.stdout)["accuracy"]
    assert acc == [{"source": str(tmp_path / "t.npz"), "images": 40, "top1_correct": top1, "top1": top1 / 40,
                    "topk_correct": top3, "topk": top3 / 40, "k": 3}]
    text = runner.invoke(app, ["predict", str(artifact), str(tmp_path / "t.npz"), "--limit", "10"],
                         env={"COLUMNS": "80"})
    assert text.exit_code == 0, text.output
    top1_10 = int((logits[:10].argmax(1) == y[:10]).sum())
    assert f"top-1 {top1_10 / 10:.2%} ({top1_10}/10)" in text.stdout
    rows = [line for line in text.stdout.splitlines() if "t.npz[" in line]
    assert len(rows) == 10
    assert sum(row.endswith("  ok") for row in rows) == top1_10


def test_text_output_fits_80_columns_even_with_all_classes(exported, cifar, tmp_path, monkeypatch):
    out_dir, _ = exported
    np.savez(tmp_path / "t.npz", x=cifar.test.x[:6], y=cifar.test.y[:6])
    monkeypatch.chdir(tmp_path)
    for k in ("1", "3", "10"):
        r = runner.invoke(app, ["predict", str(out_dir / "model_fp32.onnx"), "t.npz", "-k", k], env={"COLUMNS": "80"})
        assert r.exit_code == 0, r.output
        assert max(len(line) for line in r.stdout.splitlines()) <= 80, r.stdout
        assert r.stdout.count("%") == 6 * int(k) + 2  # every probability shown, + the accuracy line's two


def test_softmax_output_is_not_applied_twice(tmp_path, test_pngs):
    import keras

    from resnet_deploy.models.io import save_model
    from tests.conftest import tiny_model

    base = tiny_model(seed=3)
    probs_model = keras.Model(base.inputs, keras.layers.Softmax(name="probs")(base.outputs[0]))
    path = tmp_path / "probs.keras"
    save_model(probs_model, path, metadata={"architecture": "resnet8"})  # a sidecar that says nothing on outputs
    paths, x, _ = test_pngs
    want = np.asarray(probs_model(x.astype(np.float32), training=False), np.float64)
    result = runner.invoke(app, ["predict", str(path), *map(str, paths[:4]), "--json", "-k", "10"])
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    assert doc["scores"] == "the model's own (every output row sums to 1)"
    for i, pred in enumerate(doc["predictions"]):
        got = np.zeros(10)
        for t in pred["top"]:
            got[t["index"]] = t["probability"]
        np.testing.assert_allclose(got, want[i], atol=1e-6)


def test_any_size_jpeg_and_png_files_are_classified_like_their_pixels(exported, tmp_path, cifar):
    """A 32x32 CIFAR image enlarged 4x (nearest) and saved as PNG comes back, box-filtered, exactly."""
    out_dir, _ = exported
    artifact = out_dir / "model_fp32.onnx"
    img = cifar.test.x[5]
    big = np.repeat(np.repeat(img, 4, axis=0), 4, axis=1)
    Image.fromarray(big).save(tmp_path / "big.png")
    Image.fromarray(big).save(tmp_path / "big.jpg", quality=95)
    result = runner.invoke(app, ["predict", str(artifact), str(tmp_path / "big.png"), str(tmp_path / "big.jpg"),
                                 "--json", "-k", "1"])
    assert result.exit_code == 0, result.output
    preds = json.loads(result.stdout)["predictions"]
    want = softmax(engine_logits(artifact, img[None]))[0]
    assert preds[0]["top"][0]["index"] == int(want.argmax())
    assert abs(preds[0]["top"][0]["probability"] - want.max()) < 1e-5
    assert preds[1]["input"].endswith("big.jpg") and len(preds[1]["top"]) == 1  # lossy: only that it ran


def test_unreadable_inputs_are_errors_each_and_the_rest_still_run(exported, tmp_path, test_pngs):
    out_dir, _ = exported
    paths, _, _ = test_pngs
    folder = tmp_path / "mixed"
    folder.mkdir()
    (folder / "good.png").write_bytes(paths[0].read_bytes())
    (folder / "fake.png").write_text("not an image")
    (folder / "cut.png").write_bytes(paths[1].read_bytes()[:120])
    (folder / "labels.csv").write_text("a,b")
    np.savez(tmp_path / "nox.npz", images=np.zeros((2, 32, 32, 3), np.uint8))
    args = ["predict", str(out_dir / "model_int8.tflite"), str(folder), str(tmp_path / "missing.jpg"),
            str(tmp_path / "nox.npz")]
    result = runner.invoke(app, args, env={"COLUMNS": "80"})
    assert result.exit_code == 2, result.output
    assert "good.png" in result.stdout and "fake.png" not in result.stdout
    err = flat(result.stderr)
    for bad in ("fake.png is not an image", "cut.png could not be decoded", "missing.jpg does not exist",
                "nox.npz holds the arrays ['images'], none of them named x"):
        assert bad in err, err
    assert err.count("Fix:") >= 5 and "4 of 5 input(s) could not be used" in err
    assert "skipped 1 file(s)" in err  # labels.csv
    doc = json.loads(runner.invoke(app, [*args, "--json"]).stdout)
    assert len(doc["predictions"]) == 1 and len(doc["errors"]) == 4
    assert all(e["expected"] and e["fix"] for e in doc["errors"])


def flat(text: str) -> str:
    return " ".join(text.split())  # messages are wrapped to the terminal's width


def test_bad_options_and_artifacts_are_clear_errors(exported, tmp_path, test_pngs):
    out_dir, _ = exported
    paths, _, _ = test_pngs
    fp32 = str(out_dir / "model_fp32.tflite")
    r = runner.invoke(app, ["predict", fp32, str(paths[0]), "--top-k", "11"])
    assert r.exit_code == 2 and "--top-k 11 is out of range for 10 classes" in flat(r.output) and "Fix:" in r.output
    r = runner.invoke(app, ["predict", str(tmp_path / "nope.tflite"), str(paths[0])])
    assert r.exit_code == 2 and "nope.tflite does not exist" in flat(r.output) and "Fix:" in r.output
    r = runner.invoke(app, ["predict", str(paths[0]), str(paths[0])])
    assert r.exit_code == 2 and "Cannot tell the format" in flat(r.output)
    r = runner.invoke(app, ["predict", fp32, str(paths[0]), "--fit", "pad"])
    assert r.exit_code == 2 and "Unknown --fit 'pad'" in flat(r.output)
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.zeros((2, 32, 32, 3), np.float32))
    r = runner.invoke(app, ["predict", fp32, str(bad)])
    assert r.exit_code == 2 and "dtype float32" in flat(r.stderr) and "x.astype(np.uint8)" in flat(r.stderr)


def _trained_demo_model() -> str | None:
    """The demo ResNet20 by its pretrained name, else the training run's output, else None."""
    from resnet_deploy.errors import ResnetDeployError

    try:
        from resnet_deploy.models.pretrained import resolve_model

        resolve_model("resnet20-cifar10")
        return "resnet20-cifar10"  # predict resolves the name itself
    except (ImportError, ResnetDeployError):
        pass
    p = REPO / "runs" / "resnet20-cifar10" / "model.keras"
    return str(p) if p.exists() else None


def test_trained_model_names_the_test_images(tmp_path, cifar):
    """With the trained demo ResNet20, PNGs written from test images come back with their labels."""
    model = _trained_demo_model()
    if model is None:
        pytest.skip("no trained ResNet20 yet (pretrained resnet20-cifar10 or runs/resnet20-cifar10/model.keras)")
    x, y = cifar.test.x[:50], cifar.test.y[:50].astype(np.int64)
    for i, img in enumerate(x):
        Image.fromarray(img).save(tmp_path / f"{i:02d}.png")  # the folder is read in name order
    result = runner.invoke(app, ["predict", model, str(tmp_path), "--json", "-k", "1"])
    assert result.exit_code == 0, result.output
    preds = json.loads(result.stdout)["predictions"]
    assert len(preds) == 50
    top1 = np.array([p["top"][0]["index"] for p in preds])
    assert (top1 == y).mean() >= 0.7, (top1, y)  # the demo ResNet20 is right on about 9 test images in 10
