"""The input contract of a bench run: with which preprocessing each file, the float reference included,
is opened. Resolved once, here, and handed to every runner (``measure.FileSpec``); nothing downstream
guesses it.

- An artifact with a manifest: the preprocessing declared at its export.
- The float reference: what its artifacts' manifests declare (the export resolved it then, from the
  model's metadata or ``--mean/--std/--input-range``), else the model's own metadata sidecar, else the
  project default (raw RGB pixels 0..255). Artifacts of one run that declare different preprocessing
  are an error naming them: there is no single float reference for them.
- An artifact without a manifest: the run's contract (the reference's), said so in its notes.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.errors import BenchError


@dataclass(frozen=True)
class InputContract:
    preprocessing: Preprocessing
    source: str  # where it comes from, for the report

    def describe(self) -> str:
        p = self.preprocessing
        norm = f", mean {list(p.mean)}, std {list(p.std)}" if p.mean is not None else ", no normalisation"
        return f"x = (pixels * {p.scale:g} - mean) / std{norm}; from {self.source}"


def resolve_contract(entries, ref_path: Path | None) -> InputContract:
    """The contract of the float reference (and of manifest-less artifacts); see the module docstring."""
    declared: dict[Preprocessing, list[str]] = {}
    for e in entries:
        if e.role != "reference" and e.error is None and e.manifest is not None:
            declared.setdefault(e.manifest.preprocessing_spec, []).append(e.label or e.path.name)
    if len(declared) > 1:
        listed = "; ".join(f"{', '.join(names)}: {_short(p)}" for p, names in declared.items())
        raise BenchError(f"The artifacts were exported with different preprocessing ({listed}).",
                         expected="one input contract per bench run, so that one float reference serves them all",
                         fix="bench each group of artifacts separately, or re-export them with the same "
                             "--mean/--std/--input-range")
    if declared:
        spec, names = next(iter(declared.items()))
        return InputContract(spec, f"declared at export in the manifest(s) of {', '.join(names)}")
    if ref_path is not None:
        from resnet_deploy.models.io import read_metadata

        meta = read_metadata(ref_path)
        if meta and meta.get("preprocessing"):
            return InputContract(Preprocessing.from_dict(meta["preprocessing"]),
                                 f"the metadata sidecar of {ref_path.name}")
    return InputContract(Preprocessing.pixels(), "the project default (no manifest and no model metadata declare "
                                                 "one): raw RGB pixels 0..255")


def file_preprocessing(entry, contract: InputContract) -> tuple[Preprocessing, str | None]:
    """The preprocessing one file is opened with: its manifest's, else the run's contract (and a note)."""
    if entry.role != "reference" and entry.manifest is not None:
        return entry.manifest.preprocessing_spec, None
    if entry.role != "reference":
        return contract.preprocessing, f"no manifest: opened with the run's input contract ({contract.describe()})"
    return contract.preprocessing, None


def _short(p: Preprocessing) -> str:
    return f"scale {p.scale:g}" + (f", mean {list(p.mean)}, std {list(p.std)}" if p.mean is not None else "")
