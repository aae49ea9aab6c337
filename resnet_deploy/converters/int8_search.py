"""Accuracy-aware INT8: a tuning split of training images decides the calibration and which layers stay float.

1. **Tuning split**: ``search.tuning_samples`` class-balanced *training* images (seed ``search.tuning_seed``);
   every calibration sample is drawn disjoint from it, and the test split only reports. Each try is scored
   on it against the float model (``metrics.tuning_score``): top-1, its drop in percentage points, and top-1
   *agreement* with the float model (more sensitive than top-1 when both are near 99 %).
2. **Calibration search**, bounded by ``search.search_time`` seconds (the first try always runs): the
   number of calibration images (``calibration.samples`` and ``search.search_calib_samples``) and, for ONNX,
   the calibration method (minmax / percentile / entropy) and per-channel weights. The winner has the
   highest agreement (top-1 breaks ties); every score is recorded.
3. **Per-layer analysis** of the winner (``int8_analysis``): TFLite's QuantizationDebugger, ONNX
   Runtime's qdq_loss_debug; layers ranked by the error they add.
4. **Fallback**: while the winner loses more tuning-split top-1 than the budget, the next layer of the
   ranking is tried in float (TFLite ``denylisted_nodes``, ONNX ``nodes_to_exclude``); a layer that does not
   raise agreement is not kept. At most ``search.max_float_layers`` tries, within the time budget. When
   nothing meets the budget, the best file is kept and the record says so.

Every try runs through the runner bench uses (``runtimes.open_runner``). ``plan_int8`` returns the options
and calibration the converter then uses for the final file, and the ``records.Int8Record`` that goes into
the manifest (``int8_accuracy``).
"""

from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np

from resnet_deploy import metrics
from resnet_deploy.config import Format
from resnet_deploy.converters.base import ONNX_COMPUTE_OPS, TFLITE_COMPUTE_OPS
from resnet_deploy.converters.calibration import build_calibration
from resnet_deploy.converters.options import CALIB_METHODS, CalibrationOptions
from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.data.sampler import validation_split
from resnet_deploy.records import Analysis, Fallback, Int8Record, Int8Result, SearchLog, Setting, Try

COMPUTE_OPS = TFLITE_COMPUTE_OPS + ONNX_COMPUTE_OPS
_HISTOGRAM_MAX = 1000  # ONNX entropy/percentile calibrators hold every batch's activations: cap their sample
SELECTION = "highest validation agreement with the float model, then validation top-1"


@dataclass(frozen=True)
class TuningSplit:
    """The training images accuracy-aware INT8 decides on, disjoint from every calibration sample."""

    pixels: np.ndarray  # uint8 RGB pixels, what a runner is fed
    x: np.ndarray  # the same, preprocessed (what the per-layer analysis is fed)
    y: np.ndarray
    indices: np.ndarray  # into the training split
    float_logits: np.ndarray | None  # the float model's, computed when accuracy-aware
    recipe: dict
    preprocessing: Preprocessing = Preprocessing()

    @property
    def float_top1(self) -> float:
        return metrics.top1(metrics.predictions(self.float_logits), self.y)

    def score(self, logits: np.ndarray) -> dict:
        return metrics.tuning_score(logits, self.y, self.float_logits)


def build_tuning_split(model, train, options, spec: Preprocessing, with_logits: bool) -> TuningSplit:
    from resnet_deploy.converters.planning import float_logits

    sample = validation_split(train, options.search.tuning_samples, options.search.tuning_seed)
    x = preprocess(sample.x, spec)
    logits = float_logits(model, x) if with_logits else None
    recipe = dict(sample.recipe, purpose="decides INT8 settings (calibration search, float fallback); "
                                         "disjoint from every calibration sample; the test split only reports")
    return TuningSplit(sample.x, x, sample.y, sample.indices, logits, recipe, spec)


def predict(path, pixels: np.ndarray, preprocessing: Preprocessing | None = None, threads: int | None = None) -> np.ndarray:
    """An artifact's logits on ``pixels`` (RGB 0..255, or inputs already preprocessed with the default
    ``preprocessing``, raw pixels), through the runner bench uses, on every usable core."""
    from resnet_deploy.envinfo import usable_cores
    from resnet_deploy.runtimes import open_runner

    with open_runner(path, preprocessing=preprocessing or Preprocessing.pixels(),
                     threads=threads or usable_cores()) as runner:
        return runner.predict(pixels)


