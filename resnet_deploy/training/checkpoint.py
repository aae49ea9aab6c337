"""Checkpoints written atomically, and ``--resume`` from the last one.

``<out>/checkpoints/last/`` is one folder, written in a stage and then put in place (``fileio.atomic_path``):

    weights.weights.h5   the training model's weights (BatchNorm statistics included)
    optimizer.npz        every optimizer variable (iteration counter, momenta, loss scale)
    state.json           epochs done, best epoch, the history rows, the config, the resolved
                         precision (dtype policy), elapsed time, and the sha256 of the two files
                         above: ``--resume`` refuses a truncated or altered checkpoint with a clear
                         message instead of an h5py/zip traceback

A folder cannot replace a folder in one rename: the commit renames the previous ``last`` aside
(``checkpoints/.last.old``), renames the new one in, then deletes the aside copy. A process killed
between those two renames leaves no ``last`` but a complete ``.last.old``: reading falls back to it
(``last_folder``), and a resumed run puts it back and deletes the stages killed runs left
(``recover_checkpoint``).

The iteration counter drives the learning-rate schedule, so restoring the optimizer restores the
schedule position. ``<out>/best.keras`` (only with ``--val-split``) is the float32 model of the best epoch so far
on the validation images, loadable on its own.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_deploy.errors import TrainError
from resnet_deploy.fileio import atomic_path, existing_version, recover_replaced, sha256_file, sweep_stages

LAST = Path("checkpoints") / "last"
CHECKED_FILES = ("weights.weights.h5", "optimizer.npz")


@dataclass
class RunState:
    epoch: int = 0  # epochs completed
    step: int = 0  # batches of the next epoch already trained (a checkpoint taken inside an epoch; 0 at epoch ends)
    step_elapsed_s: float = 0.0  # wall-clock seconds of those batches, added to elapsed_s when their epoch ends
    iterations: int = 0
    best_epoch: int | None = None
    best_accuracy: float | None = None
    elapsed_s: float = 0.0  # epoch wall-clock seconds (training + test pass) summed over every session
    precision: str | None = None  # the resolved dtype policy the run trains in (None: a checkpoint from before it was kept)
    sessions: int = 0
    history: list[dict] = field(default_factory=list)
    budget_changes: list[dict] = field(default_factory=list)  # `--resume --epochs N` changes, oldest first
    config: dict = field(default_factory=dict)
    optimizer_variables: list[str] = field(default_factory=list)
    file_sha256: dict = field(default_factory=dict)  # weights and optimizer files, checked on --resume

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def optimizer_of(model):
    opt = model.optimizer
    return getattr(opt, "inner_optimizer", opt)


def optimizer_iterations(model) -> int:
    import keras

    return int(keras.ops.convert_to_numpy(optimizer_of(model).iterations))


def current_lr(model) -> float:
    """The learning rate of the next step, computed here from the step count (a number read back from the
    device): no computation runs on the model's variables, which in a multi-process run live on every
    process's devices and could only be computed on by all processes together."""
    import keras

    opt = optimizer_of(model)
    schedule = getattr(opt, "_learning_rate", None)
    if isinstance(schedule, keras.optimizers.schedules.LearningRateSchedule):
        return float(keras.ops.convert_to_numpy(schedule(optimizer_iterations(model))))
    return float(keras.ops.convert_to_numpy(opt.learning_rate))


@contextlib.contextmanager
def local_writes():
    """Write files without the Keras distribution in force: Keras's saving creates variables of its own
    (``saving_lib.get_attr_skipset`` builds a reference ``Optimizer(1.0)``), and under a distribution over
    several processes creating a variable is a collective step that only process 0, the writer, would
    take (the others would wait in the next training step: "not the same on each process"). The model's
    own variables are only read, which is local (replicated values); the distribution comes back after."""
    import keras

    previous = keras.distribution.distribution()
    if previous is None:
        yield
        return
    keras.distribution.set_distribution(None)
    try:
        yield
    finally:
        keras.distribution.set_distribution(previous)


