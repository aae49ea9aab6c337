"""Does our LiteRT runner add time? A bare ``ai_edge_litert`` Interpreter loop against the runner bench uses.

For each .tflite file: batch-1 median latency of ``set_tensor`` + ``invoke`` on a bare Interpreter, and
of ``LiteRTRunner.predict_preprocessed`` (what `resnet-deploy bench` times), alternated ``--rounds``
times in one process at ``--threads`` threads. Use it when bench's figure and `litert-benchmark`'s
disagree, to tell harness overhead from a difference between the Python Interpreter and the tool.

    .venv/bin/python benchmarks/litert_harness_overhead.py DIR/resnet34_fp32.tflite DIR/resnet34_int8.tflite
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def median_ms(fn, runs: int, warmup: int) -> float:
    import numpy as np

    for _ in range(warmup):
        fn()
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return 1000 * float(np.median(times))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("files", type=Path, nargs="+")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--runs", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()

    import numpy as np
    from ai_edge_litert.interpreter import Interpreter

    from resnet_deploy.data.preprocess import preprocess
    from resnet_deploy.envinfo import machine_banner
    from resnet_deploy.runtimes import open_runner
    from resnet_deploy.runtimes.base import quantize

    print(machine_banner())
    pixels = np.random.default_rng(0).integers(0, 256, (1, 32, 32, 3)).astype(np.float32)
    for path in args.files:
        bare = Interpreter(model_path=str(path), num_threads=args.threads)
        bare.allocate_tensors()
        detail = bare.get_input_details()[0]
        with open_runner(path, threads=args.threads) as runner:
            x = preprocess(pixels, runner.preprocessing)
            if np.issubdtype(detail["dtype"], np.integer):  # an --int8-io file: quantize as the runner does
                x_bare = quantize(x, *detail["quantization"], detail["dtype"])
            else:
                x_bare = x.astype(detail["dtype"])
            for r in range(args.rounds):
                t_bare = median_ms(lambda: (bare.set_tensor(detail["index"], x_bare), bare.invoke()),
                                   args.runs, args.warmup)
                t_ours = median_ms(lambda: runner.predict_preprocessed(x), args.runs, args.warmup)
                print(f"{path.name} round {r + 1}, {args.threads} thread(s): bare Interpreter {t_bare:.2f} ms, "
                      f"resnet-deploy runner {t_ours:.2f} ms ({t_ours / t_bare:.3f}x)")


if __name__ == "__main__":
    main()
