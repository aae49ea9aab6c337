"""The CLI skeleton: fast --help, the models and data commands, clear errors with exit codes."""

from __future__ import annotations

import subprocess
import sys
import time

from typer.testing import CliRunner

from resnet_deploy.cli import app

runner = CliRunner()


def test_help_is_fast_and_imports_no_framework():
    code = ("import sys, time; t=time.perf_counter(); from resnet_deploy.cli import app; "
            "heavy=[m for m in ('tensorflow','keras','onnxruntime','tf2onnx','ai_edge_litert','matplotlib') "
            "if m in sys.modules]; print(heavy, time.perf_counter()-t)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out[0] == "[]", f"heavy frameworks imported at CLI start-up: {out}"
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "resnet_deploy.cli", "--help"], capture_output=True, check=True)
    assert time.perf_counter() - t0 < 5  # the issue asks < 2 s; 5 leaves room for a loaded CI machine


def test_every_subcommand_exists():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "export", "bench", "models", "data"):
        assert cmd in result.output


def test_models_table_lists_the_family_readably_at_80_columns():
    from resnet_deploy.models.registry import ARCHS

    result = runner.invoke(app, ["models"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
    assert set(ARCHS) <= set(rows), "every architecture on a row of its own, names not truncated"
    assert "…" not in result.output
    assert rows["resnet34"][-2:] == ["21.282", "1,159.4"] and "3-4-6-3" in rows["resnet34"]  # MACs at 32x32
    assert rows["resnet20"][-2] == "0.272" and rows["resnet110v2"][1:3] == ["basic", "v2"]
    assert rows["resnet50"][1] == "bottleneck" and rows["plain34"][1:3] == ["basic", "plain"]


def test_models_unknown_family_lists_the_families():
    result = runner.invoke(app, ["models", "--family", "vgg"])
    assert result.exit_code == 2
    assert "Unknown family 'vgg'" in result.output and "cifar, resnet" in result.output
    only = runner.invoke(app, ["models", "--family", "cifar"], env={"COLUMNS": "80"})
    assert only.exit_code == 0 and "resnet20" in only.output and "resnet34" not in only.output


def test_models_bad_width_is_a_clear_error():
    result = runner.invoke(app, ["models", "--width", "0"])
    assert result.exit_code == 2
    assert "Width multiplier" in result.output


def test_data_command_reports_counts_and_incompleteness(cifar_dir):
    result = runner.invoke(app, ["data", "--data", str(cifar_dir)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "49,923" in result.output and "9,980" in result.output
    assert "77 missing" in result.output and "125.31" in result.output


def test_data_command_missing_path(tmp_path):
    result = runner.invoke(app, ["data", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Fix:" in result.output
