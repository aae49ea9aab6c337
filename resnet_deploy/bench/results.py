"""What a bench run found: one ``ArtifactResult`` per file (from its selection to its figures), the
``BenchReport`` around them, and the error entries a file that could not be measured carries instead of
figures.

``BenchReport.to_dict()`` is the JSON document described in docs/bench-report-schema.md.
"""

from __future__ import annotations

import datetime as _dt
import signal
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from resnet_deploy.artifact import Manifest
from resnet_deploy.errors import ResnetDeployError

SCHEMA_VERSION = 2


# Error entries -----------------------------------------------------------------------------------
def error_entry(kind: str, what: str, expected: str | None, fix: str | None, **extra) -> dict:
    """One ``errors[]`` entry: ``kind``, ``message`` (what/expected/fix rendered as one text), ``what``,
    ``expected``, ``fix`` (+ ``traceback`` for unexpected failures)."""
    message = ResnetDeployError(what, expected, fix).render()
    return {"kind": kind, "message": message, "what": what, "expected": expected, "fix": fix, **extra}


def error_dict(exc: ResnetDeployError) -> dict:
    """The ``errors[]`` entry of a user-facing error (its class name as ``kind``)."""
    return error_entry(type(exc).__name__, exc.what, exc.expected, exc.fix)


def crash_error(path: Path, exitcode: int | None, max_memory: int | None = None) -> dict:
    how = f"exit code {exitcode}"
    if exitcode is not None and exitcode < 0:
        try:
            how = f"signal {signal.Signals(-exitcode).name}"
        except ValueError:
            pass
    fix = "the file may be corrupt or built for another runtime version; re-export it"
    if max_memory:
        from resnet_deploy.untrusted.files import format_bytes

        fix += (f"; or it needed more than --max-memory {format_bytes(max_memory)} (a runtime that cannot "
                f"allocate often aborts): raise --max-memory if you trust the file")
    return error_entry("crash", f"The runtime crashed while benchmarking {path} ({how}).",
                       "a runtime that loads and runs the artifact", fix)


def timeout_error(path: Path, timeout_s: float | None) -> dict:
    return error_entry("timeout", f"Benchmarking {path} made no progress within {timeout_s:g} s; its process "
                                  "was killed.",
                       "the load, each timing block and each accuracy chunk to finish within the per-file "
                       "timeout",
                       "the runtime may hang on this file (re-export it); if it is only slow, raise --timeout "
                       "or lower --limit / --max-time")


def unexpected_error(exc: BaseException, path, tb: str) -> dict:
    """A runtime failing in a way nobody anticipated: the entry keeps the traceback."""
    return error_entry("unexpected " + type(exc).__name__,
                       f"{type(exc).__name__} while benchmarking {path}: {str(exc)[:500]}",
                       "the runtime loads and runs the artifact",
                       "see the traceback; if the file is fine, this is a bug of resnet-deploy or of the runtime",
                       traceback=tb)


# Results -----------------------------------------------------------------------------------------


