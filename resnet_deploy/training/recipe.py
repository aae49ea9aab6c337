"""The training recipe: one frozen, validated ``TrainConfig`` and the learning-rate formula.

Cheap to import (no Keras): the CLI builds a ``TrainConfig`` and every bad option fails here,
before a framework is imported or an image is read.

The defaults are a GPU recipe for ResNet34 on CIFAR-10: SGD with Nesterov momentum 0.9, batch
512, peak learning rate 0.1 x batch/128 (linear scaling, Goyal et al. 2017) reached after a
linear warm-up, then a cosine (or linear one-cycle) decay to zero, weight decay 5e-4, label
smoothing 0.1, pad-4 + random crop + horizontal flip (cutout optional), 40 epochs.

Weight decay is coupled L2 on convolution and dense kernels (``kernel_regularizer=L2(wd/2)``,
whose gradient is ``wd * w``): the same update as ``torch.optim.SGD(weight_decay=5e-4)`` in the
recipes the 5e-4 figure comes from. Keras' own ``SGD(weight_decay=...)`` is decoupled
(``w -= lr * wd * w``, not amplified by momentum), so the same number there would be about ten
times weaker. BatchNorm scales and shifts and the classifier bias are not decayed.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path

from resnet_deploy.errors import ResnetDeployError, TrainError

PRECISIONS = ("auto", "float32", "mixed_float16", "mixed_bfloat16")
SCHEDULES = ("cosine", "onecycle")
DISTRIBUTE = ("none", "data-parallel", "multi-process")
BASE_BATCH = 128  # the learning rate below is per this many images (linear scaling rule)
BASE_LR = 0.1  # peak learning rate at batch BASE_BATCH
WARMUP_START = 0.1  # the warm-up starts at this fraction of the peak learning rate
DEFAULT_WARMUP = 2.0  # epochs of linear warm-up when --warmup-epochs is not given

# Fields that only steer where and how a run is written, not what it learns.
RUN_FIELDS = ("out_dir", "force", "resume", "workers", "verbose", "checkpoint_every")


@dataclass(frozen=True)
class TrainConfig:
    """Everything that decides a training run; ``to_dict()`` is stored with the model as its recipe."""

    arch: str = "resnet34"
    width: float = 1.0
    stem: str = "cifar"
    epochs: int = 40
    batch_size: int = 512
    lr: float | None = None  # peak learning rate; None: BASE_LR * batch_size / BASE_BATCH
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # coupled L2 on conv/dense kernels (see module docstring)
    label_smoothing: float = 0.1
    schedule: str = "cosine"  # after the warm-up: cosine or linear (one-cycle) decay to final_lr_fraction
    warmup_epochs: float | None = None  # None: DEFAULT_WARMUP epochs, or a quarter of a run shorter than 8 epochs
    final_lr_fraction: float = 0.0
    pad: int = 4  # reflect-pad then random 32x32 crop; 0 disables
    flip: bool = True
    cutout: int = 0  # side of the square cut out of each training image (0: off)
    seed: int = 0
    precision: str = "auto"  # auto: mixed_bfloat16 on GPUs that have it, mixed_float16 on older GPUs, float32 on CPU
    distribute: str = "none"  # data-parallel: keras.distribution (JAX) or tf.distribute.MirroredStrategy (TF);
    # multi-process: keras.distribution.DataParallel over the devices of several processes (JAX; multiprocess.py)
    teacher: Path | None = None  # a .keras classifier to distil from
    kd_temperature: float = 4.0
    kd_weight: float = 0.5  # loss = (1 - w) * cross-entropy + w * T^2 * KL(teacher_T || student_T)
    limit_train: int | None = None  # first N training images (smoke runs)
    limit_test: int | None = None  # first N test images
    val_split: int = 0  # N class-balanced training images held out to choose best.keras (0: no selection)
    out_dir: Path | None = None  # default runs/<arch>
    force: bool = False
    resume: bool = False
    workers: int = 1  # threads preparing batches (keras.utils.PyDataset workers)
    checkpoint_every: float = 0.0  # minutes between checkpoints inside an epoch (0: at each epoch's end only)
    verbose: bool = True

    def __post_init__(self):
        from resnet_deploy.models.builder import _validate
        from resnet_deploy.models.registry import get_arch

        try:
            spec = get_arch(self.arch)
            _validate(spec, self.width, self.stem, (32, 32, 3), 10)
        except ResnetDeployError as exc:  # re-raise as a training error, same message
            raise TrainError(exc.what, exc.expected, exc.fix) from exc
        object.__setattr__(self, "arch", spec.name)
        if self.teacher is not None:
            object.__setattr__(self, "teacher", Path(self.teacher))
        if self.out_dir is not None:
            object.__setattr__(self, "out_dir", Path(self.out_dir))
        if self.warmup_epochs is None and isinstance(self.epochs, int):  # so `train --epochs 1` just works
            object.__setattr__(self, "warmup_epochs", min(DEFAULT_WARMUP, self.epochs / 4))
        self._check_ints()
        self._check_floats()
        self._check_choices()

    def _check_ints(self) -> None:
        for name, low in (("epochs", 1), ("batch_size", 1), ("workers", 1)):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < low:
                raise TrainError(f"--{name.replace('_', '-')} {v!r} is not usable.", expected=f"an integer >= {low}")
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            if v is not None and (not isinstance(v, int) or v < 1):
                raise TrainError(f"--{name.replace('_', '-')} {v!r} is not usable.",
                                 expected="a positive number of images", fix="leave it out to use the whole split")
        if self.limit_train is not None and self.limit_train < self.batch_size:
            raise TrainError(f"--limit-train {self.limit_train} is smaller than one batch ({self.batch_size}).",
                             expected="at least one full batch of training images",
                             fix=f"pass --batch-size {self.limit_train} or less, or more training images")
        if not isinstance(self.val_split, int) or isinstance(self.val_split, bool) or self.val_split < 0:
            raise TrainError(f"--val-split {self.val_split!r} is not usable.",
                             expected="0 (no validation split) or a number of training images, e.g. 5000")
        if self.val_split and self.val_split < 10:
            raise TrainError(f"--val-split {self.val_split} cannot hold every class.",
                             expected="at least 10 images (one per class); a few thousand is usual",
                             fix="pass --val-split 5000, or 0 to keep only the last epoch")
        if self.val_split and self.limit_train is not None and self.limit_train - self.val_split < self.batch_size:
            raise TrainError(f"--val-split {self.val_split} leaves less than one batch of the "
                             f"{self.limit_train} training images to train on.",
                             expected=f"--val-split at most {self.limit_train - self.batch_size}",
                             fix="lower --val-split or raise --limit-train")
        if not (0 <= self.pad <= 16):
            raise TrainError(f"--pad {self.pad} is not usable.", expected="0 (off) to 16 pixels; 4 is standard")
        if not (0 <= self.cutout <= 32):
            raise TrainError(f"--cutout {self.cutout} is not usable.", expected="0 (off) to 32 pixels; 8 or 16 is usual")
        if not isinstance(self.seed, int) or self.seed < 0:
            raise TrainError(f"--seed {self.seed!r} is not usable.", expected="a non-negative integer")

    def _check_floats(self) -> None:
        def bad(flag, value, expected, fix=None):
            raise TrainError(f"{flag} {value!r} is not usable.", expected=expected, fix=fix)

        if self.lr is not None and not (math.isfinite(self.lr) and 0 < self.lr <= 10):
            bad("--lr", self.lr, "a peak learning rate in (0, 10]", f"leave it out for {BASE_LR} x batch/{BASE_BATCH}")
        if not (0 <= self.momentum < 1):
            bad("--momentum", self.momentum, "a value in [0, 1); 0.9 is standard")
        if not (math.isfinite(self.weight_decay) and 0 <= self.weight_decay < 0.1):
            bad("--weight-decay", self.weight_decay, "a value in [0, 0.1); 5e-4 is standard for CIFAR ResNets")
        if not (0 <= self.label_smoothing < 1):
            bad("--label-smoothing", self.label_smoothing, "a value in [0, 1); 0.1 is usual")
        if not (0 <= self.warmup_epochs <= self.epochs):
            bad("--warmup-epochs", self.warmup_epochs, f"a value in [0, epochs={self.epochs}]",
                f"pass --warmup-epochs {min(DEFAULT_WARMUP, self.epochs / 4):g}, or leave it out (it then "
                f"defaults to {DEFAULT_WARMUP:g} epochs, or a quarter of a shorter run)")
        if not (math.isfinite(self.checkpoint_every) and 0 <= self.checkpoint_every <= 24 * 60):
            bad("--checkpoint-every", self.checkpoint_every,
                "minutes between checkpoints inside an epoch, from 0 (each epoch's end only) to 1440",
                "pass --checkpoint-every 10 for a checkpoint every ten minutes")
        if not (0 <= self.final_lr_fraction <= 1):
            bad("--final-lr-fraction", self.final_lr_fraction, "a fraction of the peak learning rate in [0, 1]")
        if not (math.isfinite(self.kd_temperature) and 0 < self.kd_temperature <= 100):
            bad("--kd-temperature", self.kd_temperature, "a temperature in (0, 100]; 2 to 8 is usual")
        if not (0 < self.kd_weight <= 1):
            bad("--kd-weight", self.kd_weight, "a weight in (0, 1] on the distillation term")

    def _check_choices(self) -> None:
        for name, choices in (("precision", PRECISIONS), ("schedule", SCHEDULES), ("distribute", DISTRIBUTE)):
            v = getattr(self, name)
            if v not in choices:
                raise TrainError(f"Unknown --{name} {v!r}.", expected="one of " + ", ".join(choices))
        if self.teacher is not None:
            t = self.teacher
            if not t.exists():
                raise TrainError(f"Teacher model {t} does not exist.", expected="a .keras classifier (e.g. runs/resnet34/model.keras)",
                                 fix="train a teacher first, or check the path")
            if t.suffix not in (".keras", ".h5"):
                raise TrainError(f"Teacher {t} is not a Keras model file.", expected="a .keras or .h5 file")

    # Derived values ------------------------------------------------------------------------
    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else BASE_LR * self.batch_size / BASE_BATCH

    @property
    def output_dir(self) -> Path:
        return self.out_dir if self.out_dir is not None else Path("runs") / self.arch

    def recipe(self) -> dict:
        """What the model learned from: every field except where/how the run was written."""
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in RUN_FIELDS}
        d["teacher"] = str(self.teacher) if self.teacher else None
        d["peak_lr"] = self.peak_lr
        d["weight_decay_kind"] = "coupled L2 on conv/dense kernels (torch SGD weight_decay equivalent)"
        return d

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for k in ("teacher", "out_dir"):
            d[k] = str(d[k]) if d[k] is not None else None
        return d

    @classmethod
    def from_dict(cls, d: dict, **overrides) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        kwargs = {k: v for k, v in d.items() if k in names}
        kwargs.update(overrides)
        return cls(**kwargs)



def lr_at(step: float, peak: float, total_steps: int, warmup_steps: int, schedule: str = "cosine",
          final_fraction: float = 0.0) -> float:
    """The learning rate after ``step`` optimizer updates (pure Python; the Keras schedule mirrors it).

    Linear warm-up from ``WARMUP_START * peak`` to ``peak`` over ``warmup_steps``, then cosine or
    linear decay to ``final_fraction * peak`` at ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return peak * (WARMUP_START + (1 - WARMUP_START) * step / warmup_steps)
    p = min(max((step - warmup_steps) / max(1, total_steps - warmup_steps), 0.0), 1.0)
    end = peak * final_fraction
    if schedule == "cosine":
        return end + (peak - end) * 0.5 * (1 + math.cos(math.pi * p))
    return peak + (end - peak) * p
