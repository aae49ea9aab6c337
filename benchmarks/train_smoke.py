"""CPU smoke check that `resnet-deploy train` learns: a small ResNet, a short run, real CIFAR-10.

    .venv/bin/python benchmarks/train_smoke.py --data ../shared/data/cifar10
    KERAS_BACKEND=jax .venv/bin/python benchmarks/train_smoke.py --data ../shared/data/cifar10

Trains --arch (default resnet8 at width 0.5, 19 k parameters) with the full recipe (SGD Nesterov,
warm-up + cosine, label smoothing, L2, pad-crop-flip) on the first --train images for --epochs,
then reports the saved model's test accuracy on the first --test test images against chance (10 %).
Exits 1 when the accuracy is below --min-accuracy. Prints the machine and library versions.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet8")
    p.add_argument("--width", type=float, default=0.5)
    p.add_argument("--epochs", type=int, default=8)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--train", type=int, default=10000, help="training images (the first N)")
    p.add_argument("--test", type=int, default=2000, help="test images (the first N)")
    p.add_argument("--min-accuracy", type=float, default=0.35)
    p.add_argument("--out", default=None, help="keep the run here (default: a temporary folder)")
    p.add_argument("--data", default=None)
    a = p.parse_args(argv)

    from resnet_deploy.envinfo import library_versions, machine_info
    from resnet_deploy.training.recipe import TrainConfig
    from resnet_deploy.training.trainer import train_model

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(a.out) if a.out else Path(tmp) / "run"
        cfg = TrainConfig(arch=a.arch, width=a.width, epochs=a.epochs, batch_size=a.batch_size, warmup_epochs=1,
                          limit_train=a.train, limit_test=a.test, precision="float32", out_dir=out, force=True)
        t0 = time.perf_counter()
        result = train_model(cfg, data=a.data)
        seconds = time.perf_counter() - t0
    m = result.metadata
    verdict = "PASS" if result.test_accuracy >= a.min_accuracy else "FAIL"
    print(f"\n{verdict}: {a.arch} width {a.width:g} ({m['params']:,} params), {a.epochs} epochs on {m['train_images']:,} "
          f"images: test accuracy {100 * result.test_accuracy:.1f}% on {m['test_images']:,} images "
          f"(chance 10%, threshold {100 * a.min_accuracy:.0f}%), {seconds:.0f} s in all")
    machine = machine_info()
    print(f"backend {m['device']['backend']}; {m['device']['description']}; {machine['cpu_count']} cores, "
          f"python {machine['python']}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in library_versions().items()))
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
