"""Accuracy-aware INT8: a validation split decides the calibration and which layers stay float.

1. **Validation split**: ``options.val_samples`` class-balanced *training* images (seed ``val_seed``); every
   calibration sample is drawn disjoint from it, and the test split only reports. Each try is scored on
   it against the float model: top-1, its drop in percentage points, and top-1 *agreement* with the
   float model (more sensitive than top-1 when both are near 99 %).
2. **Calibration search**, bounded by ``options.search_time`` seconds (the first try always runs): the
   number of calibration images (``calib_samples`` and ``search_calib_samples``) and, for ONNX, the
   calibration method (minmax / percentile / entropy) and per-channel weights. The winner has the
   highest agreement (top-1 breaks ties); every score is recorded.
3. **Per-layer analysis** of the winner (``int8_analysis``): TFLite's QuantizationDebugger, ONNX
   Runtime's qdq_loss_debug; layers ranked by the error they add.
4. **Fallback**: while the winner loses more validation top-1 than ``options.max_drop``, the next layer
   of the ranking is tried in float (TFLite ``denylisted_nodes``, ONNX ``nodes_to_exclude``); a layer that
   does not raise validation agreement is not kept. At most ``int8_max_float_layers`` tries, within the time budget.
   When nothing meets the budget, the best file is kept and the record says so.

``plan_int8`` returns the options and calibration the converter then uses for the final file, and the
record that goes into the manifest (``int8_accuracy``).
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from resnet_deploy.config import Format
from resnet_deploy.converters.base import ONNX_COMPUTE_OPS, TFLITE_COMPUTE_OPS
from resnet_deploy.converters.calibration import build_calibration
from resnet_deploy.converters.options import CALIB_METHODS
from resnet_deploy.data.preprocess import preprocess
from resnet_deploy.data.sampler import validation_split

COMPUTE_OPS = TFLITE_COMPUTE_OPS + ONNX_COMPUTE_OPS
_HISTOGRAM_MAX = 1000  # ONNX entropy/percentile calibrators hold every batch's activations: cap their sample


@dataclass(frozen=True)
class ValidationSet:
    x: np.ndarray  # preprocessed float32 model inputs
    y: np.ndarray
    indices: np.ndarray  # into the training split
    float_logits: np.ndarray | None  # the float model's, computed when accuracy-aware
    recipe: dict

    @property
    def float_top1(self) -> float:
        return float((self.float_logits.argmax(1) == self.y).mean())


def build_validation(model, train, options, spec, with_logits: bool) -> ValidationSet:
    sample = validation_split(train, options.val_samples, options.val_seed)
    x = preprocess(sample.x, spec)
    logits = None
    if with_logits:
        logits = np.concatenate([np.asarray(model(x[i:i + 256], training=False)) for i in range(0, len(x), 256)])
    recipe = dict(sample.recipe, purpose="decides INT8 settings (calibration search, float fallback); "
                                         "disjoint from every calibration sample; the test split only reports")
    return ValidationSet(x, sample.y, sample.indices, logits, recipe)


def score(logits: np.ndarray, val: ValidationSet) -> dict:
    """Top-1, its drop against the float model (pp, positive = worse) and agreement, on the validation split."""
    top1 = float((logits.argmax(1) == val.y).mean())
    return {"val_top1": round(top1, 6), "val_drop_pp": round(100 * (val.float_top1 - top1), 4),
            "val_agreement": round(float((logits.argmax(1) == val.float_logits.argmax(1)).mean()), 6)}


# Our own small prediction loops (the runtimes package belongs to bench) ---------------------------------
def predict_tflite(path, x: np.ndarray, batch: int = 64, threads: int = 2) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    d = it.get_input_details()[0]
    out = []
    for i in range(0, len(x), batch):
        b = x[i:i + batch]
        it.resize_tensor_input(d["index"], [len(b), *b.shape[1:]])
        it.allocate_tensors()
        it.set_tensor(d["index"], b.astype(np.float32))
        it.invoke()
        out.append(it.get_tensor(it.get_output_details()[0]["index"]).astype(np.float32))
    return np.concatenate(out)


def predict_onnx(path, x: np.ndarray, batch: int = 256, threads: int = 2) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def latency_ms(path, fmt: Format, x: np.ndarray, runs: int = 30) -> float:
    """Median batch-1 latency at 1 thread (a rough figure: ``bench`` measures properly)."""
    predict = predict_tflite if fmt is Format.TFLITE else predict_onnx
    one = x[:1]
    predict(path, one, threads=1)
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        predict(path, one, threads=1)
        times.append(time.perf_counter() - t0)
    return round(1e3 * float(np.median(times)), 4)


# The search -------------------------------------------------------------------------------------------------
def candidates(fmt: Format, options, available: int | None = None) -> list[dict]:
    """Calibration settings to try, most promising first (the plain export's own settings lead); search
    sizes beyond the ``available`` training images (those outside the validation split) are skipped."""
    extra = [n for n in options.search_calib_samples if available is None or n <= available]
    sizes = list(dict.fromkeys([options.calib_samples, *extra]))
    if fmt is Format.TFLITE:
        return [{"calib_samples": n, "method": "minmax", "per_channel": True} for n in sizes]
    methods = list(dict.fromkeys([options.calib_method, *CALIB_METHODS]))
    out = [{"calib_samples": n, "method": m, "per_channel": options.onnx_per_channel} for n in sizes for m in methods
           if m == "minmax" or n <= _HISTOGRAM_MAX]
    out.append({"calib_samples": options.calib_samples, "method": options.calib_method,
                "per_channel": not options.onnx_per_channel})
    return out


class _Trier:
    """Makes one INT8 file for a setting in a temporary folder and scores it on the validation split."""

    def __init__(self, model, fmt: Format, options, train, spec, val: ValidationSet, work: Path, shared=None):
        self.model, self.fmt, self.options, self.train, self.spec, self.val, self.work = \
            model, fmt, options, train, spec, val, work
        self.shared = shared  # base.ExportWork: the export's SavedModel and FP32 ONNX file
        self.calibrations: dict[int, object] = {}
        self.tflite: dict[int, object] = {}  # calibrated TFLiteInt8 per sample size
        self.onnx = None
        self.rows: list[dict] = []
        self.made = 0

    def calibration(self, n: int):
        if n not in self.calibrations:
            self.calibrations[n] = build_calibration(self.train, n, self.options.calib_seed, self.spec,
                                                     exclude=self.val.indices)
        return self.calibrations[n]

    def make(self, setting: dict, float_layers=()) -> tuple[Path, object]:
        """One INT8 file for ``setting`` with ``float_layers`` kept float, in the temporary folder."""
        out = self.work / f"try{self.made}.{self.fmt.value}"
        self.made += 1
        n = setting["calib_samples"]
        cal = self.calibration(n)
        if self.fmt is Format.TFLITE:
            from resnet_deploy.converters.tflite import TFLiteInt8

            if n not in self.tflite:  # calibrate once per sample; float layers only re-quantize
                self.tflite[n] = TFLiteInt8(self.model, cal, self.shared)
            out.write_bytes(self.tflite[n].quantize(float_layers))
        else:
            self.onnx_quantizer().quantize(out, cal, setting["method"], setting["per_channel"], float_layers)
        return out, cal

    def run(self, setting: dict, float_layers=(), phase: str = "search") -> dict:
        """``make`` and score on the validation split; the row is kept in ``rows``."""
        t0 = time.perf_counter()
        out, cal = self.make(setting, float_layers)
        t1 = time.perf_counter()
        logits = (predict_tflite if self.fmt is Format.TFLITE else predict_onnx)(out, self.val.x)
        row = {"phase": phase, **setting, "calib_indices_sha256_16": cal.recipe["indices_sha256_16"],
               "float_layers": list(float_layers), **score(logits, self.val),
               "convert_s": round(t1 - t0, 2), "eval_s": round(time.perf_counter() - t1, 2), "file": out}
        self.rows.append(row)
        return row

    def onnx_quantizer(self):
        if self.onnx is None:
            from resnet_deploy.converters.int8_analysis import keras_layer_index
            from resnet_deploy.converters.onnx import OnnxInt8, float_source

            self.onnx = OnnxInt8(float_source(self.model, self.options, self.shared, as_path=True)[0], self.options,
                                 keras_layer_index(self.model))
        return self.onnx

    def analyze(self, row: dict, n_images: int) -> list[dict]:
        x = self.val.x[:n_images]
        if self.fmt is Format.TFLITE:
            return self.tflite[row["calib_samples"]].analyze(x)
        return self.onnx_quantizer().analyze(row["file"], x)

    def close(self):
        if self.onnx is not None:
            self.onnx.__exit__(None, None, None)


def plan_int8(model, fmt: Format, options, train, spec, val: ValidationSet,
              say: Callable[[str], None] = lambda m: None, shared=None):
    """The options and calibration for the final INT8 file of ``fmt``, and the manifest's ``int8_accuracy`` record."""
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rd-int8-") as tmp:
        trier = _Trier(model, fmt, options, train, spec, val, Path(tmp), shared)
        try:
            record = _search_and_fallback(trier, fmt, options, val, t_start, say)
        finally:
            trier.close()
    best = record.pop("_best")
    chosen = dataclasses.replace(options, calib_samples=best["calib_samples"], calib_method=best["method"]
                                 if fmt is Format.ONNX else options.calib_method,
                                 onnx_per_channel=best["per_channel"] if fmt is Format.ONNX else options.onnx_per_channel,
                                 int8_float_layers=tuple(best["float_layers"]))
    record["seconds"] = round(time.perf_counter() - t_start, 2)
    return chosen, trier.calibration(best["calib_samples"]), record


def _search(trier: _Trier, fmt: Format, options, val: ValidationSet, out_of_time, say) -> tuple[dict, str]:
    """Try the calibration candidates (the first always runs); the winner has the highest validation agreement."""
    stopped = "searched every candidate"
    for setting in candidates(fmt, options, available=len(trier.train) - len(val.indices)):
        if trier.rows and out_of_time():
            stopped = f"time budget ({options.search_time:g} s) reached after {len(trier.rows)} tries"
            break
        r = trier.run(setting, list(options.int8_float_layers))
        say(f"{fmt.value} INT8 try {len(trier.rows)}: {_describe(r)}")
    return max(trier.rows, key=lambda r: (r["val_agreement"], r["val_top1"])), stopped


def _fallback(trier: _Trier, fmt: Format, options, winner: dict, analysis: list[dict], out_of_time, say):
    """Greedy: the next layer of the ranking in float while over budget; kept only when agreement rises.
    Returns (best row, tries, the reason it stopped early or None)."""
    best, kept, tries = winner, list(options.int8_float_layers), 0
    # only conv/dense layers can be kept float (an ADD or a pooling op has no float twin to fall back to)
    ranked = [l for l in dict.fromkeys(r["layer"] for r in analysis if r["op"] in COMPUTE_OPS) if l and l not in kept]
    while best["val_drop_pp"] > options.max_drop and ranked and tries < options.int8_max_float_layers:
        if out_of_time():
            return best, tries, f"time budget ({options.search_time:g} s) reached during the fallback"
        layer = ranked.pop(0)
        tries += 1
        r = trier.run(_setting(winner), kept + [layer], phase="fallback")
        say(f"{fmt.value} INT8 fallback: {layer} in float -> {_describe(r)}")
        if r["val_agreement"] > best["val_agreement"]:  # a float layer must earn its latency
            best, kept = r, kept + [layer]
    return best, tries, None


def _search_and_fallback(trier: _Trier, fmt: Format, options, val: ValidationSet, t_start: float, say) -> dict:
    max_drop = options.max_drop
    out_of_time = lambda: time.perf_counter() - t_start > options.search_time  # noqa: E731
    winner, stopped = _search(trier, fmt, options, val, out_of_time, say)
    analysis = trier.analyze(winner, options.analysis_samples)
    best, fallback_tries, early = _fallback(trier, fmt, options, winner, analysis, out_of_time, say)
    stopped = early or stopped
    manual = list(options.int8_float_layers)
    met = best["val_drop_pp"] <= max_drop
    n_float = len(best["float_layers"])
    note = (f"{fmt.value} INT8: validation top-1 change {-best['val_drop_pp']:+.2f} pp, within the budget (a loss "
            f"of at most {max_drop:.2f} pp), with {n_float} layer(s) in float" if met else
            f"NO INT8 {fmt.value} file met the budget (a loss of at most {max_drop:.2f} pp): the best changes "
            f"validation top-1 by "
            f"{-best['val_drop_pp']:+.2f} pp with {n_float} layer(s) in float ({best['float_layers']}); kept the best")
    say(note)
    latency = None
    if best is not winner:  # the fallback kept layers in float: what they cost at batch 1
        latency = {"before_fallback_ms": latency_ms(winner["file"], fmt, val.x),
                   "after_fallback_ms": latency_ms(best["file"], fmt, val.x), "batch": 1, "threads": 1}
        latency["ratio"] = round(latency["after_fallback_ms"] / max(latency["before_fallback_ms"], 1e-9), 3)
    tries = [{k: v for k, v in r.items() if k != "file"} for r in trier.rows]
    return {
        "budget_pp": max_drop, "validation": val.recipe, "float_val_top1": round(val.float_top1, 6),
        "selection": "highest validation agreement with the float model, then validation top-1",
        "search": {"time_budget_s": options.search_time, "stopped": stopped, "tries": tries,
                   "winner": _setting(winner) | {k: winner[k] for k in ("val_top1", "val_drop_pp", "val_agreement")}},
        "analysis": {"images": f"validation[:{min(options.analysis_samples, len(val.x))}]", **_analysis_tool(fmt),
                     "layers": analysis},
        "fallback": {"needed": winner["val_drop_pp"] > max_drop, "tries": fallback_tries,
                     "float_layers": best["float_layers"], "manual_float_layers": manual, "latency": latency},
        "result": {"met_budget": met, "note": note, **{k: best[k] for k in ("val_top1", "val_drop_pp", "val_agreement")},
                   "calibration": _setting(best)},
        "_best": best,
    }


def analysis_only(model, fmt: Format, options, train, spec, val: ValidationSet, calibration, shared=None) -> dict:
    """``--analyze`` on a plain INT8 export: the per-layer table for the export's own calibration."""
    setting = {"calib_samples": options.calib_samples, "method": options.calib_method,
               "per_channel": options.onnx_per_channel}
    with tempfile.TemporaryDirectory(prefix="rd-int8-") as tmp:
        trier = _Trier(model, fmt, options, train, spec, val, Path(tmp), shared)
        trier.calibrations[options.calib_samples] = calibration
        try:
            out, _ = trier.make(setting, list(options.int8_float_layers))
            layers = trier.analyze({**setting, "file": out}, options.analysis_samples)
        finally:
            trier.close()
    images = f"validation[:{min(options.analysis_samples, len(val.x))}]"
    return {"validation": val.recipe, "analysis": {"images": images, **_analysis_tool(fmt), "layers": layers}}


def _analysis_tool(fmt: Format) -> dict:
    if fmt is Format.TFLITE:
        return {"tool": "tf.lite.experimental.QuantizationDebugger (NumericVerify: each op beside its float twin "
                        "on the same input)", "score": "relative_rmse = rmse / std(float output), higher is worse"}
    return {"tool": "onnxruntime.quantization.qdq_loss_debug (float vs QDQ activations per tensor)",
            "score": "added_noise_db = SQNR at the node's input - SQNR at its output, higher is worse"}


def _setting(r: dict) -> dict:
    return {k: r[k] for k in ("calib_samples", "method", "per_channel")}


def _describe(r: dict) -> str:
    fl = f", {len(r['float_layers'])} float layer(s)" if r["float_layers"] else ""
    return (f"{r['calib_samples']} images, {r['method']}{'' if r['per_channel'] else ', per-tensor'}{fl}: "
            f"val top-1 {100 * r['val_top1']:.2f} % ({-r['val_drop_pp']:+.2f} pp), agreement {100 * r['val_agreement']:.2f} %")
