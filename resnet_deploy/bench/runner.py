"""Compatibility alias: ``run_bench`` lives in ``resnet_deploy.bench.run`` (``from resnet_deploy.bench import
run_bench``). Kept until pipeline/job.py and benchmarks/onnx_int8_settings.py import the new name."""

from resnet_deploy.bench.run import run_bench  # noqa: F401
