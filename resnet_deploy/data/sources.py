"""Finding, reading and validating CIFAR-10.

Sources, first match wins:

1. ``--data PATH`` (every command that reads data has it);
2. the ``RESNET_DEPLOY_DATA`` environment variable;
3. Keras' dataset cache (``$KERAS_HOME`` or ``~/.keras``, folder ``datasets``);
4. a download of the official ``cifar-10-python.tar.gz`` into that cache (skipped when
   ``RESNET_DEPLOY_NO_DOWNLOAD=1``).

PATH may be a folder with ``train.npz``/``test.npz`` (arrays ``x`` uint8 NHWC and ``y``), the
official ``cifar-10-batches-py`` folder, or the official ``cifar-10-python.tar.gz``. The official
batches are pickles and are read with a restricted unpickler (``safe_pickle.py``); the tarball is
read in memory, never extracted.
"""

from __future__ import annotations

import os
import tarfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_deploy.data.constants import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES, PER_CLASS
from resnet_deploy.data.safe_pickle import safe_load_batch
from resnet_deploy.errors import DataError

ENV_VAR = "RESNET_DEPLOY_DATA"
NO_DOWNLOAD_ENV = "RESNET_DEPLOY_NO_DOWNLOAD"
CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR10_TAR_SHA256 = "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce"
TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
TEST_BATCH = "test_batch"
SPLITS = ("train", "test")

_LAYOUTS = (
    "a folder with train.npz and test.npz (arrays x: uint8 N,32,32,3 and y: labels 0..9), "
    "the official cifar-10-batches-py folder, or the official cifar-10-python.tar.gz"
)


