"""Does `resnet-deploy bench` tell the truth, and at what cost? (issue #11) Two figures, with the machine:

1. **Speed-up.** bench's batch-1 TFLite INT8-over-FP32 speed-up (``--threads 1``, the FP32 file added
   as its baseline, interleaved rounds) beside a bare ``ai_edge_litert`` Interpreter loop over the same
   two files in the same run (alternating blocks, ratio of medians per round, median over rounds) and
   beside `litert-benchmark` (LiteRT's own binary, one file after the other). Bar: within 10 % of the
   bare loop.
2. **Cost.** A second ``bench INT8 --no-latency`` with the other defaults over the test split (the
   first fills the float model's logits cache) against a bare LiteRT loop over the same images, at
   the same threads and batch size. Bar: at most 1.2x the bare loop (it was 9.3x before the cache,
   the graph-mode float pass and the baseline without an accuracy pass).

Builds a random-weight ResNet34 (or takes ``--model``) and exports TFLite FP32 and INT8 with the real
pipeline. Run it on a quiet machine:

    .venv/bin/python benchmarks/bench_trust.py --data /work/shared/data/cifar10
    .venv/bin/python benchmarks/bench_trust.py --arch resnet8 --width 0.25 --limit 500 --rounds 4  # smoke
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from common import add_model_args, model_or_random  # noqa: E402  (benchmarks/common.py, beside this script)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--limit", type=int, default=None, help="test images of part 2 (default: the whole split)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds of the bare interleaved loop")
    ap.add_argument("--runs", type=int, default=50, help="runs per litert-benchmark call and per bare block")
    args = ap.parse_args()

    from resnet_deploy.data import load_cifar10
    from resnet_deploy.envinfo import machine_banner

    print(machine_banner())
    data = load_cifar10(args.data)
    with tempfile.TemporaryDirectory() as tmp:
        out = args.out or Path(tmp)
        fp32, int8 = export(args, out, data)
        speedup_figures(fp32, int8, args)
        cost_figures(int8, data, args, Path(tmp) / "cache")


def export(args, out: Path, data) -> tuple[Path, Path]:
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model

    model_path = model_or_random(args, out)
    arts = export_model(model_path, ExportOptions(formats=("tflite",), int8=True, out_dir=out, force=True,
                                                  calib_samples=args.calib), data=data)
    paths = {a.precision: a.path for a in arts}
    return paths["fp32"], paths["int8"]


# 1. Speed-up ------------------------------------------------------------------------------------------
def speedup_figures(fp32: Path, int8: Path, args) -> None:
    from resnet_deploy.bench import run_bench
    from resnet_deploy.bench.options import BenchOptions

    t0 = time.perf_counter()
    report = run_bench([int8], BenchOptions(threads=1, accuracy=False, large_batch=1))
    q = report.result(int8.name)
    d = q.vs_baseline["speedup_detail"]["1"]
    ours = d["value"]
    print(f"\n1. batch-1 speed-up of {int8.name} over {fp32.name}, 1 thread")
    print(f"   bench: {ours:.2f}x [{d['interval'][0]:.2f}, {d['interval'][1]:.2f}] over {d['rounds']} rounds"
          f"{' (marked noisy)' if d['noisy'] else ''}; p50 {report.result(fp32.name).p50_ms():.2f} ms / "
          f"{q.p50_ms():.2f} ms; bench took {time.perf_counter() - t0:.0f} s")
    bare, bare_ms = bare_interleaved(fp32, int8, args.rounds, args.runs)
    print(f"   bare Interpreter loop, interleaved: {bare:.2f}x (median {bare_ms[0]:.2f} ms / {bare_ms[1]:.2f} ms); "
          f"bench / bare = {ours / bare:.3f} ({'within' if abs(ours / bare - 1) <= 0.10 else 'OUTSIDE'} 10 %)")
    tool = [litert_benchmark(p, args.runs) for p in (fp32, int8)]
    if None not in tool:
        print(f"   litert-benchmark: {tool[0] / tool[1]:.2f}x (median {tool[0]:.2f} ms / {tool[1]:.2f} ms)")


def bare_interleaved(fp32: Path, int8: Path, rounds: int, runs: int) -> tuple[float, tuple[float, float]]:
    """Two bare Interpreters at 1 thread, alternating blocks of ``runs`` calls; the median over rounds of
    the per-round ratio of medians (the same estimator as bench, computed here without bench's code)."""
    import numpy as np

    calls = [_bare_call(p, 1) for p in (fp32, int8)]
    for c in calls:
        for _ in range(10):
            c()
    ratios, med = [], [[], []]
    for r in range(rounds):
        order = (0, 1) if r % 2 == 0 else (1, 0)
        block = {}
        for i in order:
            times = []
            for _ in range(runs):
                t0 = time.perf_counter()
                calls[i]()
                times.append(time.perf_counter() - t0)
            block[i] = float(np.median(times))
            med[i].append(block[i])
        ratios.append(block[0] / block[1])
    return float(np.median(ratios)), (1e3 * float(np.median(med[0])), 1e3 * float(np.median(med[1])))


def _bare_call(path: Path, threads: int):
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    it.allocate_tensors()
    d = it.get_input_details()[0]
    x = np.random.default_rng(0).integers(0, 256, d["shape"]).astype(d["dtype"]) \
        if np.issubdtype(d["dtype"], np.integer) else np.random.default_rng(0).uniform(0, 255, d["shape"]).astype(
            d["dtype"])
    return lambda: (it.set_tensor(d["index"], x), it.invoke())


def litert_benchmark(path: Path, runs: int) -> float | None:
    """Median ms of LiteRT's own benchmark binary at 1 thread; None when it is not installed."""
    exe = shutil.which("litert-benchmark") or str(Path(os.sys.executable).parent / "litert-benchmark")
    if not Path(exe).exists():
        print("   litert-benchmark not found (pip install ai-edge-litert)")
        return None
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "r.json"
        subprocess.run([exe, "--model", str(path), "--num_threads", "1", "--num_runs", str(runs), "--warmup_runs",
                        "10", "--result_json", str(out)], check=True, capture_output=True)
        return float(json.loads(out.read_text())["latency"]["median_ms"])


# 2. Cost ----------------------------------------------------------------------------------------------
def cost_figures(int8: Path, data, args, cache: Path) -> None:
    from resnet_deploy.bench import run_bench
    from resnet_deploy.bench.options import BenchOptions

    os.environ["RESNET_DEPLOY_CACHE"] = str(cache)  # a fresh cache: the first run pays the float pass
    opts = BenchOptions(latency=False, limit=args.limit)
    walls = []
    for _ in range(2):
        t0 = time.perf_counter()
        report = run_bench([int8], opts, data=data)
        walls.append(time.perf_counter() - t0)
    split = data.test.take(args.limit)
    bare = bare_pass(int8, split.x, opts.threads, opts.batch_size)
    r = report.result(int8.name)
    print(f"\n2. bench {int8.name} --no-latency over {len(split):,} test images, {opts.threads} threads, "
          f"batch {opts.batch_size}")
    print(f"   first run (fills the cache) {walls[0]:.1f} s, second run {walls[1]:.1f} s (its pass "
          f"{r.timing.get('accuracy_pass_s', float('nan')):.1f} s); bare LiteRT loop {bare:.1f} s; "
          f"second / bare = {walls[1] / bare:.2f}x ({'within' if walls[1] / bare <= 1.2 else 'ABOVE'} 1.2x)")


def bare_pass(path: Path, images, threads: int, batch: int) -> float:
    """Seconds of a bare Interpreter over ``images`` in batches of ``batch``, preprocessed and quantized
    with numpy as the manifest says (no project runner)."""
    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from resnet_deploy.artifact import read_manifest

    pre = read_manifest(path).preprocessing
    t0 = time.perf_counter()
    it = Interpreter(model_path=str(path), num_threads=threads)
    d = it.get_input_details()[0]
    size = None
    for i in range(0, len(images), batch):
        x = images[i:i + batch].astype(np.float32) * np.float32(pre.get("scale", 1.0))
        if pre.get("mean") is not None:
            x = (x - np.float32(pre["mean"])) / np.float32(pre["std"])
        if len(x) != size:
            it.resize_tensor_input(d["index"], [len(x), 32, 32, 3])
            it.allocate_tensors()
            size, d = len(x), it.get_input_details()[0]
            o = it.get_output_details()[0]
        if np.issubdtype(d["dtype"], np.integer):
            scale, zp = d["quantization"]
            info = np.iinfo(d["dtype"])
            x = np.clip(np.round(x / scale) + zp, info.min, info.max).astype(d["dtype"])
        it.set_tensor(d["index"], x)
        it.invoke()
        it.get_tensor(o["index"])
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