predict_tflite = predict_onnx = predict  # the names of earlier versions (benchmarks/int8_accuracy.py)


def latency_ms(path, pixels: np.ndarray, preprocessing: Preprocessing, runs: int = 30) -> float:
    """Median batch-1 latency at 1 thread, file loaded once (a rough figure: ``bench`` measures properly)."""
    from resnet_deploy.runtimes import open_runner

    with open_runner(path, preprocessing=preprocessing, threads=1) as runner:
        x = preprocess(pixels[:1], preprocessing)
        runner.predict_preprocessed(x)
        times = []
        for _ in range(runs):
            t0 = time.perf_counter()
            runner.predict_preprocessed(x)
            times.append(time.perf_counter() - t0)
    return round(1e3 * float(np.median(times)), 4)


# The search -------------------------------------------------------------------------------------------------
def candidates(fmt: Format, options, available: int | None = None) -> list[Setting]:
    """Calibration settings to try, most promising first (the plain export's own settings lead); search
    sizes beyond the ``available`` training images (those outside the tuning split) are skipped."""
    c = options.calibration
    extra = [n for n in options.search.search_calib_samples if available is None or n <= available]
    sizes = list(dict.fromkeys([c.samples, *extra]))
    if fmt is Format.TFLITE:
        return [Setting(n, "minmax", True) for n in sizes]
    methods = list(dict.fromkeys([c.method, *CALIB_METHODS]))
    out = [Setting(n, m, c.per_channel) for n in sizes for m in methods if m == "minmax" or n <= _HISTOGRAM_MAX]
    return out + [Setting(c.samples, c.method, not c.per_channel)]


class _Trier:
    """Makes one INT8 file for a setting in a temporary folder and scores it on the tuning split."""

    def __init__(self, session, model, fmt: Format, options, train, tuning: TuningSplit, folder: Path):
        self.session, self.model, self.fmt, self.options, self.train = session, model, fmt, options, train
        self.tuning, self.folder = tuning, folder
        self.calibrations: dict[int, object] = {}
        self.tflite: dict[int, object] = {}  # calibrated TFLiteInt8 per sample size
        self.onnx = None
        self.rows: list[Try] = []
        self.made = 0

    def calibration(self, n: int):
        if n not in self.calibrations:
            self.calibrations[n] = build_calibration(self.train, n, self.options.calibration.seed,
                                                     self.tuning.preprocessing, exclude=self.tuning.indices)
        return self.calibrations[n]

    def make(self, setting: Setting, float_layers=()) -> tuple[Path, object]:
        """One INT8 file for ``setting`` with ``float_layers`` kept float, in the temporary folder."""
        out = self.folder / f"try{self.made}.{self.fmt.value}"
        self.made += 1
        cal = self.calibration(setting.calib_samples)
        if self.fmt is Format.TFLITE:
            from resnet_deploy.converters.tflite import TFLiteInt8

            if setting.calib_samples not in self.tflite:  # calibrate once per sample; float layers only re-quantize
                self.tflite[setting.calib_samples] = TFLiteInt8(self.session, self.model, cal)
            out.write_bytes(self.tflite[setting.calib_samples].quantize(float_layers))
        else:
            self.onnx_quantizer().quantize(out, cal, setting.method, setting.per_channel, float_layers)
        return out, cal

    def run(self, setting: Setting, float_layers=(), phase: str = "search") -> Try:
        """``make`` and score on the tuning split; the row is kept in ``rows``."""
        t0 = time.perf_counter()
        out, cal = self.make(setting, float_layers)
        t1 = time.perf_counter()
        score = self.tuning.score(predict(out, self.tuning.pixels, self.tuning.preprocessing))
        row = Try(phase, setting.calib_samples, setting.method, setting.per_channel, cal.recipe["indices_sha256_16"],
                  list(float_layers), **score, convert_s=round(t1 - t0, 2),
                  eval_s=round(time.perf_counter() - t1, 2), file=out)
        self.rows.append(row)
        return row

    def onnx_quantizer(self):
        if self.onnx is None:
            from resnet_deploy.converters.int8_analysis import keras_layer_index
            from resnet_deploy.converters.onnx import OnnxInt8, float_source

            source, _ = float_source(self.session, self.model, self.options.opset, as_path=True)
            self.onnx = OnnxInt8(source, self.options, keras_layer_index(self.model))
        return self.onnx

    def analyze(self, setting: Setting, file: Path, n_images: int) -> list[dict]:
        x = self.tuning.x[:n_images]
        if self.fmt is Format.TFLITE:
            return self.tflite[setting.calib_samples].analyze(x)
        return self.onnx_quantizer().analyze(file, x)

    def close(self):
        if self.onnx is not None:
            self.onnx.__exit__(None, None, None)


