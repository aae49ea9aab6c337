"""Shared fixtures: tiny models (a few thousand parameters) and CIFAR-10-shaped data.

Two tiers (``pytest -m "not slow"`` runs the first alone, in a few minutes, with no data beside the checkout):

- synthetic data, made here: ``synthetic_cifar_dir`` (the official ``cifar-10-batches-py`` pickle layout,
  so the real loading path reads it), ``synthetic_cifar`` (loaded from it) and ``synthetic_npz_dir`` (the
  same images in the npz layout). Each class has its own colour and stripe direction under noise, so a
  tiny ResNet learns it in an epoch or two; every prefix of ten rows holds each class once.
- the real CIFAR-10 copy: ``cifar_dir``, ``cifar`` and ``real_small_npz_dir``. Every test that uses one
  of them, directly or through another fixture, is marked ``slow`` here and is skipped where the copy
  is absent. The copy is found through $RESNET_DEPLOY_TEST_DATA, $RESNET_DEPLOY_DATA or
  ../shared/data/cifar10, in any layout the loader reads; ``RESNET_DEPLOY_TEST_DATA=none`` forces
  "no data" (the slow tests skip) on a machine that has it.

``small_npz_dir`` (1,000 training and 300 test images in the npz layout) is the synthetic folder, except
in a test that also reads the real copy: there it holds the first real images, as ``real_small_npz_dir``
(such a test compares what was exported or trained from it with ``cifar``). pytest runs the tests that
get the real folder one after the other (a parametrized session fixture), so the slow tier may run
them out of file order.
"""

from __future__ import annotations

import os
import pickle
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RESNET_DEPLOY_NO_DOWNLOAD", "1")  # tests never reach for the network

REPO = Path(__file__).resolve().parents[1]
NO_DATA = ("none", "0", "off")  # $RESNET_DEPLOY_TEST_DATA values that mean: behave as if there were no copy
REAL_DATA_FIXTURES = frozenset({"cifar_dir", "cifar", "real_small_npz_dir"})  # a test using one is `slow`

SYNTH_TRAIN_PER_CLASS = 100  # 1,000 training images, 200 in each data_batch_i
SYNTH_TEST_PER_CLASS = 30  # 300 test images


# ----------------------------------------------------------------------------------------------
# The real copy
# ----------------------------------------------------------------------------------------------
def _is_cifar_copy(p: Path) -> bool:
    """A path the loader can read both splits from: an npz folder, the official batches (or their parent
    folder), or the official tarball."""
    if p.is_file():
        return p.name.endswith((".tar.gz", ".tgz"))
    return ((p / "test.npz").exists() and (p / "train.npz").exists()) or (p / "test_batch").exists() \
        or (p / "cifar-10-batches-py" / "test_batch").exists() or (p / "cifar-10-python.tar.gz").exists()


def _find_cifar() -> Path | None:
    forced = os.environ.get("RESNET_DEPLOY_TEST_DATA")
    if forced is not None and forced.strip().lower() in NO_DATA:
        return None
    for cand in (forced, os.environ.get("RESNET_DEPLOY_DATA"), REPO.parent / "shared" / "data" / "cifar10"):
        if cand and _is_cifar_copy(Path(cand)):
            return Path(cand)
    return None


def pytest_generate_tests(metafunc):
    """``small_npz_dir`` is the real prefix in a test that reads the real copy too (see the module docstring)."""
    if "small_npz_dir" in metafunc.fixturenames and REAL_DATA_FIXTURES & set(metafunc.fixturenames):
        metafunc.parametrize("small_npz_dir", ["real"], indirect=True, scope="session", ids=["real"])


def pytest_collection_modifyitems(config, items):
    """Every test that reads the real copy (directly or through another fixture) is `slow`."""
    slow = pytest.mark.slow
    for item in items:
        if REAL_DATA_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(slow)


