"""Evidence for accuracy-aware INT8: plain `--int8` beside `--int8 --accuracy-aware`, over calibration seeds.

For each model, each calibration seed and each mode (plain / accuracy-aware with the default budget),
the model is exported through the real pipeline (`export_model`) to TFLite and ONNX INT8; every INT8
file then runs on the **full test split** in a plain loop (LiteRT / ONNX Runtime, not bench's runners)
beside the Keras float model: top-1, its change in pp with a 95 % paired bootstrap interval, agreement
with the float model, the calibration the search chose, the layers left in float, the export time, and
batch-1 latency at 1 thread against the FP32 file of the same runtime (interleaved rounds). The summary
gives the mean and range over seeds. Nothing is chosen on the test split: the accuracy-aware export sees
training images only (validation split + calibration), the test split only reports.

    .venv/bin/python benchmarks/int8_accuracy.py --model runs/resnet20-cifar10/model.keras \\
        --data ../shared/data/cifar10 --seeds 0,1,2 --json int8_accuracy.json

Bounded: (seeds x 2 modes) exports per model; an accuracy-aware export is limited by --search-time per
INT8 file. Prints the CPU and library versions first.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def paired_ci(a_correct: np.ndarray, b_correct: np.ndarray, n_boot: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % bootstrap interval of mean(b) - mean(a) in pp, resampling images (paired)."""
    d = b_correct.astype(np.float64) - a_correct.astype(np.float64)
    rng = np.random.default_rng(seed)
    means = np.array([d[rng.integers(0, len(d), len(d))].mean() for _ in range(n_boot)])
    return float(100 * np.percentile(means, 2.5)), float(100 * np.percentile(means, 97.5))


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


def run_one(model_path: Path, mode: str, seed: int, args, data, test_x, float_pred, out: Path) -> list[dict]:
    from resnet_deploy.converters.int8_search import predict_onnx, predict_tflite
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.converters.export import export_model

    extra = dict(int8_max_drop=args.max_drop, val_samples=args.val_samples, search_time=args.search_time) \
        if mode == "aware" else {}
    opts = ExportOptions(formats=tuple(args.formats.split(",")), int8=True, calib_seed=seed, out_dir=out, force=True,
                         validate_samples=256, **extra)
    t0 = time.perf_counter()
    arts = {(a.format, a.precision): a for a in export_model(model_path, opts, data=args.data)}
    export_s = time.perf_counter() - t0
    rows = []
    for fmt in args.formats.split(","):
        a = arts[(fmt, "int8")]
        logits = (predict_tflite if fmt == "tflite" else predict_onnx)(a.path, test_x)
        pred = logits.argmax(1)
        ok_f, ok_q = float_pred == data.test.y, pred == data.test.y
        lat = latencies({"fp32": arts[(fmt, "fp32")].path, "int8": a.path}, test_x)
        rec = a.manifest.int8_accuracy or {}
        rows.append({
            "model": str(model_path), "format": fmt, "mode": mode, "seed": seed,
            "float_top1": float(ok_f.mean()), "int8_top1": float(ok_q.mean()),
            "delta_pp": 100 * float(ok_q.mean() - ok_f.mean()), "ci95_pp": paired_ci(ok_f, ok_q),
            "agreement": float((pred == float_pred).mean()),
            "calibration": rec.get("result", {}).get("calibration") or
            {"calib_samples": opts.calib_samples, "method": opts.calib_method, "per_channel": True},
            "float_layers": rec.get("fallback", {}).get("float_layers", []),
            "met_budget": rec.get("result", {}).get("met_budget"),
            "val_drop_pp": rec.get("result", {}).get("val_drop_pp"),
            "fp32_ms": lat["fp32"], "int8_ms": lat["int8"], "speedup": lat["fp32"] / lat["int8"],
            "export_s": export_s, "search_s": rec.get("seconds"),
        })
        print(f"  {fmt} {mode} seed {seed}: {rows[-1]['delta_pp']:+.2f} pp "
              f"[{rows[-1]['ci95_pp'][0]:+.2f}, {rows[-1]['ci95_pp'][1]:+.2f}], agreement "
              f"{100 * rows[-1]['agreement']:.2f} %, {rows[-1]['calibration']}, float {rows[-1]['float_layers']}, "
              f"{rows[-1]['speedup']:.2f}x FP32, export {export_s:.0f} s", flush=True)
    return rows


