"""Inputs for ``resnet-deploy predict``: image files of any size, folders of them, ``.npz`` arrays.

Every image becomes 32x32 RGB uint8 pixels, the models' input:

1. Orientation: a JPEG's EXIF orientation tag is applied (a phone photo stands the way it is shown).
2. Colour: RGB. Transparent pixels (RGBA, LA, palette with transparency) are composited onto white,
   grayscale is repeated over the three channels, 16-bit grayscale is scaled to 8 bits.
3. Fit (``--fit``): ``crop`` (default) takes the largest centred square, so objects keep their
   proportions, as in CIFAR-10's square, centred photos; ``stretch`` resizes the whole image to a square.
4. Resize to 32x32 with Pillow: the box filter when shrinking (each output pixel is the mean of the
   input pixels it covers: no aliasing from a large photo, no ringing, values stay within the input's
   range), bicubic when enlarging (a box filter would give blocky pixels). A 32x32 image is left as is,
   so a PNG written from CIFAR-10 pixels comes back exactly.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_deploy.data.constants import IMAGE_SHAPE
from resnet_deploy.errors import ResnetDeployError

SIZE = IMAGE_SHAPE[0]
FITS = ("crop", "stretch")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ACCEPTED = "PNG or JPEG images (any size), a folder of them, or an .npz with x (N,H,W,3 uint8) and optional y"
RESIZE_METHOD = {
    "crop": "centred square crop, then box filter down / bicubic up to 32x32",
    "stretch": "whole image stretched to a square: box filter down / bicubic up to 32x32",
}


class PredictError(ResnetDeployError):
    """An input or an artifact ``predict`` cannot use."""


@dataclass
class InputError:
    """One input that could not be used; the others still run."""

    input: str
    error: PredictError

    def to_dict(self) -> dict:
        e = self.error
        return {"input": self.input, "error": e.what, "expected": e.expected, "fix": e.fix}


@dataclass
class Inputs:
    """Every readable image as (N, 32, 32, 3) uint8, with its name and label (-1: unknown)."""

    pixels: np.ndarray
    names: list[str]
    labels: np.ndarray  # int64, -1 where unknown
    sources: list[str]  # the file each image came from (a labelled .npz gets an accuracy line)
    errors: list[InputError] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.names)


def fit_image(img, fit: str = "crop") -> np.ndarray:
    """A Pillow image -> (32, 32, 3) uint8 RGB pixels (see the module docstring)."""
    from PIL import Image

    if fit not in FITS:
        raise PredictError(f"Unknown --fit {fit!r}.", expected=" or ".join(FITS), fix="e.g. --fit crop")
    img = to_rgb(img)
    w, h = img.size
    if fit == "crop" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        img = img.crop((left, top, left + side, top + side))
    if img.size != (SIZE, SIZE):
        shrinking = min(img.size) >= SIZE
        img = img.resize((SIZE, SIZE), resample=Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC)
    return np.asarray(img, dtype=np.uint8).copy()


def to_rgb(img):
    """RGB, with transparency composited onto white and 16-bit grayscale scaled to 8 bits."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):
        a = np.asarray(img, dtype=np.float64)
        a = a / 257.0 if img.mode.startswith("I;16") or a.max() > 255 else a
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":
        a = np.asarray(img, dtype=np.float64)
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def load_image(path: str | os.PathLike, fit: str = "crop") -> np.ndarray:
    """One image file -> (32, 32, 3) uint8; a file Pillow cannot read raises ``PredictError``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    path = Path(path)
    try:
        with Image.open(path) as img:
            img.load()  # decode now: a truncated file fails here, not later
            img = ImageOps.exif_transpose(img)
            return fit_image(img, fit)
    except FileNotFoundError:
        raise PredictError(f"{path} does not exist.", expected=ACCEPTED, fix="check the path") from None
    except PermissionError:
        raise PredictError(f"{path} cannot be read (permission denied).", expected="a readable file",
                           fix="check the file's permissions") from None
    except UnidentifiedImageError:
        raise PredictError(f"{path} is not an image Pillow can read.", expected=ACCEPTED,
                           fix="pass PNG or JPEG files, or convert this one to PNG") from None
    except Image.DecompressionBombError as exc:
        raise PredictError(f"{path} is too large to decode safely: {exc}", expected="an image under "
                           f"{Image.MAX_IMAGE_PIXELS:,} pixels", fix="shrink it first") from None
    except (OSError, SyntaxError, ValueError) as exc:  # truncated or corrupt data inside a known format
        raise PredictError(f"{path} could not be decoded: {exc}", expected="a complete, valid image file",
                           fix="re-save or re-download the image") from None


def load_npz(path: str | os.PathLike, fit: str = "crop", limit: int | None = None,
             num_classes: int | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (N, H, W, 3) uint8 and optional ``y`` (N,) from an .npz (no pickles); images that are not
    32x32 go through ``fit_image`` like files do."""
    from PIL import Image

    path = Path(path)
    try:
        with np.load(path, allow_pickle=False) as z:
            files = list(z.files)
            if "x" not in files:
                raise PredictError(f"{path} holds the arrays {files}, none of them named x.",
                                   expected="an .npz with x (N,H,W,3 uint8 RGB) and optional y (N,) labels",
                                   fix="save it with np.savez(path, x=images, y=labels)")
            x = z["x"][:limit] if limit else z["x"]
            y = (z["y"][:limit] if limit else z["y"]) if "y" in files else None
    except PredictError:
        raise
    except FileNotFoundError:
        raise PredictError(f"{path} does not exist.", expected=ACCEPTED, fix="check the path") from None
    except (OSError, ValueError, EOFError) as exc:  # not a zip, truncated, or object arrays (pickles refused)
        raise PredictError(f"{path} is not a readable .npz: {exc}",
                           expected="an .npz of plain arrays (np.savez), no pickled objects",
                           fix="save it with np.savez(path, x=images, y=labels)") from None
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise PredictError(f"{path}: x has shape {x.shape} and dtype {x.dtype}.",
                           expected="x of shape (N, H, W, 3), dtype uint8, RGB pixels 0..255",
                           fix="convert with x.astype(np.uint8) (values 0..255), channels last")
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise PredictError(f"{path}: y has shape {y.shape} and dtype {y.dtype} for {len(x)} images.",
                               expected=f"y of shape ({len(x)},), integer class indices",
                               fix="save one integer label per image, or leave y out")
        if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
            raise PredictError(f"{path}: labels range from {y.min()} to {y.max()}.",
                               expected=f"class indices 0..{(num_classes or 10) - 1}",
                               fix="use the class indices of the artifact's class names")
        y = y.astype(np.int64)
    if tuple(x.shape[1:]) != IMAGE_SHAPE:
        x = np.stack([fit_image(Image.fromarray(img), fit) for img in x]) if len(x) \
            else np.zeros((0, *IMAGE_SHAPE), np.uint8)
    return x, y


