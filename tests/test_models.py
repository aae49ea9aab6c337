"""The ResNet family: published sizes, analytic counts vs the built graphs, Keras 3 <-> tf_keras twins."""

from __future__ import annotations

import numpy as np
import pytest

from resnet_deploy.errors import ModelError
from resnet_deploy.models.registry import ARCHS, get_arch
from resnet_deploy.models.summary import arch_counts
from tests.conftest import tiny_model

# Trainable parameters with 10 classes, CIFAR stem, projection shortcuts. ResNet18/34/50 match the
# widely used CIFAR implementations (kuangliu/pytorch-cifar: 11,173,962 / 21,282,122 / 23,520,842).
PUBLISHED = {
    "resnet18": (11_173_962, 0),
    "resnet34": (21_282_122, 0),
    "resnet50": (23_520_842, 0),
    "resnet20": (270_000, 0.02),  # He et al. 2015 Table 6: 0.27 M (option A); option B adds 2,752
    "resnet32": (460_000, 0.02),  # 0.46 M
    "resnet44": (660_000, 0.02),  # 0.66 M
    "resnet56": (850_000, 0.02),  # 0.85 M
    "resnet110": (1_700_000, 0.02),  # 1.7 M
}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_counts_match_published_figures(name):
    expected, rel = PUBLISHED[name]
    got = arch_counts(get_arch(name)).params
    assert got == pytest.approx(expected, rel=rel) if rel else got == expected


def test_macs_match_published_figures():
    assert arch_counts(get_arch("resnet18")).macs == pytest.approx(0.556e9, rel=0.01)
    assert arch_counts(get_arch("resnet34")).macs == pytest.approx(1.16e9, rel=0.01)
    # torchvision resnet50 at 224x224 with the ImageNet stem: 4.09 GMACs (with 1000 classes; 10 here)
    assert arch_counts(get_arch("resnet50"), stem="imagenet", hw=224).macs == pytest.approx(4.09e9, rel=0.01)


def test_plain_twin_has_no_shortcut_parameters():
    assert arch_counts(get_arch("plain20")).params == 269_722  # = option-A ResNet20: same layers, no projections
    assert arch_counts(get_arch("plain34")).params < arch_counts(get_arch("resnet34")).params


@pytest.mark.parametrize("name,kwargs", [
    ("resnet8", dict(width=0.25)), ("resnet8v2", dict(width=0.25)), ("plain8", dict(width=0.5)),
    ("resnet20", {}), ("resnet18", dict(width=0.125)), ("resnet50", dict(width=0.0625)),
    ("resnet50v2", dict(width=0.0625, stem="imagenet", input_shape=(64, 64, 3))),
    ("resnet18v2", dict(width=0.125)), ("plain18", dict(width=0.125, stem="imagenet", input_shape=(64, 64, 3))),
])
def test_analytic_counts_equal_the_built_graph(name, kwargs):
    import keras

    from resnet_deploy.models.builder import build_model, count_macs

    model = build_model(name, **kwargs)
    trainable = sum(int(np.prod(w.shape)) for w in model.trainable_weights)
    hw = kwargs.get("input_shape", (32,))[0]
    c = arch_counts(get_arch(name), kwargs.get("width", 1.0), kwargs.get("stem", "cifar"), hw)
    assert (trainable, count_macs(model)) == (c.params, c.macs)
    out = model(np.zeros((2, hw, hw, 3), np.float32))
    assert tuple(out.shape) == (2, 10) and keras.backend.standardize_dtype(out.dtype) == "float32"


def test_layer_names_are_fixed_and_predictable():
    names = [l.name for l in tiny_model("resnet8").layers]
    for expected in ("image", "normalize", "stem_conv", "stem_bn", "stage1_block1_conv1", "stage2_block1_proj_conv",
                     "stage3_block1_add", "avg_pool", "logits"):
        assert expected in names
    plain = [l.name for l in tiny_model("plain8").layers]
    assert not any(n.endswith(("_add", "_proj_conv")) for n in plain)


