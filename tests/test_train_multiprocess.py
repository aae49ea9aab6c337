"""`train --distribute multi-process`: the launch values (flags, KERAS_DISTRIBUTION_*, JAX's and SLURM's
variables) and their refusals, each process's shard of the batches, and the real thing: processes on
127.0.0.1 joined by keras.distribution.initialize over JAX's CPU collectives (gloo).

The tests that start processes are slow (each process imports JAX and Keras and compiles; several minutes
on two shared cores): two processes train the weights one process trains (with the same global batch, seed
and data order), a run whose process dies is stopped by the others with an error and resumed from process
0's checkpoint to the weights of a run never stopped, processes started with different recipes or alone are
refused. Every child process is started in its own session and killed with it when a test ends."""

from __future__ import annotations

import contextlib
import csv
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_deploy.cli import app
from resnet_deploy.errors import TrainError
from resnet_deploy.training.multiprocess import DEFAULT_PEER_TIMEOUT, is_peer_failure, resolve_launch

REPO = Path(__file__).resolve().parents[1]
runner = CliRunner()
LAUNCH_ENV = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID",
              "JAX_COORDINATOR_ADDRESS", "JAX_COORDINATOR_PORT", "SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NODELIST",
              "SLURM_JOB_NODELIST", "SLURM_JOB_ID", "SLURM_LOCALID")


# ----------------------------------------------------------------------------------------------
# Where a process stands: flags, then KERAS_DISTRIBUTION_*, then JAX_COORDINATOR_ADDRESS, then SLURM
# ----------------------------------------------------------------------------------------------
def test_launch_values_come_from_flags_first_then_the_launchers_variables():
    env = {"KERAS_DISTRIBUTION_JOB_ADDRESSES": "10.0.0.1:1234,10.0.0.2:2345", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
           "KERAS_DISTRIBUTION_PROCESS_ID": "1", "SLURM_PROCID": "3", "SLURM_NTASKS": "8",
           "SLURM_STEP_NODELIST": "gpu[07-08]", "SLURM_JOB_ID": "4242"}
    keras_env = resolve_launch(environ=env)
    assert (keras_env.process_id, keras_env.num_processes, keras_env.coordinator) == (1, 2, "10.0.0.1:1234")
    assert keras_env.sources == {"process_id": "KERAS_DISTRIBUTION_PROCESS_ID",
                                 "num_processes": "KERAS_DISTRIBUTION_NUM_PROCESSES",
                                 "coordinator": "KERAS_DISTRIBUTION_JOB_ADDRESSES"}
    flags = resolve_launch(process_id=0, num_processes=2, coordinator="127.0.0.1:29500", environ=env)
    assert (flags.process_id, flags.coordinator, flags.sources["process_id"]) == (0, "127.0.0.1:29500", "--process-id")
    jax_env = resolve_launch(process_id=0, num_processes=2, environ={"JAX_COORDINATOR_ADDRESS": "[::1]:29500"})
    assert jax_env.coordinator == "[::1]:29500" and jax_env.sources["coordinator"] == "JAX_COORDINATOR_ADDRESS"
    slurm = resolve_launch(environ={k: v for k, v in env.items() if not k.startswith("KERAS")})
    assert (slurm.process_id, slurm.num_processes) == (3, 8) and slurm.coordinator.startswith("gpu07:")
    assert slurm.peer_timeout == DEFAULT_PEER_TIMEOUT and "process 3 of 8" in slurm.describe()


@pytest.mark.parametrize("nodes, job, port", [("gpu[07-08]", "4242", None), ("node001,node002", "77", None),
                                              ("a[001,007-015],b2", "123456", "29500"), ("single", "9", None)])
def test_slurm_coordinator_is_the_one_jax_itself_derives(monkeypatch, nodes, job, port):
    from jax._src.clusters.slurm_cluster import SlurmCluster

    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_STEP_NODELIST": nodes, "SLURM_JOB_ID": job}
    if port:
        env["JAX_COORDINATOR_PORT"] = port
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    # JAX's own SLURM detection (what jax.distributed.initialize() would join without arguments)
    assert resolve_launch(environ=env).coordinator == SlurmCluster.get_coordinator_address(None, port)


