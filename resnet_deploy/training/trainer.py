"""``train_model(config, data)``: train a ResNet of the family on CIFAR-10 with Keras ``fit``.

Order of work: check the output folder and the resume state, probe the devices and settle the
precision (on ``--resume``: the one the run has trained in) and data parallelism, load the
teacher, load the data; only then build and train. Every bad option fails before a batch is trained.

Selection note: ``model.keras`` is the model of the *last* epoch. Nothing is ever chosen on the
test split: with ``--val-split N`` the per-epoch ``val_*`` figures come from N class-balanced
training images held out of training, and ``best.keras`` is the epoch with the best of them;
without it, ``val_*`` are test-split figures for monitoring only and no ``best.keras`` is written.
"""

from __future__ import annotations

import datetime
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from resnet_deploy.errors import OutputExistsError, TrainError
from resnet_deploy.training.recipe import TrainConfig

if TYPE_CHECKING:
    from resnet_deploy.data.sources import Split
    from resnet_deploy.training.checkpoint import RunState
    from resnet_deploy.training.devices import DeviceInfo

OWNED = ("model.keras", "model.keras.json", "best.keras", "best.keras.json", "log.csv", "curves.png", "checkpoints")
SELECTION_NOTE = ("model.keras is the last epoch (nothing chosen on the test split); val_* columns are measured "
                  "on the test split for monitoring only; no best.keras (no --val-split)")
VAL_SELECTION_NOTE = ("model.keras is the last epoch; val_* columns are measured on {n} class-balanced training "
                      "images held out of training (seed {seed}, indices sha256 {h}); best.keras is the epoch "
                      "with the highest val_accuracy; the test split only reports")


def selection_note(config: TrainConfig, val_hash: str | None) -> str:
    if not config.val_split:
        return SELECTION_NOTE
    return VAL_SELECTION_NOTE.format(n=config.val_split, seed=config.seed, h=val_hash)


@dataclass(frozen=True)
class RunData:
    """The images of a run: ``val`` is the held-out validation split (``--val-split``) or None."""

    train: Split
    val: Split | None
    test: Split
    source: str

    @property
    def monitor(self) -> Split:
        """What the per-epoch ``val_*`` figures are measured on: never the test split when there is a validation one."""
        return self.val if self.val is not None else self.test


@dataclass
class Run:
    """One training run once its options are checked: what every step after the checks reads.

    Built by ``_train_locked`` in the order of work; ``engine`` is set when the distribution scope opens."""

    config: TrainConfig
    out: Path
    state: RunState  # epochs done, history, best epoch: what the checkpoint stores
    dev: DeviceInfo
    precision: str  # the resolved dtype policy
    replicas: int
    data: RunData
    log: Callable[[str], None]
    engine: str | None = None
    precision_choice: Any = None  # devices.PrecisionChoice: the policy with the reason it was chosen

    @property
    def steps(self) -> int:
        return len(self.data.train) // self.config.batch_size

    @property
    def selection_note(self) -> str:
        val = self.data.val
        return selection_note(self.config, val.indices_sha256_16 if val is not None else None)


@dataclass
class BestModel:
    """``best.keras`` (only with ``--val-split``): the float32 model of the epoch with the best validation accuracy."""

    path: Path
    student: Any  # the network being trained (its weights are copied out)
    export_model: Any  # a plain float32 model of the same architecture: what is written
    metadata: dict  # base metadata; each save adds the epoch and its validation accuracy

    def save(self, epoch: int, accuracy: float) -> None:
        from resnet_deploy.models.builder import transfer_weights
        from resnet_deploy.models.io import save_model

        transfer_weights(self.student, self.export_model)
        save_model(self.export_model, self.path, self.metadata | {"epoch": epoch, "val_accuracy": accuracy}, force=True)


