"""Image folders: a user's own images in the layout Keras and torchvision read.

    DIR/train/<class>/*.png|jpg|...      the training split (calibration and the INT8 validation split come from it)
    DIR/val/<class>/...                  optional
    DIR/test/<class>/...                 optional: what bench evaluates

the layout of ``keras.utils.image_dataset_from_directory`` and torchvision's ``ImageFolder``.

**Discovery** (``open_image_folder``) lists and stats, never opens a file:

- Class names are the class folders' names, sorted (Python string order), the same in every split; label
  ``i`` is ``class_names[i]``. Hidden entries (``.DS_Store``, ``.ipynb_checkpoints``) are ignored; a class
  folder is read recursively (links to folders are followed once: a loop is not walked twice).
- Order: by the path inside the class folder, then by class. Not class-major (Keras' and torchvision's
  order): a prefix (``--limit``) of a class-major split holds one class, and the order by name makes a
  folder written by ``write_image_folder`` (files named by their index in the source array) come back in
  the source's order, so indices, the sampler's draws and their fingerprint in manifests are the very
  numbers the ``.npz`` gives.
- Files that will not be used: no image suffix, not a regular file (a FIFO named ``x.png`` is stat-ed, never
  opened: an open would block forever), unreadable, outside a class folder. Each is skipped and counted
  (``FolderSplit.skipped``), or, with ``strict=True``, refused with the error of its kind.
- Errors (``DataError`` subclasses, what / expected / fix): no split subfolder (``FolderLayoutError``, with the
  layout expected and, where the folder's subfolders look like classes, how to move them), an empty class
  folder (``EmptyClassError``), classes that differ between splits (``ClassMismatchError``).

**Fingerprint** (``FolderSplit.fingerprint``): sha256 over the class names and, for each file in order, its
relative path, label, size and the sha256 of its bytes. File contents, not modification times: copies
(``cp``, unzip, ``git checkout``, a container build) change mtimes without changing a pixel (a needless
cache miss), and content can change under an unchanged mtime (``touch -r``, ``rsync`` keeping times, the
2-second clock of FAT), which would make a cache keyed on it return another folder's logits. The price is
one read of the split, in parallel; ``hashlib`` releases the GIL.

**Decoding** (``Decoding``, ``decode_image``): the predict decoder's steps at any input size. A file is
opened only when it is a regular file (``untrusted.open_regular``); its header's size is checked against
the pixel budget of ``predict.images.pixel_budget(max_memory)`` before anything is decoded (a larger JPEG is
decoded at 1/2, 1/4 or 1/8 scale when that fits and stays at least the output size); the EXIF orientation is
applied; colour goes through ``predict.images.to_rgb`` (grayscale repeated, transparency composited onto
white, 16-bit scaled to 8), and each converted image's source mode is counted. Resize policy (``fit``),
declared once in a ``Decoding`` and recorded by the caller: ``crop`` (the largest centred box of the output's
aspect ratio, then resize: predict's default) or ``stretch`` (the whole image resized: a plain resize).
Pillow's box filter shrinks, bicubic enlarges, an image already at the output size is left as is. At 32x32
the fit is ``predict.images.fit_image`` itself, so a folder and ``predict`` give the same pixels.
A file that cannot be used: ``NotAnImageError`` (by content: Pillow does not recognise it),
``CorruptImageError`` (a known format that fails to decode: a truncated JPEG), ``ImageTooLargeError``,
``NotRegularFileError``; skipped with a count by default, raised with ``strict=True``.

**Streaming** (``FolderStream``): uint8 NHWC batches in a fixed order, decoded lazily by a thread pool
(Pillow releases the GIL while it decodes and resizes). It holds at most ``prefetch`` batches besides the one
the caller has, and the decoders together at most the pixel budget of one image at a time (a shared pool:
a large image waits for others to finish rather than add to them), never the split. ``take(indices)`` decodes
given images (random access: calibration samples drawn with ``data.sampler`` on ``FolderSplit.y``).

**Writing** (``write_image_folder``): uint8 images and labels as PNG (lossless) or JPEG class folders,
committed atomically (``fileio.atomic_path``).
"""

from __future__ import annotations

import hashlib
import json
import os
import stat
import threading
from collections import Counter, deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np

from resnet_deploy.data.constants import CLASS_NAMES
from resnet_deploy.errors import DataError, UntrustedFileError
from resnet_deploy.predict import images
from resnet_deploy.terminal import safe
from resnet_deploy.untrusted.files import DEFAULT_MAX_MEMORY, kind_of, open_regular, os_error

SPLIT_NAMES = ("train", "val", "test")
FITS = images.FITS  # ("crop", "stretch"): predict's --fit names, one vocabulary for both
DEFAULT_FIT = "crop"
IMAGE_SUFFIXES = images.IMAGE_SUFFIXES
WRITE_FORMATS = {"png": ".png", "jpeg": ".jpg"}
MAX_SIDE = 8192  # an output size larger than this is a typo, not a model input
FINGERPRINT_VERSION = b"resnet-deploy image-folder fingerprint v1\0"
HASH_CHUNK = 1 << 20
LAYOUT = ("DIR/train/<class>/*.png|jpg (and DIR/val/<class>/..., DIR/test/<class>/...): one folder per class in "
          "each split, the layout keras.utils.image_dataset_from_directory and torchvision's ImageFolder read")
_NEAR_MISSES = {"training": "train", "validation": "val", "valid": "val", "eval": "val", "testing": "test"}
_GRAY = {"1", "L", "I", "F"}


