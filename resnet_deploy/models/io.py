"""Saving and loading float models with the metadata that travels beside them.

``model.keras`` gets a sidecar ``model.keras.json`` (architecture, input convention,
preprocessing, class names, and whatever the trainer adds: accuracy, recipe, device...).
``.keras`` and ``.h5`` files are loaded with Keras' safe mode (a ``Lambda`` layer's pickled Python is
refused). A SavedModel folder is not a Keras file and safe mode does not apply: it is read with
``tf.saved_model.load`` (through ``keras.layers.TFSMLayer``), which runs no Python from the folder but
does run its TensorFlow graph as stored, so only load SavedModels you trust.
"""

from __future__ import annotations

import os
from pathlib import Path

from resnet_deploy.data.constants import CLASS_NAMES, IMAGE_SHAPE, NUM_CLASSES
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.errors import ModelError
from resnet_deploy.fileio import check_can_write, sidecar_path, staged, write_json

INPUT_CONVENTION = "float32 RGB pixels 0..255, NHWC (normalisation is inside the model)"


def base_metadata(arch: str, width: float = 1.0, stem: str = "cifar",
                  preprocessing: Preprocessing | None = None) -> dict:
    return {
        "architecture": arch,
        "width": width,
        "stem": stem,
        "input_shape": list(IMAGE_SHAPE),
        "input_convention": INPUT_CONVENTION,
        "preprocessing": (preprocessing or Preprocessing.pixels()).to_dict(),
        "output": "logits (no softmax)",
        "class_names": list(CLASS_NAMES),
    }


def save_model(model, path: str | os.PathLike, metadata: dict | None = None, force: bool = False) -> Path:
    """Write ``model`` to ``path`` (.keras) and its metadata sidecar, committed together
    (``fileio.Stage``: staged, fsynced, the sidecar in place before the model takes its name)."""
    path = Path(path)
    if path.suffix != ".keras":
        raise ModelError(f"Cannot save a model to {path}.", expected="a path ending in .keras")
    check_can_write(path, force, "model")
    side = sidecar_path(path)
    with staged(path.parent) as stage:
        model.save(stage.path(path.name))
        if metadata is not None:
            write_json(stage.path(side.name), metadata)
            stage.commit(path.name, side.name)
        else:
            stage.commit(path.name)
    return path


def read_metadata(path: str | os.PathLike) -> dict | None:
    """The model's metadata sidecar, or None when it has none. Read as untrusted input: a regular file of
    bounded size and depth holding a JSON object, whose fields that commands use (class names,
    preprocessing, output kind, architecture, width, stem, input shape) have the right types and finite,
    plausible numbers; anything else is a ``ModelError`` naming the file and the field."""
    from resnet_deploy.errors import UntrustedFileError
    from resnet_deploy.untrusted.files import read_json
    from resnet_deploy.untrusted.sidecar import check_fields

    side = sidecar_path(path)
    if not os.path.lexists(side):
        return None
    fix = "delete it (defaults are used) or restore it from the training run"
    try:
        meta = read_json(side, "metadata file")
        check_fields(meta, side, artifact=False)
        _check_metadata_fields(meta, side)
    except UntrustedFileError as exc:
        raise ModelError(exc.what, expected=exc.expected, fix=fix) from None
    return meta


def _check_metadata_fields(meta: dict, side: Path) -> None:
    import math

    from resnet_deploy.errors import UntrustedFileError
    from resnet_deploy.terminal import safe

    def bad(key: str, expected: str) -> UntrustedFileError:
        return UntrustedFileError(f"The metadata file {safe(side)} is unusable: {key} is "
                                  f"{safe(repr(meta[key]))[:60]}.", expected=expected)

    for key in ("architecture", "stem", "output", "input_convention"):
        if meta.get(key) is not None and not isinstance(meta[key], str):
            raise bad(key, "a string")
    width = meta.get("width")
    if width is not None and (isinstance(width, bool) or not isinstance(width, (int, float))
                              or not math.isfinite(width) or not 0 < width <= 64):
        raise bad("width", "a finite number in (0, 64]")
    shape = meta.get("input_shape")
    if shape is not None and not (isinstance(shape, list) and len(shape) <= 8 and all(
            d is None or (isinstance(d, int) and not isinstance(d, bool) and d > 0) for d in shape)):
        raise bad("input_shape", "a list of positive integers, e.g. [32, 32, 3]")