@dataclass(frozen=True)
class TrainResult:
    model_path: Path  # <out>/model.keras, the float32 model of the last epoch
    metadata: dict  # what is in model.keras.json
    test_accuracy: float
    out_dir: Path
    history: list[dict] = field(default_factory=list)


def train_model(config: TrainConfig, data=None, log: Callable[[str], None] | None = None) -> TrainResult:
    """Train per ``config`` on CIFAR-10 and write ``<out>/``.

    ``data``: a path for ``data.load_cifar10`` (None: its default search), or a loaded ``Cifar10``.
    ``log``: where progress lines go (default: stdout).
    """
    from resnet_deploy.fileio import output_lock

    with output_lock(config.output_dir, "resnet-deploy train"):  # one writer per folder, for the whole run
        return _train_locked(config, data, log or _print)


def _train_locked(config: TrainConfig, data, log: Callable[[str], None]) -> TrainResult:
    from resnet_deploy.training.devices import choose_precision, probe_devices, replica_count

    out = config.output_dir
    state = _prepare_state(config, out)
    dev = probe_devices()
    choice = choose_precision(config.precision, dev)
    precision = choice.policy
    if config.resume:
        note = _check_resumed_precision(config, state, precision, dev, out)
        if note:
            log(note)
    replicas = replica_count(config.distribute, dev)
    if config.batch_size % replicas:
        raise TrainError(f"--batch-size {config.batch_size} does not split over {replicas} devices.",
                         expected=f"a multiple of {replicas}", fix=f"pass --batch-size {config.batch_size // replicas * replicas or replicas}")
    if config.teacher is not None:
        from resnet_deploy.training.distill import load_teacher

        load_teacher(config.teacher)  # fail now on a wrong teacher; it is loaded again in the device scope
    run = Run(config, out, state, dev, precision, replicas, _load_data(config, data), log, precision_choice=choice)
    if not config.resume and config.force:
        _clean(out)
    if config.resume:
        for line in _recover(out):
            log(line)
    out.mkdir(parents=True, exist_ok=True)
    try:
        return _run(run)
    except KeyboardInterrupt:
        if (out / "checkpoints" / "last").exists():
            log(f"interrupted after epoch {state.epoch}/{config.epochs}: continue with "
                f"`resnet-deploy train --resume --out {out}`")
        raise


def _print(msg: str) -> None:
    print(msg, flush=True)


def _prepare_state(config: TrainConfig, out: Path):
    from resnet_deploy.training.checkpoint import RunState, read_state, recipe_differences

    if config.resume and config.force:
        raise TrainError("--resume and --force contradict each other.",
                         fix="--resume continues the run in the folder; --force starts afresh over it: pass one")
    if config.resume:
        state = read_state(out)
        saved = TrainConfig.from_dict(state.config, out_dir=out).recipe()
        # precision is compared once resolved on this machine's devices (_check_resumed_precision):
        # `auto` may mean mixed_bfloat16 on a GPU and float32 on a CPU
        now = config.recipe()
        for recipe in (saved, now):
            recipe.pop("precision")
        diffs = recipe_differences(saved, now)
        if diffs == [f"epochs: checkpoint {saved['epochs']!r}, now {now['epochs']!r}"]:
            return _change_budget(state, saved["epochs"], config)
        if diffs:
            raise TrainError(f"--resume would change the recipe of the run in {out}: " + "; ".join(diffs),
                             expected="the options of the interrupted run (resume continues the same schedule; "
                                      "--epochs alone may change, and is recorded)",
                             fix="leave those options out when resuming, or start a new run with another --out")
        return state
    if out.exists() and (not out.is_dir() or any(out.iterdir())) and not config.force:
        hint = " or --resume to continue its interrupted run" if (out / "checkpoints").exists() else ""
        raise OutputExistsError(f"The output folder {out} already exists and is not empty.",
                                expected="a new or empty output folder",
                                fix=f"choose another --out, pass --force to overwrite it{hint}")
    return RunState(config=config.to_dict())


