"""Compatibility alias of the former ``bench.probe``: the child process is ``bench.child``, the
measurement of one file ``bench.measure``, the error entries ``bench.results``. Kept until
tests/test_pipeline.py imports ``crash_error`` from ``bench.results``."""

from resnet_deploy.bench.results import crash_error as _crash_error  # noqa: F401
from resnet_deploy.bench.results import error_dict, error_entry  # noqa: F401
