"""The main job end to end on a tiny ResNet: train -> six artifacts -> bench -> report files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from resnet_deploy.cli import app


def test_pipeline_runs_end_to_end(tmp_path, cifar_dir):
    out = tmp_path / "run"
    args = ["pipeline", "--train", "--data", str(cifar_dir), "--out", str(out), "--arch", "resnet8", "--width", "0.25",
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


def _fake_result(tmp_path, error):
    from resnet_deploy.bench.results import ArtifactResult, BenchReport

    ok = ArtifactResult(label="model_fp32.tflite", path="model_fp32.tflite", role="artifact", format="tflite",
                        precision="fp32")
    bad = ArtifactResult(label="model_int8.onnx", path="model_int8.onnx", role="artifact", format="onnx",
                         precision="int8", error=error)
    report = BenchReport(machine={}, libraries={}, options={"accuracy": True, "latency": True, "large_batch": 32,
                                                            "threads": 1},
                         data={"images": 0}, reference={"label": None, "notes": []}, results=[ok, bad])
    return {"model": tmp_path / "model.keras", "test_accuracy": 0.5, "artifacts": ["a", "b"], "report": report,
            "timings": {"train_s": 1.0, "export_s": 1.0, "bench_s": 1.0}, "options": {}, "ok": report.ok}


def test_pipeline_fails_after_writing_the_report_when_an_artifact_could_not_be_benched(tmp_path, monkeypatch):
    """The main job must not exit 0 when bench recorded an error: exit 2 (as `bench`), report still written."""
    import resnet_deploy.pipeline.job as pipeline_mod
    from resnet_deploy.bench.results import crash_error as _crash_error

    out = tmp_path / "run"
    monkeypatch.setattr(pipeline_mod, "run_pipeline",
                        lambda opts, data=None: _fake_result(tmp_path, _crash_error(tmp_path / "m.onnx", -11)))
    result = CliRunner().invoke(app, ["pipeline", "--out", str(out)], env={"COLUMNS": "200"})
    assert result.exit_code == 2, result.output
    assert "model_int8.onnx" in result.output and "could not be benchmarked" in result.output
    report = json.loads((out / "report.json").read_text())
    assert report["ok"] is False and report["errors"][0]["label"] == "model_int8.onnx"
    assert (out / "report.md").exists() and (out / "report.png").exists()


def test_pipeline_result_reports_ok_and_library_callers_can_skip_the_raise(tmp_path):
    from resnet_deploy.errors import BenchError
    from resnet_deploy.pipeline import pipeline_error, write_reports

    clean = _fake_result(tmp_path, None)
    assert clean["ok"] and pipeline_error(clean) is None
    broken = _fake_result(tmp_path, {"kind": "crash", "message": "x", "what": "x", "expected": None, "fix": None})
    err = pipeline_error(broken)
    assert isinstance(err, BenchError) and err.exit_code == 2 and "model_int8.onnx" in err.what
    with pytest.raises(BenchError):
        write_reports(broken, tmp_path / "a")
    assert (tmp_path / "a" / "report.json").exists()
    assert set(write_reports(broken, tmp_path / "b", raise_on_error=False)) == {"json", "markdown", "plot"}
