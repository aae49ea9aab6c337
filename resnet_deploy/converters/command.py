"""`resnet-deploy export MODEL`: parse options, build ``ExportOptions``, call ``export_model``, print a table.

Every default comes from ``ExportOptions`` (``_D``). Renamed flags keep their old name as a hidden alias
that prints a deprecation note: ``--validate-samples`` (now ``--parity-samples``), ``--val-samples`` and
``--val-seed`` (now ``--tuning-samples`` and ``--tuning-seed``). Cheap to import: no framework is imported
until the command runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from resnet_deploy.cli_common import DataOption, FitOption, StrictOption, folder_data
from resnet_deploy.converters.onnx_rules import MAX_OPSET, MIN_OPSET, TARGET_CHOICES
from resnet_deploy.converters.options import ExportOptions
from resnet_deploy.errors import ExportError
from resnet_deploy.logfilter import quiet_frameworks


def parse_preprocessing(input_range: Optional[str], mean: Optional[str], std: Optional[str]):
    """``--input-range 0-1|0-255`` and ``--mean/--std r,g,b`` (in pixel units, 0..255) -> Preprocessing or None."""
    from resnet_deploy.data.preprocess import Preprocessing

    if input_range is None and mean is None and std is None:
        return None
    ranges = {"0-255": 1.0, "0-1": 1 / 255}
    if input_range is not None and input_range not in ranges:
        raise ExportError(f"Unknown --input-range {input_range!r}.", expected="0-255 or 0-1")
    scale = ranges[input_range or "0-255"]

    def triple(text, name):
        if text is None:
            return None
        try:
            vals = tuple(float(v) for v in text.split(","))
        except ValueError:
            vals = ()
        if len(vals) != 3:
            raise ExportError(f"--{name} {text!r} is not three numbers.", expected="R,G,B in pixel units, e.g. 125.3,123.0,113.9")
        return tuple(v * scale for v in vals)  # pixel units -> units after scaling

    return Preprocessing(scale=scale, mean=triple(mean, "mean"), std=triple(std, "std"))


_D = ExportOptions()  # the command's defaults come from its options class


def deprecated(old: str, new: str, value, current):
    """The value of a renamed flag: ``current`` unless the old name was given (then a note on stderr)."""
    if value is None:
        return current
    import sys

    print(f"note: {old} is deprecated; use {new}", file=sys.stderr)
    return value


def parse_counts(text: str) -> tuple[int, ...]:
    """``"1000,3000"`` -> (1000, 3000), with a clear error for anything else."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise ExportError(f"--search-calib-samples {text!r} is not a list of counts.",
                          expected="whole numbers, comma-separated, e.g. 1000,3000") from None


