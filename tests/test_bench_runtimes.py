"""`bench --runtimes`: every ONNX file in every runtime asked for (a row each, FP32 baseline per runtime,
the precision OpenVINO really ran recorded); the refusal of ONNX INT8 files whose U8S8 kernels saturate on
the CPU (judged from injected CPU flags on this VNNI host) and its override; Ctrl-C ending a real bench
with one line, exit code 130 and nothing half-written."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_deploy.bench.options import BenchOptions
from resnet_deploy.bench.run import run_bench
from resnet_deploy.cli import app
from resnet_deploy.errors import BenchError
from tests.conftest import export_tiny_onnx

QUICK = dict(warmup=1, runs=5, max_time_s=0.3, large_batch=8, bootstrap=200, min_rounds=3)
AVX2 = ["avx2", "fma"]  # an x86 CPU without VNNI, as /proc/cpuinfo names its flags


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("RESNET_DEPLOY_CACHE", str(tmp_path / "cache"))
    for var in ("RESNET_DEPLOY_BENCH_CPU_FLAGS", "RESNET_DEPLOY_BENCH_MACHINE"):
        monkeypatch.delenv(var, raising=False)


@pytest.fixture(scope="module")
def onnx_export(tmp_path_factory, tiny_model_path, small_npz_dir) -> dict[str, Path]:
    """The tiny model exported to ONNX FP32, FP16 and INT8 through the real converters."""
    return export_tiny_onnx(tmp_path_factory.mktemp("runtimes_export"), tiny_model_path, small_npz_dir)


@pytest.fixture(scope="module")
def test_split(cifar):
    return cifar.test.take(200)


def _copy(src: dict[str, Path], dest: Path, keys=("model", "fp32", "int8")) -> dict[str, Path]:
    dest.mkdir()
    out = {}
    for k in keys:
        out[k] = dest / src[k].name
        shutil.copy(src[k], out[k])
        shutil.copy(f"{src[k]}.json", f"{out[k]}.json")
    return out


def _set_calibration(path: Path, **fields) -> None:
    """Rewrite the manifest's calibration block (the file's sha256 is unchanged: only its sidecar moves)."""
    side = Path(f"{path}.json")
    doc = json.loads(side.read_text())
    doc["calibration"].update(fields)
    side.write_text(json.dumps(doc))


# A row per (file, runtime) ------------------------------------------------------------------------
def test_each_onnx_file_runs_in_each_runtime_with_its_own_fp32_baseline(onnx_export, test_split):
    pytest.importorskip("openvino")
    opts = BenchOptions(isolate=False, threads=1, runtimes=("onnxruntime", "openvino"), **QUICK)
    report = run_bench([onnx_export["int8"], onnx_export["fp16"]], opts, data=test_split)
    assert report.ok, report.to_dict()["errors"]
    name = {p: onnx_export[p].name for p in ("fp32", "fp16", "int8")}
    rows = {(str(r.path), r.runtime_name): r for r in report.results if r.format == "onnx"}
    assert set(rows) == {(str(onnx_export[p]), rt) for p in ("fp32", "fp16", "int8")
                         for rt in ("onnxruntime", "openvino")}
    for (path, rt), r in rows.items():
        assert r.label.endswith(f"[{rt}]") and r.runtime["runtime"] == rt
        if r.precision != "fp32":  # the baseline is the FP32 file *in the same runtime*
            assert r.role == "artifact" and r.vs_baseline["label"] == f"{name['fp32']} [{rt}]"
            assert r.vs_float["agreement"] >= 0.9 and r.accuracy["images"] == 200
        else:
            assert r.role == "baseline" and r.accuracy is None
    ov_int8, ort_int8 = rows[(str(onnx_export["int8"]), "openvino")], rows[(str(onnx_export["int8"]), "onnxruntime")]
    assert ov_int8.executed_precision in ("u8", "i8") and ov_int8.runtime["inference_precision"] == "f32"
    assert rows[(str(onnx_export["fp32"]), "openvino")].executed_precision == "f32"
    assert ort_int8.executed_precision is None  # ONNX Runtime does not say: nothing is made up
    assert any("compute nodes" in n for n in ov_int8.notes)
    # each row has its own logits: OpenVINO's int8 pass is its own, not a copy of ONNX Runtime's
    assert ov_int8.vs_float["logit_error"] != ort_int8.vs_float["logit_error"]
    doc = json.loads(json.dumps(report.to_dict(), default=str))
    assert doc["options"]["runtimes"] == ["onnxruntime", "openvino"] and "openvino" in doc["libraries"]
    by_label = {r["label"]: r for r in doc["results"]}
    r = by_label[f"{name['int8']} [openvino]"]
    assert r["runtime_name"] == "openvino" and r["executed_precision"] in ("u8", "i8")
    assert r["runtime"]["compute_precisions"] and r["saturating"] is False
    assert by_label[f"{name['int8']} [onnxruntime]"]["runtime_name"] == "onnxruntime"


def test_the_tables_stay_within_80_columns_with_runtime_labels(onnx_export, test_split):
    pytest.importorskip("openvino")
    from rich.console import Console

    from resnet_deploy.bench.report import print_report

    report = run_bench([onnx_export["int8"]], BenchOptions(isolate=False, threads=1, runtimes=("onnxruntime", "openvino"),
                                                           **QUICK), data=test_split)
    console = Console(width=80, record=True, file=open(os.devnull, "w"))
    print_report(report, console)
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= 80
    assert f"{onnx_export['int8'].name} [openvino]" in text  # the label is text, not rich markup


def test_default_is_onnxruntime_alone_and_labels_unchanged(onnx_export, test_split):
    report = run_bench([onnx_export["int8"]], BenchOptions(isolate=False, threads=1, latency=False, **QUICK),
                       data=test_split)
    assert [r.label for r in report.results if r.format == "onnx"] == [onnx_export["int8"].name]
    assert report.results[-1].runtime_name == "onnxruntime"


def test_an_unknown_or_missing_runtime_is_refused_before_any_work(onnx_export, tmp_path, monkeypatch):
    with pytest.raises(BenchError, match="not a runtime") as err:
        BenchOptions(runtimes=("onnxruntime", "tensorrt"))
    assert "onnxruntime, openvino" in err.value.expected
    with pytest.raises(BenchError, match="cannot run onnx files"):
        BenchOptions(runtimes="litert")
    out = tmp_path / "r.json"
    res = CliRunner().invoke(app, ["bench", str(onnx_export["int8"]), "--runtimes", "onnxruntime,tensort",
                                   "--json-output", str(out)])
    assert res.exit_code == 2 and "tensort" in res.output and not out.exists()
    from resnet_deploy import runtimes

    monkeypatch.setattr(runtimes, "is_installed", lambda name: name != "openvino")
    res = CliRunner().invoke(app, ["bench", str(onnx_export["int8"]), "--runtimes", "openvino", "--json-output", str(out)])
    assert res.exit_code == 2 and "not installed" in res.output and "resnet-deploy[openvino]" in res.output
    assert not out.exists()


# Saturating INT8 files ----------------------------------------------------------------------------
def test_a_file_that_saturates_on_this_cpu_is_refused_unless_allowed(onnx_export, tmp_path, test_split):
    from resnet_deploy.bench.selection import identify, refuse_saturating

    run = _copy(onnx_export, tmp_path / "run")
    _set_calibration(run["int8"], activation_type="uint8", weight_type="int8", reduce_range=False)
    e = identify(run["int8"], "artifact")
    assert refuse_saturating([e], allow=False, machine="x86_64", flags=["avx2", "avx512_vnni"]) == []
    assert e.error is None  # a VNNI CPU: no saturation
    assert refuse_saturating([e], allow=False, machine="aarch64", flags=[]) == [] and e.error is None
    refuse_saturating([e], allow=False, machine="x86_64", flags=AVX2)
    err = e.error
    assert err is not None and "VNNI" in err["what"] and "saturate" in err["what"]
    assert err["expected"] and "--allow-saturating" in err["fix"] and "--onnx-reduce-range" in err["fix"]
    allowed = identify(run["int8"], "artifact")
    notes = refuse_saturating([allowed], allow=True, machine="x86_64", flags=AVX2)
    assert allowed.error is None and allowed.saturating and any("SATURATING" in n for n in allowed.notes) and notes
    # 7-bit weights, or int8 activations, do not saturate; a recorded target is named, its absence tolerated
    for fields, refused in (({"reduce_range": True}, False), ({"activation_type": "int8"}, False),
                            ({"target": "x86-vnni", "scheme": "u8s8"}, True)):
        _set_calibration(run["int8"], **{"activation_type": "uint8", "reduce_range": False, **fields})
        e = identify(run["int8"], "artifact")
        refuse_saturating([e], allow=False, machine="x86_64", flags=AVX2)
        assert (e.error is not None) == refused, fields
        if "target" in fields:
            assert "x86-vnni" in e.error["what"]


def test_bench_pretends_to_be_a_cpu_without_vnni_from_the_environment(onnx_export, tmp_path, test_split,
                                                                     monkeypatch):
    run = _copy(onnx_export, tmp_path / "run")
    _set_calibration(run["int8"], activation_type="uint8", weight_type="int8", reduce_range=False)
    monkeypatch.setenv("RESNET_DEPLOY_BENCH_MACHINE", "x86_64")
    monkeypatch.setenv("RESNET_DEPLOY_BENCH_CPU_FLAGS", "avx2,fma")
    out = tmp_path / "r.json"
    args = ["bench", str(run["int8"]), "--no-latency", "--limit", "100", "--in-process", "--json-output", str(out),
            "--data", str(_npz_dir(tmp_path, test_split))]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    doc = json.loads(out.read_text())
    err = next(e for e in doc["errors"] if e["label"] == run["int8"].name)
    assert "VNNI" in err["what"] and "--allow-saturating" in err["fix"]
    assert any("RESNET_DEPLOY_BENCH_CPU_FLAGS" in n for n in doc["reference"]["notes"])
    res = CliRunner().invoke(app, args + ["--allow-saturating", "--force"], terminal_width=100)
    assert res.exit_code == 0, res.output
    assert "(SATURATING)" in res.output
    row = next(r for r in json.loads(out.read_text())["results"] if r["path"] == str(run["int8"]))
    assert row["saturating"] is True and row["accuracy"]["images"] == 100
    monkeypatch.setenv("RESNET_DEPLOY_BENCH_CPU_FLAGS", "avx2 avx512_vnni")  # a VNNI CPU: benched as usual
    res = CliRunner().invoke(app, args + ["--force"])
    assert res.exit_code == 0 and "SATURATING" not in res.output, res.output


def _npz_dir(tmp_path: Path, split) -> Path:
    d = tmp_path / "data"
    if not d.exists():
        d.mkdir()
        np.savez(d / "test.npz", x=split.x, y=split.y.astype(np.uint8))
        np.savez(d / "train.npz", x=split.x[:10], y=split.y[:10].astype(np.uint8))
    return d


# Ctrl-C ----------------------------------------------------------------------------------------------
def _children(pid: int) -> list[int]:
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                fields = (d / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.append(int(d.name))
    return out


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(not Path("/proc").exists(), reason="watches the child processes through /proc")
def test_ctrl_c_ends_bench_with_one_line_exit_130_and_nothing_half_written(onnx_export, tmp_path, test_split):
    """A real `resnet-deploy bench` in its own process group; SIGINT to the whole group (as a terminal's
    Ctrl-C) once its child process is timing: exit 130, one line from the tool, no traceback from the
    parent or the child, no report file or temporary left, the child gone."""
    art = tmp_path / "plain.onnx"  # no manifest: no float model to load, one child, quick to start
    shutil.copy(onnx_export["fp32"], art)
    out = tmp_path / "out"
    out.mkdir()
    cmd = [sys.executable, "-m", "resnet_deploy.cli", "bench", str(art), "--data", str(_npz_dir(tmp_path, test_split)),
           "--threads", "1", "--max-time", "300", "--runs", "100000000", "--min-rounds", "1000",
           "--json-output", str(out / "r.json"), "--markdown", str(out / "r.md")]
    env = {**os.environ, "COLUMNS": "80"}
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            start_new_session=True)
    try:
        deadline, child = time.monotonic() + 240, None
        while time.monotonic() < deadline and proc.poll() is None:
            kids = _children(proc.pid)
            # measuring: a child has burnt CPU well beyond its imports (the timing loop never sleeps)
            busy = [k for k in kids if _safe_cpu(k) > 3.0]
            if busy:
                child = busy[0]
                break
            time.sleep(0.2)
        assert proc.poll() is None and child is not None, "bench never started measuring"
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, (proc.returncode, stderr[-3000:])
    assert "Traceback" not in stderr and "KeyboardInterrupt" not in stderr, stderr[-3000:]
    assert "Traceback" not in stdout
    lines = [ln for ln in stderr.splitlines() if ln.startswith("interrupted")]
    assert len(lines) == 1 and "not written" in lines[0] and "r.json" in lines[0], stderr
    assert list(out.iterdir()) == []  # no report, no temporary beside it
    time.sleep(0.5)
    assert not Path(f"/proc/{child}").exists() or _zombie(child), "the child process outlived the bench"


def _safe_cpu(pid: int) -> float:
    try:
        return _cpu_seconds(pid)
    except (OSError, IndexError, ValueError):
        return 0.0


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True
