"""Image folders (resnet_deploy.data.folder): discovery, errors, decoding, streaming, the PNG round trip.

Fast tier: every folder is generated in tmp_path (a few hundred small images at most).
"""

from __future__ import annotations

import importlib.util
import os
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from resnet_deploy.data.folder import (
    ClassMismatchError, CorruptImageError, Decoding, EmptyClassError, FolderLayoutError, FolderStream,
    ImageFileError, ImageTooLargeError, NotAnImageError, NotRegularFileError, decode_image, fit_any,
    looks_like_image_folder, open_image_folder, write_image_folder,
)
from resnet_deploy.data.sampler import class_balanced_indices
from resnet_deploy.errors import DataError, OutputExistsError
from resnet_deploy.predict import images

REPO = Path(__file__).resolve().parents[1]
CLASSES = tuple("abcdefghij")


def _save(path: Path, arr: np.ndarray, fmt: str = "PNG", **kw) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path, format=fmt, **kw)
    return path


def _noise(rng, h, w, c=3) -> np.ndarray:
    return rng.integers(0, 256, (h, w, c) if c else (h, w), dtype=np.uint8)


def _simple_folder(root: Path, splits=("train", "test"), classes=("cat", "dog"), per_class=3, size=(20, 24)):
    rng = np.random.default_rng(0)
    for s in splits:
        for c in classes:
            for i in range(per_class):
                _save(root / s / c / f"{i}.png", _noise(rng, *size))
    return root


def _cifar_like(n: int, seed: int = 0):
    """CIFAR-shaped uint8 images and labels, every class present, classes interleaved as in CIFAR."""
    rng = np.random.default_rng(seed)
    y = rng.permutation(np.arange(n) % 10).astype(np.int64)
    return rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), y


