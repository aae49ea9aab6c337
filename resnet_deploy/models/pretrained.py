"""Pretrained models: find them by short name, check them, and publish a training run as one.

A pretrained model is three files side by side, whatever folder holds them:

    <name>.keras            the float32 model (last epoch of its run), RGB pixels 0..255 in, logits out
    <name>.keras.json       its metadata sidecar, as ``resnet-deploy train`` wrote it
    <name>.card.json        the model card: recipe, epochs, accuracy, machine, wall time, command,
                            sha256 of the .keras file; ``<name>.md`` is the same card for people

Folders searched, in order (the first model of a name wins):

1. ``resnet_deploy/pretrained/`` inside the installed package: the small models (ResNet20 is about
   1 MB) travel in the wheel as package data, so ``resnet-deploy export resnet20-cifar10`` works
   without a checkout;
2. every folder in ``$RESNET_DEPLOY_PRETRAINED`` (``os.pathsep``-separated);
3. ``pretrained/`` at the top of a source checkout: models too large for a wheel (the flagship
   ResNet34), loaded by name there or by path anywhere.

Nothing here cares which models exist: each card describes its own file.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from resnet_deploy.errors import ModelError

CARD_SUFFIX = ".card.json"
PACKAGE_DIR = Path(__file__).resolve().parents[1] / "pretrained"
CHECKOUT_DIR = Path(__file__).resolve().parents[2] / "pretrained"
CHECK_IMAGES = 500  # the card records the accuracy on the first this-many test images, for a quick check


@dataclass(frozen=True)
class PretrainedModel:
    name: str
    path: Path  # the .keras file
    card: dict

    @property
    def test_accuracy(self) -> float:
        return float(self.card["test_accuracy"])

    @property
    def sha256(self) -> str:
        return self.card["sha256"]


def search_dirs() -> list[Path]:
    extra = [Path(p) for p in os.environ.get("RESNET_DEPLOY_PRETRAINED", "").split(os.pathsep) if p]
    return [PACKAGE_DIR, *extra, CHECKOUT_DIR]


def list_pretrained() -> list[PretrainedModel]:
    """Every pretrained model found (a card beside an existing .keras file), first folder first."""
    found: dict[str, PretrainedModel] = {}
    for folder in search_dirs():
        if not folder.is_dir():
            continue
        for card_path in sorted(folder.glob(f"*{CARD_SUFFIX}")):
            name = card_path.name[: -len(CARD_SUFFIX)]
            model = folder / f"{name}.keras"
            if name in found or not model.exists():
                continue
            try:
                card = json.loads(card_path.read_text())
            except (OSError, json.JSONDecodeError) as exc:
                raise ModelError(f"The model card {card_path} cannot be read ({exc}).",
                                 expected="the JSON card written by publish_pretrained",
                                 fix=f"restore {card_path.name} from the repository or delete it with its model") from exc
            found[name] = PretrainedModel(name, model, card)
    return list(found.values())


def best_pretrained() -> PretrainedModel:
    """The pretrained model with the highest test accuracy on its card (the main job's default)."""
    models = list_pretrained()
    if not models:
        raise ModelError("No pretrained model was found.",
                         expected=f"<name>.keras with <name>{CARD_SUFFIX} in one of: "
                                  + ", ".join(str(d) for d in search_dirs()),
                         fix="pass a model with --model PATH, or train one (resnet-deploy pipeline --train)")
    return max(models, key=lambda m: m.test_accuracy)


def resolve_model(spec: str | os.PathLike) -> Path:
    """A model argument as the commands take it: an existing path, or a pretrained model's short name."""
    path = Path(spec)
    if path.exists():
        return path
    names = {m.name: m for m in list_pretrained()}
    if str(spec) in names:
        return names[str(spec)].path
    known = ", ".join(sorted(names)) or "none found"
    raise ModelError(f"Model {spec} does not exist: it is neither a file nor a pretrained model's name.",
                     expected=f"a .keras/.h5 file, a SavedModel folder, or a pretrained name ({known})",
                     fix="check the path, or run `resnet-deploy models --pretrained` for the names")


def verify(model: PretrainedModel) -> None:
    """Refuse a pretrained file whose bytes are not the ones its card describes."""
    from resnet_deploy.fileio import sha256_file

    actual = sha256_file(model.path)
    if actual != model.sha256:
        raise ModelError(f"Pretrained model {model.path} does not match its card (sha256 {actual[:12]}..., "
                         f"card {model.sha256[:12]}...).", expected="the file the card was written for",
                         fix="restore the file from the repository (git checkout -- <file>) or publish it again")


# ----------------------------------------------------------------------------------------------
# Publishing a training run
# ----------------------------------------------------------------------------------------------
def publish_pretrained(run_dir: str | os.PathLike, name: str, dest: str | os.PathLike, command: str,
                       data=None, force: bool = False) -> Path:
    """Copy ``run_dir/model.keras`` (+ sidecar) to ``dest/<name>.keras`` and write its card.

    The card's accuracies are measured here, with a plain Keras call on the test split, not copied
    from the run: the full split and the first ``CHECK_IMAGES`` images (what the test checks)."""
    from resnet_deploy.data.sources import load_cifar10
    from resnet_deploy.fileio import sha256_file, write_json_atomic
    from resnet_deploy.models.io import load_model, read_metadata

    run_dir, dest = Path(run_dir), Path(dest)
    src = run_dir / "model.keras"
    meta = read_metadata(src)
    if meta is None or "recipe" not in meta:
        raise ModelError(f"{src} has no training metadata.", expected="a folder written by `resnet-deploy train`",
                         fix="publish the output folder of a finished training run")
    target = dest / f"{name}.keras"
    if target.exists() and not force:
        raise ModelError(f"{target} already exists.", fix="pass force=True to replace it")
    test = load_cifar10(data).test
    model = load_model(src)
    acc_all, acc_check = _accuracies(model, test)
    dest.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, target.with_suffix(".keras.tmp"))
    card = _card(name, meta | {"params": meta.get("params") or model.count_params()},
                 sha256_file(target.with_suffix(".keras.tmp")), acc_all, acc_check, len(test), command, run_dir)
    write_json_atomic(dest / f"{name}.keras.json", meta)
    write_json_atomic(dest / f"{name}{CARD_SUFFIX}", card)
    (dest / f"{name}.md").write_text(card_markdown(card))
    os.replace(target.with_suffix(".keras.tmp"), target)  # the model takes its name last
    return target


