"""Export time and parity of every artifact against its float model, with the machine and versions.

    .venv/bin/python benchmarks/export_parity.py runs/x/model.keras --data ../shared/data/cifar10
    .venv/bin/python benchmarks/export_parity.py --quick-train resnet20 --width 0.5 --epochs 3 \\
        --data ../shared/data/cifar10            # no trained model at hand: train a small one first

Writes every artifact (TFLite FP32/FP16/dynamic/INT8, ONNX FP32/FP16/INT8, optionally QAT) into a
temporary folder (or --out), prints one row per artifact: size, conversion and validation seconds,
max/mean |logit diff| and top-1 agreement against the float model, top-1 accuracy of both on the
validation images (the first --validate-samples of the test split), then the machine and library
versions. --json saves the same figures.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def quick_train(arch: str, width: float, epochs: int, samples: int, data, out: Path) -> Path:
    """A small model trained for a few epochs on a class-balanced training subset (Adam, no augmentation)."""
    import keras

    from resnet_deploy.data import class_balanced_indices, load_cifar10
    from resnet_deploy.models.builder import build_model
    from resnet_deploy.models.io import base_metadata, save_model

    train = load_cifar10(data, splits=("train",)).train
    idx = class_balanced_indices(train.y, min(samples, len(train)), seed=0)
    keras.utils.set_random_seed(0)
    model = build_model(arch, width=width)
    model.compile(keras.optimizers.Adam(2e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    t0 = time.perf_counter()
    hist = model.fit(train.x[idx].astype("float32"), train.y[idx], epochs=epochs, batch_size=128, verbose=0)
    print(f"quick-train {arch} x{width:g}: {epochs} epochs on {len(idx)} images in {time.perf_counter() - t0:.0f} s, "
          f"train accuracy {hist.history['accuracy'][-1]:.3f}")
    path = out / f"{arch}_w{width:g}.keras"
    save_model(model, path, base_metadata(arch, width=width), force=True)
    return path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, help="a .keras model (from train)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--out", type=Path, default=None, help="artifact folder (default: a temporary one)")
    ap.add_argument("--quick-train", metavar="ARCH", help="train ARCH briefly instead of reading MODEL")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--train-samples", type=int, default=10000)
    ap.add_argument("--calib-samples", type=int, default=300)
    ap.add_argument("--validate-samples", type=int, default=1000)
    ap.add_argument("--qat-epochs", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if not args.model and not args.quick_train:
        ap.error("give MODEL or --quick-train ARCH")

    from resnet_deploy.converters import ExportOptions, export_model
    from resnet_deploy.envinfo import library_versions, machine_info

    with tempfile.TemporaryDirectory(prefix="rd-export-bench-") as tmp:
        out = args.out or Path(tmp)
        out.mkdir(parents=True, exist_ok=True)
        model = quick_train(args.quick_train, args.width, args.epochs, args.train_samples, args.data, out) \
            if args.quick_train else args.model
        opts = ExportOptions(fp16=True, int8=True, dynamic_int8=True, qat_epochs=args.qat_epochs, out_dir=out,
                             force=True, calib_samples=args.calib_samples, validate_samples=args.validate_samples)
        t0 = time.perf_counter()
        arts = export_model(model, opts, data=args.data, progress=lambda m: print("  " + m, file=sys.stderr))
        total = time.perf_counter() - t0
        rows = [_row(a) for a in arts]
    _print(rows, total, model)
    info = {"machine": machine_info(), "libraries": library_versions()}
    print(f"machine: {info['machine']['cpu']} ({info['machine']['cpu_count']} cores, "
          f"flags {' '.join(info['machine']['cpu_flags'])}), {info['machine']['os']}")
    print("libraries: " + ", ".join(f"{k} {v}" for k, v in info["libraries"].items()))
    if args.json:
        args.json.write_text(json.dumps({"model": str(model), "total_s": total, "rows": rows, **info}, indent=2))
    return 0


def _row(a) -> dict:
    m, v = a.manifest, a.manifest.validation
    return {"artifact": a.path.name, "size_mb": m.size_bytes / 1e6, "convert_s": m.options["timing_s"]["convert"],
            "validate_s": m.options["timing_s"]["validate"], "max_abs_logit_diff": v["max_abs_logit_diff"],
            "mean_abs_logit_diff": v["mean_abs_logit_diff"], "top1_agreement": v["top1_agreement"],
            "top1_accuracy": v["top1_accuracy"], "float_top1_accuracy": v["float_top1_accuracy"],
            "samples": v["samples"], "integer_compute_ops": m.options["op_report"].get("integer_compute_ops")}


def _print(rows, total, model) -> None:
    print(f"\nmodel {model}: {len(rows)} artifacts in {total:.1f} s; parity on test[:{rows[0]['samples']}], "
          f"float top-1 {rows[0]['float_top1_accuracy']:.2%}")
    head = f"{'artifact':32} {'MB':>7} {'conv s':>7} {'val s':>6} {'max|d|':>8} {'mean|d|':>8} {'agree':>7} {'top-1':>7} {'int ops':>7}"
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['artifact']:32} {r['size_mb']:7.3f} {r['convert_s']:7.1f} {r['validate_s']:6.1f} "
              f"{r['max_abs_logit_diff']:8.3g} {r['mean_abs_logit_diff']:8.3g} {r['top1_agreement']:7.2%} "
              f"{r['top1_accuracy']:7.2%} {r['integer_compute_ops']:7d}")


if __name__ == "__main__":
    sys.exit(main())
