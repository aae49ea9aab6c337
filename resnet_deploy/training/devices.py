"""Which devices the Keras backend trains on, which precision they get, and multi-GPU set-up.

Each backend is asked in its own terms (``tf.config``, ``jax.devices()``, ``torch.cuda``); only
the backend Keras runs on is imported, so a JAX run never imports TensorFlow.
"""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field

from resnet_deploy.errors import TrainError


@dataclass(frozen=True)
class DeviceInfo:
    backend: str  # keras.backend.backend(): tensorflow, jax or torch
    kind: str  # "gpu" or "cpu"
    names: tuple[str, ...]  # one per device the backend sees of that kind
    capability: tuple[int, int] | None = None  # CUDA compute capability of the first GPU
    framework_version: str = ""
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def count(self) -> int:
        return len(self.names)

    def describe(self) -> str:
        if self.kind == "gpu":
            cc = f", compute capability {self.capability[0]}.{self.capability[1]}" if self.capability else ""
            what = f"{self.count} x GPU ({', '.join(sorted(set(self.names)))}{cc})"
        else:
            from resnet_deploy.envinfo import cpu_model

            what = f"CPU ({cpu_model()}, {self.count} device{'s' if self.count > 1 else ''} seen by {self.backend})"
        return f"{what}, Keras backend {self.backend} {self.framework_version}".rstrip()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["description"] = self.describe()
        return d


def probe_devices() -> DeviceInfo:
    import keras

    backend = keras.backend.backend()
    probe = {"tensorflow": _probe_tf, "jax": _probe_jax, "torch": _probe_torch}.get(backend)
    if probe is None:
        raise TrainError(f"Keras backend {backend!r} is not supported for training.",
                         expected="KERAS_BACKEND=tensorflow, jax or torch")
    return probe()


def _probe_tf() -> DeviceInfo:
    import tensorflow as tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        names, cap = [], None
        for g in gpus:
            details = tf.config.experimental.get_device_details(g)
            names.append(details.get("device_name", g.name))
            cap = cap or details.get("compute_capability")
        return DeviceInfo("tensorflow", "gpu", tuple(names), tuple(cap) if cap else None, tf.__version__)
    cpus = tf.config.list_logical_devices("CPU")
    return DeviceInfo("tensorflow", "cpu", tuple(d.name for d in cpus), None, tf.__version__)


def _probe_jax() -> DeviceInfo:
    import jax

    devices = jax.devices()
    kind = "gpu" if devices[0].platform in ("gpu", "cuda", "rocm") else "cpu"
    cap = None
    cc = getattr(devices[0], "compute_capability", None)
    if kind == "gpu" and cc:
        try:
            cap = tuple(int(v) for v in str(cc).split(".")[:2])
        except ValueError:
            cap = None
    notes = () if devices[0].platform in ("gpu", "cuda", "rocm", "cpu") else (f"platform {devices[0].platform}",)
    return DeviceInfo("jax", kind, tuple(str(getattr(d, "device_kind", d)) for d in devices), cap, jax.__version__,
                      notes)


def _probe_torch() -> DeviceInfo:
    import torch

    if torch.cuda.is_available():
        n = torch.cuda.device_count()
        return DeviceInfo("torch", "gpu", tuple(torch.cuda.get_device_name(i) for i in range(n)),
                          tuple(torch.cuda.get_device_capability(0)), torch.__version__)
    return DeviceInfo("torch", "cpu", ("cpu",), None, torch.__version__)


def resolve_precision(requested: str, dev: DeviceInfo) -> str:
    """``auto`` -> a concrete Keras dtype policy; refuse what the device cannot do, before any work.

    On a CPU, mixed_float16 is refused (no CPU backend runs float16 convolutions fast, and
    TensorFlow has no CPU kernels for some of them); mixed_bfloat16 is allowed (AVX512-BF16 and
    AMX CPUs have it), float32 is the default.
    """
    if requested == "auto":
        if dev.kind != "gpu":
            return "float32"
        return "mixed_bfloat16" if dev.capability is None or dev.capability >= (8, 0) else "mixed_float16"
    if requested == "mixed_float16" and dev.kind != "gpu":
        raise TrainError("--precision mixed_float16 needs a GPU; this run would train on the CPU.",
                         expected="float32 or mixed_bfloat16 on a CPU",
                         fix="pass --precision float32 (or auto), or run where a GPU is visible to the backend")
    if requested == "mixed_bfloat16" and dev.kind == "gpu" and dev.capability and dev.capability < (8, 0):
        raise TrainError(f"--precision mixed_bfloat16 needs a GPU with compute capability 8.0 or more, "
                         f"this one has {dev.capability[0]}.{dev.capability[1]}.",
                         fix="pass --precision mixed_float16")
    return requested


def replica_count(distribute: str, dev: DeviceInfo) -> int:
    """How many devices a data-parallel run splits each batch over; refuses what cannot work."""
    if distribute == "none":
        return 1
    if dev.backend == "torch":
        raise TrainError("--distribute data-parallel is not available with KERAS_BACKEND=torch.",
                         expected="KERAS_BACKEND=jax (keras.distribution.DataParallel) or tensorflow "
                                  "(tf.distribute.MirroredStrategy)",
                         fix="set KERAS_BACKEND=jax, or drop --distribute")
    if dev.count < 2:
        raise TrainError(f"--distribute data-parallel needs 2 or more devices; {dev.backend} sees {dev.count} "
                         f"{dev.kind.upper()}.", expected="several GPUs visible to the backend",
                         fix="drop --distribute (one device trains without it)")
    return dev.count


@contextlib.contextmanager
def distribution_scope(distribute: str, dev: DeviceInfo):
    """Build, compile and fit inside this: data parallel over every device of ``dev``, or nothing.

    JAX: ``keras.distribution.DataParallel`` (batches sharded, variables replicated), reset
    afterwards. TensorFlow: ``tf.distribute.MirroredStrategy`` over the same devices.
    """
    if distribute == "none":
        yield None
        return
    if dev.backend == "jax":
        import jax
        import keras

        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(devices=jax.devices()))
        try:
            yield "keras.distribution.DataParallel"
        finally:
            keras.distribution.set_distribution(previous)
        return
    import tensorflow as tf

    kind = "GPU" if dev.kind == "gpu" else "CPU"
    strategy = tf.distribute.MirroredStrategy(devices=[d.name for d in tf.config.list_logical_devices(kind)])
    with strategy.scope():
        yield "tf.distribute.MirroredStrategy"
