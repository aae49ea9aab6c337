"""Quantization-aware fine-tuning through tensorflow-model-optimization (tfmot 0.8 needs Keras 2).

The float Keras 3 model is rebuilt as its tf_keras twin from the architecture in its metadata,
weights are copied by layer name and checked to reproduce the float logits, then every Conv2D,
BatchNormalization, ReLU, Add, pooling and Dense layer is annotated for quantization (the
``Normalization`` input layer is left to the TFLite converter, which quantizes it from the
representative dataset: tfmot has no quantize config for it). The annotated model is fine-tuned for
a few epochs on a class-balanced, seeded subset of the *training* split, preprocessed like
evaluation, and handed to the TFLite converter like any other model.

Fine-tuning starts from the float model and stays close to it: a low learning rate (1e-5 by default) and
the BatchNormalization layers frozen at the float model's statistics (``trainable=False``: tf_keras then
normalises with the moving mean/variance and never updates them, so small QAT batches cannot drag them
away). With accuracy-aware INT8 the fine-tuning images are drawn outside the tuning split, and the
export judges the QAT file on that split beside the PTQ one (``judge_qat``) and writes it only when it wins.
"""

from __future__ import annotations

import os
import time
from typing import Callable

import numpy as np

from resnet_deploy.data.preprocess import Preprocessing, preprocess
from resnet_deploy.data.sampler import class_balanced_indices, indices_hash
from resnet_deploy.errors import ExportError
from resnet_deploy.records import Int8Result, QatVerdict

_QUANTIZED_LAYERS = ("Conv2D", "DepthwiseConv2D", "Dense", "BatchNormalization", "ReLU", "Add",
                     "GlobalAveragePooling2D", "MaxPooling2D", "AveragePooling2D")


def _import_tfmot():
    """tfmot sets TF_USE_LEGACY_KERAS=1 process-wide on import; undo that so Keras 3 code is unaffected."""
    before = os.environ.get("TF_USE_LEGACY_KERAS")
    import tensorflow_model_optimization as tfmot

    if before is None:
        os.environ.pop("TF_USE_LEGACY_KERAS", None)
    else:
        os.environ["TF_USE_LEGACY_KERAS"] = before
    return tfmot


def tf_keras_twin(model, metadata: dict | None):
    """The tf_keras rebuild of a resnet-deploy model, weights copied and checked."""
    from resnet_deploy.models.builder import build_model, transfer_weights

    meta = metadata or {}
    if not meta.get("architecture"):
        raise ExportError("QAT needs the model's architecture, and the model has no metadata naming it.",
                          expected="a model saved by `resnet-deploy train` (with its model.keras.json sidecar)",
                          fix="export without --qat-epochs, or restore the .json sidecar beside the model")
    twin = build_model(meta["architecture"], width=meta.get("width", 1.0), stem=meta.get("stem", "cifar"),
                       framework="tf_keras")
    transfer_weights(model, twin)
    x = np.random.default_rng(0).uniform(0, 255, (4, *model.inputs[0].shape[1:])).astype(np.float32)
    diff = float(np.abs(np.asarray(model(x, training=False)) - twin(x, training=False).numpy()).max())
    if diff > 1e-3 * max(1.0, float(np.abs(np.asarray(model(x, training=False))).max())):
        raise ExportError(f"The tf_keras twin does not reproduce the model (max |logit diff| {diff:.3g}).",
                          expected="a model built by resnet-deploy whose metadata matches its layers",
                          fix="export without --qat-epochs")
    return twin


def freeze_batchnorm(twin) -> list[str]:
    """Keep every BatchNormalization at the float model's statistics during QAT; returns their names."""
    frozen = []
    for layer in twin.layers:
        if type(layer).__name__ == "BatchNormalization":
            layer.trainable = False
            frozen.append(layer.name)
    return frozen


def quantize_annotated(twin):
    """tfmot's QAT model of ``twin``: supported layers annotated, the input Normalization left float."""
    tfmot = _import_tfmot()
    import tf_keras

    qk = tfmot.quantization.keras

    def annotate(layer):
        return qk.quantize_annotate_layer(layer) if type(layer).__name__ in _QUANTIZED_LAYERS else layer

    annotated = tf_keras.models.clone_model(twin, clone_function=annotate)
    annotated.set_weights(twin.get_weights())
    try:
        return qk.quantize_apply(annotated), tfmot.__version__ if hasattr(tfmot, "__version__") else None
    except Exception as exc:
        raise ExportError(f"tfmot could not make the model quantization-aware: {type(exc).__name__}: {str(exc)[:300]}",
                          expected="a ResNet built by resnet-deploy", fix="export without --qat-epochs") from exc


