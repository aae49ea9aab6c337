"""`resnet-deploy bench ARTIFACT...`: which artifact to ship, and what it costs.

Thin: parses options into a ``BenchOptions`` (every default is the options class's), calls ``run_bench``,
prints and writes the report, then exits non-zero for an artifact that could not be measured (exit 2) or
a failed gate (exit 1). No framework is imported at module level.

``--json`` means what it means in ``predict`` and in most command-line tools: the report as one JSON
document on standard output (the tables then go to standard error). ``--json-output PATH`` writes it to a
file. The form of earlier versions, ``--json PATH.json``, still writes the file, with a deprecation note.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, List, Optional

import typer

from resnet_deploy.cli_common import DataOption, FitOption, StrictOption, folder_data
from resnet_deploy.logfilter import quiet_frameworks

_PLOT_SUFFIXES = (".png", ".svg", ".pdf")


def _defaults() -> dict:
    """``BenchOptions``' defaults, read from the class (an instance would resolve ``threads`` on this machine)."""
    from dataclasses import fields

    from resnet_deploy.bench.options import BenchOptions

    return {f.name: f.default for f in fields(BenchOptions)}


_D = _defaults()


def bench(
    artifacts: Annotated[List[Path], typer.Argument(help="Artifacts to bench: .tflite, .onnx (and .keras) files.",
                                                     show_default=False)],
    reference: Annotated[Optional[Path], typer.Option(
        "--reference", help="The float Keras model to compare with. Default: the one named in the artifacts' "
                            "manifests.", show_default=False)] = None,
    data: DataOption = None,
    fit: FitOption = None,
    strict: StrictOption = False,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N test images (quick runs).",
                                                 show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Batch size of the accuracy pass.")] = _D["batch_size"],
    threads: Annotated[Optional[int], typer.Option(help="Threads for every runtime. Default: all usable cores.",
                                                   show_default=False)] = None,
    large_batch: Annotated[int, typer.Option(help="The larger batch latency is measured at, besides batch 1.")] = _D["large_batch"],
    warmup: Annotated[int, typer.Option(help="Untimed runs before timing.")] = _D["warmup"],
    runs: Annotated[int, typer.Option(help="Timed runs (at least) of each file, per batch size, over all rounds.")] = _D["runs"],
    min_time: Annotated[float, typer.Option(help="Keep timing for at least this many seconds.")] = _D["min_time_s"],
    max_time: Annotated[float, typer.Option(
        help="Timing budget in seconds per file and batch size; the files are timed together in interleaved "
             "rounds, which stop early once every series is steady (at least --min-rounds).")] = _D["max_time_s"],
    min_rounds: Annotated[int, typer.Option(help="Interleaved timing rounds at least (6 gives a 95% interval "
                                                 "for each speed-up).")] = _D["min_rounds"],
    accuracy: Annotated[bool, typer.Option("--accuracy/--no-accuracy", help="Run the test-set accuracy pass.")] = _D["accuracy"],
    latency: Annotated[bool, typer.Option("--latency/--no-latency", help="Measure latency and memory.")] = _D["latency"],
    isolate: Annotated[bool, typer.Option(
        "--isolate/--in-process", help="Measure each file in its own child process (per-file peak RSS, crash "
                                       "isolation) or all in this process.")] = _D["isolate"],
    baselines: Annotated[bool, typer.Option(
        "--baselines/--no-baselines", help="Add the FP32 sibling (same folder, same source model) of a quantized "
                                           "artifact as its speed-up baseline (timed only: its parity with the "
                                           "float model is in its manifest).")] = _D["baselines"],
    allow_stale: Annotated[bool, typer.Option(
        "--allow-stale", help="Bench artifacts whose manifest names another float model (sha256) than the "
                              "reference: rows marked stale, their gates skipped. Without it they are errors.")] = _D["allow_stale"],
    cache: Annotated[bool, typer.Option(
        "--cache/--no-cache", help="Reuse the float model's test-set logits from the cache ($RESNET_DEPLOY_CACHE, "
                                   "default ~/.cache/resnet-deploy) and store them there.")] = _D["cache"],
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as one JSON document on standard "
                                                         "output (docs/bench-report-schema.md); the tables go to "
                                                         "standard error.")] = False,
    json_path: Annotated[Optional[Path], typer.Option("--json-output", help="Write the report as JSON to this "
                                                                            "file.", show_default=False)] = None,
    markdown_path: Annotated[Optional[Path], typer.Option("--markdown", help="Write the report as Markdown.",
                                                          show_default=False)] = None,
    plot_path: Annotated[Optional[Path], typer.Option("--plot", help="Draw each file's top-1 change against the "
                                                                      "float model and its latency, with their "
                                                                      "intervals (.png, .svg or .pdf).",
                                                      show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing report files.")] = False,
    max_drop: Annotated[Optional[float], typer.Option(
        "--max-drop", help="Gate: fail when an artifact's top-1 falls more than PP percentage points below the "
                           "float model.", show_default=False)] = None,
    min_speedup: Annotated[Optional[float], typer.Option(
        "--min-speedup", help="Gate: fail when an INT8 or dynamic-range INT8 artifact's batch-1 speed-up over the "
                              "FP32 artifact of its runtime (same source model, same run), judged at the low end "
                              "of its interval over the timing rounds, is below X, or when that FP32 artifact "
                              "is missing. FP32, FP16 (see --gate-fp16) and manifest-less "
                              "artifacts are not gated; the report lists them with the reason.",
        show_default=False)] = None,
    gate_fp16: Annotated[bool, typer.Option(
        "--gate-fp16", help="Hold FP16 artifacts to --min-speedup too (useful on GPUs; on CPUs FP16 runs at "
                            "about FP32 speed).")] = _D["gate_fp16"],
    timeout: Annotated[Optional[float], typer.Option(
        "--timeout", help="Seconds one file may go without progress (the load, one timing block, one "
                          "accuracy chunk of 1,024 images) before its process is killed and the file reported as "
                          "an error (not with --in-process). Default: 300 + 3 x --max-time + 0.1 s per image of "
                          "a chunk (432 s with the defaults).",
        show_default=False)] = None,
    max_memory: Annotated[str, typer.Option(
        "--max-memory", help="Memory cap of each file's process (binary units: 512M, 4G; 'none': no cap). A "
                             "file that needs more is reported as an error naming the cap (not with "
                             "--in-process).")] = "4G",
    seed: Annotated[int, typer.Option(help="Seed of the bootstrap interval.")] = _D["seed"],
    runtimes: Annotated[str, typer.Option(
        "--runtimes", help="Runtimes each ONNX file runs in, a row each, comma-separated: onnxruntime, "
                           "openvino. Each row's FP32 baseline is the FP32 file in the same runtime.")] = ",".join(_D["runtimes"]),
    allow_saturating: Annotated[bool, typer.Option(
        "--allow-saturating", help="Bench ONNX INT8 files whose U8S8 kernels saturate on this CPU (uint8 "
                                   "activations, 8-bit weights, x86 without VNNI): rows marked SATURATING. "
                                   "Without it they are errors.")] = _D["allow_saturating"],
) -> None:
    """Accuracy, latency, memory and size of each artifact beside the float model; CI gates."""
    from resnet_deploy.bench.options import BenchOptions

    artifacts, json_path, as_json = _deprecated_json_path(artifacts, as_json, json_path)

    options = BenchOptions(reference=reference, data=data, limit=limit, batch_size=batch_size, threads=threads,
                           accuracy=accuracy, latency=latency, large_batch=large_batch, warmup=warmup, runs=runs,
                           min_time_s=min_time, max_time_s=max_time, isolate=isolate, baselines=baselines,
                           seed=seed, max_drop_pp=max_drop, min_speedup=min_speedup, gate_fp16=gate_fp16,
                           timeout_s=timeout, min_rounds=min_rounds, allow_stale=allow_stale, cache=cache,
                           runtimes=runtimes, allow_saturating=allow_saturating,
                           max_memory=None if max_memory.strip().lower() == "none" else max_memory)
    check_outputs(json_path, markdown_path, plot_path, force, options)
    # --fit/--strict need an image folder (said before any work); without them run_bench reads options.data
    source = folder_data(data, fit, strict) if fit is not None or strict else None
    quiet_frameworks()
    from rich.console import Console

    from resnet_deploy.bench.run import run_bench

    console = Console(stderr=as_json)  # with --json, standard output holds the JSON document only
    stage = ["starting"]  # what the run was doing, for the line a Ctrl-C ends it with

    def progress(msg: str) -> None:
        stage[0] = msg
        status.update(msg)

    written: list = []
    try:
        with console.status("benchmarking") as status:
            report = run_bench(artifacts, options, data=source, progress=progress)
        stage[0] = "writing the report"
        finish(report, console, json_path, markdown_path, plot_path, written=written, to_stdout=as_json)
    except KeyboardInterrupt:
        raise interrupted(stage[0], [p for p in (json_path, markdown_path, plot_path) if p is not None], written)


def _deprecated_json_path(artifacts: list, as_json: bool, json_path):
    """``--json PATH.json`` of earlier versions: with ``--json`` now a flag, the path lands among the artifacts
    (a ``.json`` file is never one). It is taken as ``--json-output PATH`` (the file only, as before), with a
    note on stderr. Returns the artifacts, the JSON file and whether to print JSON on stdout."""
    reports = [p for p in artifacts if Path(p).suffix.lower() == ".json"] if as_json else []
    if len(reports) != 1 or json_path is not None:
        return artifacts, json_path, as_json
    import sys

    print(f"note: --json {reports[0]} is deprecated: --json prints the report on standard output; "
          f"use --json-output {reports[0]} to write it to a file", file=sys.stderr)
    return [p for p in artifacts if p is not reports[0]], reports[0], False


def interrupted(stage: str, outputs: list, written: list) -> typer.Exit:
    """Ctrl-C: one line on stderr saying what was interrupted and which report files exist (each is
    written whole or not at all: ``fileio.atomic_path``), and exit code 130 (128 + SIGINT)."""
    import sys

    missing = [str(p) for p in outputs if p not in written]
    files = (f"; report files written whole: {', '.join(map(str, written))}" if written else "") + \
        (f"; not written: {', '.join(missing)}" if missing else "")
    print(f"interrupted: bench stopped at \"{stage}\", its child processes ended{files or '; nothing was written'}",
          file=sys.stderr, flush=True)
    return typer.Exit(130)


def check_outputs(json_path, markdown_path, plot_path, force: bool, options) -> None:
    """Refuse bad output paths before the (long) run, not after it."""
    from resnet_deploy.errors import BenchError
    from resnet_deploy.fileio import check_can_write, check_writable

    paths = [p for p in (json_path, markdown_path, plot_path) if p is not None]
    for p, flag in ((json_path, "--json-output"), (markdown_path, "--markdown"), (plot_path, "--plot")):
        if p is not None:
            check_writable(p, "file", flag)
    if len({str(Path(p).resolve()) for p in paths}) != len(paths):
        raise BenchError("Two report options name the same file.", fix="give --json-output, --markdown and --plot "
                                                                       "different paths")
    for p in paths:
        check_can_write(p, force, "report")
    if plot_path is not None:
        if plot_path.suffix.lower() not in _PLOT_SUFFIXES:
            raise BenchError(f"--plot {plot_path} has no image suffix.", expected=", ".join(_PLOT_SUFFIXES),
                             fix="e.g. --plot bench.png")
        if not (options.accuracy and options.latency):
            raise BenchError("--plot draws the accuracy change and the latency, but one of them is switched off.",
                             fix="drop --no-accuracy / --no-latency or the --plot option")


def finish(report, console, json_path=None, markdown_path=None, plot_path=None, written=None,
           to_stdout: bool = False) -> None:
    """Print and write the report (each path written is appended to ``written``; ``to_stdout``: the JSON
    document on standard output too), then raise for errors (exit 2) or failed gates (exit 1)."""
    from resnet_deploy.bench import report as rep
    from resnet_deploy.bench.gates import gate_error
    from resnet_deploy.errors import BenchError

    rep.print_report(report, console)
    if to_stdout:
        print(rep.json_text(report))
    for path, write in ((json_path, rep.write_json), (markdown_path, rep.write_markdown), (plot_path, rep.write_plot)):
        if path is not None:
            write(report, path)
            if written is not None:
                written.append(path)
            console.print(f"wrote {path}", highlight=False)
    if report.errors:
        names = ", ".join(r.label for r in report.errors)
        gates = f"; gates failed: {', '.join(g['artifact'] + ' ' + g['gate'] for g in report.failed_gates)}" \
            if report.failed_gates else ""
        raise BenchError(f"{len(report.errors)} file(s) could not be benchmarked: {names}{gates}.",
                         expected="every artifact loads and runs",
                         fix="see the ERROR lines above; the other artifacts' results are in the report")
    err = gate_error(report)
    if err is not None:
        raise err
