"""Parity of an exported artifact against the float Keras model it came from.

The artifact runs through the same runner ``bench`` uses (``runtimes.open_runner``) on a fixed set
of test images; the figures (max/mean |logit difference|, top-1 agreement, top-1 accuracy of both)
go into the manifest. A model whose outputs are probabilities (a softmax last layer, detected on the
float model's outputs by ``output_kind``) is recorded as such: ``output`` says
"probabilities" and ``max_abs_prob_diff``/``mean_abs_prob_diff`` repeat the differences under their
true name (the ``*_logit_diff`` keys stay, for readers of older manifests).

FP32 artifacts must match within a tolerance relative to the logit scale, or the export fails; the
other precisions are expected to drift and are judged by ``bench``, but a rough expectation is
recorded beside their figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from resnet_deploy.config import Precision
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.envinfo import usable_cores
from resnet_deploy.errors import ExportError

# Rough agreement expected of lossy precisions on a trained model (recorded, not enforced).
EXPECTED_AGREEMENT = {Precision.FP16: 0.99, Precision.DYNAMIC_INT8: 0.97, Precision.INT8: 0.95}


@dataclass(frozen=True)
class Reference:
    """The float model's logits on the validation images, computed once per export."""

    images: np.ndarray  # uint8 RGB pixels, from the test split
    labels: np.ndarray
    logits: np.ndarray
    source: str  # e.g. "test[:256]"


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
    diff = np.abs(logits.astype(np.float64) - ref.astype(np.float64))
    out = {"max_abs_logit_diff": float(diff.max()), "mean_abs_logit_diff": float(diff.mean()),
           "top1_agreement": float((logits.argmax(1) == ref.argmax(1)).mean()), "output": output_kind(ref)}
    if out["output"] == "probabilities":
        out.update(max_abs_prob_diff=out["max_abs_logit_diff"], mean_abs_prob_diff=out["mean_abs_logit_diff"])
    return out


def fp32_limit(ref_logits: np.ndarray, tolerance: float) -> float:
    """Allowed max |logit diff| for FP32: ``tolerance`` relative to the logit scale (at least 1)."""
    return float(tolerance * max(1.0, float(np.abs(ref_logits).max())))


def validate_artifact(path, preprocessing: Preprocessing, reference: Reference, precision: Precision,
                      fp32_tolerance: float = 1e-3) -> dict:
    """Run ``path`` on the reference images; raise ExportError when an FP32 artifact disagrees."""
    from resnet_deploy.runtimes import open_runner

    # every usable core (LiteRT's own default is one thread): the validation images are one big batch
    with open_runner(path, preprocessing=preprocessing, threads=usable_cores()) as runner:
        logits = runner.predict(reference.images)
    if not np.all(np.isfinite(logits)):
        raise ExportError(f"The {precision.value} artifact produced NaN or infinite logits.",
                          expected="finite logits like the float model's",
                          fix="check the preprocessing options and the calibration data")
    fig = parity(logits, reference.logits)
    fig.update(samples=int(len(reference.images)), images=reference.source,
               top1_accuracy=float((logits.argmax(1) == reference.labels).mean()),
               float_top1_accuracy=float((reference.logits.argmax(1) == reference.labels).mean()),
               runtime=runner.name)
    if precision is Precision.FP32:
        limit = fp32_limit(reference.logits, fp32_tolerance)
        fig.update(tolerance={"max_abs_logit_diff": limit}, passed=fig["max_abs_logit_diff"] <= limit)
        if not fig["passed"]:
            what = "prob" if fig["output"] == "probabilities" else "logit"
            raise ExportError(
                f"The FP32 artifact disagrees with the float model: max |{what} diff| "
                f"{fig['max_abs_logit_diff']:.3g} > {limit:.3g}, top-1 agreement {fig['top1_agreement']:.1%} "
                f"on {fig['samples']} test images.",
                expected=f"an FP32 conversion that reproduces the Keras model's {fig['output']}",
                fix="the converter changed the model's maths; check custom layers, or report this model")
    else:
        want = EXPECTED_AGREEMENT.get(precision)
        fig.update(expected_top1_agreement=want, passed=None,
                   note="lossy precision: recorded, not enforced (bench gates accuracy)")
        if want is not None:
            fig["below_expectation"] = fig["top1_agreement"] < want
    return fig
