"""What a bench run measures and how: one frozen, validated configuration (cheap to import)."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

from resnet_deploy.envinfo import usable_cores
from resnet_deploy.errors import BenchError, ResnetDeployError


@dataclass(frozen=True)
class BenchOptions:
    """Options of ``resnet-deploy bench`` (and of the library entry point ``run_bench``).

    Accuracy: the CIFAR-10 test split (``limit`` first images), predicted in batches of
    ``batch_size``; the float model's logits are cached (``cache``, ``cache_dir``). Latency: every file
    at batch 1 and at ``large_batch`` (a "series" each) in interleaved rounds (``bench.rounds``):
    ``warmup`` untimed calls per series, then rounds until every series is steady (its per-round
    medians' interval narrower than ``steady_width`` of the median) and at least ``min_rounds`` rounds,
    ``runs`` calls per series and ``min_time_s`` seconds are done, or until ``max_time_s`` per series
    is spent (the budget of the whole timing phase is ``max_time_s`` times the number of series);
    ``threads`` for every runtime.
    """

    reference: Path | None = None  # the float Keras model; default: the artifacts' manifests
    data: Path | None = None  # CIFAR-10 location (see `resnet-deploy data`)
    limit: int | None = None  # first N test images; None = the whole test split
    batch_size: int = 256  # accuracy pass
    threads: int | None = None  # None = every core this process may use
    accuracy: bool = True
    latency: bool = True
    large_batch: int = 32  # the "larger batch" latency is measured at (besides batch 1)
    warmup: int = 10
    runs: int = 50
    min_time_s: float = 0.0
    max_time_s: float = 10.0  # per artifact and batch size
    noisy_cv: float = 0.10  # coefficient of variation above which a timing is flagged noisy
    isolate: bool = True  # each artifact in its own child process (per-artifact RSS, crash isolation)
    baselines: bool = True  # add the FP32 sibling of a quantized artifact found next to it
    bootstrap: int = 2000  # paired bootstrap resamples for the accuracy-change interval
    confidence: float = 0.95
    seed: int = 0
    max_drop_pp: float | None = None  # gate: accuracy change against the float model >= -max_drop_pp
    min_speedup: float | None = None  # gate: batch-1 speed-up against the same-runtime FP32 artifact
    gate_fp16: bool = False  # also hold FP16 artifacts to min_speedup (on CPUs FP16 buys size, not speed)
    timeout_s: float | None = None  # per isolated file; None: derived from the work (file_timeout_s)
    min_rounds: int = 6  # interleaved timing rounds at least (6: a 96.9 % interval for a median)
    steady_width: float = 0.10  # a series (or a ratio) is steady when its interval is narrower than this share
    allow_stale: bool = False  # bench artifacts exported from another float model (marked, not gated)
    cache: bool = True  # read and write the float model's cached test-set logits
    cache_dir: Path | None = None  # None: $RESNET_DEPLOY_CACHE or ~/.cache/resnet-deploy
    runtimes: tuple[str, ...] = ("onnxruntime",)  # the runtimes every ONNX file runs in, a row each
    allow_saturating: bool = False  # bench ONNX INT8 files whose U8S8 kernels saturate on this CPU (marked)
    # memory cap (bytes, RLIMIT_DATA) of each isolated file's process; None: no cap. Larger than predict's 2 GiB:
    # a bench child holds a chunk of the split, its logits and a batch of --batch-size activations
    max_memory: int | None = 4 << 30

    SPEEDUP_GATED = ("int8", "dynamic_int8")  # precisions --min-speedup applies to (+ fp16 with gate_fp16)
    # The derived per-file timeout (time without progress): a fixed allowance for the runtime's import and
    # the load, one latency series with a safety factor, and a slow pace for one accuracy chunk.
    TIMEOUT_FIXED_S = 300.0
    TIMEOUT_LATENCY_FACTOR = 3.0
    # 10 images/s: a third of the slowest pace measured here (ResNet34 TFLite FP32, 1 thread: 30 images/s)
    TIMEOUT_PER_IMAGE_S = 0.1

    def __post_init__(self):
        if self.threads is None:
            object.__setattr__(self, "threads", usable_cores())
        for name in ("reference", "data", "cache_dir"):
            v = getattr(self, name)
            if v is not None:
                object.__setattr__(self, name, Path(v))
        object.__setattr__(self, "runtimes", _onnx_runtimes(self.runtimes))
        _positive(self, "batch_size", "threads", "large_batch", "runs", "bootstrap", "min_rounds")
        cores = usable_cores()
        if self.threads > cores:
            raise BenchError(f"--threads {self.threads} is more than the {cores} cores this process may use.",
                             expected=f"1 to {cores}: more threads than cores time contention, not the model",
                             fix=f"pass --threads {cores} or less, or leave it out (every usable core)")
        if not 0 < self.steady_width:
            raise BenchError(f"steady_width must be positive, got {self.steady_width}.", expected="e.g. 0.10")
        if self.limit is not None and self.limit < 1:
            raise BenchError(f"--limit must be a positive number of images, got {self.limit}.",
                             fix="leave it out to use the whole test split")
        if self.warmup < 0 or self.min_time_s < 0 or self.max_time_s <= 0:
            raise BenchError(f"Bad timing options: warmup={self.warmup}, min_time={self.min_time_s}, "
                             f"max_time={self.max_time_s}.",
                             expected="warmup >= 0, min-time >= 0 and max-time > 0 (seconds)")
        if self.timeout_s is not None and not self.timeout_s > 0:
            raise BenchError(f"--timeout {self.timeout_s} is not a positive number of seconds.",
                             fix="leave it out for a limit derived from --max-time and the number of images")
        if self.max_memory is not None:
            from resnet_deploy.untrusted.files import parse_memory

            try:
                object.__setattr__(self, "max_memory", parse_memory(self.max_memory))
            except ResnetDeployError as exc:
                raise BenchError(exc.what, expected=exc.expected, fix=exc.fix) from None
        if not 0 < self.confidence < 1:
            raise BenchError(f"Confidence {self.confidence} is not a probability.", expected="e.g. 0.95")
        if not 0 < self.noisy_cv:
            raise BenchError(f"noisy_cv must be positive, got {self.noisy_cv}.")
        if self.max_drop_pp is not None and self.max_drop_pp < 0:
            raise BenchError(f"--max-drop {self.max_drop_pp} is negative.",
                             expected="the largest accepted accuracy drop in percentage points, e.g. 1.0")
        if self.min_speedup is not None and self.min_speedup <= 0:
            raise BenchError(f"--min-speedup {self.min_speedup} is not positive.", expected="a ratio such as 2.0")
        if self.min_speedup is not None and not self.latency:
            raise BenchError("--min-speedup needs latency figures, but latency is switched off.",
                             fix="drop --no-latency or the --min-speedup gate")
        if self.max_drop_pp is not None and not self.accuracy:
            raise BenchError("--max-drop needs accuracy figures, but accuracy is switched off.",
                             fix="drop --no-accuracy or the --max-drop gate")

    @property
    def batch_sizes(self) -> tuple[int, ...]:
        return (1,) if self.large_batch == 1 else (1, self.large_batch)

    @property
    def speedup_gated_precisions(self) -> tuple[str, ...]:
        return self.SPEEDUP_GATED + (("fp16",) if self.gate_fp16 else ())

    def file_timeout_s(self, eval_images: int) -> float:
        """Seconds an isolated file may go without progress before its process is killed: ``timeout_s``
        when given, else derived from the longest stage between two heartbeats (``child._receive``): the
        import and load, one timing block, one accuracy chunk (``measure.ACCURACY_CHUNK`` images at most)."""
        from resnet_deploy.bench.measure import ACCURACY_CHUNK

        if self.timeout_s is not None:
            return float(self.timeout_s)
        latency = (self.max_time_s + self.min_time_s) if self.latency else 0.0
        chunk = min(eval_images, self.batch_size * max(1, ACCURACY_CHUNK // self.batch_size))
        return self.TIMEOUT_FIXED_S + self.TIMEOUT_LATENCY_FACTOR * latency + self.TIMEOUT_PER_IMAGE_S * chunk

    def to_dict(self) -> dict:
        d = asdict(self)
        for k in ("reference", "data", "cache_dir"):
            d[k] = str(d[k]) if d[k] is not None else None
        d["runtimes"] = list(self.runtimes)
        return d


def _onnx_runtimes(names) -> tuple[str, ...]:
    """The ONNX runtimes asked for (a comma-separated text or a sequence), each known and installed, in
    order and without repeats; a BenchError before any work otherwise."""
    from resnet_deploy.config import Format
    from resnet_deploy.errors import ResnetDeployError
    from resnet_deploy.runtimes import check_runtime, runtimes_for

    if isinstance(names, str):
        names = names.split(",")
    out = tuple(dict.fromkeys(n.strip().lower() for n in names if n and n.strip()))
    if not out:
        raise BenchError("--runtimes names no runtime.", expected=f"a comma-separated list of "
                                                                  f"{', '.join(runtimes_for(Format.ONNX))}",
                         fix="e.g. --runtimes onnxruntime,openvino, or leave it out (onnxruntime)")
    for n in out:
        try:
            check_runtime(n, Format.ONNX, option="--runtimes")
        except ResnetDeployError as exc:
            raise BenchError(exc.what, expected=exc.expected, fix=exc.fix) from None
    return out


def _positive(opts, *names: str) -> None:
    for name in names:
        v = getattr(opts, name)
        if not isinstance(v, int) or v < 1:
            raise BenchError(f"{name.replace('_', '-')} must be a positive integer, got {v!r}.")
