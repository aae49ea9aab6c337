"""Training on slow machines: checkpoints inside an epoch, an open change of the epoch budget, the
precision `auto` chooses on CPUs, and TensorFlow's oneDNN kernels on x86 CPUs that leave them off."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from resnet_deploy.errors import TrainError
from resnet_deploy.training.devices import DeviceInfo, choose_precision, resolve_precision
from resnet_deploy.training.recipe import TrainConfig, lr_at

CPU = DeviceInfo("tensorflow", "cpu", ("/device:CPU:0",))
# 320 images at batch 32: 10 steps an epoch, 2 epochs
TINY = dict(arch="resnet8", width=0.25, batch_size=32, epochs=2, warmup_epochs=1.0, limit_train=320, limit_test=60,
            precision="float32", verbose=False)


def _weights(path):
    from resnet_deploy.models.io import load_model

    return [np.asarray(w) for w in load_model(path).get_weights()]


class Stop(KeyboardInterrupt):
    """What Ctrl-C raises inside fit, raised by the log line of a chosen checkpoint."""


def _stop_at(line: str, seen: list):
    def log(msg: str):
        seen.append(msg)
        if msg.startswith(line):
            raise Stop(msg)
    return log


def test_resume_inside_an_epoch_trains_the_batches_the_uninterrupted_run_would(tmp_path, synthetic_cifar):
    from resnet_deploy.training.checkpoint import read_state
    from resnet_deploy.training.trainer import train_model

    whole = train_model(TrainConfig(**TINY, out_dir=tmp_path / "whole"), data=synthetic_cifar, log=lambda _: None)

    out = tmp_path / "stopped"
    seen: list[str] = []
    every_batch = 1e-9  # minutes: a checkpoint at every batch after the first of each epoch
    with pytest.raises(KeyboardInterrupt):
        train_model(TrainConfig(**TINY, out_dir=out, checkpoint_every=every_batch), data=synthetic_cifar,
                    log=_stop_at("checkpoint inside epoch 2: batch 6/10", seen))
    state = read_state(out)
    assert (state.epoch, state.step, state.iterations) == (1, 6, 16)  # 10 steps of epoch 1, 6 of epoch 2
    assert any(m.startswith("checkpoint inside epoch 1: batch 9/10") for m in seen)

    lines: list[str] = []
    resumed = train_model(TrainConfig(**TINY, out_dir=out, resume=True), data=synthetic_cifar, log=lines.append)
    assert any("resuming after epoch 1/2, batch 6/10 of epoch 2 (optimizer step 16" in m for m in lines), lines
    assert [r["iterations"] for r in resumed.history] == [r["iterations"] for r in whole.history] == [10, 20]
    assert resumed.history[1]["from_step"] == 6 and "from_step" not in resumed.history[0]
    for a, b in zip(_weights(resumed.model_path), _weights(whole.model_path)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    # a resume that started the tail at another batch would have trained other images: it must differ
    assert read_state(out).step == 0
    assert resumed.metadata["epochs"] == 2 and resumed.metadata["budget_changes"] == []


def test_tail_of_an_epoch_serves_the_same_batches_as_the_whole_epoch():
    from resnet_deploy.training.batches import EpochTail, TrainBatches

    rng = np.random.default_rng(0)
    x, y = rng.integers(0, 256, (100, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, 100)
    whole = TrainBatches(x, y, 10, seed=3, cutout=8, epoch=4)
    tail = EpochTail(whole, epoch=4, start=7)
    assert tail.num_batches == 3
    for i in range(3):
        for a, b in zip(tail[i], whole[7 + i]):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError):
        EpochTail(whole, epoch=4, start=10)


def test_resume_can_change_the_epoch_budget_openly(tmp_path, synthetic_cifar):
    from resnet_deploy.training.trainer import train_model

    out = tmp_path / "run"
    first = train_model(TrainConfig(**TINY, out_dir=out), data=synthetic_cifar, log=lambda _: None)
    assert first.metadata["epochs"] == 2
    with pytest.raises(TrainError, match="fewer than the run has trained"):
        train_model(TrainConfig(**(TINY | {"epochs": 1}), out_dir=out, resume=True), data=synthetic_cifar)
    with pytest.raises(TrainError, match="would change the recipe"):  # other options still may not change
        train_model(TrainConfig(**(TINY | {"epochs": 3, "cutout": 4}), out_dir=out, resume=True), data=synthetic_cifar)
    lines: list[str] = []
    more = train_model(TrainConfig(**(TINY | {"epochs": 3}), out_dir=out, resume=True), data=synthetic_cifar,
                       log=lines.append)
    (change,) = more.metadata["budget_changes"]
    assert (change["after_epoch"], change["epochs_before"], change["epochs_after"], change["optimizer_step"]) == (2, 2, 3, 20)
    # the learning rates of both schedules at that step, computed here from the formula
    assert change["lr_before"] == pytest.approx(lr_at(20, 0.1 * 32 / 128, 20, 10, "cosine"))
    assert change["lr_after"] == pytest.approx(lr_at(20, 0.1 * 32 / 128, 30, 10, "cosine"))
    assert any("budget changed by --resume --epochs: 2 -> 3" in m for m in lines)
    assert more.metadata["epochs"] == 3 and len(more.history) == 3


def test_auto_precision_on_cpus():
    amx = choose_precision("auto", CPU, flags=["avx512f", "avx512_bf16", "amx_bf16"])
    assert amx.policy == "mixed_bfloat16" and "AMX" in amx.reason and amx.measured is None
    plain = choose_precision("auto", CPU, flags=["avx2", "fma"])
    assert plain.policy == "float32" and "without bf16" in plain.reason

    def timings(f32, bf16):
        return lambda: {"float32": f32, "mixed_bfloat16": bf16}

    faster = choose_precision("auto", CPU, flags=["avx512_bf16"], measure=timings(1.0, 0.5))
    assert faster.policy == "mixed_bfloat16" and "2.00x" in faster.reason
    assert faster.measured == {"float32": 1.0, "mixed_bfloat16": 0.5}
    slower = choose_precision("auto", CPU, flags=["avx512_bf16"], measure=timings(1.0, 1.2))
    assert slower.policy == "float32" and "0.83x" in slower.reason
    barely = choose_precision("auto", CPU, flags=["avx512_bf16"], measure=timings(1.0, 0.95))
    assert barely.policy == "float32"  # 1.05x is inside the noise margin
    asked = choose_precision("mixed_bfloat16", CPU, flags=[])
    assert asked.policy == "mixed_bfloat16" and asked.reason == "asked for with --precision"
    with pytest.raises(TrainError, match="mixed_float16 needs a GPU"):
        resolve_precision("mixed_float16", CPU, flags=["amx_bf16"])
    assert json.loads(json.dumps(faster.to_dict()))["policy"] == "mixed_bfloat16"


def test_bf16_probe_times_both_policies_here():
    from resnet_deploy.training.devices import measure_bf16_speed

    seconds = measure_bf16_speed(steps=1, batch=4)
    assert set(seconds) == {"float32", "mixed_bfloat16"} and all(v > 0 for v in seconds.values())


@pytest.mark.parametrize("env, expected", [({}, "1"), ({"TF_ENABLE_ONEDNN_OPTS": "0"}, "0"),
                                           ({"KERAS_BACKEND": "jax"}, None)])
def test_onednn_is_turned_on_for_tensorflow_training_on_x86(env, expected):
    import platform

    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the switch applies to x86 CPUs only")
    base = {k: v for k, v in os.environ.items() if k not in ("TF_ENABLE_ONEDNN_OPTS", "KERAS_BACKEND")}
    code = ("import os, sys; from resnet_deploy.training.devices import enable_tf_onednn; r = enable_tf_onednn(); "
            "print(repr(r), os.environ.get('TF_ENABLE_ONEDNN_OPTS'), 'tensorflow' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], env=base | env, capture_output=True, text=True, check=True)
    value, env_value, imported = out.stdout.split()
    assert value == repr(expected) and imported == "False"  # set before TensorFlow is imported
    if env.get("KERAS_BACKEND") != "jax":
        assert env_value == expected


def test_checkpoint_interval_is_validated():
    with pytest.raises(TrainError, match="--checkpoint-every"):
        TrainConfig(**TINY, checkpoint_every=-1)
    with pytest.raises(TrainError, match="--checkpoint-every"):
        TrainConfig(**TINY, checkpoint_every=float("nan"))
    assert "checkpoint_every" not in TrainConfig(**TINY, checkpoint_every=10).recipe()  # not part of what is learned
