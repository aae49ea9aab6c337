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

A model exported for an image folder (``export --data DIR``) declares its input size and resize policy in
its manifest (``options.data.decoding``, ``declared_decoding``); predict then decodes to that size (any HxW,
``size=``) with that policy, through ``data.folder.fit_any``: the very steps calibration and bench applied.

Bounded memory: an image file is opened only when it is a regular file (a FIFO named ``x.png`` is
refused, not waited on), and its header's dimensions are checked against a pixel budget
(``MAX_PIXELS``, lowered to ``--max-memory`` / 16 bytes per pixel) before anything is decoded; a
larger JPEG is decoded at 1/2, 1/4 or 1/8 scale by libjpeg itself when that brings it under the budget,
anything else that large is refused. Pixels stay uint8 (16-bit and float images are scaled to 8 bits
in integer or float32 arithmetic). An ``.npz``'s array headers are read first: its declared size must
fit ``--max-memory`` / 4, and only the ``--limit`` rows asked for are read.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_deploy.data.constants import IMAGE_SHAPE
from resnet_deploy.errors import ResnetDeployError
from resnet_deploy.terminal import safe
from resnet_deploy.untrusted.files import DEFAULT_MAX_MEMORY

SIZE = IMAGE_SHAPE[0]
FITS = ("crop", "stretch")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
ACCEPTED = "PNG or JPEG images (any size), a folder of them, or an .npz with x (N,H,W,3 uint8) and optional y"
MAX_PIXELS = 40_000_000  # one image's decoded size: about 640 MB at worst (RGBA composited onto white)
BYTES_PER_PIXEL = 16  # what decoding and converting one pixel can take, at worst
NPZ_SHARE = 4  # an .npz may declare up to --max-memory / NPZ_SHARE bytes of arrays
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
    box = (0, 0, w, h)
    if fit == "crop" and w != h:
        side = min(w, h)
        left, top = (w - side) // 2, (h - side) // 2
        box = (left, top, left + side, top + side)
    if (box[2] - box[0], box[3] - box[1]) != (SIZE, SIZE):
        shrinking = min(box[2] - box[0], box[3] - box[1]) >= SIZE
        # the box argument resamples the square in place: no cropped copy of a large image
        img = img.resize((SIZE, SIZE), resample=Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC,
                         box=box)
    elif img.size != (SIZE, SIZE):  # one side of 32 (e.g. 32x64): the centred square needs a crop, no resize
        img = img.crop(box)
    return np.asarray(img, dtype=np.uint8).copy()


