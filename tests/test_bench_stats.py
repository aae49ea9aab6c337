"""Bench statistics, timing summaries, options and gates: known inputs, known answers (no models)."""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np
import pytest

from resnet_deploy import metrics as acc
from resnet_deploy.bench.gates import evaluate_gates, gate_error, not_gated
from resnet_deploy.bench.latency import summarize
from resnet_deploy.bench.options import BenchOptions
from resnet_deploy.bench.results import ArtifactResult, BenchReport
from resnet_deploy.errors import BenchError, GateError


# Accuracy ---------------------------------------------------------------------------------------
def test_top1_confusion_per_class_and_agreement():
    y = np.array([0, 0, 1, 1, 2, 2])
    pred = np.array([0, 1, 1, 1, 0, 2])
    assert acc.top1(pred, y) == pytest.approx(4 / 6)
    cm = acc.confusion_matrix(y, pred, 4)
    np.testing.assert_array_equal(cm, [[1, 1, 0, 0], [0, 2, 0, 0], [1, 0, 1, 0], [0, 0, 0, 0]])
    pc = acc.per_class_accuracy(cm)
    np.testing.assert_allclose(pc[:3], [0.5, 1.0, 0.5])
    assert math.isnan(pc[3])  # a class with no images has no accuracy, not 0
    assert acc.agreement(pred, np.array([0, 1, 1, 0, 0, 0])) == pytest.approx(4 / 6)
    logits = np.eye(3)[pred]
    np.testing.assert_array_equal(acc.predictions(logits), pred)
    with pytest.raises(ValueError, match="lengths differ"):
        acc.top1(pred, y[:3])


def test_mcnemar_exact_against_hand_computed_values():
    # 1 loss, 9 gains: P(X <= 1 | n=10) = (1 + 10) / 1024, two-sided doubles it.
    assert acc.mcnemar_exact(1, 9) == pytest.approx(22 / 1024, abs=0)
    assert acc.mcnemar_exact(9, 1) == acc.mcnemar_exact(1, 9)  # symmetric
    # 0 vs 5: 2 * (1/32)
    assert acc.mcnemar_exact(0, 5) == pytest.approx(2 / 32)
    # balanced discordance is no evidence: p capped at 1
    assert acc.mcnemar_exact(3, 3) == 1.0 and acc.mcnemar_exact(0, 0) == 1.0
    # 2 vs 6: 2 * (1 + 8 + 28) / 256 = 74/256
    assert acc.mcnemar_exact(2, 6) == pytest.approx(74 / 256)
    # large counts stay exact and finite (no float overflow of C(n, k))
    p = acc.mcnemar_exact(4000, 4300)
    assert 0 < p < 0.05


def test_wilson_interval_known_values():
    lo, hi = acc.wilson_interval(80, 100, 0.95)
    assert lo == pytest.approx(0.7112, abs=1e-4) and hi == pytest.approx(0.8666, abs=1e-4)
    lo, hi = acc.wilson_interval(0, 10)
    assert lo == pytest.approx(0.0, abs=1e-12) and hi == pytest.approx(0.2775, abs=1e-4)


def test_paired_bootstrap_change_is_centered_and_zero_without_flips():
    rng = np.random.default_rng(0)
    ref = rng.random(2000) < 0.9
    assert acc.paired_bootstrap_change(ref, ref) == (0.0, 0.0, 0.0)
    art = ref.copy()
    flip = np.flatnonzero(ref)[:40]  # 40 losses, no gains: -2.0 pp exactly
    art[flip] = False
    delta, lo, hi = acc.paired_bootstrap_change(art, ref, n_boot=4000, seed=1)
    assert delta == pytest.approx(-2.0)
    assert lo < delta < hi <= 0 < -lo
    # The multinomial shortcut is the index bootstrap: compare its spread with a direct resampling.
    idx = rng.integers(0, len(ref), (1000, len(ref)))
    direct = 100 * (art[idx].mean(axis=1) - ref[idx].mean(axis=1))
    assert (hi - lo) == pytest.approx(np.quantile(direct, 0.975) - np.quantile(direct, 0.025), rel=0.15)
    # Same seed, same interval.
    assert acc.paired_bootstrap_change(art, ref, 500, seed=3) == acc.paired_bootstrap_change(art, ref, 500, seed=3)


