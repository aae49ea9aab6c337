"""Writers of a ``BenchReport``: the terminal tables (rich), JSON, Markdown and the plot (matplotlib, Agg
backend: each file's top-1 change against the float model and its latency, with their intervals). Every file
is written atomically.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from resnet_deploy.bench.results import ArtifactResult, BenchReport
from resnet_deploy.data.constants import CLASS_NAMES
from resnet_deploy.fileio import atomic_path, write_json_atomic

# Headers kept short so that both tables fit an 80-column CI log; the Markdown legend spells them out.
ACCURACY_COLUMNS = ("artifact", "runtime", "prec", "top-1 %", "Δ top-1 pp [95% CI]", "McNemar p", "agree %",
                    "max |Δlogit|")
PROBABILITY_HEADER = "max |Δprob|"  # the last accuracy column for a model whose outputs are probabilities
COST_COLUMNS = ("artifact", "p50 ms", "p99 ms", "img/s b{B}", "× FP32", "× Keras", "size", "size ÷", "mem", "mem ÷",
                "1st inf ms")
LEGEND = ("p50/p99 ms: batch-1 latency percentiles over all timed calls; img/s b{B}: throughput at batch {B}; "
          "× FP32: batch-1 speed-up against the FP32 artifact of the same runtime and source model, the median over "
          "interleaved timing rounds of the per-round ratio, with its interval in the detail below; × Keras: the "
          "same against the Keras float model; size ÷: the Keras file's size divided by the artifact's; sizes and "
          "memory in MB = 10^6 bytes; mem: the memory "
          "loading and running the file added to its process (peak RSS minus the RSS just before loading, so "
          "the harness, the runtime's import and the test images are not counted); mem ÷: the Keras model's mem "
          "divided by the artifact's; 1st inf ms: load + first batch-1 run; "
          "⚠: noisy (a series whose per-round medians did not settle within the steadiness width, or a ratio "
          "built on one or with a wide interval): not a finding.")


# Cells ------------------------------------------------------------------------------------------
def accuracy_row(r: ArtifactResult) -> list[str]:
    if not r.ok:
        return [_label(r), _runtime(r), r.precision, "error", "", "", "", ""]
    a, v = r.accuracy or {}, r.vs_float or {}
    top1 = f"{100 * a['top1']:.2f}" if a else "–"
    if "change_pp" in v:
        lo, hi = v["change_interval_pp"]
        change = f"{v['change_pp']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
        mc, agree = f"{v['mcnemar_p']:.2g} ({v['losses']}↓{v['gains']}↑)", f"{100 * v['agreement']:.2f}"
        err = f"{v['logit_error']['max_abs']:.3g}"
    elif r.role == "baseline":
        change = mc = agree = err = "(speed only)"
    else:
        change = mc = agree = err = "–" if r.role != "reference" else "ref"
    return [_label(r), _runtime(r), r.precision, top1, change, mc, agree, err]


def cost_row(r: ArtifactResult, large: int) -> list[str]:
    if not r.ok:
        return [_label(r), "error"] + [""] * (len(COST_COLUMNS) - 2)
    b1 = r.latency.get("1") or {}
    bn = r.latency.get(str(large)) or {}
    base = r.vs_baseline
    vs_base = "base" if r.format != "keras" and r.precision == "fp32" else (_speedup(base) if base else "–")
    if r.role == "reference":
        vs_base = "ref"
    vf = r.vs_float or {}
    return [
        _label(r),
        _ms(b1.get("p50_ms")) + (" ⚠" if b1.get("noisy") else ""),
        _ms(b1.get("p99_ms")),
        f"{bn['throughput_ips']:.0f}" + (" ⚠" if bn.get("noisy") else "") if "throughput_ips" in bn else "–",
        vs_base,
        _speedup(vf) if r.role != "reference" else "1.00x",
        _bytes(r.size_bytes),
        _x(vf.get("size_reduction")) if r.role != "reference" else "1.00x",
        _bytes(r.memory.get("artifact_rss_bytes")),
        _inverse_x(vf.get("artifact_rss_ratio")) if r.role != "reference" else "1.00x",
        _ms(1e3 * r.timing["first_inference_s"]) if "first_inference_s" in r.timing else "–",  # load + 1st run
    ]


# Terminal ---------------------------------------------------------------------------------------
def print_report(report: BenchReport, console=None) -> None:
    from rich import box
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    from resnet_deploy.terminal import safe, safe_lines

    console = console or Console()
    large = report.options.get("large_batch", 32)
    tables = []
    if report.options.get("accuracy"):
        tables.append((f"Accuracy on {report.data.get('images', 0):,} {report.data.get('dataset', 'CIFAR-10')} "
                       f"{report.data.get('split') or 'test'} images, against the Keras "
                       "float model", accuracy_columns(report), [accuracy_row(r) for r in report.results]))
    if report.options.get("latency"):
        tables.append((f"Latency and cost, {report.options.get('threads')} threads", COST_COLUMNS,
                       [cost_row(r, large) for r in report.results]))
    for title, cols, rows in tables:
        # A narrow console (an 80-column CI log) gets each table in parts that fit, the artifact repeated
        # in each: figures are never cropped.
        width = min(40, max(len(row[0]) for row in rows))
        groups = column_groups([c.format(B=large) for c in cols], rows, console.width, width)
        for k, group in enumerate(groups):
            t = Table(title=title if k == 0 else None, box=box.SIMPLE_HEAD, padding=(0, 1), pad_edge=False)
            for i in group:
                left = i == 0 or (cols[1] == "runtime" and i < 3)
                t.add_column(cols[i].format(B=large), justify="left" if left else "right",
                             min_width=width if i == 0 else None, overflow="fold")
            for row in rows:  # cells are text, not rich markup: a label's "[openvino]" must show as it is
                t.add_row(*(escape(safe(row[i])) for i in group))  # a file's name: no ESC, no line break
            console.print(t)
    if report.options.get("latency"):
        console.print(LEGEND.format(B=large), style="dim", highlight=False, markup=False)
    for line in notes(report):
        console.print(safe_lines(line), highlight=False, markup=False)


def column_groups(headers: list[str], rows: list[list[str]], console_width: int, first_width: int) -> list[list[int]]:
    """Column indices in groups whose estimated width fits ``console_width``; column 0 (the artifact)
    starts every group."""
    def cell_width(i: int) -> int:
        return max([len(headers[i]), *(len(str(r[i])) for r in rows)]) + 2  # + the padding around a cell

    groups, current, used = [], [0], first_width + 1
    for i in range(1, len(headers)):
        w = cell_width(i)
        if used + w > console_width and len(current) > 1:
            groups.append(current)
            current, used = [0], first_width + 1
        current.append(i)
        used += w
    groups.append(current)
    return groups


def notes(report: BenchReport) -> list[str]:
    from resnet_deploy.terminal import safe

    m = report.machine
    lines = [f"machine: {m.get('cpu')}, {m.get('cpu_count')} cores, flags: {' '.join(m.get('cpu_flags') or []) or '-'}",
             "versions: " + ", ".join(f"{k} {v}" for k, v in report.libraries.items())]
    lines += [f"reference: {n}" for n in report.reference.get("notes", [])]
    for r in report.results:
        lines += [f"{safe(r.label)}: {n}" for n in r.notes]  # a file's name: a newline in it forges no line
        if r.role == "baseline":
            lines.append(f"{safe(r.label)}: not named on the command line; measured as the FP32 baseline")
    lines += [f"ERROR {safe(r.label)}: {r.error['message']}" for r in report.errors]
    lines += [f"gate {'passed' if g['passed'] else 'FAILED'}: {g['message']}" for g in report.gates]
    lines += [f"gate {g['gate']} not applied to {g['artifact']}: {g['reason']}" for g in report.not_gated]
    return lines


# Files ------------------------------------------------------------------------------------------
def json_text(report: BenchReport) -> str:
    """The JSON document of the report (docs/bench-report-schema.md), as ``write_json`` writes it."""
    import json

    from resnet_deploy.fileio import _json_default  # the package's JSON conversions (numpy, enums, paths)

    return json.dumps(report.to_dict(), indent=2, default=_json_default)


def write_json(report: BenchReport, path: str | os.PathLike) -> Path:
    write_json_atomic(path, report.to_dict())
    return Path(path)


def write_markdown(report: BenchReport, path: str | os.PathLike) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(markdown(report))
    return Path(path)


def markdown(report: BenchReport) -> str:
    large = report.options.get("large_batch", 32)
    out = ["# resnet-deploy bench report", "",
           f"{report.created}; {report.data.get('images', 0):,} images of the {report.data.get('dataset', 'CIFAR-10')} "
           f"{report.data.get('split') or '-'} "
           f"split ({report.data.get('source', '-')}); float reference: {report.reference.get('label') or 'none'}.", ""]
    if report.options.get("accuracy"):
        out += ["## Accuracy", "", _md_table(accuracy_columns(report), [accuracy_row(r) for r in report.results]), ""]
        out += ["Intervals: top-1 Wilson 95%; change: paired bootstrap percentile interval; McNemar: exact "
                "two-sided p on the images where exactly one model is right (↓ lost, ↑ gained).", ""]
        out += ["### Per-class accuracy (%)", "", _md_table(("class",) + tuple(r.label for r in report.results if r.accuracy),
                                                             _per_class_rows(report)), ""]
    if report.options.get("latency"):
        out += ["## Latency and cost", "",
                _md_table(tuple(c.format(B=large) for c in COST_COLUMNS), [cost_row(r, large) for r in report.results]),
                "", LEGEND.format(B=large), "", _latency_detail(report), "", "### Memory", "", _memory_detail(report),
                "", MEMORY_NOTE, ""]
    out += ["## Notes", ""] + [f"- {n}" for n in notes(report)] + [""]
    return "\n".join(out)


def accuracy_columns(report: BenchReport) -> tuple[str, ...]:
    """The accuracy table's header: the last column says Δprob for a model whose outputs are probabilities."""
    if (report.reference or {}).get("output") == "probabilities":
        return ACCURACY_COLUMNS[:-1] + (PROBABILITY_HEADER,)
    return ACCURACY_COLUMNS