def export(
    model: Annotated[str, typer.Argument(help="Float model: .keras (from train), Keras .h5, a SavedModel folder, or "
                                         "a pretrained name (resnet-deploy models --pretrained).",
                                         metavar="MODEL", show_default=False)],
    formats: Annotated[str, typer.Option(help="Targets, comma-separated: tflite, onnx.")] = ",".join(
        f.value for f in _D.formats),
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write FP16 artifacts (TFLite float16 weights; ONNX float16, float I/O).")] = _D.fp16,
    int8: Annotated[bool, typer.Option("--int8", help="Also write full-integer INT8 (TFLite) and QDQ INT8 (ONNX Runtime static quantization).")] = _D.int8,
    dynamic_int8: Annotated[bool, typer.Option("--dynamic-int8", help="Also write TFLite dynamic-range INT8 (int8 weights, float activations).")] = _D.dynamic_int8,
    int8_io: Annotated[bool, typer.Option("--int8-io", help="TFLite INT8 with int8 input/output (scale/zero-point in the manifest).")] = _D.int8_io,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: the model's folder).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing artifacts and manifests.")] = _D.force,
    data: DataOption = None,
    fit: FitOption = None,
    strict: StrictOption = False,
    opset: Annotated[int, typer.Option(help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (QDQ per-channel needs "
                                            f"{MIN_OPSET}; tf2onnx 1.17 writes up to {MAX_OPSET}).")] = _D.opset,
    target: Annotated[str, typer.Option(
        "--target", help=f"CPU the ONNX INT8 file is made for: {', '.join(TARGET_CHOICES)}. x86-vnni: u8s8; "
                         "x86-avx2 (x86 without VNNI): u8s8-rr7 (7-bit weights, no VPMADDUBSW saturation); arm64: "
                         "s8s8; host: one of these for this CPU. The scheme is in the file name "
                         "(<stem>_int8_<scheme>.onnx).")] = _D.scheme.target,
    onnx_activation_type: Annotated[Optional[str], typer.Option(
        help="ONNX INT8 activation type, uint8 or int8, overriding --target host's choice (uint8 on x86, int8 "
             "on arm64).", show_default=False)] = _D.scheme.activation_type,
    onnx_reduce_range: Annotated[Optional[bool], typer.Option(
        "--onnx-reduce-range/--no-onnx-reduce-range",
        help="ONNX INT8 weights in 7 bits, overriding --target host's choice (on for x86 CPUs without VNNI, "
             "where 8-bit weights saturate ONNX Runtime's VPMADDUBSW kernels). Never with int8 activations.",
        show_default=False)] = _D.scheme.reduce_range,
    calib_samples: Annotated[int, typer.Option(help="Calibration images (class-balanced, from the training split).")] = _D.calibration.samples,
    calib_seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = _D.calibration.seed,
    calib_method: Annotated[str, typer.Option(help="ONNX calibration: minmax, entropy or percentile.")] = _D.calibration.method,
    parity_samples: Annotated[int, typer.Option(help="Test images each artifact's parity with the float model is "
                                                     "checked on.")] = _D.parity_samples,
    fp32_tolerance: Annotated[float, typer.Option(help="FP32 max |logit diff| allowed, relative to the logit scale.")] = _D.fp32_tolerance,
    accuracy_aware: Annotated[bool, typer.Option("--accuracy-aware", help=(
        "INT8 chosen on evidence: a tuning split of training images scores a time-bounded calibration search, "
        "then the layers that lose most stay float until --int8-max-drop holds."))] = _D.search.accuracy_aware,
    int8_max_drop: Annotated[Optional[float], typer.Option(help=(
        "Tuning-split top-1 (pp) an INT8 file may lose against the float model; implies --accuracy-aware. "
        "Default with --accuracy-aware: 0.10."), show_default=False)] = _D.search.max_drop,
    tuning_samples: Annotated[int, typer.Option(help="Accuracy-aware INT8 / --analyze: class-balanced training "
                                                     "images in the tuning split (disjoint from calibration).")] = _D.search.tuning_samples,
    tuning_seed: Annotated[int, typer.Option(help="Seed of the tuning split.")] = _D.search.tuning_seed,
    search_time: Annotated[float, typer.Option(help="Seconds per INT8 file for the calibration search and the "
                                                    "float fallback (the first try always runs).")] = _D.search.search_time,
    search_calib_samples: Annotated[str, typer.Option(help="Calibration sizes the search tries beside "
                                                           "--calib-samples, comma-separated.")] = ",".join(
        str(n) for n in _D.search.search_calib_samples),
    int8_max_float_layers: Annotated[int, typer.Option(help="The fallback tries at most this many layers in float.")] = _D.search.max_float_layers,
    int8_float_layers: Annotated[Optional[str], typer.Option(help=(
        "Keras layers to keep in float in the INT8 files, comma-separated (names as --analyze prints them)."),
        show_default=False)] = None,
    analyze: Annotated[bool, typer.Option("--analyze", help=(
        "Per-layer INT8 error analysis (TFLite QuantizationDebugger, ONNX Runtime qdq_loss_debug): prints the "
        "layers ranked by error and writes the table into the manifest (int8_accuracy.analysis)."))] = _D.search.analyze,
    analysis_samples: Annotated[int, typer.Option(help="Tuning-split images the per-layer analysis runs on.")] = _D.search.analysis_samples,
    qat_epochs: Annotated[int, typer.Option(help="Quantization-aware fine-tuning epochs (tfmot); adds <stem>_int8_qat.tflite.")] = _D.qat.epochs,
    qat_samples: Annotated[int, typer.Option(help="Training images used for QAT fine-tuning.")] = _D.qat.samples,
    qat_lr: Annotated[float, typer.Option(help="QAT learning rate (Adam; low, so the fine-tuning stays near the float model).")] = _D.qat.learning_rate,
    input_range: Annotated[Optional[str], typer.Option(help="Models without metadata: input range 0-255 or 0-1.", show_default=False)] = None,
    mean: Annotated[Optional[str], typer.Option(help="Models without metadata: per-channel mean R,G,B in pixel units.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option(help="Models without metadata: per-channel std R,G,B in pixel units.", show_default=False)] = None,
    trust_model: Annotated[bool, typer.Option("--trust-model", help=(
        "Run a SavedModel whose serving function has ops beyond pure tensor math (file I/O, printing, "
        "Python); refused by default because a SavedModel is a program."))] = _D.trust_model,
    validate_samples: Annotated[Optional[int], typer.Option(hidden=True, help="Deprecated: --parity-samples.")] = None,
    val_samples: Annotated[Optional[int], typer.Option(hidden=True, help="Deprecated: --tuning-samples.")] = None,
    val_seed: Annotated[Optional[int], typer.Option(hidden=True, help="Deprecated: --tuning-seed.")] = None,
) -> None:
    """Convert a float Keras model to TFLite/ONNX artifacts, check each against it, and write manifests."""
    quiet_frameworks()
    from resnet_deploy.converters.export import export_model
    from resnet_deploy.converters.options import (CalibrationOptions, Int8SearchOptions, QatOptions, SchemeOptions,
                                                  parse_formats)
    from resnet_deploy.fileio import output_lock
    from resnet_deploy.models.pretrained import resolve_model

    model_path = resolve_model(model)
    if out is None and not Path(model).exists():  # a pretrained name: never write into the package
        out = Path("artifacts") / model
    options = ExportOptions(  # validated here, before any model or data is read
        formats=parse_formats(formats), fp16=fp16, int8=int8, dynamic_int8=dynamic_int8, int8_io=int8_io,
        out_dir=out, force=force, opset=opset, fp32_tolerance=fp32_tolerance, trust_model=trust_model,
        parity_samples=deprecated("--validate-samples", "--parity-samples", validate_samples, parity_samples),
        preprocessing=parse_preprocessing(input_range, mean, std),
        scheme=SchemeOptions(target, onnx_activation_type, onnx_reduce_range),  # None: the target's
        calibration=CalibrationOptions(calib_samples, calib_seed, calib_method, _D.calibration.per_channel),
        search=Int8SearchOptions(
            accuracy_aware=accuracy_aware, max_drop=int8_max_drop, search_time=search_time,
            tuning_samples=deprecated("--val-samples", "--tuning-samples", val_samples, tuning_samples),
            tuning_seed=deprecated("--val-seed", "--tuning-seed", val_seed, tuning_seed),
            search_calib_samples=parse_counts(search_calib_samples), max_float_layers=int8_max_float_layers,
            float_layers=tuple(n.strip() for n in (int8_float_layers or "").split(",") if n.strip()),
            analyze=analyze, analysis_samples=analysis_samples),
        qat=QatOptions(qat_epochs, qat_samples, qat_lr, _D.qat.batch_size))
    source = folder_data(data, fit, strict)  # --fit/--strict: checked before any model or image is read
    from rich.console import Console

    console = Console()
    t0 = time.perf_counter()
    out_dir = options.out_dir or model_path.resolve().parent
    with output_lock(out_dir, "resnet-deploy export"), console.status("exporting") as status:
        artifacts = export_model(model_path, options, data=source,
                                 progress=lambda m: (console.print(m, highlight=False), status.update(m)))
    _print_table(console, artifacts, time.perf_counter() - t0)
    for a in artifacts:
        if a.manifest.int8_accuracy:
            _print_int8_accuracy(console, a)


def _print_table(console, artifacts, seconds: float) -> None:
    """The figures a person reads first, in 80 columns; the manifests hold the rest."""
    from rich import box
    from rich.table import Table

    p0 = artifacts[0].manifest.parity
    int_io = any(a.manifest.input.scale is not None for a in artifacts)
    table = Table(title=f"exported {len(artifacts)} artifacts in {seconds:.0f} s (checked on {p0.samples} test "
                        "images)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("artifact", no_wrap=True, overflow="fold")
    for col in ("MB", "max|d|", "mean|d|", "agree", "top-1") + (("input",) if int_io else ()):
        table.add_column(col, justify="right", no_wrap=True)
    for a in artifacts:
        m, p = a.manifest, a.manifest.parity
        row = [a.path.name, f"{m.size_bytes / 1e6:.2f}", f"{p.max_abs_diff:.2g}", f"{p.mean_abs_diff:.2g}",
               f"{p.top1_agreement:.1%}", f"{p.top1_accuracy:.1%}"]
        if int_io:
            row.append(m.input.dtype + (f" {m.input.scale:.3g},{m.input.zero_point}" if m.input.scale is not None else ""))
        table.add_row(*row)
    console.print(table)
    console.print(f"max|d|, mean|d|: |{p0.unit} - float {p0.unit}|; agree: top-1 agreement with the float model; "
                  f"top-1: accuracy on the same images (float model: {p0.float_top1_accuracy:.1%}); MB = 10^6 bytes; "
                  "conversion times and the rest: <artifact>.json", highlight=False)
    for a in artifacts:
        cal = a.manifest.int8_calibration
        if a.manifest.format == "onnx" and cal is not None and cal.scheme:
            how = "host -> " if cal.requested_target == "host" else ""
            console.print(f"{a.path.name}: made for {how}{cal.target} ({cal.scheme}: {cal.activation_type} "
                          f"activations, {'7' if cal.reduce_range else '8'}-bit weights)", highlight=False)
    note = artifacts[0].manifest.model_output.get("note")
    if note:
        console.print(f"[bold yellow]{note}[/bold yellow]", highlight=False)


def _print_int8_accuracy(console, artifact, top: int = 8) -> None:
    """The accuracy-aware INT8 summary and the most sensitive layers of one INT8 artifact."""
    from rich.table import Table

    rec, check = artifact.manifest.int8_record, artifact.manifest.parity
    console.print(f"[bold]{artifact.path.name}[/bold]: tuning split {rec.validation['samples']} training images "
                  f"(indices {rec.validation['indices_sha256_16']}), calibration indices "
                  f"{rec.calibration_indices_sha256_16}, disjoint: {rec.disjoint}", highlight=False)
    if rec.searched:
        w, fb = rec.search.winner, rec.fallback
        from resnet_deploy.converters.int8_search import _describe

        act = ", 16x8 (int16 activations)" if w.get("activations") == "int16" else ""
        console.print(f"  search: {len(rec.search.tries)} tries ({rec.search.stopped}); winner: {w['calib_samples']} "
                      f"calibration images, {w['method']}, {'per-channel' if w['per_channel'] else 'per-tensor'}{act} "
                      f"(tuning agreement {w['val_agreement']:.2%}); float layers: "
                      f"{', '.join(fb.float_layers) or 'none'}", highlight=False)
        for i, t in enumerate(rec.search.tries, 1):  # each try with its intervals (top-1 change, KL reduction)
            console.print(f"    try {i} ({t.phase}): {_describe(t)}", highlight=False, soft_wrap=True)
        if fb.latency:
            lat = fb.latency
            console.print(f"  latency cost of the fallback's float layers (batch 1, 1 thread): "
                          f"{lat['before_fallback_ms']:.3g} -> {lat['after_fallback_ms']:.3g} ms ({lat['ratio']:.2f}x)",
                          highlight=False)
        style = "green" if rec.result.met_budget else "bold red"
        console.print(f"  [{style}]{rec.result.note}[/{style}]; test: top-1 {check.top1_accuracy:.1%}, agreement "
                      f"{check.top1_agreement:.1%} on {check.samples} images", highlight=False)
    ana = rec.analysis
    table = Table(title=f"most sensitive layers ({ana.score}; {ana.images})")
    for col in ("rank", "layer", "op", "score"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left", no_wrap=True)
    for r in ana.layers[:top]:
        table.add_row(str(r["rank"]), str(r["layer"] or r["node"]), r["op"], f"{r['score']:.4g}")
    console.print(table)
