"""What a bench run found: one ``ArtifactResult`` per file and the ``BenchReport`` around them.

``BenchReport.to_dict()`` is the JSON document described in docs/bench-report-schema.md.
"""

from __future__ import annotations

import datetime as _dt
from dataclasses import dataclass, field

import numpy as np

SCHEMA_VERSION = 1


@dataclass
class ArtifactResult:
    label: str
    path: str
    role: str  # reference | artifact | baseline
    format: str | None
    precision: str
    runtime: dict | None = None  # runner.describe(): runtime name, threads, providers / input dtype
    has_manifest: bool = False
    notes: list = field(default_factory=list)
    error: dict | None = None
    size_bytes: int | None = None
    sha256: str | None = None
    timing: dict = field(default_factory=dict)  # import_s, load_s, first_run_s, first_inference_s, accuracy_pass_s
    latency: dict = field(default_factory=dict)  # "1" / "32" -> stats (ms, images/s)
    memory: dict = field(default_factory=dict)  # artifact_rss_bytes, peak_rss_bytes, rss_before_load_bytes, ...
    accuracy: dict | None = None  # top1, interval, per_class, confusion_matrix
    vs_float: dict | None = None  # accuracy change + McNemar + agreement + logit error + ratios
    vs_baseline: dict | None = None  # ratios against the FP32 artifact of the same runtime
    logits: np.ndarray | None = field(default=None, repr=False)  # kept in memory, never written

    @property
    def ok(self) -> bool:
        return self.error is None

    def p50_ms(self, batch: int = 1) -> float | None:
        s = self.latency.get(str(batch)) or {}
        return s.get("p50_ms")

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "logits"}


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
            if r.label == label or r.path == label:
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