def _latency_detail(report: BenchReport) -> str:
    rows = []
    for r in report.results:
        for bs, s in r.latency.items():
            if "mean_ms" in s:
                lo, hi = s.get("round_median_interval_ms") or (math.nan, math.nan)
                rows.append([r.label, bs, str(s["runs"]), str(s.get("rounds", "–")), *(f"{s[k]:.3f}" for k in
                             ("mean_ms", "std_ms", "min_ms", "p50_ms", "p90_ms", "p99_ms")), f"[{lo:.3f}, {hi:.3f}]",
                             f"{s['throughput_ips']:,.1f}", f"{s['cv']:.3f}" + (" noisy" if s["noisy"] else "")])
    cols = ("artifact", "batch", "runs", "rounds", "mean ms", "std ms", "min ms", "p50 ms", "p90 ms", "p99 ms",
            "round median ms [interval]", "img/s", "cv")
    out = [_md_table(cols, rows), "", _speedup_detail(report)]
    return "\n".join(out)


def _speedup_detail(report: BenchReport) -> str:
    rows = []
    for r in report.results:
        for against, v in (("FP32", r.vs_baseline), ("Keras", r.vs_float if r.role != "reference" else None)):
            for bs, d in ((v or {}).get("speedup_detail") or {}).items():
                rows.append([r.label, f"{v['label']} ({against})", bs, _x(d["value"]),
                             f"[{d['interval'][0]:.2f}, {d['interval'][1]:.2f}]", f"{d['coverage']:.1%}",
                             str(d["rounds"]), "noisy" if d["noisy"] else "steady"])
    return _md_table(("artifact", "against", "batch", "speed-up", "interval", "coverage", "rounds", ""), rows)


