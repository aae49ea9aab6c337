"""``run_bench``: the library entry point of ``resnet-deploy bench`` (and of the end-to-end pipeline).

Order of work:

1. which files take part (``selection``): identify each (format, manifest, sha256), find the float
   reference and the FP32 baselines, refuse mismatched and stale files;
2. the input contract (``contract``): one preprocessing for the reference, each artifact's own;
3. open every file in its own worker (``child``; a child process unless ``options.isolate`` is off);
4. time them all in interleaved rounds (``rounds``), read each one's memory;
5. the test-set pass of the files that need one: the artifacts named; the reference unless its
   logits are cached (``reference_cache``); never a baseline the tool added (its parity with the float
   model was proven at export and is in its manifest);
6. statistics, ratios with their intervals, gates (``compare``, ``gates``).

A file that cannot be measured gets an error in its result; the others still get theirs.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import numpy as np

from resnet_deploy.bench import reference_cache
from resnet_deploy.bench.child import WorkerFailed, open_worker
from resnet_deploy.bench.compare import fill_accuracy, fill_ratios
from resnet_deploy.bench.contract import file_preprocessing, resolve_contract
from resnet_deploy.bench.gates import evaluate_gates, not_gated
from resnet_deploy.bench.latency import summarize
from resnet_deploy.bench.measure import FileSpec
from resnet_deploy.bench.options import BenchOptions
from resnet_deploy.bench.results import ArtifactResult, BenchReport
from resnet_deploy.bench.rounds import RoundsPlan, SeriesFailed, interleaved_rounds, median_interval
from resnet_deploy.bench.selection import (add_baselines, assign_labels, cpu_override, expand_runtimes,
                                           find_baseline, identify, refuse_saturating, refuse_stale,
                                           resolve_reference)
from resnet_deploy.bench.measure import ACCURACY_CHUNK
from resnet_deploy.data.constants import IMAGE_SHAPE, NUM_CLASSES
from resnet_deploy.data.folder_data import check_model_classes, is_image_folder
from resnet_deploy.errors import BenchError
from resnet_deploy.metrics import output_kind
from resnet_deploy.runtimes.openvino_runner import precision_summary

Progress = Callable[[str], None]


def run_bench(artifact_paths: Iterable[str | os.PathLike], options: BenchOptions | None = None, data=None,
              progress: Progress | None = None) -> BenchReport:
    """Benchmark ``artifact_paths`` against their float model.

    ``data``: a ``Split`` (test images), a ``Cifar10`` (its test split is used) or None (loaded from
    ``options.data``); ``options.limit`` applies either way. Never raises for one bad artifact: its
    result carries the error. Raises BenchError for a run that cannot start (no artifacts, two
    float models, artifacts that disagree about the preprocessing, no data).

    With ``options.isolate`` (the default) each file is measured in a ``multiprocessing`` spawn child,
    so a script calling this must keep its top-level code under ``if __name__ == "__main__":``.
    """
    options = options or BenchOptions()
    progress = progress or (lambda msg: None)
    started = time.perf_counter()
    results, ref_path, ref_notes = _participants(artifact_paths, options)
    src = options.data if data is None else data
    contract = resolve_contract(results, ref_path, folder=is_image_folder(src), fit=getattr(src, "fit", None))
    if contract.decoding is not None:
        split, data_info = _folder_images(options, data, contract) if options.accuracy else \
            (None, _no_test_images(options))
        ref_notes += contract.notes
    else:
        split, data_info = _test_images(options, data) if options.accuracy else (None, _no_test_images(options))
    latency_images = _latency_images(split, options, contract) if options.latency else None
    cached = _cached_reference(results, contract, split, options, ref_notes)
    workers: dict = {}
    try:
        _open_all(workers, results, contract, latency_images, options, split, cached, progress)
        if options.latency:
            time_all(workers, results, options, progress)
        if split is not None:
            t_pass = time.perf_counter()
            split = _accuracy_passes(workers, results, split, options, progress)
            data_info["accuracy_pass_wall_s"] = time.perf_counter() - t_pass  # decoding and every file's pass
            _check_cached(results, split, cached, options, ref_notes)
            if contract.decoding is not None:
                data_info.update(images=len(split.y), class_counts=np.bincount(
                    split.y, minlength=split.num_classes).tolist(), notes=split.notes)
    except BaseException:  # Ctrl-C (KeyboardInterrupt) or a bug: the children go at once, not after their work
        for w in workers.values():
            w.close(kill=True)
        raise
    for w in workers.values():
        w.close()
    _store_reference(results, options, cached, ref_notes)
    reference = next((r for r in results if r.role == "reference" and r.ok), None)
    if ref_path is not None and reference is None:
        ref_notes.append("the float reference could not be measured (see its error): no float comparison")
    kind = output_kind(reference.logits if reference is not None else None)
    for r in results:
        if r.ok:
            fill_accuracy(r, reference, split, options, kind)
            fill_ratios(r, reference, find_baseline(r, results), options)
    report = BenchReport(
        machine=_machine(), libraries=_libraries(), options=options.to_dict(), data=data_info,
        reference={"label": reference.label if reference else None, "path": str(ref_path) if ref_path else None,
                   "notes": ref_notes, "input_contract": contract.describe(), "output": kind},
        results=results)
    report.gates = evaluate_gates(report, options)
    report.not_gated = not_gated(report, options)
    report.duration_s = time.perf_counter() - started
    return report


def _participants(artifact_paths, options: BenchOptions) -> tuple[list[ArtifactResult], Path | None, list[str]]:
    """The files of the run (reference first, then the artifacts, then the baselines added), as selected."""
    paths = [Path(p) for p in artifact_paths]
    if not paths:
        raise BenchError("No artifact to bench.", expected="one or more .tflite/.onnx/.keras paths",
                         fix="resnet-deploy bench artifacts/*.tflite")
    entries = _dedupe([identify(p, "artifact") for p in paths])
    if all(e.error for e in entries):  # nothing could run: said before any data is read or downloaded
        raise BenchError("Nothing to bench: " + " ".join(e.error["what"] for e in entries),
                         expected="at least one existing .tflite/.onnx/.keras file",
                         fix=entries[0].error["fix"] or "check the paths")
    ref_path, ref_notes = resolve_reference(entries, options.reference)
    entries = [e for e in entries if ref_path is None or not _same_file(e.path, ref_path)]
    ref_entry = identify(ref_path, "reference") if ref_path is not None else None
    if ref_entry is not None:
        entries.insert(0, ref_entry)
    ref_notes += refuse_stale(entries, ref_entry if ref_entry and not ref_entry.error else None, options.allow_stale)
    entries = expand_runtimes(entries, options.runtimes)
    ref_notes += refuse_saturating(entries, options.allow_saturating)
    if any(v is not None for v in cpu_override()):
        ref_notes.append(f"CPU taken as {cpu_override()} from $RESNET_DEPLOY_BENCH_MACHINE / "
                         "$RESNET_DEPLOY_BENCH_CPU_FLAGS when judging INT8 saturation")
    entries += add_baselines(entries, options.baselines and options.latency)
    assign_labels(entries)
    for e in entries:
        _selected(e)
    return entries, ref_path, ref_notes


def _selected(r: ArtifactResult) -> None:
    """What the report says of a file before it is measured: no size or sha256 for a file refused at
    selection; a baseline's parity with the float model as its export checked it."""
    if r.error:
        r.size_bytes = r.sha256 = None
    check = r.manifest.parity if r.manifest else None
    if r.role == "baseline" and check is not None and check.top1_agreement is not None:
        r.notes.append(f"no accuracy pass (a speed baseline): at export it agreed with the float model on "
                       f"{check.top1_agreement:.1%} of {check.samples} test images, max |Δ| "
                       f"{check.max_abs_logit_diff if check.max_abs_logit_diff is not None else float('nan'):.3g}")