def expand(paths: list[Path]) -> tuple[list[Path], list[str]]:
    """Folders -> their image files (by suffix, sorted, not recursive); notes on what was skipped."""
    out, notes = [], []
    for p in paths:
        if p.is_dir():
            files = sorted(f for f in p.iterdir() if f.is_file() and not f.name.startswith("."))
            images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES + (".npz",)]
            skipped = len(files) - len(images)
            if skipped:
                notes.append(f"{p}: skipped {skipped} file(s) without an image or .npz suffix")
            if not images:
                notes.append(f"{p}: no image files in this folder")
            out.extend(images)
        else:
            out.append(p)
    return out, notes


def collect(paths: list[Path], fit: str = "crop", limit: int | None = None,
            num_classes: int | None = None) -> Inputs:
    """Read every input; an unreadable one becomes an ``InputError`` and the rest still load."""
    if fit not in FITS:
        raise PredictError(f"Unknown --fit {fit!r}.", expected=" or ".join(FITS), fix="e.g. --fit crop")
    files, notes = expand([Path(p) for p in paths])
    arrays, names, labels, sources, errors = [], [], [], [], []
    for f in files:
        try:
            if f.suffix.lower() == ".npz":
                x, y = load_npz(f, fit, limit, num_classes)
                arrays.append(x)
                names.extend(f"{f}[{i}]" for i in range(len(x)))
                labels.append(y if y is not None else np.full(len(x), -1, np.int64))
                sources.extend([str(f)] * len(x))
            else:
                arrays.append(load_image(f, fit)[None])
                names.append(str(f))
                labels.append(np.full(1, -1, np.int64))
                sources.append(str(f))
        except PredictError as exc:
            errors.append(InputError(str(f), exc))
    pixels = np.concatenate(arrays) if arrays else np.zeros((0, *IMAGE_SHAPE), np.uint8)
    return Inputs(pixels, names, np.concatenate(labels) if labels else np.zeros(0, np.int64), sources,
                  errors, notes)