def _within(seconds: float, fn, fifos=()):
    """fn() in a thread; fail (and unblock any reader stuck on ``fifos``) when it has not returned in time."""
    box = {}

    def run():
        try:
            box["value"] = fn()
        except BaseException as exc:  # noqa: BLE001 - handed back to the test
            box["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    if t.is_alive():
        for f in fifos:  # a reader blocked in open() returns once a writer appears
            try:
                os.close(os.open(f, os.O_WRONLY | os.O_NONBLOCK))
            except OSError:
                pass
        pytest.fail(f"no answer within {seconds} s: something waited on a FIFO")
    if "error" in box:
        raise box["error"]
    return box.get("value")


def _all(stream: FolderStream):
    batches = list(stream)
    x = np.concatenate([b.x for b in batches])
    return x, np.concatenate([b.y for b in batches]), np.concatenate([b.indices for b in batches])


# ----------------------------------------------------------------------------------------------
# Layout errors
# ----------------------------------------------------------------------------------------------
def test_folder_without_split_subfolders_says_what_layout_is_expected(tmp_path):
    _simple_folder(tmp_path / "x", splits=("",))  # x/cat/*.png, x/dog/*.png: classes without a split
    with pytest.raises(FolderLayoutError) as e:
        open_image_folder(tmp_path / "x")
    msg = str(e.value)
    assert "no train/, val/ or test/ folder" in msg and "look like class folders" in msg
    assert "DIR/train/<class>" in e.value.expected and "image_dataset_from_directory" in e.value.expected
    assert "train" in e.value.fix and "move the class folders" in e.value.fix
    assert not looks_like_image_folder(tmp_path / "x")

    _simple_folder(tmp_path / "y", splits=("Training", "validation"))
    with pytest.raises(FolderLayoutError) as e:
        open_image_folder(tmp_path / "y")
    assert "rename Training/ to train/" in e.value.fix and "validation/ to val/" in e.value.fix

    flat = tmp_path / "flat"
    _save(flat / "a.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FolderLayoutError, match="image files directly"):
        open_image_folder(flat)
    with pytest.raises(FolderLayoutError, match="does not exist"):
        open_image_folder(tmp_path / "missing")
    with pytest.raises(FolderLayoutError, match="regular file, not a folder"):
        open_image_folder(flat / "a.png")
    for cls in (NotAnImageError, CorruptImageError, ImageTooLargeError, NotRegularFileError):
        assert issubclass(cls, ImageFileError) and issubclass(cls, DataError)
    for cls in (FolderLayoutError, EmptyClassError, ClassMismatchError):
        assert issubclass(cls, DataError)


def test_split_without_class_folders_and_missing_split(tmp_path):
    _simple_folder(tmp_path, splits=("train",))
    _save(tmp_path / "test" / "loose.png", np.zeros((8, 8, 3), np.uint8))
    with pytest.raises(FolderLayoutError, match="test has no class folders; it holds 1 image file"):
        open_image_folder(tmp_path)
    (tmp_path / "test" / "loose.png").unlink()
    (tmp_path / "test").rmdir()
    folder = open_image_folder(tmp_path)
    assert folder.present == ("train",)
    with pytest.raises(FolderLayoutError, match="no test/ folder"):
        folder.split("test")
    with pytest.raises(FolderLayoutError, match="no val/ folder"):
        open_image_folder(tmp_path, splits=("val",))


def test_empty_class_folder_is_named(tmp_path):
    _simple_folder(tmp_path)
    (tmp_path / "test" / "eel").mkdir()
    (tmp_path / "train" / "eel").mkdir()
    _save(tmp_path / "train" / "eel" / "0.png", np.zeros((8, 8, 3), np.uint8))
    (tmp_path / "test" / "eel" / "notes.txt").write_text("not an image")
    with pytest.raises(EmptyClassError) as e:
        open_image_folder(tmp_path)
    assert "test/eel holds no image file (it has 1 other file(s): 1 no image suffix)" in str(e.value)
    assert "remove the eel folder from every split" in e.value.fix


def test_classes_that_differ_between_train_and_test(tmp_path):
    _simple_folder(tmp_path / "d", splits=("train",), classes=("cat", "dog", "eel"))
    _simple_folder(tmp_path / "d", splits=("test",), classes=("ant", "cat", "dog"))
    for splits in (None, ("test",)):  # compared even when only one split is listed
        with pytest.raises(ClassMismatchError) as e:
            open_image_folder(tmp_path / "d", splits=splits)
        assert "only in train/: eel" in str(e.value) and "only in test/: ant" in str(e.value)


# ----------------------------------------------------------------------------------------------
# Files that are not images
# ----------------------------------------------------------------------------------------------
def test_non_image_by_suffix_is_skipped_and_counted_or_refused(tmp_path):
    _simple_folder(tmp_path)
    (tmp_path / "train" / "cat" / "labels.csv").write_text("a,b\n")
    (tmp_path / "train" / ".DS_Store").write_bytes(b"\0")  # hidden: ignored, not even counted
    (tmp_path / "train" / "README.txt").write_text("loose")
    folder = open_image_folder(tmp_path)
    tr = folder.split("train")
    assert len(tr) == 6 and tr.class_names == ("cat", "dog")
    kinds = sorted((s.path, s.kind) for s in tr.skipped)
    assert kinds == [("train/README.txt", "outside a class folder"), ("train/cat/labels.csv", "no image suffix")]
    with pytest.raises((NotAnImageError, FolderLayoutError)) as e:
        open_image_folder(tmp_path, strict=True)
    assert "strict mode refuses" in str(e.value) and "2 file(s)" in str(e.value)
    (tmp_path / "train" / "README.txt").unlink()
    with pytest.raises(NotAnImageError) as e:
        open_image_folder(tmp_path, strict=True)
    assert e.value.path == "train/cat/labels.csv"


def test_non_image_by_content_and_corrupt_jpeg_skipped_with_count_or_refused(tmp_path):
    rng = np.random.default_rng(1)
    _simple_folder(tmp_path)
    (tmp_path / "test" / "cat" / "1b_fake.png").write_bytes(b"this is text, not a PNG\n" * 10)
    good = _save(tmp_path / "x.jpg", _noise(rng, 64, 64), "JPEG", quality=90).read_bytes()
    (tmp_path / "test" / "dog" / "1c_broken.jpg").write_bytes(good[: len(good) // 2])  # truncated
    (tmp_path / "x.jpg").unlink()
    te = open_image_folder(tmp_path).split("test")
    assert len(te) == 8 and not te.skipped  # listing opens nothing: both look like images by name
    stream = te.stream(batch_size=3, workers=2)
    x, y, idx = _all(stream)
    assert len(x) == 6 and x.shape[1:] == (32, 32, 3)
    bad = {s.path: s.kind for s in stream.report.skipped}
    assert bad == {"test/cat/1b_fake.png": "not an image", "test/dog/1c_broken.jpg": "corrupt"}
    left_out = [te.files[i] for i in range(len(te)) if i not in set(idx.tolist())]
    assert left_out == ["cat/1b_fake.png", "dog/1c_broken.jpg"]
    np.testing.assert_array_equal(y, te.y[idx])
    notes = " ".join(stream.report.notes())
    assert "skipped 2 file(s)" in notes and "1 corrupt" in notes and "1 not an image" in notes
    with pytest.raises(NotAnImageError) as e:  # the first bad file in order: 1b_fake.png precedes 1c_broken.jpg
        list(te.stream(batch_size=3, strict=True))
    assert "1b_fake.png" in str(e.value) and "by its content" in str(e.value)
    with pytest.raises(CorruptImageError) as e:
        te.stream(strict=True).take([te.files.index("dog/1c_broken.jpg")])
    assert e.value.path == "test/dog/1c_broken.jpg" and "1c_broken.jpg is damaged" in str(e.value)
    assert "truncated" in str(e.value)


def test_every_file_undecodable_is_an_error(tmp_path):
    for c in ("cat", "dog"):
        (tmp_path / "test" / c).mkdir(parents=True)
        (tmp_path / "test" / c / "0.png").write_bytes(b"nope")
    te = open_image_folder(tmp_path).split("test")
    with pytest.raises(DataError, match="No image of the 2 asked for"):
        list(te.stream())


def test_image_over_the_pixel_budget_is_refused_before_decoding(tmp_path):
    _simple_folder(tmp_path, splits=("test",), size=(8, 8))
    _save(tmp_path / "test" / "cat" / "big.png", np.zeros((200, 200, 3), np.uint8))
    te = open_image_folder(tmp_path).split("test")
    budget = images.pixel_budget(100_000)  # 6,250 pixels: 200x200 is over it
    stream = te.stream(max_memory=100_000)
    x, _, _ = _all(stream)
    assert len(x) == 6 and [s.kind for s in stream.report.skipped] == ["too large"]
    with pytest.raises(ImageTooLargeError, match=f"over the budget of {budget:,} pixels"):
        list(te.stream(max_memory=100_000, strict=True))


def test_fifo_named_like_an_image_is_never_opened(tmp_path):
    _simple_folder(tmp_path)
    fifo = tmp_path / "train" / "cat" / "x.png"
    os.mkfifo(fifo)
    folder = _within(30, lambda: open_image_folder(tmp_path), [fifo])
    tr = folder.split("train")
    assert [(s.path, s.kind) for s in tr.skipped] == [("train/cat/x.png", "not regular")]
    assert "FIFO" in tr.skipped[0].reason and "cat/x.png" not in tr.files
    assert len(_within(30, lambda: _all(tr.stream(workers=2))[0], [fifo])) == 6
    assert len(_within(30, tr.fingerprint, [fifo])) == 64
    with pytest.raises(NotRegularFileError) as e:
        _within(30, lambda: open_image_folder(tmp_path, strict=True), [fifo])
    assert e.value.path == "train/cat/x.png"

    # a file listed as regular and swapped for a FIFO before it is read: refused at open, no wait
    victim = tmp_path / "train" / "dog" / "1.png"
    victim.unlink()
    os.mkfifo(victim)
    stream = tr.stream(workers=2)
    x, _, _ = _within(30, lambda: _all(stream), [fifo, victim])
    assert len(x) == 5 and [(s.path, s.kind) for s in stream.report.skipped] == [("train/dog/1.png", "not regular")]
    with pytest.raises(NotRegularFileError):
        _within(30, tr.fingerprint, [fifo, victim])


def test_hidden_entries_and_a_link_loop(tmp_path):
    _simple_folder(tmp_path)
    (tmp_path / "train" / ".ipynb_checkpoints").mkdir()  # a hidden folder is not a class
    _save(tmp_path / "train" / "cat" / "._0.png", np.zeros((4, 4, 3), np.uint8))  # AppleDouble: hidden
    os.symlink(".", tmp_path / "train" / "cat" / "loop")  # cat/loop -> cat
    _save(tmp_path / "train" / "cat" / "sub" / "deep.png", np.zeros((4, 4, 3), np.uint8))
    tr = _within(30, lambda: open_image_folder(tmp_path).split("train"))
    assert tr.class_names == ("cat", "dog")
    assert sorted(f for f in tr.files if f.startswith("cat/")) == ["cat/0.png", "cat/1.png", "cat/2.png",
                                                                    "cat/sub/deep.png"]


# ----------------------------------------------------------------------------------------------
# Decoding: mixed sizes, formats and colour modes; the resize policy
# ----------------------------------------------------------------------------------------------
def _mixed_folder(root: Path) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(2)
    files = {}
    rgba = _noise(rng, 64, 48, 4)
    rgba[:, :, 3] = np.where(np.arange(48) < 24, 0, 255)[None, :]  # left half transparent
    pal = Image.fromarray(_noise(rng, 30, 30)).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    specs = {
        "train/cat/a_rgb.png": (_noise(rng, 40, 30), "PNG"),
        "train/cat/b_photo.jpg": (_noise(rng, 60, 100), "JPEG"),
        "train/cat/c_gray.png": (_noise(rng, 50, 20, 0), "PNG"),
        "train/dog/a_rgba.png": (rgba, "PNG"),
        "train/dog/b_gray.jpg": (_noise(rng, 33, 70, 0), "JPEG"),
        "train/dog/c_small.png": (_noise(rng, 12, 9), "PNG"),
        "train/dog/d_exact.png": (_noise(rng, 32, 32), "PNG"),
    }
    for rel, (arr, fmt) in specs.items():
        _save(root / rel, arr, fmt)
        files[rel] = arr
    pal.save(root / "train/dog/e_palette.png")
    gray16 = (rng.integers(0, 65536, (24, 40))).astype(np.uint16)
    Image.fromarray(gray16).save(root / "train/cat/d_gray16.png")
    return files


def test_mixed_sizes_formats_and_modes_match_predicts_decoder_and_are_counted(tmp_path):
    _mixed_folder(tmp_path)
    tr = open_image_folder(tmp_path).split("train")
    assert len(tr) == 9
    for fit in images.FITS:
        stream = tr.stream(Decoding(32, fit), batch_size=4, workers=3)
        x, y, idx = _all(stream)
        np.testing.assert_array_equal(idx, np.arange(9))
        for i in range(len(tr)):  # at 32x32 the folder decodes exactly as predict does
            np.testing.assert_array_equal(x[i], images.load_image(tr.path(i), fit), err_msg=tr.files[i])
        conv = stream.report.conversions
        assert conv["L"] == 2 and conv["RGBA"] == 1 and conv["P"] == 1 and sum(conv.values()) == 5
        assert conv.get("I;16", 0) + conv.get("I", 0) == 1
        note = stream.report.notes()[0]
        assert note.startswith("converted to RGB: 3 grayscale, 1 with transparency (composited onto white)")
    for size in ((48, 64), (64, 48), 17):
        for fit in images.FITS:
            x, _, _ = _all(tr.stream(Decoding(size, fit), batch_size=5))
            hw = (size, size) if isinstance(size, int) else size
            assert x.shape == (9, *hw, 3) and x.dtype == np.uint8


def test_the_any_size_geometry_at_32_is_fit_image(tmp_path):
    """fit_any (every size but 32x32) and predict's fit_image (32x32) must be one policy."""
    _mixed_folder(tmp_path)
    tr = open_image_folder(tmp_path).split("train")
    for i in range(len(tr)):
        for fit in images.FITS:
            with Image.open(tr.path(i)) as img:
                img.load()
                np.testing.assert_array_equal(fit_any(img, (32, 32), fit), images.fit_image(img, fit))


def test_resize_policy_crop_keeps_the_centre_stretch_keeps_everything(tmp_path):
    bands = np.zeros((100, 300, 3), np.uint8)
    bands[:, :100, 0] = 255  # red | green | blue thirds
    bands[:, 100:200, 1] = 255
    bands[:, 200:, 2] = 255
    p = _save(tmp_path / "bands.png", bands)
    crop, mode = decode_image(p, Decoding(40, "crop"))
    assert mode == "RGB" and (crop[:, :, 1] == 255).all() and (crop[:, :, [0, 2]] == 0).all()
    stretch, _ = decode_image(p, Decoding(40, "stretch"))
    assert tuple(stretch[20, 2]) == (255, 0, 0) and tuple(stretch[20, 20]) == (0, 255, 0)
    assert tuple(stretch[20, 37]) == (0, 0, 255)
    wide_crop, _ = decode_image(p, Decoding((20, 60), "crop"))  # same 3:1 aspect: nothing cropped
    np.testing.assert_array_equal(wide_crop, decode_image(p, Decoding((20, 60), "stretch"))[0])
    gray = _save(tmp_path / "g.png", np.full((10, 30), 77, np.uint8))
    assert (decode_image(gray, Decoding((24, 24)))[0] == 77).all()
    clear = np.zeros((16, 16, 4), np.uint8)  # fully transparent: white
    assert (decode_image(_save(tmp_path / "t.png", clear), Decoding(50))[0] == 255).all()
    rec = Decoding(224, "crop").record()
    assert rec["size"] == [224, 224] and rec["fit"] == "crop" and "centred square crop" in rec["method"]
    assert Decoding().record()["method"] == images.RESIZE_METHOD["crop"]
    with pytest.raises(DataError, match="a plain resize is called stretch"):
        Decoding(32, "resize")
    for bad in (0, (32,), "32", (32.0, 32), True, 10**6):
        with pytest.raises(DataError):
            Decoding(bad)


# ----------------------------------------------------------------------------------------------
# Order, the CIFAR round trip, the sampler, the fingerprint
# ----------------------------------------------------------------------------------------------
def test_order_is_by_name_inside_the_class_folder_then_class(tmp_path):
    rng = np.random.default_rng(3)
    for rel in ("train/cat/b.png", "train/dog/a.png", "train/dog/b.png", "train/cat/c.png", "train/cat/a.png"):
        _save(tmp_path / rel, _noise(rng, 4, 4))
    tr = open_image_folder(tmp_path).split("train")
    assert tr.files == ("cat/a.png", "dog/a.png", "cat/b.png", "dog/b.png", "cat/c.png")
    assert tr.y.tolist() == [0, 1, 0, 1, 0] and tr.class_counts().tolist() == [3, 2]


def test_cifar_png_round_trip_is_byte_identical_and_the_sampler_draws_the_same_images(tmp_path):
    x_tr, y_tr = _cifar_like(120, seed=4)
    x_te, y_te = _cifar_like(50, seed=5)
    out = write_image_folder(tmp_path / "cifar_png", {"train": (x_tr, y_tr), "test": (x_te, y_te)}, workers=2)
    assert looks_like_image_folder(out)
    folder = open_image_folder(out)
    assert folder.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                                  "ship", "truck")
    assert sorted(os.listdir(out / "test" / "cat"))[0].endswith(".png")
    for name, (x, y) in (("train", (x_tr, y_tr)), ("test", (x_te, y_te))):
        split = folder.split(name)
        np.testing.assert_array_equal(split.y, y)  # the folder's order is the array's order
        got_x, got_y, idx = _all(split.stream(batch_size=7, workers=2))
        np.testing.assert_array_equal(idx, np.arange(len(x)))
        assert got_x.dtype == np.uint8 and got_x.tobytes() == x.tobytes()
        np.testing.assert_array_equal(got_y, y)
    tr = folder.split("train")
    for n, seed in ((30, 0), (17, 3)):
        idx_npz = class_balanced_indices(y_tr, n, seed)
        idx_folder = class_balanced_indices(tr.y, n, seed)
        np.testing.assert_array_equal(idx_folder, idx_npz)
        sample = tr.stream(workers=2).take(idx_folder)
        assert sample.x.tobytes() == x_tr[idx_npz].tobytes()
        np.testing.assert_array_equal(sample.y, y_tr[idx_npz])
    val = class_balanced_indices(y_tr, 20, 1)  # a validation split drawn first, calibration disjoint from it
    np.testing.assert_array_equal(class_balanced_indices(tr.y, 30, 0, exclude=val),
                                  class_balanced_indices(y_tr, 30, 0, exclude=val))
    # a streamed subset comes back in the order asked for
    sub = np.array([5, 3, 99, 3])
    got = list(tr.stream(batch_size=3, indices=sub))
    assert np.concatenate([b.x for b in got]).tobytes() == x_tr[sub].tobytes()


def test_fingerprint_follows_content_not_timestamps(tmp_path):
    x, y = _cifar_like(30, seed=6)
    out = write_image_folder(tmp_path / "f", {"test": (x, y)})
    te = open_image_folder(out).split("test")
    fp = te.fingerprint(workers=2)
    assert fp == te.fingerprint(workers=1) and len(fp) == 64
    f = te.path(7)
    os.utime(f, (0, 0))  # a new timestamp, same bytes: same fingerprint
    assert open_image_folder(out).split("test").fingerprint() == fp
    stat = f.stat()
    x2 = x[7].copy()
    x2[0, 0, 0] ^= 1
    Image.fromarray(x2).save(f)
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))  # one pixel changed under the same mtime
    changed = open_image_folder(out).split("test")
    assert changed.fingerprint() != fp
    Image.fromarray(x[7]).save(f)
    assert open_image_folder(out).split("test").fingerprint() == fp
    f.rename(f.with_name("zz_" + f.name))  # same bytes under another name
    assert open_image_folder(out).split("test").fingerprint() != fp
    # a file that grows after listing is said to have changed
    listed = open_image_folder(out).split("test")
    with open(listed.path(0), "ab") as fh:
        fh.write(b"\0")
    with pytest.raises(DataError, match="changed while the folder was read"):
        listed.fingerprint()


def test_writer_refusals(tmp_path):
    x, y = _cifar_like(20)
    with pytest.raises(DataError, match="not in sorted order"):
        write_image_folder(tmp_path / "a", {"test": (x, y)}, class_names=tuple(reversed(CLASSES)))
    with pytest.raises(DataError, match="has no image of class"):
        write_image_folder(tmp_path / "a", {"test": (x[:5], y[:5])})
    with pytest.raises(DataError, match="dtype"):
        write_image_folder(tmp_path / "a", {"test": (x.astype(np.float32), y)})
    with pytest.raises(DataError, match="labels range"):
        write_image_folder(tmp_path / "a", {"test": (x, y + 1)})
    with pytest.raises(DataError, match="cannot be a folder name"):
        write_image_folder(tmp_path / "a", {"test": (x, y)}, class_names=(".hidden",) + CLASSES[1:])
    with pytest.raises(DataError, match="split named"):
        write_image_folder(tmp_path / "a", {"validation": (x, y)})
    assert not (tmp_path / "a").exists()
    out = write_image_folder(tmp_path / "a", {"test": (x, y)}, class_names=CLASSES)
    with pytest.raises(OutputExistsError):
        write_image_folder(out, {"test": (x, y)}, class_names=CLASSES)
    out = write_image_folder(out, {"train": (x, y)}, class_names=CLASSES, image_format="jpeg", size=40, force=True)
    assert sorted(os.listdir(out)) == ["train"]  # replaced whole
    assert sorted(os.listdir(tmp_path)) == ["a"]  # no stage left beside it
    with Image.open(next((out / "train" / "a").iterdir())) as im:
        assert im.format == "JPEG" and im.size == (40, 40)


# ----------------------------------------------------------------------------------------------
# Streaming: lazy, bounded, cancellable
# ----------------------------------------------------------------------------------------------
def test_streaming_is_lazy_and_bounded_by_batch_and_prefetch(tmp_path):
    rng = np.random.default_rng(7)
    n, side, bs, prefetch = 300, 96, 8, 2
    x = rng.integers(0, 256, (n, side, side, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    out = write_image_folder(tmp_path / "big", {"train": (x, y)}, workers=2)
    tr = open_image_folder(out).split("train")

    # lazy: a file damaged after the first batch was handed out is found damaged, so it had not been read
    stream = tr.stream(Decoding(side), batch_size=bs, prefetch=prefetch, workers=2)
    it = iter(stream)
    first = next(it)
    assert first.x.tobytes() == x[:bs].tobytes()
    late = (prefetch + 2) * bs + 3
    tr.path(late).write_bytes(b"damaged")
    rest = list(it)
    assert [s.path for s in stream.report.skipped] == [tr.shown(late)]
    assert sum(len(b) for b in rest) == n - bs - 1
    assert stream.report.peak_held <= prefetch * bs

    # bounded: traced memory (numpy's buffers are traced, in every thread) of a whole pass stays near a few
    # batches, far below the split, with a consumer slower than the decoders (a pause on the first batch lets
    # them run as far ahead as they may; an unbounded prefetch reached half the split here)
    batch_bytes = bs * side * side * 3
    split_bytes = n * side * side * 3
    stream = tr.stream(Decoding(side), batch_size=bs, prefetch=prefetch, workers=2)
    tracemalloc.start()
    try:
        tracemalloc.reset_peak()
        seen = 0
        for batch in stream:
            time.sleep(1.0 if not seen else 0.01)
            seen += len(batch)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert seen == n - 1
    bound = (prefetch + 4) * batch_bytes + (512 << 10)
    assert split_bytes > 3 * bound  # the check can tell bounded from holding the split
    assert peak < bound, f"peak {peak:,} bytes, bound {bound:,}, split {split_bytes:,}"


def test_breaking_out_stops_the_decoders(tmp_path):
    x, y = _cifar_like(200, seed=8)
    out = write_image_folder(tmp_path / "b", {"test": (x, y)})
    te = open_image_folder(out).split("test")
    before = {t for t in threading.enumerate() if t.name.startswith("image-folder")}
    assert not before
    for batch in te.stream(batch_size=4, workers=3):
        break
    deadline = time.monotonic() + 10
    while any(t.name.startswith("image-folder") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not [t for t in threading.enumerate() if t.name.startswith("image-folder")]
    with pytest.raises(DataError, match="integers 0..199"):
        te.stream().take([200])
    with pytest.raises(DataError, match="batch_size"):
        te.stream(batch_size=0)
    assert len(te.stream().take([])) == 0


# ----------------------------------------------------------------------------------------------
# benchmarks/make_image_folder.py
# ----------------------------------------------------------------------------------------------
def _script():
    spec = importlib.util.spec_from_file_location("make_image_folder", REPO / "benchmarks" / "make_image_folder.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_make_image_folder_script(tmp_path, synthetic_npz_dir, capsys):
    from resnet_deploy.data import load_cifar10

    src = load_cifar10(synthetic_npz_dir)
    script = _script()
    assert script.main([str(tmp_path / "png"), "--data", str(synthetic_npz_dir), "--limit", "40"]) == 0
    folder = open_image_folder(tmp_path / "png")
    for name in ("train", "test"):
        got, gy, _ = _all(folder.split(name).stream())
        assert got.tobytes() == src.split(name).x[:40].tobytes()
        np.testing.assert_array_equal(gy, src.split(name).y[:40])
    assert script.main([str(tmp_path / "jpg"), "--data", str(synthetic_npz_dir), "--limit", "30", "--format",
                        "jpeg", "--size", "56", "--splits", "test"]) == 0
    te = open_image_folder(tmp_path / "jpg").split("test")
    got, _, _ = _all(te.stream(Decoding(56)))
    assert got.shape == (30, 56, 56, 3)
    printed = capsys.readouterr().out
    assert "test: 30 images" in printed and "jpeg" in printed
    assert script.main([str(tmp_path / "jpg"), "--data", str(synthetic_npz_dir), "--limit", "5"]) == 2
