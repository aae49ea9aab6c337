"""`resnet-deploy export` end to end on a tiny trained ResNet: parity per precision, integer graphs,
int8 I/O, manifests, atomic writes, refusals, bad inputs, foreign models and QAT."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_deploy.artifact import read_manifest
from resnet_deploy.converters.options import ExportOptions
from resnet_deploy.converters.export import export_model
from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.errors import ExportError, ModelError, OutputExistsError
from resnet_deploy.fileio import sha256_file, sidecar_path
from tests.conftest import tiny_model

# Parity bounds per precision on the tiny model: max and mean |logit diff| relative to the logit scale,
# and top-1 agreement with the float model (its predictions are spread over the classes, see below).
# Measured on it (full training split for calibration): max/scale fp16 7e-4, dynamic 4e-3, int8 0.31;
# agreement fp16 100 %, dynamic 99 %, int8 95-96.5 %.
BOUNDS = {"fp32": (1e-4, 1e-5, 1.0), "fp16": (1e-2, 1e-3, 0.97), "dynamic_int8": (0.05, 0.01, 0.9),
          "int8": (0.6, 0.06, 0.85)}


@pytest.fixture(scope="module")
def trained_path(tmp_path_factory, cifar):
    """resnet8 at width 0.25 trained 3 epochs on 1,000 real images: its predictions differ from image to
    image (a random-weight net predicts nearly one class, where top-1 agreement would prove nothing)."""
    import keras

    from resnet_deploy.models.io import base_metadata, save_model

    model = tiny_model()
    model.compile(keras.optimizers.Adam(3e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    model.fit(cifar.train.x[:1000].astype(np.float32), cifar.train.y[:1000], epochs=3, batch_size=64, verbose=0)
    path = tmp_path_factory.mktemp("trained") / "tiny.keras"
    save_model(model, path, base_metadata("resnet8", width=0.25))
    return path


def host_scheme() -> str:
    """The ONNX INT8 scheme ``--target host`` must pick here, worked out from /proc/cpuinfo and the machine
    name directly (not through the tool's rule): s8s8 on arm64, u8s8 on x86 with VNNI, u8s8-rr7 on x86
    without VNNI or with unreadable flags."""
    import platform

    machine = platform.machine().lower()
    if machine in ("arm64", "aarch64", "armv8l"):
        return "s8s8"
    try:
        with open("/proc/cpuinfo") as fh:
            flags = next((set(l.split(":", 1)[1].split()) for l in fh if l.startswith("flags")), set())
    except OSError:
        flags = set()
    return "u8s8" if flags & {"avx512_vnni", "avx_vnni", "avx512vnni"} else "u8s8-rr7"


ONNX_INT8 = f"tiny_int8_{host_scheme()}.onnx"


@pytest.fixture(scope="module")
def exported(tmp_path_factory, trained_path, small_npz_dir):
    out = tmp_path_factory.mktemp("artifacts")
    opts = ExportOptions(fp16=True, int8=True, dynamic_int8=True, calib_samples=100, validate_samples=200, out_dir=out)
    return {a.path.name: a for a in export_model(trained_path, opts, data=small_npz_dir)}


@pytest.fixture(scope="module")
def float_logits(trained_path, cifar):
    from resnet_deploy.models.io import load_model

    x = cifar.test.x[:200]
    return x, np.asarray(load_model(trained_path)(x.astype(np.float32), training=False))


def test_writes_every_artifact_with_a_complete_manifest(exported, trained_path):
    assert sorted(exported) == sorted(["tiny_fp32.tflite", "tiny_fp16.tflite", "tiny_dynamic_int8.tflite",
                                       "tiny_int8.tflite", "tiny_fp32.onnx", "tiny_fp16.onnx", ONNX_INT8])
    folder = next(iter(exported.values())).path.parent
    assert not [p.name for p in folder.iterdir() if ".tmp" in p.name]
    for name, art in exported.items():
        m = read_manifest(art.path)
        assert m is not None and m.to_dict() == art.manifest.to_dict()  # reloads intact
        assert m.artifact == name and m.sha256 == sha256_file(art.path) and m.size_bytes == art.path.stat().st_size
        assert m.source_model["sha256"] == sha256_file(trained_path) and m.source_model["architecture"] == "resnet8"
        # relative to the artifact's folder (bench resolves it there); where it was, kept beside it
        assert not os.path.isabs(m.source_model["path"]) and m.source_model["abs_path"] == str(trained_path.resolve())
        assert (art.path.parent / m.source_model["path"]).resolve() == trained_path.resolve()
        assert m.preprocessing["source"] == "model metadata" and m.class_names[0] == "airplane"
        assert m.libraries["tensorflow"] and m.libraries["onnxruntime"] and m.machine["cpu"]
        assert m.validation["samples"] == 200 and m.validation["images"] == "test[:200]"
        assert m.input.shape == (None, 32, 32, 3) and m.output.shape == (None, 10)
        assert (m.calibration is not None) == (m.precision == "int8")


def test_parity_per_precision_measured_independently(exported, float_logits):
    """Re-run every artifact through the bench runners and compare with the float model directly."""
    from resnet_deploy.runtimes import open_runner

    x, ref = float_logits
    assert len(np.unique(ref.argmax(1))) >= 5, "the fixture model must predict varied classes"
    scale = max(1.0, float(np.abs(ref).max()))
    for name, art in exported.items():
        with open_runner(art.path) as r:  # preprocessing from the manifest, as bench does
            got = r.predict(x)
        max_tol, mean_tol, min_agree = BOUNDS[art.precision]
        diff = np.abs(got - ref)
        assert diff.max() <= max_tol * scale and diff.mean() <= mean_tol * scale, (name, diff.max(), diff.mean())
        assert (got.argmax(1) == ref.argmax(1)).mean() >= min_agree, name
        v = art.manifest.validation
        assert v["max_abs_logit_diff"] == pytest.approx(float(diff.max()), rel=1e-4, abs=1e-6)
        assert v["top1_agreement"] == pytest.approx(float((got.argmax(1) == ref.argmax(1)).mean()))
    assert exported["tiny_fp32.tflite"].manifest.validation["passed"] is True
    assert exported["tiny_int8.tflite"].manifest.validation["passed"] is None  # recorded, not enforced


def test_int8_graphs_are_integer(exported):
    from resnet_deploy.converters import onnx as onnx_converter
    from resnet_deploy.converters import tflite as tflite_converter

    t = tflite_converter.op_report(exported["tiny_int8.tflite"].path)
    assert t["op_counts"]["CONV_2D"] == 9 and t["op_counts"]["FULLY_CONNECTED"] == 1
    assert t["integer_compute_ops"] == 10 and t["float_compute_ops"] == []
    f = tflite_converter.op_report(exported["tiny_fp32.tflite"].path)
    assert f["integer_compute_ops"] == 0 and len(f["float_compute_ops"]) == 10  # the check can fail
    o = onnx_converter.op_report(exported[ONNX_INT8].path)
    assert o["op_counts"]["Conv"] == 9 and o["integer_compute_ops"] == 10 and o["float_compute_ops"] == []
    assert o["quantize_linear"] >= 10 and o["dequantize_linear"] >= 20  # activations + per-channel weights
    assert onnx_converter.op_report(exported["tiny_fp32.onnx"].path)["integer_compute_ops"] == 0
    assert exported[ONNX_INT8].manifest.options["op_report"] == o


def test_onnx_graphs_one_input_dynamic_batch_and_recorded_quantization(exported):
    import onnx
    from onnx import numpy_helper

    for name in ("tiny_fp32.onnx", "tiny_fp16.onnx", ONNX_INT8):
        g = onnx.load(str(exported[name].path)).graph
        assert [i.name for i in g.input] == ["image"] and len(g.output) == 1  # no constants as inputs
        assert g.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
        assert g.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT  # I/O stays float
    half = onnx.load(str(exported["tiny_fp16.onnx"].path)).graph
    assert any(t.data_type == onnx.TensorProto.FLOAT16 for t in half.initializer)
    q = onnx.load(str(exported[ONNX_INT8].path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in q.initializer}
    act = exported[ONNX_INT8].manifest.calibration["activations"].split()[0]
    zps = [inits[n.input[2]].dtype.name for n in q.node if n.op_type == "QuantizeLinear" and n.input[2] in inits]
    assert zps and set(zps) == {act}  # the recorded activation type is the one in the graph
    # one calibration sample feeds both INT8 converters
    tfl, ox = exported["tiny_int8.tflite"].manifest.calibration, exported[ONNX_INT8].manifest.calibration
    assert tfl["sample"] == ox["sample"] and tfl["sample"]["samples"] == 100 and ox["method"] == "minmax"


def _max_abs_quantized_weight(path) -> int:
    """The largest |q| among the int8 weight initializers feeding DequantizeLinear: 127 with 8-bit weights
    (symmetric per-channel: each channel's largest weight maps to 127), at most 64 with reduce_range."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    ws = [inits[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
          and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim >= 2]
    assert ws, "no int8 weight initializers found"
    return int(max(np.abs(w.astype(np.int32)).max() for w in ws))


def test_onnx_int8_records_its_automatic_types_and_reduce_range(exported):
    """By default (--target host) the activation type and reduce_range are chosen for the exporting CPU
    (7-bit weights on x86 without VNNI, where 8-bit weights saturate ONNX Runtime's U8S8 kernels), recorded
    as automatic with their reasons, and what is recorded is what the graph holds. The expectation comes
    from /proc/cpuinfo read here (``host_scheme``), not from the rule under test."""
    art = exported[ONNX_INT8]
    cal = art.manifest.calibration
    want = host_scheme()
    assert cal["scheme"] == want and cal["requested_target"] == "host"
    assert cal["activation_type"] == ("int8" if want == "s8s8" else "uint8") and cal["weight_type"] == "int8"
    assert cal["reduce_range"] is (want == "u8s8-rr7")
    assert cal["chosen_by"] == {"target": "automatic", "activation_type": "automatic", "weight_type": "fixed",
                                "reduce_range": "automatic"}
    assert all(cal["reason"][k].startswith("automatic:") for k in ("activation_type", "reduce_range"))
    assert cal["cpu"]["flags"] == art.manifest.machine["cpu_flags"]
    assert art.manifest.options["converter"]["reduce_range"] is cal["reduce_range"]
    assert art.manifest.options["export"]["onnx_reduce_range"] is None  # not given
    assert (_max_abs_quantized_weight(art.path) <= 64) is cal["reduce_range"]


def test_int8_io_round_trips_raw_pixels(tmp_path, trained_path, small_npz_dir, float_logits):
    from ai_edge_litert.interpreter import Interpreter

    opts = ExportOptions(formats=("tflite",), int8=True, int8_io=True, calib_samples=100, validate_samples=50,
                         out_dir=tmp_path)
    art = {a.path.name: a for a in export_model(trained_path, opts, data=small_npz_dir)}["tiny_int8.tflite"]
    m = art.manifest
    assert m.input.dtype == "int8" and m.output.dtype == "int8" and "q = clip" in m.options["integer_input"]
    # a device app: quantize raw pixels with the manifest's input params, dequantize the output
    x, ref = float_logits
    q = np.clip(np.round(x.astype(np.float32) / m.input.scale) + m.input.zero_point, -128, 127).astype(np.int8)
    it = Interpreter(model_path=str(art.path))
    i, o = it.get_input_details()[0], it.get_output_details()[0]
    assert (i["quantization"][0], i["quantization"][1]) == (pytest.approx(m.input.scale), m.input.zero_point)
    it.resize_tensor_input(i["index"], [len(q), 32, 32, 3])
    it.allocate_tensors()
    it.set_tensor(i["index"], q)
    it.invoke()
    logits = (it.get_tensor(o["index"]).astype(np.float32) - m.output.zero_point) * m.output.scale
    max_tol, mean_tol, min_agree = BOUNDS["int8"]
    assert (logits.argmax(1) == ref.argmax(1)).mean() >= min_agree
    scale = max(1.0, np.abs(ref).max())
    assert np.abs(logits - ref).max() <= max_tol * scale and np.abs(logits - ref).mean() <= mean_tol * scale


def test_existing_artifacts_are_refused_before_any_work(tmp_path, trained_path, small_npz_dir):
    opts = ExportOptions(formats=("onnx",), validate_samples=20, out_dir=tmp_path)
    (a,) = export_model(trained_path, opts, data=small_npz_dir)
    before = (a.path.stat().st_mtime_ns, a.path.with_name(a.path.name + ".json").read_text())
    with pytest.raises(OutputExistsError, match="--force"):
        export_model(trained_path, opts, data=tmp_path / "no-data-needed-to-refuse")
    assert (a.path.stat().st_mtime_ns, a.path.with_name(a.path.name + ".json").read_text()) == before
    (b,) = export_model(trained_path, ExportOptions(formats=("onnx",), validate_samples=20, out_dir=tmp_path,
                                                    force=True), data=small_npz_dir)
    assert read_manifest(b.path).created >= a.manifest.created and b.manifest.sha256 == sha256_file(b.path)


def test_failed_forced_export_keeps_the_old_artifact_and_its_manifest(tmp_path, trained_path, small_npz_dir):
    opts = dict(formats=("tflite",), validate_samples=20, out_dir=tmp_path)
    (a,) = export_model(trained_path, ExportOptions(**opts), data=small_npz_dir)
    side = a.path.with_name(a.path.name + ".json").read_text()
    with pytest.raises(ExportError, match="disagrees"):
        export_model(trained_path, ExportOptions(**opts, force=True, fp32_tolerance=1e-12), data=small_npz_dir)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny_fp32.tflite", "tiny_fp32.tflite.json"]
    assert a.path.with_name(a.path.name + ".json").read_text() == side and sha256_file(a.path) == a.manifest.sha256


def test_forced_export_writes_the_manifest_before_the_artifact_takes_its_name(tmp_path, trained_path, small_npz_dir,
                                                                              monkeypatch):
    """At every rename, a final-named artifact has its own manifest beside it: the new manifest is in place
    (describing the temporary) before the temporary becomes the artifact, and an interruption right before
    that rename leaves no artifact with a missing or stale manifest."""
    opts = dict(formats=("onnx",), validate_samples=20, out_dir=tmp_path)
    (old,) = export_model(trained_path, ExportOptions(**opts, opset=16), data=small_npz_dir)
    final, side = old.path, sidecar_path(old.path)
    real_replace, at_rename = os.replace, []

    def consistent():
        if final.exists():
            assert side.exists(), "the final artifact has no manifest"
            assert json.loads(side.read_text())["sha256"] == sha256_file(final), "the final artifact's manifest is stale"

    def spy(src, dst, interrupt=False):
        consistent()
        if Path(dst) == final:
            at_rename.append(side.exists() and json.loads(side.read_text())["sha256"] == sha256_file(src))
            if interrupt:
                raise KeyboardInterrupt  # killed just before the artifact gets its name
        real_replace(src, dst)
        consistent()

    monkeypatch.setattr(os, "replace", lambda src, dst: spy(src, dst, interrupt=True))
    with pytest.raises(KeyboardInterrupt):
        export_model(trained_path, ExportOptions(**opts, force=True), data=small_npz_dir)
    consistent()
    assert at_rename == [True] and _no_artifacts(tmp_path) == []  # no stale pair, no orphan, no temporary
    # what a SIGKILL at that point would leave: the new manifest without its artifact, and the killed process's
    # stage folder (fileio.Stage: ``.resnet-deploy-stage.<pid>.<random>``) with the converted file in it
    import subprocess
    import sys

    from resnet_deploy.fileio import STAGE_PREFIX

    side.write_text(json.dumps({"sha256": "0" * 64}))
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True, check=True).stdout.strip()  # a process that has ended
    stale = tmp_path / f"{STAGE_PREFIX}{dead}.k1ll3d_x"
    stale.mkdir()
    (stale / "tiny_fp32.onnx").write_bytes(b"half a model")
    with pytest.raises(OutputExistsError, match="manifest without its artifact"):
        export_model(trained_path, ExportOptions(**opts), data=small_npz_dir)
    assert not stale.exists(), "a killed export's temporary is removed even when the run is then refused"
    monkeypatch.setattr(os, "replace", spy)
    (new,) = export_model(trained_path, ExportOptions(**opts, force=True), data=small_npz_dir)
    assert at_rename == [True, True] and new.manifest.options["export"]["opset"] == 17
    assert read_manifest(final).sha256 == sha256_file(final) != old.manifest.sha256
    assert _no_artifacts(tmp_path) == ["tiny_fp32.onnx", "tiny_fp32.onnx.json"]