@dataclass
class ArtifactResult:
    """One file of a bench run, from its selection (what is known before measuring: format, manifest, role,
    runtime, refusals) to its figures. ``to_dict()`` is its entry in the report's ``results``."""

    label: str
    path: Path
    role: str  # reference | artifact | baseline (an FP32 sibling added for fair ratios)
    format: str | None = None
    precision: str = "unknown"
    manifest: Manifest | None = field(default=None, repr=False)  # in memory; the report says has_manifest
    runtime: dict | None = None  # runner.describe(): runtime name, threads, providers / input dtype / precisions
    runtime_name: str | None = None  # the runtime the row runs in (keras, litert, onnxruntime, openvino)
    executed_precision: str | None = None  # what the runtime reports it ran (OpenVINO: f32, u8, bf16, mixed)
    saturating: bool = False  # benched with --allow-saturating although its U8S8 kernels saturate on this CPU
    notes: list = field(default_factory=list)
    error: dict | None = None
    stale: bool = False  # benched with --allow-stale although exported from another float model: not gated
    size_bytes: int | None = None
    sha256: str | None = None
    timing: dict = field(default_factory=dict)  # import_s, load_s, first_run_s, first_inference_s, accuracy_pass_s
    latency: dict = field(default_factory=dict)  # "1" / "32" -> stats (ms, images/s)
    memory: dict = field(default_factory=dict)  # artifact_rss_bytes, peak_rss_bytes, rss_before_load_bytes, ...
    io: dict | None = None  # runner.io_spec(): preprocessing, input and output tensors
    accuracy: dict | None = None  # top1, interval, per_class, confusion_matrix
    vs_float: dict | None = None  # accuracy change + McNemar + agreement + logit error + ratios
    vs_baseline: dict | None = None  # ratios against the FP32 artifact of the same runtime
    logits: np.ndarray | None = field(default=None, repr=False)  # kept in memory, never written
    # per batch size, the seconds of each call, one array per interleaved round (for the ratios; not written)
    round_times: dict = field(default_factory=dict, repr=False)
    supports_batch: bool = True

    def __post_init__(self):
        self.path = Path(self.path)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def has_manifest(self) -> bool:
        return self.manifest is not None

    @property
    def source_sha256(self) -> str | None:
        """The sha256 of the float model the manifest says this file was exported from."""
        src = self.manifest.source if self.manifest else None
        return src.sha256 if src else None

    def in_runtime(self, runtime: str) -> "ArtifactResult":
        """The same file, selected to run in ``runtime`` (a row of its own, nothing measured yet)."""
        return ArtifactResult(self.label, self.path, self.role, self.format, self.precision, self.manifest,
                              runtime_name=runtime, notes=list(self.notes), error=self.error, stale=self.stale,
                              size_bytes=self.size_bytes, sha256=self.sha256, saturating=self.saturating)

    def p50_ms(self, batch: int = 1) -> float | None:
        s = self.latency.get(str(batch)) or {}
        return s.get("p50_ms")

    def to_dict(self) -> dict:
        out = {}
        for k, v in self.__dict__.items():
            if k == "manifest":
                continue
            if k == "saturating":
                out[k], out["has_manifest"] = v, self.has_manifest
            elif k not in _IN_MEMORY_ONLY:
                out[k] = str(v) if k == "path" else v
        return out


_IN_MEMORY_ONLY = ("logits", "round_times", "supports_batch")


@dataclass
class BenchReport:
    machine: dict
    libraries: dict
    options: dict
    data: dict  # source, split, images, limit
    reference: dict  # label, path, notes (how it was found, or why there is none)
    results: list[ArtifactResult]
    gates: list[dict] = field(default_factory=list)
    not_gated: list[dict] = field(default_factory=list)  # {gate, artifact, reason}: a gate that does not apply
    created: str = field(default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    duration_s: float | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def reference_result(self) -> ArtifactResult | None:
        return next((r for r in self.results if r.role == "reference"), None)

    @property
    def errors(self) -> list[ArtifactResult]:
        return [r for r in self.results if r.error is not None]

    @property
    def failed_gates(self) -> list[dict]:
        return [g for g in self.gates if not g["passed"]]

    @property
    def ok(self) -> bool:
        return not self.errors and not self.failed_gates

    def result(self, label: str) -> ArtifactResult:
        for r in self.results:
            if r.label == label or str(r.path) == label:
                return r
        raise KeyError(label)

    def to_dict(self) -> dict:
        return {
            "schema_version": self.schema_version,
            "tool": "resnet-deploy bench",
            "created": self.created,
            "duration_s": self.duration_s,
            "machine": self.machine,
            "libraries": self.libraries,
            "options": self.options,
            "data": self.data,
            "reference": self.reference,
            "results": [r.to_dict() for r in self.results],
            "gates": self.gates,
            "not_gated": self.not_gated,
            "ok": self.ok,
            "errors": [{"label": r.label, **r.error} for r in self.errors],
        }

    @classmethod
    def from_dict(cls, d: dict) -> "BenchReport":
        """A report read back from its JSON (``to_dict``): the figures, without the in-memory logits."""
        names = {f.name for f in fields(ArtifactResult)} - {"manifest", *_IN_MEMORY_ONLY}
        results = [ArtifactResult(**{k: v for k, v in r.items() if k in names}) for r in d.get("results", [])]
        return cls(d.get("machine") or {}, d.get("libraries") or {}, d.get("options") or {}, d.get("data") or {},
                   d.get("reference") or {}, results, gates=list(d.get("gates") or []),
                   not_gated=list(d.get("not_gated") or []), created=d.get("created") or "",
                   duration_s=d.get("duration_s"), schema_version=d.get("schema_version", SCHEMA_VERSION))
