"""Staged, fsynced writes (nothing half-written carries a final name), hashing, one writer per folder.

Outputs never replace a FIFO, a device or a socket (not even with ``--force``); names too long for the
file system, a full disk or quota, a read-only file system are an ``OutputWriteError`` saying so, with
nothing half-written left; the lock and aside names stay legal for any legal output name; the user's
cache folder falls back to a private temporary folder, and says so, when ``$HOME`` is empty or unset.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

from resnet_deploy.errors import OutputExistsError, OutputWriteError
from resnet_deploy.terminal import safe


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file in a folder (sorted by relative path). Only regular files are
    read (``untrusted.open_regular``): a FIFO or a device is an ``UntrustedFileError``, never a wait."""
    from resnet_deploy.untrusted.files import open_regular

    p = Path(path)
    h = hashlib.sha256()
    files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    for f in files:
        if p.is_dir():
            h.update(str(f.relative_to(p)).encode())
        with open_regular(f) as fh:
            for block in iter(lambda: fh.read(chunk), b""):
                h.update(block)
    return h.hexdigest()


def special_kind(path: str | os.PathLike) -> str | None:
    """"FIFO (named pipe)", "character device", "block device" or "socket" when ``path`` (links followed) is
    one; None for a regular file, a folder or nothing."""
    import stat

    from resnet_deploy.untrusted.files import kind_of

    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):
        return None
    return None if stat.S_ISREG(mode) or stat.S_ISDIR(mode) else kind_of(mode)


def check_can_write(path: str | os.PathLike, force: bool, what: str = "file") -> None:
    """Before any work: ``path`` may be written. A name too long is refused; an existing FIFO, device or
    socket always (``--force`` replaces files and folders only); any other existing path without ``force``."""
    p = Path(path)
    check_name_length(p, what)
    kind = special_kind(p)
    if kind is not None:
        raise OutputExistsError(
            f"{safe(p)} is a {kind}, not a {what}: resnet-deploy never writes over FIFOs, devices or sockets.",
            expected=f"a path where no {what} exists yet, or a regular file to replace",
            fix="choose another output path")
    if p.exists() and not force:
        raise OutputExistsError(
            f"{safe(p)} already exists.",
            expected=f"a path where no {what} exists yet",
            fix="choose another output path or pass --force to overwrite it",
        )


NAME_MAX = 255  # bytes in one name, where the file system does not say (ext4, xfs, btrfs, tmpfs)
PATH_MAX = 4096


def name_max(folder: Path) -> int:
    try:
        return int(os.pathconf(folder, "PC_NAME_MAX"))
    except (OSError, ValueError, AttributeError):
        return NAME_MAX


def check_name_length(path: str | os.PathLike, what: str = "file", flag: str | None = None) -> None:
    """An ``OutputWriteError`` when a part of ``path`` is longer than its file system allows (255 bytes on
    most) or the whole path longer than 4096 bytes."""
    p = Path(path)
    where = f"{flag} " if flag else ""
    if len(os.fsencode(str(p.absolute()))) >= PATH_MAX:
        raise OutputWriteError(f"The {what} path {where}{safe(str(p))[:80]}... is longer than {PATH_MAX} bytes.",
                               expected=f"a path of at most {PATH_MAX} bytes", fix="choose a shorter path")
    existing = next((a for a in (p.parent, *p.parent.parents) if _is_dir(a)), Path("."))
    limit = name_max(existing)
    for part in p.parts:
        if len(os.fsencode(part)) > limit:
            raise OutputWriteError(
                f"The {what} name {where}{safe(part)[:60]}... is {len(os.fsencode(part))} bytes long.",
                expected=f"names of at most {limit} bytes (this file system's limit)", fix="choose a shorter name")


def _is_dir(p: Path) -> bool:
    try:
        return p.is_dir()
    except (OSError, ValueError):
        return False


def short_name(name: str, prefix: str = "", suffix: str = "", limit: int = NAME_MAX) -> str:
    """``prefix + name + suffix``, or, when that is longer than ``limit`` bytes, ``prefix`` + the start of
    ``name`` + a hash of all of it + ``suffix`` (deterministic: every run finds the same name)."""
    full = f"{prefix}{name}{suffix}"
    if len(os.fsencode(full)) <= limit:
        return full
    digest = hashlib.sha256(os.fsencode(name)).hexdigest()[:16]
    room = limit - len(os.fsencode(f"{prefix}-{digest}{suffix}"))
    head = os.fsencode(name)[:max(room, 0)].decode("utf-8", "ignore")
    return f"{prefix}{head}-{digest}{suffix}"


