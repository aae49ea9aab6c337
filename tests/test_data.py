"""The CIFAR-10 data layer: sources, the restricted unpickler, validation, preprocessing, sampler."""

from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest

from resnet_deploy.data import (CIFAR10_MEAN, CIFAR10_STD, Preprocessing, calibration_sample,
                                class_balanced_indices, indices_hash, load_cifar10, preprocess)
from resnet_deploy.data.safe_pickle import safe_load_batch
from resnet_deploy.data.sources import Split, channel_stats
from resnet_deploy.errors import DataError, UnsafePickleError


# -- official-format fixtures ------------------------------------------------------------------
def _batch_bytes(n: int, seed: int, protocol: int = 2) -> tuple[bytes, np.ndarray, np.ndarray]:
    """A pickle shaped like an official batch: bytes keys, uint8 (n, 3072) CHW planes, list labels."""
    rng = np.random.default_rng(seed)
    x = rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    y = (np.arange(n) + seed) % 10
    d = {b"batch_label": b"testing batch", b"labels": [int(v) for v in y],
         b"data": x.transpose(0, 3, 1, 2).reshape(n, 3072), b"filenames": [b"img_%d.png" % i for i in range(n)]}
    return pickle.dumps(d, protocol=protocol), x, y


@pytest.fixture
def batches_dir(tmp_path) -> tuple[Path, np.ndarray, np.ndarray]:
    d = tmp_path / "cifar-10-batches-py"
    d.mkdir()
    xs, ys = [], []
    for i in range(1, 6):
        raw, x, y = _batch_bytes(20, i)
        (d / f"data_batch_{i}").write_bytes(raw)
        xs.append(x)
        ys.append(y)
    raw, xt, yt = _batch_bytes(20, 99)
    (d / "test_batch").write_bytes(raw)
    return d, np.concatenate(xs), np.concatenate(ys), xt, yt


def test_batches_folder_round_trips_pixels_and_labels(batches_dir):
    d, x, y, xt, yt = batches_dir
    for path in (d, d.parent):  # the folder itself, or its parent
        ds = load_cifar10(path)
        assert ds.kind == "batches"
        np.testing.assert_array_equal(ds.train.x, x)
        np.testing.assert_array_equal(ds.train.y, y)
        np.testing.assert_array_equal(ds.test.x, xt)
        assert ds.train.x.shape[1:] == (32, 32, 3) and ds.train.x.dtype == np.uint8


def test_tarball_is_read_in_memory(batches_dir, tmp_path):
    d, x, y, xt, yt = batches_dir
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    ds = load_cifar10(tar_path)
    assert ds.kind == "tarball"
    np.testing.assert_array_equal(ds.train.x, x)
    np.testing.assert_array_equal(ds.test.y, yt)
    ds_test = load_cifar10(tar_path, splits=("test",))
    assert ds_test.train is None and len(ds_test.test) == 20


def test_incomplete_official_layouts_are_reported_not_called_complete(batches_dir, tmp_path):
    """Every layout gets the completeness check, not only npz: these fixture batches hold 100 training
    and 20 test images, so both splits are reported short, class by class."""
    d, *_ = batches_dir
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    for path in (d, tar_path):
        notes = load_cifar10(path).notes
        assert any(n.startswith("train: 100 of 50,000 images (49900 missing: airplane 4990") for n in notes), notes
        assert any(n.startswith("test: 20 of 10,000 images (9980 missing") for n in notes), notes


def test_surplus_images_are_reported(tmp_path):
    rng = np.random.default_rng(0)
    y = np.concatenate([np.repeat(np.arange(10), 1000), [3, 3]]).astype(np.uint8)
    x = rng.integers(0, 256, (len(y), 32, 32, 3), dtype=np.uint8)
    np.savez(tmp_path / "test.npz", x=x, y=y)
    notes = load_cifar10(tmp_path, splits=("test",)).notes
    assert notes == ["test: more images per class than the official 1,000 (cat +2): duplicates, or another data set?"]


