"""Figures that compare one measured file with another: accuracy against the float model, speed-ups
with their intervals over the interleaved rounds, size and memory ratios. The accuracy figures are
``metrics``'s, the one module every stage computes them with.
"""

from __future__ import annotations

from resnet_deploy import metrics as acc
from resnet_deploy.bench.results import ArtifactResult
from resnet_deploy.bench.rounds import speedup_over_rounds
from resnet_deploy.data.constants import NUM_CLASSES


def fill_accuracy(r: ArtifactResult, reference: ArtifactResult | None, split, options, kind: str) -> None:
    if r.logits is None or split is None:
        return
    classes = getattr(split, "num_classes", NUM_CLASSES)  # an image folder's class count
    r.accuracy = acc.accuracy_summary(r.logits, split.y, classes, options.confidence)
    if reference is not None and reference.logits is not None and r is not reference:
        r.vs_float = acc.compare_with_reference(r.logits, reference.logits, split.y, options.bootstrap,
                                                options.confidence, options.seed)
        r.vs_float["logit_error"]["output"] = kind


def fill_ratios(r: ArtifactResult, reference: ArtifactResult | None, baseline: ArtifactResult | None,
                options) -> None:
    if reference is not None and r is not reference:
        r.vs_float = {**(r.vs_float or {}), "label": reference.label, **ratios(r, reference, options)}
    if baseline is not None:
        r.vs_baseline = {"label": baseline.label, **ratios(r, baseline, options)}


def ratios(r: ArtifactResult, base: ArtifactResult, options) -> dict:
    """Speed-up per batch size (the median over rounds of base time / artifact time, with its interval and
    a ``noisy`` mark), throughput ratio, size reduction (base bytes / artifact bytes), memory ratios and
    first-inference ratio (artifact / base)."""
    out: dict = {"speedup": {}, "speedup_interval": {}, "speedup_detail": {}, "throughput_ratio": {}}
    for bs, rounds in r.round_times.items():
        s = speedup_over_rounds(base.round_times.get(bs) or [], rounds, options.confidence)
        if s is None:
            continue
        # noisy: a wide interval, too few rounds for the confidence asked, or a series that did not settle
        noisy = (s["relative_width"] > options.steady_width or s["coverage"] < options.confidence
                 or _noisy(r, bs) or _noisy(base, bs))
        out["speedup"][bs] = s["value"]
        out["speedup_interval"][bs] = s["interval"]
        out["speedup_detail"][bs] = {**s, "noisy": bool(noisy)}
        a, b = r.latency.get(bs) or {}, base.latency.get(bs) or {}
        if a.get("throughput_ips") and b.get("throughput_ips"):
            out["throughput_ratio"][bs] = a["throughput_ips"] / b["throughput_ips"]
    out["size_reduction"] = _ratio(base.size_bytes, r.size_bytes)
    out["peak_rss_ratio"] = _ratio(r.memory.get("peak_rss_bytes"), base.memory.get("peak_rss_bytes"))
    out["artifact_rss_ratio"] = _ratio(r.memory.get("artifact_rss_bytes"), base.memory.get("artifact_rss_bytes"))
    out["first_inference_ratio"] = _ratio(r.timing.get("first_inference_s"), base.timing.get("first_inference_s"))
    if r.accuracy and base.accuracy:
        out["top1_change_pp"] = 100.0 * (r.accuracy["top1"] - base.accuracy["top1"])
    return out


def _noisy(r: ArtifactResult, bs: str) -> bool:
    return bool((r.latency.get(bs) or {}).get("noisy"))


def _ratio(num, den) -> float | None:
    return float(num) / float(den) if num is not None and den not in (None, 0) else None