def test_moved_run_folder_keeps_its_float_reference(tmp_path, trained_path, small_npz_dir):
    """source_model.path is relative to the artifact's folder, so bench finds the float model after the
    whole run folder (model + artifacts) is copied or moved."""
    from resnet_deploy.bench.selection import identify, resolve_reference

    run = tmp_path / "run"
    (run / "model").mkdir(parents=True)
    shutil.copy(trained_path, run / "model" / "tiny.keras")
    shutil.copy(sidecar_path(trained_path), sidecar_path(run / "model" / "tiny.keras"))
    (a,) = export_model(run / "model" / "tiny.keras", ExportOptions(formats=("tflite",), validate_samples=20,
                                                                     out_dir=run / "artifacts"), data=small_npz_dir)
    assert a.manifest.source_model["path"] == os.path.join("..", "model", "tiny.keras")
    moved = tmp_path / "moved"
    run.rename(moved)
    ref, notes = resolve_reference([identify(moved / "artifacts" / "tiny_fp32.tflite", "artifact")], None)
    assert ref is not None and ref.resolve() == (moved / "model" / "tiny.keras").resolve(), notes
    # the artifacts folder copied away on its own: the model is still where it was at export (abs_path)
    shutil.copytree(moved / "artifacts", tmp_path / "elsewhere" / "artifacts")
    (moved / "model").rename(run.parent / "model_at_export")  # put the model back at its export-time path
    run.mkdir()
    (run.parent / "model_at_export").rename(run / "model")
    ref, notes = resolve_reference([identify(tmp_path / "elsewhere" / "artifacts" / "tiny_fp32.tflite", "artifact")],
                                   None)
    assert ref is not None and ref.resolve() == (run / "model" / "tiny.keras").resolve(), notes