def load_model(path: str | os.PathLike, check_io: bool = True, trust: bool = False):
    """Load a float Keras model (.keras, .h5 or SavedModel folder) safely and check its I/O.

    A SavedModel is a program: unless ``trust``, its serving function's ops are checked against
    ``SAFE_OPS`` before any of it runs (``check_saved_model_ops``). The file itself is checked first
    (``check_model_file``), before Keras is imported."""
    path = Path(path)
    check_model_file(path)
    import keras

    try:
        if path.is_dir():
            model = _load_saved_model(path, check_io, trust=trust)
        else:
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
    except ModelError:
        raise
    except Exception as exc:
        raise _load_error(path, exc) from exc
    if check_io:
        check_classifier_io(model, str(path))
    return model


ARTIFACT_SUFFIXES = (".tflite", ".onnx")


def check_model_file(path: str | os.PathLike) -> None:
    """What can be said of a model path without Keras: it exists; a folder holds saved_model.pb; a file is a
    regular file with a Keras suffix, not empty, and a .keras zip is whole and no zip bomb
    (``check_keras_archive``). Raises ``ModelError``."""
    from resnet_deploy.untrusted.files import os_error

    path = Path(path)
    try:
        exists, is_dir = path.exists(), path.is_dir()
    except OSError as exc:  # a name too long for the file system
        e = os_error(path, exc, "model")
        raise ModelError(e.what, expected=e.expected, fix=e.fix) from None
    if not exists:
        raise ModelError(f"Model {path} does not exist.", fix="check the path (train writes runs/<name>/model.keras)")
    if is_dir:
        if not (path / "saved_model.pb").exists():
            raise ModelError(f"{path} is a folder without saved_model.pb.",
                             expected="a .keras file, a .h5 file or a SavedModel folder")
    elif path.suffix in (".keras", ".h5", ".hdf5"):
        _check_file_is_whole(path)
    else:
        raise _not_a_model(path)


def _not_a_model(path: Path) -> ModelError:
    if path.suffix in ARTIFACT_SUFFIXES:
        return ModelError(f"{path} is an exported artifact, not a float model.",
                          expected="the Keras model it came from (.keras, .h5 or a SavedModel folder)",
                          fix=f"export from the .keras model; to measure this file use `resnet-deploy bench {path}`")
    return ModelError(f"{path} is not a Keras model file.", expected="a .keras file, a .h5 file or a SavedModel folder")


def _check_file_is_whole(path: Path) -> None:
    """Say "empty", "truncated", "not a regular file" or "a zip bomb" for what Keras would report as "File not
    found", read as a 4 GiB string, or block on (a FIFO)."""
    import zipfile

    from resnet_deploy.errors import UntrustedFileError
    from resnet_deploy.untrusted.files import check_regular

    try:
        size = check_regular(path, "model").st_size
    except UntrustedFileError as exc:
        raise ModelError(exc.what, expected=exc.expected, fix=exc.fix) from None
    if size == 0:
        raise ModelError(f"{path} is empty (0 bytes).", expected="a model saved with model.save()",
                         fix="re-copy the file, or save the model again")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a complete .keras file ({size:,} bytes, no zip directory at its end: "
                         "a truncated copy or another format).", expected="a .keras zip written by model.save()",
                         fix="re-copy the whole file, or save the model again with model.save('model.keras')")
    if path.suffix == ".keras":
        check_keras_archive(path, size)


# What a .keras zip's members may expand to before Keras reads them into memory. A ResNet152's
# config.json is about 0.5 MB; weights compress little (a few percent), so a member that expands more
# than KERAS_MAX_RATIO times and past KERAS_RATIO_FLOOR bytes is built to exhaust memory.
KERAS_JSON_LIMIT = 64 << 20
KERAS_MAX_MEMBERS = 10_000
KERAS_MAX_RATIO = 100
KERAS_RATIO_FLOOR = 64 << 20


