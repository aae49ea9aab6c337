"""The CLI skeleton: fast --help, the models and data commands, clear errors with exit codes."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from resnet_deploy.cli import app

runner = CliRunner()
HEAVY = ("tensorflow", "keras", "onnxruntime", "tf2onnx", "ai_edge_litert", "matplotlib", "onnx", "jax", "torch")


@pytest.mark.parametrize("args", [[], ["--help"], ["train", "--help"], ["export", "--help"], ["bench", "--help"],
                                  ["predict", "--help"], ["pipeline", "--help"]])
def test_help_imports_no_framework(args):
    """What made --help slow is a framework import (TensorFlow alone takes seconds): the start-up and each
    command's help must import none. A timing assert would pass on a fast machine and fail on a busy one."""
    code = ("import sys\n"
            "from resnet_deploy.cli import app\n"
            "try:\n"
            f"    app({args!r} + ['--help'], standalone_mode=False)\n"
            "finally:\n"
            f"    print('HEAVY', sorted({{m.split('.')[0] for m in sys.modules}} & set({HEAVY!r})))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "Usage" in proc.stdout
    assert proc.stdout.splitlines()[-1] == "HEAVY []", f"frameworks imported for {args or 'the app'} --help: {proc.stdout.splitlines()[-1]}"


def test_every_subcommand_exists():
    result = runner.invoke(app, ["--help"])
    assert result.exit_code == 0
    for cmd in ("train", "export", "bench", "models", "data"):
        assert cmd in result.output


def test_models_table_lists_the_family_readably_at_80_columns():
    from resnet_deploy.models.registry import ARCHS

    result = runner.invoke(app, ["models"], env={"COLUMNS": "80"})
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split() for line in result.output.splitlines() if line.strip()}
    assert set(ARCHS) <= set(rows), "every architecture on a row of its own, names not truncated"
    assert "…" not in result.output
    assert rows["resnet34"][-2:] == ["21.282", "1,159.4"] and "3-4-6-3" in rows["resnet34"]  # MACs at 32x32
    assert rows["resnet20"][-2] == "0.272" and rows["resnet110v2"][1:3] == ["basic", "v2"]
    assert rows["resnet50"][1] == "bottleneck" and rows["plain34"][1:3] == ["basic", "plain"]


def test_models_unknown_family_lists_the_families():
    result = runner.invoke(app, ["models", "--family", "vgg"])
    assert result.exit_code == 2
    assert "Unknown family 'vgg'" in result.output and "cifar, resnet" in result.output
    only = runner.invoke(app, ["models", "--family", "cifar"], env={"COLUMNS": "80"})
    assert only.exit_code == 0 and "resnet20" in only.output and "resnet34" not in only.output


def test_models_bad_width_is_a_clear_error():
    result = runner.invoke(app, ["models", "--width", "0"])
    assert result.exit_code == 2
    assert "Width multiplier" in result.output


