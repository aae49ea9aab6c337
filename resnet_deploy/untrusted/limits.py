"""Resource limits for a process that opens untrusted files (standard library only: the bootstrap of
``isolate.run_model`` runs this file before anything else is imported, then ``exec``\\ s the child)."""

from __future__ import annotations

import os
import sys


def lower(res: int, value: int) -> None:
    """Lower the soft limit ``res`` to ``value`` (never above the hard limit, never raised)."""
    import resource

    soft, hard = resource.getrlimit(res)
    value = min(int(value), (1 << 63) - 1)  # a C long: anything larger is no limit anyway
    if hard != resource.RLIM_INFINITY:
        value = min(value, hard)
    if soft == resource.RLIM_INFINITY or soft > value:
        resource.setrlimit(res, (value, hard))


def apply_memory_cap(max_memory: int | None, stack: int | None = None) -> None:
    """Cap this process: ``RLIMIT_DATA`` (heap and private writable mappings, thread stacks included) at
    ``max_memory`` bytes (None or 0: no cap), ``RLIMIT_STACK`` at ``stack`` (the default stack of threads
    started by a program that begins after it), and no core file."""
    import resource

    if max_memory:
        lower(resource.RLIMIT_DATA, int(max_memory))
    if stack:
        lower(resource.RLIMIT_STACK, int(stack))
    lower(resource.RLIMIT_CORE, 0)


def boot(argv: list[str]) -> None:
    """``argv``: cap, stack, then the child's own arguments; never returns."""
    apply_memory_cap(int(argv[0]), int(argv[1]))
    os.execv(sys.executable, [sys.executable, "-m", "resnet_deploy.untrusted.child", *argv[2:]])
