"""`resnet-deploy bench` end to end on a tiny exported ResNet: real converters, real runtimes, the 300 test
images of the synthetic CIFAR-10 set (conftest); no real data needed. Every figure a test checks is
recomputed here from the raw measurements (numpy on logits and round times, /proc for memory)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_deploy.bench.options import BenchOptions
from resnet_deploy.bench.run import run_bench
from resnet_deploy.bench.selection import NO_MANIFEST_DEFAULTS
from resnet_deploy.cli import app
from tests.conftest import copy_with_sidecar

# Quick timing settings: these tests check what is measured and reported, not how fast anything is.
QUICK = dict(warmup=1, runs=5, max_time_s=0.5, large_batch=8, bootstrap=200)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """The float logits cache of each test in its own folder, never the user's."""
    monkeypatch.setenv("RESNET_DEPLOY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="session")
def trained_tiny_path(tmp_path_factory, synthetic_cifar) -> Path:
    """The tiny ResNet trained for two epochs on the synthetic set (about 90 % on its test split). A model
    with random weights gives nearly every image the same class, and then agreement with the float model
    and accuracy cannot tell a broken artifact from a good one."""
    import keras

    from resnet_deploy.models.io import base_metadata, save_model
    from tests.conftest import tiny_model

    model = tiny_model()
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(synthetic_cifar.train.x.astype(np.float32), synthetic_cifar.train.y, epochs=2, batch_size=32, verbose=0)
    path = tmp_path_factory.mktemp("bench_model") / "model.keras"
    save_model(model, path, base_metadata("resnet8", width=0.25))
    return path


@pytest.fixture(scope="session")
def exported(tmp_path_factory, trained_tiny_path, small_npz_dir) -> dict[str, Path]:
    """One tiny export through the real pipeline: TFLite FP32 and INT8 (int8 I/O), ONNX FP32 and INT8."""
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model

    d = tmp_path_factory.mktemp("bench_export")
    model = copy_with_sidecar(trained_tiny_path, d / "model.keras")
    arts = export_model(model, ExportOptions(int8=True, int8_io=True, calib_samples=50, validate_samples=64),
                        data=small_npz_dir)
    out = {f"{a.format}_{a.precision}": a.path for a in arts}
    out["model"] = model
    return out


@pytest.fixture(scope="session")
def test_split(synthetic_cifar):
    return synthetic_cifar.test.take(300)


def _vm_hwm_bytes() -> int:
    """This process's peak resident memory, read from /proc here (not through bench.latency)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    pytest.skip("no /proc/self/status")


def _speedup(base_rounds, rounds) -> float:
    """The documented speed-up: the median over interleaved rounds of base median time / artifact median time."""
    return float(np.median([np.median(b) / np.median(a) for a, b in zip(rounds, base_rounds)]))


def test_quantized_artifact_alone_finds_its_reference_and_fp32_baseline(exported, test_split):
    report = run_bench([exported["tflite_int8"]], BenchOptions(isolate=False, threads=1, **QUICK), data=test_split)
    assert report.ok, report.to_dict()["errors"]
    roles = {r.label: r.role for r in report.results}
    assert roles == {"model.keras": "reference", "model_int8.tflite": "artifact", "model_fp32.tflite": "baseline"}
    assert "manifest of model_int8.tflite" in report.reference["notes"][0]
    ref, q = report.result("model.keras"), report.result("model_int8.tflite")
    # Int8 I/O handled by the runtime: the artifact is fed the same images and tracks the float model.
    assert q.runtime["input_dtype"] == "int8" and q.precision == "int8"
    assert q.vs_float["agreement"] > 0.8
    assert q.vs_float["logit_error"]["relative_mean_abs"] < 0.2
    np.testing.assert_allclose(q.accuracy["top1"], acc_of(q.logits, test_split.y))
    np.testing.assert_allclose(ref.accuracy["top1"], acc_of(ref.logits, test_split.y))
    # the float model predicts every class and mostly right, so agreement and accuracy can fail
    assert len(np.unique(ref.logits.argmax(1))) == 10 and ref.accuracy["top1"] > 0.6
    assert q.vs_float["agreement"] == pytest.approx(float(np.mean(q.logits.argmax(1) == ref.logits.argmax(1))))
    assert q.vs_float["change_pp"] == pytest.approx(100 * (q.accuracy["top1"] - ref.accuracy["top1"]))
    confusion = np.zeros((10, 10), int)
    np.add.at(confusion, (test_split.y, q.logits.argmax(1)), 1)  # rows: true class (the usual convention)
    np.testing.assert_array_equal(q.accuracy["confusion_matrix"], confusion)
    # Fair ratios: against the TFLite FP32 artifact of the same run, and the Keras figure beside it; each
    # speed-up recomputed from the round times (a swapped ratio, or one taken against the wrong file, fails)
    base = report.result("model_fp32.tflite")
    assert q.vs_baseline["label"] == "model_fp32.tflite" and q.vs_float["label"] == "model.keras"
    assert set(q.round_times) == {"1", "8"}
    for key in ("1", "8"):
        assert len(q.round_times[key]) == len(base.round_times[key]) == len(ref.round_times[key]) >= 3
        assert q.vs_baseline["speedup"][key] == pytest.approx(_speedup(base.round_times[key], q.round_times[key]))
        assert q.vs_float["speedup"][key] == pytest.approx(_speedup(ref.round_times[key], q.round_times[key]))
        times_ms = 1e3 * np.concatenate(q.round_times[key])
        stats = q.latency[key]
        assert stats["runs"] == len(times_ms) and stats["batch"] == int(key)
        assert stats["p50_ms"] == pytest.approx(np.median(times_ms)) and stats["min_ms"] == pytest.approx(times_ms.min())
        assert stats["min_ms"] <= stats["p50_ms"] <= stats["p90_ms"] <= stats["p99_ms"] <= stats["max_ms"]
    sizes = {k: exported[k].stat().st_size for k in ("tflite_fp32", "tflite_int8")}
    assert q.vs_baseline["size_reduction"] == pytest.approx(sizes["tflite_fp32"] / sizes["tflite_int8"])
    assert q.vs_baseline["size_reduction"] > 1.3  # int8 weights
    # the interval of the batch-1 speed-up is made of per-round ratios around the median
    per_round = [np.median(b) / np.median(a) for a, b in zip(q.round_times["1"], base.round_times["1"])]
    lo, hi = q.vs_baseline["speedup_interval"]["1"]
    assert min(per_round) <= lo <= q.vs_baseline["speedup"]["1"] <= hi <= max(per_round)
    # the baseline the tool added serves the ratio only: no accuracy pass, its export parity quoted
    assert base.accuracy is None and "accuracy_pass_s" not in base.timing
    assert any("at export it agreed" in n for n in base.notes)
    t = q.timing
    assert t["first_inference_s"] == pytest.approx(t["load_s"] + t["first_run_s"])  # load + first call
    # memory in bytes, of this process (in-process run): at most its high-water mark, read here afterwards,
    # and at least what it held before the artifact loaded; this process holds TensorFlow (> 100 MiB),
    # so a figure in KiB, or one of another process, fails
    mem = q.memory
    assert 100 * 2**20 < mem["rss_before_load_bytes"] <= mem["peak_rss_bytes"] <= _vm_hwm_bytes()
    assert "shared" in mem["rss_scope"]


def acc_of(logits, y):
    return float(np.mean(np.argmax(logits, 1) == y))


def test_missing_manifest_benches_with_stated_defaults(exported, test_split, tmp_path):
    bare = tmp_path / "bare.onnx"
    shutil.copy(exported["onnx_fp32"], bare)  # no bare.onnx.json
    report = run_bench([bare], BenchOptions(isolate=False, threads=1, latency=False, **QUICK), data=test_split)
    r = report.result("bare.onnx")
    assert r.ok and not r.has_manifest and r.precision == "unknown"
    assert NO_MANIFEST_DEFAULTS in r.notes
    assert r.accuracy["images"] == 300 and r.vs_float is None  # nothing to compare with
    assert report.reference["label"] is None and "no float reference" in report.reference["notes"][0]
    with_ref = run_bench([bare], BenchOptions(reference=exported["model"], isolate=False, threads=1, latency=False,
                                              **QUICK), data=test_split)
    assert with_ref.result("bare.onnx").vs_float["agreement"] > 0.99  # FP32 ONNX = the float model


def test_corrupt_and_wrong_shape_artifacts_fail_alone_in_child_processes(exported, test_split, tmp_path):
    import tensorflow as tf

    corrupt = tmp_path / "corrupt.tflite"
    corrupt.write_bytes(exported["tflite_fp32"].read_bytes()[:1000])  # truncated flatbuffer
    mnist = tf.keras.Sequential([tf.keras.Input((28, 28, 1)), tf.keras.layers.Flatten(), tf.keras.layers.Dense(10)])
    wrong = tmp_path / "mnist.tflite"
    wrong.write_bytes(tf.lite.TFLiteConverter.from_keras_model(mnist).convert())
    report = run_bench([corrupt, wrong, exported["onnx_int8"], tmp_path / "missing.onnx"],
                       BenchOptions(reference=exported["model"], threads=1, **QUICK), data=test_split)
    errs = {r.label: r.error["message"] for r in report.errors}
    assert set(errs) == {"corrupt.tflite", "mnist.tflite", "missing.onnx"}
    assert "cannot load" in errs["corrupt.tflite"]
    assert "28, 28, 1)" in errs["mnist.tflite"] and "(N, 32, 32, 3)" in errs["mnist.tflite"]
    assert "does not exist" in errs["missing.onnx"]
    good = report.result(exported["onnx_int8"].name)
    assert good.ok and good.vs_float["agreement"] > 0.8 and good.latency["1"]["runs"] >= 5
    assert good.memory["rss_scope"].startswith("child process")
    mem = good.memory  # the artifact's own memory, apart from the child's harness (imports, test images)
    assert 0 < mem["artifact_rss_bytes"] <= mem["peak_rss_bytes"] - mem["rss_before_load_bytes"] + 2**20
    ref_mem = report.result("model.keras").memory["artifact_rss_bytes"]
    assert good.vs_float["artifact_rss_ratio"] == (pytest.approx(mem["artifact_rss_bytes"] / ref_mem) if ref_mem
                                                   else None)
    # the ONNX FP32 sibling was found next to it and measured as its baseline
    assert good.vs_baseline["label"] == exported["onnx_fp32"].name
    assert not report.ok


def test_child_that_dies_without_a_result_is_reported_as_a_crash():
    import multiprocessing as mp
    import os

    from resnet_deploy.bench.child import _receive
    from resnet_deploy.bench.results import crash_error as _crash_error

    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=os._exit, args=(3,))
    proc.start()
    child.close()
    assert _receive(parent, proc) is None
    proc.join()
    assert "exit code 3" in _crash_error(Path("x.tflite"), proc.exitcode)["message"]
    assert "SIGSEGV" in _crash_error(Path("x.tflite"), -11)["message"]


def test_cli_writes_table_json_markdown_plot_and_fails_gates(exported, small_npz_dir, tmp_path):
    out = {k: tmp_path / f"bench.{k}" for k in ("json", "md", "png")}
    args = ["bench", str(exported["tflite_int8"]), str(exported["onnx_int8"]), "--data", str(small_npz_dir),
            "--limit", "200", "--threads", "1", "--runs", "5", "--warmup", "1", "--max-time", "0.5",
            "--large-batch", "8", "--in-process", "--json-output", str(out["json"]), "--markdown", str(out["md"]),
            "--plot", str(out["png"]), "--max-drop", "50", "--min-speedup", "1000"]
    res = CliRunner().invoke(app, args, terminal_width=160)
    assert res.exit_code == 1, res.output
    assert "min-speedup" in res.output and exported["tflite_int8"].name in res.output and "1000x" in res.output
    assert "Latency and cost" in res.output and f"{exported['onnx_fp32'].name} (base)" in res.output
    doc = json.loads(out["json"].read_text())
    assert doc["schema_version"] == 2 and doc["data"]["images"] == 200 and doc["ok"] is False
    assert {g["gate"] for g in doc["gates"] if not g["passed"]} == {"min-speedup"}
    assert {r["role"] for r in doc["results"]} == {"reference", "artifact", "baseline"}
    assert doc["machine"]["cpu"] and "onnxruntime" in doc["libraries"]
    assert f"| {exported['tflite_int8'].name} |" in out["md"].read_text()
    assert out["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # Existing reports are refused before any measuring, and nothing is overwritten.
    before = out["json"].read_bytes()
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and "already exists" in res.output and out["json"].read_bytes() == before


def test_cli_json_prints_the_report_on_stdout_and_the_old_file_form_still_writes(exported, small_npz_dir, tmp_path):
    """``--json`` means what it means in ``predict``: one JSON document on stdout (tables on stderr); the form of
    earlier versions, ``--json PATH.json``, writes the file as before and says it is deprecated."""
    args = ["bench", str(exported["tflite_int8"]), "--data", str(small_npz_dir), "--limit", "50", "--no-latency",
            "--in-process", "--no-cache"]
    res = CliRunner().invoke(app, [*args, "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout)
    assert doc["schema_version"] == 2 and doc["data"]["images"] == 50 and doc["ok"] is True
    assert "Accuracy on 50" in res.stderr and "Accuracy on 50" not in res.stdout
    old = CliRunner().invoke(app, [*args, "--json", str(tmp_path / "r.json")])
    assert old.exit_code == 0, old.output
    assert "--json-output" in old.stderr and "deprecated" in old.stderr
    assert json.loads((tmp_path / "r.json").read_text())["data"]["images"] == 50
    assert "Accuracy on 50" in old.stdout  # as before: the tables on stdout, the JSON in the file


MEASUREMENT_FIELDS = ("runtime", "timing", "latency", "memory", "accuracy", "vs_float", "vs_baseline")


def _finishes_within(seconds, fn):
    """fn() run in a daemon thread: a hang fails the test instead of blocking the suite."""
    import threading

    box = {}

    def target():
        try:
            box["value"] = fn()
        except BaseException as exc:  # raised again in the test's thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"still running after {seconds} s"
    if "error" in box:
        raise box["error"]
    return box["value"]


def test_bad_manifests_and_unreadable_files_fail_alone(exported, test_split, tmp_path, monkeypatch):
    """Each way a manifest or a file can be bad is that file's error; the other files still get results."""
    import resnet_deploy.artifact as artifact_mod

    good_manifest = json.loads(Path(str(exported["onnx_fp32"]) + ".json").read_text())
    cases = {
        "not_an_object.onnx": '"just a string"',  # Manifest.from_dict: dict("...") raises ValueError
        "source_list.onnx": json.dumps({**good_manifest, "source_model": ["model.keras"]}),  # .get on a list
        "bad_precision.onnx": json.dumps({**good_manifest, "precision": "int3"}),
        "unreadable.onnx": None,  # file_facts raises OSError
    }
    paths = []
    for name, manifest in cases.items():
        p = tmp_path / name
        shutil.copy(exported["onnx_fp32"], p)
        if manifest is not None:
            Path(str(p) + ".json").write_text(manifest)
        paths.append(p)
    real_facts = artifact_mod.file_facts

    def facts(path):
        if Path(path).name == "unreadable.onnx":
            raise PermissionError(13, "Permission denied", str(path))
        return real_facts(path)

    monkeypatch.setattr(artifact_mod, "file_facts", facts)
    report = _finishes_within(600, lambda: run_bench(
        [*paths, exported["onnx_int8"]], BenchOptions(reference=exported["model"], isolate=False, threads=1,
                                                      latency=False, **QUICK), data=test_split))
    assert {r.label for r in report.errors} == set(cases)
    for r in report.errors:
        assert {"what", "expected", "fix"} <= set(r.error) and r.error["what"] and r.error["fix"], r.error
        d = r.to_dict()
        assert all(not d[k] for k in MEASUREMENT_FIELDS), d  # an errored result carries no measurements
    msgs = {r.label: r.error["what"] for r in report.errors}
    assert "holds a JSON string, not an object" in msgs["not_an_object.onnx"] and "source_model" in msgs["source_list.onnx"]
    assert "int3" in msgs["bad_precision.onnx"] and "Permission denied" in msgs["unreadable.onnx"]
    good = report.result(exported["onnx_int8"].name)
    assert good.ok and good.vs_float["agreement"] > 0.8
    assert all(set(e) >= {"label", "kind", "message", "what", "expected", "fix"} for e in report.to_dict()["errors"])


def test_a_hung_runtime_is_killed_after_the_timeout_and_a_fifo_is_refused(tmp_path, test_split, exported):
    """A FIFO named like a model makes LiteRT block forever in open(): the child must be killed."""
    import os
    import signal

    from resnet_deploy.bench.child import ChildWorker, WorkerFailed
    from resnet_deploy.bench.measure import FileSpec
    from resnet_deploy.data.preprocess import Preprocessing

    fifo = tmp_path / "hangs.tflite"
    os.mkfifo(fifo)
    worker = ChildWorker(FileSpec(path=fifo, preprocessing=Preprocessing.pixels().to_dict(), threads=1), timeout_s=3)
    def open_it():
        try:
            return worker.call("open")
        except WorkerFailed as exc:
            return exc.error

    err = _finishes_within(120, open_it)
    assert err["kind"] == "timeout" and "within 3 s" in err["what"] and err["fix"]
    assert not worker.proc.is_alive() and worker.proc.exitcode == -signal.SIGKILL  # killed, not left to hang
    # run_bench never reads such a file in the parent (hashing it would hang the whole run): beside a good
    # file it is that file's error, alone it is refused before any work
    report = _finishes_within(120, lambda: run_bench([fifo, exported["tflite_fp32"]],
                                                     BenchOptions(threads=1, latency=False, **QUICK), data=test_split))
    assert "not a regular file" in report.result("hangs.tflite").error["what"]
    assert report.result(exported["tflite_fp32"].name).ok
    from resnet_deploy.errors import BenchError

    with pytest.raises(BenchError, match="not a regular file"):
        _finishes_within(120, lambda: run_bench([fifo], BenchOptions(threads=1, **QUICK), data=test_split))


def test_first_inference_is_the_load_and_the_first_call(exported, monkeypatch):
    """Planted delays: loading sleeps 0.2 s and the first call 0.1 s; the figures must hold them (a timer
    around the wrong span, or a first call timed after a warm-up, fails). Lower bounds only: a sleep never
    ends early, so a busy machine cannot fail this."""
    import time

    import resnet_deploy.runtimes as runtimes
    from resnet_deploy.bench.measure import FileSession, FileSpec
    from resnet_deploy.data.preprocess import Preprocessing

    real_open, calls = runtimes.open_runner, []

    def slow_open(*args, **kwargs):
        runner = real_open(*args, **kwargs)
        load, predict = runner.load, runner.predict_preprocessed

        def slow_load():
            time.sleep(0.2)
            return load()

        def slow_predict(x):
            calls.append(len(x))
            if len(calls) == 1:
                time.sleep(0.1)
            return predict(x)

        runner.load, runner.predict_preprocessed = slow_load, slow_predict
        return runner

    monkeypatch.setattr(runtimes, "open_runner", slow_open)
    session = FileSession(FileSpec(path=exported["tflite_fp32"], preprocessing=Preprocessing.pixels().to_dict(),
                                   threads=1))
    try:
        t = session.open(lambda _: None)["timing"]
    finally:
        session.close()
    assert calls == [1]  # one call on one image before the figure is taken
    assert t["load_s"] >= 0.2 and t["first_run_s"] >= 0.1 and t["first_inference_s"] >= 0.3
    assert t["first_inference_s"] == pytest.approx(t["load_s"] + t["first_run_s"])


def test_the_memory_figure_excludes_the_test_images_the_child_was_sent(exported):
    """60 MB of images arrive in the child before the artifact loads: they are in its baseline and
    peak, not in the ~0.1 MB model's figure."""
    from resnet_deploy.bench.child import ChildWorker
    from resnet_deploy.bench.measure import FileSpec
    from resnet_deploy.data.preprocess import Preprocessing

    images = np.zeros((20_000, 32, 32, 3), np.uint8)  # 61 MB, as the whole test split would be (31 MB)
    worker = ChildWorker(FileSpec(path=exported["tflite_fp32"], preprocessing=Preprocessing.pixels().to_dict(),
                                  threads=1, latency_images=images))
    try:
        worker.call("open")
        assert len(worker.call("series", 1, 5)) == 5
        mem = worker.call("memory")
    finally:
        worker.close()
    mib = 2**20
    assert mem["rss_before_load_bytes"] > 60 * mib and mem["peak_rss_bytes"] >= mem["rss_before_load_bytes"]
    assert 0 < mem["artifact_rss_bytes"] < 30 * mib, mem