def test_keras3_cache_archive_is_found(batches_dir, tmp_path, monkeypatch):
    """keras.datasets.cifar10 (Keras 3) keeps the downloaded tarball as cifar-10-batches-py-target_archive."""
    d, x, *_ = batches_dir
    home = tmp_path / "kh"
    (home / "datasets").mkdir(parents=True)
    with tarfile.open(home / "datasets" / "cifar-10-batches-py-target_archive", "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    monkeypatch.delenv("RESNET_DEPLOY_DATA", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(home))
    ds = load_cifar10()
    assert ds.kind == "tarball" and ds.source.endswith("_archive")
    np.testing.assert_array_equal(ds.train.x, x)


def test_npz_folder_with_one_split_names_the_missing_file(tmp_path):
    np.savez(tmp_path / "test.npz", x=np.zeros((10, 32, 32, 3), np.uint8), y=np.arange(10, dtype=np.uint8))
    with pytest.raises(DataError, match=r"holds test.npz but not train.npz") as err:
        load_cifar10(tmp_path)
    assert "copy train.npz into" in str(err.value)
    assert len(load_cifar10(tmp_path, splits=("test",)).test) == 10


def test_data_option_wins_over_the_environment(batches_dir, tmp_path, monkeypatch):
    d, *_ = batches_dir
    monkeypatch.setenv("RESNET_DEPLOY_DATA", str(tmp_path / "elsewhere"))
    assert load_cifar10(d).source == str(d)


def test_hostile_pickle_inside_a_tarball_is_refused(batches_dir, tmp_path):
    d, *_ = batches_dir
    marker = tmp_path / "pwned"
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2))
    tar_path = tmp_path / "cifar-10-python.tar.gz"
    with tarfile.open(tar_path, "w:gz") as tar:
        tar.add(d, arcname="cifar-10-batches-py")
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        load_cifar10(tar_path)
    assert not marker.exists(), "the hostile pickle ran code"


def test_protocol_4_batches_load_too(tmp_path):
    raw, x, y = _batch_bytes(10, 3, protocol=4)
    assert safe_load_batch(raw, "p4")["data"].shape == (10, 3072)


class _Evil:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        import os

        return (os.system, (f"touch {self.marker}",))


def test_hostile_pickle_is_refused_and_runs_nothing(tmp_path, batches_dir):
    d, *_ = batches_dir
    marker = tmp_path / "pwned"
    (d / "test_batch").write_bytes(pickle.dumps({b"data": _Evil(marker), b"labels": [0]}, protocol=2))
    with pytest.raises(UnsafePickleError, match=r"posix\.system|os\.system"):
        load_cifar10(d)
    assert not marker.exists(), "the hostile pickle ran code"
    # the plain pickle module would have run it: the test can tell the difference
    pickle.loads(pickle.dumps(_Evil(marker)))
    assert marker.exists()


@pytest.mark.parametrize("payload", [
    pickle.dumps({b"data": np.zeros(3), b"f": eval}),  # a builtin
    pickle.dumps([1, 2, 3]),  # not a dict
    b"not a pickle at all",
    pickle.dumps({b"x": 1})[:-3],  # truncated
])
def test_non_batch_pickles_raise_data_errors(payload):
    with pytest.raises(DataError):
        safe_load_batch(payload, "crafted")


def test_npz_folder_validation_errors(tmp_path):
    def write(name, **arrays):
        np.savez(tmp_path / name, **arrays)

    x = np.zeros((20, 32, 32, 3), np.uint8)
    y = np.arange(20) % 10
    write("train.npz", x=x, y=y)
    write("test.npz", x=x.astype(np.float32), y=y)
    with pytest.raises(DataError, match="float32"):
        load_cifar10(tmp_path)
    write("test.npz", x=x[:, :16], y=y)
    with pytest.raises(DataError, match="shape"):
        load_cifar10(tmp_path)
    write("test.npz", x=x, y=y + 1)
    with pytest.raises(DataError, match="labels range"):
        load_cifar10(tmp_path)
    write("test.npz", x=x, y=y[:10])
    with pytest.raises(DataError, match="20 images but 10 labels"):
        load_cifar10(tmp_path)
    write("test.npz", x=x, y=np.zeros(20, int))
    with pytest.raises(DataError, match="no images of automobile"):
        load_cifar10(tmp_path)
    write("test.npz", images=x, labels=y)
    with pytest.raises(DataError, match="not x and y"):
        load_cifar10(tmp_path)
    (tmp_path / "test.npz").write_bytes(b"garbage")
    with pytest.raises(DataError, match="Could not read"):
        load_cifar10(tmp_path)


