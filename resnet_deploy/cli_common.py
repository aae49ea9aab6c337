"""Option types and the error handler shared by every command module (cheap to import: no frameworks).

``handle_errors`` is the only place a ``ResnetDeployError`` becomes a message and an exit code. The
framework-log filter lives in ``resnet_deploy.logfilter``; its names are importable from here too, for
the command modules that still do.
"""

from __future__ import annotations

import functools
import io
import os
import re
import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from resnet_deploy.errors import ResnetDeployError
from resnet_deploy.logfilter import (FRAMEWORK_LOG_PATTERNS, FRAMEWORK_MODULES, VERBOSE_ENV,  # noqa: F401
                                     FrameworkLogFilter, active_log_filter, is_framework_log, quiet_frameworks,
                                     verbose_requested)

DataOption = Annotated[
    Optional[Path],
    typer.Option(
        "--data",
        help="CIFAR-10 location: a folder with train.npz/test.npz, the cifar-10-batches-py folder or "
             "cifar-10-python.tar.gz; or your own images as an image folder, DIR/train/<class>/*.jpg|png with "
             "DIR/test/<class>/... and/or DIR/val/<class>/... (export and bench; decoded at the model's input "
             "size, centred crop, the policy recorded in the manifests). Default: $RESNET_DEPLOY_DATA, then the "
             "Keras cache (~/.keras/datasets), then a download.",
        show_default=False,
    ),
]

FitOption = Annotated[
    Optional[str],
    typer.Option(
        "--fit",
        help="Image folders (--data DIR): how images become the model's input size: crop (the largest centred "
             "box of the input's aspect ratio, then resize; the default) or stretch (the whole image resized). "
             "Recorded in every manifest; bench and predict read it from there.",
        show_default=False,
    ),
]
StrictOption = Annotated[
    bool,
    typer.Option("--strict", help="Image folders: refuse a file that cannot be used (not an image, corrupt, too "
                                  "large, not a regular file) instead of skipping it with a count."),
]


def folder_data(data: Optional[Path], fit: Optional[str] = None, strict: bool = False):
    """``--data`` with ``--fit``/``--strict``: a ``folder_data.FolderSource`` when either is given (a folder is
    then required: the flags mean nothing for CIFAR-10), else ``data`` as it is."""
    if fit is None and not strict:
        return data
    from resnet_deploy.data.folder_data import FolderSource, is_image_folder
    from resnet_deploy.errors import DataError

    if not is_image_folder(data):
        raise DataError("--fit and --strict apply to an image folder, and --data names none.",
                        expected="--data DIR with DIR/train/<class>/... (and DIR/test/<class>/...)",
                        fix="drop --fit/--strict for CIFAR-10, or point --data at your image folder")
    return FolderSource(data if data is not None else Path(os.environ["RESNET_DEPLOY_DATA"]), fit=fit or "crop",
                        strict=strict)


def _error_stream():
    """Where the tool's own error goes: the real terminal when the log filter holds fd 2 and Python's
    stderr is that descriptor (so Rich still sees a terminal); else Python's stderr (e.g. a test runner's)."""
    f = active_log_filter()
    if f is None or not f.active:
        return sys.stderr
    try:
        if sys.stderr.fileno() != 2:
            return sys.stderr
    except (AttributeError, ValueError, OSError, io.UnsupportedOperation):
        return sys.stderr
    f.drain()  # earlier stderr lines first
    return f.terminal()


_BENIGN = re.compile(r"^(I\d{4} |INFO|WARNING: All log messages before absl)|cuInit|cuda|CUDA")


def _hidden_hint() -> str:
    """A pointer to --verbose when the hidden lines hold more than start-up notices (warnings, errors)."""
    f = active_log_filter()
    if f is None or not any(not _BENIGN.search(line) for line in f.hidden_lines):
        return ""
    return f"\n({f.hidden} line(s) of framework logs were hidden: `resnet-deploy --verbose COMMAND ...` shows them.)"


def handle_errors(fn):
    """Turn user-facing errors into a clear message and an exit code; bugs keep their traceback."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except ResnetDeployError as exc:
            from rich.console import Console
            from rich.markup import escape

            from resnet_deploy.terminal import safe_lines  # a file's name in a message: no ESC sequence

            Console(file=_error_stream(), stderr=True).print(
                f"[bold red]error:[/] {escape(safe_lines(exc.render()))}{escape(_hidden_hint())}", highlight=False)
            raise typer.Exit(exc.exit_code)
        except KeyboardInterrupt:
            print("interrupted: nothing half-written was left behind", file=_error_stream())
            raise typer.Exit(130)

    return wrapper
