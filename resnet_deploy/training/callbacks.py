"""Keras callbacks of a run: epoch seeding, progress with ETA, CSV log, curves PNG, checkpoints.

All files are rewritten atomically at each epoch's end from the run's history, so a run killed
at any moment leaves a CSV and a PNG that agree with its last checkpoint.
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

CSV_FIELDS = ("epoch", "loss", "accuracy", "val_loss", "val_accuracy", "lr", "iterations", "epoch_s",
              "images_per_s")


class EpochSeeder(keras.callbacks.Callback):
    """Tells the training batches which epoch they serve (their shuffling and augmentation seed)."""

    def __init__(self, batches):
        super().__init__()
        self.batches = batches

    def on_epoch_begin(self, epoch, logs=None):
        self.batches.epoch = epoch


class RunRecorder(keras.callbacks.Callback):
    """At each epoch's end: history row, best model, resume checkpoint, CSV, PNG, a progress line."""

    def __init__(self, out_dir: Path, state: RunState, total_epochs: int, images_per_epoch: int,
                 save_best: Callable[[int, float], None], log: Callable[[str], None], student=None):
        super().__init__()
        self.student = student
        self.out_dir, self.state, self.total_epochs = out_dir, state, total_epochs
        self.images_per_epoch, self.save_best, self.log = images_per_epoch, save_best, log
        self._t_epoch = 0.0
        self._durations: list[float] = []

    def on_epoch_begin(self, epoch, logs=None):
        self._t_epoch = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        logs = dict(logs or {})
        seconds = time.perf_counter() - self._t_epoch
        self._durations.append(seconds)
        row = {"epoch": epoch + 1, "loss": logs.get("loss"), "accuracy": logs.get("accuracy"),
               "val_loss": logs.get("val_loss"), "val_accuracy": logs.get("val_accuracy"),
               "lr": current_lr(self.model), "iterations": optimizer_iterations(self.model),
               "epoch_s": round(seconds, 3), "images_per_s": round(self.images_per_epoch / seconds, 1)}
        row = {k: (float(v) if isinstance(v, (int, float)) and k not in ("epoch", "iterations") else v)
               for k, v in row.items()}
        st = self.state
        st.history.append(row)
        st.epoch, st.iterations = epoch + 1, row["iterations"]
        st.elapsed_s += seconds
        acc = row["val_accuracy"]
        if acc is not None and math.isfinite(acc) and (st.best_accuracy is None or acc > st.best_accuracy):
            st.best_epoch, st.best_accuracy = epoch + 1, acc
            self.save_best(epoch + 1, acc)
        save_last(self.out_dir, self.model, st, self.student)
        write_csv(self.out_dir / "log.csv", st.history)
        write_curves(self.out_dir / "curves.png", st.history)
        self.log(self._line(row))

    def _line(self, row: dict) -> str:
        recent = self._durations[1:] or self._durations  # the first epoch carries the compilation
        eta = (self.total_epochs - row["epoch"]) * sum(recent) / len(recent)
        width = len(str(self.total_epochs))

        def pct(v):
            return "  -  " if v is None else f"{100 * v:5.1f}%"

        return (f"epoch {row['epoch']:>{width}}/{self.total_epochs}  loss {row['loss']:.4f}  acc {pct(row['accuracy'])}  "
                f"val_loss {row['val_loss'] if row['val_loss'] is None else format(row['val_loss'], '.4f')}  "
                f"val_acc {pct(row['val_accuracy'])}  lr {row['lr']:.4g}  {row['epoch_s']:.1f} s  "
                f"{row['images_per_s']:,.0f} img/s  ETA {format_duration(eta)}")


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def write_csv(path: Path, history: list[dict]) -> None:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in history:
        writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CSV_FIELDS})
    with atomic_path(path) as tmp:
        tmp.write_text(buf.getvalue())


def write_curves(path: Path, history: list[dict]) -> None:
    """Loss and accuracy per epoch, training and test, in one PNG."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global state

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
