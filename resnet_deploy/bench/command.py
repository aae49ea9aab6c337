"""`resnet-deploy bench`: not built yet (issue #5)."""

from __future__ import annotations

from resnet_deploy.errors import ResnetDeployError


def bench() -> None:
    """Not built yet (issue #5)."""
    raise ResnetDeployError("`resnet-deploy bench` is not built yet (issue #5).")