@dataclass
class Split:
    name: str
    x: np.ndarray  # uint8, (N, 32, 32, 3), RGB pixels 0..255
    y: np.ndarray  # int64, (N,), class ids 0..9
    indices_sha256_16: str | None = None  # a sample drawn from a bigger split: its indices' fingerprint

    def __len__(self) -> int:
        return len(self.y)

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=NUM_CLASSES)

    def take(self, n: int | None) -> "Split":
        """The first ``n`` images (all when ``n`` is None). The shared test copy's first rows are class-mixed."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise DataError(f"Cannot take {n} images from the {self.name} split.", expected="a positive count")
        return Split(self.name, self.x[:n], self.y[:n])


@dataclass
class Cifar10:
    train: Split | None
    test: Split | None
    source: str  # the path or URL the data came from
    kind: str  # npz | batches | tarball
    notes: list[str] = field(default_factory=list)  # warnings: incomplete splits, stand-ins left out

    def split(self, name: str) -> Split:
        s = getattr(self, name)
        if s is None:
            raise DataError(f"The {name} split was not loaded from {self.source}.")
        return s


# ----------------------------------------------------------------------------------------------
# Resolution
# ----------------------------------------------------------------------------------------------
def keras_cache_dir() -> Path:
    """``$KERAS_HOME/datasets`` or ``~/.keras/datasets``; without a usable $HOME, a private temporary folder
    (``fileio.home_dir``, which says so), never ``/.keras`` at the root."""
    base = os.environ.get("KERAS_HOME")
    if not base:
        from resnet_deploy.fileio import home_dir

        base = home_dir() / ".keras"
    return Path(base) / "datasets"


def _cache_candidates() -> list[Path]:
    d = keras_cache_dir()
    return [
        d / "cifar-10-batches-py",
        d / "cifar-10-batches-py-target" / "cifar-10-batches-py",  # where keras.datasets.cifar10 unpacks
        d / "cifar-10-python.tar.gz",  # what our own download saves
        d / "cifar-10-batches-py-target_archive",  # the tarball keras.datasets.cifar10 keeps (Keras 3)
        d / "cifar-10-batches-py.tar.gz",
    ]


def load_cifar10(data: "str | os.PathLike | Cifar10 | None" = None, splits: tuple[str, ...] = SPLITS) -> Cifar10:
    """Find CIFAR-10 (see module docstring for the order), read the requested splits and validate them.

    ``data`` may also be an already loaded ``Cifar10`` (the pipeline loads once for all stages);
    it is returned as it is when it holds the requested splits.
    """
    for s in splits:
        if s not in SPLITS:
            raise DataError(f"Unknown split {s!r}.", expected=f"one of {SPLITS}")
    if isinstance(data, Cifar10):
        for s in splits:
            data.split(s)  # raises when a requested split was not loaded
        return data
    looked: list[str] = []
    if data is not None:
        return _load_path(Path(data), splits, origin="--data")
    env = os.environ.get(ENV_VAR)
    if env:
        return _load_path(Path(env), splits, origin=f"${ENV_VAR}")
    looked.append(f"--data (not given), ${ENV_VAR} (not set)")
    for cand in _cache_candidates():
        looked.append(str(cand))
        if cand.exists():
            return _load_path(cand, splits, origin="Keras cache")
    return _download(splits, looked)


def _download(splits, looked) -> Cifar10:
    hint = (
        f"Looked in: {'; '.join(looked)}. Point the tool at a local copy with --data PATH or "
        f"{ENV_VAR}=PATH (PATH: {_LAYOUTS})."
    )
    if os.environ.get(NO_DOWNLOAD_ENV, "") not in ("", "0"):
        raise DataError("CIFAR-10 was not found locally and downloads are disabled "
                        f"({NO_DOWNLOAD_ENV} is set).", fix=hint)
    try:
        from keras.utils import get_file

        path = get_file(fname="cifar-10-python.tar.gz", origin=CIFAR10_URL,
                        file_hash=CIFAR10_TAR_SHA256, cache_dir=str(keras_cache_dir().parent),
                        cache_subdir="datasets")
    except Exception as exc:  # offline, DNS failure, hash mismatch
        raise DataError(f"CIFAR-10 was not found locally and the download from {CIFAR10_URL} failed: "
                        f"{type(exc).__name__}: {exc}", fix=hint) from exc
    return _load_path(Path(path), splits, origin="download")


def _load_path(p: Path, splits, origin: str) -> Cifar10:
    ds = _read_path(p, splits, origin)
    _note_incomplete(ds)
    return ds


def _read_path(p: Path, splits, origin: str) -> Cifar10:
    if not p.exists():
        raise DataError(f"The CIFAR-10 path from {origin} does not exist: {p}",
                        expected=_LAYOUTS, fix="check the path, or see `resnet-deploy data --help`")
    if p.is_file():
        if p.name.endswith((".tar.gz", ".tgz")) or (p.name.endswith("_archive") and tarfile.is_tarfile(p)):
            return _from_tarball(p, splits)
        raise DataError(f"{p} is a file but not a CIFAR-10 tarball.", expected=_LAYOUTS,
                        fix="pass the folder that holds train.npz/test.npz, or the .tar.gz itself")
    npz = {s: (p / f"{s}.npz").exists() for s in splits}
    if all(npz.values()):
        return _from_npz(p, splits)
    if any(npz.values()):
        missing = [f"{s}.npz" for s, ok in npz.items() if not ok]
        raise DataError(f"{p} holds {', '.join(f'{s}.npz' for s, ok in npz.items() if ok)} but not "
                        f"{', '.join(missing)}.", expected="train.npz and test.npz side by side",
                        fix=f"copy {', '.join(missing)} into {p}")
    for batches in (p, p / "cifar-10-batches-py"):
        if (batches / TEST_BATCH).exists() or (batches / TRAIN_BATCHES[0]).exists():
            return _from_batches(batches, splits)
    for tar in (p / "cifar-10-python.tar.gz",):
        if tar.exists():
            return _from_tarball(tar, splits)
    found = sorted(x.name for x in p.iterdir())[:12]
    raise DataError(f"No CIFAR-10 found in {p} (it holds: {', '.join(found) or 'nothing'}).",
                    expected=_LAYOUTS, fix="point --data at a folder in one of these layouts")


# ----------------------------------------------------------------------------------------------
# Readers
# ----------------------------------------------------------------------------------------------
MAX_NPZ_IMAGES = 1_000_000  # far above CIFAR-10's 60,000: a bound on what a file may make us allocate


def check_npz_headers(f: Path, image_keys=("x", "jpeg_fill_x")) -> None:
    """Read each array's header (shape, dtype) from the zip without decompressing any data, and refuse
    arrays that cannot be CIFAR images or that would allocate more than ``MAX_NPZ_IMAGES`` images."""
    import zipfile

    limit = MAX_NPZ_IMAGES * 32 * 32 * 3
    with zipfile.ZipFile(f) as zf:
        for info in zf.infolist():
            with zf.open(info) as member:
                version = np.lib.format.read_magic(member)
                shape, _, dtype = (np.lib.format.read_array_header_1_0(member) if version == (1, 0)
                                   else np.lib.format.read_array_header_2_0(member))
            nbytes = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
            key = info.filename.removesuffix(".npy")
            if nbytes > limit or (key in image_keys and len(shape) == 4 and tuple(shape[1:]) != (32, 32, 3)):
                raise DataError(f"{f}: array {key!r} declares shape {tuple(shape)} {dtype} "
                                f"({nbytes / 1e9:.2f} GB), refused before reading it.",
                                expected=f"CIFAR-10 arrays: x uint8 (N,32,32,3) with N <= {MAX_NPZ_IMAGES:,}, y (N,)",
                                fix="re-copy the file, or write it with np.savez(path, x=images, y=labels)")


def _from_npz(folder: Path, splits) -> Cifar10:
    out: dict[str, Split | None] = {"train": None, "test": None}
    notes: list[str] = []
    for s in splits:
        f = folder / f"{s}.npz"
        try:
            check_npz_headers(f)
            with np.load(f, allow_pickle=False) as z:
                if "x" not in z.files or "y" not in z.files:
                    raise DataError(f"{f} has arrays {z.files}, not x and y.",
                                    expected="an .npz with x (uint8 N,32,32,3) and y (labels)",
                                    fix="save it with np.savez(path, x=images, y=labels)")
                x, y = z["x"], z["y"]
                n_fill = len(z["jpeg_fill_y"]) if "jpeg_fill_y" in z.files else 0
        except DataError:
            raise
        except Exception as exc:
            raise DataError(f"Could not read {f}: {type(exc).__name__}: {exc}",
                            expected="a readable .npz written by np.savez", fix="re-copy the file") from exc
        out[s] = _validated(s, x, y, str(f))
        if n_fill:
            notes.append(f"{s}: {n_fill} lossy JPEG stand-ins (jpeg_fill_*) are kept apart and not used")
    return Cifar10(out["train"], out["test"], str(folder), "npz", notes)


def _batch_to_split(batches: list[tuple[str, bytes]], name: str) -> Split:
    xs, ys = [], []
    for src, raw in batches:
        d = safe_load_batch(raw, src)
        if "data" not in d or "labels" not in d:
            raise DataError(f"{src} lacks 'data' or 'labels' (keys: {sorted(map(str, d))}).",
                            expected="an official CIFAR-10 batch", fix="re-download cifar-10-python.tar.gz")
        data = np.asarray(d["data"])
        if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3072:
            raise DataError(f"{src}: data is {data.dtype} {data.shape}, expected uint8 (N, 3072).")
        xs.append(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))  # CHW planes -> NHWC
        ys.append(np.asarray(d["labels"], dtype=np.int64))
    return _validated(name, np.concatenate(xs), np.concatenate(ys), ", ".join(s for s, _ in batches))


def _from_batches(folder: Path, splits) -> Cifar10:
    names = {"train": TRAIN_BATCHES, "test": (TEST_BATCH,)}
    out: dict[str, Split | None] = {"train": None, "test": None}
    for s in splits:
        missing = [n for n in names[s] if not (folder / n).exists()]
        if missing:
            raise DataError(f"{folder} lacks {', '.join(missing)}.",
                            expected="data_batch_1..5 and test_batch", fix="re-extract cifar-10-python.tar.gz")
        out[s] = _batch_to_split([(str(folder / n), (folder / n).read_bytes()) for n in names[s]], s)
    return Cifar10(out["train"], out["test"], str(folder), "batches")


def _from_tarball(path: Path, splits) -> Cifar10:
    names = {"train": TRAIN_BATCHES, "test": (TEST_BATCH,)}
    out: dict[str, Split | None] = {"train": None, "test": None}
    try:
        with tarfile.open(path, "r:gz") as tar:
            members = {Path(m.name).name: m for m in tar.getmembers() if m.isfile()}
            for s in splits:
                missing = [n for n in names[s] if n not in members]
                if missing:
                    raise DataError(f"{path} lacks {', '.join(missing)}.",
                                    expected="the official cifar-10-python.tar.gz",
                                    fix="download it again from " + CIFAR10_URL)
                raw = [(f"{path}:{members[n].name}", tar.extractfile(members[n]).read()) for n in names[s]]
                out[s] = _batch_to_split(raw, s)
    except (tarfile.TarError, OSError, EOFError) as exc:
        raise DataError(f"Could not read {path} as a .tar.gz: {type(exc).__name__}: {exc}",
                        expected="the official cifar-10-python.tar.gz", fix="download it again") from exc
    return Cifar10(out["train"], out["test"], str(path), "tarball")


# ----------------------------------------------------------------------------------------------
# Validation
# ----------------------------------------------------------------------------------------------
def _validated(name: str, x: np.ndarray, y: np.ndarray, source: str) -> Split:
    fix = "check that the file holds CIFAR-10 in the layout: " + _LAYOUTS
    if x.ndim != 4 or tuple(x.shape[1:]) != IMAGE_SHAPE:
        raise DataError(f"{source}: images have shape {x.shape}.", expected=f"(N, {', '.join(map(str, IMAGE_SHAPE))}) NHWC",
                        fix=fix)
    if x.dtype != np.uint8:
        raise DataError(f"{source}: images are {x.dtype}.", expected="uint8 pixels 0..255", fix=fix)
    y = np.asarray(y).reshape(-1)
    if not np.issubdtype(y.dtype, np.integer):
        raise DataError(f"{source}: labels are {y.dtype}.", expected="integer class ids 0..9", fix=fix)
    if len(y) != len(x):
        raise DataError(f"{source}: {len(x)} images but {len(y)} labels.", expected="one label per image", fix=fix)
    if len(y) == 0:
        raise DataError(f"{source}: the {name} split is empty.", fix=fix)
    if y.min() < 0 or y.max() >= NUM_CLASSES:
        raise DataError(f"{source}: labels range {y.min()}..{y.max()}.", expected="class ids 0..9", fix=fix)
    counts = np.bincount(y, minlength=NUM_CLASSES)
    if (counts == 0).any():
        absent = [CLASS_NAMES[i] for i in np.flatnonzero(counts == 0)]
        raise DataError(f"{source}: the {name} split has no images of {', '.join(absent)}.",
                        expected="all 10 CIFAR-10 classes", fix=fix)
    return Split(name, x, y.astype(np.int64))


def _note_incomplete(ds: Cifar10) -> None:
    """Warn (in ``ds.notes``, first) about every split whose class counts differ from the official
    5,000 / 1,000 per class, whatever the layout it was read from: missing images and surplus ones."""
    for s in reversed(SPLITS):
        split = getattr(ds, s)
        if split is None:
            continue
        counts = split.class_counts()
        total = PER_CLASS[s] * NUM_CLASSES
        short = {CLASS_NAMES[i]: int(PER_CLASS[s] - c) for i, c in enumerate(counts) if c < PER_CLASS[s]}
        extra = {CLASS_NAMES[i]: int(c - PER_CLASS[s]) for i, c in enumerate(counts) if c > PER_CLASS[s]}
        if extra:
            detail = ", ".join(f"{k} +{v}" for k, v in extra.items())
            ds.notes.insert(0, f"{s}: more images per class than the official {PER_CLASS[s]:,} ({detail}): "
                               "duplicates, or another data set?")
        if short:
            detail = ", ".join(f"{k} {v}" for k, v in short.items())
            ds.notes.insert(0, f"{s}: {len(split):,} of {total:,} images ({sum(short.values())} missing: {detail})")


def channel_stats(x: np.ndarray, chunk: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    """Per-channel mean and std of uint8 images, in pixel units, without a float copy of the split."""
    n = 0
    s = np.zeros(3, np.float64)
    ss = np.zeros(3, np.float64)
    for i in range(0, len(x), chunk):
        c = x[i:i + chunk].reshape(-1, 3).astype(np.float64)
        s += c.sum(0)
        ss += (c * c).sum(0)
        n += len(c)
    mean = s / n
    return mean, np.sqrt(np.maximum(ss / n - mean**2, 0))