def _change_budget(state, before: int, config: TrainConfig):
    """``--resume --epochs N`` on a run planned for another number of epochs: allowed, openly.

    The learning-rate schedule is a function of the total number of steps, so from the next step on it
    follows the new budget (a jump in the learning rate where the two schedules differ there). The change
    is recorded in the checkpoint state and in the final model's metadata (``budget_changes``), with the
    learning rates of both schedules at that step (``_note_budget_change``, once the steps per epoch are known)."""
    import datetime

    done = state.epoch + (1 if state.step else 0)  # an epoch begun inside is finished under the new budget
    if config.epochs < max(done, 1):
        raise TrainError(f"--epochs {config.epochs} is fewer than the run has trained or begun ({done}).",
                         expected=f"--epochs {max(done, 1)} or more", fix=f"pass --epochs {max(done, 1)} or more")
    state.budget_changes.append({"after_epoch": state.epoch, "batch": state.step, "optimizer_step": state.iterations,
                                 "epochs_before": before, "epochs_after": config.epochs,
                                 "at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")})
    state.config = dict(state.config, epochs=config.epochs)
    return state


def _note_budget_change(run: "Run") -> None:
    """Add both schedules' learning rates at the resumed step to a budget change made by this resume, and say it."""
    from resnet_deploy.training.recipe import lr_at

    change = run.state.budget_changes[-1] if run.state.budget_changes else None
    if change is None or "lr_after" in change:
        return
    c, step = run.config, change["optimizer_step"]

    def lr(epochs):
        return lr_at(step, c.peak_lr, run.steps * epochs, round(c.warmup_epochs * run.steps), c.schedule,
                     c.final_lr_fraction)

    change["lr_before"], change["lr_after"] = lr(change["epochs_before"]), lr(change["epochs_after"])
    run.log(f"budget changed by --resume --epochs: {change['epochs_before']} -> {change['epochs_after']} epochs "
            f"after optimizer step {step}; the learning rate there goes from {change['lr_before']:.4g} "
            f"(old schedule) to {change['lr_after']:.4g} (recorded in the metadata as budget_changes)")


def _check_resumed_precision(config: TrainConfig, state, precision: str, dev, out: Path) -> str | None:
    """Refuse to resume in another precision than the run has trained in so far.

    A refusal, not a warning: ``--resume`` continues one run, whose metadata records one precision;
    a bf16 GPU run resumed on a CPU with ``auto`` would silently go on in float32 (another speed,
    other numerics, a record that is wrong for part of the run), and a resumed float16 run would
    meet an optimizer without its loss scale. Returns a note to print when the checkpoint predates
    this record and the precision cannot be checked."""
    from resnet_deploy.training.devices import resolve_precision

    saved = state.precision
    if saved is None:  # a checkpoint written before the resolved precision was kept
        requested = state.config.get("precision", "auto")
        if requested == "auto":
            return (f"note: the checkpoint in {out} does not record the precision it trained in; continuing in "
                    f"{precision} (--precision auto on this {dev.kind.upper()}) without checking")
        saved = requested
    if saved == precision:
        return None
    try:
        resolve_precision(saved, dev)
        fix = (f"pass --precision {saved} to continue in {saved}, or train in {precision} as a new run "
               "(another --out)")
    except TrainError as exc:
        fix = (f"resume on a machine that runs {saved} ({exc.what}), or train in {precision} as a new run "
               "(another --out)")
    raise TrainError(f"--resume would continue the run in {out} in {precision} (--precision {config.precision} "
                     f"on this {dev.kind.upper()}), but it has trained in {saved} so far.",
                     expected=f"the precision the run has trained in: {saved}", fix=fix)


def _recover(out: Path) -> list[str]:
    """--resume: undo what a killed run left half-done (a checkpoint left aside, stages of unfinished files)."""
    from resnet_deploy.fileio import sweep_stages
    from resnet_deploy.training.checkpoint import recover_checkpoint

    return recover_checkpoint(out) + [f"removed {p.name}, the unfinished files of a killed run"
                                      for p in sweep_stages(out)]


