"""Converter building blocks: options, preprocessing resolution, calibration sample, parity figures."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_deploy.config import Format, Precision
from resnet_deploy.converters.command import parse_preprocessing
from resnet_deploy.converters.options import ExportOptions, Target, default_onnx_activation_type, parse_formats
from resnet_deploy.converters.export import plan, resolve_preprocessing
from resnet_deploy.converters.validate import fp32_limit, parity
from resnet_deploy.data.constants import CIFAR10_MEAN, CIFAR10_STD
from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.data.sources import Split
from resnet_deploy.errors import ExportError


def test_targets_default_and_the_six(tmp_path):
    assert [t.file_name("m") for t in ExportOptions().targets()] == ["m_fp32.tflite", "m_fp32.onnx"]
    six = ExportOptions(fp16=True, int8=True).targets()
    assert [t.file_name("m") for t in six] == ["m_fp32.tflite", "m_fp16.tflite", "m_int8.tflite",
                                              "m_fp32.onnx", "m_fp16.onnx", "m_int8.onnx"]
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
    ({"validate_samples": 0}, "validate-samples"),
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
    assert default_onnx_activation_type("x86_64") == "uint8" and default_onnx_activation_type("AMD64") == "uint8"
    assert default_onnx_activation_type("aarch64") == "int8" and default_onnx_activation_type("arm64") == "int8"


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

    avx2 = ["avx2", "fma"]  # this machine: AMD EPYC, AVX2, no AVX-512, no VNNI
    s = onnx_int8_settings(None, None, "x86_64", avx2)
    assert (s.activation_type, s.weight_type, s.reduce_range, s.scheme) == ("uint8", "int8", True, "U8S8")
    assert s.chosen_by == {"activation_type": "automatic", "weight_type": "fixed", "reduce_range": "automatic"}
    assert s.reason["reduce_range"].startswith("automatic:") and "VPMADDUBSW" in s.reason["reduce_range"]
    assert "avx2, fma" in s.reason["reduce_range"] and "7 bits" in s.reason["weight_type"]
    for vnni in (["avx2", "avx512f", "avx512_vnni"], ["avx2", "avx_vnni"]):
        v = onnx_int8_settings(None, None, "x86_64", vnni)
        assert v.reduce_range is False and v.activation_type == "uint8" and "has VNNI" in v.reason["reduce_range"]
    arm = onnx_int8_settings(None, None, "aarch64", ["asimddp"])
    assert (arm.activation_type, arm.reduce_range, arm.scheme) == ("int8", False, "S8S8")
    # the user's choice wins and is recorded as the user's, on any CPU
    u = onnx_int8_settings("int8", False, "x86_64", avx2)
    assert (u.activation_type, u.reduce_range) == ("int8", False)
    assert u.chosen_by["activation_type"] == u.chosen_by["reduce_range"] == "user"
    assert u.reason["reduce_range"].startswith("user: --no-onnx-reduce-range")
    assert u.reason["activation_type"].startswith("user: int8")
    assert onnx_int8_settings("uint8", True, "aarch64", []).reduce_range is True
    # ExportOptions keeps "not given" distinct from a choice, and resolves through the same rule
    o = ExportOptions()
    assert o.onnx_activation_type is None and o.onnx_reduce_range is None
    assert o.onnx_int8("x86_64", avx2).reduce_range is True
    assert ExportOptions(onnx_reduce_range=False).onnx_int8("x86_64", avx2).chosen_by["reduce_range"] == "user"
    assert o.to_dict()["onnx_reduce_range"] is None  # the manifest's options block shows it was not given


def test_onnx_reduce_range_default_reads_this_cpu(monkeypatch):
    from resnet_deploy import envinfo
    from resnet_deploy.converters.onnx_rules import default_onnx_reduce_range, has_vnni

    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: ["avx2", "avx512_vnni"])
    assert has_vnni() and default_onnx_reduce_range("x86_64") is False
    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: ["avx2"])
    assert not has_vnni() and default_onnx_reduce_range("x86_64") is True
    assert default_onnx_reduce_range("arm64") is False
    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: None)  # no /proc/cpuinfo
    assert has_vnni() is None and default_onnx_reduce_range("x86_64") is True  # the safe side


def test_unknown_cpu_flags_are_said_so_and_do_not_warn(monkeypatch):
    from resnet_deploy import envinfo
    from resnet_deploy.converters.onnx_rules import onnx_int8_settings

    monkeypatch.setattr(envinfo, "read_cpu_flags", lambda: None)
    s = onnx_int8_settings(None, None, machine="x86_64")
    assert s.reduce_range is True and s.cpu["vnni"] is None and s.cpu["flags"] is None
    assert "flags unknown" in s.reason["reduce_range"] and "cannot be confirmed" in s.reason["reduce_range"]
    assert envinfo.cpu_flags() == []
