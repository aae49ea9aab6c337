"""Training throughput with 1 and 2 processes (`train --distribute multi-process` on 127.0.0.1), and the time the
processes spend communicating per step.

    KERAS_BACKEND=jax .venv/bin/python benchmarks/train_multiprocess.py --data ../shared/data/cifar10
    KERAS_BACKEND=jax .venv/bin/python benchmarks/train_multiprocess.py --data ../shared/data/cifar10 \\
        --arch resnet8 --width 0.25 --train 320 --batch-size 32 --epochs 2 --steps 5      # a quick check that it runs

What it runs, one after the other, each in fresh Python processes (JAX joins processes once per process):
1. `resnet-deploy train` in one process (`--distribute none`) and in two processes on 127.0.0.1
   (`--distribute multi-process`, JAX CPU collectives over gloo), with the same recipe and global batch; the
   figure is the run's own `train_images_per_s` (log.csv: training images over the training pass, without its
   first batch) of the last epoch (the first carries the compilation);
2. two processes that join the same way and time an all-reduce of one float32 number per trainable parameter of
   the model (what data parallelism sums across the processes at every step, as one buffer): the median of
   --steps, after one warm-up. That is the communication time per step, measured; the step time of the
   two-process run is printed beside it.

On one machine the two processes share its cores: two processes on two cores do the same work with the same
cores and gain little or nothing (they add the all-reduce and run two copies of the Python side). The figure that
matters for several machines is the communication time per step against the step time. Take the figures on a
quiet machine: any other load on the cores changes them. The machine banner (CPU, flags, versions) is printed.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env() -> dict:
    return dict(os.environ, KERAS_BACKEND="jax", TF_CPP_MIN_LOG_LEVEL="2", PYTHONUNBUFFERED="1")


def _run_all(commands: list[list[str]], logs: list[Path], timeout: float) -> None:
    """Start the commands together (each in its own session), wait for all; kill them all on any failure."""
    procs = []
    try:
        for cmd, log in zip(commands, logs):
            with open(log, "w") as fh:
                procs.append(subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=fh, stderr=subprocess.STDOUT,
                                              start_new_session=True))
        deadline = time.monotonic() + timeout
        for p, log in zip(procs, logs):
            p.wait(timeout=max(1.0, deadline - time.monotonic()))
            if p.returncode != 0:
                raise SystemExit(f"{' '.join(map(str, p.args[:6]))} ... failed ({p.returncode}):\n"
                                 + log.read_text(errors="replace")[-3000:])
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()


def _train_cmd(a, out: Path, extra: list[str]) -> list[str]:
    cmd = [sys.executable, "-m", "resnet_deploy.cli", "train", "--arch", a.arch, "--width", str(a.width),
           "--batch-size", str(a.batch_size), "--epochs", str(a.epochs), "--limit-train", str(a.train),
           "--limit-test", str(a.test), "--precision", "float32", "--warmup-epochs", "0", "--out", str(out), *extra]
    return cmd + (["--data", str(a.data)] if a.data else [])


def _last_epoch(out: Path) -> dict:
    rows = list(csv.DictReader((out / "log.csv").open()))
    return rows[-1]


def _allreduce_worker(rank: int, port: int, params: int, steps: int) -> None:
    """One of the two processes that time the all-reduce of ``params`` float32 numbers."""
    import numpy as np

    from resnet_deploy.training.multiprocess import join, resolve_launch

    join(resolve_launch(rank, 2, f"127.0.0.1:{port}", environ={}), seed=0, log=lambda m: None)
    import jax
    import jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rows = jax.local_device_count()
    local = np.full((rows, params), rank + 1, np.float32)
    x = jax.make_array_from_process_local_data(NamedSharding(mesh, P("batch")), local)
    total = jax.jit(lambda a: jnp.sum(a, axis=0), out_shardings=NamedSharding(mesh, P()))
    times = []
    for i in range(steps + 1):
        t0 = time.perf_counter()
        y = total(x).block_until_ready()
        if i:
            times.append(time.perf_counter() - t0)
    expected = sum(r + 1 for r in range(2)) * rows  # every process's rows summed: the all-reduce happened
    assert float(np.asarray(y.addressable_data(0))[0]) == expected
    if rank == 0:
        print(json.dumps({"allreduce_s": statistics.median(times), "params": params, "steps": steps}))


def _trainable_params(a) -> int:
    code = ("import math; from resnet_deploy.models.builder import build_model; "
            f"m = build_model({a.arch!r}, width={a.width}); "
            "print(sum(math.prod(w.shape) for w in m.trainable_weights))")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=_env(), capture_output=True, text=True, check=True)
    return int(out.stdout.strip().splitlines()[-1])


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arch", default="resnet20")
    p.add_argument("--width", type=float, default=1.0)
    p.add_argument("--batch-size", type=int, default=128, help="the global batch (each of 2 processes feeds half)")
    p.add_argument("--train", type=int, default=2560, help="training images (the first N)")
    p.add_argument("--test", type=int, default=256, help="test images (the first N)")
    p.add_argument("--epochs", type=int, default=3, help="the figure is the last epoch's (the first compiles)")
    p.add_argument("--steps", type=int, default=20, help="timed all-reduces")
    p.add_argument("--data", type=Path, default=None)
    p.add_argument("--timeout", type=float, default=3600, help="seconds for each stage")
    p.add_argument("--worker", choices=["allreduce"], help=argparse.SUPPRESS)
    p.add_argument("--rank", type=int, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, help=argparse.SUPPRESS)
    p.add_argument("--params", type=int, help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.worker == "allreduce":
        _allreduce_worker(a.rank, a.port, a.params, a.steps)
        return 0
    if a.data is not None:
        a.data = a.data.resolve()

    from resnet_deploy.envinfo import machine_banner

    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"load average (1 min) at the start: {load:.1f} on {os.cpu_count()} cores"
          + ("  -- the machine is busy: these figures are not the machine's" if load > 0.5 else ""))
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        one = tmp / "one"
        _run_all([_train_cmd(a, one, [])], [tmp / "one.log"], a.timeout)
        port = _free_port()
        two = [_train_cmd(a, tmp / f"two{r}", ["--distribute", "multi-process", "--num-processes", "2",
                                                "--process-id", str(r), "--coordinator", f"127.0.0.1:{port}"])
               for r in (0, 1)]
        _run_all(two, [tmp / "two0.log", tmp / "two1.log"], a.timeout)
        params = _trainable_params(a)
        port = _free_port()
        workers = [[sys.executable, str(Path(__file__).resolve()), "--worker", "allreduce", "--rank", str(r),
                    "--port", str(port), "--params", str(params), "--steps", str(a.steps)] for r in (0, 1)]
        _run_all(workers, [tmp / "ar0.log", tmp / "ar1.log"], a.timeout)
        ar = json.loads([line for line in (tmp / "ar0.log").read_text().splitlines() if line.startswith("{")][-1])
        rows = {"1 process": _last_epoch(one), "2 processes": _last_epoch(tmp / "two0")}
    steps = a.train // a.batch_size
    print(f"\n{a.arch} width {a.width:g}, global batch {a.batch_size}, {steps} steps an epoch, last of {a.epochs} "
          f"epochs, float32, JAX CPU; 2 processes: keras.distribution.DataParallel on 127.0.0.1 (gloo)")
    print(f"{'':12s} {'images/s':>10s} {'s/step':>8s}")
    for name, row in rows.items():
        ips = float(row["train_images_per_s"])
        print(f"{name:12s} {ips:10.1f} {a.batch_size / ips:8.3f}")
    step2 = a.batch_size / float(rows["2 processes"]["train_images_per_s"])
    print(f"communication: an all-reduce of {ar['params']:,} float32 numbers ({4 * ar['params'] / 1e6:.2f} MB, one per "
          f"trainable parameter) between the 2 processes: {1000 * ar['allreduce_s']:.2f} ms (median of {ar['steps']}), "
          f"{100 * ar['allreduce_s'] / step2:.1f}% of a 2-process step")
    print("On one machine the 2 processes share its cores, so little or no gain is expected; the communication "
          "share is the figure that carries over to separate machines (over a real network, slower than loopback).")
    print(machine_banner())
    return 0


if __name__ == "__main__":
    sys.exit(main())
