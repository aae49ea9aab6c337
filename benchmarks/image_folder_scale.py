"""Bench an INT8 ResNet at 224x224 over an image folder of N JPEGs made from CIFAR-10 (upscaled), and say
whether streaming the folder keeps up with the runtime and keeps memory bounded (issue 24).

    .venv/bin/python benchmarks/image_folder_scale.py --images 10000            # the figure for the README
    .venv/bin/python benchmarks/image_folder_scale.py --images 200 --arch resnet8 --width 0.25   # a smoke run

Steps (each printed, with the machine):

1. the folder: CIFAR-10's first N test images and ``--calib``-plus training images, upscaled to 224x224 with
   Pillow's bicubic filter and written as JPEG (``write_image_folder``; reused when ``--folder`` exists);
2. the model: a random-weight ``--arch`` with the ImageNet stem at 224x224 (or ``--model``), exported to
   TFLite INT8 with ``--data`` the folder (calibration decoded from its train/ split);
3. **decode**: the test split streamed (``FolderData.stream``: lazy, parallel, bounded) with no model: images/s;
4. **whole pass**: ``run_bench`` on the INT8 file, in this process, the float reference's logits already
   cached by a first run (so the timed run is the INT8 file's streamed pass: decoding overlapped with the
   runtime): images/s from the pass's wall time, and this process's peak RSS (VmHWM) after it;
5. **bare loop**: the same runtime, threads and batch size over pre-decoded arrays (``--bare`` images
   decoded first, cycled to N): images/s;
6. the ratio whole pass / bare loop (the goal: >= 0.8) and the peak RSS against the split's float32 size
   (the goal: bounded by the batch size, not the data set).

The figures depend on the machine and on what else runs on it: run it on a quiet machine.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path


def _vm_hwm() -> int:
    """This process's peak resident set size in bytes (VmHWM), else ru_maxrss."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _reset_hwm() -> bool:
    """Reset VmHWM to the current RSS (Linux: write 5 to /proc/self/clear_refs); False when not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--images", type=int, default=10_000, help="test images in the folder (default 10,000)")
    ap.add_argument("--size", type=int, default=224)
    ap.add_argument("--arch", default="resnet18")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--model", type=Path, default=None, help="a .keras model for the folder (default: random --arch)")
    ap.add_argument("--data", default=None, help="CIFAR-10 (default: the package's usual search)")
    ap.add_argument("--folder", type=Path, default=None, help="the JPEG folder (made when absent; default: temp)")
    ap.add_argument("--calib", type=int, default=100, help="calibration images (the folder's train/ holds 3x)")
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None, help="runtime threads (default: every usable core)")
    ap.add_argument("--bare", type=int, default=512, help="images pre-decoded for the bare loop (cycled to N)")
    ap.add_argument("--quality", type=int, default=90, help="JPEG quality")
    a = ap.parse_args(argv)

    import numpy as np

    from resnet_deploy.envinfo import machine_banner, usable_cores

    print(machine_banner())
    threads = a.threads or usable_cores()
    with tempfile.TemporaryDirectory(prefix="rd-folder-scale-") as tmp:
        tmp = Path(tmp)
        folder = a.folder or tmp / "jpeg224"
        if not folder.exists():
            from resnet_deploy.data import CLASS_NAMES, load_cifar10
            from resnet_deploy.data.folder import write_image_folder

            ds = load_cifar10(a.data, splits=("train", "test"))
            t0 = time.perf_counter()
            write_image_folder(folder, {"train": ds.train.take(max(3 * a.calib, 100)), "test": ds.test.take(a.images)},
                               CLASS_NAMES, image_format="jpeg", size=a.size, jpeg_quality=a.quality)
            print(f"folder {folder}: {a.images:,} test JPEGs at {a.size}x{a.size} (quality {a.quality}) written in "
                  f"{time.perf_counter() - t0:.1f} s")
        model = a.model or _random_model(a, tmp)

        from resnet_deploy.converters.export import export_model
        from resnet_deploy.converters.options import ExportOptions

        t0 = time.perf_counter()
        arts = export_model(model, ExportOptions(formats=("tflite",), int8=True, calib_samples=a.calib,
                                                 parity_samples=min(64, a.images), out_dir=str(tmp / "out")),
                            data=str(folder))
        int8 = next(x.path for x in arts if x.precision == "int8")
        print(f"export: {int8.name} ({int8.stat().st_size / 1e6:.2f} MB) in {time.perf_counter() - t0:.1f} s, "
              f"calibrated on {a.calib} images of {folder}/train")

        from resnet_deploy.data.folder import Decoding
        from resnet_deploy.data.folder_data import folder_split, open_folder

        decoding = Decoding(a.size)
        test = folder_split(open_folder(folder), "test", decoding)
        n = len(test)

        # 3. decode alone
        t0 = time.perf_counter()
        stream = test.stream(batch_size=a.batch_size)
        done = sum(len(b) for b in stream)
        decode_s = time.perf_counter() - t0
        print(f"decode: {done:,} images in {decode_s:.2f} s = {done / decode_s:,.0f} images/s "
              f"({stream.workers} decoder threads, batches of {a.batch_size})")

        # 4. the whole pass, through bench (the float reference cached by a first run)
        from resnet_deploy.bench.options import BenchOptions
        from resnet_deploy.bench.run import run_bench

        opts = BenchOptions(data=folder, latency=False, isolate=False, batch_size=a.batch_size, threads=threads,
                            cache_dir=tmp / "cache", bootstrap=200)
        run_bench([int8], opts)  # caches the float model's logits
        reset = _reset_hwm()
        rss_before = _vm_hwm()
        rep = run_bench([int8], opts)
        peak = _vm_hwm()
        r = next(x for x in rep.results if x.path == int8)
        if r.error:
            print(f"bench failed: {r.error}")
            return 1
        pass_s = rep.data["accuracy_pass_wall_s"]
        whole = rep.data["images"] / pass_s
        print(f"whole pass (bench, in process, float logits cached): {rep.data['images']:,} images in {pass_s:.2f} s "
              f"= {whole:,.0f} images/s; runtime share {r.timing['accuracy_pass_s']:.2f} s; top-1 "
              f"{r.accuracy['top1']:.2%} (random weights: near chance)")

        # 5. the bare runtime loop over pre-decoded arrays
        from resnet_deploy.runtimes import open_runner

        m = min(a.bare, n)
        x, _, _, _ = test.gather(np.arange(m))
        with open_runner(int8, preprocessing=r.manifest.preprocessing_spec if r.manifest else None,
                         threads=threads, batch_size=a.batch_size) as rt:
            rt.predict(x[:a.batch_size])  # warm-up
            t0 = time.perf_counter()
            left = n
            while left > 0:
                for i in range(0, m, a.batch_size):
                    k = min(a.batch_size, m - i, left)
                    rt.predict(x[i:i + k], batch_size=a.batch_size)
                    left -= k
                    if left <= 0:
                        break
            bare_s = time.perf_counter() - t0
        bare = n / bare_s
        print(f"bare loop: {n:,} pre-decoded images ({m} cycled) in {bare_s:.2f} s = {bare:,.0f} images/s "
              f"({threads} threads, batches of {a.batch_size})")

        split_f32 = n * a.size * a.size * 3 * 4
        batch_u8 = a.batch_size * a.size * a.size * 3
        print(f"ratio whole pass / bare loop: {whole / bare:.2f} (goal >= 0.80)")
        print(f"peak RSS during the pass: {peak / 2**20:,.0f} MiB (RSS before it {rss_before / 2**20:,.0f} MiB"
              f"{'' if reset else '; VmHWM could not be reset: the peak includes earlier steps'}); the split as "
              f"float32 would be {split_f32 / 2**30:.2f} GiB, one uint8 batch is {batch_u8 / 2**20:.1f} MiB")
    return 0


def _random_model(a, tmp: Path) -> Path:
    import keras

    from resnet_deploy.models.builder import build_model
    from resnet_deploy.models.io import base_metadata, save_model

    keras.utils.set_random_seed(0)
    model = build_model(a.arch, width=a.width, stem="imagenet", input_shape=(a.size, a.size, 3))
    meta = base_metadata(a.arch, width=a.width, stem="imagenet")
    meta["input_shape"] = [a.size, a.size, 3]
    path = save_model(model, tmp / f"{a.arch}_{a.size}.keras", meta)
    print(f"model: {a.arch} width {a.width}, ImageNet stem at {a.size}x{a.size}, {model.count_params():,} params, "
          "random weights")
    return path


if __name__ == "__main__":
    sys.exit(main())
