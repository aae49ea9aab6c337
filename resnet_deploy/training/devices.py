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


def enable_tf_onednn() -> str | None:
    """Turn on TensorFlow's oneDNN kernels for training on an x86 CPU where TensorFlow leaves them off.

    TensorFlow switches them on by itself only on CPUs with AVX-512 VNNI, BF16 or AMX. Without them (an
    AVX2-only AMD EPYC here) its convolutions run through Eigen in small GEMM blocks: ResNet34 trained
    at 6.1 images/s that way and 12.5 with ``TF_ENABLE_ONEDNN_OPTS=1`` (batch 128, float32, 2 cores,
    benchmarks/train_throughput.py). A value the user set is kept. Must run before TensorFlow is
    imported (it reads the variable once); returns the value in force, None when it does not apply
    (another Keras backend, not x86, TensorFlow already imported)."""
    import os
    import platform
    import sys

    if os.environ.get("KERAS_BACKEND", "tensorflow") != "tensorflow" or "tensorflow" in sys.modules:
        return os.environ.get("TF_ENABLE_ONEDNN_OPTS")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None
    return os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "1")


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


BF16_GAIN_NEEDED = 1.10  # without AMX, mixed_bfloat16 must train at least this much faster than float32 to be chosen


@dataclass(frozen=True)
class PrecisionChoice:
    """The dtype policy a run trains in, and why: what the run's metadata records."""

    requested: str
    policy: str
    reason: str
    measured: dict | None = None  # {"float32": s/step, "mixed_bfloat16": s/step} when the choice was measured

    def to_dict(self) -> dict:
        return asdict(self)


def choose_precision(requested: str, dev: DeviceInfo, flags=None, measure=None) -> PrecisionChoice:
    """``requested`` -> a concrete Keras dtype policy with its reason; refuse what the device cannot do, before any work.

    ``auto`` on a GPU: mixed_bfloat16 from compute capability 8.0, mixed_float16 below. On a CPU:
    - ``amx_bf16`` among the CPU flags: mixed_bfloat16 (oneDNN runs bf16 convolutions on the AMX tiles;
      ResNet34 trained 1.76x faster than in float32 on a 2-core Xeon, benchmarks/train_throughput.py);
    - ``avx512_bf16`` without AMX: measured here (``measure_bf16_speed``), because bf16 without AMX can be
      slower than float32 (TensorFlow's mixed-precision guide says so); mixed_bfloat16 only if it is at
      least ``BF16_GAIN_NEEDED`` times faster;
    - otherwise float32 (no bf16 hardware: bf16 would be emulated).
    ``flags``: the CPU flags (default: this machine's, ``envinfo.read_cpu_flags``); ``measure``: a callable
    returning ``{"float32": s, "mixed_bfloat16": s}`` (default: ``measure_bf16_speed``).

    mixed_float16 is refused on a CPU (no CPU backend runs float16 convolutions fast, and TensorFlow has
    no CPU kernels for some of them); mixed_bfloat16 may be asked for on any CPU.
    """
    if requested == "mixed_float16" and dev.kind != "gpu":
        raise TrainError("--precision mixed_float16 needs a GPU; this run would train on the CPU.",
                         expected="float32 or mixed_bfloat16 on a CPU",
                         fix="pass --precision float32 (or auto), or run where a GPU is visible to the backend")
    if requested == "mixed_bfloat16" and dev.kind == "gpu" and dev.capability and dev.capability < (8, 0):
        raise TrainError(f"--precision mixed_bfloat16 needs a GPU with compute capability 8.0 or more, "
                         f"this one has {dev.capability[0]}.{dev.capability[1]}.",
                         fix="pass --precision mixed_float16")
    if requested != "auto":
        return PrecisionChoice(requested, requested, "asked for with --precision")
    if dev.kind == "gpu":
        if dev.capability is None or dev.capability >= (8, 0):
            return PrecisionChoice(requested, "mixed_bfloat16", "GPU with bf16 tensor cores (compute capability >= 8.0)")
        return PrecisionChoice(requested, "mixed_float16", "GPU without bf16 (compute capability < 8.0)")
    if flags is None:
        from resnet_deploy.envinfo import read_cpu_flags

        flags = read_cpu_flags() or []
    if "amx_bf16" in flags:
        return PrecisionChoice(requested, "mixed_bfloat16", "CPU with AMX-BF16: oneDNN runs bf16 convolutions on AMX")
    if "avx512_bf16" not in flags:
        return PrecisionChoice(requested, "float32", "CPU without bf16 instructions (no AVX512_BF16 or AMX)")
    seconds = (measure or measure_bf16_speed)()
    gain = seconds["float32"] / seconds["mixed_bfloat16"]
    policy = "mixed_bfloat16" if gain >= BF16_GAIN_NEEDED else "float32"
    return PrecisionChoice(requested, policy, f"CPU with AVX512_BF16 but no AMX: a training step measured here ran "
                                              f"{gain:.2f}x as fast in mixed_bfloat16 as in float32 (needed: "
                                              f"{BF16_GAIN_NEEDED:.2f}x)", seconds)


