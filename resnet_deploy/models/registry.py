"""Named architectures. Pure data: importing this module does not import Keras."""

from __future__ import annotations

from dataclasses import dataclass

from resnet_deploy.errors import ModelError


@dataclass(frozen=True)
class ArchSpec:
    """What distinguishes one variant from another; ``builder.build_model`` turns it into a graph."""

    name: str
    block: str  # "basic" (two 3x3 convs) or "bottleneck" (1x1, 3x3, 1x1 with 4x expansion)
    blocks_per_stage: tuple[int, ...]
    widths: tuple[int, ...]  # output channels of the first conv of each stage's blocks
    stem_width: int
    preact: bool = False  # pre-activation (ResNet v2, He et al. 2016)
    shortcuts: bool = True  # False: the plain twin with the same layers and no residual additions
    family: str = "resnet"  # "resnet" (He 2015 ImageNet family) or "cifar" (He 2015 sec. 4.2: 6n+2 layers)
    reference: str = ""

    @property
    def depth(self) -> int:
        convs = 3 if self.block == "bottleneck" else 2
        return convs * sum(self.blocks_per_stage) + 2


ARCHS: dict[str, ArchSpec] = {}


def _register(spec: ArchSpec) -> None:
    ARCHS[spec.name] = spec


_IMAGENET_FAMILY = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
    101: ("bottleneck", (3, 4, 23, 3)),
    152: ("bottleneck", (3, 8, 36, 3)),
}
for _depth, (_block, _blocks) in _IMAGENET_FAMILY.items():
    for _suffix, _preact in (("", False), ("v2", True)):
        _register(ArchSpec(f"resnet{_depth}{_suffix}", _block, _blocks, (64, 128, 256, 512), 64, preact=_preact,
                           reference="He et al. 2016 (v2: pre-activation)" if _preact else "He et al. 2015"))
    if _block == "basic":
        _register(ArchSpec(f"plain{_depth}", _block, _blocks, (64, 128, 256, 512), 64, shortcuts=False,
                           reference=f"plain twin of resnet{_depth} (He et al. 2015, Fig. 4)"))

# The CIFAR ResNets of He et al. 2015, section 4.2: 6n+2 layers, 16/32/64 channels.
# resnet8 (n=1) is the MLPerf Tiny image-classification size; with a small width it is the test model.
for _depth in (8, 20, 32, 44, 56, 110):
    _n = (_depth - 2) // 6
    for _suffix, _preact in (("", False), ("v2", True)):
        _register(ArchSpec(f"resnet{_depth}{_suffix}", "basic", (_n, _n, _n), (16, 32, 64), 16, preact=_preact,
                           family="cifar", reference="He et al. 2015, sec. 4.2"))
    _register(ArchSpec(f"plain{_depth}", "basic", (_n, _n, _n), (16, 32, 64), 16, shortcuts=False, family="cifar",
                       reference=f"plain twin of resnet{_depth} (He et al. 2015, Fig. 6)"))

STEMS = ("cifar", "imagenet")


def get_arch(name: str) -> ArchSpec:
    key = name.lower().replace("-", "").replace("_", "")
    if key not in ARCHS:
        raise ModelError(
            f"Unknown architecture {name!r}.",
            expected="one of: " + ", ".join(ARCHS),
            fix="run `resnet-deploy models` to see every architecture with its size",
        )
    return ARCHS[key]
