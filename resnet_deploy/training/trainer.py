"""``train_model(config, data)``: train a ResNet of the family on CIFAR-10 with Keras ``fit``.

Order of work: check the output folder and the resume state, probe the devices and settle the
precision (on ``--resume``: the one the run has trained in) and data parallelism, load the
teacher, load the data; only then build and train. Every bad option fails before a batch is trained.

``--distribute multi-process`` (``multiprocess.py``): the processes join first; process 0 alone checks and
writes the output folder and sends its plan (recipe, run state, precision) to the others; every process
then loads its teacher and data and says whether it is ready (any refusal stops all of them, before a
batch is trained); on ``--resume`` process 0 sends its checkpoint to the others, so that every process
restores the same one and the folder need not be shared.

Selection note: ``model.keras`` is the model of the *last* epoch. Nothing is ever chosen on the
test split: with ``--val-split N`` the per-epoch ``val_*`` figures come from N class-balanced
training images held out of training, and ``best.keras`` is the epoch with the best of them;
without it, ``val_*`` are test-split figures for monitoring only and no ``best.keras`` is written.
"""

from __future__ import annotations

import contextlib
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
    from resnet_deploy.training.multiprocess import Launch, ProcessGroup

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
    group: ProcessGroup | None = None  # the processes of a multi-process run (None: this process alone)
    checkpoint_dir: Path | None = None  # where --resume reads checkpoints/last (default: out; see _share_checkpoint)
    say: Callable[[str], None] | None = None  # this process's own lines (``log`` is a no-op after process 0)

    @property
    def writer(self) -> bool:
        """Whether this process writes the run's files: always, except the processes after 0 of a multi-process run."""
        return self.group is None or self.group.writer

    @property
    def shard(self) -> tuple[int, int]:
        return self.group.shard if self.group is not None else (0, 1)

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
        from resnet_deploy.training.checkpoint import local_writes

        with local_writes():  # only process 0 saves: no Keras step that all processes would have to take
            transfer_weights(self.student, self.export_model)
            save_model(self.export_model, self.path, self.metadata | {"epoch": epoch, "val_accuracy": accuracy},
                       force=True)


@dataclass(frozen=True)
class TrainResult:
    model_path: Path  # <out>/model.keras, the float32 model of the last epoch
    metadata: dict  # what is in model.keras.json
    test_accuracy: float
    out_dir: Path
    history: list[dict] = field(default_factory=list)


def train_model(config: TrainConfig, data=None, log: Callable[[str], None] | None = None,
                launch: Launch | None = None) -> TrainResult:
    """Train per ``config`` on CIFAR-10 and write ``<out>/``.

    ``data``: a path for ``data.load_cifar10`` (None: its default search), or a loaded ``Cifar10``.
    ``log``: where progress lines go (default: stdout).
    ``launch``: this process's place in a ``--distribute multi-process`` run (None: ``resolve_launch()``
    reads it from the environment). Such a run joins the other processes first, so it must be the first
    JAX work of the Python process; only process 0 writes ``<out>/``, the others return a result whose
    ``metadata`` says which process they were and which weights they ended with.
    """
    from resnet_deploy.fileio import output_lock

    log = log or _print
    if config.distribute != "multi-process":
        with output_lock(config.output_dir, "resnet-deploy train"):  # one writer per folder, for the whole run
            return _train_locked(config, data, log)
    from resnet_deploy.training.multiprocess import join, resolve_launch

    group = join(launch or resolve_launch(), config.seed, log)
    try:
        return _train_group(config, data, log, group)
    except BaseException as exc:
        if getattr(exc, "agreed", False) is False:
            group.leaving(getattr(exc, "exit_code", 130 if isinstance(exc, KeyboardInterrupt) else 1))
        raise