def resolve_precision(requested: str, dev: DeviceInfo, flags=None, measure=None) -> str:
    """The dtype policy of ``choose_precision``."""
    return choose_precision(requested, dev, flags, measure).policy


_BF16_PROBE: dict | None = None


def measure_bf16_speed(steps: int = 4, batch: int = 64) -> dict:
    """Seconds per training step of a small convolution stack (64 channels, 32x32, batch ``batch``) in
    float32 and in mixed_bfloat16, the median of ``steps`` steps after one warm-up step, on this
    machine's CPU through Keras' own backend. Measured once per process."""
    global _BF16_PROBE
    if _BF16_PROBE is not None:
        return _BF16_PROBE
    import statistics
    import time

    import keras
    import numpy as np

    x = np.random.default_rng(0).standard_normal((batch, 32, 32, 64)).astype("float32")
    y = np.zeros((batch, 10), "float32")
    previous = keras.config.dtype_policy()
    out = {}
    try:
        for policy in ("float32", "mixed_bfloat16"):
            keras.config.set_dtype_policy(policy)
            inputs = keras.Input((32, 32, 64))
            h = inputs
            for _ in range(2):
                h = keras.layers.Conv2D(64, 3, padding="same", use_bias=False)(h)
                h = keras.layers.BatchNormalization()(h)
                h = keras.layers.ReLU()(h)
            h = keras.layers.GlobalAveragePooling2D()(h)
            model = keras.Model(inputs, keras.layers.Dense(10, dtype="float32")(h))
            model.compile(optimizer=keras.optimizers.SGD(0.01, momentum=0.9), loss="mse")
            times = []
            for i in range(steps + 1):
                t0 = time.perf_counter()
                model.train_on_batch(x, y)
                if i:
                    times.append(time.perf_counter() - t0)
            out[policy] = statistics.median(times)
    finally:
        keras.config.set_dtype_policy(previous)
    _BF16_PROBE = out
    return out


def replica_count(distribute: str, dev: DeviceInfo) -> int:
    """How many devices a data-parallel run splits each batch over; refuses what cannot work."""
    if distribute == "none":
        return 1
    if distribute == "multi-process":  # joined before the devices were probed: dev counts every process's devices
        if dev.backend != "jax":
            raise TrainError(f"--distribute multi-process runs on the JAX backend, not {dev.backend}.",
                             expected="KERAS_BACKEND=jax", fix="set KERAS_BACKEND=jax on every process")
        return dev.count
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
    ``multi-process``: the same DataParallel over the devices of every process (``jax.devices()`` lists them
    all once the processes have joined), with ``auto_shard_dataset=False``: each process's batches are
    already its own slice of the global batch (Keras would otherwise ask for a ``tf.data.Dataset``).
    """
    if distribute == "none":
        yield None
        return
    if dev.backend == "jax":
        import jax
        import keras

        previous = keras.distribution.distribution()
        keras.distribution.set_distribution(keras.distribution.DataParallel(
            devices=jax.devices(), auto_shard_dataset=distribute != "multi-process"))
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