def check_keras_archive(path: Path, size: int) -> None:
    """Refuse a .keras zip whose directory declares a zip bomb: config.json or metadata.json over 64 MiB,
    more than 10,000 members, or a member that expands over 100 times its compressed size and past 64 MiB.
    Only the zip's directory is read (the sizes Python's zipfile then holds every read to)."""
    import zipfile

    from resnet_deploy.terminal import safe
    from resnet_deploy.untrusted.files import format_bytes

    fix = "save the model again with model.save('model.keras'); do not load a file built to exhaust memory"
    try:
        with zipfile.ZipFile(path) as zf:
            infos = zf.infolist()
    except (zipfile.BadZipFile, OSError, ValueError) as exc:
        raise ModelError(f"{safe(path)} is not a readable .keras zip: {safe(exc)}",
                         expected="a .keras zip written by model.save()", fix=fix) from None
    if len(infos) > KERAS_MAX_MEMBERS:
        raise ModelError(f"{safe(path)} holds {len(infos):,} members.", expected="a .keras zip of a few files "
                         "(config.json, metadata.json, model.weights.h5)", fix=fix)
    for info in infos:
        name = safe(info.filename)
        if info.filename.endswith(".json") and info.file_size > KERAS_JSON_LIMIT:
            raise ModelError(f"{safe(path)}: {name} expands to {format_bytes(info.file_size)} "
                             f"({info.compress_size:,} bytes in the zip).",
                             expected=f"a model description of at most {format_bytes(KERAS_JSON_LIMIT)}", fix=fix)
        if info.file_size > KERAS_RATIO_FLOOR and info.file_size > KERAS_MAX_RATIO * max(info.compress_size, 1):
            raise ModelError(f"{safe(path)}: {name} expands {info.file_size / max(info.compress_size, 1):,.0f} times, "
                             f"to {format_bytes(info.file_size)} ({info.compress_size:,} bytes in the zip).",
                             expected=f"weights that compress little (at most {KERAS_MAX_RATIO} times)", fix=fix)
    if sum(i.file_size for i in infos) > 1 << 40:
        raise ModelError(f"{safe(path)} declares more than 1 TiB of contents.", expected="a .keras model", fix=fix)


def _load_error(path: Path, exc: Exception) -> ModelError:
    import re

    text = str(exc)
    custom = re.search(r"(?:Could not locate (?:class|function)|Unknown layer:?)\s*'?([\w.]+)'?", text)
    if custom:
        return ModelError(f"{path} uses {custom.group(1)!r}, a custom class Keras cannot find "
                          f"({type(exc).__name__}).", expected="a model built from Keras' own layers",
                          fix=f"register {custom.group(1)} with @keras.saving.register_keras_serializable and import "
                              "it before loading, or rebuild the model from built-in layers")
    return ModelError(f"Could not load {path} as a Keras model: {type(exc).__name__}: {text[:400]}",
                      expected="a complete .keras/.h5 file or SavedModel folder written by Keras",
                      fix="check that the file is not truncated; re-save it with model.save('model.keras')")


def _load_saved_model(path: Path, check_io: bool = True, endpoint: str = "serving_default", trust: bool = False):
    """A Keras model wrapping a SavedModel's serving signature (``TFSMLayer``). The signature's input is
    read first, so a SavedModel for other images fails with the same "takes inputs of shape" error as the
    other formats instead of an error from inside the wrapped graph."""
    import keras

    if not (trust or os.environ.get("RESNET_DEPLOY_TRUST_MODEL") == "1"):
        check_saved_model_ops(path, endpoint)  # before anything of it runs
    layer = keras.layers.TFSMLayer(str(path), call_endpoint=endpoint)
    args, kwargs = layer.call_endpoint_fn.structured_input_signature
    specs = [*args, *kwargs.values()]
    outputs = layer.call_endpoint_fn.structured_outputs
    n_out = len(outputs) if isinstance(outputs, (dict, list, tuple)) else 1
    if len(specs) != 1 or n_out != 1:
        raise ModelError(f"{path}'s {endpoint!r} signature has {len(specs)} inputs and {n_out} outputs.",
                         expected="one image input and one logits output",
                         fix="export the SavedModel from a single-input, single-output classifier")
    spec = specs[0]
    dims = tuple(spec.shape)[1:] if spec.shape.rank is not None else None
    fits = dims is not None and len(dims) == len(IMAGE_SHAPE) and all(d in (None, e) for d, e in zip(dims, IMAGE_SHAPE))
    if check_io and not fits:
        raise ModelError(f"{path} takes inputs of shape {dims if dims is not None else '(unknown rank)'} "
                         f"(its {endpoint!r} signature).", expected=f"CIFAR-10 images {IMAGE_SHAPE}",
                         fix="use a model built for 32x32 RGB images")
    if check_io and spec.dtype.name != "float32":
        raise ModelError(f"{path} takes {spec.dtype.name} inputs (its {endpoint!r} signature).",
                         expected="float32 images", fix="export the SavedModel with a float32 input")
    # a signature with dynamic height/width is used at 32x32
    inp = keras.Input(IMAGE_SHAPE if fits else dims, name="image")
    out = layer(inp)
    if isinstance(out, dict):
        out = next(iter(out.values()))
    elif isinstance(out, (list, tuple)):
        out = out[0]
    return keras.Model(inp, out, name=path.name)


