"""``run_bench``: the library entry point of ``resnet-deploy bench`` (and of the end-to-end pipeline).

Order of work: identify the files (format, manifest, precision), find the float reference and the
FP32 baselines, load the test split, measure every file (each in its own child process unless
``options.isolate`` is off), then compute the accuracy statistics and the ratios, and apply the gates.
A file that cannot be measured gets an error in its result; the others still get theirs.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from resnet_deploy.bench import accuracy as acc
from resnet_deploy.bench.gates import evaluate_gates, not_gated
from resnet_deploy.bench.options import BenchOptions
from resnet_deploy.bench.probe import ProbeJob, probe
from resnet_deploy.bench.resolve import (Entry, add_baselines, assign_labels, error_dict, find_baseline, identify,
                                         resolve_reference)
from resnet_deploy.bench.results import ArtifactResult, BenchReport
from resnet_deploy.data.constants import IMAGE_SHAPE, NUM_CLASSES
from resnet_deploy.errors import BenchError

Progress = Callable[[str], None]


def run_bench(artifact_paths: Iterable[str | os.PathLike], options: BenchOptions | None = None, data=None,
              progress: Progress | None = None) -> BenchReport:
    """Benchmark ``artifact_paths`` against their float model.

    ``data``: a ``Split`` (test images), a ``Cifar10`` (its test split is used) or None (loaded from
    ``options.data``); ``options.limit`` applies either way. Never raises for one bad artifact: its
    result carries the error. Raises BenchError for a run that cannot start (no artifacts, two
    float models, no data).

    With ``options.isolate`` (the default) each file is measured in a ``multiprocessing`` spawn child,
    so a script calling this must keep its top-level code under ``if __name__ == "__main__":``.
    """
    options = options or BenchOptions()
    say = progress or (lambda msg: None)
    started = time.perf_counter()
    paths = [Path(p) for p in artifact_paths]
    if not paths:
        raise BenchError("No artifact to bench.", expected="one or more .tflite/.onnx/.keras paths",
                         fix="resnet-deploy bench artifacts/*.tflite")
    entries = _dedupe([identify(p, "artifact") for p in paths])
    ref_path, ref_notes = resolve_reference(entries, options.reference)
    entries = [e for e in entries if ref_path is None or not _same_file(e.path, ref_path)]
    if ref_path is not None:
        entries.insert(0, identify(ref_path, "reference"))
    entries += add_baselines(entries, options.baselines)
    assign_labels(entries)
    split, data_info = _test_images(options, data) if options.accuracy else (None, _no_test_images(options))
    latency_images = _latency_images(split, options) if options.latency else None

    results = []
    for e in entries:
        say(f"measuring {e.label} ({e.role})")
        results.append(_measure(e, options, split, latency_images))
    reference = next((r for r in results if r.role == "reference" and r.ok), None)
    if ref_path is not None and reference is None:
        ref_notes.append("the float reference could not be measured (see its error): no float comparison")
    _check_source_hashes(entries, ref_path, ref_notes)
    for r, e in zip(results, entries):
        if r.ok:
            _fill_accuracy(r, reference, split, options)
            _fill_ratios(r, reference, _baseline_result(e, entries, results))
    report = BenchReport(
        machine=_machine(), libraries=_libraries(), options=options.to_dict(), data=data_info,
        reference={"label": reference.label if reference else None, "path": str(ref_path) if ref_path else None,
                   "notes": ref_notes},
        results=results)
    report.gates = evaluate_gates(report, options)
    report.not_gated = not_gated(report, options)
    report.duration_s = time.perf_counter() - started
    return report


def _measure(e: Entry, options: BenchOptions, split, latency_images) -> ArtifactResult:
    """One file's result. Never raises for a problem of the file: it becomes the result's error (and
    then only the file facts, ``size_bytes`` and ``sha256``, may be set besides it)."""
    r = ArtifactResult(label=e.label, path=str(e.path), role=e.role, format=e.format, precision=e.precision,
                       has_manifest=e.manifest is not None, notes=list(e.notes), error=e.error)
    if r.error:
        return r
    try:
        r.size_bytes, r.sha256 = _file_facts(e.path)
    except BenchError as exc:
        r.error = error_dict(exc)
        return r
    eval_images = split.x if split is not None else None
    job = ProbeJob(path=e.path, threads=options.threads, batch_sizes=options.batch_sizes, warmup=options.warmup,
                   runs=options.runs, min_time_s=options.min_time_s, max_time_s=options.max_time_s,
                   min_runs=options.MIN_TIMED_RUNS, noisy_cv=options.noisy_cv, latency_images=latency_images,
                   eval_images=eval_images, eval_batch_size=options.batch_size,
                   timeout_s=options.file_timeout_s(0 if eval_images is None else len(eval_images)))
    out = probe(job, isolate=options.isolate)
    r.error = out.get("error")
    if r.error:  # whatever was measured before the failure is not a result
        return r
    r.runtime, r.logits = out.get("runtime"), out.get("logits")
    r.timing, r.latency, r.memory = out.get("timing", {}), out.get("latency", {}), out.get("memory", {})
    if r.precision == "unknown" and (r.runtime or {}).get("input_dtype") in ("int8", "uint8"):
        r.notes.append(f"integer input ({r.runtime['input_dtype']}): a full-integer model")
    return r


def _file_facts(path: Path) -> tuple[int, str]:
    """Size and sha256 of an artifact; a BenchError for a file that cannot be read (never a hang on a
    FIFO or a device, which are refused)."""
    from resnet_deploy.artifact import file_facts

    if not (path.is_file() or path.is_dir()):
        raise BenchError(f"{path} is not a regular file or folder.",
                         expected="a .tflite/.onnx file, or a .keras file / SavedModel folder",
                         fix="bench the exported file itself")
    try:
        f = file_facts(path)
    except OSError as exc:
        raise BenchError(f"{path} cannot be read: {exc.strerror or exc}.",
                         expected="a readable artifact file",
                         fix="check the file's permissions and that the disk is readable; re-export it") from exc
    return f["size_bytes"], f["sha256"]


def _fill_accuracy(r: ArtifactResult, reference: ArtifactResult | None, split, options: BenchOptions) -> None:
    if r.logits is None or split is None:
        return
    r.accuracy = acc.accuracy_summary(r.logits, split.y, NUM_CLASSES, options.confidence)
    if reference is not None and reference.logits is not None and r is not reference:
        r.vs_float = acc.compare_with_reference(r.logits, reference.logits, split.y, options.bootstrap,
                                                options.confidence, options.seed)


def _fill_ratios(r: ArtifactResult, reference: ArtifactResult | None, baseline: ArtifactResult | None) -> None:
    if reference is not None and r is not reference:
        r.vs_float = {**(r.vs_float or {}), "label": reference.label, **ratios(r, reference)}
    if baseline is not None:
        r.vs_baseline = {"label": baseline.label, **ratios(r, baseline)}


def ratios(r: ArtifactResult, base: ArtifactResult) -> dict:
    """Speed-up (base p50 / artifact p50, per batch size), throughput ratio, size reduction
    (base bytes / artifact bytes), memory ratios and first-inference ratio (artifact / base)."""
    out: dict = {"speedup": {}, "throughput_ratio": {}}
    for bs, s in r.latency.items():
        b = base.latency.get(bs) or {}
        if "p50_ms" in s and "p50_ms" in b and s["p50_ms"] > 0:
            out["speedup"][bs] = b["p50_ms"] / s["p50_ms"]
            out["throughput_ratio"][bs] = s["throughput_ips"] / b["throughput_ips"]
    out["size_reduction"] = _ratio(base.size_bytes, r.size_bytes)
    out["peak_rss_ratio"] = _ratio(r.memory.get("peak_rss_bytes"), base.memory.get("peak_rss_bytes"))
    out["artifact_rss_ratio"] = _ratio(r.memory.get("artifact_rss_bytes"), base.memory.get("artifact_rss_bytes"))
    out["first_inference_ratio"] = _ratio(r.timing.get("first_inference_s"), base.timing.get("first_inference_s"))
    if r.accuracy and base.accuracy:
        out["top1_change_pp"] = 100.0 * (r.accuracy["top1"] - base.accuracy["top1"])
    return out


def _baseline_result(e: Entry, entries: list[Entry], results: list[ArtifactResult]) -> ArtifactResult | None:
    b = find_baseline(e, entries)
    if b is None:
        return None
    res = results[entries.index(b)]
    return res if res.ok else None


def _test_images(options: BenchOptions, data):
    from resnet_deploy.data.sources import Cifar10, Split, load_cifar10

    if data is None:
        ds = load_cifar10(options.data, splits=("test",))
        source, split = ds.source, ds.split("test")
    elif isinstance(data, Cifar10):
        source, split = data.source, data.split("test")
    elif isinstance(data, Split):
        source, split = "in-memory split given to run_bench", data
    else:
        raise BenchError(f"run_bench got data of type {type(data).__name__}.", expected="a Split, a Cifar10 or None")
    split = split.take(options.limit)
    return split, {"source": str(source), "split": split.name, "images": len(split), "limit": options.limit,
                   "class_counts": split.class_counts().tolist(),
                   "latency_images": f"the first {min(options.large_batch, len(split))} test images"}


def _no_test_images(options: BenchOptions) -> dict:
    return {"source": None, "split": None, "images": 0, "limit": options.limit, "class_counts": None,
            "latency_images": f"random pixels (seed {options.seed}): --no-accuracy loads no test images"}


def _latency_images(split, options: BenchOptions) -> np.ndarray:
    n = options.large_batch
    if split is not None and len(split):
        return split.x[:n]
    return np.random.default_rng(options.seed).integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)


def _check_source_hashes(entries: list[Entry], ref_path: Path | None, notes: list[str]) -> None:
    if ref_path is None or not ref_path.is_file():
        return
    from resnet_deploy.fileio import sha256_file

    sha = sha256_file(ref_path)
    stale = [e.label for e in entries if e.role != "reference" and e.source_sha256 and e.source_sha256 != sha]
    if stale:
        notes.append(f"the float model's sha256 differs from the one recorded when {', '.join(stale)} "
                     "were exported: it changed since; re-export or pass the original with --reference")


def _dedupe(entries: list[Entry]) -> list[Entry]:
    out: list[Entry] = []
    for e in entries:
        if not any(_same_file(e.path, o.path) for o in out):
            out.append(e)
    return out


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return a == b


def _machine() -> dict:
    from resnet_deploy.envinfo import machine_info

    return machine_info()


def _libraries() -> dict:
    from resnet_deploy.envinfo import library_versions

    return library_versions()


def _ratio(num, den) -> float | None:
    return float(num) / float(den) if num is not None and den not in (None, 0) else None
