"""Issue #11: every figure bench prints holds up against an independent measurement.

- a sidecar-less model that expects standardised (or 0..1) input, exported with --mean/--std (or
  --input-range 0-1): bench's float reference accuracy equals an evaluation written here with plain
  Keras and numpy, without the project's runners;
- stale pairs and files under another file's manifest are refused;
- speed-ups from interleaved rounds stay within 10 % of the truth while the machine drifts (a fake
  worker on a fake clock: no wall-clock figure is asserted);
- a cached float pass is reused (and is what the report shows);
- a softmax model is detected and labelled.
"""

from __future__ import annotations

import json

import shutil
from pathlib import Path

import numpy as np
import pytest

from resnet_deploy.bench.options import BenchOptions
from resnet_deploy.bench.run import run_bench
from resnet_deploy.errors import BenchError
from tests.conftest import copy_with_sidecar

QUICK = dict(warmup=1, runs=5, max_time_s=0.3, large_batch=4, bootstrap=200, min_rounds=3)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test gets its own cache folder: no test reads what another (or the user) stored."""
    monkeypatch.setenv("RESNET_DEPLOY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def test_split(cifar):
    return cifar.test.take(200)


def _foreign_model(train, to_input, softmax: bool = False, seed: int = 0):
    """A small CNN of no project family (no normalisation layer: it expects ``to_input(pixels)``),
    fitted for one short epoch so that its accuracy is well above chance."""
    import keras

    keras.utils.set_random_seed(seed)
    inp = keras.Input((32, 32, 3))
    x = keras.layers.Conv2D(8, 3, strides=2, activation="relu")(inp)
    x = keras.layers.Conv2D(16, 3, strides=2, activation="relu")(x)
    x = keras.layers.GlobalAveragePooling2D()(x)
    out = keras.layers.Dense(10, activation="softmax" if softmax else None)(x)
    model = keras.Model(inp, out)
    model.compile("adam", keras.losses.SparseCategoricalCrossentropy(from_logits=not softmax))
    model.fit(to_input(train.x[:1000]), train.y[:1000], epochs=2, batch_size=64, verbose=0)
    return model


def _standardise(pixels):
    from resnet_deploy.data.constants import CIFAR10_MEAN, CIFAR10_STD

    return (pixels.astype(np.float32) - np.float32(CIFAR10_MEAN)) / np.float32(CIFAR10_STD)


def _unit(pixels):
    return pixels.astype(np.float32) / np.float32(255)


def _plain_predictions(model, x) -> np.ndarray:
    """Independent of the project: Keras' own predict on inputs prepared here with numpy."""
    return np.argmax(model.predict(x, batch_size=100, verbose=0), 1)


@pytest.mark.parametrize("flags,to_input", [((None, "125.307,122.961,113.8575", "62.9932,62.0887,66.7048"), _standardise),
                                            (("0-1", None, None), _unit)], ids=["mean-std", "input-range-0-1"])
def test_sidecar_less_model_gets_the_preprocessing_declared_at_export(flags, to_input, tmp_path, cifar, small_npz_dir,
                                                                      test_split):
    from resnet_deploy.converters.command import parse_preprocessing
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model

    model = _foreign_model(cifar.train, to_input)
    path = tmp_path / "foreign.keras"
    model.save(path)  # no metadata sidecar: nothing but the export options says what it expects
    pred = _plain_predictions(model, to_input(test_split.x))
    raw = _plain_predictions(model, test_split.x.astype(np.float32))
    assert np.mean(pred == raw) < 0.9  # the test can fail: on raw pixels the model predicts otherwise
    (_, int8) = export_model(path, ExportOptions(formats=("tflite",), int8=True, calib_samples=50,
                                                 validate_samples=64, preprocessing=parse_preprocessing(*flags)),
                             data=small_npz_dir)
    report = run_bench([int8.path], BenchOptions(isolate=False, threads=1, latency=False, **QUICK), data=test_split)
    assert report.ok, report.to_dict()["errors"]
    ref, q = report.result("foreign.keras"), report.result("foreign_int8.tflite")
    assert ref.accuracy["top1"] == pytest.approx(float(np.mean(pred == test_split.y)), abs=1e-9)
    assert np.mean(ref.logits.argmax(1) == pred) >= 0.995
    assert "manifest" in report.reference["input_contract"]
    assert q.vs_float["agreement"] > 0.85  # the INT8 file tracks the float model it is compared with
    assert abs(q.vs_float["change_pp"]) < 10


