"""One crash-safety mechanism (fileio.Stage): outputs are staged in a hidden folder, fsynced, then renamed
into place with what describes them; a killed writer leaves only a stage, which the next writer sweeps."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from resnet_deploy import fileio
from resnet_deploy.fileio import STAGE_PREFIX, atomic_path, sidecar_path, stale_stages, staged, sweep_stages


def _dead_pid() -> int:
    """The id of a process that has exited (and was reaped)."""
    out = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                         check=True).stdout
    return int(out)


def _stages(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(STAGE_PREFIX))


SLOW_WRITER = """
import sys, time
from pathlib import Path
from resnet_deploy.fileio import atomic_path
final = Path(sys.argv[1])
with atomic_path(final) as tmp:
    with open(tmp, "wb") as fh:
        fh.write(b"x" * 1_000_000)
        fh.flush()
        print("writing", flush=True)
        time.sleep(60)  # killed here, half-way through
        fh.write(b"y")
"""


def test_a_killed_writer_leaves_only_a_stage_and_the_next_writer_sweeps_it(tmp_path):
    final = tmp_path / "model.bin"
    final.write_bytes(b"old")
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "writing"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert final.read_bytes() == b"old"  # the final name still holds the complete old file
    left = _stages(tmp_path)
    assert len(left) == 1 and left[0].startswith(f"{STAGE_PREFIX}{proc.pid}.")
    assert (tmp_path / left[0] / "model.bin").stat().st_size == 1_000_000  # the half-written file is in the stage
    assert [p.name for p in stale_stages(tmp_path)] == left

    with atomic_path(tmp_path / "other.bin") as tmp:  # any later writer in the folder clears it
        tmp.write_bytes(b"1")
    assert _stages(tmp_path) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["model.bin", "other.bin"]


def test_a_live_writers_stage_is_never_swept(tmp_path):
    mine = tmp_path / f"{STAGE_PREFIX}{os.getpid()}.abcdefgh"  # this process: alive
    gone = tmp_path / f"{STAGE_PREFIX}{_dead_pid()}.abcdefgh"
    odd = tmp_path / f"{STAGE_PREFIX}notapid"
    for p in (mine, gone, odd):
        p.mkdir()
    assert sorted(p.name for p in sweep_stages(tmp_path)) == sorted([gone.name, odd.name])
    assert mine.exists()


def test_interrupt_inside_a_stage_leaves_nothing(tmp_path):
    final = tmp_path / "a.json"
    with pytest.raises(KeyboardInterrupt):
        with atomic_path(final) as tmp:
            tmp.write_text("{")
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


class _FakeModel:
    """Stands in for a Keras model: ``save_model`` only calls ``save(path)``; the content names the version."""

    def __init__(self, version: int):
        self.version = version

    def save(self, path):
        Path(path).write_text(f"model v{self.version}")


def test_save_model_never_shows_a_model_beside_another_models_metadata(tmp_path, monkeypatch):
    """At every rename and unlink of a save (fresh, then --force over an older pair): a model under its
    final name has its own sidecar beside it."""
    from resnet_deploy.models.io import save_model

    final = tmp_path / "model.keras"
    side = sidecar_path(final)
    states = []

    def check():
        if final.exists():
            assert side.exists(), "a model without its metadata"
            assert json.loads(side.read_text())["v"] == int(final.read_text().split("v")[1]), \
                "a model beside another model's metadata"
        states.append((final.exists(), side.exists()))

    real_replace, real_unlink = os.replace, Path.unlink

    def replace(src, dst):
        check()
        real_replace(src, dst)
        check()

    def unlink(self, missing_ok=False):
        check()
        real_unlink(self, missing_ok=missing_ok)
        check()

    monkeypatch.setattr(fileio.os, "replace", replace)
    monkeypatch.setattr(Path, "unlink", unlink)
    save_model(_FakeModel(1), final, {"v": 1})
    save_model(_FakeModel(2), final, {"v": 2}, force=True)
    monkeypatch.undo()
    assert final.read_text() == "model v2" and json.loads(side.read_text())["v"] == 2
    assert (False, True) in states  # the sidecar does take its name before the model does
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.keras", "model.keras.json"]


def test_files_and_folders_are_fsynced_before_they_take_their_names(tmp_path, monkeypatch):
    synced: list[str] = []
    events: list[tuple[str, str]] = []
    real_fsync, real_open, real_replace = os.fsync, os.open, os.replace
    names: dict[int, str] = {}

    def opening(path, flags, *args):
        fd = real_open(path, flags, *args)
        names[fd] = str(path)
        return fd

    def fsync(fd):
        synced.append(names.get(fd, "?"))
        events.append(("fsync", names.get(fd, "?")))
        real_fsync(fd)

    def replace(src, dst):
        events.append(("rename", str(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "open", opening)
    monkeypatch.setattr(fileio.os, "fsync", fsync)
    monkeypatch.setattr(fileio.os, "replace", replace)
    with staged(tmp_path / "out") as stage:
        (stage.path("ckpt")).mkdir()
        (stage.path("ckpt") / "weights.h5").write_bytes(b"w")
        stage.path("ckpt.json").write_text("{}")
        stage.commit("ckpt", "ckpt.json")
    monkeypatch.undo()
    first_rename = next(i for i, e in enumerate(events) if e[0] == "rename")
    before = [p for kind, p in events[:first_rename] if kind == "fsync"]
    assert any(p.endswith("ckpt/weights.h5") for p in before)  # the file inside the folder
    assert any(p.endswith("/ckpt") for p in before) and any(p.endswith("ckpt.json") for p in before)
    assert any(Path(p).name.startswith(STAGE_PREFIX) for p in before)  # the stage folder itself
    assert events[-1] == ("fsync", str(tmp_path / "out"))  # and the output folder after the renames
    assert (tmp_path / "out" / "ckpt" / "weights.h5").read_bytes() == b"w"


def test_a_commit_of_nothing_fails_and_keeps_the_old_file(tmp_path):
    final = tmp_path / "x.bin"
    final.write_bytes(b"old")
    with pytest.raises(FileNotFoundError, match="writer produced nothing"):
        with atomic_path(final):
            pass
    assert final.read_bytes() == b"old" and _stages(tmp_path) == []


def test_two_live_writers_in_one_folder_keep_their_own_stages(tmp_path):
    """A second writer starting while a first is mid-write (another process, alive) does not sweep it."""
    final = tmp_path / "a.bin"
    proc = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(final)], stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "writing"
        with atomic_path(tmp_path / "b.bin") as tmp:
            tmp.write_bytes(b"b")
        assert len(_stages(tmp_path)) == 1  # the live writer's stage is still there
    finally:
        proc.kill()
        proc.wait()
    # the killed process is reaped: its stage is now stale
    assert len(stale_stages(tmp_path)) == 1


def test_an_interrupted_commit_leaves_no_description_without_its_file(tmp_path, monkeypatch):
    """Ctrl-C between the sidecar's rename and the model's: the sidecar (new) and the old one are gone
    with the model they described, rather than left as an orphan that names a file that is not there."""
    from resnet_deploy.models.io import save_model

    final = tmp_path / "model.keras"
    save_model(_FakeModel(1), final, {"v": 1})
    real_replace = os.replace

    def replace(src, dst):
        if Path(dst) == final:
            raise KeyboardInterrupt
        real_replace(src, dst)

    monkeypatch.setattr(fileio.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        save_model(_FakeModel(2), final, {"v": 2}, force=True)
    monkeypatch.undo()
    assert list(tmp_path.iterdir()) == []  # no model, no sidecar, no stage