# Pure tensor ops a classifier's serving function may contain. Anything else (file I/O, printing,
# Python callbacks, queues, network, random-access to the host) is refused unless the user trusts the model.
SAFE_OPS = frozenset("""
    Abs Add AddN AddV2 ArgMax ArgMin AvgPool AvgPool3D BatchMatMul BatchMatMulV2 BatchMatMulV3 BiasAdd
    BroadcastArgs BroadcastTo Cast Ceil ClipByValue ConcatV2 Const Conv2D Conv3D Cos Cumsum
    DepthwiseConv2dNative DisableCopyOnRead Div DivNoNan Einsum Elu Equal Erf Exp ExpandDims Fill Floor
    FloorDiv FloorMod FusedBatchNorm FusedBatchNormV3 GatherV2 Greater GreaterEqual Identity IdentityN
    L2Loss LeakyRelu Less LessEqual Log Log1p LogSoftmax LogicalAnd LogicalNot LogicalOr MatMul Max
    MaxPool MaxPool3D MaxPoolV2 Maximum Mean Min Minimum MirrorPad Mul Neg NoOp NotEqual OnesLike Pack
    Pad PadV2 PartitionedCall Placeholder Pow Prod Range Rank ReadVariableOp RealDiv Reciprocal Relu
    Relu6 Reshape ResizeBilinear ResizeNearestNeighbor Round Rsqrt Select SelectV2 Selu Shape ShapeN
    Sigmoid Sign Sin Size Slice Softmax Softplus Softsign Split SplitV Sqrt Square SquaredDifference
    Squeeze StatefulPartitionedCall StopGradient StridedSlice Sub Sum Tanh Tile Transpose Unpack
    VarHandleOp ZerosLike
""".split())


def saved_model_ops(path: Path, endpoint: str = "serving_default") -> set[str]:
    """The op types ``endpoint`` can run: its output nodes and every function they call, transitively,
    read from saved_model.pb as a protobuf (nothing is loaded or executed)."""
    from tensorflow.core.protobuf import saved_model_pb2

    sm = saved_model_pb2.SavedModel()
    sm.ParseFromString((path / "saved_model.pb").read_bytes())
    graph = sm.meta_graphs[0]
    if endpoint not in graph.signature_def:
        raise ModelError(f"{path} has no {endpoint!r} signature (it has {sorted(graph.signature_def)}).",
                         expected="a SavedModel exported for serving", fix="export it with model.export(path)")
    nodes = {n.name: n for n in graph.graph_def.node}
    library = {f.signature.name: f for f in graph.graph_def.library.function}
    ops, seen, todo = set(), set(), [nodes[t.name.split(":")[0]] for t in graph.signature_def[endpoint].outputs.values()]
    while todo:
        node = todo.pop()
        ops.add(node.op)
        for attr in node.attr.values():
            for name in [attr.func.name] + [f.name for f in attr.list.func]:
                if name and name not in seen and name in library:
                    seen.add(name)
                    todo.extend(library[name].node_def)
    return ops


def check_saved_model_ops(path: Path, endpoint: str = "serving_default") -> None:
    unsafe = sorted(saved_model_ops(path, endpoint) - SAFE_OPS)
    if unsafe:
        raise ModelError(f"{path} is a SavedModel whose {endpoint!r} function runs ops that are not pure tensor "
                         f"math: {', '.join(unsafe)}. A SavedModel is a program; it was not run.",
                         expected="convolutions, matmuls, activations, pooling, normalisation and shape ops only",
                         fix="if you trust where the model comes from, pass --trust-model to export (or set "
                             "RESNET_DEPLOY_TRUST_MODEL=1 for any command); otherwise save it again as a .keras file "
                             "from its source code")


def check_classifier_io(model, source: str) -> None:
    n_in, n_out = len(model.inputs or []), len(model.outputs or [])
    if n_in != 1 or n_out != 1:
        raise ModelError(f"{source} has {n_in} inputs and {n_out} outputs.",
                         expected="one image input and one class-score output",
                         fix="wrap it as keras.Model(image_input, logits) with a single input and output")
    in_shape = tuple(model.inputs[0].shape[1:]) if model.inputs else None
    out_shape = tuple(model.outputs[0].shape[1:]) if model.outputs else None
    if in_shape != IMAGE_SHAPE:
        raise ModelError(f"{source} takes inputs of shape {in_shape}.", expected=f"CIFAR-10 images {IMAGE_SHAPE}",
                         fix="use a model built for 32x32 RGB images")
    if out_shape != (NUM_CLASSES,):
        raise ModelError(f"{source} outputs shape {out_shape}.", expected=f"({NUM_CLASSES},) class scores",
                         fix="use a CIFAR-10 classifier with 10 outputs")
