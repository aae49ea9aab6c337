"""A cache of the float model's test-split logits, so that benching more artifacts of one model does
not pay the float pass again; an entry that cannot be shown to be right is not used.

Key: the model file's sha256, a fingerprint of the images and labels (sha256 of their bytes), the
preprocessing and the image count; anything else that would change the logits changes one of those.
Folder: ``$RESNET_DEPLOY_CACHE`` or ``~/.cache/resnet-deploy`` (a private temporary folder, said on
stderr, when $HOME is empty or unset), under ``reference-logits/``; each entry is ``<key>.npz``,
written atomically, holding the logits and ``meta``: the key's parts and the logits' sha256.
``--no-cache`` neither reads nor writes it.

What is checked, and what it catches:

- ``load``: the entry is a regular file of the expected size, its parts hash to its name and are the
  parts this run asked for (an entry renamed onto another key, or written for another model, data or
  preprocessing, is refused), and its logits have the recorded sha256, the run's shape and are finite
  (a damaged or truncated entry). Anything wrong discards the entry (it is replaced by the next pass).
- ``load_verified``: ``load``, then the float model is run again on a small random sample of the
  cached images (``SPOT_CHECK_IMAGES``, drawn from the operating system's randomness, so no one can
  know which) and the fresh logits must match the cached ones; a mismatch discards the entry and says
  so. Anyone who can write the cache folder can recompute a key and a checksum, so this re-run is what
  stops planted logits. It catches an entry that is wrong on many images; one wrong on a few images
  in 10,000 would escape a 32-image sample (a wrong fraction f is caught with probability
  1 - (1 - f) ** 32: 96 % for f = 10 %).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Callable

import numpy as np

from resnet_deploy.data.constants import NUM_CLASSES
from resnet_deploy.data.preprocess import Preprocessing

ENV_VAR = "RESNET_DEPLOY_CACHE"
ENTRY_VERSION = 2
SPOT_CHECK_IMAGES = 32
SPOT_RTOL = 1e-3  # relative to the largest cached logit of the sample; float re-runs agree to about 1e-6
_PARTS: dict[str, dict] = {}  # key -> its parts, for every key cache_key computed in this process


def cache_root() -> Path:
    from resnet_deploy.fileio import user_cache_dir

    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else user_cache_dir()


def data_fingerprint(x: np.ndarray, y: np.ndarray) -> str:
    h = hashlib.sha256()
    for a in (np.ascontiguousarray(x), np.ascontiguousarray(y).astype(np.int64)):
        h.update(str(a.shape).encode())
        h.update(a.tobytes())
    return h.hexdigest()


def folder_fingerprint(split) -> str:
    """An image folder's split (``folder_data.FolderData``) as cache data: its content fingerprint (file
    contents, not times: ``FolderSplit.fingerprint``), the decoding (input size, resize policy) and what
    decides which files decode (strict, the pixel budget). Reads every file once; decodes none."""
    h = hashlib.sha256(b"image-folder\0")
    h.update(split.fingerprint().encode())
    h.update(json.dumps({"decoding": split.decoding.record(), "strict": bool(split.strict),
                         "max_memory": split.max_memory}, sort_keys=True).encode())
    return h.hexdigest()


def key_parts(model_sha256: str, fingerprint: str, preprocessing: Preprocessing, images: int) -> dict:
    return {"model_sha256": model_sha256, "data": fingerprint, "images": int(images),
            "preprocessing": {k: v for k, v in preprocessing.to_dict().items() if k != "convention"}}


def _key_of(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:32]


def cache_key(model_sha256: str, fingerprint: str, preprocessing: Preprocessing, images: int) -> str:
    """The entry name for these parts; the parts are remembered, so ``store`` binds the entry to them and
    ``load`` refuses an entry made for other ones."""
    parts = key_parts(model_sha256, fingerprint, preprocessing, images)
    key = _key_of(parts)
    _PARTS[key] = parts
    return key


def cache_path(key: str, root: Path | None = None) -> Path:
    return (root or cache_root()) / "reference-logits" / f"{key}.npz"


def logits_sha256(logits: np.ndarray) -> str:
    a = np.ascontiguousarray(logits, np.float32)
    return hashlib.sha256(str(a.shape).encode() + a.tobytes()).hexdigest()


def load(key: str, images: int | None, root: Path | None = None, *, parts: dict | None = None,
         notes: list[str] | None = None, max_images: int | None = None,
         num_classes: int = NUM_CLASSES) -> np.ndarray | None:
    """The cached logits of ``key``, or None: absent, or refused (module docstring) and then discarded,
    with the reason appended to ``notes``. ``parts``: the key's parts (default: those ``cache_key``
    computed for it in this process). ``images`` None: any count up to ``max_images`` (an image folder, where
    files that do not decode are left out; the caller checks the count after its pass)."""
    p = cache_path(key, root)
    if not os.path.lexists(p):
        return None
    logits, why = _read_entry(p, key, images, parts or _PARTS.get(key), max_images, num_classes)
    if why is not None:
        discard(key, root)
        if notes is not None:
            notes.append(f"the cached float logits {p} were discarded: {why}")
        return None
    return logits


def _read_entry(p: Path, key: str, images: int | None, parts: dict | None, max_images: int | None = None,
                num_classes: int = NUM_CLASSES) -> tuple[np.ndarray | None, str | None]:
    from resnet_deploy.errors import ResnetDeployError
    from resnet_deploy.untrusted.files import open_regular

    limit = (images if images is not None else int(max_images or 0)) * num_classes * 4 + (1 << 20)
    try:
        with open_regular(p, "cache entry") as fh:
            if os.fstat(fh.fileno()).st_size > limit:
                return None, "it is larger than logits of this many images can be"
            with np.load(fh, allow_pickle=False) as z:
                logits = np.asarray(z["logits"], np.float32)
                meta = json.loads(str(z["meta"][()])) if "meta" in z.files else None
    except (ResnetDeployError, OSError, KeyError, ValueError, EOFError) as exc:
        return None, f"it is unreadable ({type(exc).__name__})"
    if not isinstance(meta, dict) or meta.get("version") != ENTRY_VERSION:
        return None, "it records no key parts or checksum (an entry of an older version)"
    stored = meta.get("parts")
    if meta.get("key") != key or not isinstance(stored, dict) or _key_of(stored) != key:
        return None, "its recorded parts do not give its name (it was renamed or edited)"
    if parts is not None and stored != parts:
        return None, "it was made for another model, data or preprocessing"
    rows = images if images is not None else min(len(logits), int(max_images or 0))
    if logits.shape != (rows, num_classes) or not np.all(np.isfinite(logits)):
        return None, f"its logits have shape {logits.shape} or are not finite"
    if meta.get("logits_sha256") != logits_sha256(logits):
        return None, "its logits do not have the recorded sha256 (damaged or edited)"
    return logits, None


def load_verified(key: str, images: int, root: Path | None = None, *,
                  rerun: Callable[[np.ndarray], np.ndarray], notes: list[str] | None = None,
                  parts: dict | None = None, sample: int = SPOT_CHECK_IMAGES) -> np.ndarray | None:
    """``load``, then ``rerun(indices)`` (the float model's logits for those test images, computed now) on
    ``sample`` random indices must match the cache; otherwise the entry is discarded (said in ``notes``)
    and None returned, so the caller runs the float pass. A ``rerun`` that fails leaves the entry alone
    and returns None (nothing was shown either way)."""
    from resnet_deploy.errors import ResnetDeployError

    notes = notes if notes is not None else []
    logits = load(key, images, root, parts=parts, notes=notes)
    if logits is None:
        return None
    idx = spot_check_indices(images, sample)
    try:
        fresh = np.asarray(rerun(idx), np.float32)
    except ResnetDeployError as exc:
        notes.append(f"the cached float logits were not used: the float model could not be re-run to check them "
                     f"({exc.what})")
        return None
    why = sample_mismatch(logits[idx], fresh)
    path = cache_path(key, root)
    if why is not None:
        discard(key, root)
        notes.append(f"the cached float logits {path} were discarded: {why} on a re-run of {len(idx)} random "
                     "cached images through the float model")
        return None
    notes.append(f"cached float logits checked: {len(idx)} random test images re-run through the float model "
                 "match them")
    return logits


def spot_check_indices(images: int, sample: int = SPOT_CHECK_IMAGES) -> np.ndarray:
    """``sample`` distinct indices below ``images``, sorted, from the operating system's randomness."""
    import secrets

    k = min(int(sample), int(images))
    return np.array(sorted(secrets.SystemRandom().sample(range(int(images)), k)), np.int64)


def sample_mismatch(cached: np.ndarray, fresh: np.ndarray, rtol: float = SPOT_RTOL) -> str | None:
    """None when ``fresh`` matches ``cached`` (same shape, finite, within ``rtol`` of the largest cached
    logit, the same top class on every image); else what differs."""
    cached = np.asarray(cached, np.float32)
    fresh = np.asarray(fresh, np.float32)
    if fresh.shape != cached.shape:
        return f"the model gave logits of shape {fresh.shape}, the cache holds {cached.shape}"
    if not np.all(np.isfinite(fresh)):
        return "the model gave non-finite logits"
    if not len(cached):
        return None
    diff = float(np.max(np.abs(fresh - cached)))
    tol = rtol * max(1.0, float(np.max(np.abs(cached))))
    top = int(np.sum(fresh.argmax(1) != cached.argmax(1)))
    if diff > tol or top:
        return f"the cached logits differ from the model's by up to {diff:.3g} (allowed {tol:.2g}) and name " \
               f"another top class on {top} of {len(cached)} images"
    return None


def rerun_in_child(model: str | os.PathLike, x: np.ndarray, preprocessing: Preprocessing, runtime: str | None = None,
                   threads: int | None = None, max_memory: int | None = None,
                   timeout_s: float | None = None) -> Callable[[np.ndarray], np.ndarray]:
    """A ``rerun`` for ``load_verified``: the float model's logits for ``x[indices]``, computed in a child
    process (``untrusted.run_model``, capped and timed out like predict's)."""
    from resnet_deploy.untrusted import DEFAULT_MAX_MEMORY, DEFAULT_TIMEOUT_S, run_model

    def rerun(indices: np.ndarray) -> np.ndarray:
        return run_model(model, np.asarray(x)[indices], preprocessing=preprocessing.to_dict(), n_classes=NUM_CLASSES,
                         runtime=runtime, threads=threads, max_memory=max_memory or DEFAULT_MAX_MEMORY,
                         timeout_s=timeout_s or DEFAULT_TIMEOUT_S).outputs

    return rerun


def discard(key: str, root: Path | None = None) -> None:
    p = cache_path(key, root)
    try:
        p.unlink()
    except FileNotFoundError:
        pass
    except OSError:  # a read-only cache: the entry stays, but it was not used
        pass


def store(key: str, logits: np.ndarray, root: Path | None = None, *, parts: dict | None = None) -> Path | None:
    """Write the entry atomically, bound to its parts (default: those ``cache_key`` computed for ``key``)
    with the logits' sha256; None when the cache folder is not writable (the run goes on)."""
    from resnet_deploy.errors import ResnetDeployError
    from resnet_deploy.fileio import atomic_path

    logits = np.ascontiguousarray(logits, np.float32)
    meta = {"version": ENTRY_VERSION, "key": key, "parts": parts or _PARTS.get(key),
            "logits_sha256": logits_sha256(logits)}
    p = cache_path(key, root)
    try:
        with atomic_path(p) as tmp:  # the staged path keeps the .npz name, so savez adds nothing
            np.savez(tmp, logits=logits, meta=np.array(json.dumps(meta)))
    except (OSError, ResnetDeployError):  # read-only, full, or a FIFO planted at the entry's name
        return None
    return p
