"""CI gates: ``--max-drop PP`` and ``--min-speedup X``, evaluated on the artifacts a user named.

- max-drop: each artifact's top-1 change against the Keras float model (point estimate, in
  percentage points) must be >= -PP. Without a measured float reference the gate fails: it
  cannot be checked.
- min-speedup: a quantized artifact (``int8``, ``dynamic_int8``; ``fp16`` too with ``gate_fp16``)
  must run batch 1 at least X times as fast as the FP32 artifact of the same runtime and the same
  source model measured in the same run, judged at the conservative (low) end of the speed-up's
  interval over the interleaved timing rounds (``bench.rounds``). Quantization is what the gate is about, so it applies where quantization is
  meant to buy speed, and it fails closed: a quantized artifact whose FP32 baseline is missing or
  could not be measured fails (the speed-up cannot be checked, as max-drop without a reference).
  Artifacts the gate does not apply to are listed as not gated, with the reason, never silently
  passed: FP32 files (they are the baselines), FP16 files unless ``gate_fp16`` (on CPUs FP16
  halves the size but runs at about FP32 speed, since the weights are widened at load), files
  whose precision is unknown (no manifest says they are quantized) and Keras models.

Files added only as baselines are not gated, nor stale artifacts benched with ``--allow-stale``
(compared with a float model they were not exported from; listed as not gated). An artifact that
could not be measured is reported as an error of the run, not as a gate result.
"""

from __future__ import annotations

from resnet_deploy.errors import GateError


def evaluate_gates(report, options) -> list[dict]:
    """One result per (named artifact, requested gate that applies to it); ``passed`` is a bool."""
    gates: list[dict] = []
    for r in _named(report):
        if r.stale:
            continue
        if options.max_drop_pp is not None:
            gates.append(_max_drop(r, options.max_drop_pp, report))
        if options.min_speedup is not None and _speedup_applies(r, options):
            gates.append(_min_speedup(r, options.min_speedup, report))
    return gates


def not_gated(report, options) -> list[dict]:
    """``{gate, artifact, reason}`` for each named artifact a requested gate does not apply to."""
    out = []
    stale = ("stale (--allow-stale): exported from another float model than the reference, so its figures "
             "say nothing about this one")
    for r in _named(report):
        if r.stale:
            out += [{"gate": g, "artifact": r.label, "reason": stale} for g, v in
                    (("max-drop", options.max_drop_pp), ("min-speedup", options.min_speedup)) if v is not None]
        elif options.min_speedup is not None and not _speedup_applies(r, options):
            out.append({"gate": "min-speedup", "artifact": r.label, "reason": _not_gated_reason(r)})
    return out


def _named(report):
    return [r for r in report.results if r.role == "artifact" and r.ok]


def _speedup_applies(r, options) -> bool:
    return r.format != "keras" and r.precision in options.speedup_gated_precisions


def _not_gated_reason(r) -> str:
    if r.format == "keras":
        return "the Keras float model: nothing to compare it with"
    if r.precision == "fp32":
        return "FP32: it is the baseline the quantized artifacts are compared with"
    if r.precision == "fp16":
        return "FP16: on CPUs it buys size, not speed (pass --gate-fp16 to gate it, e.g. on a GPU)"
    return "precision unknown (no manifest): nothing says it is quantized, so no speed-up is expected of it"


def _max_drop(r, limit: float, report) -> dict:
    change = (r.vs_float or {}).get("change_pp")
    g = {"gate": "max-drop", "artifact": r.label, "figure": "top-1 change vs float model (pp)",
         "threshold": -limit, "value": change}
    if change is None:
        ref = report.reference_result
        if ref is not None and not ref.ok:
            why = (f"the float reference {ref.label} could not be measured (its error is in the report); "
                   "fix it or pass another with --reference MODEL")
        elif ref is not None:
            why = (f"no accuracy comparison with the float reference {ref.label} was computed; check that it "
                   "is the artifact's float model (--reference MODEL)")
        else:
            why = "no float reference was found; pass --reference MODEL"
        return {**g, "passed": False, "message": f"{r.label}: accuracy change cannot be checked: {why}"}
    passed = change >= -limit - 1e-9
    lo, hi = r.vs_float.get("change_interval_pp", [None, None])
    return {**g, "passed": passed,
            "message": f"{r.label}: top-1 change {change:+.2f} pp (interval {lo:+.2f} to {hi:+.2f}) "
                       f"{'within' if passed else 'exceeds'} the allowed drop of {limit:g} pp"}


def _min_speedup(r, limit: float, report) -> dict:
    base = r.vs_baseline or {}
    speedup = (base.get("speedup") or {}).get("1")
    interval = (base.get("speedup_interval") or {}).get("1") or [speedup, speedup]
    low = interval[0]
    g = {"gate": "min-speedup", "artifact": r.label,
         "figure": "batch-1 speed-up vs same-runtime FP32, low end of its interval over the timing rounds",
         "threshold": limit, "value": low, "estimate": speedup, "interval": interval}
    if speedup is None:
        broken = [b.label for b in report.results if b is not r and not b.ok and b.format == r.format
                  and b.precision == "fp32" and b.runtime_name == r.runtime_name]
        if base:
            why = "no batch-1 latency for it or its baseline"
        elif broken:
            why = f"its FP32 baseline {broken[0]} could not be measured (its error is in the report)"
        else:
            why = "no FP32 artifact of the same runtime was measured in the run; add the FP32 artifact to the inputs"
        return {**g, "passed": False, "message": f"{r.label}: speed-up cannot be checked: {why}"}
    passed = low >= limit
    return {**g, "passed": passed,
            "message": f"{r.label}: batch-1 speed-up {speedup:.2f}x [{interval[0]:.2f}, {interval[1]:.2f}] over "
                       f"{base['label']}: its low end {'meets' if passed else 'is below'} the required {limit:g}x"}


def gate_error(report) -> GateError | None:
    """The error the command exits with when a gate failed (None when all passed)."""
    failed = report.failed_gates
    if not failed:
        return None
    return GateError("Bench gate failed:\n" + "\n".join(f"  {g['gate']}: {g['message']}" for g in failed),
                     expected="every artifact within --max-drop and above --min-speedup",
                     fix="ship another artifact (the table shows them all), or relax the gate deliberately")
