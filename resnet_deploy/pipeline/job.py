"""The main job end to end: load (or train) a ResNet, export every artifact, bench them, write the report.

By default it takes the best pretrained model the package carries (``models.pretrained``: a
converged CIFAR-10 ResNet20 trained by ``resnet-deploy train``), or ``--model PATH|NAME``, so a
fresh machine sees the whole tool work on a real model with one command (`make demo`), offline on
a local CIFAR-10 copy, in minutes on a 2-core CPU. ``--train`` trains a model first instead (the
old short demo run: ResNet20, a few epochs on a subset). Every stage is the same library call its
own command makes.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from resnet_deploy.bench.results import BenchReport
from resnet_deploy.errors import BenchError, ResnetDeployError
from resnet_deploy.fileio import check_can_write


@dataclass(frozen=True)
class PipelineResult:
    """What the main job did: the float model, the artifacts, the bench report, the time of each stage."""

    model: Path
    test_accuracy: float | None  # recorded in the model's metadata (or measured by --train)
    trained: bool
    artifacts: list  # the exported files
    report: BenchReport
    timings: dict  # train_s, export_s, bench_s
    options: dict  # the PipelineOptions, as a dict

    @property
    def ok(self) -> bool:
        """Every file benched (no error in the report) and every gate passed."""
        return self.report.ok

    def to_json(self) -> dict:
        return {"model": str(self.model), "test_accuracy": self.test_accuracy, "trained": self.trained,
                "artifacts": [str(p) for p in self.artifacts], "report": self.report.to_dict(),
                "timings": self.timings, "options": self.options, "ok": self.ok}

    @classmethod
    def from_json(cls, d: dict) -> "PipelineResult":
        return cls(Path(d["model"]), d.get("test_accuracy"), bool(d.get("trained")),
                   [Path(p) for p in d.get("artifacts", [])], BenchReport.from_dict(d["report"]),
                   dict(d.get("timings") or {}), dict(d.get("options") or {}))


@dataclass(frozen=True)
class PipelineOptions:
    out: Path = Path("demo")
    model: str | None = None  # a .keras path or a pretrained name; None: the best pretrained model
    train: bool = False  # train a model first (arch, width, epochs, batch_size, limit_train) instead of loading one
    arch: str = "resnet20"
    width: float = 1.0
    epochs: int = 5
    batch_size: int = 128
    limit_train: int | None = 20_000  # first N training images (None: all 49,923)
    limit_test: int | None = None  # test images for the training report and the bench (None: all)
    calib_samples: int = 300
    threads: int | None = None  # bench threads (None: every usable core)
    runtimes: str | None = None  # ONNX runtimes bench runs each .onnx file in (None: every installed one)
    seed: int = 0
    force: bool = False

    def __post_init__(self):
        object.__setattr__(self, "out", Path(self.out))
        if self.train and self.model is not None:
            raise ResnetDeployError("--train and --model contradict each other.",
                                    fix="--model PATH benches a model you have; --train trains a new one: pass one")
        if self.epochs < 1:
            raise ResnetDeployError(f"--epochs {self.epochs} is not a training run.", expected="1 or more")
        for name in ("limit_train", "limit_test"):
            v = getattr(self, name)
            if v is not None and v < 100:
                raise ResnetDeployError(f"--{name.replace('_', '-')} {v} is too small for a meaningful report.",
                                        expected="at least 100 images, or leave it out for the whole split")


def run_pipeline(options: PipelineOptions, data=None, progress: Callable[[str], None] = print) -> PipelineResult:
    """Load or train -> export (TFLite and ONNX, FP32/FP16/INT8) -> bench; returns the ``PipelineResult``: the
    paths it wrote and the bench report. A file bench could not measure does not raise here (its error is in the report, and
    ``ok`` is False): ``write_reports`` writes the report, then raises (``pipeline_error``)."""
    from resnet_deploy.bench.options import BenchOptions
    from resnet_deploy.bench import run_bench
    from resnet_deploy.converters.export import export_model
    from resnet_deploy.converters.options import CalibrationOptions, ExportOptions
    from resnet_deploy.data.sources import load_cifar10

    out = options.out
    check_can_write(out, options.force, "pipeline output folder")
    if options.runtimes:
        BenchOptions(runtimes=options.runtimes)  # an unknown or missing runtime fails before any work
    model_path = None if options.train else _chosen_model(options, progress)  # fails before any work
    ds = load_cifar10(data)  # once, for all three stages; fails before any work
    for note in ds.notes:
        progress(f"data: {note}")
    timings = {}

    t0 = time.perf_counter()
    if options.train:
        model_path, test_accuracy = _train(options, ds, progress)
    else:
        test_accuracy = _recorded_accuracy(model_path)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress("[2/3] export TFLite and ONNX at FP32, FP16 and INT8, calibrated on training images")
    artifacts = export_model(model_path,
                             ExportOptions(fp16=True, int8=True, out_dir=out / "artifacts", force=options.force,
                                           calibration=CalibrationOptions(options.calib_samples, options.seed)),
                             data=ds, progress=progress)
    timings["export_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    progress("[3/3] bench every artifact against the float model")
    bench_opts = BenchOptions(reference=model_path, limit=options.limit_test, threads=options.threads,
                              seed=options.seed, runtimes=options.runtimes or _installed_onnx_runtimes())
    report = run_bench([a.path for a in artifacts], bench_opts, data=ds, progress=progress)
    timings["bench_s"] = time.perf_counter() - t0
    return PipelineResult(model_path, test_accuracy, options.train, [a.path for a in artifacts], report, timings,
                          _options_dict(options))


def _options_dict(options: PipelineOptions) -> dict:
    d = asdict(options)
    d["out"] = str(options.out)
    return d


def _installed_onnx_runtimes() -> tuple[str, ...]:
    """ONNX Runtime, and OpenVINO where it is installed (``pip install 'resnet-deploy[openvino]'``, which make does)."""
    from resnet_deploy.config import Format
    from resnet_deploy.runtimes import available_runtimes

    return available_runtimes(Format.ONNX)


def _chosen_model(options: PipelineOptions, progress) -> Path:
    from resnet_deploy.models.pretrained import best_pretrained, list_pretrained, resolve_model, verify

    if options.model is None:
        chosen = best_pretrained()
        verify(chosen)
        progress(f"[1/3] load the pretrained {chosen.name} ({chosen.path}; {100 * chosen.test_accuracy:.2f} % on "
            f"{chosen.card['test_images']:,} test images by its card)")
        return chosen.path
    path = resolve_model(options.model)
    for known in list_pretrained():
        if known.path == path:
            verify(known)
    progress(f"[1/3] load {path}")
    return path


def _recorded_accuracy(model_path: Path) -> float | None:
    from resnet_deploy.models.io import read_metadata

    meta = read_metadata(model_path) or {}
    return meta.get("test_accuracy")


def _train(options: PipelineOptions, ds, progress) -> tuple[Path, float]:
    from resnet_deploy.training.recipe import TrainConfig
    from resnet_deploy.training.trainer import train_model

    progress(f"[1/3] train {options.arch} x{options.width:g} for {options.epochs} epochs")
    trained = train_model(TrainConfig(arch=options.arch, width=options.width, epochs=options.epochs,
                                      batch_size=options.batch_size, warmup_epochs=min(1.0, options.epochs / 4),
                                      limit_train=options.limit_train, limit_test=options.limit_test,
                                      seed=options.seed, out_dir=options.out / "train", force=options.force),
                          data=ds, log=progress)
    return trained.model_path, trained.test_accuracy


def pipeline_error(result: PipelineResult) -> BenchError | None:
    """The error the main job ends with when bench could not measure a file (exit 2, as ``bench``)."""
    report = result.report
    if not report.errors:
        return None
    names = ", ".join(r.label for r in report.errors)
    return BenchError(f"{len(report.errors)} file(s) of the pipeline could not be benchmarked: {names}.",
                      expected="every exported artifact loads and runs",
                      fix="see the ERROR lines above and report.json; the other files' results are in the report")


def write_reports(result: PipelineResult, out: str | Path, console=None, raise_on_error: bool = True) -> dict[str, Path]:
    """Print the bench table and write ``report.json``, ``report.md`` and ``report.png`` into ``out``;
    then, with ``raise_on_error``, raise ``pipeline_error(result)`` when a file could not be measured
    (the report files are written first, as ``bench`` does)."""
    from resnet_deploy.bench.report import print_report, write_json, write_markdown, write_plot

    out = Path(out)
    report = result.report
    print_report(report, console)
    paths = {"json": write_json(report, out / "report.json"), "markdown": write_markdown(report, out / "report.md"),
             "plot": write_plot(report, out / "report.png")}
    t = result.timings
    acc = f"{result.test_accuracy:.2%} test accuracy recorded" if result.test_accuracy is not None \
        else "no recorded test accuracy"
    first = f"train {t['train_s']:.0f} s, " if result.trained else ""
    print(f"pipeline: float model {result.model} ({acc}), {len(result.artifacts)} artifacts; "
          f"{first}export {t['export_s']:.0f} s, bench {t['bench_s']:.0f} s")
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    err = pipeline_error(result) if raise_on_error else None
    if err is not None:
        raise err
    return paths
