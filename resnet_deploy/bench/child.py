"""Measure one artifact: load, check its I/O, first inference, latency, memory, test-set logits.

``probe`` runs in a fresh child process by default (``multiprocessing`` spawn), so the memory
figures are that child's alone, a runtime that crashes (a segfaulting interpreter on a corrupt
file) takes only its own child down, and one that hangs is killed after ``ProbeJob.timeout_s``.
The child's memory still holds the harness (Python, numpy, the runtime's import, the test images
it was sent): ``artifact_rss_bytes`` is the part loading and running the artifact added on top
of that baseline (see ``latency.MemoryMeter``). ``probe_in_process`` does the same work in this
process (its memory is then shared with the caller and earlier artifacts, flagged as such).
"""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import traceback
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnet_deploy.data.constants import IMAGE_SHAPE, NUM_CLASSES
from resnet_deploy.errors import BenchError, ResnetDeployError


@dataclass(frozen=True)
class ProbeJob:
    path: Path
    threads: int
    batch_sizes: tuple[int, ...]
    warmup: int
    runs: int
    min_time_s: float
    max_time_s: float
    min_runs: int
    noisy_cv: float
    latency_images: np.ndarray | None  # uint8 NHWC images timed batches are cut from; None: no latency
    eval_images: np.ndarray | None  # uint8 NHWC test images; None: no accuracy pass
    eval_batch_size: int = 256
    timeout_s: float | None = None  # an isolated child still running after this is killed; None: no limit


TIMED_OUT = object()  # what _receive returns when the child made no progress in time
PROGRESS = "progress"  # first item of the child's heartbeat messages
ACCURACY_CHUNK = 1024  # test images between two heartbeats of the accuracy pass (rounded to whole batches)


def probe(job: ProbeJob, isolate: bool = True) -> dict:
    """The measurements of one artifact as a dict; failures become ``{"error": {...}}``, never raise."""
    if not isolate:
        result = probe_in_process(job)
        if "error" not in result:
            result["memory"]["rss_scope"] = "process shared with the other artifacts of the run"
        return result
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child_main, args=(job, child), daemon=True)
    proc.start()
    child.close()
    result = None
    try:
        result = _receive(parent, proc, job.timeout_s)
    finally:
        parent.close()
        if result is not TIMED_OUT:
            proc.join(timeout=30)
        if proc.is_alive():  # hung (timed out), or sent its result but hangs in interpreter teardown
            proc.kill()
            proc.join()
    if result is TIMED_OUT:
        return {"error": _timeout_error(job.path, job.timeout_s)}
    return result if result is not None else {"error": _crash_error(job.path, proc.exitcode)}


