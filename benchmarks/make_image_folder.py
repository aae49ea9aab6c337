"""Write CIFAR-10 as an image folder (DIR/train/<class>/*.png, DIR/test/<class>/*.png), the layout of
keras.utils.image_dataset_from_directory and torchvision's ImageFolder.

    .venv/bin/python benchmarks/make_image_folder.py /tmp/cifar10_png                     # lossless, 32x32
    .venv/bin/python benchmarks/make_image_folder.py /tmp/cifar10_jpg224 --format jpeg --size 224 \\
        --splits test --limit 10000                                   # the scale benchmark's input

Files are named by their index in the source split (``00042.png``), so the folder reads back in the npz's
order (``resnet_deploy.data.folder``): as PNG at the source size the images come back byte for byte, which
this script checks on the first ``--check`` images of each split it wrote. ``--size`` upscales with Pillow's
bicubic filter before encoding (then the pixels are no longer CIFAR-10's); ``--format jpeg`` is lossy
(``--quality``). ``--limit N`` keeps the first N images of each split (CIFAR-10's first rows are class-mixed:
every class is present from a few dozen on). The folder appears complete or not at all. Nothing is timed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _size(text: str):
    parts = [int(p) for p in text.lower().replace("x", ",").split(",") if p]
    return parts[0] if len(parts) == 1 else tuple(parts)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path, help="the folder to write (refused if it exists, unless --force)")
    p.add_argument("--data", default=None, help="CIFAR-10 (default: the package's usual search, e.g. "
                                                "$RESNET_DEPLOY_DATA or ../shared/data/cifar10)")
    p.add_argument("--format", choices=("png", "jpeg"), default="png")
    p.add_argument("--quality", type=int, default=95, help="JPEG quality (default 95)")
    p.add_argument("--size", type=_size, default=None, help="resize every image to SIZE or HxW first (e.g. 224)")
    p.add_argument("--splits", default="train,test", help="comma-separated: train, test (default both)")
    p.add_argument("--limit", type=int, default=None, help="the first N images of each split")
    p.add_argument("--check", type=int, default=200, help="images of each split read back and compared (PNG at "
                                                          "the source size only; 0: none)")
    p.add_argument("--force", action="store_true", help="replace OUT")
    a = p.parse_args(argv)

    import numpy as np

    from resnet_deploy.data import CLASS_NAMES, load_cifar10
    from resnet_deploy.data.folder import Decoding, open_image_folder, write_image_folder
    from resnet_deploy.errors import ResnetDeployError
    from resnet_deploy.terminal import safe_lines

    splits = tuple(s.strip() for s in a.splits.split(",") if s.strip())
    try:
        if a.limit is not None and a.limit < 1:
            raise ResnetDeployError(f"--limit {a.limit} keeps no image.", expected="a positive count",
                                    fix="e.g. --limit 500")
        data = load_cifar10(a.data, splits=splits)
        chosen = {s: data.split(s).take(a.limit) for s in splits}
        out = write_image_folder(a.out, chosen, CLASS_NAMES, image_format=a.format, size=a.size,
                                 jpeg_quality=a.quality, force=a.force)
        folder = open_image_folder(out, strict=True)
        print(f"{out}: CIFAR-10 from {data.source} ({data.kind}) as {a.format}"
              + (f" (quality {a.quality})" if a.format == "jpeg" else "")
              + (f", resized to {Decoding(a.size).size[0]}x{Decoding(a.size).size[1]}" if a.size else ", 32x32"))
        print(f"classes: {', '.join(folder.class_names)}")
        for s in splits:
            split = folder.split(s)
            nbytes = int(split.sizes.sum())
            print(f"{s}: {len(split)} images, {nbytes / 1e6:.1f} MB on disk, per class "
                  f"{split.class_counts().tolist()}")
            if a.check and a.format == "png" and a.size is None:
                n = min(a.check, len(split))
                got = split.stream(strict=True).take(np.arange(n))
                same = got.x.tobytes() == chosen[s].x[:n].tobytes() and np.array_equal(got.y, chosen[s].y[:n])
                print(f"  read back: the first {n} images and labels are "
                      f"{'byte-identical to the source' if same else 'NOT the source pixels'}")
                if not same:
                    return 1
    except ResnetDeployError as exc:
        print(safe_lines(str(exc)), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
