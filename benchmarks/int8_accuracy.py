"""Evidence for INT8 accuracy: plain `--int8`, `--int8 --accuracy-aware` and peers (NNCF), over calibration seeds.

For each model and each calibration seed, the model is exported through the real pipeline
(``resnet_deploy.converters.export_model``) to TFLite and ONNX INT8, plain and accuracy-aware (the default
budget); with ``--peers nncf`` the FP32 ONNX file of that export is also quantized by NNCF
(``nncf.quantize``: its default post-training recipe, fast bias correction, on the same 300 class-balanced
training images our plain export calibrates on for that seed). Every INT8 file then runs on the test split
in a plain loop (LiteRT / ONNX Runtime with its default optimisations, not bench's runners) beside the float
model (Keras): top-1, its change in pp with a 95 % paired bootstrap interval, agreement with the float
model, and for ours the calibration the search chose and the layers left in float. An export that fails is
a row with its error, and the run goes on (an accuracy-aware export is made one format at a time, so a
failing TFLite search does not hide the ONNX one). The summary gives, per model, format and method, the
change for each seed with its interval and the mean over seeds with the interval of that mean (the same
bootstrap resample of test images for every seed). Nothing is chosen on the test split: the
accuracy-aware export sees training images only (validation split + calibration), the test split only
reports.

    .venv/bin/python benchmarks/int8_accuracy.py --model runs/resnet20-cifar10/model.keras \\
        --data ../shared/data/cifar10 --seeds 0,1,2 --peers nncf --json int8_accuracy.json
    .venv/bin/python benchmarks/int8_accuracy.py --model tests/data/foreign/resnet20.h5 \\
        --mean 125.3,123.0,113.9 --std 63.0,62.1,66.7 --peers nncf      # a model without a sidecar

``--mean/--std/--input-range`` are export's options (pixel units) and apply to every ``--model`` of the run:
run models with different input conventions in separate invocations. ``--modes plain`` skips the
accuracy-aware exports. ``--latency`` adds batch-1 latency at 1 thread against the FP32 file of the same
runtime (interleaved rounds; meaningless on a busy machine, so off by default). Prints the CPU and library
versions first.

NNCF runs in this interpreter when it imports (``pip install nncf``, or the project's ``[nncf]`` extra);
otherwise ``--nncf-python PATH`` names the Python of a separate environment holding it, and this script
calls itself there (``--nncf-child``) with the FP32 ONNX file and the calibration array.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO = Path(__file__).resolve().parents[1]
PEERS = ("nncf",)
N_BOOT = 2000


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------
def boot_indices(n: int, n_boot: int = N_BOOT, seed: int = 0, chunk: int = 200):
    """The same bootstrap resamples of ``n`` test images, chunk by chunk (every row uses the same ones)."""
    rng = np.random.default_rng(seed)
    for start in range(0, n_boot, chunk):
        yield rng.integers(0, n, (min(chunk, n_boot - start), n))


def paired_ci(diffs: np.ndarray, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval, in pp, of the mean of ``diffs`` (per image: quantized correct minus float
    correct; a 2-D array is averaged over its rows, the seeds, with the same image resample for all)."""
    d = np.atleast_2d(np.asarray(diffs, np.float64)).mean(0)
    means = np.concatenate([d[idx].mean(1) for idx in boot_indices(len(d), seed=seed)])
    return float(100 * np.percentile(means, 2.5)), float(100 * np.percentile(means, 97.5))


# ----------------------------------------------------------------------------------------------
# Plain runtime loops (not bench's runners, not the converters' helpers)
# ----------------------------------------------------------------------------------------------
def run_tflite(path: Path, x: np.ndarray, batch: int = 100, threads: int = 2) -> np.ndarray:
    from ai_edge_litert.interpreter import Interpreter

    it = Interpreter(model_path=str(path), num_threads=threads)
    inp = it.get_input_details()[0]
    out = []
    for i in range(0, len(x), batch):
        b = x[i:i + batch]
        it.resize_tensor_input(inp["index"], [len(b), *b.shape[1:]])
        it.allocate_tensors()
        it.set_tensor(inp["index"], b.astype(np.float32))
        it.invoke()
        out.append(np.array(it.get_tensor(it.get_output_details()[0]["index"]), dtype=np.float32))
    return np.concatenate(out)


