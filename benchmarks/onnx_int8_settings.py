"""Evidence for the ONNX INT8 defaults on *this* CPU: every activation type x weight range, benched.

Exports one float model to ONNX INT8 four times (activations uint8 / int8, weights 8-bit / 7-bit
``reduce_range``), each calibrated on the same CIFAR-10 training images through the real converter
pipeline, then benches them in one `run_bench` call against the float model and the ONNX FP32 file:
top-1 change, agreement with the float model, batch-1 latency and its ratio to ONNX FP32. Prints the
CPU model and flags first: which setting is both fast and accurate depends on them (VNNI or not,
x86 or arm64; see docs/export.md), and the tool's automatic choice is printed beside the table.

    .venv/bin/python benchmarks/onnx_int8_settings.py --model demo/train/model.keras \
        --data ../shared/data/cifar10

A trained model is needed for the accuracy figures to mean anything (random weights predict one
class); ``make demo`` leaves one in demo/train/model.keras.
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

VARIANTS = (("uint8", False), ("uint8", True), ("int8", False), ("int8", True))  # activations, reduce_range


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, required=True, help="a trained .keras model (e.g. demo/train/model.keras)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--limit", type=int, default=None, help="test images for the accuracy pass (default: all)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--calib", type=int, default=300, help="calibration images (training split)")
    args = ap.parse_args()

    from resnet_deploy.bench.options import BenchOptions
    from resnet_deploy.bench import run_bench
    from resnet_deploy.config import Format
    from resnet_deploy.converters.onnx_rules import default_onnx_activation_type, default_onnx_reduce_range
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model
    from resnet_deploy.data import load_cifar10
    from resnet_deploy.envinfo import machine_banner

    print(machine_banner())
    print(f"automatic choice here: activations {default_onnx_activation_type()}, "
          f"reduce_range {default_onnx_reduce_range()}")
    data = load_cifar10(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        files = [args.model]
        t0 = time.perf_counter()
        for act, rr in VARIANTS:
            out = Path(tmp) / f"{act}_{'w7' if rr else 'w8'}"
            opts = ExportOptions(formats=(Format.ONNX,), int8=True, out_dir=out, calib_samples=args.calib,
                                 onnx_activation_type=act, onnx_reduce_range=rr)
            arts = export_model(args.model, opts, data=data)
            files += [a.path for a in arts if a.precision == "int8"]
            if len(files) == 2:  # one FP32 baseline is enough: every variant is measured against it
                files += [a.path for a in arts if a.precision == "fp32"]
        print(f"export: {len(VARIANTS)} INT8 variants in {time.perf_counter() - t0:.0f} s")
        opts = BenchOptions(threads=args.threads, limit=args.limit, runs=args.runs, max_time_s=20,
                            baselines=False)
        report = run_bench(files, opts, data=data)
        print_table(report, args.threads)  # inside: it reads the manifests beside the files


def print_table(report, threads: int) -> None:
    from resnet_deploy.artifact import read_manifest

    fp32 = next((r for r in report.results if r.ok and r.precision == "fp32" and r.format == "onnx"), None)
    base = fp32.p50_ms(1) if fp32 else None
    print(f"\n{threads} thread(s); accuracy on {report.data.get('images')} test images; latency batch 1, p50")
    print(f"{'file':<30}{'scheme':<12}{'top-1 %':>9}{'Δ pp':>8}{'agree %':>9}{'p50 ms':>9}{'x FP32':>8}")
    for r in report.results:
        path = Path(r.path)
        name = path.name if r.format == "keras" else f"{path.parent.name}/{path.name}"
        if not r.ok:
            print(f"{name:<30}ERROR {r.error['message'].splitlines()[0]}")
            continue
        m = read_manifest(path) if r.format == "onnx" else None
        cal = (m.calibration if m else None) or {}
        scheme = cal.get("scheme", r.precision) + (" w7" if cal.get("reduce_range") else "")
        vf = r.vs_float or {}
        change, agree, p50 = vf.get("change_pp"), vf.get("agreement"), r.p50_ms(1) or float("nan")
        ratio = "base" if r is fp32 else f"{base / p50:.2f}x" if base and r.format == "onnx" else "-"
        print(f"{name:<30}{scheme:<12}{100 * r.accuracy['top1']:>9.2f}"
              f"{(f'{change:+.2f}' if change is not None else 'ref'):>8}"
              f"{(f'{100 * agree:.2f}' if agree is not None else 'ref'):>9}{p50:>9.3f}{ratio:>8}")


if __name__ == "__main__":
    main()
