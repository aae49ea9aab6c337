"""`resnet-deploy export MODEL`: parse options, build ``ExportOptions``, call ``export_model``, print a table.

Cheap to import: no framework is imported until the command runs.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Optional

import typer

from resnet_deploy.cli_common import DataOption, quiet_frameworks
from resnet_deploy.converters.onnx_rules import DEFAULT_OPSET, MAX_OPSET, MIN_OPSET, TARGET_CHOICES
from resnet_deploy.errors import ExportError


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
    formats: Annotated[str, typer.Option(help="Targets, comma-separated: tflite, onnx.")] = "tflite,onnx",
    fp16: Annotated[bool, typer.Option("--fp16", help="Also write FP16 artifacts (TFLite float16 weights; ONNX float16, float I/O).")] = False,
    int8: Annotated[bool, typer.Option("--int8", help="Also write full-integer INT8 (TFLite) and QDQ INT8 (ONNX Runtime static quantization).")] = False,
    dynamic_int8: Annotated[bool, typer.Option("--dynamic-int8", help="Also write TFLite dynamic-range INT8 (int8 weights, float activations).")] = False,
    int8_io: Annotated[bool, typer.Option("--int8-io", help="TFLite INT8 with int8 input/output (scale/zero-point in the manifest).")] = False,
    out: Annotated[Optional[Path], typer.Option("--out", help="Output folder (default: the model's folder).", show_default=False)] = None,
    force: Annotated[bool, typer.Option("--force", help="Overwrite existing artifacts and manifests.")] = False,
    data: DataOption = None,
    opset: Annotated[int, typer.Option(help=f"ONNX opset, {MIN_OPSET} to {MAX_OPSET} (QDQ per-channel needs "
                                            f"{MIN_OPSET}; tf2onnx 1.17 writes up to {MAX_OPSET}).")] = DEFAULT_OPSET,
    target: Annotated[str, typer.Option(
        "--target", help=f"CPU the ONNX INT8 file is made for: {', '.join(TARGET_CHOICES)}. x86-vnni: u8s8; "
                         "x86-avx2 (x86 without VNNI): u8s8-rr7 (7-bit weights, no VPMADDUBSW saturation); arm64: "
                         "s8s8; host: one of these for this CPU. The scheme is in the file name "
                         "(<stem>_int8_<scheme>.onnx).")] = "host",
    onnx_activation_type: Annotated[Optional[str], typer.Option(
        help="ONNX INT8 activation type, uint8 or int8, overriding --target host's choice (uint8 on x86, int8 "
             "on arm64).", show_default=False)] = None,
    onnx_reduce_range: Annotated[Optional[bool], typer.Option(
        "--onnx-reduce-range/--no-onnx-reduce-range",
        help="ONNX INT8 weights in 7 bits, overriding --target host's choice (on for x86 CPUs without VNNI, "
             "where 8-bit weights saturate ONNX Runtime's VPMADDUBSW kernels). Never with int8 activations.",
        show_default=False)] = None,
    calib_samples: Annotated[int, typer.Option(help="Calibration images (class-balanced, from the training split).")] = 300,
    calib_seed: Annotated[int, typer.Option(help="Seed of the calibration sample.")] = 0,
    calib_method: Annotated[str, typer.Option(help="ONNX calibration: minmax, entropy or percentile.")] = "minmax",
    validate_samples: Annotated[int, typer.Option(help="Test images each artifact is checked on against the float model.")] = 256,
    fp32_tolerance: Annotated[float, typer.Option(help="FP32 max |logit diff| allowed, relative to the logit scale.")] = 1e-3,
    accuracy_aware: Annotated[bool, typer.Option("--accuracy-aware", help=(
        "INT8 chosen on evidence: a validation split of training images scores a time-bounded calibration search, "
        "then the layers that lose most stay float until --int8-max-drop holds."))] = False,
    int8_max_drop: Annotated[Optional[float], typer.Option(help=(
        "Validation top-1 (pp) an INT8 file may lose against the float model; implies --accuracy-aware. "
        "Default with --accuracy-aware: 0.10."), show_default=False)] = None,
    val_samples: Annotated[int, typer.Option(help="Accuracy-aware INT8 / --analyze: class-balanced training images "
                                                  "in the validation split (disjoint from calibration).")] = 5000,
    val_seed: Annotated[int, typer.Option(help="Seed of the validation split.")] = 0,
    search_time: Annotated[float, typer.Option(help="Seconds per INT8 file for the calibration search and the "
                                                    "float fallback (the first try always runs).")] = 600.0,
    search_calib_samples: Annotated[str, typer.Option(help="Calibration sizes the search tries beside "
                                                           "--calib-samples, comma-separated.")] = "1000",
    int8_max_float_layers: Annotated[int, typer.Option(help="The fallback tries at most this many layers in float.")] = 8,
    int8_float_layers: Annotated[Optional[str], typer.Option(help=(
        "Keras layers to keep in float in the INT8 files, comma-separated (names as --analyze prints them)."),
        show_default=False)] = None,
    analyze: Annotated[bool, typer.Option("--analyze", help=(
        "Per-layer INT8 error analysis (TFLite QuantizationDebugger, ONNX Runtime qdq_loss_debug): prints the "
        "layers ranked by error and writes the table into the manifest (int8_accuracy.analysis)."))] = False,
    analysis_samples: Annotated[int, typer.Option(help="Validation images the per-layer analysis runs on.")] = 200,
    qat_epochs: Annotated[int, typer.Option(help="Quantization-aware fine-tuning epochs (tfmot); adds <stem>_int8_qat.tflite.")] = 0,
    qat_samples: Annotated[int, typer.Option(help="Training images used for QAT fine-tuning.")] = 2000,
    qat_lr: Annotated[float, typer.Option(help="QAT learning rate (Adam; low, so the fine-tuning stays near the float model).")] = 1e-5,
    input_range: Annotated[Optional[str], typer.Option(help="Models without metadata: input range 0-255 or 0-1.", show_default=False)] = None,
    mean: Annotated[Optional[str], typer.Option(help="Models without metadata: per-channel mean R,G,B in pixel units.", show_default=False)] = None,
    std: Annotated[Optional[str], typer.Option(help="Models without metadata: per-channel std R,G,B in pixel units.", show_default=False)] = None,
    trust_model: Annotated[bool, typer.Option("--trust-model", help=(
        "Run a SavedModel whose serving function has ops beyond pure tensor math (file I/O, printing, "
        "Python); refused by default because a SavedModel is a program."))] = False,
) -> None:
    """Convert a float Keras model to TFLite/ONNX artifacts, validate each against it, and write manifests."""
    quiet_frameworks()
    from resnet_deploy.converters.options import ExportOptions, parse_formats
    from resnet_deploy.converters.export import export_model
    from resnet_deploy.fileio import output_lock
    from resnet_deploy.models.pretrained import resolve_model

    model_path = resolve_model(model)
    if out is None and not Path(model).exists():  # a pretrained name: never write into the package
        out = Path("artifacts") / model
    options = ExportOptions(  # validated here, before any model or data is read
        formats=parse_formats(formats), fp16=fp16, int8=int8, dynamic_int8=dynamic_int8, int8_io=int8_io,
        out_dir=out, force=force, opset=opset,
        int8_target=target, onnx_activation_type=onnx_activation_type,
        onnx_reduce_range=onnx_reduce_range,  # None: the target's
        calib_samples=calib_samples, calib_seed=calib_seed, calib_method=calib_method,
        validate_samples=validate_samples, fp32_tolerance=fp32_tolerance, qat_epochs=qat_epochs,
        qat_samples=qat_samples, qat_learning_rate=qat_lr, preprocessing=parse_preprocessing(input_range, mean, std),
        accuracy_aware=accuracy_aware, int8_max_drop=int8_max_drop, val_samples=val_samples, val_seed=val_seed,
        search_time=search_time, search_calib_samples=parse_counts(search_calib_samples),
        int8_max_float_layers=int8_max_float_layers, analyze=analyze, analysis_samples=analysis_samples,
        int8_float_layers=tuple(n.strip() for n in (int8_float_layers or "").split(",") if n.strip()),
        trust_model=trust_model)
    from rich.console import Console

    console = Console()
    t0 = time.perf_counter()
    out_dir = options.out_dir or model_path.resolve().parent
    with output_lock(out_dir, "resnet-deploy export"), console.status("exporting") as status:
        artifacts = export_model(model_path, options, data=data,
                                 progress=lambda m: (console.print(m, highlight=False), status.update(m)))
    _print_table(console, artifacts, time.perf_counter() - t0)
    for a in artifacts:
        if a.manifest.int8_accuracy:
            _print_int8_accuracy(console, a)


def _print_table(console, artifacts, seconds: float) -> None:
    """The figures a person reads first, in 80 columns; the manifests hold the rest."""
    from rich import box
    from rich.table import Table

    v0 = artifacts[0].manifest.validation
    unit = "prob" if v0.get("output") == "probabilities" else "logit"
    int_io = any(a.manifest.input.scale is not None for a in artifacts)
    table = Table(title=f"exported {len(artifacts)} artifacts in {seconds:.0f} s (checked on {v0['samples']} test "
                        "images)", box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    table.add_column("artifact", no_wrap=True, overflow="fold")
    for col in ("MB", "max|d|", "mean|d|", "agree", "top-1") + (("input",) if int_io else ()):
        table.add_column(col, justify="right", no_wrap=True)
    for a in artifacts:
        m, v = a.manifest, a.manifest.validation
        row = [a.path.name, f"{m.size_bytes / 1e6:.2f}", f"{v[f'max_abs_{unit}_diff']:.2g}",
               f"{v[f'mean_abs_{unit}_diff']:.2g}", f"{v['top1_agreement']:.1%}", f"{v['top1_accuracy']:.1%}"]
        if int_io:
            row.append(m.input.dtype + (f" {m.input.scale:.3g},{m.input.zero_point}" if m.input.scale is not None else ""))
        table.add_row(*row)
    console.print(table)
    console.print(f"max|d|, mean|d|: |{unit} - float {unit}|; agree: top-1 agreement with the float model; top-1: "
                  f"accuracy on the same images (float model: {v0['float_top1_accuracy']:.1%}); MB = 10^6 bytes; "
                  "conversion times and the rest: <artifact>.json", highlight=False)
    for a in artifacts:
        cal = a.manifest.calibration or {}
        if a.manifest.format == "onnx" and cal.get("scheme"):
            how = "host -> " if cal.get("requested_target") == "host" else ""
            console.print(f"{a.path.name}: made for {how}{cal['target']} ({cal['scheme']}: {cal['activation_type']} "
                          f"activations, {'7' if cal['reduce_range'] else '8'}-bit weights)", highlight=False)
    note = (artifacts[0].manifest.options.get("model_output") or {}).get("note")
    if note:
        console.print(f"[bold yellow]{note}[/bold yellow]", highlight=False)


def _print_int8_accuracy(console, artifact, top: int = 8) -> None:
    """The accuracy-aware INT8 summary and the most sensitive layers of one INT8 artifact."""
    from rich.table import Table

    rec = artifact.manifest.int8_accuracy
    val = rec["validation"]
    console.print(f"[bold]{artifact.path.name}[/bold]: validation split {val['samples']} training images "
                  f"(indices {val['indices_sha256_16']}), calibration indices {rec['calibration_indices_sha256_16']}, "
                  f"disjoint: {rec['disjoint']}", highlight=False)
    if "result" in rec:
        res, search, fb = rec["result"], rec["search"], rec["fallback"]
        w = search["winner"]
        console.print(f"  search: {len(search['tries'])} tries ({search['stopped']}); winner: {w['calib_samples']} "
                      f"calibration images, {w['method']}, {'per-channel' if w['per_channel'] else 'per-tensor'} "
                      f"(validation agreement {w['val_agreement']:.2%}); float layers: "
                      f"{', '.join(fb['float_layers']) or 'none'}", highlight=False)
        if fb.get("latency"):
            lat = fb["latency"]
            console.print(f"  latency cost of the fallback's float layers (batch 1, 1 thread): "
                          f"{lat['before_fallback_ms']:.3g} -> {lat['after_fallback_ms']:.3g} ms ({lat['ratio']:.2f}x)",
                          highlight=False)
        style = "green" if res["met_budget"] else "bold red"
        console.print(f"  [{style}]{res['note']}[/{style}]; test: top-1 {artifact.manifest.validation['top1_accuracy']:.1%}"
                      f", agreement {artifact.manifest.validation['top1_agreement']:.1%} on "
                      f"{artifact.manifest.validation['samples']} images", highlight=False)
    ana = rec["analysis"]
    table = Table(title=f"most sensitive layers ({ana['score']}; {ana['images']})")
    for col in ("rank", "layer", "op", "score"):
        table.add_column(col, justify="right" if col in ("rank", "score") else "left", no_wrap=True)
    for r in ana["layers"][:top]:
        table.add_row(str(r["rank"]), str(r["layer"] or r["node"]), r["op"], f"{r['score']:.4g}")
    console.print(table)
