"""The library entry point of `resnet-deploy export`: ``export_model(model_path, options, data)``.

An export reads as four steps, each one hop away:

1. **plan** (``planning.plan_export``): the artifacts' paths (existing ones refused before any work), the
   model, the preprocessing, the data, the float model's logits on the parity images, the tuning split and
   calibration sample, QAT; then per artifact its ``ArtifactPlan`` (``ExportPlan.artifact``: an
   accuracy-aware INT8 file's choices are made there);
2. **convert** (``_convert``): into a stage folder beside the final name (``fileio.Stage``), by the format's
   converter (``CONVERTERS``: ``tflite.convert``, ``onnx.convert``, each ``(session, plan)``); the export's
   ``session.ExportSession`` traces the model into a SavedModel once for every TFLite file and runs tf2onnx
   once (ONNX FP16 and INT8 are made from the FP32 ONNX file while its parity is checked);
3. **check parity** (``parity.check_parity``) of the staged file against the float logits: an FP32 mismatch
   fails the export and the stage is discarded;
4. **commit** (``_commit``): its manifest (``manifests.manifest_for``; sha256 and size read from the staged
   file, which is the file that becomes final) written into the stage, and the two committed: fsynced, the
   old artifact removed, the manifest renamed in, then the artifact.

Steps 3 and 4 of one artifact run in a worker thread while the next artifact converts (``_OneBehind``), in
order, one at a time: a failed check stops the export before anything after it is committed. A final-named
artifact therefore always has its own manifest beside it; a kill between the renames leaves a manifest
without an artifact (refused, or replaced under ``--force``), never an artifact with a wrong manifest.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from resnet_deploy.artifact import Manifest, file_facts
from resnet_deploy.config import Format, Precision
from resnet_deploy.converters import onnx as onnx_converter
from resnet_deploy.converters import parity
from resnet_deploy.converters import tflite as tflite_converter
from resnet_deploy.converters.base import ArtifactPlan, ConvertResult
from resnet_deploy.converters.manifests import manifest_for, shared_fields
from resnet_deploy.converters.options import ExportOptions
from resnet_deploy.converters.planning import ExportPlan, plan_export
from resnet_deploy.converters.session import ExportSession
from resnet_deploy.fileio import Stage, sidecar_path, write_json

# The registry: one module per format, each ``convert(session, plan) -> ConvertResult``.
CONVERTERS: dict[Format, Callable[[ExportSession, ArtifactPlan], ConvertResult]] = {
    Format.TFLITE: tflite_converter.convert, Format.ONNX: onnx_converter.convert}


@dataclass(frozen=True)
class ExportedArtifact:
    path: Path
    manifest: Manifest

    @property
    def format(self) -> str:
        return self.manifest.format

    @property
    def precision(self) -> str:
        return self.manifest.precision


def export_model(model_path: str | os.PathLike, options: ExportOptions, data=None,
                 progress: Callable[[str], None] | None = None) -> list[ExportedArtifact]:
    """Convert a float Keras model into the artifacts ``options`` asks for, each checked against it and with a
    manifest: plan, then per artifact convert, check parity, commit."""
    p = plan_export(model_path, options, data, progress)
    shared = shared_fields(p)
    with ExportSession(p.model) as session, _OneBehind(p.progress) as committed:
        if p.starts_onnx_process():
            session.start_onnx_process(p.model_path, options.opset, options.trust_model)
            p.progress("ONNX FP32: tf2onnx started in a second process, beside the TFLite conversions")
        for target in p.paths:
            job = p.artifact(target, session)
            if job is None:
                continue
            p.progress(f"{job.path.name}: {_how(job, session)}...")
            converted = _convert(session, job)
            committed.after(converted, lambda c=converted: _check_and_commit(c, p, shared))
        return committed.wait()


@dataclass
class _Converted:
    """An artifact converted into its stage (``fileio.Stage``), waiting for its parity check and commit."""

    stage: Stage  # the artifact under its final name; its manifest joins it there, and both are committed together
    job: ArtifactPlan  # its plan, writing into the stage
    final: Path
    result: ConvertResult
    convert_s: float

    def abort(self) -> None:
        """Discard the stage: the converted file never takes its name."""
        self.stage.discard()


def _convert(session: ExportSession, job: ArtifactPlan) -> _Converted:
    stage = Stage(job.path.parent)
    try:
        staged = job.at(stage.path(job.path.name))
        t0 = time.perf_counter()
        result = CONVERTERS[job.target.format](session, staged)
        return _Converted(stage, staged, job.path, result, time.perf_counter() - t0)
    except BaseException:
        stage.discard()
        raise


def _check_and_commit(c: _Converted, p: ExportPlan, shared: dict) -> ExportedArtifact:
    """Check the staged file's parity with the float model, write its manifest beside it in the stage, and
    commit the two (``Stage.commit``: the old artifact goes first, then the manifest takes its name, then the
    artifact). Until the commit the old pair under ``--force`` is intact: a failed conversion or check keeps it."""
    try:
        t0 = time.perf_counter()
        check = parity.check_parity(c.job.path, p.preprocessing, p.reference, c.job.target.precision,
                                    c.job.options.fp32_tolerance)
        timing = {"convert": round(c.convert_s, 3), "validate": round(time.perf_counter() - t0, 3)}
        # the staged file is the very file that becomes final: its sha256 and size are the artifact's
        manifest = manifest_for(c.job, c.final, c.result, check, shared, p.model_output, file_facts(c.job.path), timing)
        side = sidecar_path(c.final)
        write_json(c.stage.path(side.name), manifest.to_dict())
        c.stage.commit(c.final.name, side.name)
    finally:
        c.stage.discard()
    return ExportedArtifact(c.final, manifest)


class _OneBehind:
    """Runs each artifact's parity check and commit in a worker thread while the next artifact converts (the
    converters are mostly single-threaded, the runtimes release the GIL): one at a time, in order, the previous
    one finished before the next is handed over, so a failure stops the export before anything after it."""

    def __init__(self, progress):
        from concurrent.futures import ThreadPoolExecutor

        self.progress = progress
        self.done: list[ExportedArtifact] = []
        self._pending = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rd-validate")

    def __enter__(self) -> "_OneBehind":
        return self

    def after(self, converted: _Converted, finish: Callable[[], ExportedArtifact]) -> None:
        """Finish the previous artifact, then hand ``finish`` of this one to the worker."""
        try:
            self._collect()
        except BaseException:
            converted.abort()
            raise
        self._pending = self._pool.submit(finish)

    def wait(self) -> list[ExportedArtifact]:
        self._collect()
        return self.done

    def _collect(self) -> None:
        if self._pending is None:
            return
        fut, self._pending = self._pending, None
        art = fut.result()
        self.done.append(art)
        _report_done(art, self.progress)

    def __exit__(self, *exc) -> None:
        from concurrent.futures import wait

        if self._pending is not None:  # leaving on an error: the artifact in the worker finishes (or fails) first
            wait([self._pending])
        self._pool.shutdown(wait=True)


def _report_done(art: ExportedArtifact, progress) -> None:
    m, check = art.manifest, art.manifest.parity
    t = m.options["timing_s"]
    progress(f"{art.path.name}: {m.size_bytes / 1e6:.2f} MB, max |d{check.unit}| {check.max_abs_diff:.3g}, "
        f"top-1 agreement {check.top1_agreement:.1%} (converted in {t['convert']:.1f} s, validated in "
        f"{t['validate']:.1f} s)")


def _how(job: ArtifactPlan, session: ExportSession) -> str:
    """What converting ``job`` is about to do, for the progress line."""
    target = job.target
    if target.format is Format.TFLITE:
        first = not session.traced and not target.qat
        return ("tracing the model into a SavedModel (once per export), then converting" if first
                else "converting") + (" with calibration" if target.precision is Precision.INT8 else "")
    if target.precision is Precision.FP32:
        return "tf2onnx conversion (the only one of this export)"
    return ("quantizing the FP32 ONNX graph" if target.precision is Precision.INT8
            else "converting the FP32 ONNX graph to float16")
