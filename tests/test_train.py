"""`resnet-deploy train`: recipe validation, schedule, augmentation, distillation loss, a short real run."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_deploy.cli import app
from resnet_deploy.errors import OutputExistsError, TrainError
from resnet_deploy.training.recipe import TrainConfig, lr_at

runner = CliRunner()
TINY = dict(arch="resnet8", width=0.25, epochs=2, batch_size=32, limit_train=256, limit_test=96, warmup_epochs=1,
            precision="float32", verbose=False)


# ----------------------------------------------------------------------------------------------
# Recipe and options: every bad option fails before any work
# ----------------------------------------------------------------------------------------------
def test_defaults_are_a_gpu_resnet34_recipe():
    c = TrainConfig()
    assert (c.arch, c.batch_size, c.momentum, c.nesterov, c.weight_decay, c.label_smoothing) == \
        ("resnet34", 512, 0.9, True, 5e-4, 0.1)
    assert c.peak_lr == pytest.approx(0.4)  # 0.1 x 512/128
    assert str(c.output_dir) == "runs/resnet34"
    assert TrainConfig.from_dict(c.to_dict()) == c
    assert "out_dir" not in c.recipe() and c.recipe()["peak_lr"] == pytest.approx(0.4)


@pytest.mark.parametrize("kwargs, words", [
    (dict(epochs=-1), "--epochs -1"),
    (dict(epochs=0), "--epochs 0"),
    (dict(batch_size=0), "--batch-size"),
    (dict(precision="fp8"), "Unknown --precision"),
    (dict(schedule="step"), "Unknown --schedule"),
    (dict(distribute="horovod"), "Unknown --distribute"),
    (dict(lr=-0.1), "--lr"),
    (dict(momentum=1.0), "--momentum"),
    (dict(label_smoothing=1.0), "--label-smoothing"),
    (dict(warmup_epochs=50, epochs=10), "--warmup-epochs"),
    (dict(limit_train=100, batch_size=128), "smaller than one batch"),
    (dict(limit_test=0), "--limit-test"),
    (dict(cutout=40), "--cutout"),
    (dict(kd_weight=0), "--kd-weight"),
    (dict(arch="resnet9000"), "Unknown architecture"),
    (dict(width=0), "Width multiplier"),
    (dict(teacher="/nonexistent/teacher.keras"), "does not exist"),
])
def test_bad_options_are_clear_errors(kwargs, words):
    with pytest.raises(TrainError) as info:
        TrainConfig(**kwargs)
    assert words in str(info.value)


def test_default_warmup_fits_short_runs_and_an_explicit_one_says_the_fix():
    assert TrainConfig(epochs=1).warmup_epochs == 0.25 and TrainConfig(epochs=40).warmup_epochs == 2.0
    with pytest.raises(TrainError) as info:
        TrainConfig(epochs=1, warmup_epochs=2)
    assert "--warmup-epochs 0.25" in info.value.fix


def test_cli_rejects_bad_options_with_exit_code_2(tmp_path):
    for args, words in ((["--epochs", "-3"], "--epochs -3"),
                        (["--precision", "mixed_float16", "--arch", "resnet8"], "needs a GPU")):
        result = runner.invoke(app, ["train", *args, "--out", str(tmp_path / "run"),
                                     "--data", str(tmp_path / "no-data-here")])
        assert result.exit_code == 2, result.output
        assert words in result.output and ("Fix:" in result.output or "Expected:" in result.output)
        assert not (tmp_path / "run").exists()  # refused before anything was written


def test_teacher_with_wrong_outputs_is_refused_before_data(tmp_path):
    import keras

    from resnet_deploy.models.builder import build_model
    from resnet_deploy.training.trainer import train_model

    wrong = build_model("resnet8", width=0.25, num_classes=5)
    wrong.save(tmp_path / "teacher5.keras")
    cfg = TrainConfig(**TINY, teacher=tmp_path / "teacher5.keras", out_dir=tmp_path / "run")
    with pytest.raises(TrainError) as info:
        train_model(cfg, data=tmp_path / "no-data-here")  # a data error would mean the teacher was checked late
    assert "teacher" in str(info.value) and "(10,)" in str(info.value)
    assert keras.config.dtype_policy().name == "float32"


def test_data_may_be_a_path_or_loaded_data(small_npz_dir):
    from resnet_deploy.data import load_cifar10
    from resnet_deploy.training.trainer import _load_data

    cfg = TrainConfig(**TINY)
    by_path, loaded = _load_data(cfg, small_npz_dir), _load_data(cfg, load_cifar10(small_npz_dir))
    assert len(by_path.train) == len(loaded.train) == 256 and loaded.val is None and len(loaded.test) == 96
    np.testing.assert_array_equal(by_path.train.x, loaded.train.x)


def test_resume_without_checkpoint_and_contradictions(tmp_path):
    from resnet_deploy.training.trainer import train_model

    with pytest.raises(TrainError, match="Nothing to resume"):
        train_model(TrainConfig(**TINY, out_dir=tmp_path / "none", resume=True))
    with pytest.raises(TrainError, match="contradict"):
        train_model(TrainConfig(**TINY, out_dir=tmp_path / "none", resume=True, force=True))


# ----------------------------------------------------------------------------------------------
# Learning-rate schedule
# ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("schedule", ["cosine", "onecycle"])
def test_keras_schedule_matches_the_formula(schedule):
    import keras

    from resnet_deploy.training.schedule import WarmupDecay

    total, warm, peak = 200, 20, 0.4
    sched = WarmupDecay(peak, total, warm, schedule, final_fraction=0.01)
    for step in (0, 1, 10, 19, 20, 21, 100, 150, 199, 200, 250):
        want = lr_at(step, peak, total, warm, schedule, 0.01)
        assert float(keras.ops.convert_to_numpy(sched(step))) == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert lr_at(0, peak, total, warm) == pytest.approx(0.04)  # warm-up starts at a tenth of the peak
    assert lr_at(warm, peak, total, warm) == pytest.approx(peak)
    assert lr_at(total, peak, total, warm, schedule, 0.01) == pytest.approx(0.004)
    assert lr_at(110, peak, total, warm, "onecycle") == pytest.approx(0.2)  # linear: half-way, half the peak
    assert WarmupDecay.from_config(sched.get_config()).get_config() == sched.get_config()


# ----------------------------------------------------------------------------------------------
# Augmentation and batches
# ----------------------------------------------------------------------------------------------
def _images(n=16, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)


def test_crop_is_a_window_of_the_reflect_padded_image():
    from resnet_deploy.training.batches import augment_batch

    x = _images()
    out = augment_batch(x, np.random.default_rng(1), pad=4, flip=False, cutout=0)
    assert out.shape == x.shape and out.dtype == np.uint8
    padded = np.pad(x, ((0, 0), (4, 4), (4, 4), (0, 0)), mode="reflect")
    offsets = set()
    for i in range(len(x)):
        hits = [(dy, dx) for dy in range(9) for dx in range(9)
                if np.array_equal(padded[i, dy:dy + 32, dx:dx + 32], out[i])]
        assert hits, f"image {i} is not a crop of its padded original"
        offsets.add(hits[0])
    assert len(offsets) > 4  # crops really vary


def test_flip_and_cutout():
    from resnet_deploy.training.batches import CUTOUT_FILL, augment_batch

    x = _images(64)
    out = augment_batch(x, np.random.default_rng(2), pad=0, flip=True)
    flipped = [np.array_equal(o, i[:, ::-1]) for o, i in zip(out, x)]
    same = [np.array_equal(o, i) for o, i in zip(out, x)]
    assert all(f or s for f, s in zip(flipped, same)) and 10 < sum(flipped) < 54
    cut = augment_batch(x, np.random.default_rng(3), pad=0, flip=False, cutout=8)
    changed = (cut != x).any(axis=-1)  # pixels touched
    per_image = changed.sum(axis=(1, 2))
    assert per_image.max() <= 64 and per_image.mean() > 20  # at most an 8x8 square, clipped at borders
    assert (cut[changed] == CUTOUT_FILL).all()


def test_train_batches_are_seeded_per_epoch_and_cover_the_data():
    from resnet_deploy.training.batches import TrainBatches

    x, y = _images(100), np.arange(100) % 10
    b = TrainBatches(x, y, batch_size=32, seed=7)
    assert b.num_batches == 3  # the partial batch is dropped
    a0, a1 = b.batch(0, 1), b.batch(1, 1)
    np.testing.assert_array_equal(a0[0], TrainBatches(x, y, 32, seed=7).batch(0, 1)[0])  # same seed, same batch
    assert not np.array_equal(a0[0], a1[0])  # another epoch, another batch
    assert a0[0].dtype == np.float32 and a0[1].shape == (32, 10) and (a0[1].sum(axis=1) == 1).all()
    seen = np.concatenate([b.order(3)[i * 32:(i + 1) * 32] for i in range(3)])
    assert len(set(seen.tolist())) == 96  # no image twice in an epoch
    b.epoch = 1
    np.testing.assert_array_equal(b[1][0], a1[0])  # __getitem__ follows the epoch the callback sets


def test_eval_batches_pad_only_to_a_replica_multiple():
    from resnet_deploy.training.batches import EvalBatches

    x, y = _images(45), np.arange(45) % 10
    assert len(EvalBatches(x, y, 20)[2][0]) == 5
    xb, yb, w = EvalBatches(x, y, 20, multiple=4)[2]
    assert len(xb) == 8 and w.tolist() == [1] * 5 + [0] * 3


# ----------------------------------------------------------------------------------------------
# Devices and precision
# ----------------------------------------------------------------------------------------------
def test_precision_and_parallelism_rules():
    from resnet_deploy.training.devices import DeviceInfo, replica_count, resolve_precision

    cpu = DeviceInfo("tensorflow", "cpu", ("/device:CPU:0",))
    h100 = DeviceInfo("jax", "gpu", ("NVIDIA H100",) * 2, (9, 0))
    t4 = DeviceInfo("tensorflow", "gpu", ("Tesla T4",), (7, 5))
    assert resolve_precision("auto", cpu, flags=["avx2"]) == "float32"  # no bf16 hardware (AMX: test_train_checkpoints)
    assert resolve_precision("mixed_bfloat16", cpu) == "mixed_bfloat16"  # allowed on CPU (AVX512-BF16/AMX)
    with pytest.raises(TrainError, match="needs a GPU"):
        resolve_precision("mixed_float16", cpu)
    assert resolve_precision("auto", h100) == "mixed_bfloat16"
    assert resolve_precision("auto", t4) == "mixed_float16"
    with pytest.raises(TrainError, match="compute capability 8.0"):
        resolve_precision("mixed_bfloat16", t4)
    assert replica_count("none", h100) == 1 and replica_count("data-parallel", h100) == 2
    with pytest.raises(TrainError, match="2 or more devices"):
        replica_count("data-parallel", cpu)
    with pytest.raises(TrainError, match="torch"):
        replica_count("data-parallel", DeviceInfo("torch", "gpu", ("A100",) * 4, (8, 0)))


# ----------------------------------------------------------------------------------------------
# Distillation loss
# ----------------------------------------------------------------------------------------------
def _log_softmax(z):
    z = z - z.max(axis=1, keepdims=True)
    return z - np.log(np.exp(z).sum(axis=1, keepdims=True))


def _distill_case(wd: float, w: float, t: float):
    """A student/teacher pair (resnet8 at widths 0.25/0.5, L2 ``wd`` on both), the Distiller, 8 images
    with one-hot labels, the numpy logits of both, and ``loss(training)`` from Distiller.compute_loss."""
    import keras

    from resnet_deploy.models.builder import build_model
    from resnet_deploy.training.distill import Distiller

    keras.utils.set_random_seed(0)
    student = build_model("resnet8", width=0.25, weight_decay=wd)
    teacher = build_model("resnet8", width=0.5, weight_decay=wd)
    d = Distiller(student, teacher, temperature=t, weight=w)
    d.compile(loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    x = _images(8).astype(np.float32)
    y = np.eye(10, dtype=np.float32)[np.arange(8)]
    s_logits = keras.ops.convert_to_numpy(student(x, training=False))
    t_logits = keras.ops.convert_to_numpy(teacher(x, training=False))

    def loss(training: bool) -> float:
        return float(keras.ops.convert_to_numpy(
            d.compute_loss(x, y, keras.ops.convert_to_tensor(s_logits), training=training)))

    return d, student, teacher, s_logits, t_logits, loss


def _hinton_kl(s_logits, t_logits, t: float) -> float:
    """T^2 KL(teacher_T || student_T), the mean over the batch."""
    pt = np.exp(_log_softmax(t_logits / t))
    return t * t * float(np.mean(np.sum(pt * (_log_softmax(t_logits / t) - _log_softmax(s_logits / t)), axis=1)))


def _ce(s_logits) -> float:
    return float(np.mean(-_log_softmax(s_logits)[np.arange(8), np.arange(8)]))


def test_distillation_loss_is_hinton_kl_times_t_squared():
    d, student, teacher, s_logits, t_logits, loss = _distill_case(wd=0.0, w=1.0, t=3.0)
    assert loss(True) == pytest.approx(_hinton_kl(s_logits, t_logits, 3.0), rel=1e-4)
    assert loss(False) == pytest.approx(_ce(s_logits), rel=1e-4)
    assert teacher.trainable is False and len(d.trainable_variables) == len(student.trainable_variables)


def test_distillation_keeps_the_students_weight_decay_whole_and_leaves_the_teachers_out():
    """loss = (1-w) CE + w T^2 KL + the student's L2, unscaled: weight decay is what the recipe says
    whatever the distillation weight, and a teacher with regularizers adds nothing."""
    import keras

    wd, w, t = 0.05, 0.3, 2.0
    _, student, _, s_logits, t_logits, loss = _distill_case(wd, w, t)  # the teacher's L2 must not leak in
    l2 = sum(wd * float(np.sum(np.square(keras.ops.convert_to_numpy(layer.kernel))))
             for layer in student.layers if getattr(layer, "kernel_regularizer", None) is not None)
    ce, kl = _ce(s_logits), _hinton_kl(s_logits, t_logits, t)
    assert l2 > 0.2 * ((1 - w) * ce + w * kl)  # the decay term is large enough for a scaling to show
    assert loss(True) == pytest.approx((1 - w) * ce + w * kl + l2, rel=1e-4)
    assert loss(False) == pytest.approx(ce + l2, rel=1e-4)  # evaluation: as a run without a teacher reports it


# ----------------------------------------------------------------------------------------------
# A short real run (TensorFlow backend, the synthetic CIFAR-10 set of conftest)
# ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def short_run(tmp_path_factory, small_npz_dir, tiny_model_path):
    from resnet_deploy.training.trainer import train_model

    out = tmp_path_factory.mktemp("train") / "run"
    lines: list[str] = []
    cfg = TrainConfig(**TINY, out_dir=out, cutout=8, teacher=tiny_model_path, val_split=64)
    return train_model(cfg, data=small_npz_dir, log=lines.append), lines


def test_run_writes_a_loadable_model_with_metadata(short_run, small_npz_dir):
    from resnet_deploy.data import load_cifar10
    from resnet_deploy.models.io import base_metadata, load_model, read_metadata

    result, lines = short_run
    out = result.out_dir
    assert result.model_path == out / "model.keras"
    meta = read_metadata(result.model_path)
    assert meta == json.loads(json.dumps(result.metadata, default=str))
    for key in base_metadata("resnet8", 0.25):
        assert key in meta, key
    for key in ("test_accuracy", "recipe", "epochs", "train_time_s", "versions", "device", "precision", "teacher"):
        assert key in meta, key
    assert meta["epochs"] == 2 and meta["optimizer_steps"] == 2 * ((256 - 64) // 32)  # 64 held out
    assert meta["train_images"] == 192 and meta["validation"]["images"] == 64
    assert meta["device"]["backend"] == "tensorflow" and meta["recipe"]["cutout"] == 8
    assert meta["teacher"]["sha256"] and meta["recipe"]["kd_weight"] == 0.5
    model = load_model(result.model_path)  # the plain student, float32, no teacher inside
    assert model.count_params() == meta["params"] == 5382
    assert {layer.dtype_policy.name for layer in model.layers} == {"float32"}
    test = load_cifar10(small_npz_dir).test.take(96)
    acc = float(np.mean(np.argmax(model.predict(test.x.astype(np.float32), verbose=0), 1) == test.y))
    assert acc == pytest.approx(result.test_accuracy) == pytest.approx(meta["test_accuracy"])
    assert any("device: CPU" in line for line in lines) and any("ETA" in line for line in lines)


def test_run_writes_log_curves_checkpoints_atomically(short_run):
    from resnet_deploy.models.io import load_model

    result, _ = short_run
    out = result.out_dir
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == [1, 2]
    assert all(math.isfinite(float(r["loss"])) and 0 <= float(r["val_accuracy"]) <= 1 for r in rows)
    steps, batch = (256 - 64) // 32, 32  # 64 images held out by --val-split
    for r in rows:  # training time and throughput leave the test pass out
        train_s, test_s, epoch_s = float(r["train_s"]), float(r["test_s"]), float(r["epoch_s"])
        assert 0 < train_s and 0 < test_s and train_s + test_s <= epoch_s + 1e-3
        # batches 2..6 (160 images) ran within the training pass: the rate is at least 160 / train_s; counting
        # images that did not run (a wrong step count or batch size) or seconds in the wrong unit breaks this
        # bound or the figure's order of magnitude
        assert float(r["train_images_per_s"]) >= (steps - 1) * batch / (train_s + 5e-4) - 0.05, r
        assert float(r["train_images_per_s"]) < 1e6, r
    meta = result.metadata  # the run's figures are the log's, summed and taken the median of here
    assert meta["train_pass_s"] == pytest.approx(sum(float(r["train_s"]) for r in rows), abs=0.051)
    assert meta["train_time_s"] == pytest.approx(sum(float(r["epoch_s"]) for r in rows), abs=0.051)
    assert meta["train_images_per_s"] == pytest.approx(float(np.median([float(r["train_images_per_s"]) for r in rows])),
                                                       abs=0.051)
    assert (out / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert load_model(out / "best.keras").count_params() == 5382
    assert sorted(p.name for p in (out / "checkpoints" / "last").iterdir()) == \
        ["optimizer.npz", "state.json", "weights.weights.h5"]
    assert not [p for p in out.rglob("*") if ".tmp" in p.name]  # nothing half-written left
    assert not [p for p in out.rglob("*") if p.name.endswith(".old")]  # no checkpoint left aside


def test_best_model_is_chosen_on_held_out_training_images_never_on_test(short_run, small_npz_dir):
    """--val-split: val_accuracy and best.keras come from class-balanced training images that were not
    trained on; recomputed here from the indices the sampler documents and a plain Keras call."""
    from resnet_deploy.data import load_cifar10
    from resnet_deploy.data.sampler import class_balanced_indices, indices_hash
    from resnet_deploy.models.io import load_model, read_metadata

    result, _ = short_run
    out = result.out_dir
    train = load_cifar10(small_npz_dir).train.take(256)
    idx = class_balanced_indices(train.y, 64, seed=0)
    assert np.bincount(train.y[idx], minlength=10).max() - np.bincount(train.y[idx], minlength=10).min() <= 1
    assert result.metadata["validation"]["indices_sha256_16"] == indices_hash(idx)
    best_meta = read_metadata(out / "best.keras")
    rows = list(csv.DictReader((out / "log.csv").open()))
    best_row = max(rows, key=lambda r: float(r["val_accuracy"]))
    assert best_meta["epoch"] == int(best_row["epoch"]) == result.metadata["best_epoch"]
    best = load_model(out / "best.keras")
    acc = float(np.mean(np.argmax(best.predict(train.x[idx].astype(np.float32), verbose=0), 1) == train.y[idx]))
    assert acc == pytest.approx(float(best_row["val_accuracy"]), abs=1e-6)
    assert "the test split only reports" in best_meta["selection"]


def test_two_epochs_learn_the_synthetic_classes(tmp_path, synthetic_cifar_dir):
    """The default recipe at batch 32 learns the synthetic classes (colour and stripe frequency, conftest) in
    two epochs: a run whose labels do not follow their images (shuffled apart, moved by augmentation) or
    whose model never updates stays near chance (10 %). Accuracy recomputed with a plain Keras call."""
    import keras

    from resnet_deploy.data import load_cifar10
    from resnet_deploy.training.trainer import train_model

    cfg = TrainConfig(arch="resnet8", width=0.25, epochs=2, batch_size=32, warmup_epochs=0.5, precision="float32",
                      verbose=False, out_dir=tmp_path / "run")
    result = train_model(cfg, data=synthetic_cifar_dir, log=lambda _: None)
    test = load_cifar10(synthetic_cifar_dir).test
    model = keras.saving.load_model(result.model_path, compile=False)
    acc = float(np.mean(np.argmax(model(test.x.astype(np.float32), training=False), 1) == test.y))
    assert acc == pytest.approx(result.test_accuracy)
    assert acc >= 0.6, f"two epochs reached only {acc:.1%} on classes a tiny ResNet learns to ~90 %"


@pytest.mark.parametrize("bad,match", [(dict(val_split=5), "every class"), (dict(val_split=-1), "not usable"),
                                       (dict(val_split=240), "less than one batch")])
def test_bad_validation_split_is_refused_before_work(bad, match):
    with pytest.raises(TrainError, match=match):
        TrainConfig(**TINY | bad)


@pytest.mark.parametrize("damaged", ["optimizer.npz", "weights.weights.h5"])
def test_a_damaged_checkpoint_is_refused_on_resume_with_the_way_out(short_run, small_npz_dir, tmp_path, damaged):
    import shutil

    from resnet_deploy.training.trainer import train_model

    out = tmp_path / "run"
    shutil.copytree(short_run[0].out_dir, out)
    f = out / "checkpoints" / "last" / damaged
    f.write_bytes(f.read_bytes()[: f.stat().st_size // 2])  # a truncated copy
    cfg = TrainConfig(**TINY, out_dir=out, cutout=8, teacher=short_run[0].metadata["teacher"]["path"], val_split=64,
                      resume=True)
    with pytest.raises(TrainError) as info:
        train_model(cfg, data=small_npz_dir, log=lambda _: None)
    assert "is damaged" in info.value.what and damaged in info.value.what and "--force" in info.value.fix


def test_existing_output_is_refused_unless_force(short_run, small_npz_dir):
    from resnet_deploy.training.trainer import train_model

    out = short_run[0].out_dir
    before = (out / "model.keras").stat().st_mtime_ns
    with pytest.raises(OutputExistsError, match="--resume"):
        train_model(TrainConfig(**TINY, out_dir=out), data=small_npz_dir)
    assert (out / "model.keras").stat().st_mtime_ns == before


def test_distilled_run_checkpoint_restores_student_and_optimizer(short_run):
    import keras

    from resnet_deploy.models.io import load_model
    from resnet_deploy.training.checkpoint import current_lr, optimizer_iterations, read_state, restore_last
    from resnet_deploy.training.trainer import _compile

    result, _ = short_run
    state = read_state(result.out_dir)
    cfg = TrainConfig.from_dict(state.config)
    steps = (256 - 64) // 32  # 64 images held out by --val-split
    model, student = _compile(cfg, "float32", steps_per_epoch=steps)
    assert optimizer_iterations(model) == 0
    restore_last(result.out_dir, model, state, student)  # the student's weights + the optimizer's npz
    assert optimizer_iterations(model) == state.iterations == 2 * steps
    assert current_lr(model) == pytest.approx(lr_at(2 * steps, cfg.peak_lr, 2 * steps, steps))
    final = load_model(result.model_path)  # the last epoch: same weights as the checkpoint
    for a, b in zip(student.get_weights(), final.get_weights()):
        np.testing.assert_array_equal(a, b)
    assert keras.config.dtype_policy().name == "float32"


# ----------------------------------------------------------------------------------------------
# Checkpoint replacement: a complete copy always carries a name a resume finds
# ----------------------------------------------------------------------------------------------
KILL_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from resnet_deploy import fileio
final = Path(sys.argv[1])
real_replace = os.replace
def replace(src, dst):
    if Path(src).parent.name.startswith(fileio.STAGE_PREFIX) and Path(dst) == final:
        os._exit(9)  # killed after the old folder went aside, before the new one came in
    real_replace(src, dst)
fileio.os.replace = replace
with fileio.atomic_path(final) as tmp:
    tmp.mkdir()
    (tmp / "state.json").write_text("new")
"""


