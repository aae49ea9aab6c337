"""`resnet-deploy train` in subprocesses: SIGKILL mid-run then --resume; JAX without what the GPU machine lacks;
data parallelism through the real engines (keras.distribution on 2 forced JAX host devices,
MirroredStrategy on 2 logical TensorFlow CPUs)."""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from resnet_deploy.training.recipe import lr_at

REPO = Path(__file__).resolve().parents[1]
TINY_ARGS = ["--arch", "resnet8", "--width", "0.25", "--batch-size", "32", "--warmup-epochs", "1",
             "--precision", "float32"]

# The GPU machine has Python, JAX, numpy, h5py, rich, absl-py and ml-dtypes, plus the keras wheels a session
# carries; none of these modules. The library's training modules must import without any of them (typer
# included); the CLI needs typer, which a session carries too (docs/training.md), so it is let in after that.
NOT_ON_GPU_MACHINE = ("tensorflow", "tf_keras", "matplotlib", "psutil", "typer", "onnx", "tf2onnx")
NO_TF_CLI = """
import sys
BLOCKED = set(%r)
class Block:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in BLOCKED:
            raise ImportError("not on the GPU machine, blocked in this test: " + name)
sys.meta_path.insert(0, Block())
import resnet_deploy.training.batches, resnet_deploy.training.callbacks, resnet_deploy.training.checkpoint
import resnet_deploy.training.devices, resnet_deploy.training.distill, resnet_deploy.training.recipe
import resnet_deploy.training.schedule, resnet_deploy.training.trainer
BLOCKED.discard("typer")
from resnet_deploy.cli import app
try:
    app(sys.argv[1:], standalone_mode=False)
finally:
    print("BLOCKED_MODULES", sorted({m.split(".")[0] for m in sys.modules} & BLOCKED))
""" % (NOT_ON_GPU_MACHINE,)


def _env(**extra) -> dict:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", RESNET_DEPLOY_NO_DOWNLOAD="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


def _cli(*args) -> list[str]:
    return [sys.executable, "-m", "resnet_deploy.cli", "train", *args]


def test_kill_then_resume_continues_epochs_optimizer_and_schedule(tmp_path, small_npz_dir):
    out = tmp_path / "run"
    args = [*TINY_ARGS, "--epochs", "8", "--limit-train", "320", "--limit-test", "64", "--out", str(out),
            "--data", str(small_npz_dir)]
    state_file = out / "checkpoints" / "last" / "state.json"
    proc = subprocess.Popen(_cli(*args), cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not state_file.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state_file.exists(), "no checkpoint appeared"
        proc.send_signal(signal.SIGKILL)  # no clean-up runs: a real crash
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    from resnet_deploy.training.checkpoint import read_state

    killed_at = read_state(out).epoch  # also when the kill fell between the two renames of a checkpoint
    assert 1 <= killed_at < 8, f"the run was not interrupted mid-way (checkpoint at epoch {killed_at})"
    assert not (out / "model.keras").exists()

    steps = 320 // 32
    res = subprocess.run(_cli("--resume", "--out", str(out), "--data", str(small_npz_dir)), cwd=REPO, env=_env(),
                         capture_output=True, text=True, timeout=180)
    assert res.returncode == 0, res.stdout + res.stderr
    resumed_lr = lr_at(killed_at * steps, 0.1 * 32 / 128, 8 * steps, steps, "cosine")
    assert f"resuming after epoch {killed_at}/8 (optimizer step {killed_at * steps}, lr {resumed_lr:.4g})" in res.stdout
    epochs_run = [line.split()[1] for line in res.stdout.splitlines() if line.startswith("epoch ")]
    assert epochs_run == [f"{e}/8" for e in range(killed_at + 1, 9)], res.stdout
    assert "load_own_variables" not in res.stderr, res.stderr  # weights and optimizer restored without complaint
    assert not [p for p in out.rglob("*") if ".tmp" in p.name or p.name.endswith(".old")]  # no debris of the kill

    rows = list(csv.DictReader((out / "log.csv").open()))
    assert [int(r["epoch"]) for r in rows] == list(range(1, 9))  # complete, no epoch twice
    for r in rows:  # the schedule position went on from where the killed run stopped
        assert int(r["iterations"]) == int(r["epoch"]) * steps
        assert float(r["lr"]) == pytest.approx(lr_at(int(r["iterations"]), 0.025, 8 * steps, steps), abs=1e-6)
    meta = json.loads((out / "model.keras.json").read_text())
    assert meta["epochs"] == 8 and meta["optimizer_steps"] == 8 * steps and meta["sessions"] == 2
    assert meta["recipe"]["limit_train"] == 320  # the saved recipe was used, not the CLI defaults
    assert not (out / "best.keras").exists() and meta["best_epoch"] is None  # no --val-split: nothing chosen

    changed = subprocess.run(_cli("--resume", "--out", str(out), "--lr", "0.3", "--data", str(small_npz_dir)),
                             cwd=REPO, env=_env(), capture_output=True, text=True, timeout=60)
    assert changed.returncode == 2 and "would change the recipe" in changed.stderr and "lr" in changed.stderr


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed (pip install jax)")
def test_jax_backend_trains_without_tensorflow_data_parallel_and_distilled(tmp_path, small_npz_dir, tiny_model_path):
    out = tmp_path / "jax"
    args = ["train", *TINY_ARGS, "--epochs", "2", "--limit-train", "256", "--limit-test", "100", "--out", str(out),
            "--data", str(small_npz_dir), "--distribute", "data-parallel", "--teacher", str(tiny_model_path)]
    env = _env(KERAS_BACKEND="jax", XLA_FLAGS="--xla_force_host_platform_device_count=2")
    res = subprocess.run([sys.executable, "-c", NO_TF_CLI, *args], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "BLOCKED_MODULES []" in res.stdout
    assert res.stdout.count("curves.png skipped: matplotlib is not installed") == 1  # said once, run goes on
    assert not (out / "curves.png").exists()
    assert "keras.distribution.DataParallel over 2 devices" in res.stdout
    meta = json.loads((out / "model.keras.json").read_text())
    assert meta["device"]["backend"] == "jax" and meta["distribution"]["replicas"] == 2
    # the per-epoch test accuracy (padded last batch, zero weights) equals the saved model's
    rows = list(csv.DictReader((out / "log.csv").open()))
    assert float(rows[-1]["val_accuracy"]) == pytest.approx(meta["test_accuracy"], abs=1e-6)
    assert [int(r["epoch"]) for r in rows] == [1, 2] and meta["files"]["curves"] is None


def test_tensorflow_mirrored_strategy_on_two_logical_cpus(tmp_path, small_npz_dir):
    code = f"""
import tensorflow as tf
cpu = tf.config.list_physical_devices("CPU")[0]
tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
from resnet_deploy.training.recipe import TrainConfig
from resnet_deploy.training.trainer import train_model
cfg = TrainConfig(arch="resnet8", width=0.25, epochs=1, batch_size=32, limit_train=128, limit_test=50,
                  warmup_epochs=0, precision="mixed_bfloat16", distribute="data-parallel", out_dir={str(tmp_path / 'tf')!r})
r = train_model(cfg, data={str(small_npz_dir)!r})
print("ENGINE", r.metadata["distribution"]["engine"], r.metadata["distribution"]["replicas"], r.metadata["precision"])
"""
    res = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    assert "ENGINE tf.distribute.MirroredStrategy 2 mixed_bfloat16" in res.stdout
