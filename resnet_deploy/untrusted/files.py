"""Opening files other people made: regular files only, bounded JSON, checksums compared.

- ``check_regular`` / ``open_regular``: a FIFO, a device or a socket is refused before it is read (a FIFO
  named ``x.png`` would block ``open`` forever; ``/dev/zero`` never ends). ``open_regular`` opens without
  blocking and checks the descriptor it got, so a file swapped for a FIFO between the check and the open is
  refused too.
- ``read_json``: at most ``MAX_JSON_BYTES``, UTF-8, an object at the top, nested at most ``MAX_JSON_DEPTH``
  levels (a 200,000-deep document is refused, not a ``RecursionError``), numbers with at most 4,300 digits.
- ``check_sha256``: the file's sha256 against the one its manifest records.
- ``parse_memory`` / ``format_bytes``: ``--max-memory`` values ("2G", "512M", "1.5GiB").
"""

from __future__ import annotations

import errno
import json
import os
import re
import stat
from pathlib import Path

from resnet_deploy.errors import UntrustedFileError
from resnet_deploy.terminal import safe

MAX_JSON_BYTES = 16 << 20  # a manifest with the INT8 search's per-layer tables is well under 1 MiB
MAX_JSON_DEPTH = 64  # export writes at most 5 levels
DEFAULT_MAX_MEMORY = 2 << 30  # --max-memory default: 2 GiB for the process that loads and runs a file

_KINDS = ((stat.S_ISFIFO, "FIFO (named pipe)"), (stat.S_ISCHR, "character device"),
          (stat.S_ISBLK, "block device"), (stat.S_ISSOCK, "socket"), (stat.S_ISDIR, "folder"))


def kind_of(mode: int) -> str:
    """"regular file", "FIFO (named pipe)", "character device", "block device", "socket" or "folder"."""
    for test, name in _KINDS:
        if test(mode):
            return name
    return "regular file" if stat.S_ISREG(mode) else "special file"


def os_error(path: str | os.PathLike, exc: OSError, what: str = "file") -> UntrustedFileError:
    """A clear error for ``exc`` raised while opening or reading ``path``."""
    p = safe(path)
    if exc.errno == errno.ENOENT:
        return UntrustedFileError(f"{p} does not exist.", expected=f"an existing {what}", fix="check the path")
    if exc.errno in (errno.EACCES, errno.EPERM):
        return UntrustedFileError(f"{p} cannot be read (permission denied).", expected=f"a readable {what}",
                                  fix="check the file's permissions")
    if exc.errno == errno.ENAMETOOLONG:
        return UntrustedFileError(f"{p[:80]}... is too long a name for this file system.",
                                  expected="names of at most 255 bytes, paths of at most 4096",
                                  fix="rename the file or move it to a shorter path")
    if exc.errno == errno.ENOTDIR:
        return UntrustedFileError(f"{p}: a part of this path is a file, not a folder.", fix="check the path")
    if exc.errno == errno.ELOOP:
        return UntrustedFileError(f"{p} is a loop of symbolic links.", fix="point the link at the file itself")
    return UntrustedFileError(f"{p} cannot be read: {exc.strerror or exc}.", expected=f"a readable {what}",
                              fix="check the path and the file system")