def _folder(path, text):
    path.mkdir(parents=True)
    (path / "state.json").write_text(text)


def test_folder_replacement_always_leaves_a_complete_copy(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from resnet_deploy import fileio

    final = tmp_path / "checkpoints" / "last"
    _folder(final, "old")
    seen = []
    real_replace = os.replace

    def watching_replace(src, dst):  # at each rename: a complete copy as `last` or as the aside `.last.old`?
        seen.append(any((p / "state.json").exists() for p in (final, final.with_name(".last.old"))))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", watching_replace)
    with fileio.atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "state.json").write_text("new")
    monkeypatch.undo()
    assert seen and all(seen), seen
    assert (final / "state.json").read_text() == "new" and sorted(p.name for p in final.parent.iterdir()) == ["last"]

    # a real kill between the two renames: the old copy is found aside, the new one is a temporary
    res = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(final)], capture_output=True, text=True)
    assert res.returncode == 9, res.stderr
    assert not final.exists()
    assert (fileio.existing_version(final) / "state.json").read_text() == "new"  # the previous version
    assert len(fileio.stale_stages(final.parent)) == 1  # the killed writer's stage, with the new folder in it
    assert fileio.recover_replaced(final) and (final / "state.json").read_text() == "new"
    assert [p.name for p in fileio.sweep_stages(final.parent)] and \
        sorted(p.name for p in final.parent.iterdir()) == ["last"]

    # a writer failing between the renames puts the old folder back
    def failing_replace(src, dst):
        if Path(dst) == final and Path(src).parent.name.startswith(fileio.STAGE_PREFIX):  # not the undo
            raise OSError("disk gone")
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", failing_replace)
    with pytest.raises(OSError):
        with fileio.atomic_path(final) as tmp:
            tmp.mkdir()
            (tmp / "state.json").write_text("newer")
    monkeypatch.undo()
    assert (final / "state.json").read_text() == "new" and sorted(p.name for p in final.parent.iterdir()) == ["last"]


