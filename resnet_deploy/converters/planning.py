"""What an export will do, decided before any file is converted: ``plan_export`` returns an ``ExportPlan``.

Order of work, so that bad input costs nothing and loses nothing:

1. the artifacts' paths (``plan``), the stage folders a killed export left beside them cleared
   (``fileio.sweep_stages``), existing artifacts or manifests refused unless ``force``;
2. the model, loaded safely (a non-model, truncated or non-CIFAR model is a ModelError, nothing written),
   and ``--int8-float-layers`` checked against its layers;
3. the preprocessing (model metadata, else options, else raw pixels) and the data: CIFAR-10, or an image
   folder (``folder_splits``: the model's input size, the resize policy, the class count checked);
4. the float model's logits on the parity images (``parity.Reference``) and what it outputs (logits or
   probabilities); with accuracy-aware INT8 or ``--analyze``, the tuning split of training images; the
   calibration sample (disjoint from the tuning split); the QAT fine-tuning.

Then, per artifact, ``ExportPlan.artifact(target, session)`` makes its ``base.ArtifactPlan``: for an INT8
file of an accuracy-aware export, the calibration and float layers the search chose on the tuning split
(``int8_search``), and the QAT verdict; None for a QAT file that lost to PTQ (not written).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable

import numpy as np

from resnet_deploy.config import Format, Precision
from resnet_deploy.converters.base import ArtifactPlan
from resnet_deploy.converters.options import ExportOptions, Target
from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.errors import ExportError, OutputExistsError
from resnet_deploy.fileio import sidecar_path, sweep_stages

Progress = Callable[[str], None]


def plan(model_path: str | os.PathLike, options: ExportOptions) -> dict[Target, Path]:
    """Where each artifact of ``options`` goes: ``<out>/<model-stem>_<precision>.<ext>``, the ONNX INT8 file
    ``<out>/<model-stem>_int8_<scheme>.onnx`` (the scheme of ``options.scheme``, resolved on this CPU for
    ``host``)."""
    model_path = Path(model_path)
    out_dir = Path(options.out_dir) if options.out_dir else model_path.resolve().parent
    stem = model_path.name if model_path.is_dir() else model_path.stem
    return {t: out_dir / t.file_name(stem) for t in options.targets()}


@dataclass
class ExportPlan:
    """Everything the export decided before converting: the model, the paths, the data each step reads."""

    model_path: Path
    model: object
    metadata: dict | None
    options: ExportOptions
    paths: dict[Target, Path]
    preprocessing: Preprocessing
    preprocessing_source: str
    reference: object  # parity.Reference
    model_output: dict  # kind (logits or probabilities), last layer, note
    train: object = None  # the training split the tuning split and calibration samples come from
    tuning: object = None  # int8_search.TuningSplit
    calibration: object = None  # calibration.Calibration
    qat_model: object = None
    qat_info: dict | None = None
    progress: Progress = field(default=lambda msg: None, repr=False)
    # an image folder: {"class_names", "decoding", "train", "eval"} (``folder_splits``), recorded in every manifest
    data_info: dict | None = None

    @property
    def class_names(self) -> list | None:
        """The folder's class names (None for CIFAR-10: the model's metadata, else CIFAR-10's, are recorded)."""
        return None if self.data_info is None else list(self.data_info["class_names"])

    def artifact(self, target: Target, session) -> ArtifactPlan | None:
        """The plan of one file: what it is made from and with (an accuracy-aware INT8 file's calibration and
        float layers chosen on the tuning split now); None for a QAT file that is not written."""
        path, options = self.paths[target], self.options
        if target.qat:
            verdict = (self.qat_info or {}).get("judged")
            if verdict is not None and not verdict.keep:
                left = " (the existing file of that name is left as it was)" if path.exists() else ""
                self.progress(f"{path.name}: not written{left}: {verdict.note}")
                return None
            return ArtifactPlan(target, path, self.qat_model, options, self.calibration, qat=self._qat_block())
        job = ArtifactPlan(target, path, self.model, options, self.calibration)
        if self.tuning is None or target.precision is not Precision.INT8:
            return job
        return self._int8_choice(job, session)

    def _int8_choice(self, job: ArtifactPlan, session) -> ArtifactPlan:
        """Accuracy-aware INT8 (``int8_search.plan_int8``), or with ``--analyze`` alone the per-layer table of the
        plain export; the record goes into the manifest, with both samples' hashes and their disjointness."""
        from resnet_deploy.converters import int8_search

        fmt = job.target.format
        if self.options.int8_aware:
            chosen, cal, record = int8_search.plan_int8(session, self.model, fmt, self.options, self.train,
                                                        self.preprocessing, self.tuning, self.progress)
        else:
            chosen, cal = self.options, self.calibration
            record = int8_search.analysis_only(session, self.model, fmt, self.options, self.train,
                                               self.preprocessing, self.tuning, self.calibration)
        record = replace(record, calibration_indices_sha256_16=cal.recipe["indices_sha256_16"],
                         validation_indices_sha256_16=self.tuning.recipe["indices_sha256_16"],
                         disjoint=not np.intersect1d(self.tuning.indices, cal.indices).size)  # checked, not assumed
        if self.qat_model is not None and fmt is Format.TFLITE and self.options.int8_aware:
            record = replace(record, qat=self._judge_qat(cal, record))
        return replace(job, options=chosen, calibration=cal, int8_record=record)

    def _judge_qat(self, calibration, ptq_record):
        from resnet_deploy.converters.qat import judge_qat

        verdict = judge_qat(self.qat_model, self.options, calibration, self.tuning, ptq_record.result, self.progress)
        fine_tuning = {k: self.qat_info[k] for k in ("samples", "indices_sha256_16", "learning_rate", "batchnorm",
                                                     "disjoint_from_validation")}
        verdict = replace(verdict, fine_tuning=fine_tuning)
        self.qat_info["judged"] = verdict
        return verdict

    def _qat_block(self) -> dict:
        """The QAT file's ``options.qat`` block: the fine-tuning recipe and, when judged, the verdict."""
        info = dict(self.qat_info or {})
        if info.get("judged") is not None:
            info["judged"] = info["judged"].to_json()
        return info

    def starts_onnx_process(self) -> bool:
        """tf2onnx beside the TFLite conversions: when there is an FP32 ONNX file to make and TFLite work to
        overlap it with, for a large model (``onnx_process.wanted``)."""
        from resnet_deploy.converters.onnx_process import wanted

        formats = {t.format for t in self.paths}
        return (Target(Format.ONNX, Precision.FP32) in self.paths and Format.TFLITE in formats
                and wanted(self.options.parallel_onnx, self.model.count_params()))


