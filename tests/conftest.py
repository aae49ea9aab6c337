"""Shared fixtures: tiny models (a few thousand parameters) and small CIFAR-10 subsets.

Tests that need the real CIFAR-10 copy use ``cifar_dir`` and are skipped when it is absent
(found through $RESNET_DEPLOY_TEST_DATA, $RESNET_DEPLOY_DATA, or ../shared/data/cifar10).
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("RESNET_DEPLOY_NO_DOWNLOAD", "1")  # tests never reach for the network

REPO = Path(__file__).resolve().parents[1]


def _find_cifar() -> Path | None:
    for cand in (os.environ.get("RESNET_DEPLOY_TEST_DATA"), os.environ.get("RESNET_DEPLOY_DATA"),
                 REPO.parent / "shared" / "data" / "cifar10"):
        if cand and (Path(cand) / "test.npz").exists():
            return Path(cand)
    return None


@pytest.fixture(autouse=True, scope="session")
def _bench_cache(tmp_path_factory):
    """No test writes into the user's cache of float logits (bench.reference_cache)."""
    os.environ["RESNET_DEPLOY_CACHE"] = str(tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="session")
def cifar_dir() -> Path:
    p = _find_cifar()
    if p is None:
        pytest.skip("real CIFAR-10 copy not found (set RESNET_DEPLOY_TEST_DATA)")
    return p


@pytest.fixture(scope="session")
def cifar(cifar_dir):
    from resnet_deploy.data import load_cifar10

    return load_cifar10(cifar_dir)


@pytest.fixture(scope="session")
def small_npz_dir(tmp_path_factory, cifar) -> Path:
    """A folder in the npz layout with 1,000 real training and 300 real test images."""
    d = tmp_path_factory.mktemp("cifar_small")
    np.savez(d / "train.npz", x=cifar.train.x[:1000], y=cifar.train.y[:1000].astype(np.uint8))
    np.savez(d / "test.npz", x=cifar.test.x[:300], y=cifar.test.y[:300].astype(np.uint8))
    return d


@pytest.fixture(scope="session")
def synthetic_npz_dir(tmp_path_factory) -> Path:
    """A tiny npz-layout folder of random images (every class present), for tests that need no real data."""
    rng = np.random.default_rng(0)
    d = tmp_path_factory.mktemp("cifar_synth")
    for name, n in (("train", 200), ("test", 100)):
        y = np.arange(n) % 10
        np.savez(d / f"{name}.npz", x=rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y=y.astype(np.uint8))
    return d


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
