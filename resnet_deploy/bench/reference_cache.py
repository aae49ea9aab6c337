"""A cache of the float model's test-split logits, so that benching more artifacts of one model does
not pay the float pass again.

Key: the model file's sha256, a fingerprint of the images and labels (sha256 of their bytes), the
preprocessing and the image count; anything else that would change the logits changes one of those.
Folder: ``$RESNET_DEPLOY_CACHE`` or ``~/.cache/resnet-deploy``, under ``reference-logits/``; each
entry is ``<key>.npz`` (logits + the key's parts), written atomically. ``--no-cache`` neither reads
nor writes it. A damaged entry is ignored (and replaced by the next pass).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np

from resnet_deploy.data.constants import NUM_CLASSES
from resnet_deploy.data.preprocess import Preprocessing

ENV_VAR = "RESNET_DEPLOY_CACHE"


def cache_root() -> Path:
    return Path(os.environ.get(ENV_VAR) or Path.home() / ".cache" / "resnet-deploy").expanduser()


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x), np.ascontiguousarray(y).astype(np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def cache_key(model_sha256: str, fingerprint: str, preprocessing: Preprocessing, images: int) -> str:
    parts = {"model_sha256": model_sha256, "data": fingerprint, "images": int(images),
             "preprocessing": {k: v for k, v in preprocessing.to_dict().items() if k != "convention"}}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_path(key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "reference-logits" / f"{key}.npz"


def load(key: str, images: int, root: Path | None = None) -> np.ndarray | None:
    """The cached logits of ``key``, or None (absent, unreadable or of the wrong shape)."""
    p = cache_path(key, root)
    try:
        with np.load(p, allow_pickle=False) as z:
            logits = np.asarray(z["logits"], np.float32)
    except (OSError, KeyError, ValueError):
        return None
    return logits if logits.shape == (images, NUM_CLASSES) and np.all(np.isfinite(logits)) else None


def store(key: str, logits: np.ndarray, root: Path | None = None) -> Path | None:
    """Write the entry atomically; None when the cache folder is not writable (the run goes on)."""
    from resnet_deploy.fileio import atomic_path

    p = cache_path(key, root)
    try:
        with atomic_path(p) as tmp:  # the staged path keeps the .npz name, so savez adds nothing
            np.savez(tmp, logits=np.asarray(logits, np.float32))
    except OSError:
        return None
    return p
