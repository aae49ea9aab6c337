"""Atomic writes and hashing: nothing half-written ever carries a final name."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from resnet_deploy.errors import OutputExistsError


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file in a folder (sorted by relative path)."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
    return h.hexdigest()


def check_can_write(path: str | os.PathLike, force: bool, what: str = "file") -> None:
    p = Path(path)
    if p.exists() and not force:
        raise OutputExistsError(
            f"{p} already exists.",
            expected=f"a path where no {what} exists yet",
            fix="choose another output path or pass --force to overwrite it",
        )


ASIDE_SUFFIX = ".old"  # ``.<name>.old``: the previous folder, kept while its replacement is renamed in


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it onto ``final`` only on success.

    Works for files and for folders (a SavedModel, a checkpoint): whatever the caller creates at
    the yielded path replaces ``final``. A file replaces a file in one ``os.replace``. A folder
    cannot be replaced in one rename, so the old one is first renamed aside (``aside_path``),
    the new one renamed in, and only then the aside copy deleted: at every instant a complete
    copy carries either the final name or the aside name (``existing_version`` finds it, and
    ``recover_replaced`` puts it back after a crash). On any exception the temporary is removed
    and an old folder already moved aside is put back.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{final.name}.", suffix=_temp_suffix(final, suffix), dir=final.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    tmp.unlink()  # the caller creates it (some writers refuse an existing file)
    aside = aside_path(final)
    moved_aside = False
    try:
        yield tmp
        if not tmp.exists():
            raise FileNotFoundError(f"writer produced nothing at {tmp}")
        if final.is_dir() and not final.is_symlink():  # os.replace cannot replace a non-empty folder
            if aside.exists():  # a crash's leftover; ``final`` is complete, so it is stale
                _remove(aside)
            moved_aside = True  # before the rename: the undo below checks that ``aside`` exists
            os.replace(final, aside)
            os.replace(tmp, final)
            _remove(aside)
        else:
            os.replace(tmp, final)
            if final.is_dir() and aside.exists():  # a crash's leftover, now superseded by ``final``
                _remove(aside)
    except BaseException:
        _remove(tmp)
        if moved_aside and aside.exists() and not final.exists():  # failed between the renames: undo
            os.replace(aside, final)
        raise


def _temp_suffix(final: Path, suffix: str | None) -> str:
    return suffix if suffix is not None else (final.suffix + ".tmp")


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def aside_path(final: str | os.PathLike) -> Path:
    """Where ``atomic_path`` keeps the previous folder while the new one is renamed onto ``final``."""
    final = Path(final)
    return final.with_name(f".{final.name}{ASIDE_SUFFIX}")


def existing_version(final: str | os.PathLike) -> Path | None:
    """``final`` if it exists; else its aside copy (a process killed between ``atomic_path``'s two
    renames leaves the previous complete version there); else None."""
    final = Path(final)
    if final.exists():
        return final
    aside = aside_path(final)
    return aside if aside.exists() else None


def recover_replaced(final: str | os.PathLike) -> bool:
    """Finish or undo a replacement a crash interrupted: put the aside copy back when ``final`` is
    missing, delete it when ``final`` is there. Returns True when the aside copy was put back.
    Call it only where no other process is writing ``final``."""
    final = Path(final)
    aside = aside_path(final)
    if not aside.exists():
        return False
    if final.exists():
        _remove(aside)
        return False
    os.replace(aside, final)
    return True


def stale_temporaries(final: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Temporaries that ``atomic_path(final, suffix)`` left beside ``final`` when its process was
    killed (SIGKILL, power loss: no ``except`` ran). ``suffix`` as given to ``atomic_path``.
    Only call it where no other process is writing ``final`` at the same time."""
    final = Path(final)
    if not final.parent.is_dir():
        return []
    pattern = re.compile(re.escape(f".{final.name}.") + r"[a-z0-9_]{8}" + re.escape(_temp_suffix(final, suffix)) + "$")
    return sorted(p for p in final.parent.iterdir() if pattern.match(p.name))