def _receive(conn, proc, timeout_s: float | None = None):
    """The child's result; None when it died without sending one; ``TIMED_OUT`` when it made no
    progress for ``timeout_s`` seconds (None: wait as long as it lives). Progress is a
    ``(PROGRESS, stage)`` message, which the child sends after the load, after each latency series
    and after each accuracy chunk: a big model that is slow but working is never killed, a hung one
    is. Polls rather than trusting EOF: a descriptor inherited elsewhere can keep the pipe open after
    the child is gone."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if conn.poll(0.2):
            try:
                msg = conn.recv()
            except EOFError:
                return None
            if not _is_progress(msg):
                return msg
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            continue
        if not proc.is_alive():
            while conn.poll(0):
                msg = conn.recv()
                if not _is_progress(msg):
                    return msg
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return TIMED_OUT


def _is_progress(msg) -> bool:
    return isinstance(msg, tuple) and len(msg) == 2 and msg[0] == PROGRESS


def probe_in_process(job: ProbeJob, reset_peak: bool = False, progress=None) -> dict:
    """``probe``'s work in this process. ``reset_peak`` resets the process's RSS high-water mark at the
    baseline (done in the isolated child only: a caller's own process keeps its peak); ``progress(stage)``
    is called after each stage (the isolated child sends it to the parent as its heartbeat)."""
    try:
        return _measure(job, reset_peak, progress or (lambda stage: None))
    except ResnetDeployError as exc:
        return {"error": error_dict(exc)}
    except Exception as exc:  # a runtime failing in a way nobody anticipated: keep the traceback
        return {"error": error_entry(
            "unexpected " + type(exc).__name__,
            f"{type(exc).__name__} while benchmarking {job.path}: {str(exc)[:500]}",
            "the runtime loads and runs the artifact",
            "see the traceback; if the file is fine, this is a bug of resnet-deploy or of the runtime",
            traceback=traceback.format_exc(limit=8))}


def error_entry(kind: str, what: str, expected: str | None, fix: str | None, **extra) -> dict:
    """One ``errors[]`` entry: ``kind``, ``message`` (what/expected/fix rendered as one text), ``what``,
    ``expected``, ``fix`` (+ ``traceback`` for unexpected failures)."""
    message = ResnetDeployError(what, expected, fix).render()
    return {"kind": kind, "message": message, "what": what, "expected": expected, "fix": fix, **extra}


def error_dict(exc: ResnetDeployError) -> dict:
    """The ``errors[]`` entry of a user-facing error (its class name as ``kind``)."""
    return error_entry(type(exc).__name__, exc.what, exc.expected, exc.fix)


def _child_main(job: ProbeJob, conn) -> None:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    result = probe_in_process(job, reset_peak=True, progress=lambda stage: conn.send((PROGRESS, stage)))
    if "error" not in result:
        result["memory"]["rss_scope"] = "child process of this artifact alone"
    conn.send(result)
    conn.close()


def _crash_error(path: Path, exitcode: int | None) -> dict:
    how = f"exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        try:
            how = f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    return error_entry("crash", f"The runtime crashed while benchmarking {path} ({how}).",
                       "a runtime that loads and runs the artifact",
                       "the file may be corrupt or built for another runtime version; re-export it")


def _timeout_error(path: Path, timeout_s: float | None) -> dict:
    return error_entry("timeout", f"Benchmarking {path} made no progress within {timeout_s:g} s; its process "
                                  "was killed.",
                       "the load, each latency series and each accuracy chunk to finish within the per-file "
                       "timeout",
                       "the runtime may hang on this file (re-export it); if it is only slow, raise --timeout "
                       "or lower --limit / --max-time")


def _measure(job: ProbeJob, reset_peak: bool, progress) -> dict:
    from resnet_deploy.config import Format
    from resnet_deploy.runtimes import open_runner, runner_class
    from resnet_deploy.bench.latency import MemoryMeter, summarize, timed_runs
    from resnet_deploy.data.preprocess import preprocess

    t0 = time.perf_counter()
    fmt = Format.from_path(job.path)
    runner_class(fmt)
    _import_engine(fmt)  # the engine's import is part of what a user pays before the first inference
    import_s = time.perf_counter() - t0
    out: dict = {"timing": {"import_s": import_s}}
    meter = MemoryMeter(reset=reset_peak)  # the baseline: imports done, the test images already here
    t0 = time.perf_counter()
    with open_runner(job.path, threads=job.threads, batch_size=job.eval_batch_size) as runner:
        load_s = time.perf_counter() - t0
        check_io(runner)
        out["runtime"] = runner.describe()
        out["preprocessing"] = runner.preprocessing.to_dict()
        images = job.latency_images if job.latency_images is not None else _random_images(1)
        x1 = preprocess(images[:1], runner.preprocessing)
        t1 = time.perf_counter()
        first = runner.predict_preprocessed(x1)
        first_s = time.perf_counter() - t1
        _check_logits(first, 1, job.path)
        out["timing"].update(load_s=load_s, first_run_s=first_s, first_inference_s=load_s + first_s)
        progress("loaded")
        if job.latency_images is not None:
            out["latency"] = {}
            for bs in job.batch_sizes:
                if bs > 1 and not runner.supports_batch:
                    out["latency"][str(bs)] = {"skipped": "the model has a fixed batch size of 1"}
                    continue
                x = preprocess(_cycle(job.latency_images, bs), runner.preprocessing)
                times, warm = timed_runs(lambda: runner.predict_preprocessed(x), job.warmup, job.runs,
                                         job.min_time_s, job.max_time_s, job.min_runs)
                out["latency"][str(bs)] = {**summarize(times, bs, job.noisy_cv), "warmup": warm}
                progress(f"latency batch {bs}")
        out["memory"] = meter.read()
        if job.eval_images is not None:
            t2 = time.perf_counter()
            chunk = job.eval_batch_size * max(1, ACCURACY_CHUNK // job.eval_batch_size)
            parts = []
            for i in range(0, len(job.eval_images), chunk):
                parts.append(runner.predict(job.eval_images[i:i + chunk], batch_size=job.eval_batch_size))
                progress(f"accuracy {min(i + chunk, len(job.eval_images))}/{len(job.eval_images)}")
            logits = np.concatenate(parts) if parts else np.zeros((0, NUM_CLASSES), np.float32)
            out["timing"]["accuracy_pass_s"] = time.perf_counter() - t2
            _check_logits(logits, len(job.eval_images), job.path)
            out["logits"] = logits
    return out


def _import_engine(fmt) -> None:
    import importlib

    importlib.import_module({"keras": "keras", "tflite": "ai_edge_litert.interpreter", "onnx": "onnxruntime"}[fmt.value])


def check_io(runner) -> None:
    """A clear error for a model that does not take 32x32x3 images and return 10 scores."""
    in_shape, out_shape = _io_shapes(runner)
    if in_shape is None:
        return
    dims_ok = len(in_shape) == 4 and all(d is None or d == e for d, e in zip(in_shape[1:], IMAGE_SHAPE))
    out_ok = out_shape is None or (len(out_shape) == 2 and out_shape[-1] in (None, NUM_CLASSES))
    if not dims_ok or not out_ok:
        raise BenchError(f"{runner.path} takes input {_fmt(in_shape)} and returns {_fmt(out_shape)}.",
                         expected=f"a CIFAR-10 classifier: input (N, {', '.join(map(str, IMAGE_SHAPE))}) NHWC, "
                                  f"output (N, {NUM_CLASSES}) scores",
                         fix="bench an artifact exported from a CIFAR-10 model (`resnet-deploy export`)")


def _io_shapes(runner) -> tuple[tuple | None, tuple | None]:
    if hasattr(runner, "input_detail"):  # LiteRT
        return (tuple(int(d) for d in runner.input_detail["shape"]),
                tuple(int(d) for d in runner.output_detail["shape"]))
    if hasattr(runner, "session"):  # ONNX Runtime: dynamic dimensions are strings or None
        dims = lambda shape: tuple(d if isinstance(d, int) else None for d in shape)  # noqa: E731
        return dims(runner.session.get_inputs()[0].shape), dims(runner.session.get_outputs()[0].shape)
    return None, None  # Keras: load_model has checked the I/O already


def _check_logits(logits: np.ndarray, n: int, path: Path) -> None:
    if logits.shape != (n, NUM_CLASSES) or not np.all(np.isfinite(logits)):
        bad = "non-finite values" if logits.shape == (n, NUM_CLASSES) else f"shape {logits.shape}"
        raise BenchError(f"{path} returned {bad} for {n} images.",
                         expected=f"({n}, {NUM_CLASSES}) finite logits", fix="re-export the artifact")


def _cycle(images: np.ndarray, n: int) -> np.ndarray:
    reps = -(-n // len(images))
    return np.concatenate([images] * reps)[:n] if reps > 1 else images[:n]


def _random_images(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *IMAGE_SHAPE), dtype=np.uint8)


def _fmt(shape) -> str:
    return "(" + ", ".join("N" if d is None else str(d) for d in shape) + ")" if shape is not None else "?"
