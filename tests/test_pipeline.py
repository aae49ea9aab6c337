"""The main job end to end on a tiny ResNet: train -> six artifacts -> bench -> report files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from resnet_deploy.cli import app


def test_pipeline_runs_end_to_end(tmp_path, cifar_dir):
    out = tmp_path / "run"
    args = ["pipeline", "--data", str(cifar_dir), "--out", str(out), "--arch", "resnet8", "--width", "0.25",
            "--epochs", "1", "--limit-train", "1000", "--limit-test", "200", "--calib-samples", "50"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (out / "train" / "model.keras").exists() and (out / "train" / "model.keras.json").exists()
    artifacts = sorted(p.name for p in (out / "artifacts").iterdir() if not p.name.endswith(".json"))
    assert artifacts == ["model_fp16.onnx", "model_fp16.tflite", "model_fp32.onnx", "model_fp32.tflite",
                         "model_int8.onnx", "model_int8.tflite"]
    assert all((out / "artifacts" / f"{a}.json").exists() for a in artifacts)
    report = json.loads((out / "report.json").read_text())
    assert len(report["results"]) == 7  # the float model and six artifacts
    assert all(r.get("error") is None for r in report["results"]), report["results"]
    assert (out / "report.md").read_text().startswith("# resnet-deploy bench report")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run refuses to overwrite the first without --force
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output


@pytest.mark.parametrize("bad,match", [(["--epochs", "0"], "epochs"), (["--limit-test", "10"], "too small")])
def test_pipeline_rejects_bad_options_before_work(tmp_path, bad, match):
    result = CliRunner().invoke(app, ["pipeline", "--out", str(tmp_path / "x"), *bad])
    assert result.exit_code == 2 and match in result.output
    assert not (tmp_path / "x").exists()
