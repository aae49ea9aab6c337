"""The learning-rate schedule as a Keras ``LearningRateSchedule`` driven by ``optimizer.iterations``.

Because the position in the schedule is the optimizer's own step counter, restoring the
optimizer's variables on ``--resume`` restores the schedule position with them. The formula is
``recipe.lr_at``'s, written with ``keras.ops`` so it runs on every backend.
"""

from __future__ import annotations

import math

import keras

from resnet_deploy.training.recipe import WARMUP_START


@keras.saving.register_keras_serializable(package="resnet_deploy")
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up to ``peak``, then cosine or linear (one-cycle) decay to ``final_fraction * peak``."""

    def __init__(self, peak: float, total_steps: int, warmup_steps: int, schedule: str = "cosine",
                 final_fraction: float = 0.0):
        self.peak = float(peak)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.schedule = schedule
        self.final_fraction = float(final_fraction)

    def __call__(self, step):
        ops = keras.ops
        step = ops.cast(step, "float32")
        peak = self.peak
        end = peak * self.final_fraction
        warm = max(self.warmup_steps, 1)
        warm_lr = peak * (WARMUP_START + (1 - WARMUP_START) * step / warm)
        p = ops.clip((step - self.warmup_steps) / max(1, self.total_steps - self.warmup_steps), 0.0, 1.0)
        if self.schedule == "cosine":
            decay_lr = end + (peak - end) * 0.5 * (1 + ops.cos(math.pi * p))
        else:
            decay_lr = peak + (end - peak) * p
        if self.warmup_steps <= 0:
            return decay_lr
        return ops.where(step < self.warmup_steps, warm_lr, decay_lr)

    def get_config(self) -> dict:
        return {"peak": self.peak, "total_steps": self.total_steps, "warmup_steps": self.warmup_steps,
                "schedule": self.schedule, "final_fraction": self.final_fraction}