def run_onnx(path: Path, x: np.ndarray, batch: int = 250, threads: int = 2) -> np.ndarray:
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL  # what a deployment runs
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    return np.concatenate([sess.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def run_file(path: Path, x: np.ndarray) -> np.ndarray:
    return run_tflite(path, x) if path.suffix == ".tflite" else run_onnx(path, x)


def latencies(files: dict[str, Path], x: np.ndarray, rounds: int = 5, runs: int = 20) -> dict[str, float]:
    """Median batch-1 ms at 1 thread, rounds interleaved across files (one session per file)."""
    import onnxruntime as ort
    from ai_edge_litert.interpreter import Interpreter

    call = {}
    for key, path in files.items():
        if path.suffix == ".tflite":
            it = Interpreter(model_path=str(path), num_threads=1)
            it.allocate_tensors()
            i, o = it.get_input_details()[0]["index"], it.get_output_details()[0]["index"]
            call[key] = (lambda it=it, i=i, o=o: (it.set_tensor(i, x[:1]), it.invoke(), it.get_tensor(o)))
        else:
            so = ort.SessionOptions()
            so.intra_op_num_threads = 1
            s = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
            name = s.get_inputs()[0].name
            call[key] = (lambda s=s, name=name: s.run(None, {name: x[:1]}))
    times = {k: [] for k in call}
    for fn in call.values():
        fn()
    for _ in range(rounds):
        for k, fn in call.items():
            for _ in range(runs):
                t0 = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t0)
    return {k: 1e3 * float(np.median(v)) for k, v in times.items()}


# ----------------------------------------------------------------------------------------------
# Rows
# ----------------------------------------------------------------------------------------------
class Ctx:
    """What every row of one model needs: the float predictions and the test labels."""

    def __init__(self, model_path: Path, args, data, spec, test_x: np.ndarray, float_pred: np.ndarray):
        self.model_path, self.args, self.data, self.spec = model_path, args, data, spec
        self.test_x, self.float_pred, self.y = test_x, float_pred, data.test.y
        self.float_ok = float_pred == data.test.y


def row(ctx: Ctx, fmt: str, method: str, seed: int, path: Path | None, extra: dict, error: str | None = None,
        fp32_path: Path | None = None) -> dict:
    """One INT8 file measured on the test split in a plain loop (or the error that kept it from existing)."""
    r = {"model": str(ctx.model_path), "format": fmt, "method": method, "seed": seed, "file": path and path.name,
         "error": error, **extra}
    if error is None:
        pred = run_file(path, ctx.test_x).argmax(1)
        ok = pred == ctx.y
        r.update(float_top1=float(ctx.float_ok.mean()), int8_top1=float(ok.mean()),
                 delta_pp=100 * float(ok.mean() - ctx.float_ok.mean()),
                 ci95_pp=paired_ci(ok.astype(np.int8) - ctx.float_ok.astype(np.int8)),
                 agreement=float((pred == ctx.float_pred).mean()),
                 correct=np.packbits(ok).tobytes().hex())  # per image, for the summary's interval over seeds
        if ctx.args.latency and fp32_path is not None:
            lat = latencies({"fp32": fp32_path, "int8": path}, ctx.test_x)
            r.update(fp32_ms=lat["fp32"], int8_ms=lat["int8"], speedup=lat["fp32"] / lat["int8"])
        if fmt == "onnx" and "scheme" not in r:
            r["scheme"] = onnx_scheme(path)
        print(f"  {fmt:6s} {method:6s} seed {seed}: {r['delta_pp']:+.2f} pp [{r['ci95_pp'][0]:+.2f}, "
              f"{r['ci95_pp'][1]:+.2f}], agreement {100 * r['agreement']:.2f} %"
              + (f", {r['scheme']}" if r.get("scheme") else "")
              + (f", {extra['calibration']}" if extra.get("calibration") else "")
              + (f", float {extra['float_layers']}" if extra.get("float_layers") else "")
              + (f", {r['speedup']:.2f}x FP32" if "speedup" in r else ""), flush=True)
    else:
        print(f"  {fmt:6s} {method:6s} seed {seed}: FAILED: {error}", flush=True)
    return r


def _error_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:500]}"


