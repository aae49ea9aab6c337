"""An image folder as ``--data`` in export and bench: the same answer as the npz it was written from.

The CIFAR-shaped split (synthetic in the fast tier; ``test_real_cifar_png_folder_*`` reads the real copy and
is `slow`) is written as a PNG image folder (lossless, files named by their index, so the folder lists in the
array's order). Then:

- bench on the folder gives exactly the accuracy, agreement and intervals bench gives on the npz (the same
  artifacts, the float reference run again on each: no cache);
- calibrating from the folder's train/ with the same seed draws the same indices, decodes the same pixels
  and writes the same INT8 file (equal sha256), while the manifest records the folder, its classes and the
  resize policy;
- a model whose output width is not the folder's class count is refused before any image is decoded.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from resnet_deploy.data.folder import write_image_folder
from resnet_deploy.errors import DataError
from tests.conftest import copy_with_sidecar

N_TRAIN, N_TEST = 200, 100


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_DEPLOY_CACHE", str(tmp_path / "cache"))


def _subset_pair(src: Path, out: Path) -> tuple[Path, Path]:
    """The first images of ``src``'s npz splits, as an npz folder and as a PNG image folder."""
    from resnet_deploy.data.constants import CLASS_NAMES

    arrays = {}
    npz = out / "npz"
    npz.mkdir(parents=True)
    for name, n in (("train", N_TRAIN), ("test", N_TEST)):
        with np.load(src / f"{name}.npz") as z:
            x, y = z["x"][:n], z["y"].reshape(-1)[:n].astype(np.int64)
        np.savez(npz / f"{name}.npz", x=x, y=y)
        arrays[name] = (x, y)
    png = write_image_folder(out / "png", arrays, CLASS_NAMES, image_format="png")
    return npz, png


def _export(model: Path, out: Path, data, **kw):
    from resnet_deploy.converters.export import export_model
    from resnet_deploy.converters.options import ExportOptions

    out.mkdir()
    dest = copy_with_sidecar(model, out / "model.keras")
    opts = ExportOptions(formats=("tflite",), int8=True, calib_samples=40, calib_seed=3, parity_samples=32, **kw)
    return {a.precision: a for a in export_model(dest, opts, data=data)}


def _bench(paths, data, reference=None):
    from resnet_deploy.bench.options import BenchOptions
    from resnet_deploy.bench.run import run_bench

    rep = run_bench(paths, BenchOptions(data=data, reference=reference, latency=False, isolate=False, cache=False,
                                        bootstrap=500))
    return {r.path.name: r for r in rep.results}, rep


TIMING = ("speedup", "throughput_ratio", "peak_rss_ratio", "artifact_rss_ratio", "first_inference_ratio")


def _figures(r) -> dict:
    """A result's accuracy figures against the float model (not its timings, which no two runs share)."""
    return {k: v for k, v in (r.vs_float or {}).items() if not k.startswith(TIMING)}


def _bench_equal(arts, npz: Path, png: Path, reference: Path | None = None) -> dict:
    on_npz, _ = _bench(arts, npz, reference)
    on_png, rep_png = _bench(arts, png, reference)
    assert rep_png.data["dataset"] == "image folder" and rep_png.data["images"] == N_TEST
    assert set(on_npz) == set(on_png)
    for name in on_npz:
        x, y = on_npz[name], on_png[name]
        assert x.error is None and y.error is None
        np.testing.assert_array_equal(x.logits, y.logits)
        assert x.accuracy == y.accuracy
        assert _figures(x) == _figures(y)
    # the figures themselves, computed another way: plain argmax against the npz labels
    with np.load(npz / "test.npz") as z:
        labels = z["y"]
    ref = next(r for r in on_png.values() if r.role == "reference")
    for r in on_png.values():
        assert r.accuracy["top1"] == pytest.approx(np.mean(r.logits.argmax(1) == labels))
        if r is not ref:
            assert r.vs_float["agreement"] == pytest.approx(np.mean(r.logits.argmax(1) == ref.logits.argmax(1)))
    return on_png


