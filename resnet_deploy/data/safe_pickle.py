"""A restricted unpickler for the official CIFAR-10 python batches.

``pickle.load`` on an arbitrary file runs arbitrary code. The official batches hold only dicts,
lists, bytes, ints and one uint8 numpy array; this unpickler admits exactly the globals needed to
rebuild those and raises ``UnsafePickleError`` for anything else, before it is called.
"""

from __future__ import annotations

import io
import pickle

from resnet_deploy.errors import UnsafePickleError

# (module, name) pairs that numpy arrays need. Older pickles say numpy.core, numpy 2 says numpy._core.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),  # protocol-2 pickles written by Python 3 encode bytes this way
}


class _CifarUnpickler(pickle.Unpickler):
    def __init__(self, fh, source: str):
        super().__init__(fh, encoding="bytes")
        self._source = source

    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            if module.startswith("numpy"):
                import numpy as np

                if name == "_reconstruct":
                    return np.ndarray.__reduce__(np.zeros(0))[0]  # numpy's own _reconstruct
                if name == "scalar":
                    return np.float64(0).__reduce__()[0]  # numpy's own scalar()
                return getattr(np, name)
            return super().find_class(module, name)
        raise UnsafePickleError(
            f"Refusing to load {self._source}: the pickle asks for {module}.{name}, "
            "which a CIFAR-10 batch never contains (it may run code).",
            expected="an official CIFAR-10 python batch (dict of bytes, lists and a uint8 array)",
            fix="download the official cifar-10-python.tar.gz again, or use a train.npz/test.npz folder",
        )


def safe_load_batch(data: bytes, source: str) -> dict:
    """Unpickle one CIFAR-10 batch from bytes, admitting only what such a batch contains."""
    try:
        obj = _CifarUnpickler(io.BytesIO(data), source).load()
    except UnsafePickleError:
        raise
    except Exception as exc:  # truncated or not a pickle at all
        from resnet_deploy.errors import DataError

        raise DataError(
            f"Could not read {source} as a CIFAR-10 batch: {type(exc).__name__}: {exc}",
            expected="an official CIFAR-10 python batch",
            fix="re-download or re-extract cifar-10-python.tar.gz",
        ) from exc
    if not isinstance(obj, dict):
        raise UnsafePickleError(f"{source} holds a {type(obj).__name__}, not the dict of a CIFAR-10 batch.",
                                fix="point --data at the official batches")
    return {k.decode() if isinstance(k, bytes) else k: v for k, v in obj.items()}