def _no_artifacts(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_fp32_mismatch_fails_and_leaves_nothing(tmp_path, trained_path, small_npz_dir):
    opts = ExportOptions(formats=("tflite",), validate_samples=20, out_dir=tmp_path / "out", fp32_tolerance=1e-12)
    with pytest.raises(ExportError, match="FP32 artifact disagrees") as info:
        export_model(trained_path, opts, data=small_npz_dir)
    assert "Fix:" in info.value.render()
    assert _no_artifacts(tmp_path / "out") == []  # neither the artifact, its manifest nor a temporary


def test_interrupted_export_leaves_no_finished_looking_file(tmp_path, trained_path, small_npz_dir, monkeypatch):
    from resnet_deploy.config import Format
    from resnet_deploy.converters import export as export_module

    real = export_module.CONVERTERS[Format.ONNX]

    def interrupted(session, job):  # the real converter runs, then the user presses Ctrl-C
        real(session, job)
        assert Path(job.path).exists()
        raise KeyboardInterrupt

    monkeypatch.setitem(export_module.CONVERTERS, Format.ONNX, interrupted)
    with pytest.raises(KeyboardInterrupt):
        export_model(trained_path, ExportOptions(validate_samples=20, out_dir=tmp_path), data=small_npz_dir)
    assert _no_artifacts(tmp_path) == ["tiny_fp32.tflite", "tiny_fp32.tflite.json"]  # the finished one only


@pytest.fixture(scope="module")
def foreign_h5(tmp_path_factory, trained_path):
    """Someone else's model: expects inputs standardised outside the model, saved as .h5 without metadata."""
    import keras

    from resnet_deploy.models.builder import build_model, transfer_weights
    from resnet_deploy.models.io import load_model

    model = build_model("resnet8", width=0.25, normalize=False)
    transfer_weights(load_model(trained_path), model)
    path = tmp_path_factory.mktemp("foreign") / "theirs.h5"
    keras.saving.save_model(model, path)
    return path


def test_foreign_model_preprocessing_from_options_reaches_the_manifest(tmp_path, foreign_h5, small_npz_dir,
                                                                        float_logits):
    from resnet_deploy.runtimes import open_runner

    spec = Preprocessing.standardized()
    opts = ExportOptions(formats=("tflite", "onnx"), validate_samples=50, out_dir=tmp_path, preprocessing=spec)
    arts = export_model(foreign_h5, opts, data=small_npz_dir)
    x, ref = float_logits  # the same weights with normalisation inside: the same logits
    for a in arts:
        assert a.manifest.preprocessing["source"] == "export options" and a.manifest.source_model["has_metadata"] is False
        assert a.manifest.preprocessing_spec == spec
        with open_runner(a.path) as r:  # the runner applies the manifest's preprocessing to raw pixels
            np.testing.assert_allclose(r.predict(x), ref, atol=1e-3 * max(1.0, np.abs(ref).max()))
        raw = preprocess(x, Preprocessing.pixels())
        with open_runner(a.path, preprocessing=Preprocessing.pixels()) as r:  # and without it, it would be wrong
            assert np.abs(r.predict(raw) - ref).max() > 0.1


def test_qat_runs_end_to_end_and_is_integer(tmp_path, trained_path, small_npz_dir):
    opts = ExportOptions(formats=("tflite",), qat_epochs=1, qat_samples=200, calib_samples=50, validate_samples=100,
                         out_dir=tmp_path)
    arts = {a.path.name: a for a in export_model(trained_path, opts, data=small_npz_dir)}
    assert sorted(arts) == ["tiny_fp32.tflite", "tiny_int8_qat.tflite"]
    qat = arts["tiny_int8_qat.tflite"].manifest
    from resnet_deploy.converters.tflite import op_report

    ops = op_report(arts["tiny_int8_qat.tflite"].path)
    assert ops["integer_compute_ops"] == 10 and ops["float_compute_ops"] == []
    info = qat.options["qat"]
    assert info["epochs"] == 1 and info["samples"] == 200 and len(info["history"]["loss"]) == 1
    assert info["split"] == "train" and info["left_float_for_converter"] == ["normalize"]
    assert qat.validation["top1_agreement"] >= 0.7  # one epoch at lr 1e-5, BatchNorm frozen: the float model's answers
    assert os.environ.get("TF_USE_LEGACY_KERAS") in (None, "0")  # tfmot's switch did not leak


def test_qat_needs_metadata(tmp_path, foreign_h5, small_npz_dir):
    opts = ExportOptions(formats=("tflite",), qat_epochs=1, qat_samples=50, calib_samples=20, validate_samples=10,
                         out_dir=tmp_path, preprocessing=Preprocessing.standardized())
    with pytest.raises(ExportError, match="QAT needs the model's architecture"):
        export_model(foreign_h5, opts, data=small_npz_dir)
    assert _no_artifacts(tmp_path) == []


@pytest.fixture(scope="module")
def saved_model_dir(tmp_path_factory, trained_path):
    """The trained tiny model as a TensorFlow SavedModel folder (no metadata sidecar)."""
    from resnet_deploy.models.io import load_model

    path = tmp_path_factory.mktemp("savedmodel") / "tiny_sm"
    load_model(trained_path).export(str(path), format="tf_saved_model", verbose=False)
    return path


def test_saved_model_folder_exports_and_validates(tmp_path, saved_model_dir, small_npz_dir, float_logits):
    """A SavedModel is wrapped (TFSMLayer on its serving signature) and goes through the same converters:
    TFLiteConverter.from_keras_model and tf2onnx from_keras, each validated against the float model."""
    import onnx

    from resnet_deploy.runtimes import open_runner

    arts = {a.path.name: a for a in export_model(saved_model_dir, ExportOptions(validate_samples=50, out_dir=tmp_path),
                                                 data=small_npz_dir)}
    assert sorted(arts) == ["tiny_sm_fp32.onnx", "tiny_sm_fp32.tflite"]
    x, ref = float_logits
    for a in arts.values():
        m = a.manifest
        assert m.validation["passed"] is True and m.validation["top1_agreement"] == 1.0
        assert m.source_model["sha256"] == sha256_file(saved_model_dir) and m.source_model["has_metadata"] is False
        assert (a.path.parent / m.source_model["path"]).resolve() == saved_model_dir.resolve()
        assert m.input.shape == (None, 32, 32, 3) and m.output.shape == (None, 10)
        with open_runner(a.path) as r:
            np.testing.assert_allclose(r.predict(x), ref, atol=1e-4 * max(1.0, np.abs(ref).max()))
    g = onnx.load(str(arts["tiny_sm_fp32.onnx"].path)).graph
    assert [i.name for i in g.input] == ["image"] and len(g.output) == 1


# CLI --------------------------------------------------------------------------------------------
runner = CliRunner()


def _cli(*args):
    from resnet_deploy.cli import app

    return runner.invoke(app, ["export", *map(str, args)], env={"COLUMNS": "200"})


def test_cli_happy_path_prints_the_table(tmp_path, trained_path, small_npz_dir):
    r = _cli(trained_path, "--formats", "onnx", "--int8", "--onnx-activation-type", "int8", "--no-onnx-reduce-range",
             "--calib-method", "entropy", "--calib-samples", "40", "--validate-samples", "30", "--out", tmp_path / "o",
             "--data", small_npz_dir)
    assert r.exit_code == 0, r.output
    assert "tiny_fp32.onnx" in r.output and "tiny_int8_s8s8.onnx" in r.output and "exported 2 artifacts" in r.output
    assert "made for host -> " in r.output and "ONNX INT8 target host -> " in r.output
    m = json.loads((tmp_path / "o" / "tiny_int8_s8s8.onnx.json").read_text())
    assert m["calibration"]["method"] == "entropy" and m["calibration"]["activations"].startswith("int8")
    assert m["calibration"]["sample"]["samples"] == 40
    # given on the command line: recorded as the user's choices, and in the graph
    cal = m["calibration"]
    assert cal["activation_type"] == "int8" and cal["reduce_range"] is False and cal["scheme"] == "s8s8"
    assert cal["chosen_by"] == {"target": "automatic", "activation_type": "user", "weight_type": "fixed",
                                "reduce_range": "user"}
    assert cal["reason"]["reduce_range"].startswith("user: --no-onnx-reduce-range")
    assert _max_abs_quantized_weight(tmp_path / "o" / "tiny_int8_s8s8.onnx") == 127  # 8-bit weights


def test_cli_passes_unset_onnx_int8_choices_as_automatic_and_checks_opset_first(tmp_path, trained_path,
                                                                                monkeypatch):
    from resnet_deploy.converters import export as export_module

    calls = []

    def fake_export(model, options, data=None, progress=None):
        calls.append(options)
        raise ExportError("stopped by the test")

    monkeypatch.setattr(export_module, "export_model", fake_export)
    _cli(trained_path, "--int8", "--out", tmp_path)
    _cli(trained_path, "--int8", "--onnx-activation-type", "uint8", "--no-onnx-reduce-range", "--out", tmp_path)
    assert [(o.int8_target, o.onnx_activation_type, o.onnx_reduce_range) for o in calls] == \
        [("host", None, None), ("host", "uint8", False)]
    for bad in ("12", "19"):
        r = _cli(trained_path, "--opset", bad, "--out", tmp_path)
        assert r.exit_code == 2 and "from 13 to 18" in r.output and "--opset 17" in r.output, r.output
    assert len(calls) == 2  # refused before any work
    from resnet_deploy.cli import app

    r = runner.invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert "ONNX opset, 13 to 18" in r.output and "--no-onnx-reduce-range" in r.output


@pytest.fixture(scope="module")
def bad_models(tmp_path_factory, trained_path):
    import keras

    d = tmp_path_factory.mktemp("bad")
    (d / "notes.keras").write_text("this is not a model")
    data = trained_path.read_bytes()
    (d / "truncated.keras").write_bytes(data[: len(data) // 2])
    inp = keras.Input((28, 28, 1))
    keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(inp))).save(d / "mnist.keras")
    inp = keras.Input((32, 32, 3))
    keras.Model(inp, keras.layers.Dense(5)(keras.layers.GlobalAveragePooling2D()(inp))).save(d / "five.keras")
    inp = keras.Input((28, 28, 1))
    keras.Model(inp, keras.layers.Dense(10)(keras.layers.Flatten()(inp))).export(
        str(d / "mnist_savedmodel"), format="tf_saved_model", verbose=False)
    return d


@pytest.mark.parametrize("name, message", [
    ("notes.keras", "is not a complete .keras file"), ("truncated.keras", "is not a complete .keras file"),
    ("missing.keras", "does not exist"),
    ("mnist.keras", "takes inputs of shape"), ("five.keras", "outputs shape"),
    ("mnist_savedmodel", "takes inputs of shape (28, 28, 1)"),
])
def test_bad_models_are_clear_errors_and_write_nothing(tmp_path, bad_models, small_npz_dir, name, message):
    out = tmp_path / "out"
    r = _cli(bad_models / name, "--int8", "--out", out, "--data", small_npz_dir)
    assert r.exit_code == 2, r.output
    assert message in r.output and ("Expected:" in r.output or "Fix:" in r.output)
    assert _no_artifacts(out) == []


def test_cli_option_errors(tmp_path, trained_path):
    r = _cli(trained_path, "--formats", "tflite,pt", "--out", tmp_path)
    assert r.exit_code == 2 and "Unknown export format 'pt'" in r.output
    r = _cli(trained_path, "--int8-io", "--out", tmp_path)
    assert r.exit_code == 2 and "--int8-io" in r.output
    assert _no_artifacts(tmp_path) == []


def test_model_errors_are_model_errors(tmp_path):
    with pytest.raises(ModelError):
        export_model(tmp_path / "nope.keras", ExportOptions(out_dir=tmp_path))


def test_softmax_model_is_said_and_recorded(tmp_path, trained_path, small_npz_dir):
    """A model whose last layer is a softmax exports (its outputs stay probabilities), but the export says so
    in its output and records it in every manifest; the logits model beside it says nothing of the kind."""
    import keras

    from resnet_deploy.models.io import base_metadata, load_model, save_model

    base = load_model(trained_path)
    prob = keras.Model(base.inputs, keras.layers.Activation("softmax", name="probs")(base.outputs[0]))
    path = tmp_path / "prob.keras"
    save_model(prob, path, base_metadata("resnet8", width=0.25))
    r = _cli(path, "--formats", "onnx", "--parity-samples", "30", "--out", tmp_path / "o", "--data", small_npz_dir)
    assert r.exit_code == 0, r.output
    flat = " ".join(r.output.split())
    assert "outputs probabilities, not logits" in flat and "'probs' is a softmax" in flat, r.output
    m = json.loads((tmp_path / "o" / "prob_fp32.onnx.json").read_text())
    assert m["options"]["model_output"]["kind"] == "probabilities" and m["options"]["model_output"]["softmax_last_layer"]
    assert m["validation"]["output"] == "probabilities" and "max_abs_prob_diff" in m["validation"]
    r = _cli(trained_path, "--formats", "onnx", "--validate-samples", "30", "--out", tmp_path / "l", "--data",
             small_npz_dir)  # the deprecated name of --parity-samples still works, and says so
    assert r.exit_code == 0 and "probabilities" not in r.output, r.output
    assert "--validate-samples is deprecated; use --parity-samples" in r.output, r.output
    m = json.loads((tmp_path / "l" / "tiny_fp32.onnx.json").read_text())
    assert m["options"]["model_output"]["kind"] == "logits" and m["validation"]["output"] == "logits"


def test_validation_overlaps_the_next_conversion_and_still_stops_the_export(tmp_path, trained_path, small_npz_dir,
                                                                            monkeypatch):
    """Each artifact's validation and commit run in a worker while the next one converts: the TFLite FP32
    validation below waits until the ONNX conversion has started (a sequential export would never start it,
    and the wait would time out). A failed validation still ends the export with nothing after it committed."""
    import threading

    from resnet_deploy.config import Format
    from resnet_deploy.converters import export as export_module
    from resnet_deploy.converters import parity as parity_module

    started, seen = threading.Event(), []
    real_check, real_onnx = parity_module.check_parity, export_module.CONVERTERS[Format.ONNX]

    def check(path, *args, **kwargs):
        if str(path).endswith(".tflite"):
            seen.append((started.wait(30), threading.current_thread().name))
        return real_check(path, *args, **kwargs)

    def onnx_convert(*args):
        started.set()
        return real_onnx(*args)

    monkeypatch.setattr(parity_module, "check_parity", check)
    monkeypatch.setitem(export_module.CONVERTERS, Format.ONNX, onnx_convert)
    arts = export_model(trained_path, ExportOptions(validate_samples=20, out_dir=tmp_path / "ok"), data=small_npz_dir)
    assert [a.path.name for a in arts] == ["tiny_fp32.tflite", "tiny_fp32.onnx"]
    assert len(seen) == 1 and seen[0][0] is True and seen[0][1].startswith("rd-validate"), seen
    # the TFLite FP32 file fails its validation while the ONNX one converts: nothing is committed
    with pytest.raises(ExportError, match="FP32 artifact disagrees"):
        export_model(trained_path, ExportOptions(validate_samples=20, out_dir=tmp_path / "bad", fp32_tolerance=1e-12),
                     data=small_npz_dir)
    assert _no_artifacts(tmp_path / "bad") == []