def test_png_folder_gives_the_npz_calibration_and_bench_figures(tiny_model_path, small_npz_dir, tmp_path):
    """Fast: the calibration sample and the INT8 tuning split drawn from the PNG folder are the npz's (same
    indices, same pixels, same float inputs); bench of a model against its float reference gives the npz's
    figures. The INT8 file itself: ``test_png_folder_export_writes_the_same_int8_file`` (slow)."""
    from resnet_deploy.converters.calibration import build_calibration
    from resnet_deploy.data.folder import Decoding
    from resnet_deploy.data.folder_data import FolderSource, folder_split, open_folder
    from resnet_deploy.data.preprocess import Preprocessing
    from resnet_deploy.data.sampler import validation_split
    from resnet_deploy.data.sources import load_cifar10

    npz, png = _subset_pair(small_npz_dir, tmp_path / "data")
    train = load_cifar10(npz, splits=("train",)).train
    ftrain = folder_split(open_folder(FolderSource(png)), "train", Decoding(32))
    spec = Preprocessing.pixels()
    tune_a, tune_b = validation_split(train, 60, seed=7), validation_split(ftrain, 60, seed=7)
    np.testing.assert_array_equal(tune_a.indices, tune_b.indices)
    np.testing.assert_array_equal(tune_a.x, tune_b.x)
    assert tune_a.recipe == tune_b.recipe
    a = build_calibration(train, 40, 3, spec, exclude=tune_a.indices)
    b = build_calibration(ftrain, 40, 3, spec, exclude=tune_b.indices)
    np.testing.assert_array_equal(a.indices, b.indices)
    np.testing.assert_array_equal(a.x, b.x)  # float32 inputs, bit for bit: what the converter is fed
    assert {k: v for k, v in b.recipe.items() if k not in ("source", "decoding")} == a.recipe
    assert b.recipe["decoding"]["size"] == [32, 32] and b.recipe["source"]["layout"] == "image-folder"

    model = copy_with_sidecar(tiny_model_path, tmp_path / "model.keras")
    twin = copy_with_sidecar(tiny_model_path, tmp_path / "twin.keras")
    _bench_equal([twin], npz, png, reference=model)


@pytest.mark.slow
def test_png_folder_export_writes_the_same_int8_file(tiny_model_path, small_npz_dir, tmp_path):
    """Slow (two TFLite exports): calibrating from the PNG folder's train/ with the same seed writes the INT8
    file the npz writes (equal bytes), and bench of both exports' artifacts on the folder is the npz's."""
    npz, png = _subset_pair(small_npz_dir, tmp_path / "data")
    a = _export(tiny_model_path, tmp_path / "from_npz", npz)
    b = _export(tiny_model_path, tmp_path / "from_png", png)
    ma, mb = a["int8"].manifest, b["int8"].manifest
    assert ma.calibration["sample"]["indices_sha256_16"] == mb.calibration["sample"]["indices_sha256_16"]
    assert ma.sha256 == mb.sha256
    assert a["int8"].path.read_bytes() == b["int8"].path.read_bytes()
    assert ma.validation["max_abs_logit_diff"] == mb.validation["max_abs_logit_diff"]
    data = mb.options["data"]  # the folder export says where its images came from and how they were decoded
    assert data["layout"] == "image-folder" and data["decoding"]["size"] == [32, 32]
    assert data["decoding"]["fit"] == "crop"
    assert mb.class_names == sorted(mb.class_names) == data["class_names"]
    assert "data" not in ma.options
    _bench_equal([a["fp32"].path, a["int8"].path], npz, png)


def test_real_cifar_png_folder_gives_the_npz_answer(tiny_model_path, real_small_npz_dir, tmp_path):
    test_png_folder_export_writes_the_same_int8_file(tiny_model_path, real_small_npz_dir, tmp_path)


def test_a_model_for_another_class_count_is_refused_before_decoding(tiny_model_path, tmp_path):
    from resnet_deploy.converters.planning import plan_export
    from resnet_deploy.converters.options import ExportOptions

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (12, 20, 20, 3), dtype=np.uint8)
    folder = write_image_folder(tmp_path / "five", {"train": (x, np.arange(12) % 5), "test": (x, np.arange(12) % 5)},
                                list("abcde"))
    model = copy_with_sidecar(tiny_model_path, tmp_path / "model.keras")
    with pytest.raises(DataError) as e:
        plan_export(model, ExportOptions(formats=("tflite",), int8=True, calib_samples=5), data=folder)
    msg = str(e.value)
    assert "outputs 10 class scores" in msg and "has 5 classes" in msg and "Expected:" in msg and "Fix:" in msg
    assert not list(tmp_path.glob("*.tflite"))


# ----------------------------------------------------------------------------------------------
# The whole path on a user's folder: export --int8 -> bench -> predict, through the command line
# ----------------------------------------------------------------------------------------------
FIVE = ("ant", "bee", "cat", "dog", "eel")
INPUT = (24, 32)  # height, width: not CIFAR's


