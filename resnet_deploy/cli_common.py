"""Option types and helpers shared by every command module (cheap to import: no frameworks)."""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from resnet_deploy.errors import ResnetDeployError

DataOption = Annotated[
    Optional[Path],
    typer.Option(
        "--data",
        help="CIFAR-10 location: a folder with train.npz/test.npz, the cifar-10-batches-py folder or "
             "cifar-10-python.tar.gz. Default: $RESNET_DEPLOY_DATA, then the Keras cache (~/.keras/datasets), "
             "then a download.",
        show_default=False,
    ),
]


def quiet_frameworks() -> None:
    """Silence TensorFlow's C++ start-up chatter (CUDA probing on CPU machines); call before importing it."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def handle_errors(fn):
    """Turn user-facing errors into a clear message and an exit code; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ResnetDeployError as exc:
            from rich.console import Console

            Console(stderr=True).print(f"[bold red]error:[/] {exc.render()}", highlight=False)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            print("interrupted: nothing half-written was left behind", file=sys.stderr)
            raise typer.Exit(130)

    return wrapper