MEMORY_NOTE = ("before load: the process's RSS right before the file was loaded (Python, numpy, the runtime's "
               "import, the test images: the harness); artifact: what loading and running it added (the peak "
               "after loading minus that baseline); peak: the process's peak RSS. Each file is measured in its "
               "own child process unless --in-process was given.")


def _memory_detail(report: BenchReport) -> str:
    rows = [[r.label, _bytes(m.get("rss_before_load_bytes")), _bytes(m.get("artifact_rss_bytes")),
             _bytes(m.get("peak_rss_bytes")), m.get("rss_scope", "–")]
            for r in report.results if (m := r.memory)]
    return _md_table(("artifact", "before load", "artifact", "peak", "process"), rows)


def _per_class_rows(report: BenchReport) -> list[list[str]]:
    rs = [r for r in report.results if r.accuracy]
    names = report.data.get("class_names") or CLASS_NAMES  # an image folder's, else CIFAR-10's
    return [[name] + [_pct(r.accuracy["per_class"][i]) for r in rs] for i, name in enumerate(names)]


FORMAT_STYLE = {"keras": ("s", "#555555", "Keras (float)"), "tflite": ("o", "#1f77b4", "TFLite"),
                "onnx": ("^", "#d62728", "ONNX")}


def write_plot(report: BenchReport, path: str | os.PathLike) -> Path:
    """The report's picture (``plot_figure``) as a PNG, SVG or PDF, written atomically."""
    import matplotlib.pyplot as plt

    fig = plot_figure(report)
    suffix = Path(path).suffix or ".png"
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format=suffix.lstrip("."))
    plt.close(fig)
    return Path(path)


