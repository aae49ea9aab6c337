"""The float reference: a Keras model called directly (not ``model.predict``, whose per-call
overhead would dominate batch-1 timings). On the TensorFlow backend the call is traced once per input
shape into a ``tf.function`` (graph mode, no XLA: the same kernels and the same logits as the eager
call, bit for bit on the models measured here, without the per-op dispatch of eager execution)."""

from __future__ import annotations

import numpy as np

from resnet_deploy.artifact import TensorSpec
from resnet_deploy.runtimes.base import Runner


class KerasRunner(Runner):
    name = "keras"

    def _load_impl(self) -> None:
        from resnet_deploy.models.io import load_model

        if self.threads:
            _set_tf_threads(self.threads)
        self.model = load_model(self.path, check_io=False)  # the caller checks I/O against its data (bench.measure)
        self._graph_call = _graph_function(self.model)

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        import keras

        if self._graph_call is not None:
            return self._graph_call(x).numpy()
        return keras.ops.convert_to_numpy(self.model(x, training=False))

    def _io_impl(self) -> tuple[TensorSpec, TensorSpec]:
        def info(t) -> TensorSpec:
            return TensorSpec(getattr(t, "name", "") or "", tuple(t.shape), str(getattr(t, "dtype", "float32")))

        return info(self.model.inputs[0]), info(self.model.outputs[0])

    def describe(self) -> dict:
        import keras

        return {"runtime": self.name, "threads": self.threads, "backend": keras.backend.backend()}


def _graph_function(model):
    """``model(x, training=False)`` as a ``tf.function`` on the TensorFlow backend, else None (eager)."""
    import keras

    if keras.backend.backend() != "tensorflow":
        return None
    import tensorflow as tf

    return tf.function(lambda x: model(x, training=False), reduce_retracing=True)


def _set_tf_threads(n: int) -> None:
    import keras

    if keras.backend.backend() != "tensorflow":
        return
    import tensorflow as tf

    try:
        tf.config.threading.set_intra_op_parallelism_threads(n)
        tf.config.threading.set_inter_op_parallelism_threads(1)
    except RuntimeError:  # already initialised in this process: keep the earlier setting
        pass