def _copy_run(short_run, tmp_path):
    import shutil

    out = tmp_path / "run"
    shutil.copytree(short_run[0].out_dir, out)
    return out


def test_resume_finds_a_checkpoint_left_aside_and_removes_temporaries(short_run, tmp_path, small_npz_dir,
                                                                      tiny_model_path):
    """The state a kill between the two renames leaves: no checkpoints/last, the previous one at
    .last.old, the complete new one in the killed process's stage. --resume reads the aside copy,
    puts it back, and removes the stages of dead processes."""
    import shutil
    import subprocess
    import sys

    from resnet_deploy.fileio import STAGE_PREFIX
    from resnet_deploy.training.checkpoint import read_state
    from resnet_deploy.training.trainer import train_model

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a process id that no longer runs
    out = _copy_run(short_run, tmp_path)
    ck = out / "checkpoints"
    shutil.copytree(ck / "last", ck / f"{STAGE_PREFIX}{dead}.k1ll3d00" / "last")
    (ck / "last").rename(ck / ".last.old")
    (out / f"{STAGE_PREFIX}{dead}.k1ll3d01").mkdir()
    (out / f"{STAGE_PREFIX}{dead}.k1ll3d01" / "log.csv").write_text("epoch\n")
    assert read_state(out).epoch == 2  # not "Nothing to resume"
    lines: list[str] = []
    cfg = TrainConfig(**TINY, out_dir=out, cutout=8, teacher=tiny_model_path, val_split=64, resume=True)
    result = train_model(cfg, data=small_npz_dir, log=lines.append)  # 2 of 2 epochs done: only the finish
    assert any("restored" in line for line in lines)
    assert any("k1ll3d00" in line for line in lines) and any("k1ll3d01" in line for line in lines), lines
    assert sorted(p.name for p in ck.iterdir()) == ["last"]
    assert not any(p.name.startswith(STAGE_PREFIX) for p in out.iterdir())
    assert result.metadata["epochs"] == 2 and read_state(out).epoch == 2