def export_ours(ctx: Ctx, mode: str, seed: int, formats: tuple[str, ...], out: Path) -> dict:
    """``export_model`` with ``--int8`` (plain) or ``--int8 --accuracy-aware``; (format, precision) -> artifact."""
    from resnet_deploy.converters import ExportOptions, export_model

    a = ctx.args
    extra = dict(int8_max_drop=a.max_drop, val_samples=a.val_samples, search_time=a.search_time) \
        if mode == "aware" else {}
    opts = ExportOptions(formats=formats, int8=True, calib_seed=seed, calib_samples=a.calib_samples, out_dir=out,
                         force=True, validate_samples=256, preprocessing=a.preprocessing, **extra)
    return {(str(x.format), str(x.precision)): x for x in export_model(ctx.model_path, opts, data=a.data)}


def ours_extra(art, opts_calib: int) -> dict:
    rec = art.manifest.int8_accuracy or {}
    res = rec.get("result", {})
    sample = ((art.manifest.calibration or {}).get("sample") or {})
    return {"calib_indices_sha256_16": sample.get("indices_sha256_16"),
            "calibration": res.get("calibration") or {"calib_samples": opts_calib, "method": "minmax",
                                                      "per_channel": True},
            "float_layers": rec.get("fallback", {}).get("float_layers", []), "met_budget": res.get("met_budget"),
            "val_drop_pp": res.get("val_drop_pp"), "search_s": rec.get("seconds")}


def run_ours(ctx: Ctx, mode: str, seed: int, out: Path) -> tuple[list[dict], Path | None]:
    """Rows of one mode and seed; also the FP32 ONNX file of the export (NNCF's input), when there is one."""
    formats = tuple(ctx.args.formats.split(","))
    groups = [formats] if mode == "plain" else [(f,) for f in formats]  # aware: one format at a time
    rows, fp32_onnx = [], None
    for group in groups:
        t0 = time.perf_counter()
        try:
            arts = export_ours(ctx, mode, seed, group, out / "-".join(group))
        except Exception as exc:  # a crash is a result here: record it and go on
            rows += [row(ctx, fmt, mode, seed, None, {}, error=_error_text(exc)) for fmt in group]
            continue
        export_s = time.perf_counter() - t0
        if ("onnx", "fp32") in arts:
            fp32_onnx = arts[("onnx", "fp32")].path
        for fmt in group:
            art = arts[(fmt, "int8")]
            rows.append(row(ctx, fmt, mode, seed, art.path,
                            {**ours_extra(art, ctx.args.calib_samples), "export_s": export_s},
                            fp32_path=arts[(fmt, "fp32")].path))
    return rows, fp32_onnx


# ----------------------------------------------------------------------------------------------
# NNCF
# ----------------------------------------------------------------------------------------------
def nncf_quantize(fp32_onnx: Path, calib_x: np.ndarray, dest: Path, subset_size: int) -> dict:
    """NNCF's default post-training quantization of an ONNX file (``nncf.quantize``: MinMax with the
    default preset, fast bias correction), one calibration image per item, as its examples feed ONNX models."""
    import nncf
    import onnx

    model = onnx.load(str(fp32_onnx))
    name = model.graph.input[0].name
    dataset = nncf.Dataset([calib_x[i:i + 1] for i in range(len(calib_x))], lambda item: {name: item})
    quantized = nncf.quantize(model, dataset, subset_size=subset_size, fast_bias_correction=True)
    tmp = dest.with_name(dest.name + ".tmp")
    onnx.save(quantized, str(tmp))
    tmp.replace(dest)
    return {"nncf": nncf.__version__, "call": f"nncf.quantize(model, dataset, subset_size={subset_size}, "
                                              "fast_bias_correction=True)"}


