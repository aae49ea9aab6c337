"""Evidence for the ONNX INT8 targets on *this* CPU: the scheme of every ``--target``, benched.

Exports one float model to ONNX INT8 once per target (x86-vnni: u8s8, x86-avx2: u8s8-rr7 with 7-bit
``reduce_range`` weights, arm64: s8s8), each calibrated on the same CIFAR-10 training images through the
real converter pipeline, then benches them in one `run_bench` call against the float model and the ONNX FP32 file:
top-1 change, agreement with the float model, batch-1 latency and its ratio to ONNX FP32. Prints the
CPU model and flags first: which setting is both fast and accurate depends on them (VNNI or not,
x86 or arm64; see docs/export.md), and what ``--target host`` resolves to here is printed beside the
table. A file whose scheme saturates on this CPU is benched anyway (``--allow-saturating`` where bench
has it): showing that damage is the point.

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

TARGETS = ("x86-vnni", "x86-avx2", "arm64")  # u8s8, u8s8-rr7, s8s8 (converters/onnx_rules.py)


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
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model
    from resnet_deploy.data import load_cifar10
    from resnet_deploy.envinfo import machine_banner

    print(machine_banner())
    print(ExportOptions(int8=True).onnx_int8().describe())
    data = load_cifar10(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        files = [args.model]
        t0 = time.perf_counter()
        for target in TARGETS:
            out = Path(tmp) / target
            opts = ExportOptions(formats=(Format.ONNX,), int8=True, out_dir=out, calib_samples=args.calib,
                                 int8_target=target)
            arts = export_model(args.model, opts, data=data)
            files += [a.path for a in arts if a.precision == "int8"]
            if len(files) == 2:  # one FP32 baseline is enough: every variant is measured against it
                files += [a.path for a in arts if a.precision == "fp32"]
        print(f"export: {len(TARGETS)} INT8 targets in {time.perf_counter() - t0:.0f} s")
        kw = dict(threads=args.threads, limit=args.limit, runs=args.runs, max_time_s=20, baselines=False)
        if "allow_saturating" in BenchOptions.__dataclass_fields__:  # bench refuses saturating files by default
            kw["allow_saturating"] = True
        opts = BenchOptions(**kw)
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
        scheme = cal.get("scheme", r.precision)
        vf = r.vs_float or {}
        change, agree, p50 = vf.get("change_pp"), vf.get("agreement"), r.p50_ms(1) or float("nan")
        ratio = "base" if r is fp32 else f"{base / p50:.2f}x" if base and r.format == "onnx" else "-"
        print(f"{name:<30}{scheme:<12}{100 * r.accuracy['top1']:>9.2f}"
              f"{(f'{change:+.2f}' if change is not None else 'ref'):>8}"
              f"{(f'{100 * agree:.2f}' if agree is not None else 'ref'):>9}{p50:>9.3f}{ratio:>8}")


if __name__ == "__main__":
    main()
