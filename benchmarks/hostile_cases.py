"""Issue 22's closing check: hostile or careless inputs the issue did not list, each run through the real CLI.

Every case builds its files in a temporary folder (malformed ONNX/TFLite/.keras files, manifest oddities,
images that are truncated, 16-bit, CMYK, paletted, animated, rotated by EXIF, huge, links that loop, names
with newlines, bidi marks or bytes that are not UTF-8, outputs on a read-only mount...), then runs
``python -m resnet_deploy.cli predict|bench|export ...`` in a subprocess of its own with a timeout, under a
wrapper that reports the peak resident memory of the largest process below it (``RUSAGE_CHILDREN``
``ru_maxrss``: the CLI or the child that opened the model). The outcome of each run is one of

- ``refused cleanly``: exit 2, an ``error:`` message (what / expected / fix), nothing else wrong;
- ``correct answer``: exit 0 and the answer checked another way (the test models are linear, so the
  probabilities are recomputed with numpy from the pixels the image must decode to; a TFLite file's with a
  plain LiteRT interpreter);
- a failure: ``TRACEBACK``, ``SIGNAL``, ``HANG`` (past the timeout), ``LEFTOVER`` (a stage, lock or job
  folder left behind, or any file the command should not have written), ``OVER CAP`` (peak memory over
  ``--max-memory``), ``WRONG SUCCESS`` (exit 0 for what must be refused), ``WRONG ANSWER`` or
  ``WRONG REFUSAL``.

It prints one table (case, command, exit code, outcome, peak RSS, the first line of the message, escaped)
with the machine, and exits 1 when any case failed. A few minutes on two busy cores:

    .venv/bin/python benchmarks/hostile_cases.py            # every case
    .venv/bin/python benchmarks/hostile_cases.py -k npz -v  # the cases whose name holds "npz", with output
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.test_untrusted import (CIFAR, _keras_zip, int8_tflite, manifest, onnx_classifier,  # noqa: E402
                                  png_header_only)

# ONNX Runtime's import writes a 51-byte session id, $TMPDIR/.ses, and keeps it (not a stage of ours)
FOREIGN_TMP = {".ses"}
CAP = 2 << 30  # predict's default --max-memory
TIMEOUT_S = 240
UNSAFE_CHARS = "\x1b\x07\r\x9b\u202e\u2066\u200b"
MEASURE = ("import resource, subprocess, sys\n"
           "r = subprocess.run(sys.argv[1:])\n"
           "print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)\n"
           "print('EXIT_STATUS', r.returncode, file=sys.stderr)\n"
           "sys.exit(0)\n")


@dataclass
class Run:
    """One command and what it must give: ``expect`` "answer" (exit 0, ``check`` passes), "refuse" (exit 2
    with an error; ``check``, when given, still reads the JSON: the other inputs' answers) or "either"."""

    args: list[str]
    expect: str
    check: Callable | None = None  # (parsed JSON or text output) -> None when right, else why not
    env: dict = field(default_factory=dict)
    allowed: tuple[str, ...] = ()  # names the command may create in the case folder
    timeout: float = TIMEOUT_S
    cleanup: Callable | None = None
    terminal: bool = False  # stdout and stderr must hold no raw control, bidi or zero-width character


def raw_controls(text: str) -> str | None:
    bad = [c for c in UNSAFE_CHARS if c in text]
    return f"raw {ascii(''.join(bad))} reached the terminal" if bad else None


CASES: list[tuple[str, Callable[[Path], Run]]] = []


def case(name: str):
    def add(fn):
        CASES.append((name, fn))
        return fn
    return add


# ----------------------------------------------------------------------------------------------
# Files and expected answers
# ----------------------------------------------------------------------------------------------
def weights(seed: int = 0) -> np.ndarray:
    """The weights ``onnx_classifier`` draws (same generator, same call)."""
    return np.random.default_rng(seed).normal(0, 0.003, (3072, 10)).astype(np.float32)


def softmax(z) -> np.ndarray:
    z = np.asarray(z, np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def linear_probs(pixels: np.ndarray, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    x = np.asarray(pixels, np.float32).reshape(len(pixels), -1)
    return softmax((x @ weights(seed)) * np.float32(scale))


def json_probs(doc: dict) -> dict[str, np.ndarray]:
    """input name -> probabilities by class index (run with -k 10)."""
    out = {}
    for p in doc["predictions"]:
        v = np.zeros(len(doc["class_names"]))
        for t in p["top"]:
            v[t["index"]] = t["probability"]
        out[p["input"]] = v
    return out


def expect_probs(want: dict[str, np.ndarray], errors: tuple[str, ...] = (), atol: float = 1e-4):
    """A check: these inputs answered with these probabilities, these inputs (name substrings) refused."""
    def check(doc) -> str | None:
        got = json_probs(doc)
        if set(got) != set(want):
            return f"answered {sorted(map(ascii, got))}, expected {sorted(map(ascii, want))}"
        for name, p in want.items():
            if got[name].shape != p.shape or not np.allclose(got[name], p, atol=atol):
                return f"{ascii(Path(name).name)}: max |diff| {np.abs(got[name] - p).max():.3g}"
        errs = [e["input"] for e in doc.get("errors", [])]
        for needle in errors:
            if not any(needle in e for e in errs):
                return f"no error for {ascii(needle)} (errors: {[ascii(e) for e in errs]})"
        return None
    return check


def rand_pixels(seed: int, shape=(32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def save_png(path: Path, pixels: np.ndarray) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path)
    return path


def png_bytes(width: int, height: int, depth: int, color: int, rows) -> bytes:
    """A PNG written by hand: IHDR, one streamed IDAT of ``rows`` (bytes per row, filter 0 added), IEND."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return len(data).to_bytes(4, "big") + kind + data + zlib.crc32(kind + data).to_bytes(4, "big")

    z = zlib.compressobj(6)
    idat = b"".join(z.compress(b"\0" + r) for r in rows) + z.flush()
    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([depth, color, 0, 0, 0])
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def shared(root: Path) -> dict:
    """A good ONNX classifier with its manifest, and a good 32x32 image, for the image and option cases."""
    d = root / "shared"
    d.mkdir()
    model = onnx_classifier(d / "m.onnx")
    manifest(model)
    good = rand_pixels(1)
    return {"model": model, "good": save_png(d / "good.png", good), "good_px": good}


S: dict = {}


def predict_json(*args) -> list[str]:
    return ["predict", *map(str, args), "--json", "-k", "10"]


def good_only(d: Path, bad: Path, errors: tuple[str, ...] = ()) -> Run:
    """predict the good image and ``bad``: the good one answered right, ``bad`` refused (exit 2)."""
    return Run(predict_json(S["model"], S["good"], bad), "refuse",
               expect_probs({str(S["good"]): linear_probs(S["good_px"][None])[0]}, errors or (bad.name,)))


def answer_one(path: Path, pixels: np.ndarray, *extra, atol: float = 1e-4) -> Run:
    return Run(predict_json(S["model"], path, *extra), "answer",
               expect_probs({str(path): linear_probs(pixels[None])[0]}, atol=atol))


# ----------------------------------------------------------------------------------------------
# Images
# ----------------------------------------------------------------------------------------------
@case("PNG truncated to half its bytes")
def _(d):
    data = save_png(d / "t.png", rand_pixels(2)).read_bytes()
    (d / "t.png").write_bytes(data[:len(data) // 2])
    return good_only(d, d / "t.png")


@case("JPEG cut off at 60 %")
def _(d):
    from PIL import Image

    Image.fromarray(rand_pixels(3, (64, 64, 3))).save(d / "t.jpg", quality=90)
    data = (d / "t.jpg").read_bytes()
    (d / "t.jpg").write_bytes(data[:int(len(data) * 0.6)])
    return good_only(d, d / "t.jpg")


@case("16-bit RGB PNG (48 bits a pixel)")
def _(d):
    px = rand_pixels(4)
    wide = px.astype(">u2") * 257  # v * 257: exactly v again in 8 bits, whichever rounding
    (d / "deep.png").write_bytes(png_bytes(32, 32, 16, 2, [r.tobytes() for r in wide]))
    return answer_one(d / "deep.png", px)


@case("16-bit grayscale PNG")
def _(d):
    g = rand_pixels(5, (32, 32))
    (d / "g16.png").write_bytes(png_bytes(32, 32, 16, 0, [r.tobytes() for r in g.astype(">u2") * 257]))
    return answer_one(d / "g16.png", np.repeat(g[..., None], 3, axis=2))


@case("gray+alpha PNG, half the pixels transparent")
def _(d):
    from PIL import Image

    g = rand_pixels(6, (32, 32))
    alpha = np.where(np.arange(32)[:, None] < 16, 0, 255).astype(np.uint8) * np.ones((1, 32), np.uint8)
    Image.fromarray(np.stack([g, alpha], -1), "LA").save(d / "la.png")
    want = np.where(alpha[..., None] == 0, 255, np.repeat(g[..., None], 3, axis=2)).astype(np.uint8)
    return answer_one(d / "la.png", want)  # transparent: composited onto white


@case("palette PNG with a transparent index")
def _(d):
    from PIL import Image

    rng = np.random.default_rng(7)
    pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    idx = rng.integers(0, 256, (32, 32), dtype=np.uint8)
    img = Image.fromarray(idx, "P")
    img.putpalette(pal.ravel().tolist())
    img.save(d / "p.png", transparency=0)
    want = np.where((idx == 0)[..., None], 255, pal[idx]).astype(np.uint8)
    return answer_one(d / "p.png", want)


@case("CMYK JPEG")
def _(d):
    from PIL import Image

    Image.fromarray(rand_pixels(8, (32, 32, 4)), "CMYK").save(d / "cmyk.jpg", quality=95)
    with Image.open(d / "cmyk.jpg") as img:  # libjpeg's own decode, converted to RGB by Pillow
        want = np.asarray(img.convert("RGB"))
    return answer_one(d / "cmyk.jpg", want)


@case("animated GIF (first frame is used)")
def _(d):
    from PIL import Image

    rng = np.random.default_rng(9)
    pal = rng.integers(0, 256, (256, 3), dtype=np.uint8)
    frames = []
    for _ in range(3):
        f = Image.fromarray(rng.integers(0, 256, (32, 32), dtype=np.uint8), "P")
        f.putpalette(pal.ravel().tolist())
        frames.append(f)
    frames[0].save(d / "a.gif", save_all=True, append_images=frames[1:], duration=50, loop=0, optimize=False)
    return answer_one(d / "a.gif", pal[np.asarray(frames[0])])


@case("PNG with EXIF orientation 6 (90 degrees clockwise)")
def _(d):
    from PIL import Image

    px = rand_pixels(10, (32, 64, 3))  # 64 wide, 32 high
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(px).save(d / "rot.png", exif=exif)
    upright = np.rot90(px, k=-1)  # 32 wide, 64 high; the centred square is rows 16..48
    return answer_one(d / "rot.png", upright[16:48])


@case("PNG declaring 6000 x 6000 (under the pixel budget), 100 bytes of data")
def _(d):
    return good_only(d, png_header_only(d / "big.png", 6000, 6000))


@case("real 6000 x 6000 PNG of one colour (60 KB on disk, 108 MB decoded)")
def _(d):
    row = np.tile(np.array([100, 150, 200], np.uint8), 6000).tobytes()
    (d / "flat.png").write_bytes(png_bytes(6000, 6000, 8, 2, (row for _ in range(6000))))
    return answer_one(d / "flat.png", np.tile(np.array([100, 150, 200], np.uint8), (32, 32, 1)))


@case("empty .png (0 bytes)")
def _(d):
    (d / "empty.png").write_bytes(b"")
    return good_only(d, d / "empty.png")


@case("JPEG data in a file named .png")
def _(d):
    from PIL import Image

    Image.fromarray(rand_pixels(11)).save(d / "really-jpeg.png", format="JPEG", quality=95)
    with Image.open(d / "really-jpeg.png") as img:
        want = np.asarray(img.convert("RGB"))
    return answer_one(d / "really-jpeg.png", want)


@case("text file named .png")
def _(d):
    (d / "notes.png").write_text("these are not pixels\n" * 20)
    return good_only(d, d / "notes.png")


@case("1 x 1 PNG (enlarged to 32 x 32)")
def _(d):
    px = rand_pixels(12, (1, 1, 3))
    return answer_one(save_png(d / "dot.png", px), np.tile(px, (32, 32, 1)))


@case("1 x 5000 PNG (centred square is one pixel)")
def _(d):
    px = rand_pixels(13, (5000, 1, 3))
    px[2490:2510] = px[2499]  # bicubic enlarging reads a few pixels past the one-pixel square: keep them alike
    return answer_one(save_png(d / "thin.png", px), np.tile(px[2499:2500], (32, 32, 1)))


@case("PNG whose IDAT CRC is wrong")
def _(d):
    data = bytearray(save_png(d / "crc.png", rand_pixels(14)).read_bytes())
    pos = data.find(b"IDAT") + 10
    data[pos] ^= 0xFF
    (d / "crc.png").write_bytes(bytes(data))
    return good_only(d, d / "crc.png")


@case("image that is a loop of symbolic links")
def _(d):
    os.symlink("b.png", d / "a.png")
    os.symlink("a.png", d / "b.png")
    return good_only(d, d / "a.png")


@case("image that is a dangling symbolic link")
def _(d):
    os.symlink("gone.png", d / "link.png")
    return good_only(d, d / "link.png")


@case("image with mode 000 (root reads it: an answer)")
def _(d):
    px = rand_pixels(15)
    p = save_png(d / "locked.png", px)
    p.chmod(0)
    run = answer_one(p, px)
    run.expect = "either" if os.geteuid() != 0 else "answer"
    return run


@case("folder whose name is not UTF-8")
def _(d):
    folder = Path(os.fsdecode(bytes(d) + b"/\xff\xfe-photos"))
    px = rand_pixels(16)
    p = save_png(folder / "x.png", px)
    return Run(predict_json(S["model"], folder), "answer", expect_probs({str(p): linear_probs(px[None])[0]}))


def terminal_clean(lines_expected: int | None = None, needles: tuple[str, ...] = ()):
    """A check of text output: no control, bidi or zero-width character, no forged line, the escapes shown."""
    def check(text: str) -> str | None:
        bad = [c for c in UNSAFE_CHARS if c in text]
        if bad:
            return f"raw {ascii(''.join(bad))} reached the terminal"
        if any(line.lstrip().startswith("FAKE") for line in text.splitlines()):
            return "a forged line starts with FAKE"
        for n in needles:
            if n not in text:
                return f"{ascii(n)} not shown"
        return None
    return check


@case("folder name with a newline and ESC (text output)")
def _(d):
    folder = d / "a\x1b[2J\nFAKE: accuracy 100%"
    save_png(folder / "x.png", rand_pixels(17))
    # the text output may cut the head of a long name, escapes and all: no needle
    return Run(["predict", str(S["model"]), str(folder)], "answer", terminal_clean(), terminal=True)


@case("class names with bidi overrides and isolates (text output)")
def _(d):
    m = onnx_classifier(d / "bidi.onnx")
    manifest(m, class_names=[f"c{i}\u202egnp.exe" for i in range(9)] + ["x\u2066y\u2069"])
    return Run(["predict", str(m), str(S["good"]), "-k", "10"], "answer",
               terminal_clean(needles=("\\u202egnp.exe", "\\u2066")), terminal=True)


@case("class names with C1 CSI, CR and zero-width space (text output)")
def _(d):
    m = onnx_classifier(d / "c1.onnx")
    manifest(m, class_names=[f"n{i}\x9b2J\u200b" for i in range(9)] + ["over\rFAKE: accuracy 100%"])
    return Run(["predict", str(m), str(S["good"]), "-k", "10"], "answer",
               terminal_clean(needles=("\\x9b2J", "\\u200b", "over\\rFAKE")), terminal=True)


@case("empty folder")
def _(d):
    (d / "nothing").mkdir()
    return Run(predict_json(S["model"], d / "nothing"), "refuse")


@case("folder holding a FIFO and a socket named .png beside an image")
def _(d):
    folder = d / "mixed"
    px = rand_pixels(18)
    p = save_png(folder / "ok.png", px)
    os.mkfifo(folder / "fifo.png")
    s = socket.socket(socket.AF_UNIX)
    s.bind(str(folder / "sock.png"))
    s.close()
    return Run(predict_json(S["model"], folder), "answer", expect_probs({str(p): linear_probs(px[None])[0]}))


# ----------------------------------------------------------------------------------------------
# .npz inputs
# ----------------------------------------------------------------------------------------------
@case(".npz with labels out of range (12 for 10 classes)")
def _(d):
    np.savez(d / "y12.npz", x=rand_pixels(19, (4, 32, 32, 3)), y=np.array([1, 2, 12, 3]))
    return good_only(d, d / "y12.npz")


@case(".npz with float64 pixels")
def _(d):
    np.savez(d / "f.npz", x=rand_pixels(20, (4, 32, 32, 3)).astype(np.float64))
    return good_only(d, d / "f.npz")


@case(".npz with grayscale (N, 32, 32) images")
def _(d):
    np.savez(d / "g.npz", x=rand_pixels(21, (4, 32, 32)))
    return good_only(d, d / "g.npz")


@case(".npz that is not a zip")
def _(d):
    (d / "x.npz").write_bytes(b"\x93NUMPY" + b"\0" * 200)
    return good_only(d, d / "x.npz")


@case(".npz with zero images")
def _(d):
    np.savez(d / "none.npz", x=np.zeros((0, 32, 32, 3), np.uint8))
    return Run(predict_json(S["model"], d / "none.npz"), "refuse")


@case(".npz in Fortran order with --limit 3")
def _(d):
    x = rand_pixels(22, (6, 32, 32, 3))
    np.savez(d / "fortran.npz", x=np.asfortranarray(x), y=np.arange(6))
    p = str(d / "fortran.npz")
    return Run(predict_json(S["model"], p, "--limit", "3"), "answer",
               expect_probs({f"{p}[{i}]": linear_probs(x[i:i + 1])[0] for i in range(3)}))


@case(".npz with float labels")
def _(d):
    np.savez(d / "yf.npz", x=rand_pixels(23, (3, 32, 32, 3)), y=np.array([0.5, 1.0, 2.0]))
    return good_only(d, d / "yf.npz")


# ----------------------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------------------
def model_case(model: Path, expect: str = "refuse", check=None, *extra) -> Run:
    return Run(predict_json(model, S["good"], *extra), expect, check)


def good_answer(seed: int = 0, scale: float = 1.0):
    return expect_probs({str(S["good"]): linear_probs(S["good_px"][None], seed, scale)[0]})


@case("ONNX truncated to half (no manifest)")
def _(d):
    data = onnx_classifier(d / "half.onnx").read_bytes()
    (d / "half.onnx").write_bytes(data[:len(data) // 2])
    return model_case(d / "half.onnx")


@case("ONNX of 0 bytes")
def _(d):
    (d / "zero.onnx").write_bytes(b"")
    return model_case(d / "zero.onnx")


@case("TFLite file renamed .onnx")
def _(d):
    int8_tflite(d / "x.tflite").rename(d / "x.onnx")
    return model_case(d / "x.onnx")


def onnx_graph(path: Path, nodes, inits, inputs, outputs, opset: int = 17, domains=()) -> Path:
    import onnx
    from onnx import helper as h

    g = h.make_graph(nodes, "g", inputs, outputs, inits)
    m = h.make_model(g, opset_imports=[h.make_opsetid("", opset), *[h.make_opsetid(dm, 1) for dm in domains]])
    m.ir_version = 8
    onnx.save(m, path)
    return path


def linear_nodes(w: np.ndarray, src: str = "X"):
    from onnx import helper as h
    from onnx import numpy_helper as nh

    return ([h.make_node("Reshape", [src, "flat"], ["F"]), h.make_node("MatMul", ["F", "W"], ["L"])],
            [nh.from_array(w, "W"), nh.from_array(np.array([-1, 3072], np.int64), "flat")])


@case("ONNX taking uint8 pixels")
def _(d):
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes, inits = linear_nodes(weights())
    nodes = [h.make_node("Cast", ["X8"], ["X"], to=T.FLOAT), *nodes, h.make_node("Identity", ["L"], ["Y"])]
    m = onnx_graph(d / "u8.onnx", nodes, inits, [h.make_tensor_value_info("X8", T.UINT8, ["N", 32, 32, 3])],
                   [h.make_tensor_value_info("Y", T.FLOAT, ["N", 10])])
    return model_case(m, "either", good_answer())


@case("ONNX with a second input")
def _(d):
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes, inits = linear_nodes(weights())
    nodes += [h.make_node("Add", ["L", "B"], ["Y"])]
    m = onnx_graph(d / "two.onnx", nodes, inits, [h.make_tensor_value_info("X", T.FLOAT, ["N", 32, 32, 3]),
                                                  h.make_tensor_value_info("B", T.FLOAT, ["N", 10])],
                   [h.make_tensor_value_info("Y", T.FLOAT, ["N", 10])])
    return model_case(m)


@case("ONNX whose output is (N, 1, 10)")
def _(d):
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    nodes, inits = linear_nodes(weights())
    nodes += [h.make_node("Reshape", ["L", "s3"], ["Y"])]
    inits += [nh.from_array(np.array([-1, 1, 10], np.int64), "s3")]
    m = onnx_graph(d / "r3.onnx", nodes, inits, [h.make_tensor_value_info("X", T.FLOAT, ["N", 32, 32, 3])],
                   [h.make_tensor_value_info("Y", T.FLOAT, ["N", 1, 10])])
    return model_case(m)


@case("ONNX using an operator of an unknown domain")
def _(d):
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes, inits = linear_nodes(weights())
    nodes += [h.make_node("Evil", ["L"], ["Y"], domain="com.example.evil")]
    m = onnx_graph(d / "custom.onnx", nodes, inits, [h.make_tensor_value_info("X", T.FLOAT, ["N", 32, 32, 3])],
                   [h.make_tensor_value_info("Y", T.FLOAT, ["N", 10])], domains=("com.example.evil",))
    return model_case(m)


@case("ONNX claiming opset 99")
def _(d):
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes, inits = linear_nodes(weights())
    nodes += [h.make_node("Identity", ["L"], ["Y"])]
    m = onnx_graph(d / "future.onnx", nodes, inits, [h.make_tensor_value_info("X", T.FLOAT, ["N", 32, 32, 3])],
                   [h.make_tensor_value_info("Y", T.FLOAT, ["N", 10])], opset=99)
    return model_case(m)


def scaled_model(path: Path, bias: np.ndarray | None = None, scale: float | None = None,
                 fixed_batch: bool = False) -> Path:
    from onnx import TensorProto as T
    from onnx import helper as h
    from onnx import numpy_helper as nh

    nodes, inits = linear_nodes(weights())
    last = "L"
    if scale is not None:
        nodes.append(h.make_node("Mul", [last, "S"], ["LS"]))
        inits.append(nh.from_array(np.array(scale, np.float32), "S"))
        last = "LS"
    if bias is not None:
        nodes.append(h.make_node("Add", [last, "B"], ["LB"]))
        inits.append(nh.from_array(bias.astype(np.float32), "B"))
        last = "LB"
    nodes.append(h.make_node("Identity", [last], ["Y"]))
    batch = 1 if fixed_batch else "N"
    return onnx_graph(path, nodes, inits, [h.make_tensor_value_info("X", T.FLOAT, [batch, 32, 32, 3])],
                      [h.make_tensor_value_info("Y", T.FLOAT, [batch, 10])])


@case("ONNX whose output is +infinity for one class")
def _(d):
    b = np.zeros(10)
    b[3] = np.inf
    return model_case(scaled_model(d / "inf.onnx", bias=b))


@case("ONNX with logits around 1e31 (finite, softmax must not overflow)")
def _(d):
    return model_case(scaled_model(d / "huge.onnx", scale=1e30), "answer", good_answer(scale=1e30))


@case("ONNX whose outputs are all equal (ties: lower index first)")
def _(d):
    from onnx import TensorProto as T
    from onnx import helper as h

    nodes, inits = linear_nodes(np.zeros((3072, 10), np.float32))
    nodes.append(h.make_node("Identity", ["L"], ["Y"]))
    m = onnx_graph(d / "flat.onnx", nodes, inits, [h.make_tensor_value_info("X", T.FLOAT, ["N", 32, 32, 3])],
                   [h.make_tensor_value_info("Y", T.FLOAT, ["N", 10])])

    def check(doc):
        top = doc["predictions"][0]["top"]
        if [t["index"] for t in top] != list(range(10)) or any(abs(t["probability"] - 0.1) > 1e-9 for t in top):
            return f"ties not 10 % each in index order: {[(t['index'], t['probability']) for t in top]}"
        return None
    return model_case(m, "answer", check)


@case("ONNX with a softmax and no output_kind (rows sum to 1)")
def _(d):
    m = onnx_classifier(d / "soft.onnx", softmax=True)
    return model_case(m, "answer", good_answer())


@case("ONNX with a fixed batch of 1, three images")
def _(d):
    m = scaled_model(d / "b1.onnx", fixed_batch=True)
    imgs = [save_png(d / f"i{i}.png", rand_pixels(30 + i)) for i in range(3)]
    want = {str(p): linear_probs(rand_pixels(30 + i)[None])[0] for i, p in enumerate(imgs)}
    return Run(predict_json(m, *imgs), "either", expect_probs(want))


@case("TFLite with its file identifier overwritten")
def _(d):
    data = bytearray(int8_tflite(d / "id.tflite").read_bytes())
    data[4:8] = b"XXXX"
    (d / "id.tflite").write_bytes(bytes(data))
    return model_case(d / "id.tflite")


@case("TFLite truncated to a third (no manifest)")
def _(d):
    data = int8_tflite(d / "cut.tflite").read_bytes()
    (d / "cut.tflite").write_bytes(data[:len(data) // 3])
    return model_case(d / "cut.tflite")


@case("TFLite of 0 bytes")
def _(d):
    (d / "zero.tflite").write_bytes(b"")
    return model_case(d / "zero.tflite")


@case("TFLite whose manifest writes the sha256 in capitals")
def _(d):
    from tests.test_untrusted import _litert_logits

    m = int8_tflite(d / "caps.tflite")
    side = manifest(m)
    doc = json.loads(side.read_text())
    doc["sha256"] = doc["sha256"].upper()
    side.write_text(json.dumps(doc))
    want = softmax(_litert_logits(m, [S["good"]]))[0]
    return model_case(m, "answer", expect_probs({str(S["good"]): want}, atol=1e-6))


# ----------------------------------------------------------------------------------------------
# Manifests
# ----------------------------------------------------------------------------------------------
def with_manifest(d: Path, text: str | bytes | None = None, expect: str = "refuse", **fields) -> Run:
    m = onnx_classifier(d / "m.onnx")
    side = manifest(m, **fields)
    if text is not None:
        side.write_bytes(text if isinstance(text, bytes) else text.encode())
    return model_case(m, expect, good_answer() if expect != "refuse" else None)


def manifest_text(d: Path, edit: Callable[[str], str], expect: str = "refuse") -> Run:
    m = onnx_classifier(d / "m.onnx")
    side = manifest(m)
    side.write_text(edit(side.read_text()))
    return model_case(m, expect, good_answer() if expect != "refuse" else None)


@case("manifest starting with a UTF-8 byte-order mark")
def _(d):
    m = onnx_classifier(d / "m.onnx")
    side = manifest(m)
    side.write_bytes(b"\xef\xbb\xbf" + side.read_bytes())
    return model_case(m, "either", good_answer())


@case("manifest with unknown extra fields")
def _(d):
    return with_manifest(d, expect="answer", comment="hello", extra={"nested": [1, 2, {"x": None}]})


@case("manifest that is a link to /dev/zero")
def _(d):
    m = onnx_classifier(d / "m.onnx")
    os.symlink("/dev/zero", d / "m.onnx.json")
    return model_case(m)


@case("manifest scale 1e400 (JSON reads infinity)")
def _(d):
    return manifest_text(d, lambda t: t.replace('"scale": 1.0', '"scale": 1e400'))


@case("manifest with a 10,000-character class name")
def _(d):
    return with_manifest(d, class_names=CIFAR[:9] + ["z" * 10_000])


@case("manifest format in capitals (ONNX)")
def _(d):
    return with_manifest(d, format="ONNX")


@case("manifest sha256 with a trailing space")
def _(d):
    m = onnx_classifier(d / "m.onnx")
    side = manifest(m)
    doc = json.loads(side.read_text())
    doc["sha256"] += " "
    side.write_text(json.dumps(doc))
    return model_case(m)


@case("manifest preprocessing mean of two values")
def _(d):
    return with_manifest(d, preprocessing={"scale": 1.0, "mean": [0, 0], "std": [1, 1, 1]})


@case("manifest number of 5,000 digits")
def _(d):
    return manifest_text(d, lambda t: t.replace('"scale": 1.0', '"scale": 1' + "0" * 5000))


@case("manifest of 0 bytes")
def _(d):
    return with_manifest(d, text=b"")


@case("manifest in UTF-16")
def _(d):
    m = onnx_classifier(d / "m.onnx")
    side = manifest(m)
    side.write_bytes(side.read_text().encode("utf-16"))
    return model_case(m)


@case("manifest with 1000 class names for 10 outputs")
def _(d):
    return with_manifest(d, class_names=[f"c{i}" for i in range(1000)])


@case("manifest whose class_names key appears twice (JSON keeps the last)")
def _(d):
    return manifest_text(d, lambda t: t[:-1] + ', "class_names": ' + json.dumps(CIFAR) + "}", expect="answer")


@case("artifact that is a folder named m.onnx")
def _(d):
    (d / "m.onnx").mkdir()
    return model_case(d / "m.onnx")


@case("artifact that is a link to /dev/urandom")
def _(d):
    os.symlink("/dev/urandom", d / "rand.onnx")
    return model_case(d / "rand.onnx")


@case("artifact name with ESC and a newline (text output)")
def _(d):
    m = onnx_classifier(d / "m\x1b]0;pwned\x07\nFAKE: accuracy 100%.onnx")
    return Run(["predict", str(m), str(S["good"])], "answer", terminal_clean(needles=("\\x1b]0;pwned\\x07",)),
               terminal=True)


# ----------------------------------------------------------------------------------------------
# .keras and .h5
# ----------------------------------------------------------------------------------------------
@case(".keras that is a PNG")
def _(d):
    shutil.copy(S["good"], d / "m.keras")
    return model_case(d / "m.keras")


@case(".keras zip of 20,000 members")
def _(d):
    with zipfile.ZipFile(d / "many.keras", "w") as zf:
        for i in range(20_000):
            zf.writestr(f"f{i}", b"")
    return model_case(d / "many.keras")


@case(".keras zip without config.json")
def _(d):
    with zipfile.ZipFile(d / "noconf.keras", "w") as zf:
        zf.writestr("metadata.json", json.dumps({"keras_version": "3.0.0"}))
    return model_case(d / "noconf.keras")


@case(".h5 that is an HDF5 signature and zeros")
def _(d):
    (d / "m.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 4096)
    return model_case(d / "m.h5")


@case("export of a .keras whose metadata.json is 64 MiB + 1 declared")
def _(d):
    m = _keras_zip(d / "meta.keras")
    data = bytearray(m.read_bytes())
    with zipfile.ZipFile(m) as zf:
        info = zf.getinfo("metadata.json")
    size = (64 << 20) + 1
    data[info.header_offset + 22:info.header_offset + 26] = size.to_bytes(4, "little")
    pos = data.find(b"PK\x01\x02")
    while data[pos + 46:pos + 46 + 13] != b"metadata.json":
        pos = data.find(b"PK\x01\x02", pos + 4)
    data[pos + 24:pos + 28] = size.to_bytes(4, "little")
    m.write_bytes(bytes(data))
    return Run(["export", str(m), "--formats", "onnx", "--out", str(d / "out"), "--data", str(d / "no-data")],
               "refuse")


# ----------------------------------------------------------------------------------------------
# Options, outputs and the environment
# ----------------------------------------------------------------------------------------------
@case("predict --max-memory 16384P (more than any rlimit)")
def _(d):
    return Run(predict_json(S["model"], S["good"], "--max-memory", "99999999T"), "refuse")


@case("predict --timeout nan")
def _(d):
    return Run(predict_json(S["model"], S["good"], "--timeout", "nan"), "refuse")


@case("predict --timeout inf (wait as long as it progresses)")
def _(d):
    return Run(predict_json(S["model"], S["good"], "--timeout", "inf"), "answer", good_answer())


@case("predict with TMPDIR on a full 64 KiB disk")
def _(d):
    disk = d / "disk"
    disk.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)]).returncode != 0:
        return Run(["--version"], "answer", lambda _: "SKIP: cannot mount a tmpfs here")
    x = rand_pixels(40, (200, 32, 32, 3))
    np.savez(d / "many.npz", x=x)
    (disk / "filler").write_bytes(b"\0" * (60 << 10))
    return Run(predict_json(S["model"], d / "many.npz"), "refuse", env={"TMPDIR": str(disk)}, allowed=("disk/filler",),
               cleanup=lambda: subprocess.run(["umount", str(disk)]))


@case("bench --json into a read-only mount")
def _(d):
    ro = d / "ro"
    ro.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(ro)]).returncode != 0:
        return Run(["--version"], "answer", lambda _: "SKIP: cannot mount a tmpfs here")
    return Run(["bench", str(S["model"]), "--json", str(ro / "report.json"), "--data", str(d / "no-data")], "refuse",
               cleanup=lambda: subprocess.run(["umount", str(ro)]))


@case("bench --json under a path whose parent is a file")
def _(d):
    (d / "afile").write_text("x")
    return Run(["bench", str(S["model"]), "--json", str(d / "afile" / "report.json"), "--data", str(d / "no-data")],
               "refuse")


@case("bench of an artifact whose manifest is a link to /dev/zero")
def _(d):
    m = onnx_classifier(d / "m.onnx")
    os.symlink("/dev/zero", d / "m.onnx.json")
    return Run(["bench", str(m), "--data", str(d / "no-data")], "refuse")


@case("bench of an artifact whose manifest nests 100 levels in a field")
def _(d):
    m = onnx_classifier(d / "m.onnx")
    (d / "m.onnx.json").write_text('{"options": ' + "[" * 100 + "]" * 100 + "}")
    return Run(["bench", str(m), "--data", str(d / "no-data")], "refuse")


def tiny_cifar(folder: Path) -> Path:
    """A CIFAR-10-shaped data folder of 20 random images a split (bench reads train.npz and test.npz)."""
    folder.mkdir()
    rng = np.random.default_rng(50)
    for split in ("train", "test"):
        np.savez(folder / f"{split}.npz", x=rng.integers(0, 256, (20, 32, 32, 3), dtype=np.uint8), y=np.arange(20) % 10)
    return folder


@case("bench of an artifact named with ESC and a newline (text report)")
def _(d):
    m = onnx_classifier(d / "b\x1b[2J\x1b]0;pwned\x07\nFAKE: accuracy 100%.onnx")
    data = tiny_cifar(d / "data")
    return Run(["bench", str(m), "--data", str(data), "--limit", "20", "--no-latency", "--no-cache"], "answer",
               terminal_clean(needles=("\\x1b[2J",)), terminal=True)


@case("predict of a missing artifact named with ESC (the error line)")
def _(d):
    return Run(["predict", str(d / "gone\x1b]0;pwned\x07\x1b[31m.onnx"), str(S["good"])], "refuse", terminal=True)


@case("bench of missing files named with a bidi override")
def _(d):
    return Run(["bench", str(d / "model\u202egnp.onnx"), "--data", str(d / "no-data")], "refuse", terminal=True)


# ----------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------
@dataclass
class Outcome:
    name: str
    command: str
    code: int | None
    outcome: str
    peak: int
    message: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.outcome.startswith(("refused cleanly", "correct answer", "skipped"))


def snapshot(folder: Path) -> set[str]:
    out = set()
    for root, dirs, files in os.walk(folder, followlinks=False):
        for n in dirs + files:
            out.add(os.path.relpath(os.path.join(root, n), folder))
    return out


def first_line(stdout: str, stderr: str) -> str:
    """The first error line; for a JSON answer, its first prediction; else the first line printed."""
    try:
        doc = json.loads(stdout)
        first = doc["predictions"][0]["top"][0]
        more = len(doc["predictions"]) - 1
        head = f"answer: {first['class']} {first['probability']:.1%}" + (f" (+{more} more)" if more else "")
    except (ValueError, KeyError, IndexError, TypeError):
        head = None
    for line in stderr.splitlines():
        if line.startswith("error:"):
            return line[len("error:"):].strip()
    if head:
        return head
    for text in (stderr, stdout):
        for line in text.splitlines():
            if line.strip() and not line.startswith(("PEAK_RSS_KIB", "EXIT_STATUS")):
                return line.strip()
    return ""


def run_case(name: str, build, root: Path, index: int, verbose: bool) -> Outcome:
    d = root / f"case{index:02d}"
    d.mkdir()
    tmp = root / f"tmp{index:02d}"
    tmp.mkdir()
    run = build(d)
    before = snapshot(d)
    env = {k: v for k, v in os.environ.items() if k not in ("RESNET_DEPLOY_VERBOSE",)}
    env.update({"COLUMNS": "120", "TMPDIR": str(tmp), "PYTHONDONTWRITEBYTECODE": "1", **run.env})
    argv = [sys.executable, "-c", MEASURE, sys.executable, "-m", "resnet_deploy.cli", *run.args]
    command = "resnet-deploy " + " ".join(a if len(a) < 40 else "…" + a[-30:] for a in
                                          (os.path.relpath(x, root) if x.startswith(str(root)) else x
                                           for x in run.args))
    started = time.monotonic()
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd=REPO,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=run.timeout)
        hung = False
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        hung = True
    seconds = time.monotonic() - started
    stdout, stderr = out.decode("utf-8", "replace"), err.decode("utf-8", "replace")
    peak = next((int(x.split()[1]) * 1024 for x in stderr.splitlines() if x.startswith("PEAK_RSS_KIB")), 0)
    code = next((int(x.split()[1]) for x in stderr.splitlines() if x.startswith("EXIT_STATUS")), None)
    if run.cleanup:
        run.cleanup()
    leftover = sorted(p for p in snapshot(d) - before if p not in run.allowed) + \
        [f"$TMPDIR/{p}" for p in sorted(snapshot(tmp)) if p not in FOREIGN_TMP]
    message = first_line(stdout, stderr).replace(f"{root}/", "")  # paths relative to the temporary folder
    if verbose:
        print(f"--- {name}\n{stdout[-3000:]}\n{stderr[-3000:]}", file=sys.stderr)
    if hung:
        outcome = f"HANG (past {run.timeout:g} s)"
    elif code is not None and code < 0:
        outcome = f"SIGNAL ({signal.Signals(-code).name})"
    elif "Traceback (most recent call last)" in stdout + stderr:
        outcome = "TRACEBACK"
    elif run.terminal and raw_controls(stdout + stderr):
        outcome = f"TERMINAL INJECTION: {raw_controls(stdout + stderr)}"
    elif leftover:
        outcome = f"LEFTOVER {ascii(leftover[:3])}"
    elif peak > CAP:
        outcome = "OVER CAP"
    elif code == 0:
        if run.expect == "refuse":
            outcome = "WRONG SUCCESS"
        else:
            why = _check(run, stdout)
            outcome = ("skipped: " + why[6:]) if why and why.startswith("SKIP: ") else \
                (f"WRONG ANSWER: {why}" if why else "correct answer")
    elif code == 2 and "error:" in stderr:
        if run.expect == "answer":
            outcome = "WRONG REFUSAL"
        else:
            partial = run.check is not None and run.expect == "refuse"  # the other inputs must still be right
            why = _check(run, stdout) if partial else None
            outcome = f"WRONG ANSWER: {why}" if why else ("refused cleanly" + (" (the others answered)"
                                                                                 if partial else ""))
    else:
        outcome = f"UNEXPECTED EXIT {code}"
    return Outcome(name, command, code, outcome, peak, message, seconds)


def _check(run: Run, stdout: str) -> str | None:
    if run.check is None:
        return None
    if "--json" in run.args:
        try:
            doc = json.loads(stdout)
        except ValueError as exc:
            return f"stdout is not JSON ({exc})"
        return run.check(doc)
    return run.check(stdout)


def escape(text: str, width: int) -> str:
    s = ascii(text)[1:-1]
    return s if len(s) <= width else s[:width - 1] + "…"


def main(argv: list[str] | None = None) -> int:
    from resnet_deploy import envinfo

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-k", dest="patterns", action="append", help="only the cases whose name holds this text "
                    "(repeat for several)")
    ap.add_argument("-v", "--verbose", action="store_true", help="print each command's output")
    ap.add_argument("--keep", action="store_true", help="keep the temporary folder")
    ap.add_argument("--markdown", type=Path, help="also write the table as Markdown to this file")
    args = ap.parse_args(argv)
    cases = [(n, b) for n, b in CASES if not args.patterns or any(k.lower() in n.lower() for k in args.patterns)]
    root = Path(tempfile.mkdtemp(prefix="hostile-cases."))
    results = []
    try:
        S.update(shared(root))
        for i, (name, build) in enumerate(cases):
            r = run_case(name, build, root, i, args.verbose)
            results.append(r)
            print(f"[{i + 1}/{len(cases)}] {r.outcome:<28} {r.seconds:5.1f} s  {name}", file=sys.stderr, flush=True)
    finally:
        if args.keep:
            print(f"kept {root}", file=sys.stderr)
        else:
            for disk in root.glob("case*/*"):
                if os.path.ismount(disk):
                    subprocess.run(["umount", str(disk)])
            shutil.rmtree(root, ignore_errors=True)
    machine = f"{envinfo.cpu_model()} ({os.cpu_count()} CPUs), Python {sys.version.split()[0]}"
    header = ["#", "case", "command", "exit", "outcome", "peak RSS", "message (first line, escaped)"]
    rows = [[str(i + 1), r.name, escape(r.command, 70), "-" if r.code is None else str(r.code), r.outcome,
             f"{r.peak / (1 << 20):.0f} MiB", escape(r.message, 90)] for i, r in enumerate(results)]
    bad = [r for r in results if not r.ok]
    summary = (f"{len(results)} cases, {len(results) - len(bad)} refused cleanly or answered correctly, {len(bad)} "
               f"failed; memory cap {CAP >> 20} MiB; machine: {machine}")
    widths = [max(len(h), *(len(row[j]) for row in rows)) if rows else len(h) for j, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in rows:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    print(summary)
    if args.markdown:
        md = io.StringIO()
        md.write("| " + " | ".join(header) + " |\n|" + "---|" * len(header) + "\n")
        for row in rows:
            md.write("| " + " | ".join(c.replace("|", "\\|") if j != 2 else f"`{c.replace('|', '/')}`"
                                        for j, c in enumerate(row)) + " |\n")
        md.write(f"\n{summary}\n")
        args.markdown.write_text(md.getvalue())
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