@pytest.mark.parametrize("kwargs, env, words", [
    ({}, {}, "does not know this process's process id and number of processes and coordinator"),
    (dict(process_id=0, num_processes=2), {}, "coordinator"),
    (dict(process_id=0, num_processes=1, coordinator="h:1"), {}, "with 1 process"),
    (dict(process_id=2, num_processes=2, coordinator="h:1"), {}, "outside 0..1"),
    (dict(process_id=-1, num_processes=2, coordinator="h:1"), {}, "outside 0..1"),
    (dict(process_id=0, num_processes=2, coordinator="h"), {}, "coordinator address 'h'"),
    (dict(process_id=0, num_processes=2, coordinator="h:70000"), {}, "is not usable"),
    (dict(process_id=0, num_processes=2, coordinator="a b:12"), {}, "is not usable"),
    (dict(process_id=0, num_processes=2, coordinator="h:1", peer_timeout=3), {}, "--peer-timeout 3"),
    ({}, {"KERAS_DISTRIBUTION_PROCESS_ID": "one", "KERAS_DISTRIBUTION_NUM_PROCESSES": "2",
          "KERAS_DISTRIBUTION_JOB_ADDRESSES": "h:1"}, "'one' (KERAS_DISTRIBUTION_PROCESS_ID) is not a whole number"),
    ({}, {"KERAS_DISTRIBUTION_PROCESS_ID": "0", "KERAS_DISTRIBUTION_NUM_PROCESSES": "3",
          "KERAS_DISTRIBUTION_JOB_ADDRESSES": "h:1,h:2"}, "lists 2 addresses for 3 processes"),
])
def test_bad_launch_values_are_refused_with_what_and_where(kwargs, env, words):
    with pytest.raises(TrainError) as info:
        resolve_launch(**kwargs, environ=env)
    assert words in str(info.value)


def test_cli_refuses_launch_mistakes_before_any_work(tmp_path, monkeypatch):
    for k in LAUNCH_ENV:
        monkeypatch.delenv(k, raising=False)
    out, missing = tmp_path / "run", tmp_path / "no-data-here"
    res = runner.invoke(app, ["train", "--process-id", "1", "--out", str(out), "--data", str(missing)])
    assert res.exit_code == 2 and "--process-id apply to --distribute multi-process only" in res.output
    res = runner.invoke(app, ["train", "--distribute", "multi-process", "--out", str(out), "--data", str(missing)])
    assert res.exit_code == 2 and "does not know this process's" in res.output and "srun" in res.output
    # this test session runs Keras on TensorFlow: refused before joining, before the data is looked for
    res = runner.invoke(app, ["train", "--distribute", "multi-process", "--num-processes", "2", "--process-id", "0",
                              "--coordinator", "127.0.0.1:1", "--out", str(out), "--data", str(missing)])
    if os.environ.get("KERAS_BACKEND", "tensorflow") != "jax":
        assert res.exit_code == 2 and "runs on the JAX backend" in res.output and "keras-team/keras#20585" in res.output
    assert not out.exists()


def test_each_process_serves_its_slice_of_every_global_batch():
    from resnet_deploy.training.batches import EvalBatches, TrainBatches

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (70, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 70)
    whole = TrainBatches(x, y, 12, seed=5, pad=4, flip=True, cutout=8, epoch=3)
    parts = [TrainBatches(x, y, 12, seed=5, pad=4, flip=True, cutout=8, epoch=3, shard=(i, 3)) for i in range(3)]
    for b in range(whole.num_batches):
        for k in range(2):  # images, labels: the three slices put together are the whole batch, augmentation included
            np.testing.assert_array_equal(np.concatenate([p[b][k] for p in parts]), whole[b][k])
        assert len(parts[1][b][0]) == 4
    with pytest.raises(ValueError, match="equal shards"):
        TrainBatches(x, y, 12, seed=5, shard=(0, 5))
    # evaluation: the last batch (70 = 2 x 32 + 6) is padded to a multiple of the 4 devices, then split over 2 processes
    e_whole = EvalBatches(x, y, 32, multiple=4)
    e_parts = [EvalBatches(x, y, 32, multiple=4, shard=(i, 2)) for i in range(2)]
    for b in range(e_whole.num_batches):
        for k in range(3):
            np.testing.assert_array_equal(np.concatenate([p[b][k] for p in e_parts]), e_whole[b][k])
    assert len(e_whole[2][0]) == 8 and e_whole[2][2].sum() == 6 and len(e_parts[1][2][0]) == 4


