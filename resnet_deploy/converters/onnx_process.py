"""tf2onnx: the one call that turns the Keras model into the float ONNX graph (``to_onnx``), in this
process or in a second one, beside the TFLite conversions (``OnnxProcess``).

A leaf of the converters package: it imports nothing of it, so the export session, the ONNX converter
and the child process all import it without a circle.

tf2onnx and the TFLite converter both hold the interpreter lock for most of their run, so in one process
they run one after the other. For a large model the export starts the FP32 ONNX conversion at once in a
child process (it loads the same model file the same safe way, converts with ``to_onnx`` and writes
the file), converts the TFLite files meanwhile, and picks the ONNX file up when its turn comes. tf2onnx
still runs once per export. The second process costs its imports and a second copy of the model (about
4 s and the model's size on a 2-core CPU), so it is used only from ``PARALLEL_MIN_PARAMS`` parameters
(``ExportOptions.parallel_onnx`` forces either way). Ctrl-C reaches the export, which kills the process.
"""

from __future__ import annotations

import os
from pathlib import Path

from resnet_deploy.errors import ExportError

INPUT_NAME = "image"  # the ONNX graph's one input
PARALLEL_MIN_PARAMS = 2_000_000  # ResNet20 (0.27 M): in process; ResNet34 (21 M): tf2onnx alone takes ~17 s


def to_onnx(model, opset: int):
    """The float ONNX ModelProto of a Keras model: one input ``image`` (dynamic batch), one output."""
    import tensorflow as tf
    import tf2onnx

    spec = (tf.TensorSpec((None, *model.inputs[0].shape[1:]), tf.float32, name=INPUT_NAME),)
    try:
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    except Exception as exc:
        raise ExportError(f"tf2onnx could not convert the model: {type(exc).__name__}: {str(exc)[:400]}",
                          expected="a Keras model made of ops tf2onnx supports",
                          fix="try another --opset, or export TFLite only with --formats tflite") from exc
    inputs = [i.name for i in proto.graph.input]
    if len(inputs) != 1 or len(proto.graph.output) != 1:
        raise ExportError(f"The ONNX graph has inputs {inputs} and {len(proto.graph.output)} outputs.",
                          expected="exactly one image input and one logits output",
                          fix="model constants must not become graph inputs; report this model")
    for v in (proto.graph.input[0], proto.graph.output[0]):
        v.type.tensor_type.shape.dim[0].dim_param = "batch"
    return proto


def wanted(option: bool | None, params: int) -> bool:
    """Whether to convert in a second process: the option when set, else from the model's size."""
    return option if option is not None else params >= PARALLEL_MIN_PARAMS


class OnnxProcess:
    """The FP32 ONNX conversion of ``model_path``, started at once in a child Python process writing ``out_path``
    (``python -m resnet_deploy.converters.onnx_process``: a fresh interpreter, so a script calling the library
    needs no ``__main__`` guard); its error, if any, comes back as JSON beside the file."""

    def __init__(self, model_path: Path, opset: int, trust: bool, out_path: Path):
        import subprocess
        import sys

        self.out_path = Path(out_path)
        self.error_path = self.out_path.with_suffix(".error.json")
        cmd = [sys.executable, "-m", __name__, str(model_path), str(opset), "1" if trust else "0",
               str(self.out_path), str(self.error_path)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL=os.environ.get("TF_CPP_MIN_LOG_LEVEL", "2"))
        self.process = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, env=env)

    def result(self) -> Path:
        """Wait for the child: the ONNX file it wrote, or its error as an ExportError."""
        import json

        try:
            code = self.process.wait()
        finally:
            self.close()
        if self.error_path.exists():
            raise ExportError(*json.loads(self.error_path.read_text()))
        if code != 0 or not self.out_path.exists():
            raise ExportError(f"The tf2onnx process ended without a result (exit code {code}).",
                              expected="the FP32 ONNX conversion to finish",
                              fix="export again; if it repeats, pass --formats tflite, or report it")
        return self.out_path

    def close(self) -> None:
        """Kill the child if it still runs (an interrupted or failed export), and reap it."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()


def main(argv: list[str]) -> int:
    """The child: load the model the same safe way, convert, write the file (or the error as JSON)."""
    import json
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the export's to handle: it kills this process
    model_path, opset, trust, out_path, error_path = argv
    try:
        import onnx

        from resnet_deploy.errors import ResnetDeployError
        from resnet_deploy.models.io import load_model

        try:
            onnx.save(to_onnx(load_model(model_path, trust=trust == "1"), int(opset)), out_path)
            return 0
        except ResnetDeployError as exc:
            error = [exc.what, exc.expected, exc.fix]
    except Exception as exc:  # a bug: said with its type, as the in-process conversion would raise it
        error = [f"tf2onnx in its process failed: {type(exc).__name__}: {str(exc)[:400]}", None,
                 "export again with --formats tflite to get the TFLite files, and report this"]
    Path(error_path).write_text(json.dumps(error))
    return 1


if __name__ == "__main__":
    import sys

    sys.exit(main(sys.argv[1:]))
