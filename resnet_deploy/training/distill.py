"""Knowledge distillation (Hinton et al. 2015), backend-agnostic Keras 3.

``Distiller`` wraps the student; ``compute_loss`` adds the teacher's softened targets:

    loss = (1 - w) * CE(labels, student) + w * T^2 * KL(softmax(teacher / T) || softmax(student / T))
           + the student's own losses (its L2 weight decay), unscaled

Only the two data terms are weighted: the weight decay the recipe records applies in full, as in a
run without a teacher. The teacher's losses (regularizers, ``add_loss``) never enter. The teacher
runs in inference mode and is never trained. Only the student is saved: the trainer checkpoints
and exports ``distiller.student``.

Public Keras API only: the task loss is taken by ``compile`` and kept here (Keras' own compiled loss
would add ``self.losses``, the teacher's among them, to the weighted part), and the student's losses
come from ``Layer.losses`` (``tests/test_train.py`` checks both terms against numpy).
"""

from __future__ import annotations

from pathlib import Path

import keras

from resnet_deploy.errors import ModelError, TrainError


class Distiller(keras.Model):
    def __init__(self, student, teacher, temperature: float, weight: float, **kwargs):
        super().__init__(name=f"distill_{student.name}", **kwargs)
        self.student = student
        self.teacher = teacher
        self.teacher.trainable = False
        self.temperature = float(temperature)
        self.weight = float(weight)
        self.task_loss = None  # set by compile

    def call(self, x, training=False):
        return self.student(x, training=training)

    def compile(self, loss=None, **kwargs):
        """``loss``: the task loss on the labels (e.g. ``CategoricalCrossentropy(from_logits=True)``), kept
        by the Distiller; everything else goes to ``keras.Model.compile`` (which gets no loss of its own)."""
        if loss is None:
            raise ValueError("compile the Distiller with the task loss (e.g. CategoricalCrossentropy)")
        self.task_loss = keras.losses.get(loss)
        super().compile(**kwargs)

    def compute_loss(self, x=None, y=None, y_pred=None, sample_weight=None, training=True):
        ops = keras.ops
        if self.task_loss is None:
            raise ValueError("compile the Distiller with the task loss (e.g. CategoricalCrossentropy)")
        hard = ops.cast(self.task_loss(y, y_pred, sample_weight), "float32")
        own = self._student_losses()
        if not training:  # evaluation: what a run without a teacher reports (task loss + weight decay)
            return hard + own
        t = self.temperature
        teacher_logits = ops.cast(self.teacher(x, training=False), "float32")
        student_logits = ops.cast(y_pred, "float32")
        p_teacher = ops.softmax(teacher_logits / t, axis=-1)
        log_p_student = ops.log_softmax(student_logits / t, axis=-1)
        log_p_teacher = ops.log_softmax(teacher_logits / t, axis=-1)
        kl = ops.sum(p_teacher * (log_p_teacher - log_p_student), axis=-1)
        soft = ops.mean(kl) * (t * t)
        return (1.0 - self.weight) * hard + self.weight * soft + own

    def _student_losses(self):
        """The student's regularization and ``add_loss`` terms, summed in float32; never the teacher's.

        On JAX, ``fit`` computes the loss statelessly and ``self.losses`` is what holds that pass's
        values (the forward pass's ``add_loss`` terms, and regularizers of the trainable weights: the
        student's, as the frozen teacher has none). Elsewhere they are read from the student itself,
        which the teacher's call inside ``compute_loss`` cannot reach.
        """
        ops = keras.ops
        losses = self.losses if keras.backend.backend() == "jax" else self.student.losses
        total = ops.zeros((), "float32")
        for loss in losses:
            total = total + ops.cast(ops.sum(loss), "float32")
        return total


def load_teacher(path: Path):
    """Load a teacher and check that it is a CIFAR-10 classifier taking the student's inputs."""
    from resnet_deploy.data.preprocess import Preprocessing
    from resnet_deploy.models.io import load_model, read_metadata

    try:
        teacher = load_model(path)  # checks (32, 32, 3) -> (10,)
    except ModelError as exc:
        raise TrainError(f"The teacher cannot be used: {exc.what}", exc.expected,
                         exc.fix or "pass a CIFAR-10 classifier trained by `resnet-deploy train`") from exc
    meta = read_metadata(path) or {}
    spec = Preprocessing.from_dict(meta.get("preprocessing"))
    if not spec.is_identity:
        raise TrainError(f"The teacher {path} expects preprocessed inputs ({spec.to_dict()['convention']}, "
                         f"scale {spec.scale}, mean {spec.mean}).",
                         expected="a teacher that takes RGB pixels 0..255 like the student (normalisation inside)",
                         fix="use a teacher trained by `resnet-deploy train`")
    if meta.get("output", "logits (no softmax)") != "logits (no softmax)":
        raise TrainError(f"The teacher {path} outputs {meta['output']}.", expected="logits (no softmax)")
    return teacher
