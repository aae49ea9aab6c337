"""The input pipeline: numpy batches through ``keras.utils.PyDataset``, no tf.data.

Augmentation (reflect-pad + random crop, horizontal flip, optional cutout) is vectorised over
a whole batch in numpy. Every random draw comes from ``np.random.default_rng((seed, epoch,
batch))``, so an epoch's batches are the same whatever order or thread builds them, and a run
resumed at epoch k sees exactly the batches the uninterrupted run would have seen.

Images stay uint8 until the end of a batch and leave as float32 pixels 0..255: the models carry
their normalisation as their first layer (``data.preprocess`` with ``Preprocessing.pixels()``).

In a multi-process run (``--distribute multi-process``) each process serves only its shard of every
global batch (``shard=(index, count)``: the index-th of ``count`` equal slices), built from its own
images only; the random draws are still made for the whole global batch and sliced, so the shards
of all processes put together are exactly the batch a single process would have served.
"""

from __future__ import annotations

import numpy as np
import keras

from resnet_deploy.data.constants import CIFAR10_MEAN, NUM_CLASSES
from resnet_deploy.data.preprocess import Preprocessing, preprocess

CUTOUT_FILL = np.round(np.asarray(CIFAR10_MEAN)).astype(np.uint8)  # the mean pixel: 0 after normalisation


def augment_batch(x: np.ndarray, rng: np.random.Generator, pad: int = 4, flip: bool = True,
                  cutout: int = 0, draws: int | None = None, offset: int = 0) -> np.ndarray:
    """Random crop after reflect padding, horizontal flip and cutout for a uint8 NHWC batch.

    ``draws``/``offset``: ``x`` is rows ``offset:offset + len(x)`` of a batch of ``draws`` images; every
    random number is drawn for the whole batch and only this part's are used (a process's shard of a
    global batch is augmented exactly as in the whole batch). Default: ``x`` is the whole batch."""
    n, h, w, _ = x.shape
    total = n if draws is None else draws
    if not 0 <= offset <= total - n:
        raise ValueError(f"rows {offset}:{offset + n} are not inside a batch of {total}")

    def part(values):
        return values[offset:offset + n]

    if pad:
        padded = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), mode="reflect")
        oy = part(rng.integers(0, 2 * pad + 1, total))
        ox = part(rng.integers(0, 2 * pad + 1, total))
        rows = (oy[:, None] + np.arange(h))[:, :, None]  # (n, h, 1)
        cols = (ox[:, None] + np.arange(w))[:, None, :]  # (n, 1, w)
        x = padded[np.arange(n)[:, None, None], rows, cols]
    if flip:
        flipped = part(rng.random(total)) < 0.5
        x = np.where(flipped[:, None, None, None], x[:, :, ::-1], x)
    if cutout:
        cy = part(rng.integers(0, h, total))[:, None, None]  # centre; the square may hang over the border
        cx = part(rng.integers(0, w, total))[:, None, None]
        yy = np.arange(h)[None, :, None]
        xx = np.arange(w)[None, None, :]
        lo_y, lo_x = cy - cutout // 2, cx - cutout // 2  # the square [lo, lo + cutout) around the centre
        inside = (yy >= lo_y) & (yy < lo_y + cutout) & (xx >= lo_x) & (xx < lo_x + cutout)
        x = np.where(inside[..., None], CUTOUT_FILL, x)
    return np.ascontiguousarray(x)


def one_hot(y: np.ndarray) -> np.ndarray:
    return np.eye(NUM_CLASSES, dtype=np.float32)[y]


def shard_rows(n: int, shard: tuple[int, int]) -> slice:
    """The rows of the ``shard[0]``-th of ``shard[1]`` equal parts of ``n`` rows."""
    index, count = shard
    if not (count >= 1 and 0 <= index < count and n % count == 0):
        raise ValueError(f"{n} rows do not split into {count} equal shards (shard {index})")
    per = n // count
    return slice(index * per, (index + 1) * per)


