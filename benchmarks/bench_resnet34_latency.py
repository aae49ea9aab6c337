"""ResNet34 latency through `resnet-deploy bench`: TFLite FP32/INT8 and ONNX FP32/INT8 at 1 and 2 threads.

Builds a random-weight ResNet34 (or takes ``--model``), exports it with the real converter pipeline
(calibrated on CIFAR-10 training images), and benches every artifact with the library entry point
``run_bench`` (each file in its own child process). Prints the CPU model and flags, the library
versions and, per thread count, batch-1 p50 latency and the speed-up against the FP32 artifact of the
same runtime. Sanity check (DESIGN.md): with AVX-512 VNNI, TFLite INT8 is about 3 to 5x TFLite FP32.

    .venv/bin/python benchmarks/bench_resnet34_latency.py --data /work/shared/data/cifar10
    .venv/bin/python benchmarks/bench_resnet34_latency.py --arch resnet8 --width 0.25 --limit 200  # smoke

Random weights make the accuracy figures meaningless; the accuracy pass is limited to ``--limit``
images so that the run stays short (a full 10,000-image pass is timed and printed, see below).
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import add_model_args, model_or_random  # noqa: E402  (benchmarks/common.py, beside this script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--limit", type=int, default=1000, help="test images for the accuracy pass")
    ap.add_argument("--runs", type=int, default=50)
    args = ap.parse_args()

    from resnet_deploy.bench.options import BenchOptions
    from resnet_deploy.bench import run_bench
    from resnet_deploy.data import load_cifar10
    from resnet_deploy.envinfo import machine_banner

    print(machine_banner())
    data = load_cifar10(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        artifacts = export(args, out, data)
        for threads in args.threads:
            opts = BenchOptions(threads=threads, limit=args.limit, runs=args.runs, max_time_s=20, large_batch=32)
            t0 = time.perf_counter()
            report = run_bench([a for a in artifacts if a.suffix != ".keras"], opts, data=data)
            print_table(report, threads, time.perf_counter() - t0)
        full_pass(artifacts, data)


def export(args, out: Path, data) -> list[Path]:
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model

    model_path = model_or_random(args, out)
    t0 = time.perf_counter()
    arts = export_model(model_path, ExportOptions(int8=True, out_dir=out, force=True, calib_samples=args.calib),
                        data=data)
    print(f"export: {len(arts)} artifacts in {time.perf_counter() - t0:.1f} s")
    return [model_path] + [a.path for a in arts]


def print_table(report, threads: int, seconds: float) -> None:
    print(f"\n{threads} thread(s) (bench run {seconds:.0f} s): batch-1 p50 ms, speed-up vs same-runtime FP32, "
          f"batch-32 images/s")
    print(f"{'artifact':<28}{'p50 ms':>10}{'p99 ms':>10}{'x FP32':>9}{'x Keras':>9}{'img/s b32':>11}{'size MB':>9}  notes")
    for r in report.results:
        if not r.ok:
            print(f"{r.label:<28}ERROR {r.error['message'].splitlines()[0]}")
            continue
        b1, b32 = r.latency.get("1", {}), r.latency.get("32", {})
        sp = (r.vs_baseline or {}).get("speedup", {}).get("1")
        sk = (r.vs_float or {}).get("speedup", {}).get("1")
        lo_hi = (r.vs_baseline or {}).get("speedup_interval", {}).get("1")
        noisy = ("noisy " if b1.get("noisy") else "") + (f"x FP32 in [{lo_hi[0]:.2f}, {lo_hi[1]:.2f}]" if lo_hi else "")
        print(f"{r.label:<28}{b1.get('p50_ms', float('nan')):>10.2f}{b1.get('p99_ms', float('nan')):>10.2f}"
              f"{(f'{sp:.2f}x' if sp else '-'):>9}{(f'{sk:.2f}x' if sk else '-'):>9}"
              f"{b32.get('throughput_ips', float('nan')):>11.0f}{r.size_bytes / 1e6:>9.2f}  {noisy}")


def full_pass(artifacts: list[Path], data) -> None:
    """The issue's bar: a full 10,000-image accuracy pass of the INT8 TFLite model, well under a minute."""
    from resnet_deploy.runtimes import open_runner

    int8 = next((a for a in artifacts if a.name.endswith("_int8.tflite")), None)
    if int8 is None:
        return
    x = data.test.x
    with open_runner(int8, threads=os.cpu_count(), batch_size=256) as r:
        t0 = time.perf_counter()
        r.predict(x)
        dt = time.perf_counter() - t0
    print(f"\nfull accuracy pass, {int8.name}, {len(x):,} images, batch 256, {os.cpu_count()} threads: "
          f"{dt:.1f} s ({len(x) / dt:,.0f} images/s)")


if __name__ == "__main__":
    main()
