"""Atomic writes: nothing half-written ever carries a final name."""

from __future__ import annotations

import pytest

from resnet_deploy.errors import OutputExistsError
from resnet_deploy.fileio import atomic_path, check_can_write, sha256_file, sidecar_path, write_json_atomic


def test_atomic_file_replaces_only_on_success(tmp_path):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"], "a temporary file was left behind"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"


def test_atomic_folder(tmp_path):
    final = tmp_path / "saved_model"
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    with atomic_path(final) as tmp:
        tmp.mkdir()
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["y"]


def test_writer_that_writes_nothing_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x"):
            pass
    assert not (tmp_path / "x").exists()


def test_json_sidecar_hash_and_overwrite_guard(tmp_path):
    p = tmp_path / "m.tflite"
    p.write_bytes(b"abc")
    assert sidecar_path(p).name == "m.tflite.json"
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    write_json_atomic(sidecar_path(p), {"a": 1})
    assert sidecar_path(p).read_text().strip().startswith("{")
    with pytest.raises(OutputExistsError, match="--force"):
        check_can_write(p, force=False)
    check_can_write(p, force=True)


# ----------------------------------------------------------------------------------------------
# One writer per output folder
# ----------------------------------------------------------------------------------------------
_HOLD = """
import sys, time
from resnet_deploy.fileio import output_lock
with output_lock(sys.argv[1], "holder-command --out x"):
    print("locked", flush=True)
    time.sleep(60)
"""


def _holder(folder):
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", _HOLD, str(folder)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "locked"
    return proc


def test_a_second_writer_is_refused_with_the_holders_pid_and_command(tmp_path):
    from resnet_deploy.errors import OutputLockedError
    from resnet_deploy.fileio import lock_path, output_lock

    proc = _holder(tmp_path / "out")
    try:
        with pytest.raises(OutputLockedError) as exc:
            with output_lock(tmp_path / "out"):
                pass
        assert f"pid {proc.pid}" in exc.value.what and "holder-command" in exc.value.what
        assert "another --out" in exc.value.fix
    finally:
        proc.kill()
        proc.wait()
    assert lock_path(tmp_path / "out").exists()  # killed: its lock file is left behind ...
    with output_lock(tmp_path / "out") as held:  # ... and recognised as free (the kernel dropped the flock)
        assert held.exists()
    assert not lock_path(tmp_path / "out").exists() and not (tmp_path / "out").exists()


def test_train_into_a_folder_another_run_holds_is_refused_before_any_work(tmp_path):
    from typer.testing import CliRunner

    from resnet_deploy.cli import app

    proc = _holder(tmp_path / "run")
    try:
        result = CliRunner().invoke(app, ["train", "--arch", "resnet8", "--out", str(tmp_path / "run"),
                                          "--data", str(tmp_path / "no-data")], env={"COLUMNS": "200"})
    finally:
        proc.kill()
        proc.wait()
    assert result.exit_code == 2 and "in use by another run" in result.output, result.output
    assert not (tmp_path / "run").exists()


def test_output_paths_are_checked_before_any_work(tmp_path):
    """--out that is a file, a report path under a file or naming a folder: refused up front, nothing written."""
    from typer.testing import CliRunner

    from resnet_deploy.cli import app

    a_file = tmp_path / "not-a-folder"
    a_file.write_text("x")
    runner = CliRunner()
    cases = [
        (["train", "--arch", "resnet8", "--out", str(a_file), "--data", str(tmp_path / "none")], "is a file, not a folder"),
        (["export", str(tmp_path / "m.keras"), "--out", str(a_file)], "is a file, not a folder"),
        (["pipeline", "--out", str(a_file)], "is a file, not a folder"),
        (["bench", str(tmp_path / "x.tflite"), "--json", str(a_file / "r.json")], "which is a file"),
        # a folder named like a report: `--json PATH` and, where --json is a flag, its deprecated form alike
        (["bench", str(tmp_path / "x.tflite"), "--json", str(tmp_path / "reports.json")], "is a folder"),
        (["bench", str(tmp_path / "x.tflite"), "--threads", "1000"], "more than the"),
    ]
    (tmp_path / "m.keras").write_bytes(b"")
    (tmp_path / "reports.json").mkdir()
    for args, words in cases:
        result = runner.invoke(app, args, env={"COLUMNS": "200"})
        said = " ".join(result.output.split())  # a long temporary path can wrap the message even at 200 columns
        assert result.exit_code == 2 and words in said, (args, result.output)
    assert a_file.read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.keras", "not-a-folder", "reports.json"]