# ----------------------------------------------------------------------------------------------
# Precision on --resume
# ----------------------------------------------------------------------------------------------
def test_resume_refuses_another_precision_than_the_run_trained_in(short_run, tmp_path, tiny_model_path):
    """A run that trained in mixed_bfloat16 under `auto` on a GPU, resumed with `auto` on this CPU
    (where auto means float32): refused before any data is read, with the way out."""
    from resnet_deploy.training.checkpoint import read_state
    from resnet_deploy.training.devices import DeviceInfo
    from resnet_deploy.training.trainer import train_model

    out = _copy_run(short_run, tmp_path)
    state_file = out / "checkpoints" / "last" / "state.json"
    saved = json.loads(state_file.read_text())
    saved["config"]["precision"], saved["precision"] = "auto", "mixed_bfloat16"
    state_file.write_text(json.dumps(saved))
    auto = {**TINY, "precision": "auto"}
    cfg = TrainConfig(**auto, out_dir=out, cutout=8, teacher=tiny_model_path, val_split=64, resume=True)
    with pytest.raises(TrainError) as info:
        train_model(cfg, data=tmp_path / "no-data-here")
    msg = str(info.value)
    assert "mixed_bfloat16" in msg and "float32" in msg and "--precision mixed_bfloat16" in msg, msg
    assert "Expected:" in msg and "Fix:" in msg
    assert json.loads(state_file.read_text()) == saved
    assert read_state(short_run[0].out_dir).precision == "float32"  # the resolved policy is kept

    from resnet_deploy.training.trainer import _check_resumed_precision

    state = read_state(out)
    cpu, t4 = DeviceInfo("tensorflow", "cpu", ("cpu",)), DeviceInfo("jax", "gpu", ("Tesla T4",), (7, 5))
    explicit = TrainConfig(**{**TINY, "precision": "mixed_bfloat16"}, out_dir=out, resume=True)
    assert _check_resumed_precision(explicit, state, "mixed_bfloat16", cpu, out) is None  # same policy: fine
    with pytest.raises(TrainError, match="resume on a machine that runs mixed_bfloat16"):
        _check_resumed_precision(cfg, state, "mixed_float16", t4, out)  # this GPU cannot run bf16 at all
    state.precision = None  # a checkpoint from before the record: checked only where it can be
    state.config["precision"] = "float32"
    with pytest.raises(TrainError, match="trained in float32"):
        _check_resumed_precision(explicit, state, "mixed_bfloat16", cpu, out)
    state.config["precision"] = "auto"
    assert "does not record" in _check_resumed_precision(cfg, state, "float32", cpu, out)


