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
