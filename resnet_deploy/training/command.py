"""`resnet-deploy train`: not built yet (issue #3)."""

from __future__ import annotations

from resnet_deploy.errors import ResnetDeployError


def train() -> None:
    """Not built yet (issue #3)."""
    raise ResnetDeployError("`resnet-deploy train` is not built yet (issue #3).")
