"""The ``resnet-deploy`` command line: thin commands that parse options and call the library.

Heavy frameworks (TensorFlow, Keras, the runtimes) are imported inside the commands, so
``resnet-deploy --help`` answers instantly.
"""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from resnet_deploy import __version__
from resnet_deploy.bench.command import bench
from resnet_deploy.cli_common import handle_errors
from resnet_deploy.converters.command import export
from resnet_deploy.data.command import data
from resnet_deploy.models.command import models
from resnet_deploy.pipeline.command import pipeline
from resnet_deploy.training.command import train

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
app.command("models")(handle_errors(models))
app.command("data")(handle_errors(data))
app.command("pipeline")(handle_errors(pipeline))


if __name__ == "__main__":
    app()
