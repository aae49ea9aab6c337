"""The ``resnet-deploy`` command line: thin commands that parse options and call the library.

Heavy frameworks (TensorFlow, Keras, the runtimes) are imported inside the commands, so
``resnet-deploy --help`` answers instantly.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from resnet_deploy import __version__
from resnet_deploy.bench.command import bench
from resnet_deploy.cli_common import DataOption, handle_errors
from resnet_deploy.converters.command import export
from resnet_deploy.pipeline import PipelineOptions
from resnet_deploy.training.command import train

_PIPE = PipelineOptions()  # the pipeline command's defaults come from its options class

app = typer.Typer(
    name="resnet-deploy",
    help="Train, convert and benchmark Keras ResNets on CIFAR-10 for CPUs, phones and edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"resnet-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Train, convert and benchmark Keras ResNets on CIFAR-10."""


app.command("train")(handle_errors(train))
app.command("export")(handle_errors(export))
app.command("bench")(handle_errors(bench))


@app.command("models")
@handle_errors
def models(
    width: Annotated[float, typer.Option(help="Width multiplier applied to every layer's channels.")] = 1.0,
    stem: Annotated[str, typer.Option(help="cifar (3x3 conv, no pooling) or imagenet (7x7/2 conv + max-pool).")] = "cifar",
    family: Annotated[Optional[str], typer.Option(help="Show only one family: resnet or cifar.")] = None,
) -> None:
    """List the architectures: parameters, MACs at 32x32, blocks per stage and widths."""
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from resnet_deploy.errors import ModelError
    from resnet_deploy.models.builder import _validate
    from resnet_deploy.models.registry import ARCHS
    from resnet_deploy.models.summary import arch_counts

    families = sorted({spec.family for spec in ARCHS.values()})
    if family is not None and family not in families:
        raise ModelError(f"Unknown family {family!r}.", expected=f"one of {', '.join(families)}",
                         fix="run `resnet-deploy models` without --family to see every architecture")
    # Sized for an 80-column terminal (CI logs, pipes): nothing truncated, nothing wrapped.
    table = Table(title=f"ResNet family (width x{width:g}, {stem} stem, 32x32x3 input, 10 classes)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col, right in (("name", False), ("block", False), ("stages", False), ("widths", False),
                       ("params (M)", True), ("MACs (M)", True)):
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    previous = None
    for name, spec in ARCHS.items():
        if family and spec.family != family:
            continue
        if previous is not None and spec.family != previous:
            table.add_section()
        previous = spec.family
        _validate(spec, width, stem, (32, 32, 3), 10)
        c = arch_counts(spec, width, stem)
        kind = spec.block + (" v2" if spec.preact else "") + ("" if spec.shortcuts else " plain")
        table.add_row(name, kind, "-".join(map(str, spec.blocks_per_stage)),
                      "/".join(str(max(1, round(w * width))) for w in spec.widths),
                      f"{c.params / 1e6:.3f}", f"{c.macs / 1e6:,.1f}")
    console = Console()
    console.print(table)
    console.print("params: trainable parameters (BN gamma/beta counted, moving statistics not). MACs: "
                  "multiply-accumulates of convolutions and the classifier for one image. v2: "
                  "pre-activation blocks; plain: no shortcuts (the degradation twin).")


@app.command("data")
@handle_errors
def data(data: DataOption = None) -> None:
    """Find CIFAR-10 and print what was found: source, images per class per split, mean/std, warnings."""
    from rich.console import Console
    from rich.table import Table

    from resnet_deploy.data.constants import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES
    from resnet_deploy.data.sources import channel_stats, load_cifar10

    from resnet_deploy.cli_common import quiet_frameworks

    quiet_frameworks()  # only a download imports Keras (and TensorFlow): keep its start-up logs out
    console = Console()
    ds = load_cifar10(data)
    console.print(f"source: [bold]{ds.source}[/] ({ds.kind})")
    table = Table(title="CIFAR-10 images per class")
    table.add_column("class")
    splits = [s for s in (ds.train, ds.test) if s is not None]
    for s in splits:
        table.add_column(s.name, justify="right")
    counts = [s.class_counts() for s in splits]
    for i, name in enumerate(CLASS_NAMES):
        table.add_row(f"{i} {name}", *(f"{c[i]:,}" for c in counts))
    table.add_row("total", *(f"{len(s):,}" for s in splits), style="bold")
    console.print(table)
    stats = Table(title="per-channel pixel statistics (0..255)")
    for col in ("split", "mean R, G, B", "std R, G, B"):
        stats.add_column(col)
    for s in splits:
        m, sd = channel_stats(s.x)
        stats.add_row(s.name, ", ".join(f"{v:.2f}" for v in m), ", ".join(f"{v:.2f}" for v in sd))
    stats.add_row("normalisation used", ", ".join(f"{v:.2f}" for v in CIFAR10_MEAN),
                  ", ".join(f"{v:.2f}" for v in CIFAR10_STD), style="dim")
    console.print(stats)
    for note in ds.notes:
        console.print(f"[yellow]warning:[/] {note}")
    if not ds.notes:
        console.print("[green]complete:[/] 50,000 training and 10,000 test images, 10 classes")


@app.command("pipeline")
@handle_errors
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
    from resnet_deploy.pipeline import run_pipeline, write_reports

    opts = PipelineOptions(out=out, arch=arch, width=width, epochs=epochs, batch_size=batch_size,
                           limit_train=limit_train or None, limit_test=limit_test, calib_samples=calib_samples,
                           threads=threads, seed=seed, force=force)
    result = run_pipeline(opts, data=data)
    write_reports(result, out)


if __name__ == "__main__":
    app()