def remove_stale_temporaries(final: str | os.PathLike, suffix: str | None = None) -> list[Path]:
    """Delete what ``stale_temporaries`` finds; returns the paths removed."""
    found = stale_temporaries(final, suffix)
    for p in found:
        _remove(p)
    return found


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def _json_default(o: Any) -> Any:
    import enum

    import numpy as np

    if isinstance(o, enum.Enum):
        return o.value
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if hasattr(o, "to_dict"):
        return o.to_dict()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def sidecar_path(path: str | os.PathLike) -> Path:
    """The JSON that travels with a model or artifact: ``model.keras`` -> ``model.keras.json``."""
    p = Path(path)
    return p.with_name(p.name + ".json")


# ----------------------------------------------------------------------------------------------
# One writer per output folder
# ----------------------------------------------------------------------------------------------
LOCK_PREFIX = ".resnet-deploy-lock."  # the lock file sits beside the folder: <parent>/.resnet-deploy-lock.<name>


def lock_path(folder: str | os.PathLike) -> Path:
    folder = Path(folder).absolute()
    return folder.parent / f"{LOCK_PREFIX}{folder.name}"


@contextlib.contextmanager
def output_lock(folder: str | os.PathLike, command: str | None = None) -> Iterator[Path]:
    """Hold an exclusive lock on ``folder`` (which may not exist yet) for the whole block, after checking
    that the folder can be written (``check_writable``).

    An advisory ``fcntl.flock`` on a file beside the folder: a second run that wants the same folder
    is refused with the holder's pid and command line. The kernel drops the lock when its process
    dies, so a lock file a killed run left behind is recognised as free and simply taken over; the
    file is removed when the block ends.
    """
    import sys

    check_writable(folder)  # a file in its place or an unwritable location: refused before the lock is made
    path = lock_path(folder)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = _acquire(path, folder)
    try:
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps({"pid": os.getpid(), "command": command or " ".join(sys.argv)}).encode())
        os.fsync(fd)
        try:
            yield path
        finally:
            with contextlib.suppress(FileNotFoundError):
                path.unlink()  # while still holding the lock: no one else can be between open and flock here
    finally:
        os.close(fd)


def _acquire(path: Path, folder) -> int:
    """Open and flock the lock file; retry when the file we locked was unlinked by a finishing holder
    meanwhile (then it is no longer the file at ``path``, and a third run could lock that one)."""
    import fcntl

    from resnet_deploy.errors import OutputLockedError

    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{folder} is in use by another run (pid {holder.get('pid', '?')}: {holder.get('command', '?')}).",
                expected="one run at a time per output folder",
                fix="wait for that run to finish, or choose another --out") from None
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            return fd
        os.close(fd)


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return json.loads(os.read(fd, 4096).decode() or "{}")
    except (OSError, ValueError):
        return {}


def check_writable(path: str | os.PathLike, kind: str = "folder", flag: str = "--out") -> None:
    """Before any work: ``path`` (a folder, or a file's path) can be created or written here.

    Refuses a folder path that is an existing file, a file path that is an existing folder, a path
    under a file, and a location where a probe file cannot be created (read-only mount, permissions)."""
    from resnet_deploy.errors import ResnetDeployError

    p = Path(path)
    if kind == "folder" and p.exists() and not p.is_dir():
        raise ResnetDeployError(f"{flag} {p} is a file, not a folder.", expected="a folder, or a path where one can "
                                "be created", fix=f"choose another {flag}, or move the file away")
    if kind == "file" and p.is_dir():
        raise ResnetDeployError(f"{flag} {p} is a folder.", expected="a file path", fix=f"e.g. {flag} {p / 'report'}")
    probe_dir = p if kind == "folder" else p.parent
    existing = next((a for a in (probe_dir, *probe_dir.parents) if a.exists()), Path("."))
    if not existing.is_dir():
        raise ResnetDeployError(f"{flag} {p} lies under {existing}, which is a file.",
                                expected="a path whose parents are folders", fix=f"choose another {flag}")
    try:
        fd, probe = tempfile.mkstemp(prefix=".resnet-deploy-probe.", dir=existing)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise ResnetDeployError(f"Cannot write into {existing} ({exc.strerror}), where {flag} {p} would go.",
                                expected="a writable location", fix=f"choose a writable {flag}") from exc