def test_failed_collectives_are_told_apart_from_other_errors():
    seen = ["UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/pair.cc:538] Read error "
            "[127.0.0.1]:1921: Connection reset by peer",
            "UNKNOWN: Gloo AllGather failed: [external/gloo/gloo/transport/tcp/unbound_buffer.cc:132] Timed out "
            "waiting 15000ms for send operation to complete",
            "UNAVAILABLE: Failed to send RPC to coordination service."]  # messages met on 127.0.0.1 (module docstring)
    assert all(is_peer_failure(ValueError(m)) for m in seen)
    assert not is_peer_failure(ValueError("operands could not be broadcast together with shapes (3,) (4,)"))
    assert not is_peer_failure(TrainError("Gloo said: the recipe differs"))  # the tool's own refusals stay as they are


def test_learning_rate_is_computed_from_the_step_count_as_the_optimizer_does():
    import keras

    from resnet_deploy.training.checkpoint import current_lr
    from resnet_deploy.training.schedule import WarmupDecay

    model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile(optimizer=keras.optimizers.SGD(WarmupDecay(0.1, 100, 10, "cosine", 0.0)), loss="mse")
    model.optimizer.build(model.trainable_variables)
    model.optimizer.iterations.assign(37)
    assert current_lr(model) == pytest.approx(float(keras.ops.convert_to_numpy(model.optimizer.learning_rate)))


# ----------------------------------------------------------------------------------------------
# Processes on 127.0.0.1 (slow: each one imports JAX and Keras and compiles)
# ----------------------------------------------------------------------------------------------
# 320 images at global batch 32: 10 steps an epoch, 2 epochs; each of the 2 processes feeds 16 images a step
RECIPE = ["--arch", "resnet8", "--width", "0.25", "--batch-size", "32", "--warmup-epochs", "1", "--precision",
          "float32", "--epochs", "2", "--limit-train", "320", "--limit-test", "64"]