def _check_run(config: TrainConfig, out: Path, log: Callable[[str], None]):
    """The checks before any work, on the process that owns the folder: (state, devices, precision choice, replicas)."""
    from resnet_deploy.training.devices import choose_precision, probe_devices, replica_count

    state = _prepare_state(config, out)
    dev = probe_devices()
    choice = choose_precision(config.precision, dev)
    if config.resume:
        note = _check_resumed_precision(config, state, choice.policy, dev, out)
        if note:
            log(note)
    replicas = replica_count(config.distribute, dev)
    if config.batch_size % replicas:
        raise TrainError(f"--batch-size {config.batch_size} does not split over {replicas} devices.",
                         expected=f"a multiple of {replicas}", fix=f"pass --batch-size {config.batch_size // replicas * replicas or replicas}")
    if config.teacher is not None:
        from resnet_deploy.training.distill import load_teacher

        load_teacher(config.teacher)  # fail now on a wrong teacher; it is loaded again in the device scope
    return state, dev, choice, replicas


def _prepare_folder(config: TrainConfig, out: Path, log: Callable[[str], None]) -> None:
    """Once every check has passed: clear the folder (--force) or recover a killed run's leftovers (--resume)."""
    if not config.resume and config.force:
        _clean(out)
    if config.resume:
        for line in _recover(out):
            log(line)
    out.mkdir(parents=True, exist_ok=True)


def _train_locked(config: TrainConfig, data, log: Callable[[str], None]) -> TrainResult:
    out = config.output_dir
    state, dev, choice, replicas = _check_run(config, out, log)
    run = Run(config, out, state, dev, choice.policy, replicas, _load_data(config, data), log, precision_choice=choice)
    _prepare_folder(config, out, log)
    return _run_interruptible(run)


def _run_interruptible(run: Run) -> TrainResult:
    try:
        return _run(run)
    except KeyboardInterrupt:
        if run.writer and (run.out / "checkpoints" / "last").exists():
            run.log(f"interrupted after epoch {run.state.epoch}/{run.config.epochs}: continue with "
                    f"`resnet-deploy train --resume --out {run.out}`")
        raise


def _train_group(config: TrainConfig, data, log: Callable[[str], None], group: ProcessGroup) -> TrainResult:
    """One process of a multi-process run, from the checks to the result (see the module docstring)."""
    import contextlib

    from resnet_deploy.fileio import output_lock
    from resnet_deploy.training.checkpoint import RunState
    from resnet_deploy.training.devices import PrecisionChoice, probe_devices, resolve_precision

    out = config.output_dir
    with contextlib.ExitStack() as held:
        checked: dict = {}

        def plan() -> dict:  # process 0 only: the folder, the state and the devices, as in a single-process run
            held.enter_context(output_lock(out, "resnet-deploy train"))
            checked["run"] = _check_run(config, out, log)
            state, dev, choice, replicas = checked["run"]
            return {"config": config.to_dict(), "state": state.to_dict(), "choice": choice.to_dict(),
                    "replicas": replicas, "device": dev.to_dict()}

        shared = _agreed(group.from_zero, "checking the run", plan)
        mine = config

        def ready() -> dict:  # every process: the same recipe, its own teacher and data
            nonlocal mine
            if not group.writer:
                mine = _follow(config, shared["config"])
                dev = probe_devices()
                resolve_precision(shared["choice"]["policy"], dev)  # refuses a policy this process's device cannot run
                if mine.teacher is not None:
                    from resnet_deploy.training.distill import load_teacher

                    load_teacher(mine.teacher)
                checked["dev"] = dev
            checked["data"] = _load_data(mine, data)
            return {"data": _data_fingerprint(checked["data"]),
                    "teacher": _file_sha256(mine.teacher)}

        everyone = _agreed(group.check_all, "getting ready", ready)
        _agreed(group.check_all, "comparing the processes' data", lambda: _compare_inputs(everyone))
        if group.writer:
            state, dev, choice, replicas = checked["run"]
        else:
            state = RunState(**shared["state"])
            dev, replicas = checked["dev"], shared["replicas"]
            choice = PrecisionChoice(**shared["choice"])
        run = Run(mine, out, state, dev, choice.policy, replicas, checked["data"], log if group.writer else _quiet,
                  precision_choice=choice, group=group, say=log)
        if group.writer:
            _prepare_folder(mine, out, log)
        with _share_checkpoint(run) as run.checkpoint_dir:
            return _run_interruptible(run)