# Stale pairs and files under another's manifest ---------------------------------------------------
@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory, tiny_model_path, small_npz_dir) -> dict[str, Path]:
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model

    d = tmp_path_factory.mktemp("trust_export")
    model = copy_with_sidecar(tiny_model_path, d / "model.keras")
    arts = export_model(model, ExportOptions(formats=("tflite",), int8=True, calib_samples=50, validate_samples=64),
                        data=small_npz_dir)
    return {"model": model, **{a.precision: a.path for a in arts}}


def _copy_run(src: dict[str, Path], dest: Path) -> dict[str, Path]:
    dest.mkdir()
    out = {}
    for k, p in src.items():
        shutil.copy(p, dest / p.name)
        shutil.copy(str(p) + ".json", str(dest / p.name) + ".json")
        out[k] = dest / p.name
    return out


def test_an_artifact_from_another_float_model_is_refused_unless_allowed(tiny_export, tmp_path, test_split):
    from resnet_deploy.fileio import sha256_file
    from resnet_deploy.models.io import save_model
    from tests.conftest import tiny_model

    run = _copy_run(tiny_export, tmp_path / "run")
    old_sha = sha256_file(run["model"])
    save_model(tiny_model(seed=7), run["model"], force=True)  # retrained since the export: another sha256
    assert sha256_file(run["model"]) != old_sha
    opts = dict(isolate=False, threads=1, latency=False, **QUICK)
    report = run_bench([run["int8"]], BenchOptions(max_drop_pp=1.0, **opts), data=test_split)
    err = report.result("model_int8.tflite").error
    assert err is not None and old_sha[:16] in err["what"] and "--allow-stale" in err["fix"] and err["expected"]
    assert report.result("model.keras").ok and not report.gates  # the stale file is an error, not a gate result
    allowed = run_bench([run["int8"]], BenchOptions(max_drop_pp=1.0, allow_stale=True, **opts), data=test_split)
    q = allowed.result("model_int8.tflite")
    assert q.ok and q.stale and any("STALE" in n for n in q.notes)
    assert allowed.gates == [] and {g["gate"] for g in allowed.not_gated} == {"max-drop"}
    assert "stale" in allowed.not_gated[0]["reason"]


def test_a_file_copied_over_another_name_is_refused_and_baselines_share_the_source(tiny_export, tmp_path,
                                                                                  test_split):
    from resnet_deploy.bench.selection import find_baseline, identify

    run = _copy_run(tiny_export, tmp_path / "run")
    shutil.copy(run["int8"], run["fp32"])  # the INT8 bytes under the FP32 name, beside the FP32 manifest
    opts = BenchOptions(reference=run["model"], isolate=False, threads=1, latency=False, **QUICK)
    report = run_bench([run["fp32"], run["int8"]], opts, data=test_split)  # beside a good file: its row's error
    err = report.result("model_fp32.tflite").error
    assert err is not None and "manifest" in err["what"] and "sha256" in err["what"] and err["fix"]
    assert report.result("model_int8.tflite").error is None
    with pytest.raises(BenchError) as info:  # alone: nothing can be benched, refused before any work
        run_bench([run["fp32"]], opts, data=test_split)
    assert "manifest" in info.value.what and "sha256" in info.value.what
    # a quantized file's FP32 baseline must come from the same float model
    good = _copy_run(tiny_export, tmp_path / "good")
    q, base = identify(good["int8"], "artifact"), identify(good["fp32"], "artifact")
    assert find_baseline(q, [q, base]) is base
    base.manifest.source_model["sha256"] = "0" * 64  # as if exported from another model
    assert find_baseline(q, [q, base]) is None