STEPS = 10


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env.update(KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", RESNET_DEPLOY_NO_DOWNLOAD="1", PYTHONUNBUFFERED="1")
    env.update(extra)
    return env


class Processes:
    """Child processes, each in its own session (so a kill reaches whatever it started); all killed at the end."""

    def __init__(self, folder: Path):
        self.folder, self.procs = folder, []

    def start(self, name: str, args: list[str], **env) -> subprocess.Popen:
        log = open(self.folder / f"{name}.log", "w")
        p = subprocess.Popen(args, cwd=REPO, env=_env(**env), stdout=log, stderr=subprocess.STDOUT,
                             start_new_session=True)
        log.close()
        p.name = name
        self.procs.append(p)
        return p

    def output(self, p) -> str:
        return (self.folder / f"{p.name}.log").read_text(errors="replace")

    def wait(self, procs, timeout: float) -> list[int]:
        deadline = time.monotonic() + timeout
        for p in procs:
            try:
                p.wait(timeout=max(1.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                raise AssertionError(f"{p.name} still runs after {timeout:.0f} s:\n" + self.output(p)[-3000:]) from None
        return [p.returncode for p in procs]

    def kill_all(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
                p.wait(timeout=60)


@contextlib.contextmanager
def processes(folder: Path):
    group = Processes(folder)
    try:
        yield group
    finally:
        group.kill_all()


def _train(procs: Processes, tag: str, port: int, rank: int, out: Path, data: Path, *extra: str):
    return procs.start(f"{tag}-{rank}", [sys.executable, "-m", "resnet_deploy.cli", "train", *RECIPE,
                                         "--data", str(data),
                                         "--out", str(out), "--distribute", "multi-process", "--num-processes", "2",
                                         "--coordinator", f"127.0.0.1:{port}", "--process-id", str(rank), *extra])


def _weights(path: Path) -> list[np.ndarray]:
    from resnet_deploy.models.io import load_model

    return [np.asarray(w) for w in load_model(path).get_weights()]


def _gap(a, b) -> float:
    """How far two models' weights are apart: the norm of the difference over the norm of ``b``, all weights as
    one vector."""
    return float(np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(a, b)) / sum(np.sum(y ** 2) for y in b)))


REFERENCE = """
import json, sys
from resnet_deploy.training.recipe import TrainConfig
from resnet_deploy.training.trainer import train_model
base = dict(arch="resnet8", width=0.25, batch_size=32, warmup_epochs=1.0, precision="float32", epochs=2,
            limit_train=320, limit_test=64, verbose=False)
for name, extra in json.loads(sys.argv[3]):
    train_model(TrainConfig(**base, **extra, out_dir=sys.argv[2] + "/" + name), data=sys.argv[1], log=lambda m: None)
"""


@pytest.fixture(scope="module")
def pair_run(tmp_path_factory, small_npz_dir):
    """Two processes on 127.0.0.1 train 2 epochs. Beside them one more process, with two virtual CPU devices,
    trains the same recipe: on one device (the whole global batch there: the reference), on one device with a
    doubled learning rate (what summed gradients would give), and data-parallel over its two devices (the same
    split of each batch as the two processes, inside one process)."""
    tmp = tmp_path_factory.mktemp("pair")
    with processes(tmp) as procs:
        port = _free_port()
        ranks = [_train(procs, "pair", port, r, tmp / f"out{r}", small_npz_dir) for r in (0, 1)]
        alone = procs.start("alone", [sys.executable, "-c", REFERENCE, str(small_npz_dir), str(tmp),
                                      json.dumps([["alone", {}], ["summed", {"lr": 0.05}],
                                                  ["split", {"distribute": "data-parallel"}]])],
                            XLA_FLAGS="--xla_force_host_platform_device_count=2")
        codes = procs.wait(ranks + [alone], timeout=1800)
        outputs = [procs.output(p) for p in (*ranks, alone)]
    return tmp, codes, outputs


@pytest.mark.slow
def test_two_processes_train_the_weights_of_one_process_with_the_same_global_batch(pair_run):
    tmp, codes, (out0, out1, alone) = pair_run
    assert codes == [0, 0, 0], f"{codes}\n--- 0:\n{out0[-3000:]}\n--- 1:\n{out1[-3000:]}\n--- alone:\n{alone[-3000:]}"
    assert not (tmp / "out1").exists()  # the second process wrote nothing (not even its output folder)
    assert "keras.distribution.DataParallel over 2 devices in 2 processes" in out0
    meta = json.loads((tmp / "out0" / "model.keras.json").read_text())
    dist = meta["distribution"]
    assert (dist["mode"], dist["processes"], dist["replicas"], dist["devices_per_process"]) == \
        ("multi-process", 2, 2, 1)
    # both processes ended with the same weights, and that is the model process 0 wrote
    assert f"final weights sha256 {dist['weights_sha256_16']} (the same on every process)" in out1
    from resnet_deploy.models.io import load_model
    from resnet_deploy.training.multiprocess import weights_sha256

    assert weights_sha256(load_model(tmp / "out0" / "model.keras")) == dist["weights_sha256_16"]

    pair, one, summed, split = (_weights(tmp / d / "model.keras") for d in ("out0", "alone", "summed", "split"))
    # the two processes computed what one process computes data-parallel over two devices: the gradients of the
    # two halves of each batch averaged (measured here: bit for bit)
    for a, b in zip(pair, split):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    # one device with the whole batch: equal within float tolerance (sums over the batch added up in another
    # order, 20 steps of a tiny network amplify the last bits; measured here: 1e-3)
    gap, summed_gap = _gap(pair, one), _gap(summed, one)
    assert gap < 1e-2, gap
    # and that tolerance tells: summed gradients (a doubled step) end 20 times further away at least (measured: 100x)
    assert summed_gap > 20 * gap and summed_gap > 0.05, (gap, summed_gap)
    # every epoch's training loss (a global mean over both processes' images) is the single process's
    rows = [list(csv.DictReader((tmp / d / "log.csv").open())) for d in ("out0", "alone")]
    assert [int(r["iterations"]) for r in rows[0]] == [STEPS, 2 * STEPS]
    for a, b in zip(*rows):
        assert float(a["loss"]) == pytest.approx(float(b["loss"]), rel=1e-3)
        assert float(a["val_accuracy"]) == pytest.approx(float(b["val_accuracy"]), abs=1 / 64 + 1e-9)


@pytest.mark.slow
def test_a_dead_process_stops_the_other_and_the_run_resumes_to_the_uninterrupted_weights(pair_run, small_npz_dir):
    tmp_pair, codes, _ = pair_run
    assert codes[:2] == [0, 0]
    tmp = tmp_pair / "killed"
    tmp.mkdir()
    state_file = tmp / "out0" / "checkpoints" / "last" / "state.json"
    with processes(tmp) as procs:
        port = _free_port()
        ranks = [_train(procs, "first", port, r, tmp / f"out{r}", small_npz_dir) for r in (0, 1)]
        deadline = time.monotonic() + 1200
        while not state_file.exists() and all(p.poll() is None for p in ranks) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert state_file.exists(), procs.output(ranks[0])[-3000:]
        for p in ranks:  # freeze both at the end of epoch 1, then process 1 dies (a real crash: no clean-up runs)
            os.killpg(p.pid, signal.SIGSTOP)
        os.killpg(ranks[1].pid, signal.SIGKILL)
        os.killpg(ranks[0].pid, signal.SIGCONT)
        t0 = time.monotonic()
        (code,) = procs.wait(ranks[:1], timeout=600)
        stopped_after = time.monotonic() - t0
        out0 = procs.output(ranks[0])
    from resnet_deploy.training.checkpoint import read_state

    # process 0 stopped at its next collective with the tool's error, not a hang
    assert code == 3, out0[-3000:]
    assert "process 0 of 2 lost contact with the other processes" in out0 and "--resume" in out0
    assert stopped_after < 300, stopped_after
    assert read_state(tmp / "out0").epoch == 1 and not (tmp / "out0" / "model.keras").exists()
    assert not [p for p in (tmp / "out0").rglob("*") if ".resnet-deploy-stage" in p.name]  # nothing half-written

    with processes(tmp) as procs:  # the same command line, with --resume, on both
        port = _free_port()
        ranks = [_train(procs, "resumed", port, r, tmp / f"out{r}", small_npz_dir, "--resume") for r in (0, 1)]
        codes = procs.wait(ranks, timeout=1800)
        out0, out1 = (procs.output(p) for p in ranks)
    assert codes == [0, 0], f"--- 0:\n{out0[-3000:]}\n--- 1:\n{out1[-3000:]}"
    assert f"resuming after epoch 1/2 (optimizer step {STEPS}" in out0
    assert f"restored process 0's checkpoint (epoch 1, optimizer step {STEPS})" in out1  # sent by process 0
    assert not (tmp / "out1").exists()
    meta = json.loads((tmp / "out0" / "model.keras.json").read_text())
    assert meta["sessions"] == 2 and meta["optimizer_steps"] == 2 * STEPS
    resumed, whole = _weights(tmp / "out0" / "model.keras"), _weights(tmp_pair / "out0" / "model.keras")
    for a, b in zip(resumed, whole):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_processes_started_with_different_recipes_are_all_refused_before_training(tmp_path, small_npz_dir):
    with processes(tmp_path) as procs:
        port = _free_port()
        ranks = [_train(procs, "odd", port, 0, tmp_path / "out0", small_npz_dir),
                 _train(procs, "odd", port, 1, tmp_path / "out1", small_npz_dir, "--lr", "0.05")]
        codes = procs.wait(ranks, timeout=900)
        out0, out1 = (procs.output(p) for p in ranks)
    assert codes == [2, 2], f"{codes}\n--- 0:\n{out0[-3000:]}\n--- 1:\n{out1[-3000:]}"
    assert "process 1 of 2" in out0 and "another recipe than process 0" in out0
    assert "lr: process 0 None, now 0.05" in out0
    assert "another recipe than process 0" in out1
    assert not (tmp_path / "out0" / "checkpoints").exists() and not (tmp_path / "out1").exists()


@pytest.mark.slow
@pytest.mark.parametrize("rank", [0, 1])  # 0 waits for the others at its coordinator; 1 for a coordinator
def test_a_process_whose_peers_never_come_stops_after_the_peer_timeout(tmp_path, small_npz_dir, rank):
    with processes(tmp_path) as procs:
        p = _train(procs, "alone", _free_port(), rank, tmp_path / f"out{rank}", small_npz_dir, "--peer-timeout", "10")
        (code,) = procs.wait([p], timeout=600)
        out = procs.output(p)
    assert code == 3, out[-3000:]
    assert f"process {rank} of 2 could not join the run at 127.0.0.1:" in out and "--peer-timeout (10 s)" in out
    assert "Terminating process" not in out  # the tool's error came first, not JAX's abort
    assert not (tmp_path / f"out{rank}").exists()
