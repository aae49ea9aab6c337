"""Parameter and MAC counts computed from the architecture alone (no Keras import, instant).

``tests/test_models.py`` checks these against the built Keras graphs, so the table that
``resnet-deploy models`` prints is the graph's truth, not a second opinion.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from resnet_deploy.data.constants import NUM_CLASSES
from resnet_deploy.models.builder import scaled
from resnet_deploy.models.registry import ArchSpec


@dataclass(frozen=True)
class Counts:
    params: int  # trainable parameters (the published convention: BN gamma/beta, not moving stats)
    macs: int  # multiply-accumulates of one 32x32 forward pass


def arch_counts(spec: ArchSpec, width: float = 1.0, stem: str = "cifar", hw: int = 32,
                num_classes: int = NUM_CLASSES) -> Counts:
    params = macs = 0

    def conv(cin, cout, k, size):
        nonlocal params, macs
        params += k * k * cin * cout
        macs += size * size * k * k * cin * cout

    def bn(c):
        nonlocal params
        params += 2 * c

    stem_w = scaled(spec.stem_width, width)
    size = hw
    if stem == "imagenet":
        size = math.ceil(size / 2)
        conv(3, stem_w, 7, size)
        size = math.ceil(size / 2)  # max-pool
    else:
        conv(3, stem_w, 3, size)
    if not spec.preact:
        bn(stem_w)
    cin = stem_w
    expansion = 4 if spec.block == "bottleneck" else 1
    for s, (n, base) in enumerate(zip(spec.blocks_per_stage, spec.widths), start=1):
        planes = scaled(base, width)
        for b in range(1, n + 1):
            stride = 2 if (b == 1 and s > 1) else 1
            out = planes * expansion
            new = math.ceil(size / stride)
            if spec.preact:
                bn(cin)
            if spec.block == "bottleneck":
                conv(cin, planes, 1, size)
                conv(planes, planes, 3, new)
                conv(planes, out, 1, new)
                mids = (planes, planes)
            else:
                conv(cin, planes, 3, new)
                conv(planes, out, 3, new)
                mids = (planes,)
            for c in mids:
                bn(c)
            if not spec.preact:
                bn(out)
            if spec.shortcuts and (stride != 1 or cin != out):
                conv(cin, out, 1, new)
                if not spec.preact:
                    bn(out)
            cin, size = out, new
    if spec.preact:
        bn(cin)
    params += cin * num_classes + num_classes
    macs += cin * num_classes
    return Counts(params, macs)