def test_missing_data_says_where_it_looked(tmp_path, monkeypatch):
    monkeypatch.delenv("RESNET_DEPLOY_DATA", raising=False)
    monkeypatch.setenv("KERAS_HOME", str(tmp_path / "keras_home"))
    monkeypatch.setenv("RESNET_DEPLOY_NO_DOWNLOAD", "1")
    with pytest.raises(DataError) as err:
        load_cifar10()
    msg = str(err.value)
    assert "keras_home" in msg and "--data" in msg and "RESNET_DEPLOY_DATA" in msg
    with pytest.raises(DataError, match="does not exist"):
        load_cifar10(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="No CIFAR-10 found"):
        load_cifar10(tmp_path / "empty")


def test_env_var_and_keras_cache_are_used(batches_dir, tmp_path, monkeypatch):
    d, x, *_ = batches_dir
    monkeypatch.setenv("RESNET_DEPLOY_DATA", str(d))
    assert load_cifar10().source == str(d)
    monkeypatch.delenv("RESNET_DEPLOY_DATA")
    home = tmp_path / "kh"
    (home / "datasets").mkdir(parents=True)
    d.rename(home / "datasets" / "cifar-10-batches-py")
    monkeypatch.setenv("KERAS_HOME", str(home))
    ds = load_cifar10()
    assert "kh" in ds.source
    np.testing.assert_array_equal(ds.train.x, x)


def read_counts(path: Path) -> dict[str, dict]:
    """Labels and stand-in counts per split, read from the files with plain numpy / pickle / tarfile (not
    through the loader under test): an npz folder (``x``/``y`` plus any ``jpeg_fill_y``), the official
    batches folder (or its parent) or the official tarball."""
    names = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
    if path.is_dir() and (path / "test.npz").exists():
        out = {}
        for s in names:
            with np.load(path / f"{s}.npz") as z:
                out[s] = {"y": z["y"].astype(np.int64), "stand_ins": len(z["jpeg_fill_y"]) if "jpeg_fill_y" in z.files else 0}
        return out
    if path.is_dir():
        folder = path if (path / "test_batch").exists() else path / "cifar-10-batches-py"
        raw = {n: (folder / n).read_bytes() for ns in names.values() for n in ns}
    else:
        with tarfile.open(path, "r:gz") as tar:
            raw = {Path(m.name).name: tar.extractfile(m).read() for m in tar.getmembers() if m.isfile()}
    return {s: {"y": np.concatenate([np.asarray(pickle.loads(raw[n], encoding="bytes")[b"labels"]) for n in ns]),
                "stand_ins": 0} for s, ns in names.items()}


def expected_notes(counts: dict[str, dict]) -> dict[str, list[str]]:
    """The start of the note the loader must write per split (an empty list: no note), from the counts
    read from the files and the official 5,000 / 1,000 images per class."""
    from resnet_deploy.data.constants import CLASS_NAMES, PER_CLASS

    out = {}
    for s, c in counts.items():
        per = np.bincount(c["y"], minlength=10)
        short = {CLASS_NAMES[i]: PER_CLASS[s] - int(v) for i, v in enumerate(per) if v < PER_CLASS[s]}
        notes = []
        if short:
            detail = ", ".join(f"{k} {v}" for k, v in short.items())
            notes.append(f"{s}: {len(c['y']):,} of {10 * PER_CLASS[s]:,} images ({sum(short.values())} missing: {detail})")
        if c["stand_ins"]:
            notes.append(f"{s}: {c['stand_ins']} lossy JPEG stand-ins")
        out[s] = notes
    return out


def _check_counts_and_notes(ds, counts) -> None:
    for s, c in counts.items():
        assert len(ds.split(s)) == len(c["y"]), s
        np.testing.assert_array_equal(ds.split(s).class_counts(), np.bincount(c["y"], minlength=10))
    want = [n for notes in expected_notes(counts).values() for n in notes]
    for n in want:
        assert any(note.startswith(n) for note in ds.notes), (n, ds.notes)
    assert len(ds.notes) == len(want), (want, ds.notes)  # nothing reported that the files do not show


