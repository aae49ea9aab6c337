"""An image folder as the data of a command: ``--data DIR`` in the image-folder layout (``data.folder``).

``is_image_folder(data)`` is the dispatch every command asks (``--data``, else ``$RESNET_DEPLOY_DATA``):
a folder with a ``train/``, ``val/`` or ``test/`` subfolder and no CIFAR-10 ``.npz``/batches in it; also a
folder of class folders (or of images) without split folders, so that its error is the image-folder one
("move the class folders into DIR/train/"), not "no CIFAR-10 found".

``FolderData`` is a split of the folder at one ``Decoding`` (the model's input size and the run's resize
policy), in the shape the CIFAR-10 code reads a ``sources.Split``: ``name``, ``y``, ``len()``,
``class_counts()`` and ``x`` -- except that ``x`` is lazy. ``x[indices]`` decodes only those images
(``FolderStream.take``), so the calibration sample, the INT8 tuning split and the parity images are the
only images ever held, never the split. ``gather(indices)`` is what the sampler calls: the images that
decoded, their labels and their positions (a file that cannot be used is left out and counted, or with
``strict`` refused). ``stream(batch_size)`` gives the whole split in bounded batches (bench's accuracy
pass).

``model_decoding(model_input_shape, fit)`` reads the input size from the model (any HxW) and
``check_model_classes`` refuses a model whose output width is not the folder's class count.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from resnet_deploy.data.folder import (DEFAULT_FIT, Decoding, FolderSplit, FolderStream, ImageFolder,
                                       _has_image_file, looks_like_image_folder, open_image_folder,
                                       summarize_skipped)
from resnet_deploy.errors import DataError
from resnet_deploy.terminal import safe
from resnet_deploy.untrusted.files import DEFAULT_MAX_MEMORY

ENV_VAR = "RESNET_DEPLOY_DATA"
EVAL_ORDER = ("test", "val")  # what bench and the parity check evaluate on, first present


@dataclass(frozen=True)
class FolderSource:
    """An image folder with how to read it: the resize policy (``fit``: crop or stretch, declared once for the
    export; its manifests record it and bench and predict read it from there) and ``strict`` (refuse a file
    that cannot be used instead of skipping it with a count). A plain path means ``FolderSource(path)``."""

    path: Path
    fit: str = DEFAULT_FIT
    strict: bool = False

    def __post_init__(self):
        Decoding(fit=self.fit)  # an unknown policy is refused now, with the names that exist
        object.__setattr__(self, "path", Path(self.path))

    def __fspath__(self) -> str:  # where a path is expected (BenchOptions.data), the folder; pass the source
        return str(self.path)     # itself as ``data=`` to keep fit and strict


def data_path(data) -> Path | None:
    """The path ``--data`` names, else ``$RESNET_DEPLOY_DATA``; None when neither (or data is an object)."""
    if isinstance(data, FolderSource):
        return data.path
    if isinstance(data, (str, os.PathLike)):
        return Path(data)
    if data is None and os.environ.get(ENV_VAR):
        return Path(os.environ[ENV_VAR])
    return None


def is_image_folder(data) -> bool:
    """Whether ``data`` (a path, None for ``$RESNET_DEPLOY_DATA``, or a loaded object) is an image folder.
    A CIFAR-10 npz/batches folder that happens to hold a ``train`` subfolder stays CIFAR-10."""
    if isinstance(data, (ImageFolder, FolderData, FolderSource)):
        return True
    p = data_path(data)
    try:
        if p is None or not p.is_dir() or _is_cifar(p):
            return False
        if looks_like_image_folder(p):
            return True
        # class folders of images without a split folder, or images directly: not CIFAR-10 either, so the
        # image-folder error ("move them into DIR/train/") says more than "no CIFAR-10 found"
        return _has_image_file(p) or any(d.is_dir() and _has_image_file(d) for d in p.iterdir()
                                         if not d.name.startswith("."))
    except OSError:
        return False


def _is_cifar(p: Path) -> bool:
    return any((p / n).exists() for n in ("test.npz", "train.npz", "test_batch", "data_batch_1",
                                          "cifar-10-batches-py", "cifar-10-python.tar.gz"))


def open_folder(data, splits: tuple[str, ...] | None = None, strict: bool = False) -> ImageFolder:
    if isinstance(data, ImageFolder):
        return data
    return open_image_folder(data_path(data), splits=splits, strict=strict)


def eval_split_name(folder: ImageFolder) -> str:
    """The split bench and the parity check evaluate: test/, else val/ (never train/: it is fitted to)."""
    for name in EVAL_ORDER:
        if name in folder.present:
            return name
    raise DataError(f"{safe(folder.root)} has only a train/ split: there is nothing held out to evaluate on.",
                    expected="DIR/test/<class>/... (or DIR/val/<class>/...) beside DIR/train/",
                    fix=f"move some images of each class into {safe(folder.root / 'test')}/<class>/")


def model_decoding(input_shape, fit: str = DEFAULT_FIT, source: str = "the model") -> Decoding:
    """The ``Decoding`` of a model with NHWC ``input_shape`` ((None, H, W, 3) or (H, W, 3)): its height and
    width, with ``fit``. A model with dynamic or non-RGB input is a DataError naming what was found."""
    shape = tuple(input_shape or ())
    dims = shape[1:] if len(shape) == 4 else shape
    if len(dims) != 3 or dims[-1] != 3 or not all(isinstance(d, (int, np.integer)) and d > 0 for d in dims[:2]):
        raise DataError(f"{source} takes inputs of shape {safe(str(shape))}: no fixed image size to decode the "
                        "folder's images to.", expected="an NHWC RGB input of fixed size, e.g. (None, 224, 224, 3)",
                        fix="build the model with a fixed input shape (keras.Input((224, 224, 3)))")
    return Decoding((int(dims[0]), int(dims[1])), fit)


def check_model_classes(outputs: int | None, folder: ImageFolder, source: str = "The model") -> None:
    """A model must output one score per class folder."""
    if outputs != folder.num_classes:
        names = ", ".join(folder.class_names[:8]) + (", ..." if folder.num_classes > 8 else "")
        raise DataError(f"{source} outputs {outputs} class scores, but the image folder {safe(folder.root)} has "
                        f"{folder.num_classes} classes ({safe(names)}).",
                        expected=f"a classifier with {folder.num_classes} outputs, one per class folder, in sorted "
                                 "folder-name order",
                        fix="train (or fine-tune) the model on this folder's classes, or point --data at the folder "
                            "it was trained on")


class _LazyImages:
    """``FolderData.x``: indexing decodes (never the whole split); a skipped file is an error here, since
    a caller indexing ``x`` and ``y`` alike needs every image (the sampler uses ``gather``, which skips)."""

    def __init__(self, data: "FolderData"):
        self._data = data

    @property
    def shape(self) -> tuple:
        return (len(self._data), *self._data.decoding.size, 3)

    dtype = np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self._data)

    def __getitem__(self, key) -> np.ndarray:
        idx = np.arange(len(self._data))[key] if isinstance(key, slice) else np.asarray(key)
        if idx.ndim == 0:
            return self[idx[None]][0]
        x, _, kept, skipped = self._data.gather(idx)
        if len(kept) != len(idx):
            raise DataError(f"{len(idx) - len(kept)} of the {len(idx)} images asked for could not be decoded: "
                            f"{summarize_skipped(skipped, self._data.where)}.",
                            expected="images that decode", fix="remove or fix the files named, then run again")
        return x


class FolderData:
    """One split of an image folder at one ``Decoding``, read like a ``sources.Split`` (module docstring)."""

    def __init__(self, folder: ImageFolder, split: FolderSplit, decoding: Decoding, *, strict: bool = False,
                 max_memory: int | None = DEFAULT_MAX_MEMORY, workers: int | None = None):
        self.folder, self.split, self.decoding = folder, split, decoding
        self.strict, self.max_memory, self.workers = strict, max_memory, workers
        self.name = split.name
        self.y = split.y
        self.x = _LazyImages(self)
        self.skipped: list = list(split.skipped)  # listing, then every gather/stream pass
        self.conversions: dict = {}
        self._fingerprint: str | None = None

    def __len__(self) -> int:
        return len(self.split)

    @property
    def class_names(self) -> tuple[str, ...]:
        return self.folder.class_names

    @property
    def num_classes(self) -> int:
        return self.folder.num_classes

    @property
    def where(self) -> str:
        return safe(self.split.root)

    def class_counts(self) -> np.ndarray:
        return self.split.class_counts()

    def _stream(self, batch_size: int = 64, prefetch: int = 2) -> FolderStream:
        return FolderStream(self.split, self.decoding, batch_size=batch_size, prefetch=prefetch, strict=self.strict,
                            max_memory=self.max_memory, workers=self.workers)

    def gather(self, indices) -> tuple[np.ndarray, np.ndarray, np.ndarray, list]:
        """Images ``indices`` decoded: (x uint8, y, the positions that decoded, what was skipped)."""
        s = self._stream()
        b = s.take(np.asarray(indices, dtype=np.int64))
        self._note(s)
        return b.x, b.y, b.indices, list(s.report.skipped)

    def stream(self, batch_size: int = 256, prefetch: int = 2) -> FolderStream:
        """The whole split in order, in bounded batches (``FolderStream``); call ``note(stream)`` after."""
        return self._stream(batch_size, prefetch)

    def _note(self, s: FolderStream) -> None:
        self.skipped.extend(s.report.skipped)
        for mode, n in s.report.conversions.items():
            self.conversions[mode] = self.conversions.get(mode, 0) + n

    note = _note

    def take(self, n: int | None):
        """The first ``n`` images that decode, in memory, as a ``sources.Split``-like (x, y, indices)."""
        from resnet_deploy.data.sources import Split

        n = len(self) if n is None else min(int(n), len(self))
        if n < 1:
            raise DataError(f"Cannot take {n} images from the {self.name} split.", expected="a positive count")
        x, y, idx, _ = self.gather(np.arange(n))
        split = Split(self.name, x, y)
        split.indices = idx
        return split

    def limited(self, n: int) -> "FolderData":
        """The first ``n`` images of the split (bench's ``--limit``), as their own ``FolderData``."""
        from dataclasses import replace

        s = self.split
        sub = replace(s, files=s.files[:n], y=s.y[:n], sizes=s.sizes[:n])
        return FolderData(self.folder, sub, self.decoding, strict=self.strict, max_memory=self.max_memory,
                          workers=self.workers)

    def fingerprint(self) -> str:
        """The split's content fingerprint (``FolderSplit.fingerprint``), computed once."""
        if self._fingerprint is None:
            self._fingerprint = self.split.fingerprint(self.workers)
        return self._fingerprint

    def record(self, fingerprint: bool = False) -> dict:
        """For manifests and reports: the folder, the split, its classes and the decoding (resize policy)."""
        out = {**self.split.record(), "decoding": self.decoding.record()}
        if fingerprint:
            out["fingerprint_sha256"] = self.fingerprint()
        return out

    def notes(self) -> list[str]:
        """What happened to files that were not plain RGB images, or not usable (said, never silent)."""
        out = []
        if self.conversions:
            modes = ", ".join(f"{m}: {n}" for m, n in sorted(self.conversions.items()))
            out.append(f"{self.name}: converted to RGB ({modes}; grayscale repeated over 3 channels, transparency "
                       "composited onto white)")
        s = summarize_skipped(self.skipped, self.where)
        if s:
            out.append(s + "; --strict refuses such files")
        return out


def folder_split(folder: ImageFolder, name: str, decoding: Decoding, strict: bool = False) -> FolderData:
    return FolderData(folder, folder.split(name), decoding, strict=strict)