def plan_export(model_path: str | os.PathLike, options: ExportOptions, data=None,
                progress: Progress | None = None) -> ExportPlan:
    """Steps 1 to 4 of the module docstring: everything but the conversions. ``data``: CIFAR-10 (any layout
    ``load_cifar10`` reads) or an image folder (``folder_data.is_image_folder``: a path, or a
    ``folder_data.FolderSource`` with the resize policy ``fit``, crop by default, and ``strict``, which refuses
    a file that cannot be used instead of skipping it with a count)."""
    from resnet_deploy.data.sources import load_cifar10
    from resnet_deploy.models.io import load_model, read_metadata

    progress = progress or (lambda msg: None)
    model_path = Path(model_path)
    paths = plan(model_path, options)
    refuse_existing(paths, options.force)
    if any(t.format is Format.ONNX and t.precision is Precision.INT8 for t in paths):
        progress(options.onnx_int8().describe())
    from resnet_deploy.data.folder_data import is_image_folder

    folder = is_image_folder(data)
    model = load_model(model_path, trust=options.trust_model, check_io=not folder)
    check_float_layers(model, options.search.float_layers)
    metadata = read_metadata(model_path)
    spec, spec_source = resolve_preprocessing(metadata, options.preprocessing)
    progress(f"model {model_path} ({model.count_params():,} params), preprocessing from {spec_source}")
    needs_train = options.needs_calibration or options.qat.epochs > 0
    if folder:
        train, test, data_info = folder_splits(model, metadata, data, needs_train, progress)
    else:
        ds = load_cifar10(data, splits=("train", "test") if needs_train else ("test",))
        train, test, data_info = ds.train, ds.test, None
    reference = float_reference(model, test, options.parity_samples, spec)
    output = model_output(model, reference.logits)
    if output["kind"] == "probabilities":
        progress(f"NOTE: {output['note']}")
    p = ExportPlan(model_path, model, metadata, options, paths, spec, spec_source, reference, output,
                   train=train if needs_train else None, progress=progress, data_info=data_info)
    _draw_samples(p)
    if data_info is not None:
        for n in (train.notes() if needs_train else []) + test.notes():
            progress(f"NOTE: {n}")
    if options.qat.epochs:
        from resnet_deploy.converters.qat import qat_finetune

        p.qat_model, p.qat_info = qat_finetune(model, metadata, ds.train, spec, options, progress,
                                               exclude=None if p.tuning is None else p.tuning.indices)
    return p