def test_artifacts_that_declare_different_preprocessing_are_an_error_naming_them(tiny_export, tmp_path):
    import json

    from resnet_deploy.bench.contract import resolve_contract
    from resnet_deploy.bench.selection import identify

    run = _copy_run(tiny_export, tmp_path / "run")
    side = Path(str(run["int8"]) + ".json")
    m = json.loads(side.read_text())
    m["preprocessing"] = {"scale": 1 / 255, "mean": None, "std": None}
    side.write_text(json.dumps(m))
    entries = [identify(run["fp32"], "artifact"), identify(run["int8"], "artifact")]
    for e in entries:
        e.label = e.path.name
    with pytest.raises(BenchError) as info:
        resolve_contract(entries, run["model"])
    assert "model_fp32.tflite" in info.value.what and "model_int8.tflite" in info.value.what
    assert info.value.fix
    # alone, the artifact's declaration is the reference's contract
    assert resolve_contract(entries[1:], run["model"]).preprocessing.scale == pytest.approx(1 / 255)


# Interleaved rounds under drift -------------------------------------------------------------------
class FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class DriftingWorker:
    """A file whose call costs ``cost_s`` times the machine's slowness at that (fake) moment: the machine
    slows down threefold over the run, with a burst of extra load in the middle."""

    rss_scope = "fake"

    def __init__(self, clock: FakeClock, cost_s: float, horizon_s: float):
        self.clock, self.cost_s, self.horizon_s = clock, cost_s, horizon_s

    def slowness(self, t: float) -> float:
        burst = 1.8 if 0.4 * self.horizon_s < t < 0.5 * self.horizon_s else 1.0
        return (1 + 2 * min(t, self.horizon_s) / self.horizon_s) * burst

    def call(self, request, *args):
        if request == "memory":
            return {}
        assert request == "series"
        _, n = args
        times = np.empty(n)
        for i in range(n):
            times[i] = self.cost_s * self.slowness(self.clock.now)
            self.clock.now += times[i]
        return times


def _fake_results():
    from resnet_deploy.bench.results import ArtifactResult

    return [ArtifactResult(label="m_fp32.tflite", path="m_fp32.tflite", role="artifact", format="tflite",
                           precision="fp32"),
            ArtifactResult(label="m_int8.tflite", path="m_int8.tflite", role="artifact", format="tflite",
                           precision="int8")]


def test_speedup_from_interleaved_rounds_stays_within_10_percent_while_the_machine_drifts():
    from resnet_deploy.bench import run as run_mod
    from resnet_deploy.bench.compare import ratios

    opts = BenchOptions(threads=1, warmup=5, runs=50, max_time_s=10.0, large_batch=1, min_rounds=6)
    horizon = opts.max_time_s * 2  # the whole timing budget of two series
    true = 4.0
    clock = FakeClock()
    workers = {0: DriftingWorker(clock, 0.004, horizon), 1: DriftingWorker(clock, 0.004 / true, horizon)}
    results = _fake_results()
    run_mod.time_all(workers, results, opts, lambda msg: None, clock=clock)
    fp32, int8 = results
    got = ratios(int8, fp32, opts)
    speedup, (lo, hi) = got["speedup"]["1"], got["speedup_interval"]["1"]
    assert abs(speedup / true - 1) < 0.10, got["speedup_detail"]
    assert lo <= true <= hi and int8.latency["1"]["rounds"] >= opts.min_rounds
    # independently, from the raw rounds: the median of the per-round ratios of medians
    per_round = [np.median(b) / np.median(a) for a, b in zip(int8.round_times["1"], fp32.round_times["1"])]
    assert speedup == pytest.approx(float(np.median(per_round)))
    # the same drift fools one-series-after-the-other timing (so this test can fail): FP32's 10 s, then INT8's
    clock2 = FakeClock()
    a, b = DriftingWorker(clock2, 0.004, horizon), DriftingWorker(clock2, 0.004 / true, horizon)
    seq_a = a.call("series", 1, int(opts.max_time_s / 0.004 / 2))
    seq_b = b.call("series", 1, int(opts.max_time_s / (0.004 / true) / 2))
    assert abs(np.median(seq_a) / np.median(seq_b) / true - 1) > 0.10


