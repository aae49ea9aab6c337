"""Accuracy-aware INT8 on a tiny trained ResNet with one deliberately outlier-heavy layer.

The outlier: ``stage2_block1_bn1`` channel 0 is made dead (gamma 0.01, beta -10, so the ReLU after it is
always 0; a gamma of exactly 0 would give that channel zero weights, whose zero per-channel scale ONNX
Runtime turns into a garbage bias, a second fault), and ``stage2_block1_conv2`` gets weights 1000x its largest on that input channel. The float
model's logits do not change at all (those weights only ever multiply zeros), but per-channel INT8
weights take their scale from the outliers and every other weight of that convolution rounds to
nothing. The analysis must rank that layer first, the fallback must keep it float, and the result must
agree with the float model better than a plain export; agreement is computed here with plain loops over
LiteRT and ONNX Runtime against Keras logits, not through the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_deploy.converters.options import ExportOptions
from resnet_deploy.converters.export import export_model
from resnet_deploy.errors import ExportError
from tests.conftest import tiny_model

OUTLIER = "stage2_block1_conv2"
N_TEST = 300
SMALL = dict(val_samples=400, calib_samples=100, analysis_samples=100, validate_samples=N_TEST)


@pytest.fixture(scope="module")
def outlier_path(tmp_path_factory, cifar):
    import keras

    from resnet_deploy.models.io import base_metadata, save_model

    model = tiny_model()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(cifar.train.x[:1000].astype(np.float32), cifar.train.y[:1000], epochs=3, batch_size=64, verbose=0)
    x = cifar.test.x[:N_TEST].astype(np.float32)
    bn = model.get_layer("stage2_block1_bn1")
    g, b, m, v = bn.get_weights()
    g[0], b[0] = 0.01, -10.0  # channel 0 after the ReLU: always exactly 0
    bn.set_weights([g, b, m, v])
    before = np.asarray(model(x, training=False))
    conv = model.get_layer(OUTLIER)
    w = conv.get_weights()
    w[0][:, :, 0, :] = 1000 * np.abs(w[0]).max()
    conv.set_weights(w)
    after = np.asarray(model(x, training=False))
    np.testing.assert_allclose(after, before, atol=1e-4)  # the float model is untouched by the outliers
    path = tmp_path_factory.mktemp("outlier") / "outlier.keras"
    save_model(model, path, base_metadata("resnet8", width=0.25))
    return path, after


@pytest.fixture(scope="module")
def plain(tmp_path_factory, outlier_path, small_npz_dir):
    out = tmp_path_factory.mktemp("plain")
    arts = export_model(outlier_path[0], ExportOptions(int8=True, calib_samples=100, validate_samples=N_TEST,
                                                       out_dir=out), data=small_npz_dir)
    return {a.path.name: a for a in arts}


@pytest.fixture(scope="module")
def aware(tmp_path_factory, outlier_path, small_npz_dir):
    out = tmp_path_factory.mktemp("aware")
    opts = ExportOptions(int8=True, int8_max_drop=0.1, search_calib_samples=(), **SMALL, out_dir=out)
    arts = export_model(outlier_path[0], opts, data=small_npz_dir)
    return {a.path.name: a for a in arts}


def _int8(arts: dict, fmt: str):
    """The INT8 file of one format (the ONNX one carries its scheme in its name: outlier_int8_u8s8.onnx)."""
    (art,) = [a for n, a in arts.items() if n.startswith("outlier_int8") and "_qat" not in n and n.endswith(f".{fmt}")]
    return art


def _logits(path: Path, x: np.ndarray) -> np.ndarray:
    """A plain loop over the runtime, float pixels in, float logits out (float I/O artifacts)."""
    if path.suffix == ".tflite":
        from ai_edge_litert.interpreter import Interpreter

        it = Interpreter(model_path=str(path))
        d = it.get_input_details()[0]
        it.resize_tensor_input(d["index"], [1, 32, 32, 3])
        it.allocate_tensors()
        out = []
        for img in x:
            it.set_tensor(d["index"], img[None])
            it.invoke()
            out.append(it.get_tensor(it.get_output_details()[0]["index"])[0])
        return np.array(out)
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


@pytest.mark.parametrize("fmt", ["tflite", "onnx"])
def test_outlier_layer_is_found_kept_float_and_agreement_rises(plain, aware, outlier_path, cifar, fmt):
    x = cifar.test.x[:N_TEST].astype(np.float32)
    ref = outlier_path[1].argmax(1)
    a = _int8(aware, fmt)
    rec = a.manifest.int8_accuracy
    assert rec["analysis"]["layers"][0]["layer"] == OUTLIER  # ranked most sensitive
    assert rec["fallback"]["needed"] is True and OUTLIER in rec["fallback"]["float_layers"]
    assert a.manifest.options["converter"]["float_layers"] == rec["fallback"]["float_layers"]
    assert a.manifest.calibration["float_layers"] == rec["fallback"]["float_layers"]
    # exactly the float layers compute in float; every other conv/dense op stays integer
    assert len(a.manifest.options["op_report"]["float_compute_ops"]) == len(rec["fallback"]["float_layers"])
    assert a.manifest.options["op_report"]["integer_compute_ops"] == 10 - len(rec["fallback"]["float_layers"])
    agree_plain = float((_logits(_int8(plain, fmt).path, x).argmax(1) == ref).mean())
    agree_aware = float((_logits(a.path, x).argmax(1) == ref).mean())
    assert agree_aware > agree_plain + 0.05, (agree_plain, agree_aware)
    assert agree_aware >= 0.85
    # the fallback's tries are recorded, with the kept layer's validation agreement above the winner's
    fb_tries = [t for t in rec["search"]["tries"] if t["phase"] == "fallback"]
    assert fb_tries and fb_tries[0]["float_layers"] == [OUTLIER]
    assert rec["result"]["val_agreement"] > rec["search"]["winner"]["val_agreement"]
    assert rec["fallback"]["latency"]["after_fallback_ms"] > 0


def test_validation_split_is_disjoint_from_calibration_and_test_and_hashed(aware, cifar, small_npz_dir):
    from resnet_deploy.data.sampler import class_balanced_indices, indices_hash
    from resnet_deploy.data.sources import load_cifar10

    ds = load_cifar10(small_npz_dir)
    val = class_balanced_indices(ds.train.y, SMALL["val_samples"], seed=0)  # recomputed here, seed 0 = default
    for a in aware.values():
        if a.manifest.precision != "int8":
            assert a.manifest.int8_accuracy is None
            continue
        rec = a.manifest.int8_accuracy
        n_cal = rec["result"]["calibration"]["calib_samples"]
        cal = class_balanced_indices(ds.train.y, n_cal, seed=0, exclude=val)
        assert not np.intersect1d(val, cal).size and rec["disjoint"] is True
        assert rec["validation_indices_sha256_16"] == indices_hash(val) == rec["validation"]["indices_sha256_16"]
        assert rec["calibration_indices_sha256_16"] == indices_hash(cal) == a.manifest.calibration["sample"]["indices_sha256_16"]
        assert rec["validation"]["split"] == "train" and rec["validation"]["per_class"] == [40] * 10
        # no validation image is a test image (the test split only reports)
        test_rows = {img.tobytes() for img in ds.test.x}
        assert not any(ds.train.x[i].tobytes() in test_rows for i in val)
        # the search is recorded: every try with its setting and validation scores, and the winner
        tries = rec["search"]["tries"]
        assert tries[0]["phase"] == "search" and tries[0]["calib_samples"] == SMALL["calib_samples"]
        assert all({"val_top1", "val_drop_pp", "val_agreement", "method", "convert_s"} <= set(t) for t in tries)
        if a.manifest.format == "onnx":  # calibration methods and per-channel were searched
            assert {t["method"] for t in tries} >= {"minmax", "entropy", "percentile"}
            assert {t["per_channel"] for t in tries} == {True, False}


def test_qat_is_judged_beside_ptq_and_written_only_when_it_wins(tmp_path, outlier_path, small_npz_dir):
    from resnet_deploy.data.sampler import class_balanced_indices, indices_hash
    from resnet_deploy.data.sources import load_cifar10

    opts = ExportOptions(formats=("tflite",), int8=True, accuracy_aware=True, qat_epochs=1, qat_samples=200,
                         search_calib_samples=(), **SMALL, out_dir=tmp_path)
    arts = {a.path.name: a for a in export_model(outlier_path[0], opts, data=small_npz_dir)}
    ptq = arts["outlier_int8.tflite"].manifest.int8_accuracy
    qat = ptq["qat"]
    assert qat["ptq"]["val_top1"] == ptq["result"]["val_top1"]
    assert qat["margin_pp"] == pytest.approx(100 * (qat["qat"]["val_top1"] - qat["ptq"]["val_top1"]), abs=1e-3)
    assert qat["winner"] == ("qat" if qat["margin_pp"] > 0 else "ptq")
    assert ("outlier_int8_qat.tflite" in arts) == (qat["winner"] == "qat")
    assert (tmp_path / "outlier_int8_qat.tflite").exists() == (qat["winner"] == "qat")
    # fine-tuned from the float model's BatchNorm statistics, on training images outside the validation split
    tune = qat["fine_tuning"]
    assert tune["batchnorm"]["frozen_at_float_statistics"] == 9 and tune["learning_rate"] == 1e-5
    train = load_cifar10(small_npz_dir).train
    val = class_balanced_indices(train.y, SMALL["val_samples"], seed=0)
    assert tune["indices_sha256_16"] == indices_hash(class_balanced_indices(train.y, 200, seed=1, exclude=val))


def test_tuning_scores_are_what_the_float_logits_say():
    from resnet_deploy.metrics import tuning_score

    y = np.array([0, 1, 2, 3])
    float_logits = np.eye(4)[[0, 1, 2, 0]]  # 3 of 4 right
    got = tuning_score(np.eye(4)[[0, 1, 1, 3]], y, float_logits)  # 3 of 4 right, agrees on 2
    assert got == {"val_top1": 0.75, "val_drop_pp": 0.0, "val_agreement": 0.5}
    assert tuning_score(np.eye(4)[[0, 0, 0, 0]], y, float_logits)["val_drop_pp"] == pytest.approx(50.0)


@pytest.mark.parametrize("kwargs, match", [
    (dict(int8=True, int8_max_drop=-1), "not a top-1 drop"),
    (dict(int8=True, int8_max_drop=150.0), "not a top-1 drop"),
    (dict(int8_max_drop=0.1), "without an INT8 target"),
    (dict(accuracy_aware=True), "without an INT8 target"),
    (dict(analyze=True, fp16=True), "without an INT8 target"),
    (dict(int8=True, accuracy_aware=True, int8_io=True), "--int8-io cannot be combined"),
    (dict(int8=True, accuracy_aware=True, val_samples=3), "out of range"),
    (dict(int8=True, accuracy_aware=True, search_time=0), "out of range"),
])
def test_bad_accuracy_aware_options_are_clear_errors(kwargs, match):
    with pytest.raises(ExportError, match=match) as info:
        ExportOptions(**kwargs)
    assert "Expected:" in str(info.value)


def test_budget_defaults_and_switches():
    assert ExportOptions(int8=True).int8_aware is False and ExportOptions(int8=True).needs_tuning_split is False
    o = ExportOptions(int8=True, accuracy_aware=True)
    assert o.int8_aware and o.max_drop == 0.10
    o = ExportOptions(int8=True, int8_max_drop=0.3)
    assert o.int8_aware and o.max_drop == 0.3  # a budget alone turns it on
    assert ExportOptions(int8=True, analyze=True).needs_tuning_split


runner = CliRunner()


def _cli(*args):
    from resnet_deploy.cli import app

    return runner.invoke(app, ["export", *map(str, args)], env={"COLUMNS": "200"})


def test_cli_errors_before_any_work(tmp_path, outlier_path):
    r = _cli(outlier_path[0], "--int8", "--int8-max-drop", "-1", "--out", tmp_path)
    assert r.exit_code == 2 and "--int8-max-drop -1" in r.output and "Fix:" in r.output, r.output
    r = _cli(outlier_path[0], "--int8-max-drop", "0.1", "--out", tmp_path)
    assert r.exit_code == 2 and "without an INT8 target" in r.output and "add --int8" in r.output, r.output
    r = _cli(outlier_path[0], "--int8", "--accuracy-aware", "--search-calib-samples", "1k", "--out", tmp_path)
    assert r.exit_code == 2 and "not a list of counts" in r.output, r.output
    assert list(tmp_path.iterdir()) == []


def test_cli_analyze_prints_the_ranking_and_manual_float_layers_apply(tmp_path, outlier_path, small_npz_dir):
    r = _cli(outlier_path[0], "--formats", "tflite", "--int8", "--analyze", "--val-samples", "400", "--calib-samples",
             "100", "--analysis-samples", "50", "--validate-samples", "50", "--out", tmp_path / "a",
             "--data", small_npz_dir)  # the deprecated names of --tuning-samples and --parity-samples
    assert r.exit_code == 0, r.output
    assert "--val-samples is deprecated; use --tuning-samples" in r.output, r.output
    m = json.loads((tmp_path / "a" / "outlier_int8.tflite.json").read_text())
    assert m["int8_accuracy"]["validation"]["samples"] == 400 and m["validation"]["samples"] == 50
    assert "most sensitive layers" in r.output and OUTLIER in r.output
    m = json.loads((tmp_path / "a" / "outlier_int8.tflite.json").read_text())
    assert m["int8_accuracy"]["analysis"]["layers"][0]["layer"] == OUTLIER
    assert "search" not in m["int8_accuracy"]  # analysis only: the plain export's settings, nothing searched
    assert m["options"]["op_report"]["float_compute_ops"] == []
    # keeping that layer float by hand
    r = _cli(outlier_path[0], "--formats", "onnx", "--int8", "--int8-float-layers", OUTLIER, "--calib-samples", "100",
             "--parity-samples", "50", "--target", "x86-vnni", "--out", tmp_path / "b", "--data", small_npz_dir)
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "b" / "outlier_int8_u8s8.onnx.json").read_text())
    assert m["calibration"]["float_layers"] == [OUTLIER] and len(m["options"]["op_report"]["float_compute_ops"]) == 1
    for bad in ("no_such_layer", "stage1_block1_add"):  # unknown, or not a conv/dense layer: before any work
        r = _cli(outlier_path[0], "--formats", "onnx", "--int8", "--int8-float-layers", bad, "--out", tmp_path / "c",
                 "--data", small_npz_dir)
        assert r.exit_code == 2 and bad in r.output and "stage1_block1_conv1" in r.output, r.output
        assert not (tmp_path / "c").exists()


class _ScriptedTrier:
    """Stands in for the search's trier (``int8_search.search_and_fall_back``): each setting and set of float
    layers has a scripted (top-1, agreement, mean KL); its per-image KL is that mean plus its own noise (sd 0.005
    over 1,000 images, so a paired difference's standard error is about 0.0002)."""

    def __init__(self, scores: dict, analysis: list[dict]):
        self.scores, self.analysis, self.rows, self.kls = scores, analysis, [], []
        self.train = np.zeros(5000)

    def run(self, setting, float_layers=(), phase="search"):
        from resnet_deploy.records import Try

        key = (setting.calib_samples, setting.method if setting.activations == "int8" else "16x8", tuple(float_layers))
        top1, agree, kl = self.scores.get(key, (0.80, 0.90, 0.1))
        noise = np.random.default_rng(len(self.rows)).normal(0, 0.005, 1000)
        row = Try(phase, setting.calib_samples, setting.method, setting.per_channel, "0" * 16, list(float_layers),
                  top1, round(100 * (0.9 - top1), 4), agree, 0.0, 0.0, file=f"f{len(self.rows)}",
                  activations=setting.activations, val_kl=kl)
        self.rows.append(row)
        self.kls.append(kl + noise)
        return row

    def analyze(self, setting, file, n):
        return self.analysis


def _fallback(monkeypatch, scores, analysis, **kw):
    from resnet_deploy.config import Format
    from resnet_deploy.converters import int8_search

    monkeypatch.setattr(int8_search, "latency_ms", lambda path, pixels, spec: 2.0 if path == "f0" else 3.0)
    x = np.zeros((10, 32, 32, 3), np.uint8)
    tuning = int8_search.TuningSplit(x, x.astype(np.float32), np.zeros(10, int), np.arange(10),
                                     np.eye(10)[[0] * 9 + [1]], {})
    kw.setdefault("search_calib_samples", ())
    opts = ExportOptions(int8=True, accuracy_aware=True, **kw)
    trier = _ScriptedTrier(scores, analysis)
    lines = []
    best, rec = int8_search.search_and_fall_back(trier, Format.TFLITE, opts, tuning, __import__("time").perf_counter(),
                                                 lines.append)
    assert best.float_layers == rec.fallback.float_layers  # the file kept is the one the record names
    trier.lines = lines
    return rec.to_json(), trier


ANALYSIS = [{"layer": "a", "op": "CONV_2D"}, {"layer": "add", "op": "ADD"}, {"layer": "c", "op": "CONV_2D"},
            {"layer": "d", "op": "FULLY_CONNECTED"}]


def test_fallback_keeps_only_layers_that_lower_kl_beyond_noise_and_says_when_the_budget_is_not_met(monkeypatch):
    s = {(300, "minmax", ()): (0.88, 0.95, 0.050), (300, "minmax", ("a",)): (0.885, 0.96, 0.030),
         (300, "minmax", ("a", "c")): (0.89, 0.97, 0.0299),  # higher top-1 and agreement, KL gain within noise
         (300, "minmax", ("a", "d")): (0.887, 0.955, 0.020)}
    rec, trier = _fallback(monkeypatch, s, ANALYSIS, int8_max_drop=0.1)
    # the ADD row is never tried (no float twin); c did not lower KL beyond noise and was dropped; d was kept
    fallback = [r for r in trier.rows if r.phase == "fallback"]
    assert [r.float_layers for r in fallback] == [["a"], ["a", "c"], ["a", "d"]]
    assert rec["fallback"]["float_layers"] == ["a", "d"] and rec["fallback"]["tries"] == 3
    assert rec["result"]["met_budget"] is False and "NO INT8 tflite file met the budget" in rec["result"]["note"]
    assert rec["result"]["val_drop_pp"] == pytest.approx(1.3)  # the best kept, though over budget
    assert rec["fallback"]["latency"]["ratio"] == pytest.approx(1.5)
    # every comparison carries its paired interval, computed here another way
    i_c = trier.rows.index(fallback[1])
    i_a = trier.rows.index(fallback[0])
    d = trier.kls[i_a] - trier.kls[i_c]
    half = 1.959964 * d.std(ddof=1) / np.sqrt(len(d))
    assert fallback[1].kl_gain == pytest.approx([d.mean(), d.mean() - half, d.mean() + half], abs=1e-6)
    assert fallback[1].kl_gain[1] < 0 < fallback[1].kl_gain[2]
    assert any("within noise" in line and "[" in line for line in trier.lines)


def test_search_keeps_the_plain_export_unless_a_candidate_is_better_beyond_noise(monkeypatch):
    s = {(300, "minmax", ()): (0.899, 0.99, 0.0200), (1000, "minmax", ()): (0.8995, 0.995, 0.0199),
         (300, "16x8", ()): (0.898, 0.99, 0.0201)}
    rec, trier = _fallback(monkeypatch, s, ANALYSIS, int8_max_drop=0.5, search_calib_samples=(1000,))
    assert len(trier.rows) == 3 and rec["search"]["winner"]["calib_samples"] == 300  # 1000's gain is noise
    assert [r.activations for r in trier.rows] == ["int8", "int8", "int16"]
    s[(300, "16x8", ())] = (0.899, 0.99, 0.0150)  # 16x8 much closer to the float model
    rec, trier = _fallback(monkeypatch, s, ANALYSIS, int8_max_drop=0.5, search_calib_samples=(1000,))
    assert rec["search"]["winner"]["activations"] == "int16" and rec["result"]["calibration"]["activations"] == "int16"


def test_fallback_stops_at_the_budget_and_at_its_limits(monkeypatch):
    s = {(300, "minmax", ()): (0.88, 0.95, 0.05), (300, "minmax", ("a",)): (0.8995, 0.99, 0.01)}
    rec, trier = _fallback(monkeypatch, s, ANALYSIS, int8_max_drop=0.1)
    assert len(trier.rows) == 3 and rec["result"]["met_budget"] is True and rec["fallback"]["float_layers"] == ["a"]
    rec, trier = _fallback(monkeypatch, s, ANALYSIS, int8_max_drop=0.1, int8_max_float_layers=0)
    assert len(trier.rows) == 2 and rec["result"]["met_budget"] is False and rec["fallback"]["latency"] is None
    s[(300, "minmax", ())] = (0.9, 0.99, 0.05)  # within the budget from the start: nothing stays float
    rec, trier = _fallback(monkeypatch, s, ANALYSIS, int8_max_drop=0.0)
    assert len(trier.rows) == 2 and rec["fallback"]["needed"] is False and rec["result"]["met_budget"] is True
    s[(300, "minmax", ())] = (0.88, 0.95, 0.05)
    rec, trier = _fallback(monkeypatch, s, ANALYSIS, int8_max_drop=0.1, search_time=1e-9)
    assert len(trier.rows) == 1 and "time budget" in rec["search"]["stopped"]  # the first try always runs


def test_kl_and_paired_interval_are_what_a_hand_computation_says():
    from resnet_deploy.metrics import kl_per_image, paired_mean_interval

    ref = np.array([[2.0, 0.0, -1.0], [0.5, 0.5, 0.0]])
    art = np.array([[1.5, 0.2, -1.0], [0.0, 1.0, 0.0]])
    want = []
    for r, a in zip(ref, art):
        p, q = np.exp(r) / np.exp(r).sum(), np.exp(a) / np.exp(a).sum()
        want.append(sum(pi * np.log(pi / qi) for pi, qi in zip(p, q)))
    assert kl_per_image(art, ref) == pytest.approx(want, rel=1e-9)
    probs = np.exp(ref) / np.exp(ref).sum(1, keepdims=True)  # a softmax model: its outputs are distributions
    assert kl_per_image(np.exp(art) / np.exp(art).sum(1, keepdims=True), probs) == pytest.approx(want, rel=1e-6)
    import statistics

    d = [0.1, 0.3, -0.2, 0.4]
    m, lo, hi = paired_mean_interval(np.array(d))
    half = 1.959964 * statistics.stdev(d) / 2
    assert (m, lo, hi) == pytest.approx((0.15, 0.15 - half, 0.15 + half), abs=1e-6)