def _draw_samples(p: ExportPlan) -> None:
    """The tuning split (accuracy-aware INT8, ``--analyze``) and the calibration sample, disjoint from it."""
    from resnet_deploy.converters.calibration import build_calibration

    o = p.options
    if o.needs_tuning_split:
        from resnet_deploy.converters.int8_search import build_tuning_split

        p.tuning = build_tuning_split(p.model, p.train, o, p.preprocessing, with_logits=o.int8_aware)
        p.progress(f"INT8 tuning split: {len(p.tuning.y)} training images, seed {o.search.tuning_seed}, "
                   f"indices {p.tuning.recipe['indices_sha256_16']} (decides INT8 settings; the test split only "
                   "reports)")
    if o.needs_calibration:
        c = o.calibration
        p.calibration = build_calibration(p.train, c.samples, c.seed, p.preprocessing,
                                          exclude=None if p.tuning is None else p.tuning.indices)
        p.progress(f"calibration: {len(p.calibration)} training images, seed {c.seed}, "
                   f"indices {p.calibration.recipe['indices_sha256_16']}")


def folder_splits(model, metadata: dict | None, data, needs_train: bool, progress: Progress):
    """An image folder's training split (when calibration or QAT needs it) and the split the parity check
    evaluates (test/, else val/), both decoded at the model's input size with ``fit``; and the record every
    manifest gets. A model whose output width is not the folder's class count is refused here, before any
    image is decoded."""
    from resnet_deploy.data.folder import DEFAULT_FIT
    from resnet_deploy.data.folder_data import (check_model_classes, eval_split_name, folder_split, model_decoding,
                                                open_folder)

    source = f"The model {getattr(model, 'name', '')!s}".rstrip()
    if len(model.inputs or []) != 1 or len(model.outputs or []) != 1:
        raise ExportError(f"{source} has {len(model.inputs or [])} inputs and {len(model.outputs or [])} outputs.",
                          expected="one image input and one class-score output",
                          fix="wrap it as keras.Model(image_input, logits)")
    fit, strict = getattr(data, "fit", None) or DEFAULT_FIT, bool(getattr(data, "strict", False))
    decoding = model_decoding(tuple(model.inputs[0].shape), fit, source)
    folder = open_folder(data, strict=strict)
    out_shape = tuple(model.outputs[0].shape[1:])
    check_model_classes(out_shape[0] if len(out_shape) == 1 else None, folder, source)
    recorded = (metadata or {}).get("class_names")
    if recorded and list(recorded) != list(folder.class_names):
        progress(f"NOTE: the model's metadata names its classes {', '.join(map(str, recorded[:6]))}...; the folder's "
                 f"({', '.join(folder.class_names[:6])}...) are recorded in the manifests (labels are folder order)")
    for n in folder.notes:
        progress(f"NOTE: {n}")
    eval_name = eval_split_name(folder)
    test = folder_split(folder, eval_name, decoding, strict)
    train = folder_split(folder, "train", decoding, strict) if needs_train else None
    progress(f"image folder {folder.root}: {folder.num_classes} classes, images decoded as {decoding.description} "
             f"(fit {decoding.fit}); parity on {eval_name}/")
    info = {"layout": "image-folder", "root": str(folder.root), "class_names": list(folder.class_names),
            "decoding": decoding.record(), "eval_split": test.split.record(),
            "train_split": train.split.record() if train is not None else None, "strict": strict}
    return train, test, info


def refuse_existing(paths: dict[Target, Path], force: bool) -> None:
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


def check_float_layers(model, names) -> None:
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


def float_logits(model, x: np.ndarray, batch: int = 256) -> np.ndarray:
    """The float Keras model's logits on preprocessed inputs, in batches (the model in memory, not a file)."""
    return np.concatenate([np.asarray(model(x[i:i + batch], training=False)) for i in range(0, len(x), batch)])


def float_reference(model, test, n: int, spec: Preprocessing):
    """The float model's logits on the first ``n`` test images: what every artifact's parity is checked against."""
    from resnet_deploy.converters.parity import Reference

    split = test.take(n)
    logits = float_logits(model, preprocess(split.x, spec))
    return Reference(split.x, split.y, logits.astype(np.float32), f"{test.name}[:{len(split)}]")


def model_output(model, float_outputs: np.ndarray) -> dict:
    """What the float model outputs: ``logits`` (the convention) or ``probabilities``, judged on its outputs
    (``metrics.output_kind``), with the last layer's activation when it is a softmax."""
    from resnet_deploy.metrics import output_kind

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
