"""How long the six-artifact export takes (TFLite FP32/FP16/INT8, ONNX FP32/FP16/INT8), per step, and
against an older commit on the same machine.

    .venv/bin/python benchmarks/export_time.py                          # random-weight ResNet34, this tree
    .venv/bin/python benchmarks/export_time.py --arch resnet8           # smoke run (seconds)
    .venv/bin/python benchmarks/export_time.py --baseline-ref ecd6614 --rounds 3
        # the same export from a git worktree of that commit, rounds interleaved (this, old, old, this, ...)

Every export runs in its own Python process (``--child``) with the tree under test first on
``sys.path``, so both sides pay the same imports and neither warms the other's caches; the export itself
(``export_model``) is timed inside the child, the process start and imports beside it. Steps are the
manifests' ``timing_s`` (conversion and validation of each artifact, keyed by format and precision since
the ONNX INT8 file name changed; where validation overlaps the next conversion they add up to more than
their wall time), "shared" (framework import, model load, data, float reference logits, calibration sample:
up to the export's "calibration:" progress line, which old and new code both print) and "artifacts" (the
wall time after it). With several rounds the median is reported.
Machine load moves absolute times by tens of percent: compare ratios from one interleaved run, on a
quiet machine. The project's target: this tree at most 0.60x the old one for ResNet34.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
HERE = Path(__file__).resolve().parent
REPO = HERE.parent
STEPS = [("tflite", "fp32"), ("tflite", "fp16"), ("tflite", "int8"), ("onnx", "fp32"), ("onnx", "fp16"),
         ("onnx", "int8")]


# The child: one export with one tree -------------------------------------------------------------------
def child(args) -> int:
    t_start = time.perf_counter()
    sys.path.insert(0, str(args.tree))
    import resnet_deploy
    from resnet_deploy.converters import ExportOptions, export_model

    assert Path(resnet_deploy.__file__).resolve().is_relative_to(Path(args.tree).resolve()), resnet_deploy.__file__
    import_s = time.perf_counter() - t_start
    marks = []
    t0 = time.perf_counter()

    def say(msg: str) -> None:
        marks.append((round(time.perf_counter() - t0, 3), msg))
        print(f"  [{time.perf_counter() - t0:6.1f} s] {msg}", file=sys.stderr, flush=True)

    opts = ExportOptions(fp16=True, int8=True, calib_samples=args.calib, validate_samples=args.validate_samples,
                         out_dir=args.out, force=True)
    arts = export_model(args.model, opts, data=args.data, progress=say)
    total = time.perf_counter() - t0
    steps = {f"{a.format} {a.precision}": {"artifact": a.path.name, **a.manifest.options["timing_s"]} for a in arts}
    args.result.write_text(json.dumps({"tree": str(args.tree), "import_s": import_s, "export_s": total,
                                       "steps": steps, "progress": marks}))
    return 0


# The parent: models, trees, rounds, the table ------------------------------------------------------------
def run_child(tree: Path, model: Path, args, out: Path, label: str) -> dict:
    result = out / f"result_{label}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--tree", str(tree), "--model", str(model),
           "--calib", str(args.calib), "--validate-samples", str(args.validate_samples), "--out", str(out / label),
           "--result", str(result)]
    if args.data:  # absolute: the child runs in the tree's folder (a worktree elsewhere for --baseline-ref)
        cmd += ["--data", str(Path(args.data).resolve())]
    env = dict(os.environ, PYTHONPATH=str(tree))
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=tree, env=env, check=True, stdout=sys.stderr if args.verbose else subprocess.DEVNULL,
                   stderr=None if args.verbose else subprocess.DEVNULL)
    rec = json.loads(result.read_text())
    rec["process_s"] = time.perf_counter() - t0
    return rec


def worktree(ref: str, where: Path) -> Path:
    subprocess.run(["git", "-C", str(REPO), "worktree", "add", "--detach", str(where), ref], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return where


def _shared(rec: dict) -> float:
    """Seconds until the calibration sample was ready (the "calibration:" progress line)."""
    return next((t for t, msg in rec["progress"] if msg.startswith("calibration:")), float("nan"))


def summarize(records: list[dict]) -> dict:
    """Median seconds per step over the rounds: convert + validate of each artifact, shared, total."""
    out = {}
    for fmt, prec in STEPS:
        key = f"{fmt} {prec}"
        out[key] = statistics.median(r["steps"][key]["convert"] + r["steps"][key]["validate"] for r in records)
    out["shared"] = statistics.median(_shared(r) for r in records)
    out["artifacts"] = statistics.median(r["export_s"] - _shared(r) for r in records)
    out["export"] = statistics.median(r["export_s"] for r in records)
    out["import"] = statistics.median(r["import_s"] for r in records)
    return out


def print_table(results: dict[str, list[dict]], model: str) -> None:
    sums = {k: summarize(v) for k, v in results.items()}
    labels = list(sums)
    rounds = len(next(iter(results.values())))
    print(f"\n{model}: six artifacts, median of {rounds} round(s), seconds (convert + validate per artifact)")
    head = f"{'step':<14}" + "".join(f"{lab:>14}" for lab in labels) + (f"{'ratio':>9}" if len(labels) == 2 else "")
    print(head)
    print("-" * len(head))
    for key in [f"{f} {p}" for f, p in STEPS] + ["shared", "artifacts", "export", "import"]:
        row = f"{key:<14}" + "".join(f"{sums[lab][key]:>14.1f}" for lab in labels)
        if len(labels) == 2:
            a, b = sums[labels[0]][key], sums[labels[1]][key]
            row += f"{a / b:>8.2f}x" if b > 0 else f"{'-':>9}"
        print(row)
    if len(labels) == 2:
        ratio = sums[labels[0]]["export"] / sums[labels[1]]["export"]
        print(f"\nexport time {labels[0]} / {labels[1]}: {ratio:.2f}x (target for ResNet34: at most 0.60x)")
    for lab, recs in results.items():  # where the time went in the last round, as the export said it
        last = recs[-1]
        names = ", ".join(f"{k}: {v['artifact']}" for k, v in last["steps"].items())
        print(f"{lab}: {names}")


def main(argv=None) -> int:
    sys.path.insert(0, str(HERE))
    from common import add_model_args, model_or_random

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap)
    ap.add_argument("--validate-samples", type=int, default=256, help="test images each artifact is checked on")
    ap.add_argument("--baseline-ref", help="a git ref to compare with (run from a temporary git worktree)")
    ap.add_argument("--rounds", type=int, default=1)
    ap.add_argument("--order", choices=("interleaved", "sequential"), default="interleaved",
                    help="interleaved: this/old, old/this, ...; sequential: every round of one, then the other")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--verbose", action="store_true", help="show each export's progress lines")
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tree", type=Path, help=argparse.SUPPRESS)
    ap.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        return child(args)

    from resnet_deploy.envinfo import machine_banner

    if args.data is None and (REPO.parent / "shared" / "data" / "cifar10").exists():
        args.data = REPO.parent / "shared" / "data" / "cifar10"  # the project's copy, as the tests find it
    print(machine_banner())
    with tempfile.TemporaryDirectory(prefix="rd-export-time-") as tmp:
        tmp = Path(tmp)
        out = args.out or tmp
        out.mkdir(parents=True, exist_ok=True)
        model = model_or_random(args, out)
        trees = {"this": REPO}
        if args.baseline_ref:
            rev = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", args.baseline_ref], check=True,
                                 capture_output=True, text=True).stdout.strip()
            trees[f"old {rev}"] = worktree(args.baseline_ref, tmp / "baseline")
        try:
            results: dict[str, list[dict]] = {k: [] for k in trees}
            plan = []
            for r in range(args.rounds):
                order = list(trees) if args.order == "sequential" or r % 2 == 0 else list(trees)[::-1]
                plan += [(r, lab) for lab in order]
            if args.order == "sequential":
                plan = sorted(plan, key=lambda p: list(trees).index(p[1]))
            for r, lab in plan:
                rec = run_child(trees[lab], model, args, out, f"{lab.split()[0]}{r}")
                results[lab].append(rec)
                print(f"round {r + 1} {lab}: export {rec['export_s']:.1f} s (imports {rec['import_s']:.1f} s)",
                      flush=True)
        finally:
            if args.baseline_ref:
                subprocess.run(["git", "-C", str(REPO), "worktree", "remove", "--force", str(tmp / "baseline")],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        print_table(results, f"{args.arch if args.model is None else args.model}")
        if args.json:
            args.json.write_text(json.dumps({"machine": machine_banner(), "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