def _agreed(step, name: str, fn):
    """Run a ``ProcessGroup`` exchange; its refusals are raised on every process alike (``agreed``), so
    each process may end normally, through JAX's shutdown barrier, which all of them reach."""
    from resnet_deploy.errors import ResnetDeployError
    from resnet_deploy.training.multiprocess import PeerLostError

    try:
        return step(name, fn)
    except ResnetDeployError as exc:
        if not isinstance(exc, PeerLostError):
            exc.agreed = True
        raise


def _quiet(msg: str) -> None:
    """The log of the processes after 0: they print only their own lines (``Run.say``), not the run's."""


def _follow(config: TrainConfig, zero: dict) -> TrainConfig:
    """A process after 0 trains process 0's recipe. A fresh run refuses a process started with another
    recipe (the same command line is expected everywhere); a resumed one cannot know the recipe (only
    process 0 reads the checkpoint) and takes process 0's."""
    from resnet_deploy.training.checkpoint import recipe_differences

    theirs = TrainConfig.from_dict({**zero, "teacher": None})
    if not config.resume:
        a, b = theirs.recipe(), config.recipe()
        for r in (a, b):
            r.pop("teacher")  # a path, which may differ between machines: the file's sha256 is compared instead
        diffs = recipe_differences(a, b)
        if diffs:
            raise TrainError("this process was started with another recipe than process 0: "
                             + "; ".join(d.replace("checkpoint", "process 0") for d in diffs),
                             expected="the same training options on every process",
                             fix="start every process with the same command line (only the process id differs)")
    return TrainConfig.from_dict({**zero, "teacher": config.teacher if zero.get("teacher") else None,
                                  "workers": config.workers, "verbose": config.verbose, "out_dir": config.out_dir,
                                  "force": False})


def _data_fingerprint(data: RunData) -> str:
    """sha256 (16 hex) of the images and labels the run trains and validates on."""
    import hashlib

    import numpy as np

    h = hashlib.sha256()
    for split in (data.train, data.monitor):
        h.update(np.ascontiguousarray(split.x).tobytes())
        h.update(np.ascontiguousarray(split.y).astype(np.int64).tobytes())
    return h.hexdigest()[:16]


def _file_sha256(path: Path | None) -> str | None:
    from resnet_deploy.fileio import sha256_file

    return sha256_file(path) if path is not None else None


def _compare_inputs(everyone: list[dict]) -> None:
    zero = everyone[0]
    for key, what in (("data", "training and validation images"), ("teacher", "teacher model")):
        odd = [i for i, r in enumerate(everyone) if r[key] != zero[key]]
        if odd:
            raise TrainError(f"process(es) {', '.join(map(str, odd))} do not have process 0's {what} "
                             f"(sha256 {zero[key]} on process 0).",
                             expected=f"the same {what} on every process",
                             fix="give every machine the same copy (--data, --teacher, --limit-train, --val-split)")


