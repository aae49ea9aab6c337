"""Compatibility alias of the former ``bench.resolve``: which files take part is ``bench.selection``.
Kept until tests/test_export.py imports from ``bench.selection``."""

from resnet_deploy.bench.selection import identify, resolve_reference  # noqa: F401