def qat_finetune(model, metadata: dict | None, train, spec: Preprocessing, options,
                 progress: Callable[[str], None] = lambda m: None, exclude: np.ndarray | None = None):
    """Fine-tune ``model`` quantization-aware; returns (tf_keras QAT model, recipe dict for the manifest).
    ``exclude``: training indices never used (the INT8 tuning split)."""
    import tf_keras

    q, seed = options.qat, options.calibration.seed
    twin = tf_keras_twin(model, metadata)
    frozen = freeze_batchnorm(twin)
    qat_model, tfmot_version = quantize_annotated(twin)
    pool = len(train) - (0 if exclude is None else len(exclude))
    idx = class_balanced_indices(train.y, min(q.samples, pool), seed=seed + 1, exclude=exclude)
    x, y = preprocess(train.x[idx], spec), train.y[idx]
    tf_keras.utils.set_random_seed(seed)
    qat_model.compile(optimizer=tf_keras.optimizers.Adam(q.learning_rate),
                      loss=tf_keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    progress(f"QAT: {q.epochs} epoch(s) on {len(idx)} training images")
    t0 = time.perf_counter()
    hist = qat_model.fit(x, y, epochs=q.epochs, batch_size=q.batch_size, shuffle=True, verbose=0)
    seconds = time.perf_counter() - t0
    info = {
        "tool": "tensorflow-model-optimization quantize_apply on the tf_keras twin", "tfmot": tfmot_version,
        "epochs": q.epochs, "samples": int(len(idx)), "split": "train",
        "indices_sha256_16": indices_hash(idx), "seed": seed + 1,
        "optimizer": "Adam", "learning_rate": q.learning_rate, "batch_size": q.batch_size,
        "batchnorm": {"frozen_at_float_statistics": len(frozen), "layers": frozen},
        "disjoint_from_validation": exclude is not None,
        "left_float_for_converter": [l.name for l in twin.layers if type(l).__name__ == "Normalization"],
        "history": {k: [round(float(v), 5) for v in vals] for k, vals in hist.history.items()},
        "seconds": round(seconds, 2),
    }
    return qat_model, info


def judge_qat(qat_model, options, calibration, tuning, ptq: Int8Result,
              progress: Callable[[str], None] = lambda m: None) -> QatVerdict:
    """Score the QAT INT8 TFLite file on the tuning split beside the accuracy-aware PTQ one (``ptq``, its
    search result); QAT is kept only when its top-1 there is higher (a tie keeps PTQ, the simpler file)."""
    import tempfile
    from pathlib import Path

    from resnet_deploy.config import Format, Precision
    from resnet_deploy.converters import tflite
    from resnet_deploy.converters.base import ArtifactPlan
    from resnet_deploy.converters.int8_search import predict
    from resnet_deploy.converters.options import Target
    from resnet_deploy.converters.session import ExportSession

    with tempfile.TemporaryDirectory(prefix="rd-qat-") as tmp, ExportSession() as session:
        path = Path(tmp) / "qat.tflite"
        tflite.convert(session, ArtifactPlan(Target(Format.TFLITE, Precision.INT8, qat=True), path, qat_model, options,
                                             calibration))
        q = tuning.score(predict(path, tuning.pixels, tuning.preprocessing))
    margin = round(100 * (q["val_top1"] - ptq.val_top1), 4)
    keep = margin > 0
    note = (f"QAT won on the validation split: top-1 {100 * q['val_top1']:.2f} % against PTQ's "
            f"{100 * ptq.val_top1:.2f} % ({margin:+.2f} pp)" if keep else
            f"PTQ won on the validation split: QAT top-1 {100 * q['val_top1']:.2f} % against PTQ's "
            f"{100 * ptq.val_top1:.2f} % ({margin:+.2f} pp); the QAT file is not kept")
    progress(note)
    return QatVerdict(keep, "qat" if keep else "ptq", margin, note, q,
                      {"val_top1": ptq.val_top1, "val_drop_pp": ptq.val_drop_pp, "val_agreement": ptq.val_agreement})
