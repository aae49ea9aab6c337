"""Converters: one module per target format (``tflite``, ``onnx``), each ``convert(session, plan)``, registered
in ``export.CONVERTERS``; the export session (``session``), its plan (``planning``), the parity check
(``parity``), the manifests (``manifests``), accuracy-aware INT8 (``int8_search``, ``int8_analysis``) and QAT.

Library entry point (what `resnet-deploy export`, the pipeline command and bench call)::

    from resnet_deploy.converters import ExportOptions, export_model
    artifacts = export_model("runs/x/model.keras", ExportOptions(fp16=True, int8=True), data="cifar10/")

Names are resolved lazily so importing this package (the CLI does) pulls in no framework.
"""

from __future__ import annotations

_LAZY = {
    "ExportOptions": "resnet_deploy.converters.options",
    "Target": "resnet_deploy.converters.options",
    "export_model": "resnet_deploy.converters.export",
    "ExportedArtifact": "resnet_deploy.converters.export",
    "CONVERTERS": "resnet_deploy.converters.export",
    "plan": "resnet_deploy.converters.planning",
}

__all__ = list(_LAZY)


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'resnet_deploy.converters' has no attribute {name!r}")
