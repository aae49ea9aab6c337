"""The parity check of an exported artifact against the float Keras model it came from.

The artifact runs through the runner ``bench`` uses (``runtimes.open_runner``) on the first test images
(``ExportOptions.parity_samples``); the figures (``metrics.parity``: max/mean |logit difference|, top-1
agreement; top-1 accuracy of both) go into the manifest's ``validation`` block as a ``ParityCheck``. A model
whose outputs are probabilities (a softmax last layer, detected on the float model's outputs by
``metrics.output_kind``) is recorded as such: ``output`` says "probabilities" and the differences are
repeated as ``*_prob_diff`` (the ``*_logit_diff`` keys stay, for readers of older manifests).

FP32 artifacts must match within a tolerance relative to the logit scale, or the export fails; the
other precisions are expected to drift and are judged by ``bench``, but a rough expectation is
recorded beside their figures.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from resnet_deploy import metrics
from resnet_deploy.config import Precision
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.envinfo import usable_cores
from resnet_deploy.errors import ExportError
from resnet_deploy.records import ParityCheck

# Rough agreement expected of lossy precisions on a trained model (recorded, not enforced).
EXPECTED_AGREEMENT = {Precision.FP16: 0.99, Precision.DYNAMIC_INT8: 0.97, Precision.INT8: 0.95}


@dataclass(frozen=True)
class Reference:
    """The float model's logits on the parity images, computed once per export."""

    images: np.ndarray  # uint8 RGB pixels, from the test split
    labels: np.ndarray
    logits: np.ndarray
    source: str  # e.g. "test[:256]"


def fp32_limit(ref_logits: np.ndarray, tolerance: float) -> float:
    """Allowed max |logit diff| for FP32: ``tolerance`` relative to the logit scale (at least 1)."""
    return float(tolerance * max(1.0, float(np.abs(ref_logits).max())))


def check_parity(path, preprocessing: Preprocessing, reference: Reference, precision: Precision,
                 fp32_tolerance: float = 1e-3) -> ParityCheck:
    """Run ``path`` on the reference images; raise ExportError when an FP32 artifact disagrees."""
    from resnet_deploy.runtimes import open_runner

    # every usable core (LiteRT's own default is one thread): the parity images are one big batch
    with open_runner(path, preprocessing=preprocessing, threads=usable_cores()) as runner:
        logits = runner.predict(reference.images)
    if not np.all(np.isfinite(logits)):
        raise ExportError(f"The {precision.value} artifact produced NaN or infinite logits.",
                          expected="finite logits like the float model's",
                          fix="check the preprocessing options and the calibration data")
    check = ParityCheck(**metrics.parity(logits, reference.logits), samples=int(len(reference.images)),
                        images=reference.source, runtime=runner.name,
                        top1_accuracy=metrics.top1(metrics.predictions(logits), reference.labels),
                        float_top1_accuracy=metrics.top1(metrics.predictions(reference.logits), reference.labels))
    if precision is Precision.FP32:
        return _judge_fp32(check, fp32_limit(reference.logits, fp32_tolerance))
    want = EXPECTED_AGREEMENT.get(precision)
    return replace(check, expected_top1_agreement=want, passed=None,
                   note="lossy precision: recorded, not enforced (bench gates accuracy)",
                   below_expectation=None if want is None else check.top1_agreement < want)


def _judge_fp32(check: ParityCheck, limit: float) -> ParityCheck:
    check = replace(check, tolerance={"max_abs_logit_diff": limit}, passed=check.max_abs_logit_diff <= limit)
    if not check.passed:
        raise ExportError(
            f"The FP32 artifact disagrees with the float model: max |{check.unit} diff| "
            f"{check.max_abs_logit_diff:.3g} > {limit:.3g}, top-1 agreement {check.top1_agreement:.1%} "
            f"on {check.samples} test images.",
            expected=f"an FP32 conversion that reproduces the Keras model's {check.output}",
            fix="the converter changed the model's maths; check custom layers, or report this model")
    return check
