"""Load and run an untrusted model in a child process with a memory cap and a timeout.

``run_model(path, pixels, ...)`` starts ``python -m resnet_deploy.untrusted.child`` in a session of its
own and returns the model's outputs; everything that parses the file (the engine's loader, Keras' zip
reader, ONNX Runtime's graph optimiser, a TFLite interpreter) runs there, never in the caller:

- **Memory cap** (``max_memory``, ``--max-memory``, default 2 GiB): ``RLIMIT_DATA`` (the heap and every
  private writable mapping) is lowered before the interpreter that opens the file starts (a two-line
  bootstrap sets it, then ``exec``\\ s the child). An allocation past it fails inside the child (a
  ``MemoryError``, a ``bad_alloc``, or an abort), which becomes one error naming the file and the cap.
  Thread stacks count too, so the bootstrap also lowers ``RLIMIT_STACK`` (the default thread stack
  size) to 4 MiB, and ``RLIMIT_CORE`` to 0 (a crash writes no core file). The child sees no GPU
  (``CUDA_VISIBLE_DEVICES=""``): device memory is outside any rlimit.
- **Timeout** (``timeout_s``, time without progress): counted from the moment the child is started, so
  an interpreter that never comes up, an import that hangs and a model that hangs are all covered. The
  child reports progress on a pipe of its own (after the engine's import, the load and every batch).
  Nothing is ever written *to* the child: the job (pixels, options) is a file it reads, so the parent
  cannot block on a full pipe whatever state the child is in.
- **Crashes**: a signal (SIGSEGV from a damaged flatbuffer, SIGABRT, SIGKILL from the kernel's OOM
  killer), a hang, a failed start or an exception of the engine become one ``ModelRunError`` naming the
  file, the runtime and what it was doing; its ``kind`` says which ("crash", "memory", "timeout",
  "start", "io" or "runtime").

The child's own output (framework logs) goes to a file: ``--verbose`` copies it to stderr, and the last
lines of it join a crash's message.
"""

from __future__ import annotations

import json
import os
import select
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from resnet_deploy.errors import ModelRunError, ResnetDeployError
from resnet_deploy.terminal import safe, safe_lines
from resnet_deploy.untrusted.files import DEFAULT_MAX_MEMORY, format_bytes
from resnet_deploy.untrusted.limits import apply_memory_cap

DEFAULT_TIMEOUT_S = 300.0  # without progress; a busy machine imports TensorFlow in over a minute
STACK_LIMIT = 4 << 20  # the child's default thread stack (and main stack limit)
STAGES = {b"i": "loading the file", b"l": "running the model", b"b": "running the model", b"d": "finishing"}
STARTING = "starting (interpreter and engine import)"
LOG_TAIL = 64 << 10
TEARDOWN_S = 30.0  # how long a child that finished its work may take to exit

# Load limits.py by its path (no package import before the cap is set), then become the child.
_BOOT = ("import importlib.util as u, sys\n"
         "spec = u.spec_from_file_location('resnet_deploy_limits', sys.argv[1])\n"
         "m = u.module_from_spec(spec)\n"
         "spec.loader.exec_module(m)\n"
         "m.boot(sys.argv[2:])\n")
LIMITS_FILE = str(Path(__file__).with_name("limits.py"))


@dataclass
class ModelRun:
    """What the child returned: the model's raw outputs (N, classes) float32, the runtime that ran it, the
    engine's input/output tensors, and the child's peak resident memory (bytes; 0 where unknown)."""

    outputs: np.ndarray
    runtime: str
    io: dict = field(default_factory=dict)
    describe: dict = field(default_factory=dict)
    peak_rss: int = 0


def run_model(path: str | os.PathLike, pixels: np.ndarray, *, preprocessing: dict | None, n_classes: int,
              runtime: str | None = None, threads: int | None = None, batch_size: int = 256,
              max_memory: int | None = DEFAULT_MAX_MEMORY, timeout_s: float | None = DEFAULT_TIMEOUT_S) -> ModelRun:
    """Run ``path`` (any format ``runtimes.open_runner`` takes) on uint8 NHWC ``pixels`` in a capped child
    (module docstring); ``max_memory`` None or 0: no cap; ``timeout_s`` None: wait as long as it progresses
    or lives. Raises ``ModelRunError`` for anything that went wrong inside the child."""
    from resnet_deploy.config import Format
    from resnet_deploy.runtimes import DEFAULT_RUNTIME, check_runtime

    path = Path(path)
    fmt = Format.from_path(path)
    runtime = check_runtime(runtime, fmt) if runtime else DEFAULT_RUNTIME[fmt]
    job = {"path": str(path.absolute()), "format": fmt.value, "runtime": runtime, "preprocessing": preprocessing,
           "n_classes": int(n_classes), "threads": threads, "batch_size": int(batch_size),
           "max_memory": int(max_memory or 0), "image_shape": [int(d) for d in np.shape(pixels)[1:]]}
    jobdir = _make_jobdir()
    try:
        _write_job(jobdir, job, pixels)
        return _run(jobdir, job, path, timeout_s)
    finally:
        shutil.rmtree(jobdir, ignore_errors=True)


