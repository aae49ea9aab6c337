"""Training throughput (images/s) of Keras `fit` with the trainer's own model, optimizer and input pipeline.

    .venv/bin/python benchmarks/train_throughput.py                          # ResNet20 and ResNet34, this CPU
    KERAS_BACKEND=jax python benchmarks/train_throughput.py --batch-size 512 # on a GPU: mixed precision (auto)
    .venv/bin/python benchmarks/train_throughput.py --archs resnet20 --steps 30 --json out.json

For each architecture: build and compile exactly as `resnet-deploy train` does (SGD Nesterov, warm-up
+ cosine schedule, label smoothing, L2), feed augmented batches of real CIFAR-10 images (random
pixels when the data is not found) through `keras.utils.PyDataset`, run --warmup steps (compilation)
in a first `fit`, then time --steps steps in a second `fit` (which ends by syncing the device state,
so asynchronous dispatch is inside the timing). Prints images/s with the backend, device, precision
and batch size, then the machine and library versions.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _images(data, n: int):
    import numpy as np

    try:
        from resnet_deploy.data import load_cifar10

        train = load_cifar10(data, splits=("train",)).train
        return train.x[:n], train.y[:n], "CIFAR-10 training images"
    except Exception as exc:  # benchmark still runs without the data
        rng = np.random.default_rng(0)
        print(f"(no CIFAR-10: {str(exc).splitlines()[0]}; using random pixels)")
        return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, n), "random pixels"


def measure(arch: str, width: float, batch_size: int, steps: int, warmup: int, precision: str, data, workers: int):
    import keras

    from resnet_deploy.training.batches import TrainBatches
    from resnet_deploy.training.devices import probe_devices, resolve_precision
    from resnet_deploy.training.recipe import TrainConfig
    from resnet_deploy.training.trainer import _compile

    dev = probe_devices()
    policy = resolve_precision(precision, dev)
    cfg = TrainConfig(arch=arch, width=width, batch_size=batch_size, epochs=1, warmup_epochs=0, precision=policy)
    x, y, source = _images(data, batch_size * max(steps, warmup))
    previous = keras.config.dtype_policy()
    try:
        keras.config.set_dtype_policy(policy)
        keras.utils.set_random_seed(0)
        model, student = _compile(cfg, policy, steps_per_epoch=steps)
        batches = TrainBatches(x, y, batch_size, seed=0, workers=workers)
        model.fit(batches, epochs=1, steps_per_epoch=warmup, verbose=0)
        t0 = time.perf_counter()
        model.fit(batches, epochs=1, steps_per_epoch=steps, verbose=0)
        seconds = time.perf_counter() - t0
    finally:
        keras.config.set_dtype_policy(previous)
    return {"arch": arch, "width": width, "params": int(student.count_params()), "backend": dev.backend,
            "device": dev.describe(), "precision": policy, "batch_size": batch_size, "steps": steps,
            "seconds": round(seconds, 3), "images_per_s": round(steps * batch_size / seconds, 1), "data": source}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--archs", default="resnet20,resnet34")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, default=10, help="timed steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compilation)")
    p.add_argument("--precision", default="auto")
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--data", default=None)
    p.add_argument("--json", default=None, help="also write the figures here")
    p.add_argument("--onednn", choices=("train", "on", "off"), default="train",
                   help="TensorFlow's oneDNN kernels: as `resnet-deploy train` sets them (train: on for x86 CPUs "
                        "unless TF_ENABLE_ONEDNN_OPTS is set), or forced on/off; compare them in two runs")
    a = p.parse_args(argv)
    if a.onednn != "train":
        os.environ["TF_ENABLE_ONEDNN_OPTS"] = "1" if a.onednn == "on" else "0"
    from resnet_deploy.training.devices import enable_tf_onednn

    onednn = enable_tf_onednn()  # before TensorFlow is imported, as the train command does

    from resnet_deploy.envinfo import library_versions, machine_info

    rows = []
    for arch in a.archs.split(","):
        r = measure(arch.strip(), a.width, a.batch_size, a.steps, a.warmup, a.precision, a.data, a.workers)
        rows.append(r)
        print(f"{r['arch']:>10} ({r['params'] / 1e6:.2f} M params)  {r['images_per_s']:>9,.1f} images/s  "
              f"backend {r['backend']}, {r['precision']}, batch {r['batch_size']}, {r['steps']} steps in {r['seconds']} s",
              flush=True)
    machine, versions = machine_info(), library_versions()
    print(f"device: {rows[0]['device']}; TF_ENABLE_ONEDNN_OPTS={onednn}")
    print(f"machine: {machine['cpu']} ({machine['cpu_count']} cores; {', '.join(machine['cpu_flags'])}), "
          f"python {machine['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    if a.json:
        with open(a.json, "w") as fh:
            json.dump({"results": rows, "machine": machine, "versions": versions, "tf_enable_onednn_opts": onednn},
                      fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