def plot_figure(report: BenchReport):
    """Two panels that share one row per measured file (its name on the left, so no label sits on another):
    the top-1 change against the float model in percentage points with its 95 % paired bootstrap interval as
    error bars, and the batch-1 latency (the median of the per-round medians) with its interval over the
    timing rounds. A zero line marks "no change"; marker and colour say the format (legend below)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in report.results if r.ok and (r.accuracy or r.latency.get("1"))][::-1]  # first file on top
    fig, (acc, lat) = plt.subplots(1, 2, sharey=True, dpi=120, figsize=(10, 1.6 + 0.42 * max(1, len(rows))),
                                   gridspec_kw={"width_ratios": [1.1, 1]})
    for y, r in enumerate(rows):
        marker, colour, _ = FORMAT_STYLE.get(r.format, ("o", "black", r.format))
        change = _change(r)
        if change is not None:
            est, lo, hi = change
            acc.errorbar([est], [y], xerr=[[est - lo], [hi - est]], fmt=marker, color=colour, capsize=3, ms=6)
        b1 = r.latency.get("1") or {}
        if "round_median_ms" in b1:
            est, (lo, hi) = b1["round_median_ms"], b1["round_median_interval_ms"]
            lat.errorbar([est], [y], xerr=[[est - lo], [hi - est]], fmt=marker, color=colour, capsize=3, ms=6,
                         alpha=0.5 if b1.get("noisy") else 1.0)
    acc.axvline(0, color="grey", lw=0.8, zorder=0)
    acc.set_yticks(range(len(rows)), [_plot_label(r) for r in rows], fontsize=8)
    acc.set_title("top-1 change vs the float model\n(95 % paired bootstrap interval)", fontsize=9)
    acc.set_xlabel("percentage points", fontsize=8)
    lat.set_title(f"batch-1 latency, {report.options.get('threads')} threads\n(median and interval of the "
                  "round medians;\nfaded: the series did not settle)", fontsize=9)
    lat.set_xlabel("ms" + (" (log scale)" if _log_scale(lat, rows) else ""), fontsize=8)
    for ax in (acc, lat):
        ax.grid(True, axis="x", alpha=0.3)
        ax.tick_params(axis="x", labelsize=8)
        ax.set_ylim(-0.7, len(rows) - 0.3)
    if not rows:
        acc.text(0.5, 0.5, "no file was measured", ha="center", va="center", transform=acc.transAxes)
    shown = {r.format for r in rows}
    handles = [plt.Line2D([], [], marker=m, color=c, ls="", label=name) for f, (m, c, name) in FORMAT_STYLE.items()
               if f in shown]
    if handles:  # below the panels, never over a point
        fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    images = report.data.get("images") or 0
    fig.suptitle(f"{images:,} CIFAR-10 test images; {report.machine.get('cpu', '')}", fontsize=9)
    fig.tight_layout(rect=(0, 0.05 if handles else 0, 1, 1))
    return fig


def _log_scale(ax, rows: list[ArtifactResult]) -> bool:
    """A log latency axis when the measured latencies span more than 20x (a Keras model beside INT8 files)."""
    ms = [r.latency["1"]["round_median_ms"] for r in rows if "round_median_ms" in (r.latency.get("1") or {})]
    if not (ms and min(ms) > 0 and max(ms) / min(ms) > 20):
        return False
    from matplotlib.ticker import FormatStrFormatter, LogLocator, NullFormatter

    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    ax.xaxis.set_major_formatter(FormatStrFormatter("%g"))
    ax.xaxis.set_minor_formatter(NullFormatter())
    return True


def _plot_label(r: ArtifactResult) -> str:
    """The row's name, with the runtime it ran in where the label does not already say it."""
    runtime = _runtime(r)
    return _label(r) + ("" if f"[{runtime}]" in r.label else f" [{runtime}]")