def plan_int8(session, model, fmt: Format, options, train, spec: Preprocessing, tuning: TuningSplit,
              progress: Callable[[str], None] = lambda m: None):
    """The options and calibration for the final INT8 file of ``fmt``, and the manifest's ``Int8Record``."""
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="rd-int8-") as tmp:
        trier = _Trier(session, model, fmt, options, train, tuning, Path(tmp))
        try:
            best, record = search_and_fall_back(trier, fmt, options, tuning, t_start, progress)
        finally:
            trier.close()
    c = options.calibration
    calibration = CalibrationOptions(best.calib_samples, c.seed, best.method if fmt is Format.ONNX else c.method,
                                     best.per_channel if fmt is Format.ONNX else c.per_channel)
    record = replace(record, seconds=round(time.perf_counter() - t_start, 2))
    return options.with_int8_choice(calibration, best.float_layers), trier.calibration(best.calib_samples), record


def _search(trier: _Trier, fmt: Format, options, tuning: TuningSplit, out_of_time, progress) -> tuple[Try, str]:
    """Try the calibration candidates (the first always runs); the winner has the highest tuning agreement."""
    stopped = "searched every candidate"
    for setting in candidates(fmt, options, available=len(trier.train) - len(tuning.indices)):
        if trier.rows and out_of_time():
            stopped = f"time budget ({options.search.search_time:g} s) reached after {len(trier.rows)} tries"
            break
        r = trier.run(setting, list(options.search.float_layers))
        progress(f"{fmt.value} INT8 try {len(trier.rows)}: {_describe(r)}")
    return max(trier.rows, key=lambda r: (r.val_agreement, r.val_top1)), stopped


def _fallback(trier: _Trier, fmt: Format, options, winner: Try, analysis: list[dict], out_of_time, progress):
    """Greedy: the next layer of the ranking in float while over budget; kept only when agreement rises.
    Returns (best try, tries, the reason it stopped early or None)."""
    best, kept, tries = winner, list(options.search.float_layers), 0
    # only conv/dense layers can be kept float (an ADD or a pooling op has no float twin to fall back to)
    ranked = [l for l in dict.fromkeys(r["layer"] for r in analysis if r["op"] in COMPUTE_OPS) if l and l not in kept]
    while best.val_drop_pp > options.max_drop and ranked and tries < options.search.max_float_layers:
        if out_of_time():
            return best, tries, f"time budget ({options.search.search_time:g} s) reached during the fallback"
        layer = ranked.pop(0)
        tries += 1
        r = trier.run(winner.setting, kept + [layer], phase="fallback")
        progress(f"{fmt.value} INT8 fallback: {layer} in float -> {_describe(r)}")
        if r.val_agreement > best.val_agreement:  # a float layer must earn its latency
            best, kept = r, kept + [layer]
    return best, tries, None