@pytest.fixture(autouse=True, scope="session")
def _bench_cache(tmp_path_factory):
    """No test writes into the user's cache of float logits (bench.reference_cache)."""
    os.environ["RESNET_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    """The real CIFAR-10 copy (any layout the loader reads); the test is skipped without it."""
    p = _find_cifar()
    if p is None:
        pytest.skip("real CIFAR-10 copy not found (set RESNET_DEPLOY_TEST_DATA; 'none' forces this skip)")
    return p


@pytest.fixture(scope="session")
def cifar(cifar_dir):
    from resnet_deploy.data import load_cifar10

    return load_cifar10(cifar_dir)


@pytest.fixture(scope="session")
def real_small_npz_dir(tmp_path_factory, cifar) -> Path:
    """A folder in the npz layout with the first 1,000 real training and 300 real test images."""
    d = tmp_path_factory.mktemp("cifar_small_real")
    np.savez(d / "train.npz", x=cifar.train.x[:1000], y=cifar.train.y[:1000].astype(np.uint8))
    np.savez(d / "test.npz", x=cifar.test.x[:300], y=cifar.test.y[:300].astype(np.uint8))
    return d


# ----------------------------------------------------------------------------------------------
# Synthetic data, made here
# ----------------------------------------------------------------------------------------------
def _class_looks(seed: int = 2026) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: a mean colour (RGB 0..255), a stripe frequency (cycles per image height) and a per-channel
    stripe sign."""
    rng = np.random.default_rng(seed)
    colours = rng.uniform(70, 185, (10, 3))
    freqs = rng.permutation(np.linspace(1.5, 6.0, 10))
    signs = rng.choice([-1.0, 1.0], (10, 3))
    return colours, freqs, signs


def synthetic_images(per_class: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``10 * per_class`` uint8 NHWC images and int64 labels with a learnable class signal: the class's
    colour (jittered per image) plus horizontal stripes of the class's frequency (random phase) plus pixel
    noise; pixel mean and spread near real CIFAR-10's. The signal survives the training augmentation
    (flips, crops). Labels come in blocks of ten holding each class once, shuffled within the block, so
    the first N rows of a split are as class-balanced as they can be."""
    rng = np.random.default_rng(seed)
    colours, freqs, signs = _class_looks()
    y = np.concatenate([rng.permutation(10) for _ in range(per_class)]).astype(np.int64)
    n = len(y)
    rows = np.arange(32, dtype=np.float64)[None, :, None]
    phase = rng.uniform(0, 2 * np.pi, n)[:, None, None]
    wave = np.broadcast_to(np.sin(2 * np.pi * freqs[y][:, None, None] * rows / 32 + phase), (n, 32, 32))
    img = (colours[y] + rng.normal(0, 12, (n, 3)))[:, None, None, :] \
        + 40 * wave[..., None] * signs[y][:, None, None, :] + rng.normal(0, 25, (n, 32, 32, 3))
    return np.clip(np.rint(img), 0, 255).astype(np.uint8), y


def write_batches(folder: Path, train: tuple[np.ndarray, np.ndarray], test: tuple[np.ndarray, np.ndarray]) -> Path:
    """Write images in the official ``cifar-10-batches-py`` layout: five training pickles and one test
    pickle of bytes-keyed dicts (``data`` uint8 (N, 3072) as R, G, B planes, ``labels`` a list), plus
    ``batches.meta``. Returns ``folder``."""
    from resnet_deploy.data.constants import CLASS_NAMES

    folder.mkdir(parents=True, exist_ok=True)

    def dump(name, x, y, label):
        d = {b"batch_label": label.encode(), b"labels": [int(v) for v in y],
             b"data": np.ascontiguousarray(x.transpose(0, 3, 1, 2).reshape(len(x), 3072)),
             b"filenames": [b"synthetic_%05d.png" % i for i in range(len(x))]}
        (folder / name).write_bytes(pickle.dumps(d, protocol=2))

    x, y = train
    for i, (xb, yb) in enumerate(zip(np.array_split(x, 5), np.array_split(y, 5)), start=1):
        dump(f"data_batch_{i}", xb, yb, f"training batch {i} of 5")
    dump("test_batch", *test, "testing batch 1 of 1")
    meta = {b"label_names": [n.encode() for n in CLASS_NAMES], b"num_cases_per_batch": len(x) // 5, b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder


@pytest.fixture(scope="session")
def synthetic_arrays() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The synthetic images and labels as made, before any file: what the loaders must give back."""
    return {"train": synthetic_images(SYNTH_TRAIN_PER_CLASS, seed=1), "test": synthetic_images(SYNTH_TEST_PER_CLASS, seed=2)}


@pytest.fixture(scope="session")
def synthetic_cifar_dir(tmp_path_factory, synthetic_arrays) -> Path:
    """1,000 training and 300 test synthetic images in the official ``cifar-10-batches-py`` layout."""
    return write_batches(tmp_path_factory.mktemp("cifar_synth") / "cifar-10-batches-py",
                         synthetic_arrays["train"], synthetic_arrays["test"])


@pytest.fixture(scope="session")
def synthetic_cifar(synthetic_cifar_dir):
    """The synthetic set loaded through the official-batches reader (a ``Cifar10``, like ``cifar``)."""
    from resnet_deploy.data import load_cifar10

    return load_cifar10(synthetic_cifar_dir)


@pytest.fixture(scope="session")
def synthetic_npz_dir(tmp_path_factory, synthetic_cifar) -> Path:
    """The synthetic set (1,000 training and 300 test images) in the npz layout."""
    d = tmp_path_factory.mktemp("cifar_small")
    np.savez(d / "train.npz", x=synthetic_cifar.train.x, y=synthetic_cifar.train.y.astype(np.uint8))
    np.savez(d / "test.npz", x=synthetic_cifar.test.x, y=synthetic_cifar.test.y.astype(np.uint8))
    return d


@pytest.fixture(scope="session")
def small_npz_dir(request) -> Path:
    """A folder in the npz layout with 1,000 training and 300 test images: ``synthetic_npz_dir``, or
    ``real_small_npz_dir`` in a test that reads the real copy too (``pytest_generate_tests``)."""
    return request.getfixturevalue("real_small_npz_dir" if getattr(request, "param", None) == "real"
                                   else "synthetic_npz_dir")


# ----------------------------------------------------------------------------------------------
# Tiny models
# ----------------------------------------------------------------------------------------------
def export_tiny_onnx(folder: Path, model_path: Path, data) -> dict[str, Path]:
    """The tiny model copied into ``folder`` and exported there to ONNX FP32, FP16 and INT8 through the real
    converters: ``{"model": ..., "fp32": ..., "fp16": ..., "int8": ...}``."""
    from resnet_deploy.converters.export import export_model
    from resnet_deploy.converters.options import ExportOptions

    model = copy_with_sidecar(model_path, folder / "model.keras")
    arts = export_model(model, ExportOptions(formats=("onnx",), int8=True, fp16=True, calib_samples=50,
                                             validate_samples=32), data=data)
    return {"model": model, **{a.precision: a.path for a in arts}}


def copy_with_sidecar(model: Path, dest: Path) -> Path:
    """Copy a .keras model and its metadata sidecar to ``dest`` (a .keras path); returns ``dest``."""
    import shutil

    shutil.copy(model, dest)
    shutil.copy(f"{model}.json", f"{dest}.json")
    return dest


def tiny_model(arch: str = "resnet8", width: float = 0.25, framework: str = "keras", seed: int = 0):
    """A real ResNet of the family with a few thousand parameters (resnet8 at width 0.25: 5,214 trainable, 5,382 in all)."""
    import keras

    from resnet_deploy.models.builder import build_model

    keras.utils.set_random_seed(seed)
    return build_model(arch, width=width, framework=framework)


@pytest.fixture(scope="session")
def tiny_model_path(tmp_path_factory) -> Path:
    """A tiny ResNet saved as .keras with its metadata sidecar (random weights, BN statistics perturbed
    so that the BatchNorm folding in converters is exercised)."""
    from resnet_deploy.models.io import base_metadata, save_model

    model = tiny_model()
    rng = np.random.default_rng(1)
    for layer in model.layers:
        if type(layer).__name__ == "BatchNormalization":
            g, b, m, v = layer.get_weights()
            layer.set_weights([g * rng.uniform(0.5, 1.5, g.shape), b + rng.normal(0, 0.1, b.shape),
                               m + rng.normal(0, 0.1, m.shape), v * rng.uniform(0.5, 2.0, v.shape)])
    path = tmp_path_factory.mktemp("tiny_model") / "model.keras"
    save_model(model, path, base_metadata("resnet8", width=0.25))
    return path