def _open_all(workers: dict, results, contract, latency_images, options, split, cached, progress) -> None:
    """A worker per file that has work (latency, or an accuracy pass), put in ``workers`` as soon as it
    exists (so an interrupted run can end it); a failure to open is that file's error."""
    for i, r in enumerate(results):
        needs_pass = split is not None and _needs_accuracy_pass(r, cached is not None and cached["logits"] is not None)
        if not r.ok or not (options.latency or needs_pass):
            continue
        progress(f"loading {r.label} ({r.role})")
        pre, note = file_preprocessing(r, contract)
        if note:
            r.notes.append(note)
        spec = FileSpec(path=r.path, runtime=r.runtime_name, preprocessing=pre.to_dict(), threads=options.threads,
                        eval_batch_size=options.batch_size, latency_images=latency_images,
                        manifest_input=r.manifest.input.to_dict() if r.manifest else None,
                        num_classes=contract.num_classes, image_shape=contract.image_shape)
        worker = open_worker(spec, options.isolate, options.file_timeout_s(len(split) if needs_pass else 0),
                             max_memory=options.max_memory)
        workers[i] = worker
        try:
            opened = worker.call("open")
        except WorkerFailed as exc:
            r.error = exc.error
            workers.pop(i)
            continue
        r.runtime, r.io, r.timing = opened["runtime"], opened["io"], opened["timing"]
        summary = precision_summary(r.runtime)
        if summary:
            r.executed_precision = r.runtime.get("executed_precision")
            r.notes.append(summary)
        r.supports_batch = opened["supports_batch"]
        if r.precision == "unknown" and r.io["input"]["dtype"] in ("int8", "uint8"):
            r.notes.append(f"integer input ({r.io['input']['dtype']}): a full-integer model")
        r.memory = {"rss_scope": worker.rss_scope}


