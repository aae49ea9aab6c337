"""Saving and loading float models with the metadata that travels beside them.

``model.keras`` gets a sidecar ``model.keras.json`` (architecture, input convention,
preprocessing, class names, and whatever the trainer adds: accuracy, recipe, device...).
``.keras`` and ``.h5`` files are loaded with Keras' safe mode (a ``Lambda`` layer's pickled Python is
refused). A SavedModel folder is not a Keras file and safe mode does not apply: it is read with
``tf.saved_model.load`` (through ``keras.layers.TFSMLayer``), which runs no Python from the folder but
does run its TensorFlow graph as stored, so only load SavedModels you trust.
"""

from __future__ import annotations

import json
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
    side = sidecar_path(path)
    if not side.exists():
        return None
    try:
        return json.loads(side.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise ModelError(f"The metadata file {side} is not valid JSON: {exc}",
                         fix="delete it (defaults are used) or restore it from the training run") from exc


def load_model(path: str | os.PathLike, check_io: bool = True, trust: bool = False):
    """Load a float Keras model (.keras, .h5 or SavedModel folder) safely and check its I/O.

    A SavedModel is a program: unless ``trust``, its serving function's ops are checked against
    ``SAFE_OPS`` before any of it runs (``check_saved_model_ops``)."""
    import keras

    path = Path(path)
    if not path.exists():
        raise ModelError(f"Model {path} does not exist.", fix="check the path (train writes runs/<name>/model.keras)")
    try:
        if path.is_dir():
            if not (path / "saved_model.pb").exists():
                raise ModelError(f"{path} is a folder without saved_model.pb.",
                                 expected="a .keras file, a .h5 file or a SavedModel folder")
            model = _load_saved_model(path, check_io, trust=trust)
        elif path.suffix in (".keras", ".h5", ".hdf5"):
            _check_file_is_whole(path)
            model = keras.saving.load_model(path, compile=False, safe_mode=True)
        else:
            raise _not_a_model(path)
    except ModelError:
        raise
    except Exception as exc:
        raise _load_error(path, exc) from exc
    if check_io:
        check_classifier_io(model, str(path))
    return model


ARTIFACT_SUFFIXES = (".tflite", ".onnx")


def _not_a_model(path: Path) -> ModelError:
    if path.suffix in ARTIFACT_SUFFIXES:
        return ModelError(f"{path} is an exported artifact, not a float model.",
                          expected="the Keras model it came from (.keras, .h5 or a SavedModel folder)",
                          fix=f"export from the .keras model; to measure this file use `resnet-deploy bench {path}`")
    return ModelError(f"{path} is not a Keras model file.", expected="a .keras file, a .h5 file or a SavedModel folder")


def _check_file_is_whole(path: Path) -> None:
    """Say "empty" or "truncated" for what Keras would report as "File not found"."""
    import zipfile

    size = path.stat().st_size
    if size == 0:
        raise ModelError(f"{path} is empty (0 bytes).", expected="a model saved with model.save()",
                         fix="re-copy the file, or save the model again")
    if path.suffix == ".keras" and not zipfile.is_zipfile(path):
        raise ModelError(f"{path} is not a complete .keras file ({size:,} bytes, no zip directory at its end: "
                         "a truncated copy or another format).", expected="a .keras zip written by model.save()",
                         fix="re-copy the whole file, or save the model again with model.save('model.keras')")


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
