"""The manifest of an exported file (``artifact.Manifest``): what every manifest of one export shares
(``shared_fields``: preprocessing, class names, the source model, libraries, machine) and what is the file's
own (``manifest_for``: format, precision, I/O, the converter's settings and op report, calibration, the parity
check, the INT8 record, timings, the file's sha256 and size).
"""

from __future__ import annotations

import os
from pathlib import Path

from resnet_deploy.artifact import Manifest
from resnet_deploy.converters.base import ArtifactPlan, ConvertResult
from resnet_deploy.data.constants import CLASS_NAMES
from resnet_deploy.fileio import sha256_file
from resnet_deploy.records import ParityCheck, SourceModel


def shared_fields(plan) -> dict:
    """The fields every manifest of the export ``plan`` (a ``planning.ExportPlan``) has; the source model's
    ``path`` is added per manifest (``source_relative_to``)."""
    from resnet_deploy.envinfo import library_versions, machine_info

    meta = plan.metadata or {}
    pre = plan.preprocessing.to_dict()
    pre["source"] = plan.preprocessing_source
    source = SourceModel(abs_path=str(plan.model_path.resolve()), sha256=sha256_file(plan.model_path),
                         architecture=meta.get("architecture"), width=meta.get("width"), stem=meta.get("stem"),
                         has_metadata=plan.metadata is not None)
    names = getattr(plan, "class_names", None) or meta.get("class_names") or CLASS_NAMES  # an image folder's first
    return {"preprocessing": pre, "class_names": list(names), "source_model": source,
            "libraries": library_versions(), "machine": machine_info(), "data": getattr(plan, "data_info", None)}


def source_relative_to(source: SourceModel, folder: Path) -> SourceModel:
    """``source`` with ``path`` relative to the artifact's folder (bench resolves it against the manifest's
    folder, so a copied run folder keeps its reference); absolute where no relative path exists (another
    Windows drive)."""
    from dataclasses import replace

    try:
        path = os.path.relpath(source.abs_path, folder.resolve())
    except ValueError:
        path = source.abs_path
    return replace(source, path=path)


def manifest_for(job: ArtifactPlan, final: Path, result: ConvertResult, parity: ParityCheck, shared: dict,
                 model_output: dict, facts: dict, timing: dict) -> Manifest:
    """The manifest of the file ``job`` made, under its ``final`` name; ``facts``: its sha256 and size."""
    opts = {"target": job.target.tag, "export": job.options.to_dict(), "converter": result.settings,
            "op_report": result.ops, "timing_s": timing}
    if result.input.scale is not None:
        opts["integer_input"] = (f"q = clip(round(x / {result.input.scale:g}) + {result.input.zero_point}) where x is "
                                 "the preprocessed input (raw pixels 0..255 for resnet-deploy models)")
    if job.qat is not None:
        opts["qat"] = job.qat
    if model_output:  # logits or probabilities, said at export (a softmax last layer)
        opts["model_output"] = model_output
    fields = dict(shared, source_model=source_relative_to(shared["source_model"], final.parent).to_json())
    if fields.pop("data", None) is not None:  # an image folder: its classes, splits and resize policy
        opts["data"] = shared["data"]
    return Manifest(format=job.target.format.value, precision=job.target.precision.value, artifact=final.name,
                    input=result.input, output=result.output, calibration=result.calibration, options=opts,
                    validation=parity.to_json(), int8_accuracy=job.int8_record.to_json() if job.int8_record else None,
                    **facts, **fields)