def run_nncf(ctx: Ctx, seed: int, fp32_onnx: Path | None, out: Path) -> list[dict]:
    from resnet_deploy.data import calibration_sample, preprocess

    a = ctx.args
    sample = calibration_sample(ctx.data.train, a.calib_samples, seed)  # the images our plain export calibrates on
    calib = {"calib_samples": a.calib_samples, "split": "train", "seed": seed,
             "indices_sha256_16": sample.recipe["indices_sha256_16"]}
    if fp32_onnx is None:
        return [row(ctx, "onnx", "nncf", seed, None, {"calibration": calib},
                    error="no FP32 ONNX file from our export of this seed to quantize")]
    dest = out / f"{ctx.model_path.stem}_int8_nncf.onnx"
    x = preprocess(sample.x, ctx.spec)
    try:
        if a.nncf_python:
            info = _nncf_in_child(a.nncf_python, fp32_onnx, x, dest, a.calib_samples)
        else:
            info = nncf_quantize(fp32_onnx, x, dest, a.calib_samples)
    except Exception as exc:
        return [row(ctx, "onnx", "nncf", seed, None, {"calibration": calib}, error=_error_text(exc))]
    return [row(ctx, "onnx", "nncf", seed, dest, {"calibration": calib, "calib_indices_sha256_16":
                                                  calib["indices_sha256_16"], "scheme": onnx_scheme(dest), **info},
                fp32_path=fp32_onnx)]


def onnx_scheme(path: Path) -> str:
    """What a QDQ ONNX file computes with: activation type (the zero points of its QuantizeLinear nodes) and the
    widest quantized weight (127: 8-bit, 64 or less: 7-bit, reduce_range), e.g. "u8 activations, 8-bit weights"."""
    import onnx
    from onnx import numpy_helper

    g = onnx.load(str(path)).graph
    inits = {i.name: i for i in g.initializer}
    acts = sorted({numpy_helper.to_array(inits[n.input[2]]).dtype.name for n in g.node
                   if n.op_type == "QuantizeLinear" and len(n.input) > 2 and n.input[2] in inits})
    w = [np.abs(numpy_helper.to_array(inits[n.input[0]]).astype(np.int32)).max() for n in g.node
         if n.op_type == "DequantizeLinear" and n.input[0] in inits
         and numpy_helper.to_array(inits[n.input[0]]).dtype == np.int8]
    bits = "none" if not w else ("8-bit" if max(w) > 64 else "7-bit")
    return f"{'/'.join(acts) or 'no'} activations, {bits} int8 weights (max |w| {max(w) if w else 0})"


