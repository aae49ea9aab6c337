"""CI gates: ``--max-drop PP`` and ``--min-speedup X``, evaluated on the artifacts a user named.

- max-drop: each artifact's top-1 change against the Keras float model (point estimate, in
  percentage points) must be >= -PP. Without a measured float reference the gate fails: it
  cannot be checked.
- min-speedup: each non-FP32 artifact's batch-1 p50 speed-up against the FP32 artifact of the
  same runtime measured in the same run must be >= X. FP32 artifacts (the baselines themselves)
  are exempt; a quantized artifact without an FP32 sibling in the run fails the gate.

Files added only as baselines are not gated. An artifact that could not be measured is reported
as an error of the run, not as a gate result.
"""

from __future__ import annotations

from resnet_deploy.errors import GateError


def evaluate_gates(report, options) -> list[dict]:
    gates: list[dict] = []
    for r in report.results:
        if r.role != "artifact" or not r.ok:
            continue
        if options.max_drop_pp is not None:
            gates.append(_max_drop(r, options.max_drop_pp))
        if options.min_speedup is not None and r.precision != "fp32" and r.format != "keras":
            gates.append(_min_speedup(r, options.min_speedup))
    return gates


def _max_drop(r, limit: float) -> dict:
    change = (r.vs_float or {}).get("change_pp")
    g = {"gate": "max-drop", "artifact": r.label, "figure": "top-1 change vs float model (pp)",
         "threshold": -limit, "value": change}
    if change is None:
        return {**g, "passed": False,
                "message": f"{r.label}: no accuracy change against the float model could be computed "
                           "(no float reference measured); pass --reference MODEL"}
    passed = change >= -limit - 1e-9
    lo, hi = r.vs_float.get("change_interval_pp", [None, None])
    return {**g, "passed": passed,
            "message": f"{r.label}: top-1 change {change:+.2f} pp (interval {lo:+.2f} to {hi:+.2f}) "
                       f"{'within' if passed else 'exceeds'} the allowed drop of {limit:g} pp"}


def _min_speedup(r, limit: float) -> dict:
    base = r.vs_baseline or {}
    speedup = (base.get("speedup") or {}).get("1")
    g = {"gate": "min-speedup", "artifact": r.label, "figure": "batch-1 p50 speed-up vs same-runtime FP32",
         "threshold": limit, "value": speedup}
    if speedup is None:
        why = ("no FP32 artifact of the same runtime was measured in the run" if not base
               else "no batch-1 latency for it or its baseline")
        return {**g, "passed": False,
                "message": f"{r.label}: speed-up cannot be checked: {why}; add the FP32 artifact to the inputs"}
    passed = speedup >= limit
    return {**g, "passed": passed,
            "message": f"{r.label}: batch-1 speed-up {speedup:.2f}x over {base['label']} "
                       f"{'meets' if passed else 'is below'} the required {limit:g}x"}


def gate_error(report) -> GateError | None:
    """The error the command exits with when a gate failed (None when all passed)."""
    failed = report.failed_gates
    if not failed:
        return None
    return GateError("Bench gate failed:\n" + "\n".join(f"  {g['gate']}: {g['message']}" for g in failed),
                     expected="every artifact within --max-drop and above --min-speedup",
                     fix="ship another artifact (the table shows them all), or relax the gate deliberately")
