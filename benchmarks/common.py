"""What the ResNet34 benchmark scripts share: their model options and the random-weight model they build."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_model_args(ap: argparse.ArgumentParser, calib_help: str = "calibration images for the INT8 exports") -> None:
    """--model / --arch / --width / --data / --calib / --out, with the defaults both scripts use."""
    ap.add_argument("--model", type=Path, help="a trained .keras model (default: random-weight --arch)")
    ap.add_argument("--arch", default="resnet34")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--calib", type=int, default=100, help=calib_help)
    ap.add_argument("--out", type=Path, default=None, help="keep the artifacts here (default: a temp folder)")


def model_or_random(args, out: Path) -> Path:
    """``args.model``, or a seeded random-weight ``args.arch`` saved with its sidecar into ``out``."""
    if args.model is not None:
        return args.model
    import keras

    from resnet_deploy.models.builder import build_model
    from resnet_deploy.models.io import base_metadata, save_model

    keras.utils.set_random_seed(0)
    model_path = out / f"{args.arch}.keras"
    model = build_model(args.arch, width=args.width)
    save_model(model, model_path, base_metadata(args.arch, width=args.width), force=True)
    print(f"{args.arch} width {args.width}: {model.count_params():,} params, random weights")
    return model_path
