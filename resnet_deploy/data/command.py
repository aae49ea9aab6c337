"""The ``resnet-deploy data`` command: where CIFAR-10 was found and what it holds."""

from __future__ import annotations

from resnet_deploy.cli_common import DataOption


def data(data: DataOption = None) -> None:
    """Find CIFAR-10 and print what was found: source, images per class per split, mean/std, warnings."""
    from rich.console import Console
    from rich.table import Table

    from resnet_deploy.data.constants import CIFAR10_MEAN, CIFAR10_STD, CLASS_NAMES
    from resnet_deploy.data.sources import channel_stats, load_cifar10

    from resnet_deploy.cli_common import quiet_frameworks

    quiet_frameworks()  # only a download imports Keras (and TensorFlow): keep its start-up logs out
    console = Console()
    ds = load_cifar10(data)
    console.print(f"source: [bold]{ds.source}[/] ({ds.kind})")
    table = Table(title="CIFAR-10 images per class")
    table.add_column("class")
    splits = [s for s in (ds.train, ds.test) if s is not None]
    for s in splits:
        table.add_column(s.name, justify="right")
    counts = [s.class_counts() for s in splits]
    for i, name in enumerate(CLASS_NAMES):
        table.add_row(f"{i} {name}", *(f"{c[i]:,}" for c in counts))
    table.add_row("total", *(f"{len(s):,}" for s in splits), style="bold")
    console.print(table)
    stats = Table(title="per-channel pixel statistics (0..255)")
    for col in ("split", "mean R, G, B", "std R, G, B"):
        stats.add_column(col)
    for s in splits:
        m, sd = channel_stats(s.x)
        stats.add_row(s.name, ", ".join(f"{v:.2f}" for v in m), ", ".join(f"{v:.2f}" for v in sd))
    stats.add_row("normalisation used", ", ".join(f"{v:.2f}" for v in CIFAR10_MEAN),
                  ", ".join(f"{v:.2f}" for v in CIFAR10_STD), style="dim")
    console.print(stats)
    for note in ds.notes:
        console.print(f"[yellow]warning:[/] {note}")
    if not ds.notes:
        console.print("[green]complete:[/] 50,000 training and 10,000 test images, 10 classes")
