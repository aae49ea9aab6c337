"""`resnet-deploy export`: not built yet (issue #4)."""

from __future__ import annotations

from resnet_deploy.errors import ResnetDeployError


def export() -> None:
    """Not built yet (issue #4)."""
    raise ResnetDeployError("`resnet-deploy export` is not built yet (issue #4).")