def test_logit_error_known_answers():
    ref = np.array([[1.0, 0.0], [0.0, 2.0]])
    got = np.array([[1.5, 0.0], [0.0, 1.0]])
    e = acc.logit_error(got, ref)
    assert e["max_abs"] == pytest.approx(1.0)
    assert e["mean_abs"] == pytest.approx(0.375)
    assert e["rmse"] == pytest.approx(math.sqrt((0.25 + 1.0) / 4))
    assert e["relative_mean_abs"] == pytest.approx(0.375 / 0.75)
    assert e["cosine_mean"] == pytest.approx(1.0)  # same directions, different lengths
    same = acc.logit_error(ref, ref)
    assert same["max_abs"] == 0 and same["cosine_min"] == pytest.approx(1.0)


def test_compare_with_reference_counts_gains_losses_and_flips():
    y = np.array([0, 1, 2, 0, 1])
    ref = np.eye(3)[[0, 1, 2, 1, 2]]  # right on 0, 1, 2
    art = np.eye(3)[[0, 2, 2, 0, 2]]  # loses image 1, gains image 3
    c = acc.compare_with_reference(art, ref, y, n_boot=200)
    assert (c["losses"], c["gains"], c["flips"]) == (1, 1, 2)
    assert c["change_pp"] == 0.0 and c["mcnemar_p"] == 1.0
    assert c["agreement"] == pytest.approx(3 / 5)
    s = acc.accuracy_summary(art, y, 3)
    assert s["correct"] == 3 and s["top1"] == pytest.approx(0.6) and s["per_class"] == [1.0, 0.0, 1.0]


# Latency ---------------------------------------------------------------------------------------
def test_summarize_known_times():
    s = summarize(np.array([0.001, 0.002, 0.003, 0.004]), batch=8, noisy_cv=0.1)
    assert s["mean_ms"] == pytest.approx(2.5) and s["min_ms"] == pytest.approx(1.0)
    assert s["std_ms"] == pytest.approx(np.std([1, 2, 3, 4], ddof=1))
    assert s["p50_ms"] == pytest.approx(2.5) and s["p90_ms"] == pytest.approx(3.7)
    assert s["throughput_ips"] == pytest.approx(8 / 0.0025)
    assert s["cv"] == pytest.approx(s["std_ms"] / 2.5) and s["noisy"] is True
    steady = summarize(np.full(10, 0.002), batch=1)
    assert steady["cv"] == 0 and steady["noisy"] is False
    with pytest.raises(ValueError):
        summarize(np.array([]), 1)


def _fake_series(clock, cost_s, jitter=None):
    """n calls of ``cost_s`` seconds each on a fake clock (times scaled by ``jitter(call index)``)."""
    count = [0]

    def run(n):
        out = []
        for _ in range(n):
            t = cost_s * (jitter(count[0]) if jitter else 1.0)
            count[0] += 1
            clock[0] += t
            out.append(t)
        return np.array(out)
    return run


