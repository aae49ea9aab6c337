"""Where a file is measured: its own child process (``ChildWorker``) or this one (``LocalWorker``).

A ``ChildWorker`` starts a ``multiprocessing`` spawn child that holds one ``measure.FileSession`` and
answers requests over a pipe, so the run can time all its files in interleaved rounds while each
stays in its own process: the memory figures are that child's alone, a runtime that crashes (a
segfaulting interpreter on a corrupt file) takes only its own child down, and one that hangs is
killed. The timeout counts time without progress: the child sends a heartbeat after the load, each
timing block and each accuracy chunk, so a big model that is slow but working is never killed.

A failed request raises ``WorkerFailed`` with the file's error entry; the worker is then closed.

The parent never blocks on the pipe: the spec (with its latency images, often more than a pipe holds)
and every request are written by a sender thread of the worker's own, while the caller waits in
``_receive`` under the timeout. A child whose interpreter never starts (or hangs before it reads) is
therefore killed after ``timeout_s`` like any other, instead of leaving the parent stuck in a write
to a pipe nobody reads; one that cannot be started at all is a "crash" entry. ``max_memory`` caps the
child's data (``untrusted.apply_memory_cap``, set as its first step, before the file is opened).

Ctrl-C reaches every process of the terminal's process group, the children included. The children
ignore it (SIGINT is blocked while one starts and ignored from its first line on), so none prints a
traceback of its own: the parent gets the ``KeyboardInterrupt``, kills them (``close(kill=True)``) and
the command ends with one line (``bench.command``).
"""

from __future__ import annotations

import multiprocessing as mp
import queue
import signal
import threading
import time
import traceback

from resnet_deploy.bench.measure import REQUESTS, FileSession, FileSpec
from resnet_deploy.bench.results import crash_error, error_dict, error_entry, timeout_error, unexpected_error
from resnet_deploy.errors import ResnetDeployError

TIMED_OUT = object()  # what _receive returns when the child made no progress in time
PROGRESS = "progress"  # first item of the child's heartbeat messages


class WorkerFailed(Exception):
    def __init__(self, error: dict):
        super().__init__(error.get("message", ""))
        self.error = error


class LocalWorker:
    """A FileSession in this process (``--in-process``): its memory is shared with the caller and the
    other files of the run."""

    rss_scope = "process shared with the other artifacts of the run"

    def __init__(self, spec: FileSpec, timeout_s: float | None = None):
        self.session = FileSession(spec, reset_peak=False)

    def call(self, request: str, *args):
        try:
            return _answer(self.session, request, args, lambda stage: None)
        except _Failed as exc:
            self.close()
            raise WorkerFailed(exc.error) from None

    def close(self, kill: bool = False) -> None:
        self.session.close()


class ChildWorker:
    """A FileSession in its own spawn child; ``call`` waits while the child sends heartbeats."""

    rss_scope = "child process of this artifact alone"

    def __init__(self, spec: FileSpec, timeout_s: float | None = None, max_memory: int | None = None):
        ctx = mp.get_context("spawn")
        self.path, self.timeout_s, self.max_memory = spec.path, timeout_s, max_memory
        self.conn, child_end = ctx.Pipe(duplex=True)
        # only the pipe and the cap travel with the start (a small write); the spec follows through the sender
        self.proc = ctx.Process(target=_child_main, args=(child_end, max_memory), daemon=True)
        try:
            with _sigint_blocked():  # the child inherits the mask: a Ctrl-C during its start-up is not its business
                self.proc.start()
        except OSError as exc:  # the interpreter cannot be executed at all
            child_end.close()
            self.conn.close()
            self.sender = None
            raise WorkerFailed(_start_error(self.path, exc.strerror or str(exc))) from None
        child_end.close()
        self.sender = _Sender(self.conn)
        self.sender.send(spec)

    def call(self, request: str, *args):
        if self.sender is None or self.proc.exitcode is not None:
            reply = None
        else:
            self.sender.send((request, args))
            try:
                reply = _receive(self.conn, self.proc, self.timeout_s)
            except (BrokenPipeError, EOFError, OSError):
                reply = None
        if reply is TIMED_OUT:
            self.close(kill=True)
            raise WorkerFailed(timeout_error(self.path, self.timeout_s))
        if reply is None:
            self.close(kill=True)
            if self.sender is not None and self.sender.error is not None and (self.proc.exitcode or 0) > 0:
                raise WorkerFailed(_start_error(self.path, f"exit code {self.proc.exitcode} before it read its job"))
            raise WorkerFailed(crash_error(self.path, self.proc.exitcode, self.max_memory))
        status, value = reply
        if status == "error":
            self.close()
            raise WorkerFailed(value)
        return value

    def close(self, kill: bool = False) -> None:
        if self.proc.is_alive() and not kill and self.sender is not None:
            self.sender.send(None)  # "stop": the child closes its runner and returns
            self.proc.join(timeout=30)
        if self.proc.is_alive():  # hung, or sent its result but hangs in interpreter teardown
            self.proc.kill()
        self.proc.join()
        if self.sender is not None:
            self.sender.stop()  # a write still pending fails now that the child is gone
        self.conn.close()


