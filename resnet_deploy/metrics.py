"""Every accuracy figure of the tool, pure numpy: top-1, per-class, confusion matrix, agreement with the
float model, logit error, the paired comparison of an artifact with the float model (accuracy change with
a bootstrap interval, exact McNemar test on the images where exactly one of them is right), what kind of
scores a model returns, and the two quick checks of the export: the parity figures against the float
model (``parity``) and an INT8 try's score on the tuning split (``tuning_score``).

Export's parity check, the INT8 search and bench all compute here, on logits their runners produced
(``runtimes.open_runner``). Every function takes arrays and returns numbers or plain dicts, so each has
known-answer tests.
"""

from __future__ import annotations

import math

import numpy as np


def predictions(logits: np.ndarray) -> np.ndarray:
    logits = np.asarray(logits)
    if logits.ndim != 2:
        raise ValueError(f"logits must be (N, classes), got shape {logits.shape}")
    return np.argmax(logits, axis=1)


def top1(pred: np.ndarray, y: np.ndarray) -> float:
    pred, y = _same_length(pred, y)
    return float(np.mean(pred == y)) if len(y) else float("nan")


def confusion_matrix(y: np.ndarray, pred: np.ndarray, num_classes: int) -> np.ndarray:
    """counts[i, j] = images of true class i predicted as class j."""
    pred, y = _same_length(pred, y)
    return np.bincount(y * num_classes + pred, minlength=num_classes * num_classes).reshape(num_classes, num_classes)