def test_real_copy_loads_with_counts_and_notes_read_from_its_files(cifar, cifar_dir):
    """The shared copy (49,923 / 9,980 exact images and 97 stand-ins kept apart) and the official set
    (50,000 / 10,000, no notes) alike: every figure is read from the files, none written here."""
    counts = read_counts(cifar_dir)
    _check_counts_and_notes(cifar, counts)
    readme = cifar_dir / "README.md" if cifar_dir.is_dir() else None
    if readme is not None and readme.exists():  # the copy's own description agrees with its files
        import re

        for s, c in counts.items():
            m = re.search(rf"`{s}\.npz` \| ([\d,]+) of [\d,]+ \| (\d+)", readme.read_text())
            if m:
                assert (int(m[1].replace(",", "")), int(m[2])) == (len(c["y"]), c["stand_ins"]), s
    mean, std = channel_stats(cifar.train.x[:5000])
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=2.0)
    np.testing.assert_allclose(std, CIFAR10_STD, atol=1.5)


def test_synthetic_batches_load_as_made_with_counts_from_the_data(synthetic_cifar_dir, synthetic_arrays, small_npz_dir):
    """The fast tier's data set: the official-batches reader and the npz reader give back the images and
    labels as they were made, and the notes count what is missing from the labels."""
    for path in (synthetic_cifar_dir, small_npz_dir):
        ds = load_cifar10(path)
        for s, (x, y) in synthetic_arrays.items():
            np.testing.assert_array_equal(ds.split(s).x, x)
            np.testing.assert_array_equal(ds.split(s).y, y)
        _check_counts_and_notes(ds, read_counts(path))
    assert any("49000 missing" in n for n in ds.notes)  # 1,000 of 50,000: the helpers above can fail


def test_full_channel_stats_match_the_constants(cifar):
    mean, std = channel_stats(cifar.train.x)
    np.testing.assert_allclose(mean, CIFAR10_MEAN, atol=0.05)
    np.testing.assert_allclose(std, CIFAR10_STD, atol=0.05)


# -- preprocessing ------------------------------------------------------------------------------
def test_preprocess_conventions():
    px = np.array([[[[0, 128, 255]]]], np.uint8)
    np.testing.assert_array_equal(preprocess(px), px.astype(np.float32))
    np.testing.assert_allclose(preprocess(px, Preprocessing.unit_range()), px / 255.0, rtol=1e-6)
    std = preprocess(px, Preprocessing.standardized())
    np.testing.assert_allclose(std[0, 0, 0], (np.array([0, 128, 255]) - CIFAR10_MEAN) / CIFAR10_STD, rtol=1e-5)
    spec = Preprocessing.standardized()
    assert Preprocessing.from_dict(spec.to_dict()) == spec
    assert Preprocessing.from_dict(None) == Preprocessing.pixels()


NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize("kwargs", [
    dict(scale=0), dict(mean=(1, 2, 3)), dict(mean=(1, 2), std=(1, 2)), dict(mean=(0, 0, 0), std=(1, 0, 1)),
    # issue 22: non-finite and implausible numbers passed (min(std) <= 0 is False for NaN), and every image
    # then got the same answer
    dict(mean=(0, 0, 0), std=(NAN, 1, 1)), dict(scale=INF), dict(scale=NAN), dict(mean=(0, 0, 0), std=(1e-300, 1, 1)),
    dict(mean=(INF, 0, 0), std=(1, 1, 1)), dict(mean=(NAN, 0, 0), std=(1, 1, 1)), dict(scale=1e-9),
    dict(scale=1.0, mean=(0, 0, 0), std=(-1, 1, 1)), dict(scale="1"), dict(scale=True), dict(color="BGR"),
    dict(mean="abc", std=(1, 1, 1))])
def test_bad_preprocessing_is_refused(kwargs):
    from resnet_deploy.data.preprocess import PreprocessingError

    with pytest.raises(PreprocessingError) as exc:
        Preprocessing(**kwargs)
    assert exc.value.what and (exc.value.expected or exc.value.fix)


@pytest.mark.parametrize("doc", [[1, 2, 3], "scale", 5, {"scale": "Infinity"}, {"layout": 3},
                                 {"scale": 1.0, "mean": [0, 0, 0], "std": [NAN, 1, 1]}])
