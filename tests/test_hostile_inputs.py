"""Hostile or careless inputs found while fuzzing the CLI (issue 15), each with the clean refusal it now gets."""

from __future__ import annotations

from pathlib import Path

from typer.testing import CliRunner

from resnet_deploy.cli import app


def test_bench_of_missing_files_is_refused_before_any_data_is_looked_for(tmp_path):
    """`bench missing.tflite` used to search for CIFAR-10 (and try to download it) before saying that the
    file does not exist; with no file to run there is nothing to load data for."""
    result = CliRunner().invoke(app, ["bench", str(tmp_path / "missing.tflite"), str(tmp_path / "gone.onnx"),
                                      "--data", str(tmp_path / "no-data-here")], env={"COLUMNS": "200"})
    out = " ".join(result.output.split())  # the terminal wraps long paths
    assert result.exit_code == 2, out
    assert "Nothing to bench" in out and "missing.tflite does not exist" in out and "gone.onnx does not exist" in out
    assert "CIFAR-10" not in out and "Traceback" not in out
    assert list(tmp_path.iterdir()) == []


def _read_only_mount(path) -> bool:
    """Mount a read-only tmpfs at ``path`` (root in a container may or may not be allowed to)."""
    import subprocess

    path.mkdir()
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(path)], capture_output=True)
    return res.returncode == 0


def test_a_read_only_output_location_is_refused_before_any_work(tmp_path, tiny_model_path, monkeypatch):
    """`--out` where nothing can be created: root ignores permission bits, so the read-only case is a real
    read-only mount where the machine allows one, and otherwise the kernel's EROFS answer to the probe."""
    import errno
    import subprocess
    import tempfile

    ro = tmp_path / "ro"
    mounted = _read_only_mount(ro)
    try:
        if not mounted:
            real = tempfile.mkstemp

            def read_only(*args, dir=None, **kwargs):
                if dir is not None and Path(dir).resolve() == ro.resolve():
                    raise OSError(errno.EROFS, "Read-only file system")
                return real(*args, dir=dir, **kwargs)

            monkeypatch.setattr(tempfile, "mkstemp", read_only)
        result = CliRunner().invoke(app, ["export", str(tiny_model_path), "--int8", "--out", str(ro / "artifacts"),
                                          "--data", str(tmp_path / "no-data-here")], env={"COLUMNS": "200"})
        out = " ".join(result.output.split())
        assert result.exit_code == 2, out
        assert "Cannot write into" in out and "Read-only file system" in out and "--out" in out, out
        assert "CIFAR-10" not in out  # refused before any data is looked for, let alone a conversion
    finally:
        if mounted:
            subprocess.run(["umount", str(ro)], check=False)