# ----------------------------------------------------------------------------------------------
# Timing and curves of the run recorder
# ----------------------------------------------------------------------------------------------
def test_throughput_counts_training_batches_only():
    """8 batches of 32: the first takes 5 s (compilation), the others 1 s each, then a 100 s test pass."""
    from resnet_deploy.training.callbacks import RunRecorder
    from resnet_deploy.training.checkpoint import RunState

    now = [0.0]
    rec = RunRecorder(None, RunState(), 2, steps=8, batch_size=32, log=None, clock=lambda: now[0])
    rec.on_epoch_begin(0)
    for step in range(8):
        rec.on_train_batch_begin(step)
        now[0] += 5.0 if step == 0 else 1.0
    rec.on_test_begin()
    now[0] += 100.0
    rec.on_test_end()
    times = rec.clock.epoch_end()
    assert times == {"epoch_s": 112.0, "train_s": 12.0, "test_s": 100.0, "train_images_per_s": 32.0}


def test_curves_are_skipped_once_without_matplotlib(tmp_path, monkeypatch):
    import sys

    from resnet_deploy.training.callbacks import CURVES_SKIPPED, RunRecorder, write_curves
    from resnet_deploy.training.checkpoint import RunState

    history = [{"epoch": 1, "loss": 2.0, "accuracy": 0.2, "val_loss": 2.1, "val_accuracy": 0.2}]
    (tmp_path / "curves.png").write_bytes(b"an earlier session's curves")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # as on the GPU machine
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    assert write_curves(tmp_path / "other.png", history) is False and not (tmp_path / "other.png").exists()
    lines: list[str] = []
    rec = RunRecorder(tmp_path, RunState(), 2, steps=8, batch_size=32, log=lines.append)
    rec._curves(tmp_path / "curves.png", history)
    rec._curves(tmp_path / "curves.png", history * 2)
    assert lines == [CURVES_SKIPPED] and "matplotlib" in lines[0] and "log.csv" in lines[0]
    assert not (tmp_path / "curves.png").exists()  # a stale PNG would disagree with log.csv


def test_log_csv_keeps_an_older_runs_legacy_column_on_resume(tmp_path):
    import csv

    from resnet_deploy.training.callbacks import CSV_FIELDS, write_csv

    old = {"epoch": 1, "loss": 2.0, "images_per_s": 80.5, "epoch_s": 12.0}  # a row from before train_s existed
    new = {"epoch": 2, "loss": 1.5, "epoch_s": 11.0, "train_s": 10.0, "train_images_per_s": 90.1}
    write_csv(tmp_path / "log.csv", [old, new])
    rows = list(csv.DictReader((tmp_path / "log.csv").open()))
    assert rows[0]["images_per_s"] == "80.5" and rows[1]["images_per_s"] == ""
    assert rows[1]["train_images_per_s"] == "90.1" and rows[0]["train_s"] == ""
    write_csv(tmp_path / "fresh.csv", [new])
    assert next(csv.reader((tmp_path / "fresh.csv").open())) == list(CSV_FIELDS)  # no legacy column in new runs
