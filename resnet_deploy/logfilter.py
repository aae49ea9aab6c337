"""The quiet terminal: framework logs kept out of the user's terminal unless asked for.

The frameworks' start-up logs (absl/glog lines from TensorFlow's C++ core, the oneDNN notice, CUDA
probing on a CPU machine), the TFLite converter's C++ prints and library warnings are kept out of the
user's terminal unless ``resnet-deploy --verbose`` asks for them. TensorFlow 2.21 writes several of these
lines to file descriptor 2 before any Python-level filter or ``TF_CPP_MIN_LOG_LEVEL`` applies (they are
logged before ``absl::InitializeLog``), so environment variables alone cannot hide them:
``FrameworkLogFilter`` redirects fd 2 itself and forwards every line that is not framework chatter.

Library code (bench's child processes, the commands) imports this module; it needs nothing but the
standard library, so a child process does not import the CLI's Typer types to stay quiet.
"""

from __future__ import annotations

import collections
import io
import os
import re
import sys
import tempfile
import threading
import warnings

VERBOSE_ENV = "RESNET_DEPLOY_VERBOSE"  # "1": let the frameworks' logs through (set by --verbose, inherited by children)

# Libraries whose Python warnings are hidden in quiet mode (matched against the warning's module name).
FRAMEWORK_MODULES = ("tensorflow", "tf_keras", "keras", "tf2onnx", "onnx", "onnxruntime", "ai_edge_litert",
                     "tensorflow_model_optimization", "absl", "google.protobuf", "h5py", "jax", "torch")

# One line each; a line of framework chatter matches one of these. Kept specific on purpose: anything
# else written to stderr (the tool's own messages, a traceback, an unknown library error) still shows.
FRAMEWORK_LOG_PATTERNS = tuple(re.compile(p) for p in (
    r"^WARNING: All log messages before absl::InitializeLog\(\) is called are written to STDERR",
    r"^[IWE]\d{4} \d\d:\d\d:\d+\.\d+\s+\d+\s+\S+:\d+\] ",  # absl/glog C++ lines: I/W/E, not F (fatal)
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d\.\d+: [IWE] \S+:\d+\] ",  # TSL's older C++ log format
    r"^INFO: Created TensorFlow Lite \w+ delegate for CPU\.",  # LiteRT at interpreter creation
    r"^INFO: Initialized TensorFlow Lite runtime\.",
    r"^fully_quantize: \d+, inference_type: \d+",  # TFLite converter's C++ printf
    r"(site|dist)-packages\S*\.py:\d+: \w*Warning: ",  # a library's Python warning (+ its source line)
    r"^(DEBUG|INFO|WARNING):(absl|tensorflow|tf2onnx|keras|jax|h5py)[:.]",  # logging.basicConfig format
    r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ - (DEBUG|INFO|WARNING) - (tf2onnx|onnx)",  # tf2onnx's logger
    r"\[[VIW]:onnxruntime:",  # ONNX Runtime's own log
))
_WARNING_LINE = re.compile(r"\.py:\d+: \w*Warning: ")
MAX_WARNING_LINES = 20


def is_framework_log(line: str) -> bool:
    """True for one line of framework chatter (see ``FRAMEWORK_LOG_PATTERNS``)."""
    return any(p.search(line) for p in FRAMEWORK_LOG_PATTERNS)


def verbose_requested() -> bool:
    return os.environ.get(VERBOSE_ENV, "") not in ("", "0")


def quiet_frameworks() -> None:
    """Set the frameworks' own log switches before they are imported (call before importing them).

    C++ logging: ``TF_CPP_MIN_LOG_LEVEL`` (TensorFlow, LiteRT), gRPC and absl; Python: the libraries'
    warnings and loggers. With ``--verbose`` (``RESNET_DEPLOY_VERBOSE=1``) nothing is changed. Lines
    printed before these switches take effect are kept out by ``FrameworkLogFilter``.
    """
    if verbose_requested():
        return
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
    os.environ.setdefault("GLOG_minloglevel", "2")
    os.environ.setdefault("ABSL_MIN_LOG_LEVEL", "2")
    modules = "|".join(re.escape(m) for m in FRAMEWORK_MODULES)
    warnings.filterwarnings("ignore", module=rf"({modules})(\.|$)")
    import logging

    for name in ("tensorflow", "absl", "tf2onnx", "h5py", "jax"):
        logging.getLogger(name).setLevel(logging.ERROR)