def _clean(out: Path) -> None:
    """--force: remove what an earlier run wrote here (only the files train writes, and the stages
    of killed runs; checkpoints/ goes as a whole), nothing else."""
    from resnet_deploy.fileio import sweep_stages

    sweep_stages(out)
    for name in OWNED:
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def _load_data(config: TrainConfig, data) -> RunData:
    from resnet_deploy.data.sources import Cifar10, load_cifar10

    ds = data if isinstance(data, Cifar10) else load_cifar10(data)  # a path, None, or data already loaded
    train, test = ds.train.take(config.limit_train), ds.test.take(config.limit_test)
    val = None
    if config.val_split:
        train, val = _hold_out(train, config.val_split, config.seed)
    if len(train) < config.batch_size:
        raise TrainError(f"{len(train)} training images make no full batch of {config.batch_size}.",
                         fix=f"pass --batch-size {len(train)} or less")
    return RunData(train, val, test, ds.source)


def _hold_out(train, n: int, seed: int):
    """(rest, validation): ``n`` class-balanced training images drawn with ``seed``, and the others."""
    import numpy as np

    from resnet_deploy.data.sampler import class_balanced_indices, indices_hash
    from resnet_deploy.data.sources import Split

    if n >= len(train):
        raise TrainError(f"--val-split {n} takes every one of the {len(train)} training images.",
                         expected=f"fewer than {len(train)} images", fix="lower --val-split")
    idx = class_balanced_indices(train.y, n, seed)
    keep = np.ones(len(train), dtype=bool)
    keep[idx] = False
    val = Split("validation", train.x[idx], train.y[idx], indices_sha256_16=indices_hash(idx))
    return Split(train.name, train.x[keep], train.y[keep]), val


def _compile(config: TrainConfig, precision: str, steps_per_epoch: int):
    """Build and compile the training model (under the caller's dtype policy and device scope)."""
    import keras

    from resnet_deploy.models.builder import build_model
    from resnet_deploy.training.schedule import WarmupDecay

    student = build_model(config.arch, width=config.width, stem=config.stem, weight_decay=config.weight_decay / 2)
    schedule = WarmupDecay(config.peak_lr, steps_per_epoch * config.epochs, round(config.warmup_epochs * steps_per_epoch),
                           config.schedule, config.final_lr_fraction)
    model = student
    if config.teacher is not None:
        from resnet_deploy.training.distill import Distiller, load_teacher

        model = Distiller(student, load_teacher(config.teacher), config.kd_temperature, config.kd_weight)
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=schedule, momentum=config.momentum, nesterov=config.nesterov),
        loss=keras.losses.CategoricalCrossentropy(from_logits=True, label_smoothing=config.label_smoothing),
        weighted_metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")],  # honours the zero weights of padding
    )
    if config.teacher is not None:
        model.build((None, 32, 32, 3))
    return model, student


