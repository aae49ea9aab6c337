"""User-facing errors.

Every error a user can cause (bad path, bad option, wrong model) is a ``ResnetDeployError``
that says what happened, what was expected and how to fix it. Only ``cli.py`` turns these into
exit codes; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations


class ResnetDeployError(Exception):
    """Base class: a failure caused by input the user can fix."""

    exit_code = 2

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None):
        self.what = what
        self.expected = expected
        self.fix = fix
        super().__init__(self.render())

    def render(self) -> str:
        lines = [self.what]
        if self.expected:
            lines.append(f"Expected: {self.expected}")
        if self.fix:
            lines.append(f"Fix: {self.fix}")
        return "\n".join(lines)


class DataError(ResnetDeployError):
    """The CIFAR-10 data could not be found, read or validated."""


class UnsafePickleError(DataError):
    """A pickle asked for something the CIFAR-10 batches never contain."""


class ModelError(ResnetDeployError):
    """Unknown architecture, bad builder option, or a model file that cannot be used."""


class TrainError(ResnetDeployError):
    """Bad training option or a training run that cannot proceed."""


class ExportError(ResnetDeployError):
    """A conversion failed or an artifact did not match its float model."""


class BenchError(ResnetDeployError):
    """An artifact could not be benchmarked, or a gate failed."""


class GateError(BenchError):
    """A CI gate (--max-drop, --min-speedup) failed."""

    exit_code = 1


class OutputExistsError(ResnetDeployError):
    """Refusing to overwrite an existing file or folder without --force."""


class OutputLockedError(ResnetDeployError):
    """Another run holds the output folder."""


class UntrustedFileError(ResnetDeployError):
    """A model, artifact, manifest or image refused before any of it was used: not a regular file, a
    checksum that does not match its manifest, a malformed or implausible manifest, over a size budget."""


class ModelRunError(ResnetDeployError):
    """An untrusted model crashed, ran out of its memory cap, or hung in its isolated child process.

    ``kind`` says which: "crash" (a signal), "memory" (over ``--max-memory``), "timeout" (no progress),
    "start" (the child could not start) or "runtime" (the engine refused the file with an exception)."""

    def __init__(self, what: str, expected: str | None = None, fix: str | None = None, kind: str = "runtime"):
        self.kind = kind
        super().__init__(what, expected, fix)


class OutputWriteError(ResnetDeployError):
    """An output could not be written (disk full, quota, name too long); nothing half-written was left."""