def check_regular(path: str | os.PathLike, what: str = "file", allow_dir: bool = False) -> os.stat_result:
    """``path``'s stat (symbolic links followed) when it is a regular file (or, with ``allow_dir``, a folder);
    else an ``UntrustedFileError`` saying what it is. Nothing is opened."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise os_error(path, exc, what) from None
    except ValueError:  # an embedded NUL byte
        raise UntrustedFileError(f"{safe(path)} is not a usable path (it holds a NUL byte).",
                                 fix="check the path") from None
    if stat.S_ISREG(st.st_mode) or (allow_dir and stat.S_ISDIR(st.st_mode)):
        return st
    raise not_regular(path, st.st_mode, what)


def not_regular(path, mode: int, what: str = "file") -> UntrustedFileError:
    kind = kind_of(mode)
    return UntrustedFileError(
        f"{safe(path)} is a {kind}, not a regular file.",
        expected=f"a regular {what}" + (" (or a SavedModel folder)" if what == "model" else ""),
        fix="pass the file itself: FIFOs, devices and sockets are never read (reading one can block forever "
            "or never end)" if kind != "folder" else "pass a file inside it")


def open_regular(path: str | os.PathLike, what: str = "file"):
    """A binary file object for ``path`` when it is a regular file. The open itself cannot block (O_NONBLOCK,
    cleared again for reading) and the descriptor is checked, not only the name."""
    check_regular(path, what)
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        fd = os.open(path, flags)
    except OSError as exc:
        raise os_error(path, exc, what) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise not_regular(path, st.st_mode, what)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def read_bytes(path: str | os.PathLike, limit: int, what: str = "file") -> bytes:
    """The whole of a regular file of at most ``limit`` bytes; a larger one is refused unread."""
    with open_regular(path, what) as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise UntrustedFileError(f"{safe(path)} is larger than {format_bytes(limit)}.",
                                 expected=f"a {what} of at most {format_bytes(limit)}",
                                 fix="check that this is the right file")
    return data


def read_json(path: str | os.PathLike, what: str = "manifest", max_bytes: int = MAX_JSON_BYTES,
              max_depth: int = MAX_JSON_DEPTH) -> dict:
    """A JSON object from ``path``, bounded in size and depth; anything else is an ``UntrustedFileError``
    naming the file. NaN and Infinity are read as floats: the fields that are used are checked for them."""
    data = read_bytes(path, max_bytes, what)
    fix = f"re-export the artifact, or delete {safe(Path(path).name)} to use the defaults"
    try:
        text = data.decode("utf-8")
        doc = json.loads(text)
    except UnicodeDecodeError as exc:
        raise UntrustedFileError(f"The {what} {safe(path)} is not UTF-8 text ({exc.reason} at byte {exc.start}).",
                                 expected="a JSON file", fix=fix) from None
    except RecursionError:
        raise UntrustedFileError(f"The {what} {safe(path)} is nested too deeply to read.",
                                 expected=f"JSON nested at most {max_depth} levels", fix=fix) from None
    except ValueError as exc:  # JSONDecodeError, or an integer of more than 4,300 digits
        raise UntrustedFileError(f"The {what} {safe(path)} is not valid JSON: {safe(str(exc)[:200])}",
                                 expected="a JSON object", fix=fix) from None
    if not isinstance(doc, dict):
        raise UntrustedFileError(f"The {what} {safe(path)} holds a JSON {_json_type(doc)}, not an object.",
                                 expected='a JSON object ({"format": ..., "class_names": [...], ...})', fix=fix)
    if json_depth(doc) > max_depth:
        raise UntrustedFileError(f"The {what} {safe(path)} is nested more than {max_depth} levels deep.",
                                 expected=f"JSON nested at most {max_depth} levels", fix=fix)
    return doc


def _json_type(v) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean",
            type(None): "null"}.get(type(v), type(v).__name__)


def json_depth(doc) -> int:
    """How deeply lists and objects nest in ``doc`` (a scalar: 0), without recursion."""
    deepest, todo = 0, [(doc, 1)]
    while todo:
        v, d = todo.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            todo.extend((c, d + 1) for c in v if isinstance(c, (dict, list)))
    return deepest


SHA256 = re.compile(r"[0-9a-fA-F]{64}")


def check_sha256(path: str | os.PathLike, expected, manifest: str | os.PathLike) -> str:
    """The sha256 of ``path``; an ``UntrustedFileError`` when its manifest records another one."""
    if not (isinstance(expected, str) and SHA256.fullmatch(expected)):
        raise UntrustedFileError(f"The manifest {safe(manifest)} records sha256 {safe(repr(expected)[:80])}.",
                                 expected="64 hex digits, the sha256 export computed",
                                 fix="re-export the artifact, or delete the manifest to use the file with defaults")
    with open_regular(path, "model") as fh:  # not sha256_file(path): that would open a FIFO
        actual = sha256_file_object(fh)
    if actual != expected.lower():
        name = safe(Path(path).name)
        raise UntrustedFileError(
            f"{safe(path)} has sha256 {actual[:16]}…, but its manifest {safe(Path(manifest).name)} was written for "
            f"a file with sha256 {expected[:16]}…: the file was changed, damaged or replaced after export.",
            expected="the file the manifest describes (export writes the two together)",
            fix=f"re-export it or restore the original; if {name} is another file on purpose, delete the manifest "
                "(then it runs with the default preprocessing and CIFAR-10 class names)")
    return actual


def sha256_file_object(fh, chunk: int = 1 << 20) -> str:
    import hashlib

    h = hashlib.sha256()
    for block in iter(lambda: fh.read(chunk), b""):
        h.update(block)
    return h.hexdigest()


_UNITS = {"": 1, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": 1 << 20, "mb": 1 << 20, "mib": 1 << 20,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
MIN_MEMORY = 64 << 20
MAX_MEMORY = 1 << 60  # 1 EiB: far past any machine, well inside the C long setrlimit takes


def parse_memory(text: str | int, option: str = "--max-memory") -> int:
    """"2G", "512M", "1.5GiB", "2147483648" -> bytes (binary units: G = GiB); 64 MiB to 1 EiB."""
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        m = re.fullmatch(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([a-zA-Z]*)\s*", str(text))
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise UntrustedFileError(f"{option} {safe(text)!r} is not an amount of memory.",
                                     expected="a number with a unit: 512M, 2G, 1.5G (binary: G = GiB)",
                                     fix=f"e.g. {option} 2G")
        value = int(float(m.group(1)) * _UNITS[unit])
    if value > MAX_MEMORY:  # setrlimit takes a C long: 99999999T failed in the child as "could not start"
        raise UntrustedFileError(f"{option} {safe(text)} is more than a memory limit can hold.",
                                 expected=f"at most {format_bytes(MAX_MEMORY)} (binary units: 2G, 512M)",
                                 fix=f"e.g. {option} 2G, or the machine's memory")
    if value < MIN_MEMORY:
        raise UntrustedFileError(f"{option} {safe(text)} is below {format_bytes(MIN_MEMORY)}.",
                                 expected=f"at least {format_bytes(MIN_MEMORY)} (a runtime alone takes about 100 MiB)",
                                 fix=f"e.g. {option} 2G")
    return value


def format_bytes(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= size:
            v = n / size
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} bytes"
