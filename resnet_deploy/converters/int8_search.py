"""Accuracy-aware INT8: a tuning split of training images decides the calibration and which layers stay float.

1. **Tuning split**: ``search.tuning_samples`` class-balanced *training* images (seed ``search.tuning_seed``);
   every calibration sample is drawn disjoint from it, and the test split only reports. Each try is scored
   on it against the float model (``metrics.tuning_score``): top-1, its change with a paired bootstrap
   interval, top-1 agreement, and the mean per-image KL divergence from the float model's class
   distribution (``metrics.kl_per_image``), the low-variance score the choices are made on.
2. **Calibration search**, bounded by ``search.search_time`` seconds (the first try always runs and is the
   plain export): the number of calibration images (``calibration.samples`` and ``search.search_calib_samples``),
   for ONNX the calibration method (minmax / percentile / entropy: per-tensor activation ranges from a
   histogram) and per-channel weights, for TFLite 16x8 (int16 activations, int8 weights, the whole model: the
   converter has no per-layer 16x8). A candidate replaces the plain export only when its KL reduction over it,
   paired per image, has a 95 % interval above zero (``metrics.paired_mean_interval``); among those, the
   largest reduction wins. At a 0.10 pp budget top-1 on a few thousand images cannot tell candidates apart
   (a paired difference's standard error is about 0.17 pp at 1.5 % disagreement); the KL can.
3. **Per-layer analysis** of the winner (``int8_analysis``): TFLite's QuantizationDebugger, ONNX
   Runtime's qdq_loss_debug; layers ranked by the error they add.
4. **Fallback**: while the winner loses more tuning-split top-1 than the budget, the next layer of the
   ranking is tried in float (TFLite ``denylisted_nodes``, ONNX ``nodes_to_exclude``; the nodes found by their
   weights, ``int8_mapping``); a layer is kept only when its KL reduction over the best so far has a 95 %
   interval above zero. At most ``search.max_float_layers`` tries, within the time budget. When
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
SELECTION = ("the plain export unless a candidate lowers the mean per-image KL divergence from the float model by "
             "more than its own noise (paired 95 % interval above zero); then the largest reduction")


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

    def kl(self, logits: np.ndarray) -> np.ndarray:
        return metrics.kl_per_image(logits, self.float_logits)

    def change_interval(self, logits: np.ndarray) -> list:
        """The paired bootstrap 95 % interval (pp) of the top-1 change against the float model."""
        _, lo, hi = metrics.paired_bootstrap_change(metrics.predictions(logits) == self.y,
                                                    metrics.predictions(self.float_logits) == self.y)
        return [round(lo, 3), round(hi, 3)]


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
        return [Setting(n, "minmax", True) for n in sizes] + [Setting(c.samples, "minmax", True, "int16")]
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
        self.kls: list[np.ndarray] = []  # per-image KL of each row, same order
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
        if self.fmt is Format.TFLITE and setting.activations == "int16":
            from resnet_deploy.converters.tflite import quantize_16x8

            if float_layers:
                raise ValueError("16x8 files keep no layer in float here")
            out.write_bytes(quantize_16x8(self.session, self.model, cal))
        elif self.fmt is Format.TFLITE:
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
        logits = predict(out, self.tuning.pixels, self.tuning.preprocessing)
        kl = self.tuning.kl(logits)
        row = Try(phase, setting.calib_samples, setting.method, setting.per_channel, cal.recipe["indices_sha256_16"],
                  list(float_layers), **self.tuning.score(logits), convert_s=round(t1 - t0, 2),
                  eval_s=round(time.perf_counter() - t1, 2), file=out, activations=setting.activations,
                  val_kl=round(float(kl.mean()), 7), val_change_interval_pp=self.tuning.change_interval(logits))
        self.rows.append(row)
        self.kls.append(kl)
        return row

    def onnx_quantizer(self):
        if self.onnx is None:
            from resnet_deploy.converters.int8_mapping import keras_kernels
            from resnet_deploy.converters.onnx import OnnxInt8, float_source

            source, _ = float_source(self.session, self.model, self.options.opset, as_path=True)
            self.onnx = OnnxInt8(source, self.options, keras_kernels(self.model))
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
                                     best.per_channel if fmt is Format.ONNX else c.per_channel, best.activations)
    record = replace(record, seconds=round(time.perf_counter() - t_start, 2))
    return options.with_int8_choice(calibration, best.float_layers), trier.calibration(best.calib_samples), record


def compare(trier, ref: int, new: int) -> Try:
    """Row ``new`` with its paired KL reduction over row ``ref`` (positive = closer to the float model), put
    back into ``trier.rows``."""
    m, lo, hi = metrics.paired_mean_interval(trier.kls[ref] - trier.kls[new])
    row = replace(trier.rows[new], gain_vs=f"try {ref + 1}", kl_gain=[round(m, 7), round(lo, 7), round(hi, 7)])
    trier.rows[new] = row
    return row


def _better(row: Try) -> bool:
    """Its gain is outside its own noise: the 95 % interval of the paired KL reduction lies above zero."""
    return row.kl_gain is not None and row.kl_gain[1] > 0


def _search(trier: _Trier, fmt: Format, options, tuning: TuningSplit, out_of_time, progress) -> tuple[int, str]:
    """Try the calibration candidates (the first, the plain export's settings, always runs); the index of the
    winner: the plain export unless a candidate beats it beyond noise (``_better``), then the largest gain."""
    stopped = "searched every candidate"
    for setting in candidates(fmt, options, available=len(trier.train) - len(tuning.indices)):
        if trier.rows and out_of_time():
            stopped = f"time budget ({options.search.search_time:g} s) reached after {len(trier.rows)} tries"
            break
        if setting.activations != "int8" and options.search.float_layers:
            continue  # layers kept float by hand: int8 files only
        r = trier.run(setting, list(options.search.float_layers))
        if len(trier.rows) > 1:
            r = compare(trier, 0, len(trier.rows) - 1)
        progress(f"{fmt.value} INT8 try {len(trier.rows)}: {_describe(r)}")
    better = [i for i, r in enumerate(trier.rows) if i and _better(r)]
    return (max(better, key=lambda i: trier.rows[i].kl_gain[0]) if better else 0), stopped


def _fallback(trier: _Trier, fmt: Format, options, winner: int, analysis: list[dict], out_of_time, progress):
    """Greedy: the next layer of the ranking in float while over budget; kept only when it lowers the KL beyond
    noise (``_better`` against the best so far). Returns (index of the best try, tries, why it stopped early)."""
    best, kept, tries = winner, list(options.search.float_layers), 0
    setting = trier.rows[winner].setting
    if setting.activations != "int8":
        return best, tries, None  # 16x8 keeps no layer in float here
    # only conv/dense layers can be kept float (an ADD or a pooling op has no float twin to fall back to)
    ranked = [l for l in dict.fromkeys(r["layer"] for r in analysis if r["op"] in COMPUTE_OPS) if l and l not in kept]
    while trier.rows[best].val_drop_pp > options.max_drop and ranked and tries < options.search.max_float_layers:
        if out_of_time():
            return best, tries, f"time budget ({options.search.search_time:g} s) reached during the fallback"
        layer = ranked.pop(0)
        tries += 1
        trier.run(setting, kept + [layer], phase="fallback")
        r = compare(trier, best, len(trier.rows) - 1)
        progress(f"{fmt.value} INT8 fallback: {layer} in float -> {_describe(r)}")
        if _better(r):  # a float layer must earn its latency
            best, kept = len(trier.rows) - 1, kept + [layer]
    return best, tries, None


def search_and_fall_back(trier: _Trier, fmt: Format, options, tuning: TuningSplit, t_start: float,
                         progress) -> tuple[Try, Int8Record]:
    """Search, analyse the winner, fall back within the budget: the best try and the record of it all.

    ``trier`` makes and scores the files: ``run(setting, float_layers, phase) -> Try`` (kept in ``rows``),
    ``analyze(setting, file, n_images) -> ranked rows``, ``train`` (the training split); ``plan_int8`` passes
    one that converts for real, a test may pass a scripted one."""
    budget = options.max_drop
    out_of_time = lambda: time.perf_counter() - t_start > options.search.search_time  # noqa: E731
    w, stopped = _search(trier, fmt, options, tuning, out_of_time, progress)
    winner = trier.rows[w]
    layers = trier.analyze(winner.setting, winner.file, options.search.analysis_samples)
    b, fallback_tries, early = _fallback(trier, fmt, options, w, layers, out_of_time, progress)
    winner, best = trier.rows[w], trier.rows[b]
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
    act = ", 16x8" if r.activations == "int16" else ""
    ci = r.val_change_interval_pp
    top = f"{-r.val_drop_pp:+.2f} pp" + (f" [{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "")
    kl = "" if r.val_kl is None else f", KL {r.val_kl:.2e}"
    gain = "" if r.kl_gain is None else (f", KL reduction over {r.gain_vs} {r.kl_gain[0]:+.2e} "
                                         f"[{r.kl_gain[1]:+.2e}, {r.kl_gain[2]:+.2e}]"
                                         + (" (better beyond noise)" if _better(r) else " (within noise)"))
    return (f"{r.calib_samples} images, {r.method}{'' if r.per_channel else ', per-tensor'}{act}{fl}: "
            f"val top-1 {100 * r.val_top1:.2f} % ({top}), agreement {100 * r.val_agreement:.2f} %{kl}{gain}")