# ----------------------------------------------------------------------------------------------
# Errors
# ----------------------------------------------------------------------------------------------
class FolderLayoutError(DataError):
    """The folder is not in the image-folder layout (no split subfolder, a split without class folders,
    a split asked for that is not there)."""


class EmptyClassError(DataError):
    """A class folder holds no image file."""


class ClassMismatchError(DataError):
    """The splits' class folders differ."""


class ImageFileError(DataError):
    """One file of a split cannot be used. ``path``: the file; ``kind``: why (see ``Skipped.kind``)."""

    kind = "unreadable"

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None, *, path: str = ""):
        self.path = path
        super().__init__(what, expected, fix)


class NotAnImageError(ImageFileError):
    """No image suffix, or content Pillow does not recognise as an image."""

    kind = "not an image"


class CorruptImageError(ImageFileError):
    """A file in a format Pillow knows that fails to decode (truncated, damaged)."""

    kind = "corrupt"


class ImageTooLargeError(ImageFileError):
    """An image whose header declares more pixels than the budget."""

    kind = "too large"


class NotRegularFileError(ImageFileError):
    """A FIFO, a device or a socket where an image was expected: never opened."""

    kind = "not regular"


@dataclass(frozen=True)
class Skipped:
    """A file that was not used. ``kind``: "no image suffix", "not regular", "unreadable", "outside a class
    folder" (found by discovery), "not an image", "corrupt", "too large" (found by decoding)."""

    path: str  # relative to the folder's root, '/'-separated
    kind: str
    reason: str  # one line (the error's what), safe for a terminal

    def to_dict(self) -> dict:
        return {"path": self.path, "kind": self.kind, "reason": self.reason}


def _error_for(kind: str):
    return {"no image suffix": NotAnImageError, "not an image": NotAnImageError, "corrupt": CorruptImageError,
            "too large": ImageTooLargeError, "not regular": NotRegularFileError}.get(kind, ImageFileError)


def summarize_skipped(skipped, where: str = "") -> str | None:
    """"skipped 3 files of DIR/test (2 corrupt, 1 not an image); strict=True refuses them" or None."""
    if not skipped:
        return None
    counts = Counter(s.kind for s in skipped)
    detail = ", ".join(f"{n} {k}" for k, n in sorted(counts.items()))
    first = skipped[0]
    return (f"skipped {len(skipped)} file(s){' of ' + where if where else ''} ({detail}), e.g. {first.path}: "
            f"{first.reason}")


# ----------------------------------------------------------------------------------------------
# Decoding: the resize policy, declared once
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Decoding:
    """How every image of a run becomes model input: output ``size`` (height, width) and ``fit``. One object,
    passed to calibration, validation, bench and predict alike, and ``record()``-ed into manifests."""

    size: tuple[int, int] = (images.SIZE, images.SIZE)
    fit: str = DEFAULT_FIT

    def __post_init__(self):
        size = self.size
        if _is_int(size):
            size = (size, size)
        ok = isinstance(size, (tuple, list)) and len(size) == 2 and all(_is_int(v) for v in size)
        h, w = (int(size[0]), int(size[1])) if ok else (0, 0)
        if not (1 <= h <= MAX_SIDE and 1 <= w <= MAX_SIDE):
            raise DataError(f"Cannot decode images to size {safe(repr(self.size))}.",
                            expected=f"an int or (height, width), each 1..{MAX_SIDE}", fix="e.g. 32, 224 or (224, 224)")
        object.__setattr__(self, "size", (h, w))
        if self.fit not in FITS:
            hint = " (a plain resize is called stretch)" if self.fit in ("resize", "plain") else ""
            raise DataError(f"Unknown resize policy {safe(repr(self.fit))}{hint}.",
                            expected=" or ".join(FITS) + ": crop = centred crop to the output's aspect ratio, "
                                     "then resize; stretch = resize the whole image",
                            fix="use fit='crop' (predict's default) or fit='stretch'")

    @property
    def description(self) -> str:
        h, w = self.size
        if self.size == (images.SIZE, images.SIZE):
            return images.RESIZE_METHOD[self.fit]
        if self.fit == "crop":
            box = "centred square crop" if h == w else f"largest centred {w}:{h} (width:height) crop"
            return f"{box}, then box filter down / bicubic up to {h}x{w} (height x width)"
        return f"whole image resized: box filter down / bicubic up to {h}x{w} (height x width)"

    def record(self) -> dict:
        """For manifests: ``{"size": [h, w], "fit": ..., "method": ...}``."""
        return {"size": list(self.size), "fit": self.fit, "method": self.description}

    def apply(self, img) -> np.ndarray:
        """A Pillow image (any mode) -> (h, w, 3) uint8 RGB. At 32x32 this is ``predict.images.fit_image``."""
        if self.size == (images.SIZE, images.SIZE):
            return images.fit_image(img, self.fit)
        return fit_any(img, self.size, self.fit)


def _is_int(v) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


