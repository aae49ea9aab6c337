"""Converter building blocks: options, preprocessing resolution, calibration sample, parity figures."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_deploy.config import Format, Precision
from resnet_deploy.converters.command import parse_preprocessing
from resnet_deploy.converters.onnx_rules import onnx_int8_settings
from resnet_deploy.converters.options import ExportOptions, Target, parse_formats
from resnet_deploy.converters.parity import fp32_limit
from resnet_deploy.converters.planning import plan, resolve_preprocessing
from resnet_deploy.data.constants import CIFAR10_MEAN, CIFAR10_STD
from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.data.sources import Split
from resnet_deploy.errors import ExportError
from resnet_deploy.metrics import parity


def test_targets_default_and_the_six(tmp_path):
    assert [t.file_name("m") for t in ExportOptions().targets()] == ["m_fp32.tflite", "m_fp32.onnx"]
    six = ExportOptions(fp16=True, int8=True, int8_target="x86-vnni").targets()
    assert [t.file_name("m") for t in six] == ["m_fp32.tflite", "m_fp16.tflite", "m_int8.tflite",
                                              "m_fp32.onnx", "m_fp16.onnx", "m_int8_u8s8.onnx"]
    extra = ExportOptions(formats=(Format.TFLITE,), dynamic_int8=True, qat_epochs=1).targets()
    assert [t.tag for t in extra] == ["fp32", "dynamic_int8", "int8_qat"]
    assert ExportOptions(qat_epochs=1).needs_calibration and not ExportOptions(fp16=True).needs_calibration
    # dynamic-range and QAT are TFLite targets: an ONNX-only export has neither
    assert [t.tag for t in ExportOptions(formats=(Format.ONNX,), dynamic_int8=True).targets()] == ["fp32"]
    paths = plan(tmp_path / "run" / "model.keras", ExportOptions(out_dir=tmp_path / "o"))
    assert paths[Target(Format.ONNX, Precision.FP32)] == tmp_path / "o" / "model_fp32.onnx"
    assert plan(tmp_path / "model.keras", ExportOptions())[Target(Format.TFLITE, Precision.FP32)].parent == tmp_path


@pytest.mark.parametrize("kwargs, match", [
    ({"formats": ("keras",)}, "Cannot export"),
    ({"opset": 9}, "opset"),
    ({"opset": 19}, "from 13 to 18"),  # tf2onnx 1.17 cannot write opset 19
    ({"onnx_reduce_range": "yes"}, "onnx_reduce_range"),
    ({"calib_method": "histogram"}, "calibration method"),
    ({"onnx_activation_type": "int4"}, "activation type"),
    ({"calib_samples": 0}, "calib-samples"),
    ({"parity_samples": 0}, "parity-samples"),
    ({"validate_samples": 0}, "parity-samples"),  # the flat name of earlier versions still folds in
    ({"int8_io": True}, "--int8-io"),
    ({"qat_epochs": -1}, "QAT"),
])
def test_bad_options_are_clear_errors(kwargs, match):
    with pytest.raises(ExportError, match=match) as info:
        ExportOptions(**kwargs)
    assert "Expected:" in str(info.value)


def test_parse_formats_and_activation_default():
    assert parse_formats(" onnx, tflite ") == (Format.ONNX, Format.TFLITE)
    for bad in ("", "tflite,pt", "keras"):
        with pytest.raises(ExportError):
            parse_formats(bad)

    def activations(machine):  # what --target host resolves to on that CPU (flags given: no /proc read)
        return onnx_int8_settings(None, None, machine=machine, flags=["avx2"]).activation_type

    assert activations("x86_64") == "uint8" and activations("AMD64") == "uint8"
    assert activations("aarch64") == "int8" and activations("arm64") == "int8"


def test_preprocessing_options_are_in_pixel_units():
    assert parse_preprocessing(None, None, None) is None
    unit = parse_preprocessing("0-1", None, None)
    assert unit == Preprocessing.unit_range()
    std = parse_preprocessing(None, ",".join(map(str, CIFAR10_MEAN)), ",".join(map(str, CIFAR10_STD)))
    assert std == Preprocessing.standardized()
    both = parse_preprocessing("0-1", "127.5,127.5,127.5", "63.75,63.75,63.75")
    x = np.array([[[[255, 127.5, 0]]]], np.float32)
    np.testing.assert_allclose(preprocess(x, both)[0, 0, 0], [2.0, 0.0, -2.0], atol=1e-6)
    for args in (("0-2", None, None), (None, "1,2", "1,2,3"), (None, "a,b,c", "1,1,1")):
        with pytest.raises(ExportError):
            parse_preprocessing(*args)


def test_preprocessing_metadata_wins_and_contradictions_fail():
    meta = {"preprocessing": Preprocessing.pixels().to_dict()}
    assert resolve_preprocessing(meta, None) == (Preprocessing.pixels(), "model metadata")
    assert resolve_preprocessing(meta, Preprocessing.pixels())[1] == "model metadata"
    with pytest.raises(ExportError, match="contradict"):
        resolve_preprocessing(meta, Preprocessing.unit_range())
    assert resolve_preprocessing(None, Preprocessing.unit_range()) == (Preprocessing.unit_range(), "export options")
    spec, source = resolve_preprocessing({}, None)
    assert spec == Preprocessing.pixels() and source.startswith("default")


def test_calibration_sample_is_balanced_preprocessed_and_shared(cifar):
    from resnet_deploy.converters.calibration import build_calibration, onnx_reader

    spec = Preprocessing.unit_range()
    train = Split("train", cifar.train.x[:2000], cifar.train.y[:2000])
    cal = build_calibration(train, 50, seed=3, spec=spec)
    assert cal.x.dtype == np.float32 and cal.x.shape == (50, 32, 32, 3) and cal.x.max() <= 1.0
    assert cal.recipe["split"] == "train" and cal.recipe["per_class"] == [5] * 10
    assert cal.recipe["preprocessing"]["scale"] == pytest.approx(1 / 255)
    again = build_calibration(train, 50, seed=3, spec=spec)
    assert again.recipe["indices_sha256_16"] == cal.recipe["indices_sha256_16"]
    assert build_calibration(train, 50, seed=4, spec=spec).recipe["indices_sha256_16"] != cal.recipe["indices_sha256_16"]
    # the TFLite representative dataset and the ONNX Runtime reader see the same images, in order
    rep = np.concatenate([b[0] for b in cal.representative_dataset()])
    reader = onnx_reader(cal, "image", batch_size=16)
    first = [reader.get_next()["image"] for _ in range(4)]
    assert reader.get_next() is None
    reader.rewind()
    np.testing.assert_array_equal(reader.get_next()["image"], first[0])
    np.testing.assert_array_equal(np.concatenate(first), rep)
    with pytest.raises(Exception, match="training split"):
        build_calibration(Split("test", train.x, train.y), 10, 0, spec)


def test_parity_figures_and_fp32_limit():
    ref = np.array([[1.0, 2.0, 0.0], [3.0, 0.0, 1.0]], np.float32)
    got = ref + np.array([[0.0, 0.0, 2.5], [0.0, 0.5, 0.0]], np.float32)
    fig = parity(got, ref)
    assert fig["max_abs_logit_diff"] == pytest.approx(2.5)
    assert fig["mean_abs_logit_diff"] == pytest.approx(3.0 / 6)
    assert fig["top1_agreement"] == 0.5
    assert fp32_limit(ref, 1e-3) == pytest.approx(3e-3)
    assert fp32_limit(ref * 0.01, 1e-3) == pytest.approx(1e-3)  # at least the tolerance itself


def test_onnx_calibration_batches_divide_the_sample():
    from resnet_deploy.converters.onnx import even_batch

    assert [even_batch(n) for n in (300, 40, 48, 7, 1, 100)] == [15, 10, 16, 7, 1, 10]
    assert even_batch(37) == 1  # a prime count: one image per step rather than a short last batch


def test_opset_range_is_what_tf2onnx_writes():
    """MAX_OPSET is the highest opset the installed tf2onnx has an IR version for (its Graph.make_model
    refuses any other); read from its source so the check needs no TensorFlow import."""
    import ast
    import importlib.util
    from pathlib import Path

    from resnet_deploy.converters.options import MAX_OPSET, MIN_OPSET

    src = Path(importlib.util.find_spec("tf2onnx").submodule_search_locations[0]) / "constants.py"
    table = next(ast.literal_eval(n.value) for n in ast.parse(src.read_text()).body
                 if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", None) == "OPSET_TO_IR_VERSION")
    assert MAX_OPSET == max(table) == 18 and MIN_OPSET == 13
    assert ExportOptions(opset=13).opset == 13 and ExportOptions(opset=18).opset == 18
    with pytest.raises(ExportError) as info:
        ExportOptions(opset=21)
    assert "from 13 to 18" in str(info.value) and "--opset 17" in str(info.value)


def test_onnx_int8_settings_rule_and_reasons():
    from resnet_deploy.converters.onnx_rules import onnx_int8_settings

    avx2 = ["avx2", "fma"]  # an AMD EPYC with AVX2, no AVX-512, no VNNI
    s = onnx_int8_settings(None, None, "x86_64", avx2)
    assert (s.activation_type, s.weight_type, s.reduce_range, s.scheme) == ("uint8", "int8", True, "u8s8-rr7")
    assert (s.target, s.requested_target) == ("x86-avx2", "host")
    assert s.chosen_by == {"target": "automatic", "activation_type": "automatic", "weight_type": "fixed",
                           "reduce_range": "automatic"}
    assert s.reason["reduce_range"].startswith("automatic:") and "VPMADDUBSW" in s.reason["reduce_range"]
    assert "avx2, fma" in s.reason["host"] and "7 bits" in s.reason["weight_type"]
    for vnni in (["avx2", "avx512f", "avx512_vnni"], ["avx2", "avx_vnni"]):
        v = onnx_int8_settings(None, None, "x86_64", vnni)
        assert (v.reduce_range, v.activation_type, v.scheme) == (False, "uint8", "u8s8")
        assert "with VNNI" in v.reason["host"] and "32 bits" in v.reason["reduce_range"]
    arm = onnx_int8_settings(None, None, "aarch64", ["asimddp"])
    assert (arm.activation_type, arm.reduce_range, arm.scheme, arm.target) == ("int8", False, "s8s8", "arm64")
    # the user's choice wins on host and is recorded as the user's, on any CPU
    u = onnx_int8_settings("int8", False, "x86_64", avx2)
    assert (u.activation_type, u.reduce_range, u.scheme) == ("int8", False, "s8s8")
    assert u.chosen_by["activation_type"] == u.chosen_by["reduce_range"] == "user"
    assert u.reason["reduce_range"].startswith("user: --no-onnx-reduce-range")
    assert u.reason["activation_type"].startswith("user: int8")
    assert onnx_int8_settings("uint8", True, "aarch64", []).scheme == "u8s8-rr7"
    # ExportOptions keeps "not given" distinct from a choice, and resolves through the same rule
    o = ExportOptions()
    assert o.onnx_activation_type is None and o.onnx_reduce_range is None and o.int8_target == "host"
    assert o.onnx_int8("x86_64", avx2).reduce_range is True
    assert ExportOptions(onnx_reduce_range=False).onnx_int8("x86_64", avx2).chosen_by["reduce_range"] == "user"
    assert o.to_dict()["onnx_reduce_range"] is None  # the manifest's options block shows it was not given
    assert o.to_dict()["int8_target"] == "host"


def test_onnx_reduce_range_default_reads_this_cpu(monkeypatch):
    from resnet_deploy import envinfo
    from resnet_deploy.envinfo import has_vnni

    def host_reduce_range(machine):  # what --target host resolves to, reading this CPU's flags
        return onnx_int8_settings(None, None, machine=machine).reduce_range

    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: ["avx2", "avx512_vnni"])
    assert has_vnni() and host_reduce_range("x86_64") is False
    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: ["avx2"])
    assert not has_vnni() and host_reduce_range("x86_64") is True
    assert host_reduce_range("arm64") is False
    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: None)  # no /proc/cpuinfo
    assert has_vnni() is None and host_reduce_range("x86_64") is True  # the safe side


def test_unknown_cpu_flags_are_said_so_and_do_not_warn(monkeypatch):
    """Unknown flags (no /proc/cpuinfo): export says so and takes the safe side (7-bit weights), and bench's
    saturation warning makes no claim about a U8S8 8-bit file there, while the same file on a known AVX2
    CPU is warned about (so the first check can fail)."""
    from resnet_deploy import envinfo
    from resnet_deploy.artifact import Manifest
    from resnet_deploy.bench.selection import u8s8_saturation_warning
    from resnet_deploy.converters.onnx_rules import onnx_int8_settings

    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: None)
    from resnet_deploy.bench import selection

    for env in (getattr(selection, "CPU_FLAGS_ENV", None), getattr(selection, "MACHINE_ENV", None)):
        if env:  # bench's CPU override for tests, where it has one
            monkeypatch.delenv(env, raising=False)
    s = onnx_int8_settings(None, None, machine="x86_64")
    assert s.reduce_range is True and s.cpu["vnni"] is None and s.cpu["flags"] is None
    assert "flags unknown" in s.reason["host"] and "cannot be confirmed" in s.reason["host"]
    assert envinfo.cpu_flags() == []
    eight_bit = onnx_int8_settings(None, None, "x86_64", ["avx512_vnni"])  # a file made for a VNNI CPU
    from resnet_deploy.artifact import TensorSpec

    m = Manifest(format="onnx", precision="int8", artifact="m_int8_u8s8.onnx", sha256="0" * 64, size_bytes=1,
                 input=TensorSpec("image", [None, 32, 32, 3], "float32"), output=TensorSpec("out", [None, 10], "float32"),
                 calibration=eight_bit.to_dict())
    assert u8s8_saturation_warning(m, "x86_64", None) is None  # flags unknown: no claim
    assert "saturate" in u8s8_saturation_warning(m, "x86_64", ["avx2"])  # known AVX2: the warning


def test_tflite_op_report_reads_the_published_schema_pinned():
    """The op report reads the .tflite flatbuffer with ``ai_edge_litert.schema_py_generated`` (the published
    schema), not the interpreter's private ``_get_ops_details``. Pinned: should the schema module change
    shape, this fails naming the ai-edge-litert version; where the private call still exists, both agree."""
    import importlib.metadata

    import tensorflow as tf

    from resnet_deploy.converters.tflite import op_report, read_graph
    from tests.conftest import tiny_model

    version = importlib.metadata.version("ai-edge-litert")
    try:
        from ai_edge_litert import schema_py_generated as schema

        for name in ("Model", "BuiltinOperator", "TensorType"):
            assert hasattr(schema, name), name
    except (ImportError, AssertionError) as exc:
        pytest.fail(f"ai-edge-litert {version} changed its flatbuffer schema module ({exc}): update "
                    "converters/tflite.read_graph")
    content = tf.lite.TFLiteConverter.from_keras_model(tiny_model()).convert()
    ops, tensors = read_graph(content)
    names = [o["op_name"] for o in ops]
    assert names.count("CONV_2D") == 9 and names.count("FULLY_CONNECTED") == 1, (version, names)
    assert all(tensors[i]["dtype"] == "float32" for o in ops if o["op_name"] == "CONV_2D" for i in o["inputs"][:2])
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_content=content)
    if hasattr(it, "_get_ops_details"):  # the private call the report used to make: the same ops, in order
        private = [(o["op_name"], list(o["inputs"]), list(o["outputs"])) for o in it._get_ops_details()]
        assert private == [(o["op_name"], o["inputs"], o["outputs"]) for o in ops], version
    import tempfile
    from pathlib import Path

    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "m.tflite").write_bytes(content)
        rep = op_report(Path(d) / "m.tflite")
    assert rep["integer_compute_ops"] == 0 and len(rep["float_compute_ops"]) == 10