def _accuracies(model, test) -> tuple[float, float]:
    import numpy as np

    logits = model.predict(test.x.astype("float32"), batch_size=500, verbose=0)
    right = np.argmax(logits, axis=1) == test.y
    return float(right.mean()), float(right[:CHECK_IMAGES].mean())


def _card(name, meta, sha, acc_all, acc_check, n_test, command, run_dir) -> dict:
    log_rows = (run_dir / "log.csv").read_text().splitlines() if (run_dir / "log.csv").exists() else []
    return {
        "name": name, "file": f"{name}.keras", "sha256": sha, "arch": meta["architecture"], "width": meta.get("width"),
        "stem": meta.get("stem"), "params": int(meta["params"]),
        "input": "float32 RGB pixels 0..255, NHWC 32x32x3 (normalisation is the model's first layer)",
        "output": meta.get("output", "logits (no softmax)"), "class_names": meta.get("class_names"),
        "test_accuracy": acc_all, "test_images": n_test,
        f"test_accuracy_first_{CHECK_IMAGES}": acc_check, "check_images": min(CHECK_IMAGES, n_test),
        "check_tolerance": 0.002,  # one image in 500: other CPUs' kernels may flip a borderline image
        "epochs": meta.get("epochs"), "selection": meta.get("selection"), "recipe": meta.get("recipe"),
        "precision": meta.get("precision"), "train_images": meta.get("train_images"),
        "train_time_s": meta.get("train_time_s"), "train_pass_s": meta.get("train_pass_s"),
        "train_images_per_s": meta.get("train_images_per_s"), "sessions": meta.get("sessions"),
        "machine": meta.get("machine"), "versions": meta.get("versions"), "created": meta.get("created"),
        "data_source": meta.get("data_source"), "command": command, "log_csv": log_rows,
    }


def card_markdown(card: dict) -> str:
    r = card["recipe"] or {}
    m = card.get("machine") or {}
    hours = (card.get("train_time_s") or 0) / 3600
    lines = [
        f"# {card['name']}",
        "",
        f"A CIFAR-10 {card['arch']} (width {card['width']:g}, {card['stem']} stem, {card['params']:,} parameters) "
        f"trained by `resnet-deploy train` on this project's CPU machines.",
        "",
        "| | |", "| --- | --- |",
        f"| test accuracy | **{100 * card['test_accuracy']:.2f} %** on {card['test_images']:,} test images "
        f"(first {card['check_images']}: {100 * card[f'test_accuracy_first_{CHECK_IMAGES}']:.2f} %, "
        f"checked by tests/test_pretrained.py) |",
        f"| input / output | {card['input']} / {card['output']} |",
        f"| epochs | {card['epochs']} ({card['selection']}) |",
        f"| recipe | SGD{' Nesterov' if r.get('nesterov') else ''} momentum {r.get('momentum')}, batch "
        f"{r.get('batch_size')}, peak lr {r.get('peak_lr')}, {r.get('warmup_epochs')} warm-up epochs then "
        f"{r.get('schedule')} decay, weight decay {r.get('weight_decay')} (L2), label smoothing "
        f"{r.get('label_smoothing')}, pad {r.get('pad')} + crop, flip {r.get('flip')}, cutout {r.get('cutout')}, "
        f"seed {r.get('seed')} |",
        f"| precision | {card['precision']} |",
        f"| training images | {card['train_images']:,} |",
        f"| machine | {m.get('cpu', '?')}, {m.get('cpu_count', '?')} cores; flags "
        f"{' '.join(f for f in m.get('cpu_flags', []) if f.startswith(('avx', 'amx', 'fma')))} |",
        f"| wall time | {card['train_time_s']:,.0f} s ({hours:.2f} h, {card['sessions']} session(s)); training "
        f"passes {card['train_pass_s']:,.0f} s at {card['train_images_per_s']} images/s (median over epochs) |",
        f"| command | `{card['command']}` |",
        f"| sha256 | `{card['sha256']}` |",
        f"| libraries | {', '.join(f'{k} {v}' for k, v in (card.get('versions') or {}).items())} |",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":  # python -m resnet_deploy.models.pretrained RUN_DIR NAME DEST COMMAND [DATA]
    import sys

    args = sys.argv[1:]
    print(publish_pretrained(args[0], args[1], args[2], args[3], data=args[4] if len(args) > 4 else None,
                             force=True))
