"""One way in for files other people made: models, artifacts, manifests, sidecars and images.

    from resnet_deploy.untrusted import check_regular, read_json, check_sha256, run_model

- ``files``: regular files only (a FIFO, device or socket is refused, never opened to block), bounded
  JSON (size, depth, an object at the top), a file's sha256 against its manifest's, ``--max-memory``
  parsing.
- ``sidecar``: a manifest's or metadata file's fields checked before use (types, finite numbers,
  class names), the artifact's sha256 compared: ``read_sidecar``.
- ``isolate``: ``run_model`` loads and runs a file in a child process under a memory cap and a
  timeout that covers its start-up; a crash, an out-of-memory failure or a hang is one
  ``ModelRunError`` naming the file.

``predict`` goes through all of it. bench runs each file in its own child already (``bench.child``);
its children can take the same memory cap (``apply_memory_cap``).
"""

from resnet_deploy.untrusted.files import (DEFAULT_MAX_MEMORY, check_regular, check_sha256, format_bytes,
                                           open_regular, parse_memory, read_bytes, read_json)
from resnet_deploy.untrusted.isolate import DEFAULT_TIMEOUT_S, ModelRun, apply_memory_cap, run_model
from resnet_deploy.untrusted.sidecar import Sidecar, read_sidecar

__all__ = ["DEFAULT_MAX_MEMORY", "DEFAULT_TIMEOUT_S", "ModelRun", "Sidecar", "apply_memory_cap", "check_regular",
           "check_sha256", "format_bytes", "open_regular", "parse_memory", "read_bytes", "read_json", "read_sidecar",
           "run_model"]
