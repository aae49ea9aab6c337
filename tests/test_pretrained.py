"""Pretrained models: each shipped file is the one its card describes and scores what the card says;
names resolve, tampering is refused, a run publishes into a card, and the wheel carries the models."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

from resnet_deploy.errors import ModelError
from resnet_deploy.models import pretrained as pt

REPO = Path(__file__).resolve().parents[1]
SHIPPED = sorted(p for d in (pt.PACKAGE_DIR, pt.CHECKOUT_DIR) if d.is_dir() for p in d.glob(f"*{pt.CARD_SUFFIX}"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_the_package_carries_at_least_one_converged_model():
    cards = [json.loads(p.read_text()) for p in pt.PACKAGE_DIR.glob(f"*{pt.CARD_SUFFIX}")]
    assert cards, f"no pretrained model in {pt.PACKAGE_DIR}"
    assert max(c["test_accuracy"] for c in cards) >= 0.90  # the floor issue 16 sets for a converged model


@pytest.mark.parametrize("card_path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_shipped_model_matches_its_card(card_path, cifar):
    """sha256 and the accuracy on the first 500 test images, with a plain Keras call (not the project's runners)."""
    import keras

    card = json.loads(card_path.read_text())
    model_path = card_path.parent / card["file"]
    assert _sha256(model_path) == card["sha256"]
    model = keras.saving.load_model(model_path, compile=False)
    n = card["check_images"]
    x, y = cifar.test.x[:n].astype(np.float32), cifar.test.y[:n]  # the card's input: RGB pixels 0..255
    acc = float(np.mean(np.argmax(model(x, training=False), axis=1) == y))
    assert acc == pytest.approx(card["test_accuracy_first_500"], abs=card["check_tolerance"])
    assert (card_path.parent / f"{card['name']}.md").read_text().count(card["sha256"]) == 1


def test_names_resolve_and_unknown_names_are_refused_with_the_known_ones(tmp_path):
    for m in pt.list_pretrained():
        assert pt.resolve_model(m.name) == m.path
    real = tmp_path / "mine.keras"
    real.write_bytes(b"x")
    assert pt.resolve_model(real) == real  # an existing path is taken as it is
    with pytest.raises(ModelError) as exc:
        pt.resolve_model("resnet999-imaginary")
    known = ", ".join(sorted(m.name for m in pt.list_pretrained())) or "none found"
    assert known in exc.value.expected and "models --pretrained" in exc.value.fix


@pytest.fixture()
def published(tmp_path, tiny_model_path, small_npz_dir, monkeypatch):
    """A tiny model published from a fake run folder into a private pretrained folder."""
    import shutil

    run = tmp_path / "run"
    run.mkdir()
    shutil.copy(tiny_model_path, run / "model.keras")
    meta = json.loads(Path(f"{tiny_model_path}.json").read_text()) | {
        "recipe": {"batch_size": 32, "seed": 0}, "epochs": 1, "train_time_s": 1.0, "train_pass_s": 1.0,
        "train_images_per_s": 100.0, "sessions": 1, "train_images": 1000, "precision": "float32",
        "selection": "model.keras is the last epoch", "machine": {"cpu": "test", "cpu_flags": []}}
    (run / "model.keras.json").write_text(json.dumps(meta))
    dest = tmp_path / "zoo"
    path = pt.publish_pretrained(run, "tiny-test", dest, "resnet-deploy train --arch resnet8", data=small_npz_dir)
    monkeypatch.setattr(pt, "PACKAGE_DIR", tmp_path / "none")
    monkeypatch.setattr(pt, "CHECKOUT_DIR", tmp_path / "none")
    monkeypatch.setenv("RESNET_DEPLOY_PRETRAINED", str(dest))
    return path


def test_publish_writes_a_card_measured_independently(published, small_npz_dir):
    import keras

    from resnet_deploy.data import load_cifar10

    card = json.loads(published.with_name("tiny-test.card.json").read_text())
    assert card["sha256"] == _sha256(published) and card["command"].startswith("resnet-deploy train")
    test = load_cifar10(small_npz_dir).test
    model = keras.saving.load_model(published, compile=False)
    right = np.argmax(model(test.x.astype(np.float32), training=False), axis=1) == test.y
    assert card["test_accuracy"] == pytest.approx(right.mean()) and card["test_images"] == len(test)
    assert card["test_accuracy_first_500"] == pytest.approx(right[:500].mean())
    assert card["check_images"] == min(500, len(test))  # the synthetic test split holds 300
    assert [m.name for m in pt.list_pretrained()] == ["tiny-test"]
    assert pt.best_pretrained().path == published
    assert not list(published.parent.glob("*.tmp"))


def test_a_tampered_pretrained_file_is_refused(published):
    model = pt.list_pretrained()[0]
    pt.verify(model)
    data = bytearray(published.read_bytes())
    data[len(data) // 2] ^= 0xFF
    published.write_bytes(bytes(data))
    with pytest.raises(ModelError, match="does not match its card"):
        pt.verify(model)


def test_pipeline_without_any_pretrained_model_says_how_to_proceed(tmp_path, monkeypatch):
    from typer.testing import CliRunner

    from resnet_deploy.cli import app

    monkeypatch.setattr(pt, "PACKAGE_DIR", tmp_path / "none")
    monkeypatch.setattr(pt, "CHECKOUT_DIR", tmp_path / "none")
    monkeypatch.delenv("RESNET_DEPLOY_PRETRAINED", raising=False)
    result = CliRunner().invoke(app, ["pipeline", "--out", str(tmp_path / "o")], env={"COLUMNS": "200"})
    assert result.exit_code == 2 and "No pretrained model" in result.output and "--train" in result.output
    assert not (tmp_path / "o").exists()


@pytest.mark.slow
def test_the_wheel_carries_the_small_models(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("resnet_deploy-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for card in pt.PACKAGE_DIR.glob(f"*{pt.CARD_SUFFIX}"):
        stem = card.name[: -len(pt.CARD_SUFFIX)]
        for suffix in (".keras", ".keras.json", pt.CARD_SUFFIX, ".md"):
            assert f"resnet_deploy/pretrained/{stem}{suffix}" in names