def _needs_accuracy_pass(e: ArtifactResult, cache_hit: bool) -> bool:
    if e.role == "baseline":
        return False  # added for the speed ratio only: its export-time parity is in its manifest
    return not (e.role == "reference" and cache_hit)


def time_all(workers: dict, results: list[ArtifactResult], options: BenchOptions, progress,
              clock=time.perf_counter) -> None:
    """Every open file at every batch size in interleaved rounds; then each one's memory. ``clock`` is
    the rounds' budget clock (a fake one in the drift test)."""
    series = {}
    for i, w in workers.items():
        for bs in options.batch_sizes:
            if bs > 1 and not results[i].supports_batch:
                results[i].latency[str(bs)] = {"skipped": "the model has a fixed batch size of 1"}
                continue
            series[(i, bs)] = _series_fn(w, i, bs)
    plan = RoundsPlan(warmup=options.warmup, min_runs=options.runs, min_time_s=options.min_time_s,
                      budget_s=options.max_time_s * max(1, len(series)), min_rounds=options.min_rounds,
                      steady_width=options.steady_width, confidence=options.confidence)
    rounds = interleaved_rounds(series, plan, clock=clock, progress=progress)
    for (i, bs), err in rounds.failed.items():
        if results[i].ok:
            results[i].error = err
            workers.pop(i, None)
    for (i, bs), per_round in rounds.times.items():
        r = results[i]
        if not r.ok:
            continue
        r.latency[str(bs)] = series_stats(per_round, bs, rounds, (i, bs), options)
        r.round_times[str(bs)] = per_round
    for i, w in list(workers.items()):
        try:
            results[i].memory.update(w.call("memory"))
        except WorkerFailed as exc:
            results[i].error = exc.error
            workers.pop(i)


def series_stats(per_round: list, bs: int, rounds, key, options: BenchOptions) -> dict:
    """``latency.summarize`` over all calls, plus the rounds: the per-round medians' interval and ``noisy``
    when that interval is wider than ``options.steady_width`` of the median (``cv`` stays as information:
    single calls of a sub-millisecond model scatter widely while their median holds still)."""
    stats = summarize(np.concatenate(per_round), bs, options.noisy_cv)
    est, lo, hi, coverage = median_interval([np.median(t) * 1e3 for t in per_round], options.confidence)
    steady = est > 0 and (hi - lo) / est <= options.steady_width
    return {**stats, "noisy": not steady, "warmup": rounds.warmup.get(key, 0), "rounds": len(per_round),
            "round_median_ms": est, "round_median_interval_ms": [lo, hi], "interval_coverage": coverage,
            "stopped": rounds.stopped}


