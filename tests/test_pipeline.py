"""The main job end to end on a tiny ResNet: train -> six artifacts -> bench -> report files."""

from __future__ import annotations

import json

import pytest
from typer.testing import CliRunner

from resnet_deploy.cli import app


def _run_pipeline(tmp_path, data, epochs: int = 1) -> dict:
    """train -> six artifacts -> bench -> report files, on ``data``; returns report.json."""
    out = tmp_path / "run"
    args = ["pipeline", "--train", "--data", str(data), "--out", str(out), "--arch", "resnet8", "--width", "0.25",
            "--epochs", str(epochs), "--batch-size", "32", "--limit-train", "1000", "--limit-test", "200",
            "--calib-samples", "50", "--runtimes", "onnxruntime"]  # OpenVINO rows: tests/test_openvino.py
    result = CliRunner().invoke(app, args, env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert (out / "train" / "model.keras").exists() and (out / "train" / "model.keras.json").exists()
    artifacts = sorted(p.name for p in (out / "artifacts").iterdir() if not p.name.endswith(".json"))
    assert len(artifacts) == 6 and all((out / "artifacts" / f"{a}.json").exists() for a in artifacts)
    formats = sorted((a.rsplit(".", 1)[1], json.loads((out / "artifacts" / f"{a}.json").read_text())["precision"])
                     for a in artifacts)
    assert formats == [("onnx", "fp16"), ("onnx", "fp32"), ("onnx", "int8"),
                       ("tflite", "fp16"), ("tflite", "fp32"), ("tflite", "int8")], formats
    report = json.loads((out / "report.json").read_text())
    assert len(report["results"]) == 7  # the float model and six artifacts
    assert all(r.get("error") is None for r in report["results"]), report["results"]
    assert report["data"]["images"] == 200
    assert (out / "report.md").read_text().startswith("# resnet-deploy bench report")
    assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a second run refuses to overwrite the first without --force
    again = CliRunner().invoke(app, args)
    assert again.exit_code == 2 and "--force" in again.output
    return report


def _float_accuracy_recomputed(tmp_path, data) -> tuple[float, float]:
    """The trained model's accuracy on the first 200 test images, by a plain Keras call, and the report's."""
    import keras
    import numpy as np

    from resnet_deploy.data import load_cifar10

    report = json.loads((tmp_path / "run" / "report.json").read_text())
    ref = next(r for r in report["results"] if r["role"] == "reference")
    test = load_cifar10(data).test
    model = keras.saving.load_model(tmp_path / "run" / "train" / "model.keras", compile=False)
    logits = np.asarray(model(test.x[:200].astype(np.float32), training=False))
    return float(np.mean(logits.argmax(1) == test.y[:200])), ref["accuracy"]["top1"]


@pytest.mark.slow  # about 3 minutes: six exports and a bench of seven files with their default timing
def test_pipeline_runs_end_to_end(tmp_path, request):
    """Once per slow tier: on the real copy where there is one, else on the synthetic set (conftest), whose
    classes two epochs learn to about 90 % (chance: 10 %)."""
    from tests.conftest import _find_cifar

    real = _find_cifar()
    data = real if real is not None else request.getfixturevalue("synthetic_cifar_dir")
    report = _run_pipeline(tmp_path, data, epochs=1 if real is not None else 2)
    acc, reported = _float_accuracy_recomputed(tmp_path, data)
    assert reported == pytest.approx(acc)
    if real is None:
        assert acc >= 0.6, f"two epochs on the synthetic classes reached only {acc:.1%}: does training see the labels?"
    for r in report["results"]:  # every artifact keeps the float model's accuracy, near enough
        assert r["accuracy"] is None or r["accuracy"]["top1"] >= acc - 0.1, (r["label"], r["accuracy"]["top1"], acc)


@pytest.mark.parametrize("bad,match", [(["--epochs", "0"], "epochs"), (["--limit-test", "10"], "too small")])
def test_pipeline_rejects_bad_options_before_work(tmp_path, bad, match):
    result = CliRunner().invoke(app, ["pipeline", "--out", str(tmp_path / "x"), *bad])
    assert result.exit_code == 2 and match in result.output
    assert not (tmp_path / "x").exists()


def _fake_result(tmp_path, error):
    from resnet_deploy.bench.results import ArtifactResult, BenchReport
    from resnet_deploy.pipeline.job import PipelineResult

    ok = ArtifactResult(label="model_fp32.tflite", path="model_fp32.tflite", role="artifact", format="tflite",
                        precision="fp32")
    bad = ArtifactResult(label="model_int8.onnx", path="model_int8.onnx", role="artifact", format="onnx",
                         precision="int8", error=error)
    report = BenchReport(machine={}, libraries={}, options={"accuracy": True, "latency": True, "large_batch": 32,
                                                            "threads": 1},
                         data={"images": 0}, reference={"label": None, "notes": []}, results=[ok, bad])
    return PipelineResult(tmp_path / "model.keras", 0.5, False, ["a", "b"], report,
                          {"train_s": 1.0, "export_s": 1.0, "bench_s": 1.0}, {})


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

    from resnet_deploy.pipeline.job import PipelineResult

    clean = _fake_result(tmp_path, None)
    assert clean.ok and pipeline_error(clean) is None
    back = PipelineResult.from_json(json.loads(json.dumps(clean.to_json())))  # the record survives its JSON
    assert back.to_json() == clean.to_json() and back.report.results[1].label == "model_int8.onnx"
    broken = _fake_result(tmp_path, {"kind": "crash", "message": "x", "what": "x", "expected": None, "fix": None})
    assert not broken.ok and not PipelineResult.from_json(broken.to_json()).ok
    err = pipeline_error(broken)
    assert isinstance(err, BenchError) and err.exit_code == 2 and "model_int8.onnx" in err.what
    with pytest.raises(BenchError):
        write_reports(broken, tmp_path / "a")
    assert (tmp_path / "a" / "report.json").exists()
    assert set(write_reports(broken, tmp_path / "b", raise_on_error=False)) == {"json", "markdown", "plot"}