def fit_any(img, size: tuple[int, int], fit: str = DEFAULT_FIT) -> np.ndarray:
    """``predict.images.fit_image``'s geometry at any (height, width): ``to_rgb``, then the largest centred box
    of the output's aspect ratio (``crop``) or the whole image (``stretch``), resized with the box filter when
    it shrinks both sides, bicubic otherwise; a box already at the output size is left as is."""
    from PIL import Image

    th, tw = size
    img = images.to_rgb(img)
    w, h = img.size
    box = (0, 0, w, h)
    if fit == "crop" and w * th != h * tw:
        if w * th > h * tw:  # wider than the output: full height, centred width
            cw, ch = min(w, max(1, (h * tw + th // 2) // th)), h
        else:
            cw, ch = w, min(h, max(1, (w * th + tw // 2) // tw))
        left, top = (w - cw) // 2, (h - ch) // 2
        box = (left, top, left + cw, top + ch)
    bw, bh = box[2] - box[0], box[3] - box[1]
    if (bw, bh) != (tw, th):
        shrinking = bw >= tw and bh >= th
        img = img.resize((tw, th), resample=Image.Resampling.BOX if shrinking else Image.Resampling.BICUBIC, box=box)
    return np.asarray(img, dtype=np.uint8).copy()


class _PixelPool:
    """The decoders together hold at most ``capacity`` pixels (each image's header is within it): a large
    image waits until the others are done instead of adding to them. Which images decode never depends on
    the number of workers, only when."""

    def __init__(self, capacity: int):
        self.capacity, self.used = capacity, 0
        self._cv = threading.Condition()

    def acquire(self, n: int) -> None:
        with self._cv:
            while self.used and self.used + n > self.capacity:
                self._cv.wait()
            self.used += n

    def release(self, n: int) -> None:
        with self._cv:
            self.used -= n
            self._cv.notify_all()


def _within_budget(img, shown: str, max_pixels: int, size: tuple[int, int], path: str) -> int:
    """The pixels ``img`` will decode to; a JPEG over ``max_pixels`` is first asked to decode at 1/2, 1/4 or 1/8
    scale (libjpeg's DCT scaling) when that fits and stays at least the output size (``predict``'s rule)."""
    w, h = img.size
    if w * h <= max_pixels:
        return w * h
    th, tw = size
    if getattr(img, "format", None) == "JPEG":
        for s in (2, 4, 8):
            if -(-w // s) * -(-h // s) <= max_pixels and w // s >= tw and h // s >= th:
                img.draft(None, (w // s, h // s))
                break
        if img.size[0] * img.size[1] <= max_pixels:
            return img.size[0] * img.size[1]
    raise ImageTooLargeError(
        f"{shown} declares {w:,} x {h:,} pixels, over the budget of {max_pixels:,} pixels for one image.",
        expected=f"images of at most {max_pixels:,} pixels (a JPEG up to 64 times that: it is decoded at reduced "
                 "scale)", fix="shrink it first, or raise the memory limit (--max-memory)", path=path)


def decode_image(path: str | os.PathLike, decoding: Decoding = Decoding(), max_pixels: int | None = None,
                 pool: _PixelPool | None = None, shown_as: str | None = None) -> tuple[np.ndarray, str]:
    """One image file -> ((h, w, 3) uint8 pixels, the source's colour mode). A file that cannot be used raises
    an ``ImageFileError`` subclass naming it. ``max_pixels`` defaults to ``predict.images.pixel_budget()``."""
    from PIL import Image, ImageOps, UnidentifiedImageError

    max_pixels = max_pixels or images.pixel_budget()
    rel = shown_as or str(path)
    shown = safe(rel)
    held = 0
    try:
        with open_regular(path, "image") as fh, Image.open(fh) as img:
            mode = img.mode
            if mode == "P" and "transparency" in img.info:
                mode = "P+transparency"
            n = _within_budget(img, shown, max_pixels, decoding.size, rel)
            if pool is not None:
                pool.acquire(n)
                held = n
            img.load()  # decode now: a truncated file fails here, not later
            return decoding.apply(ImageOps.exif_transpose(img)), mode
    except ImageFileError:
        raise
    except UntrustedFileError as exc:
        raise _open_error(path, exc, rel) from None
    except UnidentifiedImageError:
        raise NotAnImageError(f"{shown} is not an image Pillow can read (by its content).",
                              expected="PNG, JPEG, or another format Pillow reads (BMP, GIF, WebP, TIFF)",
                              fix="remove it from the folder, or convert it to PNG", path=rel) from None
    except Image.DecompressionBombError as exc:
        raise ImageTooLargeError(f"{shown} is too large to decode safely: {safe(exc)}",
                                 expected=f"an image under {max_pixels:,} pixels", fix="shrink it first",
                                 path=rel) from None
    except MemoryError:
        raise ImageTooLargeError(f"{shown} could not be decoded: out of memory.",
                                 expected=f"an image under {max_pixels:,} pixels", fix="shrink it first",
                                 path=rel) from None
    except (OSError, SyntaxError, ValueError, EOFError) as exc:  # truncated or damaged data in a known format
        raise CorruptImageError(f"{shown} is damaged: {safe(exc)}", expected="a complete, valid image file",
                                fix="re-save or re-download it, or remove it from the folder", path=rel) from None
    finally:
        if held:
            pool.release(held)


def _open_error(path, exc: UntrustedFileError, rel: str) -> ImageFileError:
    """``open_regular``'s refusal as the error of its kind: a FIFO, device or socket (listed as a regular file,
    swapped since), or a file that is gone or unreadable."""
    try:
        regular = stat.S_ISREG(os.stat(path).st_mode)
    except (OSError, ValueError):
        regular = True  # gone or unreadable: not a special file
    cls = ImageFileError if regular else NotRegularFileError
    return cls(exc.what, exc.expected, exc.fix, path=rel)


# ----------------------------------------------------------------------------------------------
# Discovery
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True, eq=False)
class FolderSplit:
    """One split's files, in order, with integer labels; nothing decoded. ``y`` and ``name`` mirror
    ``sources.Split``, so ``sampler.class_balanced_indices(split.y, n, seed)`` draws from it."""

    name: str
    root: Path  # DIR/<name>
    class_names: tuple[str, ...]
    files: tuple[str, ...]  # relative to root, '/'-separated: "<class>/<path inside the class folder>"
    y: np.ndarray  # int64 labels, index into class_names
    sizes: np.ndarray  # int64 bytes at listing time
    skipped: tuple[Skipped, ...] = ()  # found by listing (paths relative to the folder's root)

    def __len__(self) -> int:
        return len(self.files)

    def path(self, i: int) -> Path:
        return self.root / self.files[i]

    def shown(self, i: int) -> str:
        """``<split>/<class>/<file>``: how errors and skip lists name file ``i``."""
        return f"{self.name}/{self.files[i]}"

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=len(self.class_names))

    def record(self) -> dict:
        """For manifests (the fingerprint is separate: it reads every file)."""
        return {"layout": "image-folder", "root": str(self.root.parent), "split": self.name,
                "images": len(self), "class_names": list(self.class_names),
                "per_class": self.class_counts().tolist(), "skipped_at_listing": len(self.skipped),
                "order": "path inside the class folder, then class"}

    def fingerprint(self, workers: int | None = None) -> str:
        """sha256 (hex) of the class names and, per file in order, its relative path, label, size and content
        hash. Reads every file (regular files only); a file changed since listing is a ``DataError``."""
        h = hashlib.sha256(FINGERPRINT_VERSION)
        h.update(json.dumps(list(self.class_names)).encode())
        h.update(len(self).to_bytes(8, "little"))
        workers = workers or _default_workers()
        with ThreadPoolExecutor(workers, thread_name_prefix="folder-hash") as pool:
            for start in range(0, len(self), 1024):  # bounded: never a future per file of a 100,000-file split
                idx = range(start, min(start + 1024, len(self)))
                for i, digest in zip(idx, pool.map(self._hash_file, idx)):
                    rel = os.fsencode(self.files[i])
                    h.update(len(rel).to_bytes(4, "little") + rel)
                    h.update(int(self.y[i]).to_bytes(4, "little") + int(self.sizes[i]).to_bytes(8, "little"))
                    h.update(digest)
        return h.hexdigest()

    def _hash_file(self, i: int) -> bytes:
        shown = self.shown(i)
        try:
            with open_regular(self.path(i), "image") as fh:
                d, n = hashlib.sha256(), 0
                for block in iter(lambda: fh.read(HASH_CHUNK), b""):
                    d.update(block)
                    n += len(block)
        except UntrustedFileError as exc:
            raise _open_error(self.path(i), exc, shown) from None
        except OSError as exc:
            e = os_error(self.path(i), exc, "image")
            raise ImageFileError(e.what, e.expected, e.fix, path=shown) from None
        if n != int(self.sizes[i]):
            raise DataError(f"{safe(shown)} changed while the folder was read ({int(self.sizes[i]):,} bytes when "
                            f"listed, {n:,} now).", expected="a folder nothing writes to while it is read",
                            fix="wait until whatever writes the folder is done, then run again")
        return d.digest()

    def stream(self, decoding: Decoding | None = None, **kw) -> "FolderStream":
        return FolderStream(self, decoding, **kw)


@dataclass(frozen=True, eq=False)
class ImageFolder:
    root: Path
    class_names: tuple[str, ...]
    splits: dict[str, FolderSplit]  # the splits listed (open_image_folder's ``splits``)
    present: tuple[str, ...]  # every split folder found
    notes: tuple[str, ...] = ()

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    def split(self, name: str) -> FolderSplit:
        if name in self.splits:
            return self.splits[name]
        if name in self.present:
            raise FolderLayoutError(f"The {name} split of {safe(self.root)} was not listed.",
                                    fix=f"open the folder with splits=(..., {name!r})")
        raise FolderLayoutError(f"{safe(self.root)} has no {name}/ folder (it has "
                                f"{', '.join(p + '/' for p in self.present)}).", expected=LAYOUT,
                                fix=f"add {safe(self.root / name)}/<class>/... with the same class folders")

    def record(self) -> dict:
        return {"layout": "image-folder", "root": str(self.root), "class_names": list(self.class_names),
                "splits": {n: {"images": len(s), "per_class": s.class_counts().tolist(),
                               "skipped_at_listing": len(s.skipped)} for n, s in self.splits.items()}}


def looks_like_image_folder(path: str | os.PathLike) -> bool:
    """True when ``path`` is a folder with a train/, val/ or test/ subfolder (what ``--data`` dispatch asks)."""
    p = Path(path)
    try:
        return p.is_dir() and any((p / s).is_dir() for s in SPLIT_NAMES)
    except OSError:
        return False


def open_image_folder(path: str | os.PathLike, splits: tuple[str, ...] | None = None,
                      strict: bool = False) -> ImageFolder:
    """List ``path`` (see the module docstring). ``splits``: which splits to list (default: every one present;
    each named one must exist). The class folders of every present split are compared, listed or not."""
    root = Path(path)
    entries = _list_dir(root, "image folder")
    dirs = sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))
    present = tuple(s for s in SPLIT_NAMES if s in dirs)
    if not present:
        raise _no_split_error(root, dirs)
    notes = []
    others = [d for d in dirs if d not in SPLIT_NAMES]
    for d in others:
        hint = _NEAR_MISSES.get(d.lower()) or (d.lower() if d.lower() in SPLIT_NAMES else None)
        notes.append(f"{safe(root / d)}/ is not read" + (f" (the {hint} split's folder is named {hint}/)" if hint
                                                         else f" (only {', '.join(SPLIT_NAMES)} are splits)"))
    wanted = present if splits is None else tuple(splits)
    for s in wanted:
        if s not in SPLIT_NAMES:
            raise FolderLayoutError(f"Unknown split {safe(repr(s))}.", expected=" or ".join(SPLIT_NAMES),
                                    fix="ask for train, val or test")
        if s not in present:
            raise FolderLayoutError(f"{safe(root)} has no {s}/ folder (it has "
                                    f"{', '.join(p + '/' for p in present)}).", expected=LAYOUT,
                                    fix=f"add {safe(root / s)}/<class>/... with the same class folders")
    classes: dict[str, tuple[str, ...]] = {}
    loose: dict[str, list] = {}
    for s in present:
        classes[s], loose[s] = _class_folders(root, s)
    _check_same_classes(root, classes)
    class_names = classes[present[0]]
    listed = {s: _list_split(root, s, class_names, loose[s], strict) for s in wanted}
    return ImageFolder(root, class_names, listed, present, tuple(notes))


def _is_dir(entry: os.DirEntry) -> bool:
    try:
        return entry.is_dir()  # follows a link to a folder
    except OSError:
        return False


def _list_dir(p: Path, what: str) -> list[os.DirEntry]:
    try:
        st = os.stat(p)
    except OSError as exc:
        e = os_error(p, exc, "folder")
        raise FolderLayoutError(e.what, expected=LAYOUT, fix=e.fix) from None
    except ValueError:
        raise FolderLayoutError(f"{safe(p)} is not a usable path (it holds a NUL byte).",
                                fix="check the path") from None
    if not stat.S_ISDIR(st.st_mode):
        raise FolderLayoutError(f"{safe(p)} is a {kind_of(st.st_mode)}, not a folder.", expected=f"a {what}: {LAYOUT}",
                                fix="pass the folder that holds train/ (and val/, test/)")
    try:
        with os.scandir(p) as it:
            return list(it)
    except OSError as exc:
        e = os_error(p, exc, "folder")
        raise FolderLayoutError(e.what, expected=f"a readable {what}", fix=e.fix) from None


def _no_split_error(root: Path, dirs: list[str]) -> FolderLayoutError:
    what = f"{safe(root)} has no train/, val/ or test/ folder"
    near = [(d, _NEAR_MISSES.get(d.lower(), d.lower())) for d in dirs
            if _NEAR_MISSES.get(d.lower(), d.lower()) in SPLIT_NAMES]
    if near:
        fix = "rename " + ", ".join(f"{safe(d)}/ to {s}/" for d, s in near)
        return FolderLayoutError(what + f" (it has {', '.join(safe(d) + '/' for d, _ in near)}).", LAYOUT, fix)
    with_images = [d for d in dirs if _has_image_file(root / d)]
    if with_images:
        shown = ", ".join(safe(d) for d in with_images[:5]) + (", ..." if len(with_images) > 5 else "")
        return FolderLayoutError(
            what + f"; its subfolders ({shown}) hold images: they look like class folders of one split.", LAYOUT,
            f"move the class folders into {safe(root / 'train')}/ (and hold some images out in "
            f"{safe(root / 'test')}/<class>/ to evaluate on)")
    if not dirs and _has_image_file(root):
        return FolderLayoutError(what + "; it holds image files directly: images without classes cannot be "
                                        "trained, calibrated or scored.", LAYOUT,
                                 f"sort them into {safe(root / 'train')}/<class>/ folders (predict reads a folder of "
                                 "unlabelled images as it is)")
    return FolderLayoutError(what + (f" (its subfolders: {', '.join(safe(d) for d in dirs[:8])})." if dirs else "."),
                             LAYOUT, f"create {safe(root / 'train')}/<class>/ folders holding the images")


def _has_image_file(p: Path) -> bool:
    try:
        with os.scandir(p) as it:
            return any(e.name.lower().endswith(IMAGE_SUFFIXES) for e in it if not e.name.startswith("."))
    except OSError:
        return False


def _class_folders(root: Path, split: str) -> tuple[tuple[str, ...], list]:
    """The class folders of ``root/split`` (sorted) and its entries that are not (files outside a class folder)."""
    sroot = root / split
    entries = [e for e in _list_dir(sroot, f"{split} split folder") if not e.name.startswith(".")]
    names = tuple(sorted(e.name for e in entries if _is_dir(e)))
    loose = [e for e in entries if not _is_dir(e)]
    if not names:
        images_here = [e for e in loose if e.name.lower().endswith(IMAGE_SUFFIXES)]
        what = f"{safe(sroot)} has no class folders" + (f"; it holds {len(images_here)} image file(s) directly, "
                                                         "without classes" if images_here else "")
        raise FolderLayoutError(what + ".", expected=LAYOUT,
                                fix=f"put each class's images into its own folder: {safe(sroot)}/<class>/...")
    return names, loose


def _check_same_classes(root: Path, classes: dict[str, tuple[str, ...]]) -> None:
    first = next(iter(classes))
    for s, names in classes.items():
        if names == classes[first]:
            continue
        a, b = set(classes[first]), set(names)
        parts = []
        if a - b:
            parts.append(f"only in {first}/: {', '.join(safe(n) for n in sorted(a - b)[:10])}")
        if b - a:
            parts.append(f"only in {s}/: {', '.join(safe(n) for n in sorted(b - a)[:10])}")
        raise ClassMismatchError(
            f"The splits of {safe(root)} have different classes: {first}/ has {len(a)}, {s}/ has {len(b)} "
            f"({'; '.join(parts)}).",
            expected="the same class folders (names and count) in every split: label i means the same class "
                     "everywhere",
            fix="add the missing class folders with images, or remove the extra ones, in every split")


def _list_split(root: Path, split: str, class_names: tuple[str, ...], loose: list, strict: bool) -> FolderSplit:
    sroot = root / split
    rows: list[tuple[str, int, str, int]] = []  # (path inside the class folder, label, relative path, size)
    skipped: list[Skipped] = []
    for e in sorted(loose, key=lambda e: e.name):
        skipped.append(Skipped(f"{split}/{e.name}", "outside a class folder",
                               f"{safe(sroot / e.name)} is not inside a class folder"))
    for label, cls in enumerate(class_names):
        found, bad = _walk_class(sroot / cls, f"{split}/{cls}")
        if not found:
            detail = ""
            if bad:
                kinds = Counter(b.kind for b in bad)
                detail = f" (it has {len(bad)} other file(s): " + ", ".join(f"{n} {k}" for k, n in kinds.items()) + ")"
            raise EmptyClassError(
                f"The class folder {safe(sroot / cls)} holds no image file{detail}.",
                expected="at least one image (PNG, JPEG, ...: " + " ".join(IMAGE_SUFFIXES) + ") in every class "
                         "folder of every split",
                fix=f"add images to it, or remove the {safe(cls)} folder from every split")
        rows.extend((inner, label, f"{cls}/{inner}", size) for inner, size in found)
        skipped.extend(bad)
    if strict and skipped:
        s = skipped[0]
        cls = FolderLayoutError if s.kind == "outside a class folder" else _error_for(s.kind)
        msg = f"{s.reason} ({len(skipped)} file(s) of {safe(sroot)} would be skipped; strict mode refuses them)."
        kw = {} if cls is FolderLayoutError else {"path": s.path}
        raise cls(msg, expected="only images, as regular files, inside class folders",
                  fix="remove or fix the files named, or run without --strict to skip them", **kw)
    rows.sort(key=lambda r: (r[0], r[1]))
    return FolderSplit(split, sroot, class_names, tuple(r[2] for r in rows),
                       np.array([r[1] for r in rows], dtype=np.int64), np.array([r[3] for r in rows], dtype=np.int64),
                       tuple(skipped))


def _walk_class(folder: Path, shown_prefix: str) -> tuple[list[tuple[str, int]], list[Skipped]]:
    """Regular files with an image suffix under ``folder`` (recursively; each folder visited once), as
    (path inside the folder, size); and what was skipped. Stat only: nothing is opened."""
    found, bad = [], []
    seen: set[tuple[int, int]] = set()
    todo = [(folder, "")]
    while todo:
        d, prefix = todo.pop()
        try:
            st = os.stat(d)
            if (st.st_dev, st.st_ino) in seen:
                continue  # a link back to a folder already walked
            seen.add((st.st_dev, st.st_ino))
            with os.scandir(d) as it:
                entries = list(it)
        except OSError as exc:
            e = os_error(d, exc, "folder")
            bad.append(Skipped(f"{shown_prefix}/{prefix}".rstrip("/"), "unreadable", e.what))
            continue
        for e in entries:
            if e.name.startswith("."):
                continue
            inner = prefix + e.name
            shown = f"{shown_prefix}/{inner}"
            try:
                st = os.stat(e.path)  # follows links; a FIFO is stat-ed, never opened
            except OSError as exc:
                bad.append(Skipped(shown, "unreadable", os_error(e.path, exc, "image").what))
                continue
            if stat.S_ISDIR(st.st_mode):
                todo.append((Path(e.path), inner + "/"))
            elif not stat.S_ISREG(st.st_mode):
                bad.append(Skipped(shown, "not regular", f"{safe(shown)} is a {kind_of(st.st_mode)}, not a regular "
                                                         "file: never opened"))
            elif not e.name.lower().endswith(IMAGE_SUFFIXES):
                bad.append(Skipped(shown, "no image suffix", f"{safe(shown)} has no image suffix"))
            else:
                found.append((inner, st.st_size))
    return found, bad


# ----------------------------------------------------------------------------------------------
# Streaming
# ----------------------------------------------------------------------------------------------
@dataclass
class Batch:
    x: np.ndarray  # (n, h, w, 3) uint8
    y: np.ndarray  # (n,) int64
    indices: np.ndarray  # (n,) int64: positions in the split (a skipped file's position is absent)
    skipped: tuple[Skipped, ...] = ()

    def __len__(self) -> int:
        return len(self.y)


@dataclass
class StreamReport:
    """What one pass (an iteration or a ``take``) did."""

    images: int  # asked for
    decoded: int = 0
    skipped: list[Skipped] = field(default_factory=list)
    conversions: Counter = field(default_factory=Counter)  # source colour mode -> images converted to RGB
    peak_held: int = 0  # the most images submitted to the decoders and not yet handed to the caller

    def notes(self, where: str = "") -> list[str]:
        out = []
        if self.conversions:
            gray = sum(n for m, n in self.conversions.items() if m in _GRAY or m.startswith("I;16"))
            alpha = sum(n for m, n in self.conversions.items() if m in ("RGBA", "LA", "PA", "RGBa", "La",
                                                                         "P+transparency"))
            other = sum(self.conversions.values()) - gray - alpha
            parts = ([f"{gray} grayscale"] if gray else []) + \
                    ([f"{alpha} with transparency (composited onto white)"] if alpha else []) + \
                    ([f"{other} in other modes"] if other else [])
            modes = ", ".join(f"{m}: {n}" for m, n in sorted(self.conversions.items()))
            out.append(f"converted to RGB: {', '.join(parts)} ({modes})")
        s = summarize_skipped(self.skipped, where)
        if s:
            out.append(s + "; strict mode refuses such files")
        return out

    def to_dict(self) -> dict:
        return {"images": self.images, "decoded": self.decoded, "skipped": [s.to_dict() for s in self.skipped],
                "conversions": dict(sorted(self.conversions.items()))}


def _default_workers() -> int:
    from resnet_deploy.envinfo import usable_cores

    return max(1, min(8, usable_cores()))


class FolderStream:
    """uint8 NHWC batches of ``split`` (or of ``indices`` into it, in that order), decoded lazily in parallel.

    Iterating yields ``Batch``\\ es of ``batch_size`` positions each, in order; a file that cannot be used is
    left out of its batch (``Batch.skipped``, ``report.skipped``), so a batch may be shorter and ``indices``
    says which images it holds; a batch whose every file was skipped is not yielded. With ``strict=True`` the
    first such file in order raises its ``ImageFileError``. A pass of which no image decodes is a
    ``DataError``. The stream holds at most ``prefetch`` batches besides the one the caller has; breaking
    out of the loop cancels what is pending. ``report`` describes the latest pass.
    """

    def __init__(self, split: FolderSplit, decoding: Decoding | None = None, *, batch_size: int = 64,
                 prefetch: int = 2, workers: int | None = None, strict: bool = False,
                 indices: np.ndarray | None = None, max_memory: int | None = DEFAULT_MAX_MEMORY):
        for name, v in (("batch_size", batch_size), ("prefetch", prefetch), ("workers", workers or 1)):
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 1:
                raise DataError(f"Cannot stream with {name}={safe(repr(v))}.", expected="a positive integer",
                                fix=f"pass {name}=1 or more")
        self.split = split
        self.decoding = decoding or Decoding()
        self.batch_size, self.prefetch = int(batch_size), int(prefetch)
        self.workers = int(workers or _default_workers())
        self.strict = strict
        self.order = np.arange(len(split), dtype=np.int64) if indices is None else self._check(indices)
        self.max_pixels = images.pixel_budget(max_memory)
        self.report = StreamReport(len(self.order))

    @property
    def num_batches(self) -> int:
        """Batches planned (one fewer for each batch whose every file is skipped)."""
        return -(-len(self.order) // self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def __iter__(self) -> Iterator[Batch]:
        return self._run(self.order, self.batch_size)

    def take(self, indices) -> Batch:
        """Images ``indices`` of the split (any order, repeats allowed) as one batch, decoded in parallel."""
        idx = self._check(indices)
        out = list(self._run(idx, max(1, len(idx)), allow_empty=True))
        if not out:
            h, w = self.decoding.size
            return Batch(np.zeros((0, h, w, 3), np.uint8), np.zeros(0, np.int64), np.zeros(0, np.int64))
        return out[0]

    def _check(self, indices) -> np.ndarray:
        idx = np.asarray(indices)
        if idx.size == 0:
            return np.zeros(0, np.int64)
        if idx.ndim != 1 or not np.issubdtype(idx.dtype, np.integer) or idx.min() < 0 or idx.max() >= len(self.split):
            raise DataError(f"Image indices must be integers 0..{len(self.split) - 1} for the {self.split.name} "
                            f"split of {len(self.split)} images.", expected="a 1-D array of integer positions",
                            fix="draw them with data.sampler on split.y")
        return idx.astype(np.int64)

    def _decode(self, i: int, pool: _PixelPool):
        try:
            return decode_image(self.split.path(i), self.decoding, self.max_pixels, pool, self.split.shown(i))
        except ImageFileError as exc:
            return exc

    def _run(self, order: np.ndarray, batch_size: int, allow_empty: bool = False) -> Iterator[Batch]:
        report = self.report = StreamReport(len(order))
        chunks = (order[i:i + batch_size] for i in range(0, len(order), batch_size))
        pixels = _PixelPool(self.max_pixels)
        executor = ThreadPoolExecutor(self.workers, thread_name_prefix="image-folder")
        pending: deque = deque()
        held = 0

        def submit() -> None:
            nonlocal held
            chunk = next(chunks, None)
            if chunk is not None:
                pending.append((chunk, [executor.submit(self._decode, int(i), pixels) for i in chunk]))
                held += len(chunk)
                report.peak_held = max(report.peak_held, held)

        try:
            for _ in range(self.prefetch):
                submit()
            while pending:
                chunk, futures = pending.popleft()
                results = [f.result() for f in futures]
                batch = self._assemble(chunk, results, report)
                del results, futures
                held -= len(chunk)
                submit()
                if len(batch) or allow_empty:
                    yield batch
                del batch
            if len(order) and not report.decoded:
                raise DataError(f"No image of the {len(order)} asked for in {safe(self.split.root)} could be decoded.",
                                expected="image files Pillow reads",
                                fix=summarize_skipped(report.skipped) or "check the folder")
        finally:
            for _, futures in pending:
                for f in futures:
                    f.cancel()
            executor.shutdown(wait=True, cancel_futures=True)

    def _assemble(self, chunk: np.ndarray, results: list, report: StreamReport) -> Batch:
        h, w = self.decoding.size
        keep, arrays, skipped = [], [], []
        for i, r in zip(chunk, results):
            if isinstance(r, ImageFileError):
                if self.strict:
                    raise r
                skipped.append(Skipped(r.path, r.kind, safe(r.what)))
                continue
            px, mode = r
            if mode != "RGB":
                report.conversions[mode] += 1
            keep.append(i)
            arrays.append(px)
        report.decoded += len(keep)
        report.skipped.extend(skipped)
        x = np.stack(arrays) if arrays else np.zeros((0, h, w, 3), np.uint8)
        idx = np.asarray(keep, dtype=np.int64)
        return Batch(x, self.split.y[idx], idx, tuple(skipped))


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def write_image_folder(out: str | os.PathLike, splits: Mapping[str, object], class_names=CLASS_NAMES, *,
                       image_format: str = "png", size=None, jpeg_quality: int = 95, force: bool = False,
                       workers: int | None = None) -> Path:
    """Write ``splits`` (name -> a ``sources.Split`` or an ``(x, y)`` pair: x uint8 (N, H, W, 3), y labels) as
    ``out/<split>/<class>/<index>.png`` (or ``.jpg``), index = the image's position in x, zero-padded so the
    folder reads back in x's order. PNG is lossless: at the source size, reading back gives x byte for byte.
    ``size`` (an int or (height, width)) resizes each image with Pillow's bicubic filter first (for benchmarks
    at 224x224: no longer the source pixels). The folder appears complete or not at all (``atomic_path``)."""
    from PIL import Image

    from resnet_deploy.fileio import atomic_path, check_can_write

    out = Path(out)
    if image_format not in WRITE_FORMATS:
        raise DataError(f"Unknown image format {safe(repr(image_format))}.", expected=" or ".join(WRITE_FORMATS),
                        fix="use png (lossless) or jpeg")
    if not (isinstance(jpeg_quality, int) and 1 <= jpeg_quality <= 100):
        raise DataError(f"JPEG quality {safe(repr(jpeg_quality))} is out of range.", expected="an integer 1..100",
                        fix="e.g. 95")
    target = None if size is None else Decoding(size).size
    names = _check_class_names(class_names)
    arrays = {}
    if not splits:
        raise DataError("No split to write.", expected="train, val and/or test arrays", fix="pass at least one split")
    for name, s in splits.items():
        if name not in SPLIT_NAMES:
            raise DataError(f"Cannot write a split named {safe(repr(name))}.", expected=" or ".join(SPLIT_NAMES),
                            fix="name the splits train, val and test")
        x, y = (s.x, s.y) if hasattr(s, "x") else s
        arrays[name] = _check_arrays(name, np.asarray(x), np.asarray(y), names)
    check_can_write(out, force, "folder")
    suffix = WRITE_FORMATS[image_format]

    def write_one(path: Path, px: np.ndarray) -> None:
        img = Image.fromarray(px)
        if target is not None and img.size != (target[1], target[0]):
            img = img.resize((target[1], target[0]), Image.Resampling.BICUBIC)
        if image_format == "png":
            img.save(path, format="PNG")
        else:
            img.save(path, format="JPEG", quality=jpeg_quality)

    with atomic_path(out) as tmp, ThreadPoolExecutor(workers or _default_workers(),
                                                    thread_name_prefix="folder-write") as pool:
        tmp.mkdir()
        for name, (x, y) in arrays.items():
            for cls in names:
                (tmp / name / cls).mkdir(parents=True)
            width = len(str(max(len(x) - 1, 0)))
            for start in range(0, len(x), 1024):  # bounded: at most 1,024 writes queued
                futures = [pool.submit(write_one, tmp / name / names[int(y[i])] / f"{i:0{width}d}{suffix}", x[i])
                           for i in range(start, min(start + 1024, len(x)))]
                for f in futures:
                    f.result()
    return out


def _check_class_names(class_names) -> tuple[str, ...]:
    if isinstance(class_names, str) or not class_names:
        raise DataError(f"Class names {safe(repr(class_names)[:80])} are not a list of names.",
                        expected="a list of folder names, sorted", fix="e.g. data.constants.CLASS_NAMES")
    names = tuple(class_names)
    for n in names:
        if not isinstance(n, str) or not n or n in (".", "..") or n.startswith(".") or "/" in n or "\0" in n \
                or os.sep in n or len(os.fsencode(n)) > 255:
            raise DataError(f"Class name {safe(repr(n))} cannot be a folder name.",
                            expected="a non-empty name without '/', not starting with '.', at most 255 bytes",
                            fix="rename the class")
    if len(set(names)) != len(names):
        raise DataError("Class names repeat.", expected="distinct names", fix="rename the duplicates")
    if list(names) != sorted(names):
        raise DataError(f"Class names {safe(', '.join(names[:10]))} are not in sorted order: read back, the folder's "
                        "classes are sorted by name, so every label would change.",
                        expected="class names in sorted (Python string) order, labels indexing them",
                        fix="sort the names and relabel y, or prefix them (00_cat, 01_dog)")
    return names


def _check_arrays(name: str, x: np.ndarray, y: np.ndarray, names: tuple[str, ...]):
    if x.ndim != 4 or x.shape[-1] != 3 or x.dtype != np.uint8:
        raise DataError(f"The {name} images have shape {x.shape} and dtype {x.dtype}.",
                        expected="uint8 of shape (N, H, W, 3), RGB", fix="convert with x.astype(np.uint8)")
    if y.ndim == 2 and y.shape[1] == 1:
        y = y[:, 0]
    if y.shape != (len(x),) or not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"The {name} labels have shape {y.shape} and dtype {y.dtype} for {len(x)} images.",
                        expected=f"({len(x)},) integer class indices", fix="one integer label per image")
    if len(y) and (y.min() < 0 or y.max() >= len(names)):
        raise DataError(f"The {name} labels range from {y.min()} to {y.max()} for {len(names)} class names.",
                        expected=f"labels 0..{len(names) - 1}", fix="pass the class names the labels index")
    missing = [names[c] for c in np.flatnonzero(np.bincount(y, minlength=len(names)) == 0)]
    if missing:
        raise DataError(f"The {name} split has no image of class {', '.join(safe(m) for m in missing[:10])}: its "
                        "folder would be empty, and an image folder with an empty class cannot be read.",
                        expected="at least one image of every class in every split",
                        fix="write more images (a larger --limit), or fewer class names")
    return x, y.astype(np.int64)