def _run(run: Run) -> TrainResult:
    import keras

    from resnet_deploy.models.builder import build_model, transfer_weights
    from resnet_deploy.models.io import base_metadata
    from resnet_deploy.training.batches import EpochTail, EvalBatches, TrainBatches
    from resnet_deploy.training.callbacks import EpochSeeder, RunRecorder
    from resnet_deploy.training.checkpoint import restore_last
    from resnet_deploy.training.devices import distribution_scope

    config, state, data = run.config, run.state, run.data
    keras.utils.set_random_seed(config.seed)
    export_model = build_model(config.arch, width=config.width, stem=config.stem)  # float32, plain: what ships
    previous_policy = keras.config.dtype_policy()
    session_t0 = time.perf_counter()
    try:
        keras.config.set_dtype_policy(run.precision)
        with distribution_scope(config.distribute, run.dev) as run.engine:
            model, student = _compile(config, run.precision, run.steps)
            _log_header(run, student)
            if config.resume:
                restore_last(run.out, model, state, student)
                inside = f", batch {state.step}/{run.steps} of epoch {state.epoch + 1}" if state.step else ""
                run.log(f"resuming after epoch {state.epoch}/{config.epochs}{inside} "
                        f"(optimizer step {state.iterations}, lr {_lr(model):.4g})")
                _note_budget_change(run)
            train_b = TrainBatches(data.train.x, data.train.y, config.batch_size, config.seed, config.pad, config.flip,
                                   config.cutout, epoch=state.epoch, workers=config.workers)
            monitor_b = EvalBatches(data.monitor.x, data.monitor.y, config.batch_size, multiple=run.replicas)
            best = None if data.val is None else BestModel(  # never chosen on the test split
                run.out / "best.keras", student, export_model,
                base_metadata(config.arch, config.width, config.stem) | {"selection": run.selection_note,
                                                                          "recipe": config.recipe()})
            state.sessions += 1
            state.precision = run.precision
            recorder = RunRecorder(run.out, state, config.epochs, run.steps, config.batch_size, run.log,
                                   student=student, best=best, checkpoint_every_s=60 * config.checkpoint_every)
            verbose = 1 if config.verbose and sys.stdout.isatty() else 0
            if state.step:  # resumed from a checkpoint inside an epoch: first the rest of that epoch
                recorder.begin_tail(state.step)
                tail = EpochTail(train_b, state.epoch, state.step, workers=config.workers)
                model.fit(tail, epochs=state.epoch + 1, initial_epoch=state.epoch, validation_data=monitor_b,
                          callbacks=[recorder], verbose=verbose, shuffle=False)
            if state.epoch < config.epochs:
                # shuffle=False: TrainBatches already draws each epoch's order from (seed, epoch); fit's own
                # shuffle would reorder the batches with Python's `random`, whose state a resumed run does
                # not share with the uninterrupted one (its batches would come in another order)
                model.fit(train_b, epochs=config.epochs, initial_epoch=state.epoch, validation_data=monitor_b,
                          callbacks=[EpochSeeder(train_b), recorder], verbose=verbose, shuffle=False)
            transfer_weights(student, export_model)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    return _finish(run, export_model, time.perf_counter() - session_t0)


def _lr(model) -> float:
    from resnet_deploy.training.checkpoint import current_lr

    return current_lr(model)


def _log_header(run: Run, student) -> None:
    config, data, log = run.config, run.data, run.log
    aug = [f"reflect-pad {config.pad} + random crop"] if config.pad else []
    aug += ["horizontal flip"] if config.flip else []
    aug += [f"cutout {config.cutout}"] if config.cutout else []
    warm = f"warm-up {config.warmup_epochs:g} epoch(s), then " if config.warmup_epochs else ""
    log(f"resnet-deploy train: {config.arch} (width {config.width:g}, {student.count_params() / 1e6:.3f} M params) "
        f"on CIFAR-10 from {data.source}")
    log(f"  device: {run.dev.describe()}")
    why = f" [{run.precision_choice.reason}]" if run.precision_choice is not None else ""
    log(f"  precision: {run.precision}{why} (logits and loss in float32); engine: "
        + (f"{run.engine} over {run.replicas} devices" if run.engine else "single device"))
    held = f" (+ {len(data.val):,} held out for validation)" if data.val is not None else ""
    log(f"  data: {len(data.train):,} train{held} / {len(data.test):,} test images; batch {config.batch_size}, "
        f"{run.steps} steps/epoch, {config.epochs} epochs")
    log(f"  recipe: SGD{' nesterov' if config.nesterov else ''} momentum {config.momentum:g}, peak lr {config.peak_lr:.4g}, "
        f"{warm}{config.schedule} decay, weight decay {config.weight_decay:g} (L2), label smoothing "
        f"{config.label_smoothing:g}; augmentation: {', '.join(aug) or 'none'}"
        + (f"; distilling from {config.teacher} (T={config.kd_temperature:g}, weight {config.kd_weight:g})"
           if config.teacher else ""))
    log(f"  output: {run.out}")