def per_class_accuracy(cm: np.ndarray) -> np.ndarray:
    """Recall of each class from a confusion matrix; NaN for a class with no images."""
    totals = cm.sum(axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(totals > 0, np.diag(cm) / np.maximum(totals, 1), np.nan)


def agreement(pred_a: np.ndarray, pred_b: np.ndarray) -> float:
    """Fraction of images on which two models predict the same class."""
    pred_a, pred_b = _same_length(pred_a, pred_b)
    return float(np.mean(pred_a == pred_b)) if len(pred_a) else float("nan")


def wilson_interval(correct: int, n: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion (well behaved near 0 and 1, unlike the normal one)."""
    if n == 0:
        return (float("nan"), float("nan"))
    z = _z(confidence)
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def logit_error(logits: np.ndarray, ref: np.ndarray) -> dict:
    """How far an artifact's logits are from the float model's on the same images."""
    a = np.asarray(logits, np.float64)
    r = np.asarray(ref, np.float64)
    if a.shape != r.shape:
        raise ValueError(f"logit shapes differ: {a.shape} vs {r.shape}")
    err = np.abs(a - r)
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(r, axis=1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where(norms > 0, np.sum(a * r, axis=1) / np.where(norms > 0, norms, 1), 1.0)
    ref_scale = float(np.mean(np.abs(r)))
    return {
        "max_abs": float(err.max()) if err.size else 0.0,
        "mean_abs": float(err.mean()) if err.size else 0.0,
        "rmse": float(np.sqrt(np.mean(err ** 2))) if err.size else 0.0,
        "p99_abs": float(np.percentile(err, 99)) if err.size else 0.0,
        "relative_mean_abs": float(err.mean() / ref_scale) if err.size and ref_scale > 0 else 0.0,
        "cosine_mean": float(np.mean(cos)) if len(cos) else 1.0,
        "cosine_min": float(np.min(cos)) if len(cos) else 1.0,
    }


def mcnemar_exact(losses: int, gains: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs.

    ``losses``: images the float model gets right and the artifact wrong; ``gains``: the reverse.
    Under "no difference" each discordant image is a fair coin: p = min(1, 2 * P(X <= min)),
    X ~ Binomial(losses + gains, 1/2). Computed with exact integers (correctly rounded at the end).
    """
    if losses < 0 or gains < 0:
        raise ValueError("counts must be non-negative")
    n = losses + gains
    if n == 0:
        return 1.0
    k = min(losses, gains)
    term = tail = 1  # C(n, 0)
    for i in range(k):
        term = term * (n - i) // (i + 1)  # C(n, i + 1), exact
        tail += term
    return min(1.0, 2 * tail / 2 ** n)


def paired_bootstrap_change(correct: np.ndarray, correct_ref: np.ndarray, n_boot: int = 2000,
                            confidence: float = 0.95, seed: int = 0) -> tuple[float, float, float]:
    """Accuracy change (artifact minus reference, in percentage points) and its paired bootstrap
    percentile interval.

    Resampling images with replacement and averaging d_i = correct_i - correct_ref_i depends only
    on how many resampled images have d = +1 and d = -1, which is one multinomial draw per
    resample: the exact paired bootstrap, at O(n_boot) cost instead of O(n_boot * N).
    """
    c, r = _same_length(np.asarray(correct, bool), np.asarray(correct_ref, bool))
    n = len(c)
    if n == 0:
        return (float("nan"), float("nan"), float("nan"))
    gains, losses = int(np.sum(c & ~r)), int(np.sum(~c & r))
    delta = 100.0 * (gains - losses) / n
    rng = np.random.default_rng(seed)
    draws = rng.multinomial(n, [gains / n, losses / n, (n - gains - losses) / n], size=n_boot)
    boot = 100.0 * (draws[:, 0] - draws[:, 1]) / n
    alpha = (1 - confidence) / 2
    lo, hi = np.quantile(boot, [alpha, 1 - alpha])
    return (delta, float(lo), float(hi))


def accuracy_summary(logits: np.ndarray, y: np.ndarray, num_classes: int, confidence: float = 0.95) -> dict:
    """Top-1 (with its Wilson interval), per-class accuracy and confusion matrix of one model."""
    pred = predictions(logits)
    cm = confusion_matrix(y, pred, num_classes)
    correct = int(np.trace(cm))
    lo, hi = wilson_interval(correct, len(y), confidence)
    return {"images": int(len(y)), "correct": correct, "top1": correct / len(y) if len(y) else float("nan"),
            "top1_interval": [lo, hi], "per_class": [_num(v) for v in per_class_accuracy(cm)],
            "confusion_matrix": cm.tolist()}


def compare_with_reference(logits: np.ndarray, ref_logits: np.ndarray, y: np.ndarray, n_boot: int = 2000,
                           confidence: float = 0.95, seed: int = 0) -> dict:
    """An artifact against the float model on the same images: change, interval, McNemar, agreement."""
    pred, ref_pred = predictions(logits), predictions(ref_logits)
    correct, correct_ref = pred == np.asarray(y), ref_pred == np.asarray(y)
    delta, lo, hi = paired_bootstrap_change(correct, correct_ref, n_boot, confidence, seed)
    gains, losses = int(np.sum(correct & ~correct_ref)), int(np.sum(~correct & correct_ref))
    return {
        "change_pp": delta,
        "change_interval_pp": [lo, hi],
        "interval": f"paired bootstrap, {n_boot} resamples, {confidence:.0%} percentile",
        "gains": gains,  # float model wrong, artifact right
        "losses": losses,  # float model right, artifact wrong
        "mcnemar_p": mcnemar_exact(losses, gains),
        "agreement": agreement(pred, ref_pred),
        "flips": int(np.sum(pred != ref_pred)),
        "logit_error": logit_error(logits, ref_logits),
    }


PROBABILITY_TOLERANCE = 1e-3  # |row sum - 1| and the excursion below 0 / above 1 allowed of probabilities


def output_kind(scores: np.ndarray | None, tolerance: float = PROBABILITY_TOLERANCE) -> str:
    """"probabilities" when every row is a distribution (all in [0, 1], summing to 1: a softmax last
    layer), else "logits". Judged on the float model's outputs, where rounding cannot blur it."""
    if scores is None or not len(scores):
        return "logits"
    s = np.asarray(scores, np.float64)
    in_range = s.min() >= -tolerance and s.max() <= 1 + tolerance
    return "probabilities" if in_range and bool(np.all(np.abs(s.sum(axis=1) - 1) <= tolerance)) else "logits"


def parity(logits: np.ndarray, ref: np.ndarray) -> dict:
    """Max and mean |difference| of an artifact's outputs from the float model's on the same images, top-1
    agreement, and what the outputs are (``output_kind`` of the float model's); a model that outputs
    probabilities also gets the differences under their true name (``*_prob_diff``)."""
    err = logit_error(logits, ref)
    out = {"max_abs_logit_diff": err["max_abs"], "mean_abs_logit_diff": err["mean_abs"],
           "top1_agreement": agreement(predictions(logits), predictions(ref)), "output": output_kind(ref)}
    if out["output"] == "probabilities":
        out.update(max_abs_prob_diff=out["max_abs_logit_diff"], mean_abs_prob_diff=out["mean_abs_logit_diff"])
    return out


def tuning_score(logits: np.ndarray, y: np.ndarray, float_logits: np.ndarray) -> dict:
    """An INT8 try on the tuning split: top-1, its drop against the float model (pp, positive = worse) and
    top-1 agreement with the float model, rounded as the manifest records them."""
    pred, float_pred = predictions(logits), predictions(float_logits)
    t1, float_t1 = top1(pred, y), top1(float_pred, y)
    return {"val_top1": round(t1, 6), "val_drop_pp": round(100 * (float_t1 - t1), 4),
            "val_agreement": round(agreement(pred, float_pred), 6)}


def kl_per_image(scores: np.ndarray, ref_scores: np.ndarray) -> np.ndarray:
    """KL(float model || artifact) per image, in nats, between the two class distributions: the scores themselves
    where the float model outputs probabilities (``output_kind``), else their softmax. A continuous score of how
    far an INT8 file moved from the float model, with far less sampling noise than a difference of top-1."""
    a, r = np.asarray(scores, np.float64), np.asarray(ref_scores, np.float64)
    if a.shape != r.shape:
        raise ValueError(f"score shapes differ: {a.shape} vs {r.shape}")
    if output_kind(ref_scores) == "probabilities":
        p, q = np.clip(r, 1e-12, None), np.clip(a, 1e-12, None)
        p, q = p / p.sum(1, keepdims=True), q / q.sum(1, keepdims=True)
        return np.sum(p * (np.log(p) - np.log(q)), axis=1)
    lp, lq = _log_softmax(r), _log_softmax(a)
    return np.sum(np.exp(lp) * (lp - lq), axis=1)


def _log_softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.sum(np.exp(z), axis=1, keepdims=True))


def paired_mean_interval(diffs: np.ndarray, confidence: float = 0.95) -> tuple[float, float, float]:
    """Mean of per-image paired differences and its normal-approximation interval (mean +- z * sd / sqrt(n));
    the images are the pairing, so two files scored on the same images differ by their own noise only."""
    d = np.asarray(diffs, np.float64).ravel()
    if len(d) < 2:
        return (float(d.mean()) if len(d) else float("nan"), float("nan"), float("nan"))
    m, half = float(d.mean()), _z(confidence) * float(d.std(ddof=1)) / math.sqrt(len(d))
    return (m, m - half, m + half)


def _same_length(a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    a, b = np.asarray(a).ravel(), np.asarray(b).ravel()
    if len(a) != len(b):
        raise ValueError(f"lengths differ: {len(a)} vs {len(b)}")
    return a.astype(np.int64) if a.dtype != bool else a, b.astype(np.int64) if b.dtype != bool else b


def _z(confidence: float) -> float:
    """Two-sided standard normal quantile, by bisection on erf (no scipy needed)."""
    target = (1 + confidence) / 2
    lo, hi = 0.0, 10.0
    for _ in range(80):
        mid = (lo + hi) / 2
        if 0.5 * (1 + math.erf(mid / math.sqrt(2))) < target:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def _num(v) -> float | None:
    return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)
