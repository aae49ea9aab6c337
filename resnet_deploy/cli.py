"""The ``resnet-deploy`` command line: thin commands that parse options and call the library.

Heavy frameworks (TensorFlow, Keras, the runtimes) are imported inside the commands, so
``resnet-deploy --help`` answers instantly.

Help is click's plain layout (``rich_markup_mode=None``): option names on the left, help text
wrapped beside them, an option too long for the column on a line of its own. Typer's Rich panels
squeeze every option into table cells, which at 80 columns cut names such as
``--onnx-reduce-range / --no-onnx-reduce-range`` and wrap help into one-word lines.
"""

from __future__ import annotations

import os
from typing import Annotated, Optional

import typer

from resnet_deploy import __version__
from resnet_deploy.bench.command import bench
from resnet_deploy.cli_common import handle_errors
from resnet_deploy.converters.command import export
from resnet_deploy.data.command import data
from resnet_deploy.logfilter import VERBOSE_ENV, FrameworkLogFilter, verbose_requested
from resnet_deploy.models.command import models
from resnet_deploy.pipeline.command import pipeline
from resnet_deploy.predict.command import predict
from resnet_deploy.training.command import train

app = typer.Typer(
    name="resnet-deploy",
    help="Train, convert and benchmark Keras ResNets on CIFAR-10 for CPUs, phones and edge devices.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)


def _version(value: bool) -> None:
    if value:
        typer.echo(f"resnet-deploy {__version__}")
        raise typer.Exit()


@app.callback()
def main(
    ctx: typer.Context,
    verbose: Annotated[bool, typer.Option(
        "--verbose", "-v", envvar=VERBOSE_ENV,
        help="Let the frameworks' own logs and warnings through (TensorFlow, LiteRT, ONNX Runtime, the "
             "converters). Without it they are kept out of the terminal.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    """Train, convert and benchmark Keras ResNets on CIFAR-10."""
    if verbose:
        os.environ[VERBOSE_ENV] = "1"  # read by quiet_frameworks, here and in bench's child processes
    if not verbose_requested():
        ctx.with_resource(FrameworkLogFilter())


# Short help for the command list, each within one line at 80 columns.
COMMANDS = (
    ("train", train, "Train a ResNet on CIFAR-10 (GPU if present)."),
    ("export", export, "Convert a float model to TFLite/ONNX artifacts and validate them."),
    ("bench", bench, "Accuracy, latency, memory and size of artifacts; CI gates."),
    ("predict", predict, "Classify images, image folders or an .npz with any artifact."),
    ("models", models, "List the architectures: parameters, MACs, blocks, widths."),
    ("data", data, "Find CIFAR-10 and report what was found."),
    ("pipeline", pipeline, "The main job: a model to six artifacts and a bench report."),
)
for _name, _fn, _short in COMMANDS:
    app.command(_name, short_help=_short)(handle_errors(_fn))


if __name__ == "__main__":
    app()
