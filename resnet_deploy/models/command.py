"""The ``resnet-deploy models`` command: the architecture table, or the pretrained models."""

from __future__ import annotations

from typing import Annotated, Optional

import typer


def models(
    width: Annotated[float, typer.Option(help="Width multiplier applied to every layer's channels.")] = 1.0,
    stem: Annotated[str, typer.Option(help="cifar (3x3 conv, no pooling) or imagenet (7x7/2 conv + max-pool).")] = "cifar",
    family: Annotated[Optional[str], typer.Option(help="Show only one family: resnet or cifar.")] = None,
    pretrained: Annotated[bool, typer.Option("--pretrained", help="List the pretrained models instead: name, "
                                                                  "test accuracy, size, where they are.")] = False,
) -> None:
    """List the architectures: parameters, MACs at 32x32, blocks per stage and widths (or --pretrained)."""
    if pretrained:
        return _pretrained_table()
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from resnet_deploy.errors import ModelError
    from resnet_deploy.models.builder import _validate
    from resnet_deploy.models.registry import ARCHS
    from resnet_deploy.models.summary import arch_counts

    families = sorted({spec.family for spec in ARCHS.values()})
    if family is not None and family not in families:
        raise ModelError(f"Unknown family {family!r}.", expected=f"one of {', '.join(families)}",
                         fix="run `resnet-deploy models` without --family to see every architecture")
    # Sized for an 80-column terminal (CI logs, pipes): nothing truncated, nothing wrapped.
    table = Table(title=f"ResNet family (width x{width:g}, {stem} stem, 32x32x3 input, 10 classes)",
                  box=box.SIMPLE_HEAD, pad_edge=False, collapse_padding=True)
    for col, right in (("name", False), ("block", False), ("stages", False), ("widths", False),
                       ("params (M)", True), ("MACs (M)", True)):
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    previous = None
    for name, spec in ARCHS.items():
        if family and spec.family != family:
            continue
        if previous is not None and spec.family != previous:
            table.add_section()
        previous = spec.family
        _validate(spec, width, stem, (32, 32, 3), 10)
        c = arch_counts(spec, width, stem)
        kind = spec.block + (" v2" if spec.preact else "") + ("" if spec.shortcuts else " plain")
        table.add_row(name, kind, "-".join(map(str, spec.blocks_per_stage)),
                      "/".join(str(max(1, round(w * width))) for w in spec.widths),
                      f"{c.params / 1e6:.3f}", f"{c.macs / 1e6:,.1f}")
    console = Console()
    console.print(table)
    console.print("params: trainable parameters (BN gamma/beta counted, moving statistics not). MACs: "
                  "multiply-accumulates of convolutions and the classifier for one image. v2: "
                  "pre-activation blocks; plain: no shortcuts (the degradation twin).")


def _pretrained_table() -> None:
    from rich import box
    from rich.console import Console
    from rich.table import Table

    from resnet_deploy.models.pretrained import list_pretrained

    console = Console()
    found = list_pretrained()
    if not found:
        console.print("no pretrained model found (see resnet_deploy/models/pretrained.py for the folders searched)")
        return
    table = Table(title="Pretrained models (use the name wherever a model path goes)", box=box.SIMPLE_HEAD,
                  pad_edge=False, collapse_padding=True)
    for col, right in (("name", False), ("arch", False), ("top-1 %", True), ("epochs", True), ("MB", True)):
        table.add_column(col, justify="right" if right else "left", no_wrap=True)
    for m in found:
        table.add_row(m.name, m.card["arch"], f"{100 * m.test_accuracy:.2f}", str(m.card.get("epochs")),
                      f"{m.path.stat().st_size / 1e6:.1f}")
    console.print(table)
    for m in found:
        console.print(f"{m.name}: {m.path}")
    console.print("top-1: the card's accuracy on the whole CIFAR-10 test split; MB = 10^6 bytes.")