def to_rgb(img):
    """RGB, with transparency composited onto white and 16-bit grayscale scaled to 8 bits."""
    from PIL import Image

    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16B", "I;16L", "I;16N", "I"):  # integer arithmetic: x / 257, rounded
        a = np.asarray(img)
        if img.mode.startswith("I;16") or a.max() > 255:
            a = (np.clip(a, 0, 65535).astype(np.uint32) + 128) // 257
        return Image.fromarray(np.clip(a, 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "F":  # float32, as decoded
        a = np.nan_to_num(np.asarray(img, dtype=np.float32), nan=0.0)
        return Image.fromarray(np.clip(np.round(a), 0, 255).astype(np.uint8)).convert("RGB")
    if img.mode == "P" and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return img.convert("RGB")


def pixel_budget(max_memory: int | None = DEFAULT_MAX_MEMORY) -> int:
    """Pixels one image may have once decoded: ``MAX_PIXELS``, less when ``max_memory`` is small."""
    return MAX_PIXELS if not max_memory else max(SIZE * SIZE, min(MAX_PIXELS, max_memory // BYTES_PER_PIXEL))


def fit_to(img, fit: str = "crop", size: tuple[int, int] | None = None) -> np.ndarray:
    """``fit_image`` at 32x32 (``size`` None), else the same steps at (height, width) ``size``."""
    if size is None or tuple(size) == (SIZE, SIZE):
        return fit_image(img, fit)
    if fit not in FITS:
        raise PredictError(f"Unknown --fit {fit!r}.", expected=" or ".join(FITS), fix="e.g. --fit crop")
    from resnet_deploy.data.folder import fit_any

    return fit_any(img, tuple(size), fit)


def resize_method(fit: str, size: tuple[int, int] | None = None) -> str:
    """How images become input, in words (``RESIZE_METHOD`` at 32x32)."""
    if size is None or tuple(size) == (SIZE, SIZE):
        return RESIZE_METHOD[fit]
    from resnet_deploy.data.folder import Decoding

    return Decoding(tuple(size), fit).description


def declared_decoding(doc: dict | None) -> dict | None:
    """The input size and resize policy an image-folder export recorded in the manifest
    (``options.data.decoding``): ``{"size": (h, w), "fit": ...}``, or None when it records none. The document
    is someone else's file: a value that is not a size and a known policy is a ``PredictError``."""
    from resnet_deploy.errors import DataError

    opts = doc.get("options") if isinstance(doc, dict) else None
    data = opts.get("data") if isinstance(opts, dict) else None
    dec = data.get("decoding") if isinstance(data, dict) else None
    if dec is None:
        return None
    try:
        if not isinstance(dec, dict) or not isinstance(dec.get("size"), list):
            raise DataError(f"{safe(repr(dec))[:80]} is not a decoding record")
        from resnet_deploy.data.folder import Decoding

        d = Decoding(tuple(dec["size"]), dec.get("fit"))
    except DataError as exc:
        raise PredictError(f"The manifest's options.data.decoding is unusable: {exc.what}",
                           expected='{"size": [height, width], "fit": "crop" or "stretch"}, as export writes it',
                           fix="re-export the artifact, or delete the manifest") from None
    return {"size": d.size, "fit": d.fit}


def load_image(path: str | os.PathLike, fit: str = "crop", max_pixels: int = MAX_PIXELS,
               size: tuple[int, int] | None = None) -> np.ndarray:
    """One image file -> (32, 32, 3) uint8, or (h, w, 3) at ``size``; a file that is not a regular file, is over
    the pixel budget or that Pillow cannot read raises ``PredictError``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    import warnings

    from resnet_deploy.errors import UntrustedFileError
    from resnet_deploy.untrusted.files import open_regular

    path = Path(path)
    shown = safe(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # the budget below is stricter
            with open_regular(path, "image") as fh, Image.open(fh) as img:
                _fit_budget(img, shown, max_pixels, size)
                img.load()  # decode now: a truncated file fails here, not later
                img = ImageOps.exif_transpose(img)
                return fit_to(img, fit, size)
    except UntrustedFileError as exc:
        raise PredictError(exc.what, expected=exc.expected or ACCEPTED, fix=exc.fix) from None
    except UnidentifiedImageError:
        raise PredictError(f"{shown} is not an image Pillow can read.", expected=ACCEPTED,
                           fix="pass PNG or JPEG files, or convert this one to PNG") from None
    except Image.DecompressionBombError as exc:
        raise PredictError(f"{shown} is too large to decode safely: {exc}", expected="an image under "
                           f"{max_pixels:,} pixels", fix="shrink it first") from None
    except MemoryError:
        raise PredictError(f"{shown} could not be decoded: out of memory.", expected=f"an image under {max_pixels:,} "
                           "pixels", fix="shrink it first") from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or corrupt data in a known format
        raise PredictError(f"{shown} could not be decoded: {safe(exc)}", expected="a complete, valid image file",
                           fix="re-save or re-download the image") from None


def within_budget(img, max_pixels: int, min_size: tuple[int, int] = (SIZE, SIZE)) -> bool:
    """Whether the opened (not yet decoded) ``img`` decodes to at most ``max_pixels`` pixels; a JPEG over it is
    first asked to decode at 1/2, 1/4 or 1/8 scale (libjpeg's own DCT scaling) when that fits and keeps at
    least ``min_size`` (height, width)."""
    w, h = img.size
    if w * h <= max_pixels:
        return True
    if getattr(img, "format", None) == "JPEG":
        for s in (2, 4, 8):
            if -(-w // s) * -(-h // s) <= max_pixels and w // s >= min_size[1] and h // s >= min_size[0]:
                img.draft(None, (w // s, h // s))
                break
    return img.size[0] * img.size[1] <= max_pixels


def _fit_budget(img, shown: str, max_pixels: int, size: tuple[int, int] | None = None) -> None:
    """Refuse an image whose header declares more than ``max_pixels`` pixels (``within_budget``: a JPEG's
    reduced-scale decode keeps at least the output ``size``), before it is decoded."""
    w, h = img.size
    if within_budget(img, max_pixels, tuple(size) if size is not None else (SIZE, SIZE)):
        return
    raise PredictError(f"{shown} declares {w:,} x {h:,} pixels ({w * h / 1e6:,.0f} megapixels), over the budget of "
                       f"{max_pixels / 1e6:g} megapixels for one image.",
                       expected=f"an image of at most {max_pixels:,} pixels (a JPEG up to 64 times that: it is "
                                "decoded at reduced scale)",
                       fix="shrink it first (32x32 pixels are all predict uses), or raise --max-memory")


def load_npz(path: str | os.PathLike, fit: str = "crop", limit: int | None = None,
             num_classes: int | None = None, max_bytes: int | None = None,
             max_pixels: int = MAX_PIXELS,
             size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
    """``x`` (N, H, W, 3) uint8 and optional ``y`` (N,) from an .npz (no pickles); images that are not
    32x32 go through ``fit_image`` like files do. The arrays' headers are checked before their data is
    read: x must declare at most ``max_bytes`` (default ``DEFAULT_MAX_MEMORY / NPZ_SHARE``) and images of at
    most ``max_pixels``; only the first ``limit`` rows are read."""
    import zipfile

    from resnet_deploy.errors import UntrustedFileError
    from resnet_deploy.untrusted.files import open_regular

    path = Path(path)
    shown = safe(path)
    max_bytes = max_bytes or DEFAULT_MAX_MEMORY // NPZ_SHARE
    fix = "save it with np.savez(path, x=images, y=labels)"
    try:
        with open_regular(path, ".npz file") as fh, zipfile.ZipFile(fh) as zf:
            files = [n[:-4] for n in zf.namelist() if n.endswith(".npy")]
            if "x" not in files:
                raise PredictError(f"{shown} holds the arrays {safe(files[:20])}, none of them named x.",
                                   expected="an .npz with x (N,H,W,3 uint8 RGB) and optional y (N,) labels", fix=fix)
            x = _read_npy(zf, "x", shown, limit, max_bytes, max_pixels)
            y = _read_npy(zf, "y", shown, limit, max_bytes, max_pixels) if "y" in files else None
    except PredictError:
        raise
    except UntrustedFileError as exc:
        raise PredictError(exc.what, expected=exc.expected or ACCEPTED, fix=exc.fix) from None
    except MemoryError:
        raise PredictError(f"{shown} could not be read: out of memory.", expected="a smaller .npz",
                           fix="split it, or use --limit") from None
    except (OSError, ValueError, EOFError, zipfile.BadZipFile, KeyError) as exc:  # not a zip, truncated, pickles
        raise PredictError(f"{shown} is not a readable .npz: {safe(exc)}",
                           expected="an .npz of plain arrays (np.savez), no pickled objects", fix=fix) from None
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise PredictError(f"{shown}: x has shape {x.shape} and dtype {x.dtype}.",
                           expected="x of shape (N, H, W, 3), dtype uint8, RGB pixels 0..255",
                           fix="convert with x.astype(np.uint8) (values 0..255), channels last")
    if y is not None:
        y = np.asarray(y)
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
            raise PredictError(f"{shown}: y has shape {y.shape} and dtype {y.dtype} for {len(x)} images.",
                               expected=f"y of shape ({len(x)},), integer class indices",
                               fix="save one integer label per image, or leave y out")
        if len(y) and (y.min() < 0 or (num_classes is not None and y.max() >= num_classes)):
            raise PredictError(f"{shown}: labels range from {y.min()} to {y.max()}.",
                               expected=f"class indices 0..{(num_classes or 10) - 1}",
                               fix="use the class indices of the artifact's class names")
        y = y.astype(np.int64)
    shape = IMAGE_SHAPE if size is None else (*size, 3)
    if tuple(x.shape[1:]) != tuple(shape):
        from PIL import Image

        x = np.stack([fit_to(Image.fromarray(img), fit, size) for img in x]) if len(x) \
            else np.zeros((0, *shape), np.uint8)
    return x, y


def _read_npy(zf, name: str, shown: str, limit: int | None, max_bytes: int, max_pixels: int) -> np.ndarray:
    """Array ``name`` of an open .npz: its header checked (plain dtype, declared size within ``max_bytes``,
    x's images within ``max_pixels``, the member as long as its header says), then its first ``limit`` rows."""
    from numpy.lib import format as npy

    with zf.open(f"{name}.npy") as f:
        version = npy.read_magic(f)
        if version not in ((1, 0), (2, 0), (3, 0)):
            raise ValueError(f"unknown .npy format version {version}")
        reader = npy.read_array_header_1_0 if version == (1, 0) else npy.read_array_header_2_0
        shape, fortran, dtype = reader(f, max_header_size=10000)
        if dtype.hasobject:
            raise ValueError(f"{name} holds Python objects (pickles are not read)")
        declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
        if name == "x" and len(shape) == 4 and shape[1] * shape[2] > max_pixels:
            raise PredictError(f"{shown}: x holds images of {shape[2]:,} x {shape[1]:,} pixels.",
                               expected=f"images of at most {max_pixels:,} pixels", fix="shrink them first")
        rows = shape[0] if not shape or limit is None else min(shape[0], limit)
        if fortran and len(shape) > 1:
            rows = shape[0]  # column-major: the first rows are not one contiguous block
        want = int(np.prod((rows, *shape[1:]), dtype=object)) * dtype.itemsize if shape else dtype.itemsize
        if want > max_bytes:
            from resnet_deploy.untrusted.files import format_bytes

            raise PredictError(f"{shown}: {name} declares {shape} {dtype} ({format_bytes(declared)}), over the "
                               f"{format_bytes(max_bytes)} left for .npz arrays (a quarter of --max-memory, for "
                               "all .npz inputs together).",
                               expected=f"arrays of at most {format_bytes(max_bytes)}",
                               fix="use --limit, split the file, or raise --max-memory")
        data = f.read(want)
        if len(data) != want:
            raise ValueError(f"{name}.npy is truncated: {len(data):,} of {want:,} bytes")
    a = np.frombuffer(data, dtype=dtype)
    if not shape:
        return a.reshape(())
    a = a.reshape((rows, *shape[1:]), order="F" if fortran else "C")
    return (a[:limit] if limit is not None else a).copy()


def expand(paths: list[Path]) -> tuple[list[Path], list[str], list[InputError]]:
    """Folders -> their image files (by suffix, sorted, not recursive); notes on what was skipped; a folder
    that cannot be listed is an error of its own."""
    out, notes, errors = [], [], []
    for p in paths:
        try:
            if not p.is_dir():
                out.append(p)
                continue
            entries = sorted(f for f in p.iterdir() if not f.name.startswith("."))
            files = [f for f in entries if f.is_file()]
            special = [f for f in entries if not f.is_file() and not f.is_dir() and f.exists()]
        except OSError as exc:
            from resnet_deploy.untrusted.files import os_error

            e = os_error(p, exc, "folder or file")
            errors.append(InputError(str(p), PredictError(e.what, expected=e.expected or ACCEPTED, fix=e.fix)))
            continue
        images = [f for f in files if f.suffix.lower() in IMAGE_SUFFIXES + (".npz",)]
        skipped = len(files) - len(images)
        if skipped:
            notes.append(f"{p}: skipped {skipped} file(s) without an image or .npz suffix")
        if special:
            notes.append(f"{p}: skipped {len(special)} FIFO(s), device(s) or socket(s): only regular files are read")
        if not images:
            notes.append(f"{p}: no image files in this folder")
        out.extend(images)
    return out, notes, errors


def collect(paths: list[Path], fit: str = "crop", limit: int | None = None,
            num_classes: int | None = None, max_memory: int | None = DEFAULT_MAX_MEMORY,
            size: tuple[int, int] | None = None) -> Inputs:
    """Read every input; an unreadable one becomes an ``InputError`` and the rest still load. Each image
    is decoded under ``pixel_budget(max_memory)``, each .npz under ``max_memory / NPZ_SHARE`` bytes; to
    32x32, or to (height, width) ``size`` (a model's declared input size)."""
    if fit not in FITS:
        raise PredictError(f"Unknown --fit {fit!r}.", expected=" or ".join(FITS), fix="e.g. --fit crop")
    files, notes, errors = expand([Path(p) for p in paths])
    budget = pixel_budget(max_memory)
    npz_left = (max_memory or DEFAULT_MAX_MEMORY) // NPZ_SHARE  # for all .npz files together
    arrays, names, labels, sources = [], [], [], []
    for f in files:
        try:
            if f.suffix.lower() == ".npz":
                x, y = load_npz(f, fit, limit, num_classes, max_bytes=max(npz_left, 1), max_pixels=budget, size=size)
                npz_left -= x.nbytes
                arrays.append(x)
                names.extend(f"{f}[{i}]" for i in range(len(x)))
                labels.append(y if y is not None else np.full(len(x), -1, np.int64))
                sources.extend([str(f)] * len(x))
            else:
                arrays.append(load_image(f, fit, budget, size)[None])
                names.append(str(f))
                labels.append(np.full(1, -1, np.int64))
                sources.append(str(f))
        except PredictError as exc:
            errors.append(InputError(str(f), exc))
    pixels = np.concatenate(arrays) if arrays else np.zeros((0, *(IMAGE_SHAPE if size is None else (*size, 3))),
                                                                 np.uint8)
    return Inputs(pixels, names, np.concatenate(labels) if labels else np.zeros(0, np.int64), sources,
                  errors, notes)