def _make_jobdir() -> Path:
    try:
        return Path(tempfile.mkdtemp(prefix="resnet-deploy-run."))
    except OSError as exc:
        raise ResnetDeployError(f"Cannot create a working folder in {safe(tempfile.gettempdir())}: {exc.strerror}.",
                                expected="a writable temporary folder", fix="free space there or set TMPDIR") from None


def _write_job(jobdir: Path, job: dict, pixels: np.ndarray) -> None:
    try:
        np.save(jobdir / "pixels.npy", np.ascontiguousarray(pixels, dtype=np.uint8))
        (jobdir / "job.json").write_text(json.dumps(job))
    except OSError as exc:
        raise ResnetDeployError(f"Cannot write the images for the model's process into {safe(jobdir)}: "
                                f"{exc.strerror}.", expected="space in the temporary folder",
                                fix="free space there or set TMPDIR to another folder") from None


def _child_env() -> dict:
    env = dict(os.environ)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the resnet_deploy package
    env["PYTHONPATH"] = os.pathsep.join([root, *[p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]])
    env["CUDA_VISIBLE_DEVICES"] = ""  # GPU memory is outside any rlimit
    env.pop("PYTHONSTARTUP", None)
    return env


def _run(jobdir: Path, job: dict, path: Path, timeout_s: float | None) -> ModelRun:
    import subprocess

    read_fd, write_fd = os.pipe()
    log = open(jobdir / "child.log", "wb")
    try:
        try:
            proc = subprocess.Popen(
                [sys.executable, "-c", _BOOT, LIMITS_FILE, str(job["max_memory"]), str(STACK_LIMIT), str(jobdir),
                 str(write_fd)],
                stdin=subprocess.DEVNULL, stdout=log, stderr=log, pass_fds=(write_fd,), env=_child_env(),
                start_new_session=True, close_fds=True)
        except OSError as exc:
            raise _start_error(path, job, f"{sys.executable} could not be started: {exc.strerror}") from None
    finally:
        os.close(write_fd)
        log.close()
    try:
        status, stage, rss = _supervise(proc, read_fd, timeout_s)
    except BaseException:  # Ctrl-C, or a bug here: the child goes with us
        _kill(proc)
        raise
    finally:
        os.close(read_fd)
    if os.environ.get("RESNET_DEPLOY_VERBOSE") == "1":  # the runtime's own log, which may quote the file's names
        sys.stderr.write(safe_lines(_log_tail(jobdir, LOG_TAIL)))
    if status == "timeout":
        raise ModelRunError(
            f"{safe(path)} made no progress for {timeout_s:g} s in {job['runtime']} while {stage}; its process "
            "was stopped.", expected="a model that loads and runs on a few images in that time",
            fix="if the file is large or the machine busy, raise --timeout; otherwise the runtime hangs on this "
                "file: re-export it", kind="timeout")
    return _result(jobdir, job, path, status, stage, rss)


def _supervise(proc, read_fd: int, timeout_s: float | None) -> tuple[object, str, int]:
    """Wait for the child, restarting the clock at each progress byte. Returns (exit status or "timeout",
    the last stage reached, peak RSS in bytes). A child that reported its work done ("d") and then hangs
    in its teardown is killed after ``TEARDOWN_S``: its result is complete."""
    stage = STARTING
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    open_pipe = True
    while True:
        done = _reap(proc)
        if done is not None and (not open_pipe or stage == STAGES[b"d"]):
            return done[0], stage, done[1]
        now = time.monotonic()
        if deadline is not None and now >= deadline:
            _kill(proc)
            return ("timeout" if stage != STAGES[b"d"] else 0), stage, 0
        wait = 0.5 if deadline is None else min(0.5, deadline - now)
        if not open_pipe:  # the child closed its end: it is exiting
            time.sleep(min(wait, 0.02))
            continue
        ready, _, _ = select.select([read_fd], [], [], max(wait, 0))
        if ready:
            data = os.read(read_fd, 4096)
            if not data:
                open_pipe = False
                continue
            stage = STAGES.get(data[-1:], stage)
            if stage == STAGES[b"d"]:
                deadline = time.monotonic() + TEARDOWN_S
            elif deadline is not None:
                deadline = time.monotonic() + timeout_s
        elif done is not None:  # exited while a process it started keeps the pipe open
            return done[0], stage, done[1]


