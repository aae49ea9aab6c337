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
    out: Annotated[Path, typer.Option("--out", help="Folder for the run: train/, artifacts/, report.*")] = _PIPE.out,
    arch: Annotated[str, typer.Option(help="Architecture to train (see `resnet-deploy models`).")] = _PIPE.arch,
    width: Annotated[float, typer.Option(help="Width multiplier.")] = _PIPE.width,
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = _PIPE.epochs,
    batch_size: Annotated[int, typer.Option(help="Training batch size.")] = _PIPE.batch_size,
    limit_train: Annotated[Optional[int], typer.Option(help="First N training images; 0 for all.")] = _PIPE.limit_train,
    limit_test: Annotated[Optional[int], typer.Option(help="First N test images for evaluation and bench "
                                                           "(default: the whole test split).",
                                                      show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option(help="INT8 calibration images (class-balanced, training split).")] = _PIPE.calib_samples,
    threads: Annotated[Optional[int], typer.Option(help="Bench threads (default: every usable core).",
                                                   show_default=False)] = None,
    seed: Annotated[int, typer.Option(help="Seed of training, calibration sampling and bootstrap.")] = 0,
    force: Annotated[bool, typer.Option("--force", help="Replace an existing output folder's contents.")] = False,
) -> None:
    """The main job end to end: train a small ResNet, export all six artifacts, bench them, write the report."""
    from resnet_deploy.cli_common import quiet_frameworks

    quiet_frameworks()
    from resnet_deploy.pipeline import job

    opts = PipelineOptions(out=out, arch=arch, width=width, epochs=epochs, batch_size=batch_size,
                           limit_train=limit_train or None, limit_test=limit_test, calib_samples=calib_samples,
                           threads=threads, seed=seed, force=force)
    result = job.run_pipeline(opts, data=data)
    job.write_reports(result, out)
