"""The float reference: a Keras model called directly (not ``model.predict``, whose per-call
overhead would dominate batch-1 timings)."""

from __future__ import annotations

import numpy as np

from resnet_deploy.runtimes.base import Runner


class KerasRunner(Runner):
    name = "keras"

    def _load_impl(self) -> None:
        from resnet_deploy.models.io import load_model

        if self.threads:
            _set_tf_threads(self.threads)
        self.model = load_model(self.path)

    def _predict_impl(self, x: np.ndarray) -> np.ndarray:
        import keras

        return keras.ops.convert_to_numpy(self.model(x, training=False))

    def describe(self) -> dict:
        import keras

        return {"runtime": self.name, "threads": self.threads, "backend": keras.backend.backend()}


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
