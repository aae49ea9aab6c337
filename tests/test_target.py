"""`export --target`: the ONNX INT8 scheme a target names is what the written graph holds, on any host;
``host`` follows the CPU flags; contradicting overrides are refused; the scheme is in the file name; and
one export runs tf2onnx once (FP16 and INT8 made from the validated FP32 graph) and traces the model into
a SavedModel once for all its TFLite files.

The graph checks read the ONNX proto with numpy (zero-point dtypes of QuantizeLinear, the largest
quantized weight), never the manifest the tool wrote about it.
"""

from __future__ import annotations

import platform

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_deploy.config import Format, Precision
from resnet_deploy.converters.export import export_model
from resnet_deploy.converters.onnx_rules import INT8_TARGETS, onnx_int8_settings, scheme_name
from resnet_deploy.converters.options import ExportOptions, Target
from resnet_deploy.converters.planning import plan
from resnet_deploy.errors import ExportError

SMALL = dict(calib_samples=50, validate_samples=64)
# what each target must write: (activation zero-point dtype, largest |quantized weight| allowed, at least)
EXPECTED = {"x86-vnni": ("uint8", 127, 127), "x86-avx2": ("uint8", 64, 1), "arm64": ("int8", 127, 127)}


def graph_facts(path) -> tuple[set[str], int]:
    """The dtypes of the QuantizeLinear zero points (the activation type) and the largest |q| of the int8
    weight initializers feeding DequantizeLinear (127 for 8-bit symmetric per-channel weights, at most 64
    with reduce_range), read from the ONNX proto itself."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    zps = {inits[n.input[2]].dtype.name for n in g.node
           if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits}
    ws = [inits[n.input[0]] for n in g.node if n.op_type == "DequantizeLinear" and n.input[0] in inits
          and inits[n.input[0]].dtype == np.int8 and inits[n.input[0]].ndim >= 2]
    assert zps and ws, "not a QDQ graph with int8 weights"
    return zps, int(max(np.abs(w.astype(np.int32)).max() for w in ws))


def _pretend_host(monkeypatch, machine: str, flags):
    """Make this process look like another CPU to the rule (``envinfo.read_cpu_flags`` and ``platform.machine``)."""
    from resnet_deploy import envinfo

    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: flags)
    monkeypatch.setattr(platform, "machine", lambda: machine)


@pytest.fixture(scope="module")
def by_target(tmp_path_factory, tiny_model_path, small_npz_dir):
    """One ONNX INT8 export per explicit target, on a host that pretends to be each of the *other* kinds
    (an explicit target must not read the CPU at all)."""
    out = {}
    pretend = {"x86-vnni": ("aarch64", ["asimddp"]), "x86-avx2": ("x86_64", ["avx2", "avx512_vnni"]),
               "arm64": ("x86_64", ["avx2"])}
    for name in INT8_TARGETS:
        with pytest.MonkeyPatch.context() as mp:
            _pretend_host(mp, *pretend[name])
            opts = ExportOptions(formats=("onnx",), int8=True, int8_target=name, out_dir=tmp_path_factory.mktemp(name),
                                 **SMALL)
            out[name] = {a.path.name: a for a in export_model(tiny_model_path, opts, data=small_npz_dir)}
    return out


@pytest.mark.parametrize("name", list(INT8_TARGETS))
def test_target_writes_the_scheme_it_names_on_any_host(by_target, name):
    arts = by_target[name]
    rule = INT8_TARGETS[name]
    scheme = scheme_name(rule.activation_type, "int8", rule.reduce_range)
    assert sorted(arts) == sorted(["model_fp32.onnx", f"model_int8_{scheme}.onnx"])  # the scheme is in the name
    art = arts[f"model_int8_{scheme}.onnx"]
    zps, max_q = graph_facts(art.path)
    act, most, least = EXPECTED[name]
    assert zps == {act}, zps
    assert least <= max_q <= most, (name, max_q)
    cal = art.manifest.calibration
    assert (cal["target"], cal["requested_target"], cal["scheme"]) == (name, name, scheme)
    assert (cal["activation_type"], cal["weight_type"], cal["reduce_range"]) == (act, "int8", rule.reduce_range)
    assert cal["chosen_by"]["target"] == "user" and cal["chosen_by"]["activation_type"] == "target"
    assert art.manifest.options["converter"]["scheme"] == scheme


def test_the_three_schemes_differ_in_the_graph(by_target):
    """The check above can fail: the three files really differ where their schemes say they do."""
    facts = {name: graph_facts(next(a for n, a in arts.items() if "int8" in n).path) for name, arts in by_target.items()}
    assert facts["x86-vnni"][0] != facts["arm64"][0]  # uint8 vs int8 activations
    assert facts["x86-avx2"][1] <= 64 < facts["x86-vnni"][1]  # 7-bit vs 8-bit weights


@pytest.mark.parametrize("machine, flags, target, scheme", [
    ("x86_64", ["avx2", "fma"], "x86-avx2", "u8s8-rr7"),
    ("x86_64", ["avx2", "avx512f"], "x86-avx2", "u8s8-rr7"),  # AVX-512 without VNNI saturates too
    ("x86_64", ["avx2", "avx512f", "avx512_vnni"], "x86-vnni", "u8s8"),
    ("AMD64", ["avx2", "avx_vnni"], "x86-vnni", "u8s8"),
    ("x86_64", None, "x86-avx2", "u8s8-rr7"),  # flags unknown: the safe side
    ("aarch64", ["asimddp", "i8mm"], "arm64", "s8s8"),
    ("arm64", [], "arm64", "s8s8"),
])
def test_host_resolves_as_the_cpu_flags_say(monkeypatch, tmp_path, machine, flags, target, scheme):
    _pretend_host(monkeypatch, machine, flags)
    s = ExportOptions(int8=True).onnx_int8()
    assert (s.target, s.requested_target, s.scheme) == (target, "host", scheme)
    assert s.chosen_by["target"] == "automatic" and s.cpu["flags"] == flags
    assert ("flags unknown" in s.reason["host"]) is (flags is None)
    assert f"host -> {target}" in s.describe()
    paths = plan(tmp_path / "m.keras", ExportOptions(int8=True, out_dir=tmp_path))
    assert paths[Target(Format.ONNX, Precision.INT8, scheme=scheme)].name == f"m_int8_{scheme}.onnx"
    assert paths[Target(Format.TFLITE, Precision.INT8)].name == "m_int8.tflite"  # TFLite INT8 is the same everywhere


def test_host_on_an_unknown_cpu_asks_for_a_target(monkeypatch, tmp_path):
    _pretend_host(monkeypatch, "ppc64le", [])
    with pytest.raises(ExportError, match="neither x86 nor arm64") as info:
        plan(tmp_path / "m.keras", ExportOptions(int8=True))
    assert "--target" in info.value.render()
    assert plan(tmp_path / "m.keras", ExportOptions(int8=True, int8_target="arm64"))  # an explicit target works


def test_host_overrides_keep_working_and_are_recorded(monkeypatch):
    _pretend_host(monkeypatch, "x86_64", ["avx2"])
    s = ExportOptions(int8=True, onnx_reduce_range=False).onnx_int8()
    assert (s.target, s.scheme, s.chosen_by["reduce_range"]) == ("x86-avx2", "u8s8", "user")
    s = ExportOptions(int8=True, onnx_activation_type="int8").onnx_int8()
    assert s.scheme == "s8s8" and s.reduce_range is False  # reduce_range never with int8 activations
    assert "never" in s.reason["reduce_range"]
    # an override equal to what the explicit target says is not a conflict
    assert ExportOptions(int8=True, int8_target="x86-avx2", onnx_reduce_range=True).onnx_int8().scheme == "u8s8-rr7"


@pytest.mark.parametrize("kwargs, match", [
    (dict(int8_target="x86-vnni", onnx_reduce_range=True), "--target x86-vnni writes u8s8"),
    (dict(int8_target="x86-avx2", onnx_reduce_range=False), "--no-onnx-reduce-range contradicts"),
    (dict(int8_target="arm64", onnx_activation_type="uint8"), "--onnx-activation-type uint8 contradicts"),
    (dict(int8_target="x86-avx2", onnx_activation_type="int8"), "--onnx-activation-type int8"),
    (dict(onnx_activation_type="int8", onnx_reduce_range=True), "with int8 activations"),
    (dict(int8_target="avx512"), "Unknown --target"),
])
def test_conflicting_choices_are_refused_with_what_expected_fix(kwargs, match):
    with pytest.raises(ExportError, match=match) as info:
        ExportOptions(int8=True, **kwargs)
    text = info.value.render()
    assert "Expected:" in text and "Fix:" in text


def test_target_without_an_onnx_int8_file_is_refused():
    for kwargs in (dict(), dict(int8=True, formats=("tflite",))):
        with pytest.raises(ExportError, match="without an ONNX INT8 file"):
            ExportOptions(int8_target="arm64", **kwargs)
    assert ExportOptions(formats=("tflite",)).int8_target == "host"  # the default never is


def test_cli_target_refuses_conflicts_before_any_work(tmp_path, tiny_model_path, monkeypatch):
    from resnet_deploy.cli import app
    from resnet_deploy.converters import export as export_module

    calls = []
    monkeypatch.setattr(export_module, "export_model", lambda *a, **k: calls.append(a) or [])
    r = CliRunner().invoke(app, ["export", str(tiny_model_path), "--int8", "--target", "x86-vnni",
                                 "--onnx-reduce-range", "--out", str(tmp_path)], env={"COLUMNS": "200"})
    assert r.exit_code == 2 and "contradicts" in r.output and calls == [], r.output
    r = CliRunner().invoke(app, ["export", "--help"], env={"COLUMNS": "200"})
    assert "--target" in r.output and "x86-avx2" in r.output


def test_reduce_range_rule_is_only_where_needed():
    """reduce_range exactly for U8S8 on x86 without VNNI: read from the rule table, checked against the
    resolved settings of every (machine, flags) kind."""
    for machine, flags, want in (("x86_64", ["avx2"], True), ("x86_64", ["avx512_vnni"], False),
                                 ("aarch64", [], False)):
        s = onnx_int8_settings(None, None, machine, flags)
        assert s.reduce_range is want and (s.activation_type == "uint8" or not s.reduce_range)


# One conversion ----------------------------------------------------------------------------------------
def test_one_tf2onnx_run_and_one_saved_model_per_export(tmp_path, tiny_model_path, small_npz_dir, monkeypatch):
    """tf2onnx's from_keras runs once for three ONNX files and the Keras SavedModel export once for three
    TFLite files (spies that call the real functions); FP16 and INT8 still agree with the float logits."""
    import keras
    import tf2onnx

    from resnet_deploy.models.io import load_model
    from resnet_deploy.runtimes import open_runner

    counts = {"from_keras": 0, "write_out": 0}
    real_from_keras = tf2onnx.convert.from_keras
    archive_cls = type(keras.export.ExportArchive())  # the public name is a factory for the backend's class
    real_write_out = archive_cls.write_out

    def from_keras(*a, **k):
        counts["from_keras"] += 1
        return real_from_keras(*a, **k)

    def write_out(self, *a, **k):
        counts["write_out"] += 1
        return real_write_out(self, *a, **k)

    monkeypatch.setattr(tf2onnx.convert, "from_keras", from_keras)
    monkeypatch.setattr(archive_cls, "write_out", write_out)
    opts = ExportOptions(fp16=True, int8=True, int8_target="x86-vnni", out_dir=tmp_path, **SMALL)
    arts = {a.path.name: a for a in export_model(tiny_model_path, opts, data=small_npz_dir)}
    assert sorted(arts) == sorted(["model_fp32.tflite", "model_fp16.tflite", "model_int8.tflite",
                                   "model_fp32.onnx", "model_fp16.onnx", "model_int8_u8s8.onnx"])
    assert counts == {"from_keras": 1, "write_out": 1}, counts
    fp32 = arts["model_fp32.onnx"]
    for name in ("model_fp16.onnx", "model_int8_u8s8.onnx"):
        src = arts[name].manifest.options["converter"]["converted_from"]
        assert src["artifact"] == "model_fp32.onnx" and src["sha256"] == fp32.manifest.sha256
    # validated against the float model's logits, computed here with Keras
    x = np.load(small_npz_dir / "test.npz")["x"][:64]  # the images validation ran on (test[:64])
    ref = np.asarray(load_model(tiny_model_path)(x.astype(np.float32), training=False))
    scale = max(1.0, float(np.abs(ref).max()))
    for name, tol in (("model_fp16.onnx", 1e-2), ("model_int8_u8s8.onnx", 0.6), ("model_fp16.tflite", 1e-2),
                      ("model_int8.tflite", 0.6)):
        with open_runner(arts[name].path) as r:
            got = r.predict(x)
        assert np.abs(got - ref).max() <= tol * scale, (name, np.abs(got - ref).max())
        assert arts[name].manifest.validation["max_abs_logit_diff"] == pytest.approx(float(np.abs(got - ref).max()),
                                                                                     rel=1e-4, abs=1e-6)


def test_onnx_fp16_and_int8_convert_while_fp32_validates_and_are_never_committed_if_it_fails(
        tmp_path, tiny_model_path, small_npz_dir, monkeypatch):
    """The FP16 and INT8 files are made from the FP32 ONNX file before its validation has ended (the FP32
    validation below waits for the FP16 conversion to start: a sequential export would time out), yet an FP32
    file that fails validation leaves no ONNX file at all."""
    import threading

    from resnet_deploy.converters import export as export_module
    from resnet_deploy.converters import parity as parity_module
    from resnet_deploy.errors import ExportError as Err

    fp16_started, seen = threading.Event(), []
    real_check, real_onnx = parity_module.check_parity, export_module.CONVERTERS[Format.ONNX]

    def check(path, *args, **kwargs):
        if path.name == "model_fp32.onnx":
            seen.append(fp16_started.wait(30))
        return real_check(path, *args, **kwargs)

    def onnx_convert(session, job):
        if job.target.precision is Precision.FP16:
            fp16_started.set()
        return real_onnx(session, job)

    monkeypatch.setattr(parity_module, "check_parity", check)
    monkeypatch.setitem(export_module.CONVERTERS, Format.ONNX, onnx_convert)
    opts = dict(formats=(Format.ONNX,), fp16=True, int8=True, int8_target="x86-vnni", **SMALL)
    arts = export_model(tiny_model_path, ExportOptions(out_dir=tmp_path / "ok", **opts), data=small_npz_dir)
    assert [a.path.name for a in arts] == ["model_fp32.onnx", "model_fp16.onnx", "model_int8_u8s8.onnx"]
    assert seen == [True]
    fp16_started.clear()
    with pytest.raises(Err, match="FP32 artifact disagrees"):
        export_model(tiny_model_path, ExportOptions(out_dir=tmp_path / "bad", fp32_tolerance=1e-12, **opts),
                     data=small_npz_dir)
    assert not (tmp_path / "bad").exists() or sorted(p.name for p in (tmp_path / "bad").iterdir()) == []


def test_tf2onnx_in_a_second_process_gives_the_in_process_graph(tmp_path, tiny_model_path, small_npz_dir,
                                                                 monkeypatch):
    """``parallel_onnx``: the FP32 ONNX file comes from a child process (no tf2onnx call in this one), says so
    in its manifest, and computes what an in-process conversion computes (plain ONNX Runtime sessions)."""
    import onnxruntime as ort
    import tf2onnx

    calls = []
    real = tf2onnx.convert.from_keras
    monkeypatch.setattr(tf2onnx.convert, "from_keras", lambda *a, **k: calls.append(1) or real(*a, **k))
    opts = dict(fp16=True, int8=True, int8_target="x86-vnni", **SMALL)
    par = {a.path.name: a for a in export_model(tiny_model_path, ExportOptions(out_dir=tmp_path / "p",
                                                                               parallel_onnx=True, **opts),
                                                data=small_npz_dir)}
    assert calls == []  # tf2onnx ran in the child
    assert "second process" in par["model_fp32.onnx"].manifest.options["converter"]["process"]
    src = par["model_int8_u8s8.onnx"].manifest.options["converter"]["converted_from"]
    assert src["sha256"] == par["model_fp32.onnx"].manifest.sha256
    seq = {a.path.name: a for a in export_model(tiny_model_path, ExportOptions(out_dir=tmp_path / "s",
                                                                               parallel_onnx=False, **opts),
                                                data=small_npz_dir)}
    assert calls == [1] and "process" not in seq["model_fp32.onnx"].manifest.options["converter"]
    x = np.load(small_npz_dir / "test.npz")["x"][:32].astype(np.float32)
    outs = [ort.InferenceSession(str(d["model_fp32.onnx"].path)).run(None, {"image": x})[0] for d in (par, seq)]
    np.testing.assert_allclose(outs[0], outs[1], rtol=0, atol=1e-6)


def test_the_tf2onnx_process_reports_errors_and_is_killed_when_the_export_ends(tmp_path, tiny_model_path):
    from resnet_deploy.converters.onnx_process import PARALLEL_MIN_PARAMS, OnnxProcess, wanted

    bad = OnnxProcess(tmp_path / "missing.keras", 17, False, tmp_path / "a.onnx")
    with pytest.raises(ExportError, match="missing.keras does not exist"):
        bad.result()
    assert bad.process.returncode == 1 and not (tmp_path / "a.onnx").exists()
    running = OnnxProcess(tiny_model_path, 17, False, tmp_path / "b.onnx")
    running.close()  # what ExportSession does when an export fails or is interrupted first
    assert running.process.returncode is not None and running.process.returncode != 0
    assert wanted(None, PARALLEL_MIN_PARAMS) and not wanted(None, PARALLEL_MIN_PARAMS - 1)
    assert wanted(True, 10) and not wanted(False, 10**9)


def test_without_the_shared_work_each_converter_still_stands_alone(tmp_path, tiny_model_path):
    """The converters keep their registry shape: with a session that holds no model (as the QAT judge's) they
    convert from the model they are given."""
    import onnx

    from resnet_deploy.converters import onnx as onnx_converter
    from resnet_deploy.converters import tflite as tflite_converter
    from resnet_deploy.converters.base import ArtifactPlan
    from resnet_deploy.converters.session import ExportSession
    from resnet_deploy.models.io import load_model

    model = load_model(tiny_model_path)
    with ExportSession() as session:
        r = onnx_converter.convert(session, ArtifactPlan(Target(Format.ONNX, Precision.FP16), tmp_path / "a.onnx",
                                                         model, ExportOptions()))
        t = tflite_converter.convert(session, ArtifactPlan(Target(Format.TFLITE, Precision.FP32),
                                                           tmp_path / "a.tflite", model, ExportOptions()))
    assert "converted_from" not in r.settings and onnx.load(str(tmp_path / "a.onnx")).graph.input[0].name == "image"
    assert t.settings["converter"] == "tf.lite.TFLiteConverter.from_keras_model"


def test_reused_tflite_converter_gives_the_files_a_fresh_one_gives(tmp_path, tiny_model_path, small_npz_dir):
    """The export converts its TFLite files with one converter of one SavedModel, settings put back before each
    file: FP16 and INT8 made after FP32 (and INT8 after FP16) are byte for byte what a fresh converter makes."""
    from resnet_deploy.converters import tflite as tflite_converter
    from resnet_deploy.converters.base import ArtifactPlan
    from resnet_deploy.converters.session import ExportSession
    from resnet_deploy.converters.calibration import build_calibration
    from resnet_deploy.data import load_cifar10
    from resnet_deploy.data.preprocess import Preprocessing
    from resnet_deploy.models.io import load_model

    model = load_model(tiny_model_path)
    cal = build_calibration(load_cifar10(small_npz_dir, splits=("train",)).train, 20, 0, Preprocessing.pixels())
    opts = ExportOptions(int8=True, formats=("tflite",))
    t = {p: Target(Format.TFLITE, p) for p in (Precision.FP32, Precision.FP16, Precision.INT8)}

    def make(order, folder):
        folder.mkdir()
        with ExportSession(model) as session:
            for p in order:
                r = tflite_converter.convert(session, ArtifactPlan(t[p], folder / f"{p.value}.tflite", model, opts, cal))
                assert r.settings["converter"].startswith("tf.lite.TFLiteConverter.from_saved_model")
        return {p: (folder / f"{p.value}.tflite").read_bytes() for p in order}

    reused = make([Precision.FP32, Precision.FP16, Precision.INT8], tmp_path / "reused")
    assert make([Precision.INT8], tmp_path / "int8")[Precision.INT8] == reused[Precision.INT8]
    assert make([Precision.FP16], tmp_path / "fp16")[Precision.FP16] == reused[Precision.FP16]
    assert len({reused[p] for p in reused}) == 3  # three different files (the comparison can fail)
