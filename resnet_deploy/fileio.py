"""Staged, fsynced writes (nothing half-written carries a final name), hashing, one writer per folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
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
STAGE_PREFIX = ".resnet-deploy-stage."  # ``.resnet-deploy-stage.<pid>.<random>``: one command's staged outputs


# ----------------------------------------------------------------------------------------------
# One crash-safety mechanism: stage, fsync, rename
# ----------------------------------------------------------------------------------------------
class Stage:
    """A hidden folder inside ``folder`` where outputs are written under their final names, then
    committed: fsynced (files and the stage folder) and renamed into ``folder``, which is fsynced in turn.

    Every writer of the package goes through it (``atomic_path`` is a one-file stage), so a killed
    process leaves at most a stage folder, never a half-written file under a final name, and one
    sweep (``sweep_stages``) clears what killed runs left. The stage's name carries its process id:
    a stage whose process is gone is stale, and any later stage in the same folder removes it, so a
    sweep never touches the stage of a run that is still writing.

    ``commit(name, *companions)`` puts a file (or folder) in place together with what describes it
    (a sidecar, a manifest): the old file goes first, then the companions take their names, then the
    file itself. An exception in between (Ctrl-C) removes the companions whose file is not there; only
    a kill can leave a companion without its file (recognised, and refused or replaced by the next
    run), and nothing leaves a file beside the description of another one. A folder cannot
    replace a folder in one rename: the old one is renamed aside (``aside_path``) first and deleted
    after, so at every instant a complete copy carries the final name or the aside name
    (``existing_version``, ``recover_replaced``).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        sweep_stages(self.folder)
        self.root = Path(tempfile.mkdtemp(prefix=f"{STAGE_PREFIX}{os.getpid()}.", dir=self.folder))

    def path(self, name: str) -> Path:
        """Where to write the output that will be ``folder/name`` (the writer creates it)."""
        return self.root / name

    def commit(self, name: str, *companions: str) -> Path:
        staged = [self.root / n for n in (name, *companions)]
        missing = [str(p) for p in staged if not p.exists()]
        if missing:
            raise FileNotFoundError(f"writer produced nothing at {', '.join(missing)}")
        for p in staged:
            _fsync_tree(p)
        _fsync_dir(self.root)
        final = self.folder / name
        try:
            if companions and final.exists() and not final.is_dir():
                final.unlink()  # the old file goes before its description is replaced
            for n in companions:
                os.replace(self.root / n, self.folder / n)
            _replace(self.root / name, final)
        except BaseException:  # Ctrl-C or a disk error half-way: no description is left without its file
            if companions and not final.exists():
                for n in companions:
                    _remove(self.folder / n)
            raise
        _fsync_dir(self.folder)
        return final

    def discard(self) -> None:
        _remove(self.root)


@contextlib.contextmanager
def staged(folder: str | os.PathLike) -> Iterator[Stage]:
    """A ``Stage`` in ``folder``, removed when the block ends (what was not committed is discarded,
    also on an exception or Ctrl-C)."""
    stage = Stage(folder)
    try:
        yield stage
    finally:
        stage.discard()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a path to write ``final`` at (a file or a folder, under its own name and extension in a
    stage); it takes the final name, fsynced, only when the block succeeds."""
    final = Path(final)
    with staged(final.parent) as stage:
        yield stage.path(final.name)
        stage.commit(final.name)


def _replace(src: Path, final: Path) -> None:
    """Rename ``src`` onto ``final``; a folder onto a folder goes through the aside name."""
    aside = aside_path(final)
    if not (final.is_dir() and not final.is_symlink()):
        os.replace(src, final)
        if final.is_dir() and aside.exists():  # a crash's leftover, now superseded by ``final``
            _remove(aside)
        return
    if aside.exists():  # a crash's leftover; ``final`` is complete, so it is stale
        _remove(aside)
    os.replace(final, aside)
    try:
        os.replace(src, final)
    except BaseException:
        if aside.exists() and not final.exists():  # failed between the renames: undo
            os.replace(aside, final)
        raise
    _remove(aside)


def _fsync_tree(path: Path) -> None:
    """fsync a file, or every file and folder under a folder."""
    if path.is_dir():
        for sub in sorted(path.rglob("*")):
            (_fsync_dir if sub.is_dir() else _fsync_file)(sub)
        _fsync_dir(path)
    else:
        _fsync_file(path)


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:  # a platform without directory handles (Windows): renames are durable enough there
        return
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems refuse fsync on a folder; the files themselves are synced
    finally:
        os.close(fd)


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


def aside_path(final: str | os.PathLike) -> Path:
    """Where a commit keeps the previous folder while the new one is renamed onto ``final``."""
    final = Path(final)
    return final.with_name(f".{final.name}{ASIDE_SUFFIX}")


def existing_version(final: str | os.PathLike) -> Path | None:
    """``final`` if it exists; else its aside copy (a process killed between a commit's two
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


def stale_stages(folder: str | os.PathLike) -> list[Path]:
    """Stage folders in ``folder`` whose process is gone (killed: no ``finally`` ran)."""
    folder = Path(folder)
    if not folder.is_dir():
        return []
    found = []
    for p in folder.iterdir():
        if not p.name.startswith(STAGE_PREFIX):
            continue
        pid = p.name[len(STAGE_PREFIX):].split(".", 1)[0]
        if not pid.isdigit() or not _alive(int(pid)):
            found.append(p)
    return sorted(found)


def sweep_stages(folder: str | os.PathLike) -> list[Path]:
    """Delete what ``stale_stages`` finds; returns the paths removed."""
    found = stale_stages(folder)
    for p in found:
        _remove(p)
    return found


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def write_json(path: str | os.PathLike, obj: Any) -> None:
    """JSON as the package writes it (numpy scalars, enums and paths converted); not atomic by itself:
    for a file inside a ``Stage``."""
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n")


def write_json_atomic(path: str | os.PathLike, obj: Any) -> None:
    with atomic_path(path) as tmp:
        write_json(tmp, obj)


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
