"""Keras callbacks of a run: epoch seeding, progress with ETA, CSV log, curves PNG, checkpoints.

All files are rewritten atomically at each epoch's end from the run's history, so a run killed
at any moment leaves a CSV and a PNG that agree with its last checkpoint. The PNG needs
matplotlib, which is optional: without it the run says so once and goes on (the CSV has it all).
"""

from __future__ import annotations

import csv
import io
import math
import time
from pathlib import Path
from typing import Callable

import keras

from resnet_deploy.fileio import atomic_path
from resnet_deploy.training.checkpoint import RunState, current_lr, optimizer_iterations, save_last

CSV_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "iterations", "epoch_s", "train_s",
              "test_s", "train_images_per_s", "from_step")
CURVES_SKIPPED = ("curves.png skipped: matplotlib is not installed (log.csv has every figure; "
                  "pip install matplotlib to get the PNG)")


class EpochSeeder(keras.callbacks.Callback):
    """Tells the training batches which epoch they serve (their shuffling and augmentation seed)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch


class EpochClock:
    """Times one epoch in parts, so that throughput counts training only.

    ``epoch_s``: the whole epoch (wall clock): from its start to the end of its test pass, before
    the checkpoint and logs are written.
    ``train_s``: the training pass alone, from the first training batch until the test pass
    starts (Keras reads the training metrics back before it evaluates, so the device has finished
    the last step by then); includes the first step's compilation in a session's first epoch.
    ``test_s``: the test pass. ``train_images_per_s``: images of the second to last batch over
    the time from the second batch's start to the end of training: the first batch (the
    compilation, the input pipeline starting) is left out. Epoch 1 may still be slower (a backend
    can compile again at the second step): compare throughput from epoch 2 on. With a single
    batch per epoch it is the whole training pass's figure.

    Only ``*_begin`` batch hooks are used: a callback with an ``on_train_batch_end`` would make
    Keras give up its asynchronous dispatch and slow every step down.
    """

    def __init__(self, batch_size: int, steps: int, clock: Callable[[], float] = time.perf_counter):
        self.batch_size, self.steps, self.clock = batch_size, steps, clock
        self._reset()

    def _reset(self):
        self.t_epoch = self.t_first = self.t_second = self.t_test = self.t_test_end = None
        self.second_step = None

    def epoch_begin(self):
        self._reset()
        self.t_epoch = self.clock()

    def train_batch_begin(self, step: int):
        if self.t_first is None:
            self.t_first = self.clock()
        elif self.t_second is None:
            self.t_second, self.second_step = self.clock(), step

    def test_begin(self):
        if self.t_test is None and self.t_epoch is not None:  # fit's validation, not a later evaluate()
            self.t_test = self.clock()

    def test_end(self):
        if self.t_test is not None and self.t_test_end is None:
            self.t_test_end = self.clock()

    def epoch_end(self) -> dict:
        now = self.clock()
        train_end = self.t_test if self.t_test is not None else now
        first = self.t_first if self.t_first is not None else self.t_epoch
        test_end = self.t_test_end if self.t_test_end is not None else now
        times = {"epoch_s": now - self.t_epoch, "train_s": train_end - first,
                 "test_s": test_end - self.t_test if self.t_test is not None else None}
        if self.t_second is not None and train_end > self.t_second:
            images, seconds = (self.steps - self.second_step) * self.batch_size, train_end - self.t_second
        else:
            images, seconds = self.steps * self.batch_size, times["train_s"]
        times["train_images_per_s"] = images / seconds if seconds > 0 else None
        self._reset()
        return times


class RunRecorder(keras.callbacks.Callback):
    """At each epoch's end: history row, best model, resume checkpoint, CSV, PNG, a progress line."""

    def __init__(self, out_dir: Path, state: RunState, total_epochs: int, steps: int, batch_size: int,
                 log: Callable[[str], None], student=None, best=None, clock: Callable[[], float] = time.perf_counter,
                 checkpoint_every_s: float = 0.0, writes: bool = True):
        """``student``: the network whose weights the checkpoint keeps (None: the compiled model itself);
        ``best``: a ``trainer.BestModel`` that writes best.keras when the validation accuracy improves (None: none);
        ``checkpoint_every_s``: also write the resume checkpoint inside an epoch, at the first batch that
        starts this many seconds after the last checkpoint (0: at epoch ends only);
        ``writes``: False on the processes after 0 of a multi-process run: the run state is kept, no file
        is written (no checkpoint, log.csv or curves)."""
        super().__init__()
        self.writes = writes
        self.student, self.best = student, best
        self.out_dir, self.state, self.total_epochs = out_dir, state, total_epochs
        self.log = log
        self.steps = steps
        self.clock = EpochClock(batch_size, steps, clock)
        self._now = clock
        self.checkpoint_every_s = checkpoint_every_s
        self._last_save = clock()
        self._from_step = 0  # the batch the current epoch started at (a resumed epoch's tail starts later)
        self._carry_s = 0.0  # seconds the current epoch had run before the interruption it resumes from
        self._durations: list[float] = []
        self._curves_skipped = False

    def begin_tail(self, start: int) -> None:
        """The next epoch is the tail of an interrupted one: its first batch is ``start``."""
        self._from_step, self._carry_s = start, self.state.step_elapsed_s
        self.clock.steps = self.steps - start

    def on_epoch_begin(self, epoch, logs=None):
        self.clock.epoch_begin()

    def on_train_batch_begin(self, batch, logs=None):
        self.clock.train_batch_begin(batch)
        if (self.writes and self.checkpoint_every_s and batch
                and self._now() - self._last_save >= self.checkpoint_every_s):
            self._save_inside_epoch(batch)

    def _save_inside_epoch(self, batch: int) -> None:
        """The resume checkpoint after ``batch`` batches of this epoch (every earlier step has run: reading
        the optimizer's counter waits for it)."""
        st = self.state
        st.step = self._from_step + batch
        st.step_elapsed_s = self._carry_s + (self._now() - self.clock.t_epoch)
        st.iterations = optimizer_iterations(self.model)
        save_last(self.out_dir, self.model, st, self.student)
        self._last_save = self._now()
        self.log(f"checkpoint inside epoch {st.epoch + 1}: batch {st.step}/{self.steps}, optimizer step {st.iterations}")

    def on_test_begin(self, logs=None):
        self.clock.test_begin()

    def on_test_end(self, logs=None):
        self.clock.test_end()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        times = self.clock.epoch_end()
        self._durations.append(times["epoch_s"])
        row = {"epoch": epoch + 1, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
               "val_loss": logs.get("val_loss"), "val_accuracy": logs.get("val_accuracy"),
               "lr": current_lr(self.model), "iterations": optimizer_iterations(self.model)}
        row |= {k: None if v is None else round(v, 1 if k == "train_images_per_s" else 3) for k, v in times.items()}
        row = {k: (float(v) if isinstance(v, (int, float)) and k not in ("epoch", "iterations") else v)
               for k, v in row.items()}
        if self._from_step:  # the tail of an interrupted epoch: its figures cover these batches only
            row["from_step"] = self._from_step
        st = self.state
        st.history.append(row)
        st.epoch, st.iterations = epoch + 1, row["iterations"]
        st.elapsed_s += times["epoch_s"] + self._carry_s
        st.step, st.step_elapsed_s = 0, 0.0
        self._from_step, self._carry_s, self.clock.steps = 0, 0.0, self.steps
        acc = row["val_accuracy"]
        if acc is not None and math.isfinite(acc) and (st.best_accuracy is None or acc > st.best_accuracy):
            st.best_epoch, st.best_accuracy = epoch + 1, acc
            if self.best is not None:
                self.best.save(epoch + 1, acc)
        if not self.writes:
            return
        save_last(self.out_dir, self.model, st, self.student)
        self._last_save = self._now()
        write_csv(self.out_dir / "log.csv", st.history)
        self._curves(self.out_dir / "curves.png", st.history)
        self.log(self._line(row))

    def _curves(self, path: Path, history: list[dict]) -> None:
        if self._curves_skipped:
            return
        if not write_curves(path, history):
            self._curves_skipped = True
            if path.exists():  # an earlier session's PNG would no longer agree with log.csv
                path.unlink()
            self.log(CURVES_SKIPPED)

    def _line(self, row: dict) -> str:
        recent = self._durations[1:] or self._durations  # the first epoch carries the compilation
        eta = (self.total_epochs - row["epoch"]) * sum(recent) / len(recent)
        width = len(str(self.total_epochs))

        def pct(v):
            return "  -  " if v is None else f"{100 * v:5.1f}%"

        speed = row["train_images_per_s"]
        return (f"epoch {row['epoch']:>{width}}/{self.total_epochs}  loss {row['loss']:.4f}  acc {pct(row['accuracy'])}  "
                f"val_loss {row['val_loss'] if row['val_loss'] is None else format(row['val_loss'], '.4f')}  "
                f"val_acc {pct(row['val_accuracy'])}  lr {row['lr']:.4g}  {row['epoch_s']:.1f} s "
                f"(train {row['train_s']:.1f} s)  {'-' if speed is None else format(speed, ',.0f')} train img/s  "
                f"ETA {format_duration(eta)}")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


LEGACY_CSV_FIELDS = ("images_per_s",)  # runs from before the training pass was timed apart (test pass included)


def write_csv(path: Path, history: list[dict]) -> None:
    """The whole history as CSV; a resumed older run keeps its legacy columns for the rows that have them."""
    fields = CSV_FIELDS + tuple(k for k in LEGACY_CSV_FIELDS if any(k in row for row in history))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_curves(path: Path, history: list[dict]) -> bool:
    """Loss and accuracy per epoch, training and test, in one PNG. False (nothing written) when
    matplotlib is not installed: it is optional (the GPU machine has none); log.csv has the figures."""
    try:
        from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state
    except ImportError:
        return False

    epochs = [r["epoch"] for r in history]
    fig = Figure(figsize=(10, 4), dpi=100)
    ax_loss, ax_acc = fig.subplots(1, 2)
    for ax, key, title in ((ax_loss, "loss", "loss"), (ax_acc, "accuracy", "top-1 accuracy")):
        for prefix, label in (("", "train (augmented)"), ("val_", "test")):
            ys = [r.get(prefix + key) for r in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [float("nan") if y is None else y for y in ys], marker="o", markersize=3, label=label)
        ax.set_xlabel("epoch")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return True