def test_malformed_recorded_preprocessing_is_refused(doc):
    from resnet_deploy.data.preprocess import PreprocessingError

    with pytest.raises(PreprocessingError):
        Preprocessing.from_dict(doc)


def test_plausible_preprocessing_specs_are_kept():
    """What export writes for 0..255, 0..1 and standardised inputs, and a -1..1 model, pass unchanged."""
    for spec in (Preprocessing.pixels(), Preprocessing.unit_range(), Preprocessing.standardized(),
                 Preprocessing(scale=2 / 255, mean=(1.0, 1.0, 1.0), std=(1.0, 1.0, 1.0))):
        assert Preprocessing.from_dict(spec.to_dict()) == spec


# -- sampler --------------------------------------------------------------------------------------
def test_sampler_is_class_balanced_seeded_and_without_replacement():
    y = np.repeat(np.arange(10), 50)
    a = class_balanced_indices(y, 105, seed=3)
    assert len(a) == len(np.unique(a)) == 105
    counts = np.bincount(y[a], minlength=10)
    assert counts.max() - counts.min() <= 1 and counts.sum() == 105
    np.testing.assert_array_equal(a, class_balanced_indices(y, 105, seed=3))
    assert not np.array_equal(a, class_balanced_indices(y, 105, seed=4))
    assert indices_hash(a) == indices_hash(a.copy()) != indices_hash(class_balanced_indices(y, 105, seed=4))


def test_sampler_errors():
    y = np.repeat(np.arange(10), 5)
    with pytest.raises(DataError):
        class_balanced_indices(y, 0)
    with pytest.raises(DataError):
        class_balanced_indices(y, 51)
    with pytest.raises(DataError, match="only 5 images"):
        class_balanced_indices(np.concatenate([y, np.zeros(40, int)]), 80)


def test_calibration_comes_from_the_training_split(synthetic_cifar):
    cal = calibration_sample(synthetic_cifar.train, 200, seed=0)
    assert cal.x.shape == (200, 32, 32, 3) and cal.recipe["split"] == "train"
    assert cal.recipe["per_class"] == [20] * 10
    assert np.bincount(synthetic_cifar.train.y[cal.indices], minlength=10).tolist() == [20] * 10
    np.testing.assert_array_equal(cal.x, synthetic_cifar.train.x[cal.indices])
    with pytest.raises(DataError, match="training split"):
        calibration_sample(synthetic_cifar.test, 10)


def test_split_take():
    s = Split("test", np.zeros((5, 32, 32, 3), np.uint8), np.arange(5))
    assert len(s.take(3)) == 3 and s.take(None) is s and s.take(10) is s
    with pytest.raises(DataError):
        s.take(0)


def test_a_loaded_dataset_passes_through(batches_dir):
    d, *_ = batches_dir
    test_only = load_cifar10(d, splits=("test",))
    assert load_cifar10(test_only, splits=("test",)) is test_only
    with pytest.raises(DataError, match="train split was not loaded"):
        load_cifar10(test_only)


def _npz_declaring(path: Path, shape: tuple) -> None:
    """An .npz whose x.npy header declares ``shape`` while the file holds only a few bytes of data."""
    import zipfile

    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(header, {"descr": "|u1", "fortran_order": False, "shape": shape})
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("x.npy", header.getvalue() + b"\0" * 1024)
        y = io.BytesIO()
        np.save(y, np.arange(10, dtype=np.uint8))
        zf.writestr("y.npy", y.getvalue())


@pytest.mark.parametrize("shape,match", [((2_100_000, 32, 32, 3), "GB"), ((10, 28, 28, 1), "(10, 28, 28, 1)")])
def test_npz_headers_are_checked_before_any_array_is_read(tmp_path, shape, match):
    """A small file declaring a 6 GB array (or images of the wrong shape) is refused from its header:
    peak memory stays far below what the array would need."""
    import resource

    from resnet_deploy.data import load_cifar10

    for split in ("train", "test"):
        _npz_declaring(tmp_path / f"{split}.npz", shape)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    with pytest.raises(DataError, match=r"refused before reading") as exc:
        load_cifar10(tmp_path)
    assert match in exc.value.what and "np.savez" in exc.value.fix
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # < 200 MB grown