def summarize(rows: list[dict]) -> str:
    lines = ["| model | format | export | Δ pp mean [min, max] | widest 95 % CI | agreement % mean | chosen calibration "
             "| layers in float | × FP32 (batch 1, 1 thread) | export s (all files) |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    keys = sorted({(r["model"], r["format"], r["mode"]) for r in rows}, key=lambda k: (k[0], k[1], k[2] != "plain"))
    for model, fmt, mode in keys:
        rs = [r for r in rows if (r["model"], r["format"], r["mode"]) == (model, fmt, mode)]
        d = np.array([r["delta_pp"] for r in rs])
        lo = min(r["ci95_pp"][0] for r in rs)
        hi = max(r["ci95_pp"][1] for r in rs)
        cals = sorted({f"{r['calibration']['calib_samples']} {r['calibration']['method']}"
                       f"{'' if r['calibration']['per_channel'] else ' per-tensor'}" for r in rs})
        fl = sorted({", ".join(r["float_layers"]) or "none" for r in rs})
        lines.append(f"| {Path(model).parent.name}/{Path(model).name} | {fmt} | {mode} | {d.mean():+.2f} "
                     f"[{d.min():+.2f}, {d.max():+.2f}] | [{lo:+.2f}, {hi:+.2f}] | "
                     f"{100 * np.mean([r['agreement'] for r in rs]):.2f} | {'; '.join(cals)} | {'; '.join(fl)} | "
                     f"{np.mean([r['speedup'] for r in rs]):.2f}x | {np.mean([r['export_s'] for r in rs]):.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, action="append", required=True, help="trained .keras model (repeatable)")
    ap.add_argument("--data", type=Path, default=None)
    ap.add_argument("--seeds", default="0,1,2", help="calibration seeds (at least three for a range)")
    ap.add_argument("--formats", default="tflite,onnx")
    ap.add_argument("--max-drop", type=float, default=0.10, help="the accuracy-aware budget (validation pp)")
    ap.add_argument("--val-samples", type=int, default=5000)
    ap.add_argument("--search-time", type=float, default=300.0, help="seconds per INT8 file for search + fallback")
    ap.add_argument("--limit", type=int, default=None, help="test images (default: the full test split)")
    ap.add_argument("--json", type=Path, default=None, help="write every row here")
    args = ap.parse_args()

    from resnet_deploy.data import load_cifar10
    from resnet_deploy.data.preprocess import Preprocessing, preprocess
    from resnet_deploy.envinfo import library_versions, machine_banner, machine_info
    from resnet_deploy.models.io import load_model, read_metadata

    m = machine_info()
    print(machine_banner(), flush=True)
    data = load_cifar10(args.data)
    if args.limit:
        data.test = data.test.take(args.limit)
    rows = []
    t_all = time.perf_counter()
    for model_path in args.model:
        model = load_model(model_path)
        meta = read_metadata(model_path) or {}
        spec = Preprocessing.from_dict(meta.get("preprocessing"))
        test_x = preprocess(data.test.x, spec)
        float_pred = np.concatenate([np.asarray(model(test_x[i:i + 500], training=False)).argmax(1)
                                     for i in range(0, len(test_x), 500)])
        print(f"{model_path}: float top-1 {100 * (float_pred == data.test.y).mean():.2f} % on {len(test_x)} test images")
        with tempfile.TemporaryDirectory(prefix="rd-int8-bench-") as tmp:
            for seed in (int(s) for s in args.seeds.split(",")):
                for mode in ("plain", "aware"):
                    rows += run_one(model_path, mode, seed, args, data, test_x, float_pred, Path(tmp) / f"{mode}{seed}")
    print(f"\n{len(args.seeds.split(','))} calibration seeds, full run {time.perf_counter() - t_all:.0f} s; "
          f"Δ: INT8 top-1 minus the Keras float model's on {len(data.test.y)} test images\n")
    print(summarize(rows))
    if args.json:
        args.json.write_text(json.dumps({"machine": m, "libraries": library_versions(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