def _check_data_command(path: Path) -> None:
    """`resnet-deploy data` prints each split's total, the images missing from the official 50,000 / 10,000
    and the per-channel means: all expected from the files, read here with plain numpy / pickle."""
    import re

    from tests.test_data import expected_notes, read_counts

    result = runner.invoke(app, ["data", "--data", str(path)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    counts = read_counts(path)
    out = " ".join(re.sub(r"[^\x00-\x7f]", " ", result.output).split())  # no table borders, no wrapping
    assert f"total {len(counts['train']['y']):,} {len(counts['test']['y']):,}" in out, out
    for notes in expected_notes(counts).values():
        for note in notes:
            assert note in out, note
    if not any(expected_notes(counts).values()):
        assert "complete: 50,000 training and 10,000 test images" in out
    train_x = load_exact_train_pixels(path)
    mean = np.zeros(3)
    for i in range(0, len(train_x), 5000):  # float64 sums in chunks: no 1 GB copy of the real split
        mean += train_x[i:i + 5000].reshape(-1, 3).sum(0, dtype=np.float64)
    mean /= len(train_x) * 32 * 32
    assert "train " + ", ".join(f"{v:.2f}" for v in mean) in out, (mean, out)


def load_exact_train_pixels(path: Path) -> np.ndarray:
    """The training images the loader should use: ``x`` of train.npz, or the batches' planes as NHWC."""
    import pickle

    if (path / "train.npz").exists():
        with np.load(path / "train.npz") as z:
            return z["x"]
    folder = path if (path / "data_batch_1").exists() else path / "cifar-10-batches-py"
    planes = [pickle.loads((folder / f"data_batch_{i}").read_bytes(), encoding="bytes")[b"data"] for i in range(1, 6)]
    return np.concatenate(planes).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)


def test_data_command_reports_counts_and_incompleteness(synthetic_cifar_dir, small_npz_dir):
    for path in (synthetic_cifar_dir, small_npz_dir):
        _check_data_command(path)


def test_data_command_on_the_real_copy(cifar_dir):
    """49,923 / 9,980 and "77 missing" on the shared copy, 50,000 / 10,000 and "complete" on the official set."""
    _check_data_command(cifar_dir)


def test_data_command_missing_path(tmp_path):
    result = runner.invoke(app, ["data", "--data", str(tmp_path / "nope")])
    assert result.exit_code == 2
    assert "does not exist" in result.output and "Fix:" in result.output


# A terminal a person can read -------------------------------------------------------------------------
def _click_commands():
    import typer

    group = typer.main.get_command(app)
    return group, group.commands


def test_help_of_every_command_is_readable_at_80_columns():
    """Every option name written whole (no cell-wrapped or cut names), no line over 80 columns."""
    group, commands = _click_commands()
    assert "predict" in commands
    for name, cmd in [(None, group), *commands.items()]:
        args = ([name] if name else []) + ["--help"]
        result = runner.invoke(app, args, env={"COLUMNS": "80"})
        assert result.exit_code == 0, result.output
        text = result.stdout
        too_long = [line for line in text.splitlines() if len(line) > 80]
        assert not too_long, f"{name}: {too_long}"
        assert "…" not in text and "│" not in text, f"{name}: truncated or boxed help"
        for param in cmd.params:
            if getattr(param, "hidden", False):  # a deprecated alias, kept out of --help on purpose
                assert param.help.startswith("Deprecated: --"), f"{name}: hidden option {param.opts} is no alias"
                continue
            for opt in [*param.opts, *param.secondary_opts]:
                if opt.startswith("-"):
                    assert opt in text, f"{name}: option {opt} not written whole"
        if name is None:  # the command list: each command's summary on one line
            for sub in commands:
                line = next(line for line in text.splitlines() if line.strip().startswith(sub + " "))
                assert not line.rstrip().endswith("..."), line


# Lines the frameworks write on their own (TensorFlow 2.21, LiteRT, the TFLite converter, Python warnings),
# written out here from what a bare run prints, not taken from the code under test.
LIBRARY_LOG_LINES = (
    r"absl::InitializeLog", r"^[IWE]\d{4} \d\d:\d\d:", r"oneDNN custom operations", r"cudart_stub",
    r"cuInit", r"fully_quantize: \d", r"XNNPACK delegate", r"UserWarning", r"DeprecationWarning",
    r"^\s+warnings\.warn\(",
)


def _library_lines(text: str) -> list[str]:
    import re

    return [line for line in text.splitlines() if any(re.search(p, line) for p in LIBRARY_LOG_LINES)]


def _long_lines(text: str) -> list[int]:
    return [len(line.rstrip()) for line in text.splitlines() if len(line.rstrip()) > 80]


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tiny_model_path, small_npz_dir):
    """The tiny model exported by the CLI (FP32 + INT8, TFLite + ONNX) as a user at 80 columns runs it, on
    the synthetic data (test_predict exports the same model on the real copy)."""
    from tests.test_predict import run_cli

    out = tmp_path_factory.mktemp("exported_cli")
    proc = run_cli("export", tiny_model_path, "--int8", "--calib-samples", 20, "--validate-samples", 32,
                   "--out", out, "--data", small_npz_dir)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out, proc