def _nncf_in_child(python: str, fp32_onnx: Path, x: np.ndarray, dest: Path, subset_size: int) -> dict:
    """``nncf_quantize`` in another environment's Python (this file, ``--nncf-child``)."""
    calib = dest.with_name(dest.stem + "_calib.npy")
    np.save(calib, x)
    proc = subprocess.run([python, __file__, "--nncf-child", str(fp32_onnx), str(calib), str(dest), str(subset_size)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"NNCF in {python} exited {proc.returncode}: {proc.stderr.strip()[-800:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _nncf_child(argv: list[str]) -> None:
    fp32_onnx, calib, dest, subset = argv
    info = nncf_quantize(Path(fp32_onnx), np.load(calib), Path(dest), int(subset))
    print(json.dumps(info))


# ----------------------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------------------
METHOD_ORDER = {"plain": 0, "aware": 1, "nncf": 2}
METHOD_NAME = {"plain": "ours --int8", "aware": "ours --accuracy-aware", "nncf": "NNCF quantize"}


def _correct(r: dict, n: int) -> np.ndarray:
    return np.unpackbits(np.frombuffer(bytes.fromhex(r["correct"]), np.uint8))[:n].astype(np.int8)


def summarize(rows: list[dict], seeds: list[int], float_ok: dict[str, np.ndarray]) -> str:
    head = " | ".join(f"seed {s}: Δ pp [95 % CI]" for s in seeds)
    lines = [f"| model | format | method | {head} | mean Δ pp [95 % CI] | agreement % | layers in float / note |",
             "| --- | --- | --- | " + " | ".join("---" for _ in seeds) + " | --- | --- | --- |"]
    keys = sorted({(r["model"], r["format"], r["method"]) for r in rows},
                  key=lambda k: (k[0], k[1], METHOD_ORDER.get(k[2], 9)))
    for model, fmt, method in keys:
        rs = {r["seed"]: r for r in rows if (r["model"], r["format"], r["method"]) == (model, fmt, method)}
        cells, good = [], []
        for s in seeds:
            r = rs.get(s)
            if r is None:
                cells.append("–")
            elif r["error"]:
                cells.append("**failed**")
            else:
                good.append(r)
                cells.append(f"{r['delta_pp']:+.2f} [{r['ci95_pp'][0]:+.2f}, {r['ci95_pp'][1]:+.2f}]")
        fok = float_ok[model]
        if good:
            diffs = np.stack([_correct(r, len(fok)) - fok for r in good])
            lo, hi = paired_ci(diffs)
            mean = f"{100 * diffs.mean():+.2f} [{lo:+.2f}, {hi:+.2f}]" + (f" ({len(good)} of {len(seeds)})"
                                                                       if len(good) < len(seeds) else "")
            agree = f"{100 * np.mean([r['agreement'] for r in good]):.2f}"
        else:
            mean, agree = "–", "–"
        notes = sorted({", ".join(r.get("float_layers") or []) or "none" for r in good}) if method != "nncf" else []
        if method == "nncf" and good:
            plain = {r["seed"]: r.get("calib_indices_sha256_16") for r in rows
                     if (r["model"], r["format"], r["method"]) == (model, fmt, "plain")}
            same = [plain.get(r["seed"]) == r["calib_indices_sha256_16"] for r in good]
            notes.append("calibration images: " + ("the same as ours --int8" if all(same) else
                                                   f"NOT the same as ours --int8 for {same.count(False)} seed(s)"))
        if fmt == "onnx":
            notes += sorted({r["scheme"] for r in good if r.get("scheme")})
        errors = sorted({r["error"][:160] for r in rs.values() if r["error"]})
        note = "; ".join(notes + [f"failed: {e}" for e in errors])
        lines.append(f"| {Path(model).name} | {fmt} | {METHOD_NAME.get(method, method)} | {' | '.join(cells)} | "
                     f"{mean} | {agree} | {note} |")
    return "\n".join(lines)


def differences(rows: list[dict], seeds: list[int], float_ok: dict[str, np.ndarray]) -> str:
    """Ours minus NNCF (and accuracy-aware minus plain), per model and format: the mean over the seeds both made
    a file for, per image paired, with the bootstrap interval of that mean (same resamples for every seed)."""
    pairs = [("aware", "nncf"), ("plain", "nncf"), ("aware", "plain")]
    lines = ["| model | format | difference | seeds | mean Δ pp [95 % CI] |", "| --- | --- | --- | --- | --- |"]
    for model in sorted({r["model"] for r in rows}):
        n = len(float_ok[model])
        for fmt in ("tflite", "onnx"):
            for a, b in pairs:
                ra = {r["seed"]: r for r in rows if (r["model"], r["format"], r["method"]) == (model, fmt, a)
                      and not r["error"]}
                rb = {r["seed"]: r for r in rows if (r["model"], r["method"]) == (model, b) and not r["error"]
                      and (r["format"] == fmt or b == "nncf")}
                if b == "nncf" and fmt != "onnx":
                    continue
                both = [s for s in seeds if s in ra and s in rb]
                if not both:
                    continue
                d = np.stack([_correct(ra[s], n) - _correct(rb[s], n) for s in both])
                lo, hi = paired_ci(d)
                lines.append(f"| {Path(model).name} | {fmt} | {METHOD_NAME[a]} − {METHOD_NAME[b]} | "
                             f"{','.join(map(str, both))} | {100 * d.mean():+.2f} [{lo:+.2f}, {hi:+.2f}] |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--nncf-child":
        return _nncf_child(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True,
                    help="float model: .keras, Keras .h5 or a SavedModel folder (repeatable)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds (at least three for a range)")
    ap.add_argument("--formats", default="tflite,onnx")
    ap.add_argument("--modes", default="plain,aware", help="our exports: plain (--int8), aware (--accuracy-aware)")
    ap.add_argument("--peers", default="", help=f"other quantizers on the same FP32 ONNX file: {', '.join(PEERS)}")
    ap.add_argument("--nncf-python", default=None, help="a Python with nncf installed, when this one has none")
    ap.add_argument("--input-range", default=None, help="as export's: models without metadata, 0-255 or 0-1")
    ap.add_argument("--mean", default=None, help="as export's: per-channel mean R,G,B in pixel units")
    ap.add_argument("--std", default=None, help="as export's: per-channel std R,G,B in pixel units")
    ap.add_argument("--calib-samples", type=int, default=300, help="calibration images, ours (plain) and the peers'")
    ap.add_argument("--max-drop", type=float, default=0.10, help="the accuracy-aware budget (validation pp)")
    ap.add_argument("--val-samples", type=int, default=5000)
    ap.add_argument("--search-time", type=float, default=300.0, help="seconds per INT8 file for search + fallback")
    ap.add_argument("--limit", type=int, default=None, help="test images (default: the full test split)")
    ap.add_argument("--latency", action="store_true", help="also time batch-1 latency against FP32 (quiet machine)")
    ap.add_argument("--json", type=Path, default=None, help="write every row here")
    args = ap.parse_args()
    modes = [m for m in args.modes.split(",") if m]
    peers = [p for p in args.peers.split(",") if p]
    if set(modes) - {"plain", "aware"} or set(peers) - set(PEERS):
        ap.error(f"--modes takes plain,aware; --peers takes {', '.join(PEERS)}")
    if "nncf" in peers and "onnx" not in args.formats.split(","):
        ap.error("--peers nncf quantizes our FP32 ONNX file: keep onnx in --formats")
    if "nncf" in peers and not args.nncf_python:
        try:
            import nncf  # noqa: F401
        except ImportError:
            ap.error("--peers nncf: nncf does not import here; pip install nncf, or pass --nncf-python")

    sys.path.insert(0, str(REPO))
    from resnet_deploy.converters.command import parse_preprocessing
    from resnet_deploy.data import Preprocessing, load_cifar10, preprocess
    from resnet_deploy.envinfo import library_versions, machine_banner, machine_info
    from resnet_deploy.models.io import load_model, read_metadata

    args.preprocessing = parse_preprocessing(args.input_range, args.mean, args.std)
    m = machine_info()
    print(machine_banner(), flush=True)
    data = load_cifar10(args.data)
    if args.limit:
        data.test = data.test.take(args.limit)
    seeds = [int(s) for s in args.seeds.split(",")]
    rows, float_ok = [], {}
    t_all = time.perf_counter()
    for model_path in args.model:
        model = load_model(model_path)
        meta = read_metadata(model_path) or {}
        spec = args.preprocessing or Preprocessing.from_dict(meta.get("preprocessing"))
        test_x = preprocess(data.test.x, spec)
        float_pred = np.concatenate([np.asarray(model(test_x[i:i + 500], training=False)).argmax(1)
                                     for i in range(0, len(test_x), 500)])
        ctx = Ctx(model_path, args, data, spec, test_x, float_pred)
        float_ok[str(model_path)] = ctx.float_ok.astype(np.int8)
        print(f"{model_path}: float top-1 {100 * ctx.float_ok.mean():.2f} % on {len(test_x)} test images, "
              f"preprocessing {spec.to_dict()}", flush=True)
        with tempfile.TemporaryDirectory(prefix="rd-int8-bench-") as tmp:
            for seed in seeds:
                fp32_onnx = None
                for mode in modes:
                    new, fp32 = run_ours(ctx, mode, seed, Path(tmp) / f"{mode}{seed}")
                    rows += new
                    fp32_onnx = fp32_onnx or fp32
                if "nncf" in peers:
                    if fp32_onnx is None:  # no export of ours made one (aware and plain failed): make it alone
                        try:
                            from resnet_deploy.converters import ExportOptions, export_model

                            arts = export_model(model_path, ExportOptions(formats=("onnx",), out_dir=Path(tmp) / "fp32",
                                                                          force=True, preprocessing=args.preprocessing),
                                                data=args.data)
                            fp32_onnx = next(a.path for a in arts if str(a.precision) == "fp32")
                        except Exception as exc:
                            print(f"  FP32 ONNX export failed: {_error_text(exc)}")
                    nncf_out = Path(tmp) / f"nncf{seed}"
                    nncf_out.mkdir(exist_ok=True)
                    rows += run_nncf(ctx, seed, fp32_onnx, nncf_out)
    print(f"\n{len(seeds)} calibration seeds, full run {time.perf_counter() - t_all:.0f} s; Δ: INT8 top-1 minus the "
          f"float model's on {len(data.test.y)} test images (plain LiteRT / ONNX Runtime loops); 95 % CI: paired "
          f"bootstrap over test images ({N_BOOT} resamples), for the mean the same resample across seeds\n")
    print(summarize(rows, seeds, float_ok))
    print("\nDifferences between methods on the same test images (positive: the first is better)\n")
    print(differences(rows, seeds, float_ok))
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "libraries": library_versions(), "test_images": len(data.test.y),
                                         "seeds": seeds, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