def search_and_fall_back(trier: _Trier, fmt: Format, options, tuning: TuningSplit, t_start: float,
                         progress) -> tuple[Try, Int8Record]:
    """Search, analyse the winner, fall back within the budget: the best try and the record of it all.

    ``trier`` makes and scores the files: ``run(setting, float_layers, phase) -> Try`` (kept in ``rows``),
    ``analyze(setting, file, n_images) -> ranked rows``, ``train`` (the training split); ``plan_int8`` passes
    one that converts for real, a test may pass a scripted one."""
    budget = options.max_drop
    out_of_time = lambda: time.perf_counter() - t_start > options.search.search_time  # noqa: E731
    winner, stopped = _search(trier, fmt, options, tuning, out_of_time, progress)
    layers = trier.analyze(winner.setting, winner.file, options.search.analysis_samples)
    best, fallback_tries, early = _fallback(trier, fmt, options, winner, layers, out_of_time, progress)
    met = best.val_drop_pp <= budget
    note = _verdict(fmt, best, budget, met)
    progress(note)
    latency = None
    if best is not winner:  # the fallback kept layers in float: what they cost at batch 1
        latency = {"before_fallback_ms": latency_ms(winner.file, tuning.pixels, tuning.preprocessing),
                   "after_fallback_ms": latency_ms(best.file, tuning.pixels, tuning.preprocessing),
                   "batch": 1, "threads": 1}
        latency["ratio"] = round(latency["after_fallback_ms"] / max(latency["before_fallback_ms"], 1e-9), 3)
    record = Int8Record(
        validation=tuning.recipe, analysis=_analysis(fmt, layers, options, tuning), budget_pp=budget,
        float_val_top1=round(tuning.float_top1, 6), selection=SELECTION,
        search=SearchLog(options.search.search_time, early or stopped, list(trier.rows),
                         winner.setting.to_json() | winner.score.to_json()),
        fallback=Fallback(winner.val_drop_pp > budget, fallback_tries, best.float_layers,
                          list(options.search.float_layers), latency),
        result=Int8Result(met, note, best.val_top1, best.val_drop_pp, best.val_agreement, best.setting.to_json()))
    return best, record


def _verdict(fmt: Format, best: Try, budget: float, met: bool) -> str:
    n_float = len(best.float_layers)
    if met:
        return (f"{fmt.value} INT8: validation top-1 change {-best.val_drop_pp:+.2f} pp, within the budget (a loss "
                f"of at most {budget:.2f} pp), with {n_float} layer(s) in float")
    return (f"NO INT8 {fmt.value} file met the budget (a loss of at most {budget:.2f} pp): the best changes "
            f"validation top-1 by {-best.val_drop_pp:+.2f} pp with {n_float} layer(s) in float ({best.float_layers}); "
            "kept the best")


def analysis_only(session, model, fmt: Format, options, train, spec: Preprocessing, tuning: TuningSplit,
                  calibration) -> Int8Record:
    """``--analyze`` on a plain INT8 export: the per-layer table for the export's own calibration."""
    c = options.calibration
    setting = Setting(c.samples, c.method, c.per_channel)
    with tempfile.TemporaryDirectory(prefix="rd-int8-") as tmp:
        trier = _Trier(session, model, fmt, options, train, tuning, Path(tmp))
        trier.calibrations[c.samples] = calibration
        try:
            out, _ = trier.make(setting, list(options.search.float_layers))
            layers = trier.analyze(setting, out, options.search.analysis_samples)
        finally:
            trier.close()
    return Int8Record(validation=tuning.recipe, analysis=_analysis(fmt, layers, options, tuning))


def _analysis(fmt: Format, layers: list[dict], options, tuning: TuningSplit) -> Analysis:
    images = f"validation[:{min(options.search.analysis_samples, len(tuning.x))}]"
    if fmt is Format.TFLITE:
        return Analysis(images, "tf.lite.experimental.QuantizationDebugger (NumericVerify: each op beside its float "
                        "twin on the same input)", "relative_rmse = rmse / std(float output), higher is worse", layers)
    return Analysis(images, "onnxruntime.quantization.qdq_loss_debug (float vs QDQ activations per tensor)",
                    "added_noise_db = SQNR at the node's input - SQNR at its output, higher is worse", layers)


def _describe(r: Try) -> str:
    fl = f", {len(r.float_layers)} float layer(s)" if r.float_layers else ""
    return (f"{r.calib_samples} images, {r.method}{'' if r.per_channel else ', per-tensor'}{fl}: "
            f"val top-1 {100 * r.val_top1:.2f} % ({-r.val_drop_pp:+.2f} pp), agreement {100 * r.val_agreement:.2f} %")