def test_export_bench_and_predict_keep_library_logs_out(exported, tiny_model_path, small_npz_dir, tmp_path, capsys):
    from tests.test_predict import run_cli

    out_dir, export_proc = exported  # `resnet-deploy export --int8` at COLUMNS=80, without TF_CPP_MIN_LOG_LEVEL
    bench = run_cli("bench", out_dir / "model_int8.tflite", "--limit", 32, "--runs", 3, "--warmup", 1,
                    "--max-time", 0.5, "--no-cache", "--data", small_npz_dir)
    assert bench.returncode == 0, bench.stdout + bench.stderr
    from PIL import Image

    Image.fromarray(np.zeros((40, 50, 3), np.uint8)).save(tmp_path / "black.png")
    pred = run_cli("predict", tiny_model_path, tmp_path / "black.png")
    assert pred.returncode == 0, pred.stdout + pred.stderr
    for name, proc in (("export", export_proc), ("bench", bench), ("predict", pred)):
        found = _library_lines(proc.stdout + "\n" + proc.stderr)
        assert not found, f"{name} let library logs through: {found}"
        with capsys.disabled():  # the tables belong to other modules: measured and shown, not asserted
            print(f"\n{name}: lines over 80 columns (stdout): {_long_lines(proc.stdout) or 'none'}")
    verbose = run_cli("--verbose", "predict", tiny_model_path, tmp_path / "black.png")
    assert verbose.returncode == 0, verbose.stderr
    assert _library_lines(verbose.stderr), "--verbose should let TensorFlow's start-up logs through"
    assert pred.stdout.splitlines()[-1].split()[0].endswith("black.png")  # same predictions either way
    assert pred.stdout == verbose.stdout


def test_log_filter_hides_chatter_from_this_process_and_children_and_keeps_the_rest(tmp_path):
    """fd-level: C-style writes to fd 2 and a child process's stderr both pass through the filter."""
    noise = (
        "WARNING: All log messages before absl::InitializeLog() is called are written to STDERR\n"
        "I0000 00:00:1796016986.102594    4756 port.cc:153] oneDNN custom operations are on.\n"
        "E0000 00:00:1796016989.094745    4756 cuda_platform.cc:52] failed call to cuInit: INTERNAL\n"
        "fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32\n"
        "/x/site-packages/tensorflow/lite/python/convert.py:846: UserWarning: Statistics...\n"
        "  warnings.warn(\n"
        "/x/site-packages/keras/src/models/functional.py:259: UserWarning: The structure of `inputs` ...\n"
        "Expected: ['image']\n"
        "Received: inputs=Tensor(shape=(12, 32, 32, 3))\n"
        "  warnings.warn(msg)\n"
    )  # 10 lines, as TensorFlow 2.21, the TFLite converter and Keras print them
    script = tmp_path / "s.py"
    script.write_text(
        "import os, subprocess, sys\n"
        "from resnet_deploy.logfilter import FrameworkLogFilter\n"
        f"noise = {noise!r}\n"
        "with FrameworkLogFilter() as f:\n"
        "    os.write(2, (noise + 'real problem one\\n').encode())\n"
        "    child = 'import sys; sys.stderr.write(' + repr(noise + 'Expected: a real line\\n') + ')'\n"
        "    subprocess.run([sys.executable, '-c', child], check=True)\n"
        "    print('F0000 00:00:1.0 1 x.cc:1] fatal lines stay', file=sys.stderr)\n"
        "print('hidden', f.hidden)\n")
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.splitlines() == ["real problem one", "Expected: a real line",
                                        "F0000 00:00:1.0 1 x.cc:1] fatal lines stay"]
    assert proc.stdout.strip() == "hidden 20"


def test_export_and_bench_defaults_are_their_options_classes(tmp_path, monkeypatch):
    """No command restates a default: with no options given, the CLI builds exactly the options class's defaults
    (the library is stopped before any work)."""
    from resnet_deploy.bench import run as bench_run
    from resnet_deploy.bench.options import BenchOptions
    from resnet_deploy.converters import export as export_module
    from resnet_deploy.converters.options import ExportOptions
    from resnet_deploy.errors import BenchError, ExportError

    seen = {}

    def stop(kind, error):
        def fake(paths_or_model, options, *args, **kwargs):
            seen[kind] = options
            raise error("stopped by the test")
        return fake

    monkeypatch.setattr(export_module, "export_model", stop("export", ExportError))
    monkeypatch.setattr(bench_run, "run_bench", stop("bench", BenchError))
    model = tmp_path / "m.keras"
    model.write_bytes(b"")
    assert runner.invoke(app, ["export", str(model), "--out", str(tmp_path)]).exit_code == 2
    assert seen["export"] == ExportOptions(out_dir=tmp_path)
    assert runner.invoke(app, ["bench", str(tmp_path / "m.tflite")]).exit_code == 2
    assert seen["bench"] == BenchOptions()
