"""The ResNet family: registry of names (no Keras import), one builder, save/load with metadata."""

from resnet_deploy.models.registry import ARCHS, ArchSpec, get_arch

__all__ = ["ARCHS", "ArchSpec", "get_arch"]
