"""`resnet-deploy train`: parse options into a ``TrainConfig`` and call ``train_model``.

Cheap to import: no framework is imported until the command runs. With ``--resume`` the saved
recipe of the run is the starting point and only options given on the command line are applied
on top of it (``train_model`` refuses any that would change the recipe).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from resnet_deploy.cli_common import DataOption, quiet_frameworks

LAUNCH_FLAGS = ("process_id", "num_processes", "coordinator")  # multiprocess.LAUNCH_FLAGS, without importing it


def train(
    ctx: typer.Context,
    arch: Annotated[str, typer.Option(help="Architecture (see `resnet-deploy models`).")] = "resnet34",
    width: Annotated[float, typer.Option(help="Width multiplier of every layer's channels.")] = 1.0,
    stem: Annotated[str, typer.Option(help="cifar (3x3 conv) or imagenet (7x7/2 conv + max-pool).")] = "cifar",
    epochs: Annotated[int, typer.Option(help="Training epochs.")] = 40,
    batch_size: Annotated[int, typer.Option(help="Global batch size (split over devices with --distribute).")] = 512,
    lr: Annotated[Optional[float], typer.Option(help="Peak learning rate. Default: 0.1 x batch/128.",
                                                show_default=False)] = None,
    momentum: Annotated[float, typer.Option(help="SGD momentum (Nesterov unless --no-nesterov).")] = 0.9,
    nesterov: Annotated[bool, typer.Option(help="Nesterov momentum.")] = True,
    weight_decay: Annotated[float, typer.Option(help="L2 weight decay on conv/dense kernels (torch SGD convention).")] = 5e-4,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the cross-entropy.")] = 0.1,
    schedule: Annotated[str, typer.Option(help="Decay after the warm-up: cosine or onecycle (linear).")] = "cosine",
    warmup_epochs: Annotated[Optional[float], typer.Option(
        help="Linear warm-up length in epochs. Default: 2, or a quarter of a run shorter than 8 epochs.",
        show_default=False)] = None,
    final_lr_fraction: Annotated[float, typer.Option(help="Learning rate at the end, as a fraction of the peak.")] = 0.0,
    pad: Annotated[int, typer.Option(help="Reflect-padding before the random 32x32 crop (0: no crop).")] = 4,
    flip: Annotated[bool, typer.Option(help="Random horizontal flips.")] = True,
    cutout: Annotated[int, typer.Option(help="Side of the cutout square in pixels (0: off).")] = 0,
    seed: Annotated[int, typer.Option(help="Seed of initialisation, shuffling and augmentation.")] = 0,
    precision: Annotated[str, typer.Option(
        help="auto, float32, mixed_float16 or mixed_bfloat16. auto: mixed_bfloat16 on GPUs with compute capability "
             ">= 8, mixed_float16 on older GPUs, float32 on CPU (mixed_float16 is refused on CPU).")] = "auto",
    distribute: Annotated[str, typer.Option(
        help="none; data-parallel over every GPU of this machine (keras.distribution on JAX, MirroredStrategy on "
             "TensorFlow); or multi-process: data parallel over the devices of several processes or machines "
             "(KERAS_BACKEND=jax; start one process per machine or GPU, each with its --process-id).")] = "none",
    process_id: Annotated[Optional[int], typer.Option(
        help="multi-process: this process's id, 0 to N-1 (0 writes the run's files). Default: "
             "KERAS_DISTRIBUTION_PROCESS_ID or SLURM_PROCID.", show_default=False)] = None,
    num_processes: Annotated[Optional[int], typer.Option(
        help="multi-process: the number of processes N. Default: KERAS_DISTRIBUTION_NUM_PROCESSES or SLURM_NTASKS.",
        show_default=False)] = None,
    coordinator: Annotated[Optional[str], typer.Option(
        help="multi-process: HOST:PORT where process 0 listens, the same for all. Default: "
             "KERAS_DISTRIBUTION_JOB_ADDRESSES, JAX_COORDINATOR_ADDRESS, or the first SLURM node.",
        show_default=False)] = None,
    peer_timeout: Annotated[int, typer.Option(
        help="multi-process: seconds a process waits for the others to join, answer, or reach a collective "
             "before it stops with an error.")] = 300,
    teacher: Annotated[Optional[Path], typer.Option(help="Distil from this .keras CIFAR-10 classifier.",
                                                    show_default=False)] = None,
    kd_temperature: Annotated[float, typer.Option(help="Distillation temperature.")] = 4.0,
    kd_weight: Annotated[float, typer.Option(help="Weight of the distillation term (the rest is cross-entropy).")] = 0.5,
    limit_train: Annotated[Optional[int], typer.Option(help="Use only the first N training images (smoke runs).",
                                                       show_default=False)] = None,
    limit_test: Annotated[Optional[int], typer.Option(help="Use only the first N test images.", show_default=False)] = None,
    val_split: Annotated[int, typer.Option(help="Hold out N class-balanced training images (seeded) as a "
                                              "validation split: val_* columns and best.keras are measured on "
                                              "it. 0: no split; model.keras is the last epoch either way.")] = 0,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder. Default: runs/<arch>.",
                                                show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Start afresh over an existing output folder.")] = False,
    resume: Annotated[bool, typer.Option("--resume", help="Continue the interrupted run in the output folder "
                                                          "from its last checkpoint.")] = False,
    workers: Annotated[int, typer.Option(help="Threads preparing batches.")] = 1,
    checkpoint_every: Annotated[float, typer.Option(
        help="Minutes between checkpoints inside an epoch, so that a stopped run loses at most that much "
             "(--resume continues from the batch it reached, with the batches the uninterrupted run would "
             "have seen). 0: a checkpoint at each epoch's end only. May change on --resume.")] = 0.0,
    data: DataOption = None,
) -> None:
    """Train a ResNet on CIFAR-10 (GPU if present): writes model.keras + metadata, log.csv, curves.png, checkpoints."""
    quiet_frameworks()
    from resnet_deploy.training.devices import enable_tf_onednn

    enable_tf_onednn()
    from resnet_deploy.training.recipe import TrainConfig
    from resnet_deploy.training.trainer import train_model

    options = {k: v for k, v in ctx.params.items() if k not in ("data", "peer_timeout", *LAUNCH_FLAGS)}
    options["out_dir"] = options.pop("out")
    given = _given(ctx)
    launch_given = [k for k in (*LAUNCH_FLAGS, "peer_timeout") if k in given]
    # a resumed run's --distribute comes from its checkpoint: launch flags alone say it is a multi-process one
    multi = distribute == "multi-process" or (resume and "distribute" not in given and bool(launch_given))
    launch = _launch(ctx) if multi else None
    if resume and launch is not None and launch.process_id != 0:
        options["resume"] = True  # only process 0 reads the checkpoint; it sends the recipe to the others
    elif resume:
        options = _resume_options(ctx, options)
    config = TrainConfig(**options)
    if launch is None and config.distribute == "multi-process":  # resumed with the launcher's variables alone
        launch = _launch(ctx)
    if launch_given and config.distribute != "multi-process":
        from resnet_deploy.errors import TrainError

        raise TrainError(f"{', '.join('--' + k.replace('_', '-') for k in launch_given)} apply to --distribute "
                         f"multi-process only (this run: --distribute {config.distribute}).",
                         fix="add --distribute multi-process, or leave them out")
    train_model(config, data=data, launch=launch)


def _given(ctx: typer.Context) -> set[str]:
    return {k for k in ctx.params if getattr(ctx.get_parameter_source(k), "name", "") == "COMMANDLINE"}


def _launch(ctx: typer.Context):
    """``--distribute multi-process``: this process's place in the run, from the flags or the launcher's
    variables, checked before any work."""
    from resnet_deploy.training.multiprocess import resolve_launch

    p = ctx.params
    return resolve_launch(p["process_id"], p["num_processes"], p["coordinator"], p["peer_timeout"])


def _resume_options(ctx: typer.Context, options: dict) -> dict:
    """The saved recipe of the run, with only the options typed on the command line on top."""
    from resnet_deploy.training.checkpoint import read_state
    from resnet_deploy.training.recipe import TrainConfig

    out = options["out_dir"] if options["out_dir"] is not None else Path("runs") / options["arch"]
    saved = read_state(out).config
    given = _given(ctx) - {"peer_timeout", *LAUNCH_FLAGS}
    merged = TrainConfig.from_dict(saved).to_dict()
    for k in given - {"data", "out"}:
        merged[k] = options[k]
    merged.update(out_dir=out, resume=True)
    return merged