def _user_folder(root: Path) -> Path:
    """5 classes, images of mixed sizes as PNG and JPEG, one grayscale and one RGBA image per split, and one
    truncated JPEG in test/ (skipped with a count). Each class has its own colour, so a model can tell them."""
    from PIL import Image

    rng = np.random.default_rng(5)
    colours = rng.integers(30, 226, (5, 3))
    sizes = [(40, 60), (64, 48), (24, 32), (90, 30), (33, 33)]
    for split, per_class in (("train", 12), ("test", 4)):
        for c, name in enumerate(FIVE):
            d = root / split / name
            d.mkdir(parents=True)
            for i in range(per_class):
                h, w = sizes[(i + c) % len(sizes)]
                px = np.clip(colours[c] + rng.normal(0, 25, (h, w, 3)), 0, 255).astype(np.uint8)
                img = Image.fromarray(px)
                if i == 1 and c == 0:
                    img = img.convert("L")  # grayscale: repeated over RGB, and said so
                if i == 2 and c == 1:
                    img = img.convert("RGBA")  # transparency composited onto white, and said so
                if i % 2:
                    img.convert("RGB").save(d / f"{i:02d}.jpg", quality=90) if img.mode == "RGBA" else \
                        img.save(d / f"{i:02d}.jpg", quality=90)
                else:
                    img.save(d / f"{i:02d}.png")
    good = (root / "test" / "dog" / "01.jpg").read_bytes()
    (root / "test" / "dog" / "99.jpg").write_bytes(good[: len(good) // 2])  # truncated: corrupt
    return root


def _five_class_model(path: Path, folder: Path) -> Path:
    """A tiny ResNet for the folder's 5 classes at 24x32, fitted for a few steps on its decoded train/ images
    (``train`` does not read folders yet), saved with its metadata."""
    import keras

    from resnet_deploy.data.folder import Decoding
    from resnet_deploy.data.folder_data import folder_split, open_folder
    from resnet_deploy.models.builder import build_model
    from resnet_deploy.models.io import base_metadata, save_model

    keras.utils.set_random_seed(0)
    model = build_model("resnet8", width=0.25, input_shape=(*INPUT, 3), num_classes=len(FIVE))
    train = folder_split(open_folder(folder), "train", Decoding(INPUT))
    x, y, _, _ = train.gather(np.arange(len(train)))
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(x.astype(np.float32), y, epochs=3, batch_size=12, verbose=0)
    meta = base_metadata("resnet8", width=0.25)
    meta.update(input_shape=[*INPUT, 3], class_names=list(FIVE))
    return save_model(model, path, meta)


def test_user_folder_export_bench_predict_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from resnet_deploy.cli import app
    from resnet_deploy.predict.images import load_image
    from resnet_deploy.runtimes import open_runner

    runner = CliRunner()
    folder = _user_folder(tmp_path / "photos")
    model = _five_class_model(tmp_path / "m" / "model.keras", folder)

    r = runner.invoke(app, ["export", str(model), "--data", str(folder), "--formats", "tflite", "--int8",
                            "--calib-samples", "20", "--parity-samples", "16", "--out", str(tmp_path / "o")],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    int8 = tmp_path / "o" / "model_int8.tflite"
    m = json.loads(Path(f"{int8}.json").read_text())
    assert m["class_names"] == list(FIVE) and m["input"]["shape"][1:] == [*INPUT, 3]
    assert m["options"]["data"]["decoding"]["size"] == list(INPUT) and m["options"]["data"]["decoding"]["fit"] == "crop"
    assert m["calibration"]["sample"]["samples"] == 20 and len(m["calibration"]["sample"]["per_class"]) == 5
    assert "converted to RGB" in r.output  # the grayscale and RGBA images, said so

    r = runner.invoke(app, ["bench", str(int8), "--data", str(folder), "--no-latency", "--in-process", "--json"],
                      env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    rep = json.loads(r.stdout[r.stdout.index("{"):])
    assert rep["data"]["dataset"] == "image folder" and rep["data"]["class_names"] == list(FIVE)
    assert rep["data"]["images"] == 20  # 21 files listed, the truncated JPEG skipped
    assert any("skipped 1 file" in n and "99.jpg" in n for n in rep["data"]["notes"])
    res = {Path(x["path"]).name: x for x in rep["results"]}
    top1 = res["model_int8.tflite"]["accuracy"]["top1"]

    # the same figure another way: predict's decoder image by image, a plain runtime loop, numpy
    files = sorted((p for p in (folder / "test").rglob("*") if p.is_file() and p.name != "99.jpg"),
                   key=lambda p: (p.name, p.parent.name))
    labels = np.array([FIVE.index(p.parent.name) for p in files])
    pixels = np.stack([load_image(p, "crop", size=INPUT) for p in files])
    with open_runner(int8) as rt:
        logits = np.concatenate([rt.predict(pixels[i:i + 1]) for i in range(len(pixels))])
    assert top1 == pytest.approx(np.mean(logits.argmax(1) == labels))

    r = runner.invoke(app, ["predict", str(int8), str(folder / "test" / "bee"), "--json"], env={"COLUMNS": "200"})
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout[r.stdout.index("{"):])
    assert out["class_names"] == list(FIVE) and out["resize"]["fit"] == "crop" and "24x32" in out["resize"]["method"]
    got = {Path(p["input"]).name: p["top"][0]["index"] for p in out["predictions"]}
    want = {p.name: int(logits[i].argmax()) for i, p in enumerate(files) if p.parent.name == "bee"}
    assert got == want


def test_bench_caches_float_logits_by_the_folders_content(tiny_model_path, tmp_path):
    """The float reference's cached logits are keyed on the folder's content: a second run reads them, a
    file whose bytes changed (same name, same size, same time) is a miss, never another folder's logits."""
    import os

    from resnet_deploy.bench.options import BenchOptions
    from resnet_deploy.bench.run import run_bench
    from resnet_deploy.data.constants import CLASS_NAMES

    rng = np.random.default_rng(3)
    x = rng.integers(0, 256, (30, 32, 32, 3), dtype=np.uint8)
    y = np.arange(30) % 10
    folder = write_image_folder(tmp_path / "f", {"test": (x, y)}, CLASS_NAMES)  # test/ only: bench needs no train/
    model = copy_with_sidecar(tiny_model_path, tmp_path / "model.keras")
    twin = copy_with_sidecar(tiny_model_path, tmp_path / "twin.keras")
    opts = BenchOptions(data=folder, reference=model, latency=False, isolate=False, cache_dir=tmp_path / "c",
                        bootstrap=100)

    def notes():
        rep = run_bench([twin], opts)
        return " ".join(rep.reference["notes"]), rep

    first, rep1 = notes()
    assert "cached in" in first
    second, rep2 = notes()
    assert "read from the cache" in second
    ref1 = next(r for r in rep1.results if r.role == "reference")
    ref2 = next(r for r in rep2.results if r.role == "reference")
    np.testing.assert_array_equal(ref1.logits, ref2.logits)

    f = next((folder / "test" / "cat").iterdir())  # other pixels, the same byte count and modification time
    st = f.stat()
    data = bytearray(f.read_bytes())
    data[-20] ^= 0xFF  # inside the PNG's end: the bytes differ (Pillow may still read it, or skip it)
    f.write_bytes(bytes(data))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    third, _ = notes()
    assert "read from the cache" not in third


def test_class_folders_without_a_split_folder_get_the_image_folder_error(tiny_model_path, tmp_path):
    """--data naming class folders directly (no train/ or test/) is recognised as a user's folder and told how
    to lay it out, rather than "no CIFAR-10 found"; nothing is run."""
    from resnet_deploy.bench.options import BenchOptions
    from resnet_deploy.bench.run import run_bench
    from resnet_deploy.data.folder import FolderLayoutError

    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (4, 12, 12, 3), dtype=np.uint8)
    root = write_image_folder(tmp_path / "w", {"train": (x, np.arange(4) % 2)}, ["cat", "dog"]) / "train"
    model = copy_with_sidecar(tiny_model_path, tmp_path / "model.keras")
    with pytest.raises(FolderLayoutError) as e:
        run_bench([model], BenchOptions(data=root, latency=False, isolate=False, cache=False))
    assert "look like class folders" in str(e.value) and "move the class folders into" in str(e.value)



def test_fit_and_strict_reach_export_and_bench_from_the_command_line(tmp_path):
    """--fit and --strict on export and bench become the image-folder source the library takes (FolderSource:
    its policy and strictness), and either flag without an image folder is refused before any model or image is
    read, with nothing written."""
    from typer.testing import CliRunner

    from resnet_deploy.cli import app
    from resnet_deploy.cli_common import folder_data
    from resnet_deploy.data.folder_data import FolderSource

    folder = _user_folder(tmp_path / "photos")
    src = folder_data(folder, "stretch", True)
    assert isinstance(src, FolderSource) and src.fit == "stretch" and src.strict
    assert folder_data(folder, None, False) == folder  # no flag: --data as it is
    runner = CliRunner()
    not_a_folder = tmp_path / "cifar"
    not_a_folder.mkdir()
    rng = np.random.default_rng(0)
    np.savez(not_a_folder / "test.npz", x=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8), y=np.arange(8) % 5)
    model = tmp_path / "model.keras"
    model.write_bytes(b"never read")
    art = tmp_path / "m.onnx"
    art.write_bytes(b"never read")
    for cmd in (["bench", str(art)], ["export", str(model), "--out", str(tmp_path / "o2")]):
        for flag in (["--fit", "crop"], ["--strict"]):
            r = runner.invoke(app, [*cmd, "--data", str(not_a_folder), *flag], env={"COLUMNS": "200"})
            assert r.exit_code == 2 and "--fit and --strict apply to an image folder" in r.output, r.output
    assert not (tmp_path / "o2").exists()
