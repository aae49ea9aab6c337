"""The child side of ``untrusted.isolate.run_model``: ``python -m resnet_deploy.untrusted.child JOBDIR FD``.

Started by the bootstrap that lowered its limits (memory cap, thread stacks, no core file). Reads
``JOBDIR/job.json`` and ``JOBDIR/pixels.npy``, imports the engine, loads the file, checks that its input
is a 32x32 RGB image, runs it batch by batch and writes ``logits.npy`` and ``result.json`` (or
``result.json`` with the error). Progress goes to descriptor FD, one byte a step: ``i`` (engine
imported), ``l`` (loaded), ``b`` (a batch), ``d`` (result written). It ends with ``os._exit``, so no
framework teardown can hang it after its work is done.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path

MEMORY_MARKERS = ("bad_alloc", "failed to allocate", "out of memory", "cannot allocate memory", "unable to allocate",
                  "memoryerror", "enomem", "allocation failed", "std::length_error")


def main(argv: list[str]) -> int:
    jobdir, fd = Path(argv[0]), int(argv[1])

    def beat(code: bytes) -> None:
        try:
            os.write(fd, code)
        except OSError:
            pass

    job = json.loads((jobdir / "job.json").read_text())
    try:
        result = _run(job, jobdir, beat)
        code = 0
    except BaseException as exc:  # noqa: BLE001 - everything becomes the parent's clean error
        result = {"ok": False, "error": _error(exc, job)}
        code = 3
    _write_result(jobdir, result)
    beat(b"d")
    return code


def _run(job: dict, jobdir: Path, beat) -> dict:
    import importlib

    import numpy as np

    from resnet_deploy.cli_common import quiet_frameworks
    from resnet_deploy.config import Format
    from resnet_deploy.data.preprocess import Preprocessing
    from resnet_deploy.runtimes import engine_module, open_runner

    quiet_frameworks()
    fmt = Format(job["format"])
    if fmt is Format.KERAS:  # empty, truncated, a zip bomb: said before Keras (and TensorFlow) is imported
        from resnet_deploy.models.io import check_model_file

        check_model_file(job["path"])
    importlib.import_module(engine_module(fmt, job["runtime"]))
    beat(b"i")
    runner = open_runner(job["path"], preprocessing=Preprocessing.from_dict(job["preprocessing"]),
                         threads=job["threads"], batch_size=job["batch_size"], runtime=job["runtime"])
    runner.load()
    beat(b"l")
    io = runner.io_spec()
    check_io(job, io)
    pixels = np.load(jobdir / "pixels.npy", allow_pickle=False)
    outs, bs = [], max(1, job["batch_size"])
    for i in range(0, len(pixels), bs):
        out = np.asarray(runner.predict(pixels[i:i + bs]), np.float32)
        if out.ndim != 2 or out.shape != (len(pixels[i:i + bs]), job["n_classes"]):
            raise _io_error(job, f"outputs shape {tuple(out.shape)} for {len(pixels[i:i + bs])} images",
                            f"(N, {job['n_classes']}): one score per class name")
        outs.append(out)
        beat(b"b")
    logits = np.concatenate(outs) if outs else np.zeros((0, job["n_classes"]), np.float32)
    np.save(jobdir / "logits.npy", logits)
    return {"ok": True, "runtime": runner.name, "io": io.to_dict(), "describe": runner.describe()}


def check_io(job: dict, io) -> None:
    """The engine's input must take (N, 32, 32, 3) images (dynamic dimensions allowed) and its output, when
    its width is known, one score per class name."""
    from resnet_deploy.data.constants import IMAGE_SHAPE

    IMAGE_SHAPE = tuple(job.get("image_shape") or IMAGE_SHAPE)  # noqa: N806 (the images sent: any HxW)
    shape = tuple(io.input.shape)
    if len(shape) != 4 or any(d not in (None, -1, e) for d, e in zip(shape[1:], IMAGE_SHAPE)):
        nchw = len(shape) == 4 and shape[1] == 3 and shape[2] == shape[3] == IMAGE_SHAPE[0]
        raise _io_error(job, f"takes inputs of shape {_shape(shape)}" + (" (channels first, NCHW)" if nchw else ""),
                        f"(N, {', '.join(map(str, IMAGE_SHAPE))}): 32x32 RGB images, channels last, as predict "
                        "resizes every image to 32x32",
                        fix="use a model built for CIFAR-10-sized input (32x32x3, NHWC); predict does not resize "
                            "to other input sizes")
    out = tuple(io.output.shape)
    if len(out) >= 2 and out[-1] not in (None, -1) and (len(out) != 2 or out[-1] != job["n_classes"]):
        raise _io_error(job, f"outputs shape {_shape(out)}", f"(N, {job['n_classes']}): one score per class name")


def _shape(shape: tuple) -> str:
    return "(" + ", ".join("N" if d in (None, -1) else str(d) for d in shape) + ")"


def _io_error(job: dict, what: str, expected: str, fix: str | None = None):
    from resnet_deploy.errors import ModelRunError
    from resnet_deploy.terminal import safe

    return ModelRunError(f"{safe(job['path'])} {what}.", expected=expected,
                         fix=fix or "use the manifest written with this artifact by `resnet-deploy export` (its "
                                    "class_names must match the model's outputs)", kind="io")


def _error(exc: BaseException, job: dict) -> dict:
    from resnet_deploy.errors import ModelRunError, ResnetDeployError
    from resnet_deploy.terminal import safe

    path, runtime = safe(job["path"]), job["runtime"]
    if is_memory_error(exc):
        return {"kind": "memory", "what": f"{path} needed more memory than its process may use while {runtime} "
                                          f"loaded or ran it",
                "expected": "a model that fits under the memory cap",
                "fix": "raise --max-memory if you trust the file and the machine has the memory; a small file that "
                       "needs gigabytes is built to exhaust memory"}
    if isinstance(exc, ResnetDeployError):
        return {"kind": exc.kind if isinstance(exc, ModelRunError) else "runtime", "what": exc.what,
                "expected": exc.expected, "fix": exc.fix}
    if isinstance(exc, KeyboardInterrupt):
        return {"kind": "runtime", "what": f"Interrupted while {runtime} ran {path}."}
    detail = safe(f"{type(exc).__name__}: {str(exc).strip()}")[:400]
    if os.environ.get("RESNET_DEPLOY_VERBOSE") == "1":
        traceback.print_exc()
    return {"kind": "runtime", "what": f"{runtime} failed on {path}: {detail}",
            "expected": f"a valid {job['format']} classifier of 32x32 RGB images",
            "fix": "re-export the file; `resnet-deploy --verbose ...` shows the runtime's traceback"}


def is_memory_error(exc: BaseException) -> bool:
    """An allocation failure: MemoryError, or a runtime's own words for one, anywhere in the chain."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, MemoryError) or any(m in str(exc).lower() for m in MEMORY_MARKERS):
            return True
        exc = exc.__cause__ or exc.__context__
    return False


def _write_result(jobdir: Path, result: dict) -> None:
    tmp = jobdir / "result.json.tmp"
    tmp.write_text(json.dumps(result))
    os.replace(tmp, jobdir / "result.json")


if __name__ == "__main__":
    code = 4
    try:
        code = main(sys.argv[1:])
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