def test_rounds_stop_when_steady_after_the_minimums_or_at_the_budget():
    from resnet_deploy.bench.rounds import RoundsPlan, interleaved_rounds

    clock = [0.0]
    now = lambda: clock[0]  # noqa: E731
    plan = RoundsPlan(warmup=2, min_runs=60, budget_s=50.0, min_rounds=6, block_s=0.1)
    steady = interleaved_rounds({"a": _fake_series(clock, 0.01), "b": _fake_series(clock, 0.002)}, plan, clock=now)
    assert steady.stopped == "steady" and steady.rounds == 6  # constant times: steady as soon as allowed
    assert steady.warmup == {"a": 2, "b": 2}
    assert all(len(t) == 10 for t in steady.times["a"])  # blocks of block_s / per-call time
    assert sum(map(len, steady.times["b"])) >= 60
    # a series that never settles (its block medians alternate 1x / 3x) runs until the budget
    clock[0] = 0.0
    wobbly = _fake_series(clock, 0.01, jitter=lambda i: 1.0 if (i // 10) % 2 else 3.0)
    out = interleaved_rounds({"a": wobbly, "b": _fake_series(clock, 0.002)}, plan, clock=now)
    assert out.stopped == "budget" and out.elapsed_s >= plan.budget_s and out.rounds > 6


def test_a_failing_series_is_dropped_and_the_others_go_on():
    from resnet_deploy.bench.rounds import RoundsPlan, SeriesFailed, interleaved_rounds

    clock = [0.0]
    good = _fake_series(clock, 0.01)

    def bad(n):
        raise SeriesFailed("bad", {"kind": "crash"})

    out = interleaved_rounds({"good": good, "bad": bad}, RoundsPlan(warmup=1, min_runs=10, budget_s=5),
                             clock=lambda: clock[0])
    assert out.failed == {"bad": {"kind": "crash"}} and "bad" not in out.times and out.rounds >= 6


# Options ---------------------------------------------------------------------------------------
def test_options_validate_and_resolve_threads():
    o = BenchOptions(reference="m.keras")
    assert o.threads >= 1 and o.batch_sizes == (1, 32) and str(o.reference) == "m.keras"
    assert BenchOptions(large_batch=1).batch_sizes == (1,)
    for bad in ({"limit": 0}, {"runs": 0}, {"threads": 0}, {"max_time_s": 0}, {"confidence": 1.5},
                {"max_drop_pp": -1}, {"min_speedup": 0}, {"min_speedup": 2, "latency": False},
                {"max_drop_pp": 1, "accuracy": False}):
        with pytest.raises(BenchError):
            BenchOptions(**bad)
    assert BenchOptions().to_dict()["reference"] is None


# Gates -----------------------------------------------------------------------------------------
def _result(label, precision="int8", change=None, speedup=None, role="artifact", fmt="tflite", error=None):
    r = ArtifactResult(label=label, path=label, role=role, format=fmt, precision=precision, error=error)
    if change is not None:
        r.vs_float = {"change_pp": change, "change_interval_pp": [change - 0.5, change + 0.5]}
    if speedup is not None:
        r.vs_baseline = {"label": "m_fp32.tflite", "speedup": {"1": speedup}}
    return r


def _report(results):
    return BenchReport(machine={}, libraries={}, options={}, data={}, reference={}, results=results)


def test_max_drop_gate_names_the_artifact_and_figure():
    rep = _report([_result("ok.tflite", change=-0.4), _result("bad.tflite", change=-1.6),
                   _result("ref.keras", "fp32", role="reference", fmt="keras"),
                   _result("noref.tflite"), _result("broken.tflite", error={"message": "x"})])
    rep.gates = evaluate_gates(rep, BenchOptions(max_drop_pp=1.0))
    by = {g["artifact"]: g for g in rep.gates}
    assert set(by) == {"ok.tflite", "bad.tflite", "noref.tflite"}  # reference and errored files are not gated
    assert by["ok.tflite"]["passed"] and not by["bad.tflite"]["passed"]
    assert not by["noref.tflite"]["passed"] and "--reference" in by["noref.tflite"]["message"]
    err = gate_error(rep)
    assert isinstance(err, GateError) and err.exit_code == 1
    assert "bad.tflite" in err.what and "-1.60 pp" in err.what and "ok.tflite" not in err.what


def test_min_speedup_gate_uses_the_same_runtime_fp32_baseline():
    rep = _report([_result("fast.tflite", speedup=3.2), _result("slow.onnx", speedup=1.1, fmt="onnx"),
                   _result("m_fp32.tflite", "fp32"), _result("alone.tflite"),
                   _result("added.tflite", speedup=0.5, role="baseline")])
    rep.gates = evaluate_gates(rep, BenchOptions(min_speedup=2.0))
    by = {g["artifact"]: g for g in rep.gates}
    assert set(by) == {"fast.tflite", "slow.onnx", "alone.tflite"}  # FP32 and added baselines exempt
    assert by["fast.tflite"]["passed"] and not by["slow.onnx"]["passed"]
    assert "1.10x" in by["slow.onnx"]["message"] and "batch-1" in by["slow.onnx"]["figure"]
    assert not by["alone.tflite"]["passed"] and "no FP32 artifact" in by["alone.tflite"]["message"]
    assert gate_error(_report([_result("fast.tflite", speedup=3.2)])) is None


def _child_peak(q):
    from resnet_deploy.bench.latency import peak_rss_bytes

    q.put(peak_rss_bytes())


def test_a_spawned_child_reports_its_own_peak_memory_not_its_parents():
    """ru_maxrss survives fork + exec on Linux; the per-artifact probe must not inherit the parent's peak."""
    import multiprocessing as mp
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("the inherited ru_maxrss is a Linux behaviour")
    from resnet_deploy.bench.latency import peak_rss_bytes

    ballast = np.ones(600 * 2**20 // 8)  # 600 MiB resident in this process
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_peak, args=(q,))
    p.start()
    child_peak = q.get(timeout=60)
    p.join()
    assert peak_rss_bytes() > 600 * 2**20
    assert child_peak < 300 * 2**20, f"child reported {child_peak / 2**20:.0f} MiB"
    del ballast


def _child_meter(q):
    """In a fresh process: a transient 300 MiB peak before the baseline (as unpickling the test split
    makes), then 40 MiB held while 'the artifact' runs, then the fallbacks without a reset."""
    from resnet_deploy.bench.latency import MemoryMeter

    mib = 2**20
    ballast = np.ones(300 * mib // 8)
    del ballast
    meter = MemoryMeter(reset=True)
    held = np.ones(40 * mib // 8)
    first = meter.read()
    del held
    no_reset = MemoryMeter(reset=False)  # the peak so far is above what comes next: a lower bound
    small = np.ones(20 * mib // 8)
    below = no_reset.read()
    big = np.ones(400 * mib // 8)  # a new high-water mark: exact again without a reset
    above = no_reset.read()
    del small, big
    q.put((first, below, above))


def test_memory_meter_counts_what_the_artifact_added_not_the_harness():
    """The artifact figure is the rise over the RSS just before loading, even when the process peaked
    higher before that (the harness's data): the figure the report's memory column shows."""
    import multiprocessing as mp
    import sys

    if not sys.platform.startswith("linux"):
        pytest.skip("VmHWM and its reset are Linux")
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_child_meter, args=(q,))
    p.start()
    first, below, above = q.get(timeout=120)
    p.join()
    mib = 2**20
    assert first["peak_rss_bytes"] > 300 * mib  # the process's peak still says what it was
    assert 35 * mib < first["artifact_rss_bytes"] < 80 * mib, first
    assert first["rss_before_load_bytes"] < 250 * mib and "reset" in first["artifact_rss_method"]
    assert 15 * mib < below["artifact_rss_bytes"] < 60 * mib and "lower bound" in below["artifact_rss_method"]
    assert 380 * mib < above["artifact_rss_bytes"] < 500 * mib and "after loading" in above["artifact_rss_method"]


def test_cost_table_shows_the_artifacts_own_memory_against_the_float_model():
    from resnet_deploy.bench.report import COST_COLUMNS, LEGEND, cost_row

    mb = 10**6  # the report's unit, as everywhere in the project
    r = _result("q.tflite")
    r.memory = {"peak_rss_bytes": 100 * mb, "rss_before_load_bytes": 98 * mb, "artifact_rss_bytes": 2 * mb}
    r.vs_float = {"artifact_rss_ratio": 0.25}
    row = dict(zip(COST_COLUMNS, cost_row(r, 32)))
    assert row["mem"] == "2.0 MB" and row["mem ÷"] == "4.00x"  # not the 100 MB of the whole child
    assert "peak RSS" not in COST_COLUMNS and "harness" in LEGEND


def test_min_speedup_gates_quantized_artifacts_and_lists_the_others_as_not_gated():
    from resnet_deploy.bench.report import notes

    rep = _report([_result("q.tflite", speedup=1.5), _result("half.tflite", "fp16", speedup=1.0),
                   _result("bare.onnx", "unknown", fmt="onnx"), _result("m_fp32.tflite", "fp32"),
                   _result("dyn.onnx", "dynamic_int8", fmt="onnx"),
                   _result("m_fp32.onnx", "fp32", fmt="onnx", error={"message": "crashed"})])
    opts = BenchOptions(min_speedup=1.2)
    rep.gates, rep.not_gated = evaluate_gates(rep, opts), not_gated(rep, opts)
    by = {g["artifact"]: g for g in rep.gates}
    assert set(by) == {"q.tflite", "dyn.onnx"} and by["q.tflite"]["passed"]
    # a quantized artifact whose baseline crashed fails closed, and the message says why
    assert not by["dyn.onnx"]["passed"] and "m_fp32.onnx could not be measured" in by["dyn.onnx"]["message"]
    skipped = {g["artifact"]: g["reason"] for g in rep.not_gated}
    assert set(skipped) == {"half.tflite", "bare.onnx", "m_fp32.tflite"}
    assert "--gate-fp16" in skipped["half.tflite"] and "no manifest" in skipped["bare.onnx"]
    assert rep.to_dict()["not_gated"] == rep.not_gated
    assert any(line.startswith("gate min-speedup not applied to bare.onnx") for line in notes(rep))
    # FP16 is gated on request (a GPU, where FP16 is a speed feature)
    opts16 = BenchOptions(min_speedup=1.2, gate_fp16=True)
    by16 = {g["artifact"]: g for g in evaluate_gates(rep, opts16)}
    assert not by16["half.tflite"]["passed"] and "half.tflite" not in {g["artifact"] for g in not_gated(rep, opts16)}


def test_max_drop_says_the_reference_crashed_rather_than_missing():
    crashed_ref = _result("model.keras", "fp32", role="reference", fmt="keras", error={"message": "crash"})
    rep = _report([crashed_ref, _result("q.tflite")])
    (g,) = evaluate_gates(rep, BenchOptions(max_drop_pp=1.0))
    assert not g["passed"] and "model.keras could not be measured" in g["message"]
    assert "no float reference measured" not in g["message"]
    (g,) = evaluate_gates(_report([_result("q.tflite")]), BenchOptions(max_drop_pp=1.0))
    assert "no float reference was found" in g["message"] and "--reference" in g["message"]


def test_per_file_timeout_is_generous_and_scales_with_the_work():
    base = BenchOptions()
    assert base.file_timeout_s(10_000) > base.file_timeout_s(300) > 2 * 2 * base.max_time_s
    assert BenchOptions(max_time_s=60).file_timeout_s(0) > base.file_timeout_s(0)
    assert BenchOptions(latency=False).file_timeout_s(0) < base.file_timeout_s(0)
    assert BenchOptions(timeout_s=7).file_timeout_s(10_000) == 7
    for bad in (0, -1):
        with pytest.raises(BenchError, match="timeout"):
            BenchOptions(timeout_s=bad)


def test_every_error_entry_says_what_expected_and_fix():
    from resnet_deploy.bench.results import crash_error, error_entry, timeout_error

    entries = [crash_error(Path("x.tflite"), -11), timeout_error(Path("x.tflite"), 12.0),
               error_entry("unexpected KeyError", "boom", "a runtime that works", "report it", traceback="tb")]
    for e in entries:
        assert {"kind", "message", "what", "expected", "fix"} <= set(e) and e["what"] in e["message"]
    rep = _report([_result("x.tflite", error=entries[0])])
    (err,) = rep.to_dict()["errors"]
    assert err["label"] == "x.tflite" and "SIGSEGV" in err["what"]


@pytest.mark.parametrize("fmt,prec,cal,machine,flags,warned", [
    ("onnx", "int8", {"activation_type": "uint8", "reduce_range": False}, "x86_64", ["avx2"], True),
    ("onnx", "int8", {}, "x86_64", ["avx2", "fma"], True),  # exported before the rule: 8-bit weights
    ("onnx", "int8", {"activation_type": "uint8", "reduce_range": True}, "x86_64", ["avx2"], False),
    ("onnx", "int8", {"activation_type": "uint8", "reduce_range": False}, "x86_64", ["avx512_vnni"], False),
    ("onnx", "int8", {"activation_type": "uint8", "reduce_range": False}, "x86_64", ["avx_vnni"], False),
    ("onnx", "int8", {"activation_type": "int8", "reduce_range": False}, "x86_64", ["avx2"], False),
    ("onnx", "int8", {"activation_type": "uint8", "reduce_range": False}, "aarch64", [], False),
    ("tflite", "int8", {}, "x86_64", ["avx2"], False),
    ("onnx", "fp16", None, "x86_64", ["avx2"], False),
    ("onnx", "int8", {"activations": "uint8 per-tensor"}, "x86_64", ["avx2"], True),  # pre-rule manifest
    ("onnx", "int8", {"activations": "int8 per-tensor"}, "x86_64", ["avx2"], False),  # pre-rule, arm64 export
    ("onnx", "int8", {"activation_type": "uint8", "reduce_range": False}, "x86_64", None, False),  # flags unknown
    ("onnx", "int8", {"activation_type": "uint8", "weight_type": "uint8", "reduce_range": False}, "x86_64",
     ["avx2"], False),  # U8U8 is widened before the multiply: no VPMADDUBSW pair sums
    ("onnx", "int8", {"activation_type": "uint8", "weight_type": "int8", "reduce_range": False,
                      "target": "x86-vnni", "scheme": "u8s8"}, "x86_64", ["avx2"], True),  # made for a VNNI CPU
])
def test_u8s8_saturation_warning_only_where_the_kernels_saturate(fmt, prec, cal, machine, flags, warned,
                                                                  monkeypatch):
    from resnet_deploy.artifact import Manifest, TensorSpec
    from resnet_deploy.bench.selection import u8s8_saturation_warning

    m = Manifest(format=fmt, precision=prec, artifact="m." + fmt, sha256="0", size_bytes=1,
                 input=TensorSpec("image", [None, 32, 32, 3], "float32"),
                 output=TensorSpec("logits", [None, 10], "float32"), calibration=cal)
    if flags is None:  # this machine's flags, made unreadable
        from resnet_deploy import envinfo

        monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: None)
    note = u8s8_saturation_warning(m, machine=machine, flags=flags)
    assert (note is not None) == warned
    if warned:
        assert "saturate" in note and "--onnx-reduce-range" in note


def test_heartbeats_keep_a_slow_child_alive_and_silence_times_it_out():
    """The per-file timeout counts time without progress, not total time: a child that reports each
    stage may run longer than the timeout; one that goes quiet is given up on."""
    import multiprocessing as mp
    import threading

    from resnet_deploy.bench.child import PROGRESS, TIMED_OUT, _receive

    class Alive:
        def is_alive(self):
            return True

    def child(conn, beats: int):
        for i in range(beats):
            time.sleep(0.3)
            conn.send((PROGRESS, f"stage {i}"))
        time.sleep(0.3)
        conn.send({"result": beats})

    for beats, timeout, expected in ((6, 1.0, {"result": 6}), (0, 5.0, {"result": 0})):
        parent, end = mp.Pipe(duplex=False)
        t0 = time.monotonic()
        threading.Thread(target=child, args=(end, beats), daemon=True).start()
        assert _receive(parent, Alive(), timeout) == expected
        if beats:
            assert time.monotonic() - t0 > 1.5 * timeout  # longer than the timeout, kept alive by heartbeats
    parent, end = mp.Pipe(duplex=False)
    end.send((PROGRESS, "loaded"))  # then silence
    t0 = time.monotonic()
    assert _receive(parent, Alive(), 0.6) is TIMED_OUT
    assert 0.5 < time.monotonic() - t0 < 3


# The report's picture ------------------------------------------------------------------------------
def test_plot_draws_each_change_and_latency_with_its_interval_and_names_every_row_once():
    """One row per measured file, named once on the left (no label over another); the accuracy panel's error
    bar of a file spans its change interval, the latency panel's spans its rounds' interval."""
    from resnet_deploy.bench.report import plot_figure

    rows = [_result("a_int8.tflite", change=-0.3), _result("b_int8.onnx", change=0.2, fmt="onnx"),
            _result("c_int8.tflite", change=1.0, error={"message": "x"})]  # a failed file is not drawn
    rows[0].accuracy = rows[1].accuracy = {"top1": 0.9}
    rows[0].latency["1"] = {"round_median_ms": 2.0, "round_median_interval_ms": [1.5, 3.0], "noisy": False}
    fig = plot_figure(_report(rows))
    acc, lat = fig.axes[:2]
    assert [t.get_text() for t in acc.get_yticklabels()] == ["b_int8.onnx [onnxruntime]", "a_int8.tflite [litert]"]

    def spans(ax):  # the x extent of each error bar drawn: low, high, low, high, ...
        return [x for lo_hi in sorted(sorted(seg[:, 0]) for c in ax.collections for seg in c.get_segments())
                for x in lo_hi]

    assert spans(acc) == pytest.approx([-0.8, 0.2, -0.3, 0.7])  # change -0.3 and 0.2, each +- 0.5
    assert spans(lat) == pytest.approx([1.5, 3.0])
    import matplotlib.pyplot as plt

    plt.close(fig)
