"""The library entry point of `resnet-deploy export`: ``export_model(model_path, options, data)``.

Order of work, so that bad input costs nothing and loses nothing:

1. plan the artifacts, clear the stage folders a killed export left beside them (``fileio.sweep_stages``), and refuse
   existing ones (artifact or manifest) unless ``force``;
2. load the model safely (a non-model, truncated or non-CIFAR model is a ModelError, nothing written);
3. resolve the preprocessing (model metadata, else options, else raw pixels) and load CIFAR-10;
4. compute the float model's logits on the validation images and build the calibration sample (with
   ``--accuracy-aware``/``--int8-max-drop``/``--analyze``, first an INT8 validation split of training images,
   disjoint from calibration; ``int8_search`` then picks each INT8 file's calibration and float layers);
5. per artifact: convert into a stage folder beside the final name (``fileio.Stage``; the float model is
   traced once into a SavedModel for every TFLite file, and tf2onnx runs once: ONNX FP16 and INT8 are made
   from the FP32 ONNX file while it is validated, committed after it passes; ``base.ExportWork``), validate
   that file against the float logits
   (an FP32 mismatch fails the export and the stage is discarded), write its manifest into the stage
   (sha256 and size read from the staged file, which is the file that becomes final), and commit the two:
   fsynced, the old artifact removed, the manifest renamed in, then the artifact. A final-named artifact
   therefore always has its own manifest beside it; a kill between the renames leaves a manifest without
   an artifact (refused, or replaced under ``--force``), never an artifact with a wrong manifest.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

from resnet_deploy.artifact import Manifest, file_facts
from resnet_deploy.config import Format, Precision
from resnet_deploy.converters import onnx as onnx_converter
from resnet_deploy.converters import tflite as tflite_converter
from resnet_deploy.converters.base import ExportWork
from resnet_deploy.converters.options import ExportOptions, Target
from resnet_deploy.data.constants import CLASS_NAMES
from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.errors import ExportError, OutputExistsError
from resnet_deploy.fileio import Stage, sha256_file, sidecar_path, sweep_stages, write_json

# The registry: one module per format, each ``convert(model, out_path, target, options, calibration, work)``.
CONVERTERS: dict[Format, Callable] = {Format.TFLITE: tflite_converter.convert, Format.ONNX: onnx_converter.convert}


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


def plan(model_path: str | os.PathLike, options: ExportOptions) -> dict[Target, Path]:
    """Where each artifact of ``options`` goes: ``<out>/<model-stem>_<precision>.<ext>``, the ONNX INT8 file
    ``<out>/<model-stem>_int8_<scheme>.onnx`` (the scheme of ``options.int8_target``, resolved on this CPU
    for ``host``)."""
    model_path = Path(model_path)
    out_dir = Path(options.out_dir) if options.out_dir else model_path.resolve().parent
    stem = model_path.name if model_path.is_dir() else model_path.stem
    return {t: out_dir / t.file_name(stem) for t in options.targets()}


def _refuse_existing(paths: dict[Target, Path], force: bool) -> None:
    """Delete the stage folders a killed export left beside these artifacts (never finished files, never a
    live process's: ``fileio.sweep_stages``), then refuse existing artifacts or manifests unless ``force``."""
    for folder in dict.fromkeys(path.parent for path in paths.values()):
        sweep_stages(folder)
    if force:
        return
    taken = [str(p) for path in paths.values() for p in (path, sidecar_path(path)) if p.exists()]
    orphans = [p.name for p in paths.values() if sidecar_path(p).exists() and not p.exists()]
    if taken:
        note = (f" ({', '.join(orphans)}: manifest without its artifact, left by an interrupted export)"
                if orphans else "")
        raise OutputExistsError(f"Refusing to overwrite {len(taken)} existing file(s): {', '.join(taken)}{note}",
                                expected="an output folder without these artifacts",
                                fix="pass --force to replace them, or --out to write elsewhere")


def resolve_preprocessing(metadata: dict | None, given: Preprocessing | None) -> tuple[Preprocessing, str]:
    """The model's recorded preprocessing wins; options fill in for models without metadata."""
    recorded = metadata.get("preprocessing") if metadata else None
    if recorded:
        spec = Preprocessing.from_dict(recorded)
        if given is not None and given != spec:
            raise ExportError(f"The preprocessing options (scale {given.scale:g}, mean {given.mean}, std {given.std}) "
                              f"contradict the model's metadata (scale {spec.scale:g}, mean {spec.mean}, std {spec.std}).",
                              expected="preprocessing options only for models without metadata",
                              fix="drop --mean/--std/--input-range, or fix the model's .json sidecar")
        return spec, "model metadata"
    if given is not None:
        return given, "export options"
    return Preprocessing.pixels(), "default (no metadata, no options): float32 RGB pixels 0..255"


def export_model(model_path: str | os.PathLike, options: ExportOptions, data=None,
                 progress: Callable[[str], None] | None = None) -> list[ExportedArtifact]:
    """Convert a float Keras model into the artifacts ``options`` asks for, each validated and with a manifest."""
    from resnet_deploy.converters.calibration import build_calibration
    from resnet_deploy.data.sources import load_cifar10
    from resnet_deploy.models.io import load_model, read_metadata

    say = progress or (lambda msg: None)
    model_path = Path(model_path)
    paths = plan(model_path, options)
    _refuse_existing(paths, options.force)
    if any(t.format is Format.ONNX and t.precision is Precision.INT8 for t in paths):
        say(options.onnx_int8().describe())
    model = load_model(model_path, trust=options.trust_model)
    _check_float_layers(model, options.int8_float_layers)
    metadata = read_metadata(model_path)
    spec, spec_source = resolve_preprocessing(metadata, options.preprocessing)
    say(f"model {model_path} ({model.count_params():,} params), preprocessing from {spec_source}")
    needs_train = options.needs_calibration or options.qat_epochs > 0
    ds = load_cifar10(data, splits=("train", "test") if needs_train else ("test",))
    reference = _reference(model, ds.test, options.validate_samples, spec)
    output = model_output(model, reference.logits)
    if output["kind"] == "probabilities":
        say(f"NOTE: {output['note']}")
    calibration, val = None, None
    if options.needs_validation_split:
        from resnet_deploy.converters.int8_search import build_validation

        val = build_validation(model, ds.train, options, spec, with_logits=options.int8_aware)
        say(f"INT8 validation split: {len(val.y)} training images, seed {options.val_seed}, "
            f"indices {val.recipe['indices_sha256_16']} (decides INT8 settings; the test split only reports)")
    if options.needs_calibration:
        calibration = build_calibration(ds.train, options.calib_samples, options.calib_seed, spec,
                                        exclude=None if val is None else val.indices)
        say(f"calibration: {len(calibration)} training images, seed {options.calib_seed}, "
            f"indices {calibration.recipe['indices_sha256_16']}")
    qat_model, qat_info = None, None
    if options.qat_epochs:
        from resnet_deploy.converters.qat import qat_finetune

        qat_model, qat_info = qat_finetune(model, metadata, ds.train, spec, options, say,
                                           exclude=None if val is None else val.indices)
    common = _common_manifest_fields(model_path, metadata, spec, spec_source)
    common["model_output"] = output
    with ExportWork(model) as work:
        if _starts_onnx_process(paths, options, model):
            work.start_onnx_process(model_path, options.opset, options.trust_model)
            say("ONNX FP32: tf2onnx started in a second process, beside the TFLite conversions")
        return _export_all(model, paths, options, calibration, val, reference, spec, common, ds, qat_model,
                           qat_info, work, say)


def _starts_onnx_process(paths: dict[Target, Path], options: ExportOptions, model) -> bool:
    """tf2onnx beside the TFLite conversions: when there is an FP32 ONNX file to make and TFLite work to overlap
    it with, for a large model (``onnx_process.wanted``)."""
    from resnet_deploy.converters.onnx_process import wanted

    formats = {t.format for t in paths}
    return (Target(Format.ONNX, Precision.FP32) in paths and Format.TFLITE in formats
            and wanted(options.parallel_onnx, model.count_params()))


def _export_all(model, paths: dict[Target, Path], options: ExportOptions, calibration, val, reference, spec,
                common: dict, ds, qat_model, qat_info, work: ExportWork, say) -> list[ExportedArtifact]:
    """Convert each artifact in turn; each one's validation, manifest and commit run in a worker thread while
    the next one converts (the converters are mostly single-threaded, the runtimes release the GIL), in
    order, one at a time: a failed validation stops the export before anything after it is committed."""
    from concurrent.futures import ThreadPoolExecutor, wait

    out: list[ExportedArtifact] = []
    pending = None  # the previous artifact's validation and commit, in the worker
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rd-validate")

    def collect():
        nonlocal pending
        if pending is None:
            return
        fut, pending = pending, None
        art = fut.result()
        out.append(art)
        _say_done(art, say)

    try:
        for target, path in paths.items():
            src = qat_model if target.qat else model
            extra = {"qat": qat_info} if target.qat else {}
            opts, cal = options, calibration
            if target.qat and qat_info.get("judged", {}).get("keep") is False:
                left = " (the existing file of that name is left as it was)" if path.exists() else ""
                say(f"{path.name}: not written{left}: {qat_info['judged']['note']}")
                continue
            if val is not None and target.precision is Precision.INT8 and not target.qat:
                opts, cal, extra["int8_accuracy"] = _plan_int8(model, target, options, ds.train, spec, val,
                                                               calibration, say, work)
                if qat_model is not None and target.format is Format.TFLITE and options.int8_aware:
                    judged = _judge_qat(qat_model, options, cal, val, extra["int8_accuracy"], say)
                    judged["fine_tuning"] = {k: qat_info[k] for k in ("samples", "indices_sha256_16", "learning_rate",
                                                                      "batchnorm", "disjoint_from_validation")}
                    qat_info["judged"] = extra["int8_accuracy"]["qat"] = judged
            say(f"{path.name}: {_how(target, work)}...")
            converted = _convert_one(src, path, target, opts, cal, work)
            try:
                collect()  # the previous artifact: validated and committed before this one may be
            except BaseException:
                converted.abort()
                raise
            pending = pool.submit(_finish_one, converted, reference, spec, common, extra)
        collect()
    finally:
        if pending is not None:  # leaving on an error: the artifact in the worker finishes (or fails) first
            wait([pending])
        pool.shutdown(wait=True)
    return out


def _say_done(art: ExportedArtifact, say) -> None:
    m = art.manifest
    v, t = m.validation, m.options["timing_s"]
    unit = "prob" if v.get("output") == "probabilities" else "logit"
    say(f"{art.path.name}: {m.size_bytes / 1e6:.2f} MB, max |d{unit}| {v[f'max_abs_{unit}_diff']:.3g}, "
        f"top-1 agreement {v['top1_agreement']:.1%} (converted in {t['convert']:.1f} s, validated in "
        f"{t['validate']:.1f} s)")


def _how(target: Target, work: ExportWork) -> str:
    """What converting ``target`` is about to do, for the progress line."""
    if target.format is Format.TFLITE:
        first = work._saved_model is None and not target.qat
        return ("tracing the model into a SavedModel (once per export), then converting" if first
                else "converting") + (" with calibration" if target.precision is Precision.INT8 else "")
    if target.precision is Precision.FP32:
        return "tf2onnx conversion (the only one of this export)"
    return ("quantizing the FP32 ONNX graph" if target.precision is Precision.INT8
            else "converting the FP32 ONNX graph to float16")


def model_output(model, float_outputs: np.ndarray) -> dict:
    """What the float model outputs: ``logits`` (the convention) or ``probabilities``, judged on its outputs
    (``validate.output_kind``), with the last layer's activation when it is a softmax."""
    from resnet_deploy.converters.validate import output_kind

    kind = output_kind(float_outputs)
    last = model.layers[-1] if getattr(model, "layers", None) else None
    act = getattr(getattr(last, "activation", None), "__name__", None)
    softmax_layer = bool(last is not None and (act == "softmax" or type(last).__name__ == "Softmax"))
    out = {"kind": kind, "last_layer": None if last is None else last.name, "softmax_last_layer": softmax_layer}
    if kind == "probabilities":
        cause = (f"its last layer {last.name!r} is a softmax" if softmax_layer
                 else "every output row is a distribution (in [0, 1], summing to 1)")
        out["note"] = (f"this model outputs probabilities, not logits ({cause}). The artifacts keep it: their "
                       "outputs are probabilities too, parity is measured in probabilities (max |dprob|), and bench "
                       "labels them 'prob'. Export the model without its final softmax for the logits "
                       "convention.")
    return out


def _check_float_layers(model, names) -> None:
    """``--int8-float-layers`` must name conv/dense layers of this model: said before any data is read."""
    from resnet_deploy.converters.int8_analysis import COMPUTE_CLASSES, keras_layer_index

    index = keras_layer_index(model)
    bad = [n for n in names if index.get(n, ("",))[0] not in COMPUTE_CLASSES]
    if bad:
        known = [n for n, (cls, _) in index.items() if cls in COMPUTE_CLASSES]
        raise ExportError(f"--int8-float-layers names {bad}, which {'is' if len(bad) == 1 else 'are'} not a conv or "
                          "dense layer of this model.",
                          expected=f"names of its compute layers, e.g. {', '.join(known[:6])}",
                          fix="take the names from the table of --analyze")


def _plan_int8(model, target: Target, options: ExportOptions, train, spec: Preprocessing, val, calibration, say,
               work=None):
    """Accuracy-aware INT8 (``int8_search.plan_int8``), or with ``--analyze`` alone the per-layer table of the
    plain export. Returns the options and calibration to convert with, and the manifest's ``int8_accuracy``."""
    from resnet_deploy.converters.int8_search import analysis_only, plan_int8

    if options.int8_aware:
        opts, cal, record = plan_int8(model, target.format, options, train, spec, val, say, work)
    else:
        opts, cal, record = options, calibration, analysis_only(model, target.format, options, train, spec, val,
                                                                calibration, work)
    record["calibration_indices_sha256_16"] = cal.recipe["indices_sha256_16"]
    record["validation_indices_sha256_16"] = val.recipe["indices_sha256_16"]
    record["disjoint"] = not np.intersect1d(val.indices, cal.indices).size  # checked, not assumed
    return opts, cal, record


def _judge_qat(qat_model, options: ExportOptions, calibration, val, ptq: dict, say) -> dict:
    """Score the QAT INT8 TFLite file on the validation split beside the accuracy-aware PTQ one; QAT is
    kept only when its validation top-1 is higher (a tie keeps PTQ, the simpler file)."""
    import tempfile

    from resnet_deploy.converters.int8_search import predict_tflite, score

    with tempfile.TemporaryDirectory(prefix="rd-qat-") as tmp:
        path = Path(tmp) / "qat.tflite"
        tflite_converter.convert(qat_model, path, Target(Format.TFLITE, Precision.INT8, qat=True), options, calibration)
        q = score(predict_tflite(path, val.x), val)
    p = ptq["result"]
    margin = round(100 * (q["val_top1"] - p["val_top1"]), 4)
    keep = margin > 0
    note = (f"QAT won on the validation split: top-1 {100 * q['val_top1']:.2f} % against PTQ's "
            f"{100 * p['val_top1']:.2f} % ({margin:+.2f} pp)" if keep else
            f"PTQ won on the validation split: QAT top-1 {100 * q['val_top1']:.2f} % against PTQ's "
            f"{100 * p['val_top1']:.2f} % ({margin:+.2f} pp); the QAT file is not kept")
    say(note)
    return {"keep": keep, "winner": "qat" if keep else "ptq", "margin_pp": margin, "note": note,
            "qat": q, "ptq": {k: p[k] for k in ("val_top1", "val_drop_pp", "val_agreement")}}


def _reference(model, test, n: int, spec: Preprocessing):
    from resnet_deploy.converters.validate import Reference

    split = test.take(n)
    x = preprocess(split.x, spec)
    logits = np.concatenate([np.asarray(model(x[i:i + 256], training=False)) for i in range(0, len(x), 256)])
    return Reference(split.x, split.y, logits.astype(np.float32), f"test[:{len(split)}]")


def _common_manifest_fields(model_path: Path, metadata: dict | None, spec: Preprocessing, spec_source: str) -> dict:
    from resnet_deploy.envinfo import library_versions, machine_info

    meta = metadata or {}
    pre = spec.to_dict()
    pre["source"] = spec_source
    return {
        "preprocessing": pre,
        "class_names": list(meta.get("class_names") or CLASS_NAMES),
        # where the model was; each manifest adds "path", relative to its artifact (source_relative_to)
        "source_model": {"abs_path": str(model_path.resolve()), "sha256": sha256_file(model_path),
                         "architecture": meta.get("architecture"), "width": meta.get("width"),
                         "stem": meta.get("stem"), "has_metadata": metadata is not None},
        "libraries": library_versions(),
        "machine": machine_info(),
    }


def source_relative_to(source: dict, folder: Path) -> dict:
    """``source_model`` with ``path`` relative to the artifact's folder (bench resolves it against the
    manifest's folder, so a copied run folder keeps its reference); absolute where no relative path
    exists (another Windows drive)."""
    try:
        path = os.path.relpath(source["abs_path"], folder.resolve())
    except ValueError:
        path = source["abs_path"]
    return {"path": path, **source}


@dataclass
class _Converted:
    """An artifact converted into its stage (``fileio.Stage``), waiting for validation and commit."""

    stage: Stage  # the artifact under its final name; its manifest joins it there, and both are committed together
    tmp: Path
    final: Path
    target: Target
    options: ExportOptions
    result: object
    convert_s: float

    def abort(self) -> None:
        """Discard the stage: the converted file never takes its name."""
        self.stage.discard()


def _convert_one(model, final: Path, target: Target, options: ExportOptions, calibration,
                 work: ExportWork | None = None) -> _Converted:
    stage = Stage(final.parent)
    try:
        tmp = stage.path(final.name)
        t0 = time.perf_counter()
        result = CONVERTERS[target.format](model, tmp, target, options, calibration, work)
        return _Converted(stage, tmp, final, target, options, result, time.perf_counter() - t0)
    except BaseException:
        stage.discard()
        raise


def _finish_one(c: _Converted, reference, spec: Preprocessing, common: dict, extra: dict) -> ExportedArtifact:
    """Validate the staged file against the float model, write its manifest beside it in the stage, and
    commit the two (``Stage.commit``: the old artifact goes first, then the manifest takes its name, then
    the artifact). Until the commit the old pair under ``--force`` is intact: a failed conversion or
    validation keeps it."""
    from resnet_deploy.converters.validate import validate_artifact

    try:
        t1 = time.perf_counter()
        validation = validate_artifact(c.tmp, spec, reference, c.target.precision, c.options.fp32_tolerance)
        t2 = time.perf_counter()
        # the staged file is the very file that becomes final: its sha256 and size are the artifact's
        manifest = _manifest(c.final, c.target, c.options, c.result, validation, common, extra, file_facts(c.tmp),
                             {"convert": round(c.convert_s, 3), "validate": round(t2 - t1, 3)})
        side = sidecar_path(c.final)
        write_json(c.stage.path(side.name), manifest.to_dict())
        c.stage.commit(c.final.name, side.name)
    finally:
        c.stage.discard()
    return ExportedArtifact(c.final, manifest)


def _manifest(final: Path, target: Target, options: ExportOptions, result, validation: dict, common: dict,
              extra: dict, facts: dict, timing: dict) -> Manifest:
    opts = {"target": target.tag, "export": options.to_dict(), "converter": result.settings,
            "op_report": result.ops, "timing_s": timing}
    if result.input.scale is not None:
        opts["integer_input"] = (f"q = clip(round(x / {result.input.scale:g}) + {result.input.zero_point}) where x is "
                                 "the preprocessed input (raw pixels 0..255 for resnet-deploy models)")
    opts.update({k: v for k, v in extra.items() if k != "int8_accuracy"})
    fields = {k: v for k, v in common.items() if k != "model_output"}
    fields["source_model"] = source_relative_to(common["source_model"], final.parent)
    if common.get("model_output"):  # logits or probabilities, said at export (a softmax last layer)
        opts["model_output"] = common["model_output"]
    return Manifest(format=target.format.value, precision=target.precision.value, artifact=final.name,
                    input=result.input, output=result.output, calibration=result.calibration,
                    options=opts, validation=validation, int8_accuracy=extra.get("int8_accuracy"), **facts, **fields)