def test_model_normalises_pixels_inside():
    from resnet_deploy.data import CIFAR10_MEAN, CIFAR10_STD

    model = tiny_model()
    norm = model.get_layer("normalize")
    px = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype(np.float32)
    got = np.asarray(norm(px))
    np.testing.assert_allclose(got, (px - CIFAR10_MEAN) / CIFAR10_STD, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("arch", ["resnet8", "resnet8v2"])
def test_weights_transfer_exactly_between_keras3_and_tf_keras(arch):
    import tf_keras

    from resnet_deploy.models.builder import transfer_weights

    k3 = tiny_model(arch, seed=1)
    rng = np.random.default_rng(2)
    for layer in k3.layers:  # non-trivial BN statistics so inference really depends on them
        if type(layer).__name__ == "BatchNormalization":
            g, b, m, v = layer.get_weights()
            layer.set_weights([g, b, rng.normal(0, 0.2, m.shape), rng.uniform(0.5, 2, v.shape)])
    k2 = tiny_model(arch, framework="tf_keras", seed=7)
    assert isinstance(k2, tf_keras.Model)
    x = rng.integers(0, 256, (4, 32, 32, 3)).astype(np.float32)
    assert np.abs(np.asarray(k3(x, training=False)) - k2(x, training=False).numpy()).max() > 1e-3
    transfer_weights(k3, k2)
    np.testing.assert_allclose(k2(x, training=False).numpy(), np.asarray(k3(x, training=False)), atol=1e-5)
    with pytest.raises(ModelError, match="no twin"):
        transfer_weights(tiny_model("resnet20", width=0.25), k2)


def test_transfer_refuses_partial_or_misshapen_twins_and_copies_nothing():
    from resnet_deploy.models.builder import transfer_weights

    plain, res = tiny_model("plain8", seed=1), tiny_model("resnet8", seed=2)
    before = [w.copy() for w in res.get_weights()]
    with pytest.raises(ModelError, match=r"proj_.* of .* have no twin"):  # the target's shortcuts would stay random
        transfer_weights(plain, res)
    with pytest.raises(ModelError, match="weight shapes"):
        transfer_weights(tiny_model("resnet8", width=0.5), res)
    assert all(np.array_equal(a, b) for a, b in zip(before, res.get_weights()))


@pytest.mark.parametrize("call,match", [
    (lambda b: b("resnet35"), "resnet34"),
    (lambda b: b("resnet8", width=0), "Width multiplier"),
    (lambda b: b("resnet8", width=float("nan")), "Width multiplier"),
    (lambda b: b("resnet8", stem="vgg"), "stem"),
    (lambda b: b("resnet8", input_shape=(32, 32)), "Input shape"),
    (lambda b: b("resnet8", input_shape=(2, 2, 3)), "Input shape"),
    (lambda b: b("resnet18", stem="imagenet", input_shape=(16, 16, 3)), "imagenet stem"),
    (lambda b: b("resnet8", framework="pytorch"), "framework"),
])
def test_bad_builder_options_explain_what_is_available(call, match):
    from resnet_deploy.models.builder import build_model

    with pytest.raises(ModelError, match=match):
        call(build_model)


def test_registry_names():
    assert {"resnet18", "resnet34", "resnet50", "resnet101", "resnet152", "resnet34v2", "plain34",
            "resnet20", "resnet32", "resnet44", "resnet56", "resnet110", "plain20"} <= set(ARCHS)
    assert get_arch("ResNet-34") is get_arch("resnet34")
    assert get_arch("resnet110").depth == 110 and get_arch("resnet50").depth == 50


def test_save_and_load_round_trip_with_metadata(tmp_path, tiny_model_path):
    from resnet_deploy.errors import OutputExistsError
    from resnet_deploy.models.io import load_model, read_metadata, save_model

    model = load_model(tiny_model_path)
    meta = read_metadata(tiny_model_path)
    assert meta["architecture"] == "resnet8" and meta["preprocessing"]["scale"] == 1.0
    with pytest.raises(OutputExistsError):
        save_model(model, tiny_model_path, meta)
    # a truncated file: clear error, and the original is untouched
    bad = tmp_path / "truncated.keras"
    bad.write_bytes(tiny_model_path.read_bytes()[:2000])
    with pytest.raises(ModelError, match="not a complete .keras file") as exc:
        load_model(bad)
    assert "File not found" not in str(exc.value) and "re-copy" in exc.value.fix
    (tmp_path / "empty.keras").write_bytes(b"")
    with pytest.raises(ModelError, match=r"is empty \(0 bytes\)"):
        load_model(tmp_path / "empty.keras")
    (tmp_path / "model_int8.tflite").write_bytes(b"TFL3")
    with pytest.raises(ModelError, match="exported artifact, not a float model") as exc:
        load_model(tmp_path / "model_int8.tflite")
    assert "resnet-deploy bench" in exc.value.fix
    (tmp_path / "notes.txt").write_text("hi")
    with pytest.raises(ModelError, match="not a Keras model"):
        load_model(tmp_path / "notes.txt")


def test_load_rejects_wrong_io(tmp_path):
    from resnet_deploy.models.builder import build_model
    from resnet_deploy.models.io import load_model, save_model

    m = build_model("resnet8", width=0.25, num_classes=5)
    save_model(m, tmp_path / "five.keras")
    with pytest.raises(ModelError, match=r"outputs shape \(5,\)"):
        load_model(tmp_path / "five.keras")
    m = build_model("resnet8", width=0.25, input_shape=(64, 64, 3))
    save_model(m, tmp_path / "big.keras")
    with pytest.raises(ModelError, match="inputs of shape"):
        load_model(tmp_path / "big.keras")


def test_two_input_models_and_unregistered_custom_layers_are_named(tmp_path):
    import keras

    from resnet_deploy.models.io import load_model

    a, b = keras.Input((32, 32, 3)), keras.Input((32, 32, 3))
    two = keras.Model([a, b], keras.layers.Dense(10)(keras.layers.Flatten()(keras.layers.Add()([a, b]))))
    two.save(tmp_path / "two.keras")
    with pytest.raises(ModelError, match="2 inputs and 1 outputs"):
        load_model(tmp_path / "two.keras")

    @keras.saving.register_keras_serializable(package="probe")
    class VeryCustomScaleLayerWithALongName(keras.layers.Layer):
        def call(self, x):
            return x * 2.0

    inp = keras.Input((32, 32, 3))
    out = keras.layers.Dense(10)(keras.layers.Flatten()(VeryCustomScaleLayerWithALongName()(inp)))
    keras.Model(inp, out).save(tmp_path / "custom.keras")
    keras.saving.get_custom_objects().clear()  # as in a fresh process that never imported the class
    with pytest.raises(ModelError) as exc:
        load_model(tmp_path / "custom.keras")
    assert "VeryCustomScaleLayerWithALongName" in exc.value.what and "register_keras_serializable" in exc.value.fix


def test_a_saved_model_that_writes_files_is_refused_before_it_runs(tmp_path):
    """TensorFlow's security guidance: a SavedModel is code. The op check reads the protobuf only."""
    import tensorflow as tf

    from resnet_deploy.models.builder import build_model
    from resnet_deploy.models.io import load_model, saved_model_ops

    build_model("resnet8", width=0.25).export(str(tmp_path / "good"), format="tf_saved_model", verbose=False)
    assert {"Conv2D", "Relu"} <= saved_model_ops(tmp_path / "good")
    assert load_model(tmp_path / "good").output_shape == (None, 10)  # a plain exported classifier passes

    target = tmp_path / "written-by-the-model.txt"

    class Writer(tf.Module):
        @tf.function(input_signature=[tf.TensorSpec([None, 32, 32, 3], tf.float32)])
        def serve(self, x):
            tf.io.write_file(str(target), "hello")
            return {"logits": tf.reduce_mean(x, axis=[1, 2])[:, :1] * tf.ones([1, 10])}

    w = Writer()
    tf.saved_model.save(w, str(tmp_path / "evil"), signatures={"serving_default": w.serve})
    with pytest.raises(ModelError, match="WriteFile") as exc:
        load_model(tmp_path / "evil")
    assert "--trust-model" in exc.value.fix and not target.exists()
    model = load_model(tmp_path / "evil", trust=True)  # the user's explicit choice: it loads and runs
    model.predict(np.zeros((1, 32, 32, 3), np.float32), verbose=0)
    assert target.read_text() == "hello"