def _change(r: ArtifactResult) -> tuple[float, float, float] | None:
    """The top-1 change against the float model and its interval (pp); 0 for the float model itself."""
    if r.role == "reference" and r.accuracy:
        return 0.0, 0.0, 0.0
    v = r.vs_float or {}
    if "change_pp" not in v:
        return None
    lo, hi = v["change_interval_pp"]
    return v["change_pp"], lo, hi


# Formatting ---------------------------------------------------------------------------------------
def _md_table(cols, rows) -> str:
    esc = lambda s: str(s).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(map(esc, cols)) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    return "\n".join(lines + ["| " + " | ".join(map(esc, r)) + " |" for r in rows])


def _label(r: ArtifactResult) -> str:
    return (r.label + {"reference": " (float)", "baseline": " (base)"}.get(r.role, "") + (" (STALE)" if r.stale else "")
            + (" (SATURATING)" if r.saturating else ""))


def _runtime(r: ArtifactResult) -> str:
    from resnet_deploy.config import Format
    from resnet_deploy.runtimes import DEFAULT_RUNTIME

    return (r.runtime_name or (r.runtime or {}).get("runtime")
            or (DEFAULT_RUNTIME[Format(r.format)] if r.format else "?"))


def _inverse_x(ratio) -> str:
    return "–" if not ratio else _x(1 / ratio)


def _ms(v) -> str:
    if v is None:
        return "–"
    return f"{v:.3f}" if v < 1 else f"{v:.2f}" if v < 100 else f"{v:,.0f}"


def _x(v) -> str:
    return "–" if v is None else f"{v:.2f}x"


def _speedup(v: dict | None) -> str:
    """The batch-1 speed-up of a comparison, marked ⚠ when its series or its interval are noisy."""
    d = ((v or {}).get("speedup_detail") or {}).get("1")
    if d is None:
        return _x(((v or {}).get("speedup") or {}).get("1"))
    return _x(d["value"]) + (" ⚠" if d["noisy"] else "")


def _pct(v) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{100 * v:.1f}"


def _bytes(n) -> str:
    """Decimal units, as everywhere in the project: 1 MB = 10^6 bytes."""
    if n is None:
        return "–"
    for unit, k in (("GB", 10**9), ("MB", 10**6), ("kB", 10**3)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"