class FrameworkLogFilter:
    """Context manager: file descriptor 2 goes to a temporary file for the block; a thread forwards each
    line that is not framework chatter (``is_framework_log``) to the real stderr as it arrives.

    Works at the descriptor level, so it also catches C++ writes and child processes (bench's spawn
    children inherit the descriptor). A file, not a pipe: a writer never blocks on it, even when the
    C++ code that writes holds the GIL the forwarding thread needs. Hidden lines are counted and the
    last ``keep`` of them kept (``hidden``, ``hidden_lines``), so an error message can say how to see them.
    Nestable: an inner filter forwards into the outer one. Without ``os.pread`` (Windows) it does nothing.

    Usage, around a conversion call in library code::

        with FrameworkLogFilter():
            converter.convert()
    """

    def __init__(self, keep: int = 200, poll_s: float = 0.05):
        self.hidden = 0
        self.hidden_lines: collections.deque[str] = collections.deque(maxlen=keep)
        self._poll_s = poll_s
        self._saved_fd: int | None = None
        self._file = None
        self._offset = 0
        self._partial = b""
        self._warning_tail: list[bytes] | None = None  # lines after a hidden warning's first line, held
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._terminal: io.TextIOBase | None = None

    @property
    def active(self) -> bool:
        return self._saved_fd is not None

    def __enter__(self) -> "FrameworkLogFilter":
        if not hasattr(os, "pread"):
            return self
        try:
            saved = os.dup(2)
        except OSError:  # no stderr at all: nothing to filter
            return self
        _flush_python_stderr()
        self._file = tempfile.TemporaryFile(prefix="resnet-deploy-stderr-")
        os.dup2(self._file.fileno(), 2)
        self._saved_fd = saved
        self._thread = threading.Thread(target=self._pump, name="framework-log-filter", daemon=True)
        self._thread.start()
        _ACTIVE.append(self)
        return self

    def __exit__(self, *exc) -> None:
        if self._saved_fd is None:
            return
        _flush_python_stderr()
        os.dup2(self._saved_fd, 2)  # new writes go straight to the real stderr again
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.drain(final=True)
        if self._terminal is not None:
            self._terminal.flush()
            self._terminal = None
        os.close(self._saved_fd)
        self._saved_fd = None
        self._file.close()
        if self in _ACTIVE:
            _ACTIVE.remove(self)

    def terminal(self) -> io.TextIOBase:
        """A text stream on the real stderr (a terminal stays a terminal: Rich keeps its colours)."""
        if self._terminal is None:
            self._terminal = open(self._saved_fd, "w", closefd=False, encoding=sys.stderr.encoding or "utf-8",
                                  errors="replace", buffering=1)
        return self._terminal

    def drain(self, final: bool = False) -> None:
        """Forward everything written so far (the thread does this every ``poll_s``)."""
        if self._file is None or self._saved_fd is None:
            return
        with self._lock:
            while True:
                chunk = os.pread(self._file.fileno(), 1 << 16, self._offset)
                if not chunk:
                    break
                self._offset += len(chunk)
                *lines, self._partial = (self._partial + chunk).split(b"\n")
                for line in lines:
                    self._line(line, b"\n")
            if final and self._partial:
                self._line(self._partial, b"")
                self._partial = b""
            if final:
                self._release_tail()

    def _pump(self) -> None:
        while not self._stop.wait(self._poll_s):
            self.drain()

    def _line(self, raw: bytes, end: bytes) -> None:
        text = raw.decode("utf-8", errors="replace").rstrip("\r")
        if self._warning_tail is not None:
            # A Python warning is "file:line: XWarning: message", more message lines, then the indented
            # source line ("  warnings.warn(msg)"). Hold the lines after a hidden warning's first line
            # until that source line ends it; more than MAX_WARNING_LINES without it: they were not part
            # of the warning, and are forwarded.
            if text[:1].isspace():
                for held in self._warning_tail:
                    self._hide(held.decode("utf-8", errors="replace"))
                self._warning_tail = None
                self._hide(text)
                return
            if not is_framework_log(text) and len(self._warning_tail) < MAX_WARNING_LINES:
                self._warning_tail.append(raw + end)
                return
            self._release_tail()
        if is_framework_log(text):
            if _WARNING_LINE.search(text):
                self._warning_tail = []
            self._hide(text)
            return
        os.write(self._saved_fd, raw + end)

    def _release_tail(self) -> None:
        for held in self._warning_tail or ():
            os.write(self._saved_fd, held)
        self._warning_tail = None

    def _hide(self, text: str) -> None:
        self.hidden += 1
        self.hidden_lines.append(text)


_ACTIVE: list[FrameworkLogFilter] = []


def active_log_filter() -> FrameworkLogFilter | None:
    """The outermost filter of this process, when one is on (the CLI's, without --verbose)."""
    return _ACTIVE[0] if _ACTIVE else None


def _flush_python_stderr() -> None:
    try:
        sys.stderr.flush()
    except (AttributeError, ValueError, OSError):
        pass