def _evaluate(model, test, batch_size: int) -> float:
    import numpy as np

    from resnet_deploy.data.preprocess import Preprocessing, preprocess

    logits = model.predict(preprocess(test.x, Preprocessing.pixels()), batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == test.y))


def _timing(history: list[dict]) -> dict:
    """Training-only figures of the run, from the log rows (rows of older versions lack them)."""
    import statistics

    train_s = [r["train_s"] for r in history if r.get("train_s") is not None]
    speeds = [r["train_images_per_s"] for r in history if r.get("train_images_per_s") is not None]
    return {"train_pass_s": round(sum(train_s), 1) if train_s else None,  # training passes only, no test pass
            "train_images_per_s": round(statistics.median(speeds), 1) if speeds else None}  # median over epochs


def _finish(run: Run, export_model, session_s: float) -> TrainResult:
    from resnet_deploy.envinfo import library_versions, machine_info
    from resnet_deploy.fileio import sha256_file
    from resnet_deploy.models.io import base_metadata, save_model

    config, out, state, log = run.config, run.out, run.state, run.log
    train, val, test = run.data.train, run.data.val, run.data.test
    acc = _evaluate(export_model, test, config.batch_size)
    meta = base_metadata(config.arch, config.width, config.stem) | {
        "test_accuracy": acc,
        "test_images": len(test),
        "train_images": len(train),
        "data_source": run.data.source,
        "epochs": state.epoch,
        "best_epoch": state.best_epoch if val is not None else None,
        "best_val_accuracy": state.best_accuracy if val is not None else None,
        "validation": ({"split": "train", "images": len(val), "seed": config.seed, "class_balanced": True,
                        "indices_sha256_16": val.indices_sha256_16} if val is not None else None),
        "selection": run.selection_note,
        "recipe": config.recipe(),
        "precision": run.precision,
        "precision_choice": run.precision_choice.to_dict() if run.precision_choice is not None else None,
        "tf_onednn_opts": os.environ.get("TF_ENABLE_ONEDNN_OPTS"),
        "distribution": {"mode": config.distribute, "engine": run.engine, "replicas": run.replicas},
        "optimizer_steps": state.iterations,
        "budget_changes": state.budget_changes,
        "train_time_s": round(state.elapsed_s, 1),  # epoch wall-clock, test passes included
        **_timing(state.history),
        "sessions": state.sessions,
        "device": run.dev.to_dict(),
        "machine": machine_info(),
        "versions": library_versions(),
        "params": int(export_model.count_params()),
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "files": {"log": "log.csv", "curves": "curves.png" if (out / "curves.png").exists() else None,
                  "best": "best.keras" if val is not None else None, "checkpoint": "checkpoints/last"},
    }
    if config.teacher is not None:
        meta["teacher"] = {"path": str(config.teacher), "sha256": sha256_file(config.teacher),
                           "temperature": config.kd_temperature, "weight": config.kd_weight}
    path = save_model(export_model, out / "model.keras", meta, force=True)
    best = (f"best validation epoch {state.best_epoch} at {100 * (state.best_accuracy or 0):.2f}%; "
            if val is not None else "")
    log(f"test accuracy {100 * acc:.2f}% on {len(test):,} images (float32 model of epoch {state.epoch}); "
        f"{best}training {state.elapsed_s:.0f} s this run, session {session_s:.0f} s")
    curves = ", curves.png" if meta["files"]["curves"] else ""
    best_file = ", best.keras" if val is not None else ""
    log(f"wrote {path} (+ {path.name}.json){best_file}, log.csv{curves}, checkpoints/last/")
    return TrainResult(path, meta, acc, out, list(state.history))
