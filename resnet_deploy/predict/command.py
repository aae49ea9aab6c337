"""`resnet-deploy predict ARTIFACT IMAGE...`: top-k classes of images with any artifact.

Thin: parses options, calls ``classify``, prints a line per image (or JSON with ``--json``). Inputs
that cannot be read get an error each and the rest still run; the exit code is then 2 (as bench's
for a file it cannot measure). No framework is imported at module level (the model runs in a child
process, ``untrusted.run_model``). Every string that came from a file (class names, file names, the
manifest's precision) is escaped before it reaches the terminal (``terminal.safe``); ``--json`` keeps
the exact strings (``json.dumps`` escapes control characters itself).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, List, Optional

import typer

from resnet_deploy.cli_common import quiet_frameworks


def predict(
    artifact: Annotated[Path, typer.Argument(
        metavar="ARTIFACT", show_default=False,
        help="A .tflite or .onnx artifact from export (with its <file>.json manifest), a .keras model, or a "
             "pretrained model's name (resnet-deploy models --pretrained).")],
    images: Annotated[List[Path], typer.Argument(
        metavar="IMAGE", show_default=False,
        help="PNG/JPEG files of any size, folders of them, or .npz files (x: N,H,W,3 uint8; optional y).")],
    top_k: Annotated[int, typer.Option("--top-k", "-k", help="Classes shown per image, most likely first.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON document on stdout (for scripts).")] = False,
    fit: Annotated[Optional[str], typer.Option(
        help="Non-square images: crop (the centred square) or stretch (the whole image). Then "
             "32x32: box filter when shrinking, bicubic when enlarging. Default: the policy the artifact's "
             "manifest declares (an image-folder export), else crop.", show_default=False)] = None,
    limit: Annotated[Optional[int], typer.Option(help="Use only the first N images of each .npz.",
                                                 show_default=False)] = None,
    batch_size: Annotated[int, typer.Option(help="Images per inference call.")] = 256,
    threads: Annotated[Optional[int], typer.Option(help="Runtime threads. Default: the runtime's own.",
                                                   show_default=False)] = None,
    runtime: Annotated[Optional[str], typer.Option(
        help="The runtime to run the artifact in. Default: its format's own (keras, litert, onnxruntime); "
             "an .onnx file also runs in openvino.", show_default=False)] = None,
    max_memory: Annotated[str, typer.Option(
        "--max-memory", help="Memory cap of the process that loads and runs the artifact (binary units: "
                             "512M, 2G); also bounds image decoding (1/16 of it, at most 40 megapixels an "
                             "image) and .npz inputs (1/4 of it).")] = "2G",
    timeout: Annotated[float, typer.Option(
        "--timeout", help="Seconds the artifact's process may go without progress (start-up included) "
                          "before it is stopped.")] = 300.0,
) -> None:
    """Classify images with an artifact: top-k classes, names and probabilities; accuracy for an .npz
    with labels. Exit code 2 when an input or the artifact could not be used."""
    quiet_frameworks()
    from resnet_deploy.predict.core import classify
    from resnet_deploy.predict.images import PredictError
    from resnet_deploy.terminal import safe, safe_lines
    from resnet_deploy.untrusted import parse_memory

    result = classify(artifact, images, top_k=top_k, fit=fit, limit=limit, batch_size=batch_size, threads=threads,
                      runtime=runtime, max_memory=parse_memory(max_memory), timeout_s=timeout)
    if as_json:
        print(json.dumps(result.to_dict(), indent=2))
    else:
        print_result(result)
    for e in result.inputs.errors:  # one message per input, on stderr
        _eprint(f"error: {safe_lines(e.error.render())}")
    for note in result.inputs.notes:
        _eprint(f"note: {safe(note)}")
    failed = result.inputs.errors
    if failed:
        names = ", ".join(safe(e.input) for e in failed[:5]) + (f" and {len(failed) - 5} more" if len(failed) > 5
                                                                 else "")
        raise PredictError(f"{len(failed)} of {len(failed) + _files(result)} input(s) could not be used: {names}.",
                           expected="PNG or JPEG images, folders of them, or .npz files",
                           fix="see the error lines above; the other inputs' predictions are printed")
    if not len(result.inputs):
        raise PredictError("No image to classify.", expected="at least one image, a folder with images or an .npz",
                           fix="check the paths; folders are read one level deep")


def _eprint(text: str) -> None:
    """Print on stderr, each line wrapped to the terminal's width (continuations indented)."""
    import shutil
    import textwrap

    width = max(shutil.get_terminal_size().columns, 40)
    for line in text.splitlines():
        print(textwrap.fill(line, width, subsequent_indent="  ", break_on_hyphens=False), file=sys.stderr)


def _pack(cells: list[str], width: int, indent: str) -> list[str]:
    """Cells on lines of at most ``width`` characters (after ``indent``), two spaces apart, never split."""
    lines, cur = [], ""
    for cell in cells:
        if cur and len(cur) + 2 + len(cell) > width:
            lines.append(indent + cur)
            cur = cell
        else:
            cur = f"{cur}  {cell}" if cur else cell
    return lines + [indent + cur] if cur else lines


def _files(result) -> int:
    return len(set(result.inputs.sources))


def print_result(result) -> None:
    """The text report; every string from a file (class names, input names, the manifest's precision, the
    artifact's name) goes through ``terminal.safe``."""
    import shutil

    from resnet_deploy.terminal import safe

    a = result.artifact
    names = [safe(n) for n in a.class_names]
    what = " ".join(safe(x) for x in (a.format, a.precision) if x)
    print(f"{safe(a.path.name)} ({what}, {result.runtime or 'not run'}): top-{result.top_k} of {len(names)} classes")
    print(f"  probabilities: {result.scores}")
    print(f"  resize: {result.resize_method}")
    if a.sidecar is None:
        print("  no manifest beside the artifact: pixels 0..255 and CIFAR-10 class names assumed")
    if not len(result.inputs):
        return
    columns = shutil.get_terminal_size().columns
    shown_names = [safe(n) for n in result.inputs.names]
    width = min(max(len(n) for n in shown_names), 28)
    for i, name in enumerate(shown_names):
        shown = name if len(name) <= width else "…" + name[-(width - 1):]
        cells = [f"{names[c]} {result.probabilities[i, c]:.1%}" for c in result.top[i]]
        label = int(result.inputs.labels[i])
        mark = "" if label < 0 else ("  ok" if result.top[i, 0] == label else f"  wrong, is {names[label]}")
        line = f"{shown:<{width}}  {'  '.join(cells)}{mark}"
        if len(line) > columns:  # too wide (long names, a large --top-k): the name, then classes indented
            line = "\n".join([name + mark, *_pack(cells, columns - 4, indent="    ")])
        print(line)
    for acc in result.accuracy:
        print(f"accuracy on {safe(acc['source'])}: top-1 {acc['top1']:.2%} "
              f"({acc['top1_correct']:,}/{acc['images']:,}), "
              f"top-{acc['k']} {acc['topk']:.2%} ({acc['topk_correct']:,}/{acc['images']:,})")