class _Sender:
    """Writes messages to the child in order from a daemon thread, so that no caller ever blocks on a full
    pipe (a child that is not reading: still starting, hung, or never started)."""

    def __init__(self, conn):
        self.conn = conn
        self.queue: queue.SimpleQueue = queue.SimpleQueue()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="bench-child-sender", daemon=True)
        self.thread.start()

    def send(self, msg) -> None:
        self.queue.put((True, msg))

    def stop(self, wait_s: float = 5.0) -> None:
        self.queue.put((False, None))
        self.thread.join(wait_s)

    def _run(self) -> None:
        while True:
            more, msg = self.queue.get()
            if not more:
                return
            try:
                self.conn.send(msg)
            except (OSError, ValueError) as exc:  # the child is gone (EPIPE), or the pipe was closed
                self.error = exc
                return


def _start_error(path, detail: str) -> dict:
    return error_entry("crash", f"The process to benchmark {path} could not start ({detail}).",
                       "a Python interpreter (sys.executable) that can import resnet-deploy and its runtimes",
                       "check the Python installation; reinstall resnet-deploy into this environment")


def open_worker(spec: FileSpec, isolate: bool, timeout_s: float | None, max_memory: int | None = None):
    """A worker for ``spec``: its own child (``isolate``; ``max_memory`` caps it) or this process."""
    if isolate:
        return ChildWorker(spec, timeout_s, max_memory=max_memory)
    return LocalWorker(spec, timeout_s)


class _Failed(Exception):
    def __init__(self, error: dict):
        self.error = error


def _answer(session: FileSession, request: str, args: tuple, progress):
    """One request to a FileSession; any failure becomes ``_Failed`` with the file's error entry."""
    if request not in REQUESTS:
        raise ValueError(f"unknown request {request!r}")
    try:
        return getattr(session, request)(*args, progress=progress)
    except ResnetDeployError as exc:
        raise _Failed(error_dict(exc)) from None
    except Exception as exc:  # a runtime failing in a way nobody anticipated: keep the traceback
        from resnet_deploy.untrusted.child import is_memory_error

        if is_memory_error(exc):  # under the cap an allocation failed (MemoryError or the runtime's own words)
            raise _Failed(_memory_error(session.spec.path)) from None
        raise _Failed(unexpected_error(exc, session.spec.path, traceback.format_exc(limit=8))) from None


def _memory_error(path) -> dict:
    from resnet_deploy.untrusted.files import format_bytes

    cap = f"--max-memory {format_bytes(_CAP[0])}" if _CAP[0] else "the machine's memory"
    return error_entry("memory", f"Benchmarking {path} needed more memory than its process may use ({cap}).",
                       "a file whose runtime fits in the memory cap of its process",
                       "raise --max-memory if you trust the file and the machine has the memory (a small file "
                       "that needs gigabytes is built to exhaust memory), or lower --batch-size")


class _sigint_blocked:
    """Block SIGINT in this thread for the ``with`` block (a Ctrl-C meanwhile is delivered at its end)."""

    def __enter__(self):
        self.blocked = hasattr(signal, "pthread_sigmask")
        if self.blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})

    def __exit__(self, *exc):
        if self.blocked:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})


_CAP = [None]  # the child's memory cap, for its error messages


def _child_main(conn, max_memory: int | None = None) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle (module docstring)
    if hasattr(signal, "pthread_sigmask"):
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a pending one is now discarded
    from resnet_deploy.cli_common import quiet_frameworks
    from resnet_deploy.untrusted.limits import apply_memory_cap

    apply_memory_cap(max_memory)  # before anything of the file is read
    _CAP[0] = max_memory
    quiet_frameworks()  # honours --verbose; also the libraries' Python warnings in the child
    try:
        spec = conn.recv()  # the first message: what to open
    except (EOFError, OSError):
        conn.close()
        return
    session = FileSession(spec, reset_peak=True)
    heartbeat = lambda stage: conn.send((PROGRESS, stage))  # noqa: E731
    try:
        while True:
            msg = conn.recv()
            if msg is None:
                break
            request, args = msg
            try:
                conn.send(("ok", _answer(session, request, args, heartbeat)))
            except _Failed as exc:
                conn.send(("error", exc.error))
                break
    except (EOFError, OSError):  # the parent went away
        pass
    finally:
        session.close()
        conn.close()


def _receive(conn, proc, timeout_s: float | None = None):
    """The child's reply; None when it died without sending one; ``TIMED_OUT`` when it made no
    progress for ``timeout_s`` seconds (None: wait as long as it lives). Progress is a
    ``(PROGRESS, stage)`` message. Polls rather than trusting EOF: a descriptor inherited elsewhere
    can keep the pipe open after the child is gone."""
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    while True:
        if conn.poll(0.2):
            try:
                msg = conn.recv()
            except EOFError:
                return None
            if not _is_progress(msg):
                return msg
            deadline = None if timeout_s is None else time.monotonic() + timeout_s
            continue
        if not proc.is_alive():
            while conn.poll(0):
                msg = conn.recv()
                if not _is_progress(msg):
                    return msg
            return None
        if deadline is not None and time.monotonic() >= deadline:
            return TIMED_OUT


def _is_progress(msg) -> bool:
    return isinstance(msg, tuple) and len(msg) == 2 and msg[0] == PROGRESS


__all__ = ["ChildWorker", "LocalWorker", "WorkerFailed", "open_worker", "PROGRESS", "TIMED_OUT"]