def _series_fn(worker, i, bs):
    def run(n: int) -> np.ndarray:
        try:
            return worker.call("series", bs, n)
        except WorkerFailed as exc:
            raise SeriesFailed((i, bs), exc.error) from None
    return run


@dataclass
class Evaluated:
    """The images an accuracy pass ran on: their labels in order (an image folder's file that did not decode
    is not among them), the class count, and what the decoding said (conversions, skipped files)."""

    y: np.ndarray
    num_classes: int
    name: str = "test"
    notes: list = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.y)


PASS_CHUNK_BYTES = 64 << 20  # uint8 pixels per chunk of the pass: a few chunks are held (prefetch), never a split


def _pass_batches(split, chunk: int):
    """(pixels, labels) in order, ``chunk`` images at a time: rows of an array split, or an image folder's images
    decoded in bounded, prefetched batches (``FolderData.stream``): never the whole split in memory."""
    if hasattr(split, "stream"):
        stream = split.stream(batch_size=chunk)
        for b in stream:
            yield b.x, b.y
        split.note(stream)
        return
    for i in range(0, len(split), chunk):
        yield split.x[i:i + chunk], split.y[i:i + chunk]


def _accuracy_passes(workers: dict, results: list[ArtifactResult], split, options: BenchOptions,
                     progress) -> Evaluated:
    """Every file that needs a pass runs each chunk in turn, so each image is decoded once for all of them. A
    chunk is a whole number of evaluation batches (at most ``PASS_CHUNK_BYTES`` of pixels, 1,024 images at
    most), so each runtime sees the batches a whole-split call gives (the same logits, bit for bit, whether the
    images came from an array or a folder); an image folder holds the chunk being run and at most two decoded
    ahead."""
    todo = [i for i, w in workers.items()
            if results[i].ok and results[i].role != "baseline" and results[i].logits is None]
    bs = options.batch_size
    h, w = split.decoding.size if hasattr(split, "decoding") else split.x.shape[1:3]
    per_chunk = max(1, min(ACCURACY_CHUNK, PASS_CHUNK_BYTES // (int(h) * int(w) * 3)))  # 1,024 CIFAR images
    chunk = bs * max(1, per_chunk // bs)
    if todo:
        progress(f"test-set pass of {', '.join(results[i].label for i in todo)} ({len(split):,} images, "
                 f"{chunk} at a time)")
    parts: dict[int, list] = {i: [] for i in todo}
    spent: dict[int, float] = {i: 0.0 for i in todo}
    labels, done = [], 0
    for x, y in _pass_batches(split, chunk):
        labels.append(np.asarray(y))
        done += len(y)
        for i in list(parts):
            try:
                out = workers[i].call("logits", x)
            except WorkerFailed as exc:
                results[i].error = exc.error
                workers.pop(i)
                parts.pop(i)
                continue
            parts[i].append(out["logits"])
            spent[i] += out["accuracy_pass_s"]
        if todo:
            progress(f"accuracy {done:,}/{len(split):,}")
    for i, got in parts.items():
        results[i].logits = np.concatenate(got) if got else None
        results[i].timing["accuracy_pass_s"] = spent[i]
    y = np.concatenate(labels) if labels else np.zeros(0, np.int64)
    return Evaluated(y, getattr(split, "num_classes", NUM_CLASSES), split.name,
                     split.notes() if hasattr(split, "notes") else [])


def _check_cached(results, split: Evaluated, cached, options, notes) -> None:
    """Cached float logits must cover the images this pass decoded (an image folder whose decodable files
    changed): otherwise they are discarded and the reference has no figures this run (said so)."""
    ref = next((r for r in results if r.role == "reference"), None)
    if cached is None or cached["logits"] is None or ref is None or ref.logits is None:
        return
    if len(ref.logits) != len(split.y):
        reference_cache.discard(cached["key"], options.cache_dir)
        ref.logits = None
        notes.append(f"the cached float logits hold {len(cached['logits'])} images, this pass decoded "
                     f"{len(split.y)}: discarded; run again for the float comparison")


def _cached_reference(results, contract, split, options, notes) -> dict | None:
    """The reference's cached test-split logits ({key, logits, path}) or None; sets them on its result."""
    ref = next((r for r in results if r.role == "reference" and not r.error), None)
    if ref is None or split is None or not options.cache:
        return None
    if hasattr(split, "fingerprint"):  # an image folder: its content hash, with how its images are decoded
        fingerprint = reference_cache.folder_fingerprint(split)
        key = reference_cache.cache_key(ref.sha256, fingerprint, contract.preprocessing, len(split))
        logits = reference_cache.load(key, None, options.cache_dir, max_images=len(split),
                                      num_classes=contract.num_classes)
    else:
        key = reference_cache.cache_key(ref.sha256, reference_cache.data_fingerprint(split.x, split.y),
                                        contract.preprocessing, len(split))
        logits = reference_cache.load_verified(  # the float model re-run on random cached images: planted logits fail
            key, len(split), options.cache_dir, notes=notes,
            rerun=reference_cache.rerun_in_child(ref.path, split.x, contract.preprocessing, threads=options.threads))
    if logits is None:
        return {"key": key, "logits": None}
    ref.logits = logits
    path = reference_cache.cache_path(key, options.cache_dir)
    ref.notes.append(f"test-set logits from the cache ({path}): no float pass this run")
    notes.append(f"float logits read from the cache {path}")
    return {"key": key, "logits": logits}


def _store_reference(results, options, cached, notes) -> None:
    ref = next((r for r in results if r.role == "reference"), None)
    if ref is None or cached is None or cached["logits"] is not None or not ref.ok:
        return
    if ref.logits is not None:
        path = reference_cache.store(cached["key"], ref.logits, options.cache_dir)
        if path is not None:
            notes.append(f"float logits cached in {path} (--no-cache to bypass)")


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
    return split, {"source": str(source), "dataset": "CIFAR-10", "split": split.name, "images": len(split),
                   "limit": options.limit,
                   "class_counts": split.class_counts().tolist(),
                   "latency_images": f"the first {min(options.large_batch, len(split))} test images"}


def _no_test_images(options: BenchOptions) -> dict:
    return {"source": None, "split": None, "images": 0, "limit": options.limit, "class_counts": None,
            "latency_images": f"random pixels (seed {options.seed}): --no-accuracy loads no test images"}


def _folder_images(options: BenchOptions, data, contract):
    """An image folder's test/ split (else val/), decoded as the contract says (the manifests' input size and
    resize policy), limited to its first ``limit`` images; read lazily, never whole."""
    from resnet_deploy.data.folder_data import FolderData, eval_split_name, open_folder

    src = options.data if data is None else data
    strict = bool(getattr(src, "strict", False))
    folder = open_folder(src, strict=strict)
    check_model_classes(contract.num_classes, folder, contract.classes_from)
    if contract.class_names and list(contract.class_names) != list(folder.class_names):
        raise BenchError(f"The artifacts' manifests name the classes {', '.join(contract.class_names[:6])}, but the "
                         f"folder {folder.root} has {', '.join(folder.class_names[:6])} (sorted folder names).",
                         expected="the folder the artifacts were exported for: label i is the i-th class folder",
                         fix="bench on the folder the model was trained on, or rename its class folders")
    name = eval_split_name(folder)
    split = FolderData(folder, folder.split(name), contract.decoding, strict=strict)
    if options.limit is not None and options.limit < len(split):
        split = split.limited(options.limit)
    return split, {"source": str(folder.root), "dataset": "image folder", "split": name, "images": len(split),
                   "limit": options.limit, "class_names": list(folder.class_names),
                   "class_counts": split.class_counts().tolist(), "decoding": contract.decoding.record(),
                   "latency_images": f"the first {min(options.large_batch, len(split))} {name} images"}


def _latency_images(split, options: BenchOptions, contract=None) -> np.ndarray:
    n = options.large_batch
    if split is not None and len(split):
        if hasattr(split, "gather"):
            return split.gather(np.arange(min(n, len(split))))[0]
        return split.x[:n]
    shape = contract.image_shape if contract is not None else IMAGE_SHAPE
    return np.random.default_rng(options.seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _dedupe(entries: list[ArtifactResult]) -> list[ArtifactResult]:
    out: list[ArtifactResult] = []
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