def test_median_interval_order_statistics():
    from resnet_deploy.bench.rounds import median_interval

    est, lo, hi, cov = median_interval([5, 1, 4, 2, 6, 3])
    assert (est, lo, hi) == (3.5, 1, 6) and cov == pytest.approx(1 - 2 / 64)
    est, lo, hi, cov = median_interval(range(1, 21))  # n = 20: ranks 6 and 15, coverage 95.9 %
    assert (lo, hi) == (6, 15) and cov == pytest.approx(0.9586, abs=1e-4)
    assert median_interval([1.0, 2.0])[3] == 0.5  # too few rounds: the range, and its true coverage


# The reference cache ------------------------------------------------------------------------------
def test_a_cache_hit_skips_the_float_pass_and_no_cache_bypasses_it(tiny_export, tmp_path, test_split):
    from resnet_deploy.bench import reference_cache

    opts = dict(isolate=False, threads=1, latency=False, cache_dir=tmp_path / "c", **QUICK)
    first = run_bench([tiny_export["int8"]], BenchOptions(**opts), data=test_split)
    ref = first.result("model.keras")
    assert "accuracy_pass_s" in ref.timing
    (entry,) = (tmp_path / "c" / "reference-logits").glob("*.npz")
    np.testing.assert_array_equal(np.load(entry)["logits"], ref.logits)
    second = run_bench([tiny_export["int8"]], BenchOptions(**opts), data=test_split)
    ref2 = second.result("model.keras")
    assert "accuracy_pass_s" not in ref2.timing and any("from the cache" in n for n in ref2.notes)
    np.testing.assert_array_equal(ref2.logits, ref.logits)
    # Cached logits that are right on every image, under the right key: a cache that believed them would report
    # 100 %. A hit re-runs the float model on random cached images, so they are discarded, said, and recomputed.
    perfect = np.eye(10, dtype=np.float32)[test_split.y]
    reference_cache.store(entry.stem, perfect, tmp_path / "c")
    planted = run_bench([tiny_export["int8"]], BenchOptions(**opts), data=test_split)
    ref3 = planted.result("model.keras")
    assert "accuracy_pass_s" in ref3.timing and ref3.accuracy["top1"] == pytest.approx(ref.accuracy["top1"])
    assert "were discarded" in json.dumps(planted.to_dict(), default=str)
    np.testing.assert_array_equal(np.load(entry)["logits"], ref.logits)  # the honest logits are cached again
    bypass = run_bench([tiny_export["int8"]], BenchOptions(**{**opts, "cache": False}), data=test_split)
    assert bypass.result("model.keras").accuracy["top1"] == pytest.approx(ref.accuracy["top1"])
    # another image count is another key: no hit
    fewer = run_bench([tiny_export["int8"]], BenchOptions(**{**opts, "limit": 100}), data=test_split)
    assert "accuracy_pass_s" in fewer.result("model.keras").timing


# Softmax models -----------------------------------------------------------------------------------
def test_output_kind_known_answers():
    from resnet_deploy.metrics import output_kind

    p = np.array([[0.2, 0.8], [1.0, 0.0]])
    assert output_kind(p) == "probabilities"
    assert output_kind(np.array([[2.0, -1.0], [0.1, 0.3]])) == "logits"
    assert output_kind(np.array([[0.2, 0.3], [0.5, 0.5]])) == "logits"  # in range, but a row sums to 0.5
    assert output_kind(None) == "logits"


def test_a_softmax_model_is_labelled_in_export_validation_and_bench(tmp_path, cifar, small_npz_dir, test_split):
    from resnet_deploy.bench.report import PROBABILITY_HEADER, accuracy_columns
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model

    model = _foreign_model(cifar.train, lambda px: px.astype(np.float32), softmax=True)
    path = tmp_path / "soft.keras"
    model.save(path)
    (fp32,) = export_model(path, ExportOptions(formats=("tflite",), validate_samples=64), data=small_npz_dir)
    assert fp32.manifest.validation["output"] == "probabilities"
    assert "max_abs_prob_diff" in fp32.manifest.validation
    report = run_bench([fp32.path], BenchOptions(isolate=False, threads=1, latency=False, **QUICK), data=test_split)
    assert report.reference["output"] == "probabilities"
    assert accuracy_columns(report)[-1] == PROBABILITY_HEADER
    assert report.result("soft_fp32.tflite").vs_float["logit_error"]["output"] == "probabilities"
