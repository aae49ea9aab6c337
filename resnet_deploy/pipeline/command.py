"""The ``resnet-deploy pipeline`` command: the main job end to end."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from resnet_deploy.cli_common import DataOption
from resnet_deploy.pipeline.job import PipelineOptions

_PIPE = PipelineOptions()  # the command's defaults come from its options class


def pipeline(
    data: DataOption = None,
    out: Annotated[Path, typer.Option("--out", help="Folder for the run: artifacts/, report.* (train/ with --train)")] = _PIPE.out,
    model: Annotated[Optional[str], typer.Option(help="A .keras model or a pretrained name. Default: the best "
                                                      "pretrained model (`resnet-deploy models --pretrained`).",
                                                 show_default=False)] = None,
    train: Annotated[bool, typer.Option("--train", help="Train a model first (--arch, --width, --epochs, "
                                                        "--batch-size, --limit-train) instead of loading one.")] = False,
    arch: Annotated[str, typer.Option(help="With --train: architecture (see `resnet-deploy models`).")] = _PIPE.arch,
    width: Annotated[float, typer.Option(help="With --train: width multiplier.")] = _PIPE.width,
    epochs: Annotated[int, typer.Option(help="With --train: training epochs.")] = _PIPE.epochs,
    batch_size: Annotated[int, typer.Option(help="With --train: batch size.")] = _PIPE.batch_size,
    limit_train: Annotated[Optional[int], typer.Option(help="With --train: first N training images; 0 for all.")] = _PIPE.limit_train,
    limit_test: Annotated[Optional[int], typer.Option(help="First N test images for evaluation and bench "
                                                           "(default: the whole test split).",
                                                      show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option(help="INT8 calibration images (class-balanced, training split).")] = _PIPE.calib_samples,
    threads: Annotated[Optional[int], typer.Option(help="Bench threads (default: every usable core).",
                                                   show_default=False)] = None,
    runtimes: Annotated[Optional[str], typer.Option(help="ONNX runtimes each .onnx file is benched in, a row each "
                                                         "(default: every installed one: onnxruntime, openvino).",
                                                    show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of training, calibration sampling and bootstrap.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder's contents.")] = False,
) -> None:
    """The main job: load the best pretrained ResNet (or --model, or --train one), export all six artifacts,
    bench them on the test split, write the report."""
    from resnet_deploy.logfilter import quiet_frameworks

    quiet_frameworks()
    from resnet_deploy.pipeline import job

    opts = PipelineOptions(out=out, model=model, train=train, arch=arch, width=width, epochs=epochs, batch_size=batch_size,
                           limit_train=limit_train or None, limit_test=limit_test, calib_samples=calib_samples,
                           threads=threads, runtimes=runtimes, seed=seed, force=force)
    from resnet_deploy.fileio import output_lock

    with output_lock(out, "resnet-deploy pipeline"):
        result = job.run_pipeline(opts, data=data)
        job.write_reports(result, out)