def _reap(proc) -> tuple[int, int] | None:
    """(exit status as subprocess reports it, peak RSS in bytes) once the child has ended, else None."""
    if proc.returncode is not None:
        return proc.returncode, getattr(proc, "_peak_rss", 0)
    try:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
    except ChildProcessError:
        proc.poll()
        return (proc.returncode, 0) if proc.returncode is not None else None
    if pid == 0:
        return None
    proc.returncode = os.waitstatus_to_exitcode(status)
    proc._peak_rss = usage.ru_maxrss * 1024  # Linux reports KiB
    return proc.returncode, proc._peak_rss


def _kill(proc) -> None:
    """SIGKILL the child's whole session (it may have started processes of its own), then reap it."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    try:
        proc.kill()
    except ProcessLookupError:
        pass
    proc.wait()


def _result(jobdir: Path, job: dict, path: Path, status: int, stage: str, rss: int) -> ModelRun:
    from resnet_deploy.untrusted.files import read_json

    result_file = jobdir / "result.json"
    result = read_json(result_file, "result") if result_file.exists() else None
    if result is not None and result.get("ok") and (status == 0 or stage == STAGES[b"d"]):
        outputs = np.load(jobdir / "logits.npy", allow_pickle=False)
        return ModelRun(outputs, result.get("runtime", job["runtime"]), result.get("io", {}),
                        result.get("describe", {}), rss)
    if result is not None and not result.get("ok"):
        e = result.get("error", {})
        what = e.get("what", "the model's process failed")
        if e.get("kind") == "memory":
            what = f"{what} {_memory_note(job)}".strip() + "."
        raise ModelRunError(what, expected=e.get("expected"), fix=e.get("fix"), kind=e.get("kind", "runtime"))
    tail = _log_excerpt(jobdir)
    if status is not None and status < 0:
        raise _signal_error(path, job, -status, stage, tail)
    if stage == STARTING:
        raise _start_error(path, job, f"it exited with status {status} before loading anything{tail}")
    raise ModelRunError(f"The process running {safe(path)} in {job['runtime']} exited with status {status} while "
                        f"{stage}, without a result{tail}.", expected="a model its runtime can load and run",
                        fix="re-export the file; run with --verbose to see the runtime's own messages", kind="crash")


def _memory_note(job: dict) -> str:
    cap = job["max_memory"]
    return f"(its cap is {format_bytes(cap)}: --max-memory)" if cap else ""


def _signal_error(path: Path, job: dict, signum: int, stage: str, tail: str) -> ModelRunError:
    try:
        name = signal.Signals(signum).name
    except ValueError:
        name = f"signal {signum}"
    cap = job["max_memory"]
    if signum == signal.SIGKILL:
        return ModelRunError(
            f"The process running {safe(path)} in {job['runtime']} was killed (SIGKILL) while {stage}: the system "
            f"ran out of memory{f' below the {format_bytes(cap)} cap' if cap else ''}, or another process killed "
            f"it{tail}.", expected="a model that fits in the machine's free memory",
            fix="free memory or lower --max-memory so that the cap, not the system, stops a file that is too "
                "large", kind="memory")
    memory = f"; a failed allocation under the {format_bytes(cap)} cap (--max-memory) ends this way too" \
        if cap and signum == signal.SIGABRT else ""
    return ModelRunError(
        f"{job['runtime']} crashed ({name}) while {stage} {safe(path)}: the file is damaged or not a valid "
        f"{job['format']} model{memory}{tail}.",
        expected=f"a complete {job['format']} file (compare its sha256 with its manifest's)",
        fix="re-export it or copy it again; nothing else was affected (it ran in a process of its own)",
        kind="crash")


def _start_error(path: Path, job: dict, detail: str) -> ModelRunError:
    return ModelRunError(f"The process that was to run {safe(path)} in {job['runtime']} could not start: {detail}.",
                         expected=f"{sys.executable} able to import resnet_deploy and {job['runtime']}",
                         fix="check the Python installation (reinstall resnet-deploy into this environment)",
                         kind="start")


def _log_tail(jobdir: Path, limit: int) -> str:
    try:
        with open(jobdir / "child.log", "rb") as fh:
            fh.seek(0, os.SEEK_END)
            fh.seek(max(0, fh.tell() - limit))
            return fh.read().decode("utf-8", "replace")
    except OSError:
        return ""


def _log_excerpt(jobdir: Path, lines: int = 3) -> str:
    """The last lines the child printed that are not framework start-up noise, escaped, for a message."""
    from resnet_deploy.cli_common import is_framework_log

    kept = [ln.strip() for ln in _log_tail(jobdir, 8192).splitlines()
            if ln.strip() and not is_framework_log(ln)][-lines:]
    return f" (its last output: {safe(' | '.join(kept))[:400]})" if kept else ""


__all__ = ["run_model", "apply_memory_cap", "ModelRun", "DEFAULT_TIMEOUT_S", "STACK_LIMIT"]