def save_last(out_dir: Path, model, state: RunState, student=None) -> None:
    """Write the resume checkpoint: weights, optimizer variables and state, as one atomic folder.

    ``model`` is the compiled model ``fit`` trains; ``student`` the network inside it whose weights
    are saved (a distillation wrapper's teacher is not written again every epoch)."""
    import keras

    variables = model.optimizer.variables
    state.optimizer_variables = [v.path for v in variables]
    final = out_dir / LAST
    with atomic_path(final) as tmp, local_writes():
        tmp.mkdir()
        (student or model).save_weights(tmp / "weights.weights.h5")
        np.savez(tmp / "optimizer.npz", **{f"v{i:04d}": np.asarray(keras.ops.convert_to_numpy(v))
                                           for i, v in enumerate(variables)})
        state.file_sha256 = {name: sha256_file(tmp / name) for name in CHECKED_FILES}
        (tmp / "state.json").write_text(json.dumps(state.to_dict(), indent=1, default=str) + "\n")


def last_folder(out_dir: Path) -> Path:
    """The last checkpoint's folder: ``checkpoints/last``, or the copy a crash between the two
    renames of its replacement left aside (``checkpoints/.last.old``)."""
    return existing_version(out_dir / LAST) or out_dir / LAST


def recover_checkpoint(out_dir: Path) -> list[str]:
    """Before a resumed run writes again: put back a ``last`` a crash left aside, and delete the
    stages (unfinished checkpoints) of killed runs. Returns what was done, one line each."""
    done = []
    if recover_replaced(out_dir / LAST):
        done.append(f"restored {out_dir / LAST} from the copy an interrupted replacement left aside")
    for p in sweep_stages(out_dir / LAST.parent):
        done.append(f"removed {p.name}, an unfinished checkpoint of a killed run")
    return done


def read_state(out_dir: Path) -> RunState:
    path = last_folder(out_dir) / "state.json"
    if not path.exists():
        raise TrainError(f"Nothing to resume in {out_dir}: {out_dir / LAST / 'state.json'} does not exist.",
                         expected="the output folder of an interrupted `resnet-deploy train` run",
                         fix="pass the same --out as the interrupted run, or start afresh without --resume")
    try:
        return RunState(**json.loads(path.read_text()))
    except (OSError, ValueError, TypeError) as exc:
        raise TrainError(f"The checkpoint state {path} is unreadable: {exc}",
                         fix="start afresh with --force (the checkpoint cannot be trusted)") from exc


def restore_last(out_dir: Path, model, state: RunState, student=None) -> None:
    """Load weights and optimizer variables written by ``save_last`` into a freshly compiled model."""
    folder = last_folder(out_dir)
    verify_checkpoint(folder, state)
    opt = model.optimizer
    if not opt.built:  # before load_weights, which also fills a compiled model's built optimizer
        opt.build(model.trainable_variables)
    (student or model).load_weights(folder / "weights.weights.h5")
    paths = [_unprefixed(v.path) for v in opt.variables]
    if paths != [_unprefixed(p) for p in state.optimizer_variables]:
        raise TrainError(f"The optimizer in {folder} does not match this run's "
                         f"({len(state.optimizer_variables)} saved variables, {len(paths)} now).",
                         expected="the same architecture, precision and optimizer as the interrupted run",
                         fix="resume with the interrupted run's options, or start afresh with --force")
    with np.load(folder / "optimizer.npz") as z:
        for i, v in enumerate(opt.variables):
            value = z[f"v{i:04d}"]
            if tuple(value.shape) != tuple(v.shape):
                raise TrainError(f"Optimizer variable {v.path} has shape {value.shape} in the checkpoint, "
                                 f"{tuple(v.shape)} now.", fix="start afresh with --force")
            v.assign(value)


def verify_checkpoint(folder: Path, state: RunState) -> None:
    """Refuse a checkpoint whose files are missing or differ from the hashes recorded when it was written."""
    for name in CHECKED_FILES:
        f = folder / name
        recorded = state.file_sha256.get(name)
        if not f.exists():
            raise TrainError(f"The checkpoint in {folder} has no {name}.", expected="a checkpoint written by train",
                             fix="start afresh with --force (its epochs are lost), or restore the folder from a copy")
        if recorded is not None and sha256_file(f) != recorded:
            raise TrainError(f"The checkpoint file {f} is damaged: its sha256 differs from the one recorded when "
                             f"it was written (a truncated copy or a disk error).",
                             expected="the checkpoint files as train wrote them",
                             fix="restore the folder from a copy, or start afresh with --force (its epochs are lost)")


def _unprefixed(path: str) -> str:
    """``sgd_3/stem_conv_kernel_momentum`` -> ``stem_conv_kernel_momentum``: Keras numbers optimizer
    names per process, so the prefix differs between the interrupted run and the resumed one."""
    return path.split("/", 1)[-1]


def recipe_differences(saved: dict, now: dict) -> list[str]:
    return [f"{k}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