WRITE_ERRNOS = {"ENOSPC": "no space left on device", "EDQUOT": "disk quota exceeded", "EFBIG": "file too large",
                "EROFS": "read-only file system", "ENAMETOOLONG": "name too long"}


def write_error(final: str | os.PathLike, exc: OSError) -> OutputWriteError | None:
    """An ``OutputWriteError`` for a write that failed for want of space, quota or a legal name; None for
    any other error (that one keeps its traceback)."""
    import errno

    names = {getattr(errno, k): (k, v) for k, v in WRITE_ERRNOS.items() if hasattr(errno, k)}
    if exc.errno not in names:
        return None
    code, text = names[exc.errno]
    return OutputWriteError(f"Could not write {safe(final)}: {text} ({code}). Nothing half-written was left: the "
                            "staged copy was removed and any earlier file of that name is unchanged.",
                            expected="room (and a legal name) for the output",
                            fix="free space or choose another location, then run the command again")


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
        for n in (name, *companions):
            kind = special_kind(self.folder / n)
            if kind is not None:  # a FIFO or device got there after the command's checks: never replace it
                raise OutputExistsError(f"{safe(self.folder / n)} is a {kind}: resnet-deploy never writes over "
                                        "FIFOs, devices or sockets.", expected="a regular file or a new name",
                                        fix="choose another output path")
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
    try:
        stage = Stage(folder)
    except OSError as exc:
        err = write_error(folder, exc)
        if err is None:
            raise
        raise err from exc
    try:
        yield stage
    except OSError as exc:  # disk full, quota, a name too long: one clear error, the stage removed below
        err = write_error(Path(folder) / _first_name(stage), exc)
        if err is None:
            raise
        raise err from exc
    finally:
        stage.discard()


def _first_name(stage: Stage) -> str:
    try:
        return next(iter(sorted(p.name for p in stage.root.iterdir())), "")
    except OSError:
        return ""


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
    """Where a commit keeps the previous folder while the new one is renamed onto ``final`` (a legal name for
    any legal ``final``: ``short_name``)."""
    final = Path(final)
    return final.with_name(short_name(final.name, ".", ASIDE_SUFFIX))


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
    """The lock file beside ``folder``; a name that the prefix would push past 255 bytes is shortened with a
    hash (``short_name``), the same for every run."""
    folder = Path(folder).absolute()
    return folder.parent / short_name(folder.name, LOCK_PREFIX)


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
    check_name_length(p, kind, flag)
    special = special_kind(p)
    if special is not None:
        raise OutputExistsError(f"{flag} {safe(p)} is a {special}: resnet-deploy never writes over FIFOs, devices "
                                "or sockets.", expected=f"a {kind} path", fix=f"choose another {flag}")
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


# ----------------------------------------------------------------------------------------------
# The user's cache folder
# ----------------------------------------------------------------------------------------------
_SAID: set[str] = set()


def home_or_temp() -> tuple[Path, str | None]:
    """``$HOME``, or, when it is empty, unset or relative, a private folder in the temporary folder
    (``private_temp_dir``) with a note saying so."""
    home = os.environ.get("HOME")
    if home and os.path.isabs(home):
        return Path(home), None
    folder = private_temp_dir()
    state = "not set" if home is None else ("empty" if home == "" else f"relative ({safe(home)})")
    return folder, (f"$HOME is {state}: caches go to {folder} instead of a home folder (set HOME, or "
                    "RESNET_DEPLOY_CACHE for bench's cache)")


def home_dir() -> Path:
    """``home_or_temp()``'s folder; its note, when there is one, goes to stderr once per process."""
    home, note = home_or_temp()
    if note and note not in _SAID:
        import sys

        _SAID.add(note)
        print(f"note: {note}", file=sys.stderr)
    return home


def user_cache_dir(name: str = "resnet-deploy") -> Path:
    """``~/.cache/<name>``; without a usable $HOME, ``<private temp folder>/.cache/<name>`` (``home_dir``)."""
    return home_dir() / ".cache" / name


def private_temp_dir() -> Path:
    """``<tmp>/resnet-deploy-<uid>``: created mode 0700; used only when it is a real folder owned by this user
    that nobody else can write (else a fresh ``mkdtemp`` folder), so no one else can plant files in it."""
    import stat

    uid = os.getuid() if hasattr(os, "getuid") else 0
    folder = Path(tempfile.gettempdir()) / f"resnet-deploy-{uid}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        st = os.lstat(folder)
        if stat.S_ISDIR(st.st_mode) and st.st_uid == uid and not st.st_mode & 0o022:
            return folder
    except OSError:
        pass
    return Path(tempfile.mkdtemp(prefix="resnet-deploy-"))