@contextlib.contextmanager
def _share_checkpoint(run: Run):
    """``--resume`` in a multi-process run: process 0 sends checkpoints/last to the others, which restore it from
    a private temporary folder (never the run folder); yields where ``restore_last`` reads (None: the run folder)."""
    group = run.group
    if group is None or not run.config.resume:
        yield None
        return
    import json
    import tempfile

    from resnet_deploy.training.checkpoint import LAST, last_folder

    names = ("weights.weights.h5", "optimizer.npz", "state.json")
    payload = None
    if group.writer:
        folder = last_folder(run.out)
        files = [(folder / n).read_bytes() for n in names]
        header = json.dumps([len(f) for f in files]).encode()
        payload = len(header).to_bytes(8, "big") + header + b"".join(files)
    got = group.broadcast_bytes(payload)
    if group.writer:
        yield None
        return
    n = int.from_bytes(got[:8], "big")
    sizes, pos = json.loads(got[8:8 + n]), 8 + n
    with tempfile.TemporaryDirectory(prefix="resnet-deploy-resume-") as tmp:
        folder = Path(tmp) / LAST
        folder.mkdir(parents=True)
        for name, size in zip(names, sizes):
            (folder / name).write_bytes(got[pos:pos + size])
            pos += size
        yield Path(tmp)


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
                restore_last(run.checkpoint_dir or run.out, model, state, student)
                inside = f", batch {state.step}/{run.steps} of epoch {state.epoch + 1}" if state.step else ""
                run.log(f"resuming after epoch {state.epoch}/{config.epochs}{inside} "
                        f"(optimizer step {state.iterations}, lr {_lr(model):.4g})")
                if not run.writer:
                    run.say(f"process {run.group.rank} of {run.group.count}: restored process 0's checkpoint "
                            f"(epoch {state.epoch}, optimizer step {state.iterations})")
                _note_budget_change(run)
            train_b = TrainBatches(data.train.x, data.train.y, config.batch_size, config.seed, config.pad, config.flip,
                                   config.cutout, epoch=state.epoch, workers=config.workers, shard=run.shard)
            monitor_b = EvalBatches(data.monitor.x, data.monitor.y, config.batch_size, multiple=run.replicas,
                                    shard=run.shard)
            best = None if data.val is None or not run.writer else BestModel(  # never chosen on the test split
                run.out / "best.keras", student, export_model,
                base_metadata(config.arch, config.width, config.stem) | {"selection": run.selection_note,
                                                                          "recipe": config.recipe()})
            state.sessions += 1
            state.precision = run.precision
            recorder = RunRecorder(run.out, state, config.epochs, run.steps, config.batch_size, run.log,
                                   student=student, best=best, checkpoint_every_s=60 * config.checkpoint_every,
                                   writes=run.writer)
            verbose = 1 if config.verbose and sys.stdout.isatty() and run.writer else 0
            with _collectives(run):
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
            fingerprint = _same_weights_everywhere(run, student)
            transfer_weights(student, export_model)
    finally:
        keras.config.set_dtype_policy(previous_policy)
    if not run.writer:
        run.say(f"process {run.group.rank} of {run.group.count}: trained {state.epoch} epochs, final weights "
                f"sha256 {fingerprint} (the same on every process); process 0 writes the run's files")
        return TrainResult(run.out / "model.keras", {"process_id": run.group.rank, "weights_sha256_16": fingerprint,
                                                     "epochs": state.epoch, "optimizer_steps": state.iterations},
                           float("nan"), run.out, list(state.history))
    return _finish(run, export_model, time.perf_counter() - session_t0, fingerprint)


@contextlib.contextmanager
def _collectives(run: Run):
    """Training in a multi-process run: a failed collective (another process died or hung) becomes a
    ``PeerLostError`` (and this process ends without waiting for the others at exit)."""
    if run.group is None:
        yield
        return
    from resnet_deploy.training.multiprocess import translate

    try:
        yield
    except Exception as exc:  # noqa: BLE001 - re-raised unchanged unless a collective failed
        err = translate(exc, run.group)
        if err is exc:
            raise
        raise err from exc


def _same_weights_everywhere(run: Run, student) -> str | None:
    """A multi-process run: the sha256 of the final weights, checked equal on every process (they are
    one replicated model: a difference would be a broken run, which is then refused, not written)."""
    if run.group is None:
        return None
    from resnet_deploy.training.multiprocess import weights_sha256

    everyone = _agreed(run.group.check_all, "comparing the final weights", lambda: weights_sha256(student))
    if len(set(everyone)) > 1:
        err = TrainError("The processes ended with different weights: " + ", ".join(
            f"process {i} {h}" for i, h in enumerate(everyone)) + "; no model is written.",
            expected="one model replicated on every process", fix="report this with the run's logs")
        err.agreed = True
        raise err
    return everyone[0]


def _group_metadata(group: ProcessGroup, fingerprint: str | None) -> dict:
    return {"processes": group.count, "devices_per_process": group.local_devices,
            "coordinator": group.launch.coordinator, "launch_sources": dict(group.launch.sources),
            "peer_timeout_s": group.launch.peer_timeout, "weights_sha256_16": fingerprint}


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
    processes = f" in {run.group.count} processes ({run.group.describe()})" if run.group is not None else ""
    log(f"  precision: {run.precision}{why} (logits and loss in float32); engine: "
        + (f"{run.engine} over {run.replicas} devices{processes}" if run.engine else "single device"))
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


def _finish(run: Run, export_model, session_s: float, fingerprint: str | None = None) -> TrainResult:
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
        "distribution": {"mode": config.distribute, "engine": run.engine, "replicas": run.replicas,
                         **(_group_metadata(run.group, fingerprint) if run.group is not None else {})},
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