class TrainBatches(keras.utils.PyDataset):
    """Shuffled, augmented training batches; the last partial batch is dropped (fixed shapes).

    ``batch_size`` is the global batch; ``shard=(index, count)``: serve only that slice of each batch
    (one process of a multi-process run)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, seed: int, pad: int = 4,
                 flip: bool = True, cutout: int = 0, epoch: int = 0, workers: int = 1,
                 shard: tuple[int, int] = (0, 1)):
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(4, 2 * workers))
        self.rows = shard_rows(batch_size, shard)
        self.x, self.y = x, y
        self.batch_size, self.seed = batch_size, seed
        self.pad, self.flip, self.cutout = pad, flip, cutout
        self.epoch = epoch  # set by the trainer's callback at each epoch's start
        self._cache: tuple[int, np.ndarray] | None = None  # (epoch, permutation), replaced in one assignment

    @property
    def num_batches(self) -> int:
        return len(self.y) // self.batch_size

    def order(self, epoch: int) -> np.ndarray:
        cache = self._cache
        if cache is None or cache[0] != epoch:
            cache = (epoch, np.random.default_rng((self.seed, epoch)).permutation(len(self.y)))
            self._cache = cache
        return cache[1]

    def batch(self, epoch: int, idx: int) -> tuple[np.ndarray, np.ndarray]:
        sel = self.order(epoch)[idx * self.batch_size:(idx + 1) * self.batch_size][self.rows]
        rng = np.random.default_rng((self.seed, epoch, idx, 1))
        x = augment_batch(self.x[sel], rng, self.pad, self.flip, self.cutout, draws=self.batch_size,
                          offset=self.rows.start)
        return preprocess(x, Preprocessing.pixels()), one_hot(self.y[sel])

    def __getitem__(self, idx: int):
        return self.batch(self.epoch, idx)


class EpochTail(keras.utils.PyDataset):
    """The batches of one epoch from batch ``start`` on, exactly as ``batches`` serves them in that epoch:
    what a run resumed from a checkpoint taken inside an epoch trains on first."""

    def __init__(self, batches: TrainBatches, epoch: int, start: int, workers: int = 1):
        if not 0 < start < batches.num_batches:
            raise ValueError(f"an epoch tail starts inside the epoch: 0 < {start} < {batches.num_batches}")
        super().__init__(workers=workers, use_multiprocessing=False, max_queue_size=max(4, 2 * workers))
        self.batches, self.epoch, self.start = batches, epoch, start

    @property
    def num_batches(self) -> int:
        return self.batches.num_batches - self.start

    def __getitem__(self, idx: int):
        return self.batches.batch(self.epoch, self.start + idx)


class EvalBatches(keras.utils.PyDataset):
    """Test batches in order, as ``(x, y, weight)``. With ``multiple`` > 1 (data-parallel replicas)
    the last batch gets up to ``multiple - 1`` zero-weight copies of its first image so that it splits
    evenly: accuracy (a weighted metric) stays exact, the mean loss counts the copies as 0 (a bias of
    at most (multiple - 1) / images). ``shard=(index, count)``: serve only that slice of each (padded)
    batch; ``multiple`` must then be a multiple of ``count`` (it is the global number of devices)."""

    def __init__(self, x: np.ndarray, y: np.ndarray, batch_size: int, multiple: int = 1,
                 shard: tuple[int, int] = (0, 1)):
        super().__init__(workers=1, use_multiprocessing=False)
        if multiple % shard[1]:
            raise ValueError(f"batches padded to a multiple of {multiple} do not split over {shard[1]} shards")
        self.x, self.y, self.batch_size, self.multiple, self.shard = x, y, batch_size, multiple, shard

    @property
    def num_batches(self) -> int:
        return -(-len(self.y) // self.batch_size)

    def __getitem__(self, idx: int):
        start = idx * self.batch_size
        rows = np.arange(start, min(start + self.batch_size, len(self.y)))
        short = -len(rows) % self.multiple
        w = np.concatenate([np.ones(len(rows), np.float32), np.zeros(short, np.float32)])
        rows = np.concatenate([rows, np.full(short, start)])
        mine = shard_rows(len(rows), self.shard)
        rows, w = rows[mine], w[mine]
        return preprocess(self.x[rows], Preprocessing.pixels()), one_hot(self.y[rows]), w
