"""Regression tests for defects found by feeding the CLI hostile or careless inputs (issue 15's fuzzing,
continued): each case failed before its fix."""

from __future__ import annotations

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
