"""The input contract of a bench run: with which preprocessing each file, the float reference included,
is opened. Resolved once, here, and handed to every runner (``measure.FileSpec``); nothing downstream
guesses it.

- An artifact with a manifest: the preprocessing declared at its export.
- The float reference: what its artifacts' manifests declare (the export resolved it then, from the
  model's metadata or ``--mean/--std/--input-range``), else the model's own metadata sidecar, else the
  project default (raw RGB pixels 0..255). Artifacts of one run that declare different preprocessing
  are an error naming them: there is no single float reference for them.
- An artifact without a manifest: the run's contract (the reference's), said so in its notes.

With an image folder as ``--data``, the contract also says how its images become input (``decoding``: the
input size and resize policy the manifests record from their export, ``options.data.decoding``; without one,
the artifacts' input size, else the reference model's metadata, with the default policy, said so), how many
class scores each file must return and the class names the manifests record. Artifacts that declare
different decodings are an error, like different preprocessing.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from resnet_deploy.data.constants import IMAGE_SHAPE, NUM_CLASSES
from resnet_deploy.data.preprocess import Preprocessing
from resnet_deploy.errors import BenchError


@dataclass(frozen=True)
class InputContract:
    preprocessing: Preprocessing
    source: str  # where it comes from, for the report
    decoding: object = None  # data.folder.Decoding: an image folder's input size and resize policy; None: CIFAR-10
    num_classes: int = NUM_CLASSES
    class_names: tuple | None = None  # as an image-folder export recorded them (None: not recorded)
    classes_from: str = "The model"
    notes: list = field(default_factory=list)

    @property
    def image_shape(self) -> tuple:
        return IMAGE_SHAPE if self.decoding is None else (*self.decoding.size, 3)

    def describe(self) -> str:
        p = self.preprocessing
        norm = f", mean {list(p.mean)}, std {list(p.std)}" if p.mean is not None else ", no normalisation"
        return f"x = (pixels * {p.scale:g} - mean) / std{norm}; from {self.source}"


def resolve_contract(entries, ref_path: Path | None, folder: bool = False, fit: str | None = None) -> InputContract:
    """The contract of the float reference (and of manifest-less artifacts); see the module docstring.
    ``folder``: the run's data is an image folder (``folder_data.is_image_folder``); ``fit``: its resize policy
    where no manifest declares one (the manifests' wins: it is what the export calibrated with)."""
    from dataclasses import replace

    base = _preprocessing_contract(entries, ref_path)
    return replace(base, **_folder_contract(entries, ref_path, fit)) if folder else base


def _folder_contract(entries, ref_path: Path | None, fit: str | None = None) -> dict:
    """decoding, num_classes, class_names, classes_from and notes for an image-folder run."""
    from resnet_deploy.data.folder import DEFAULT_FIT, Decoding
    from resnet_deploy.data.folder_data import model_decoding

    declared: dict[tuple, list[str]] = {}
    sizes: dict[tuple, list[str]] = {}
    names, outputs, notes = None, {}, []
    for e in entries:
        if e.role == "reference" or e.error is not None or e.manifest is None:
            continue
        m, label = e.manifest, e.label or e.path.name
        data = (m.options or {}).get("data") or {}
        dec = data.get("decoding")
        if isinstance(dec, dict):
            declared.setdefault((tuple(dec.get("size") or ()), dec.get("fit")), []).append(label)
            names = names or tuple(data.get("class_names") or m.class_names or ())
        shape = tuple(m.input.shape)
        if len(shape) == 4:
            sizes.setdefault(tuple(shape[1:3]), []).append(label)
        if m.output.shape and m.output.shape[-1]:
            outputs.setdefault(int(m.output.shape[-1]), []).append(label)
    for what, found in (("resize policies", declared), ("input sizes", sizes), ("class counts", outputs)):
        if len(found) > 1:
            listed = "; ".join(f"{', '.join(v)}: {k}" for k, v in found.items())
            raise BenchError(f"The artifacts declare different {what} ({listed}).",
                             expected="artifacts of one model, exported for one image folder",
                             fix="bench each model's artifacts separately")
    if declared:
        (size, fit), who = next(iter(declared.items()))
        decoding = Decoding(size, fit)
        source = f"the manifest(s) of {', '.join(who)}"
    else:
        policy = fit or DEFAULT_FIT
        if sizes:
            size, who = next(iter(sizes.items()))
            decoding = Decoding(size, policy)
            source = f"the input size of {', '.join(who)}"
        else:
            decoding = model_decoding(_metadata_shape(ref_path), policy, f"The reference {ref_path}")
            source = f"the metadata of {ref_path.name if ref_path else 'the reference'}"
        notes.append(f"image folder decoded at {decoding.size[0]}x{decoding.size[1]} from {source}, resize policy "
                     f"{policy} ({'given' if fit else 'the default'}: no manifest records an image-folder export's "
                     "policy)")
    if outputs:
        num_classes, who = next(iter(outputs.items()))
        classes_from = f"{who[0]}"
    else:
        meta = _metadata(ref_path)
        num_classes = len(meta.get("class_names") or ()) or NUM_CLASSES
        classes_from = f"The reference {ref_path}"
    return {"decoding": decoding, "num_classes": num_classes, "class_names": names, "classes_from": classes_from,
            "notes": notes + [f"images decoded as {decoding.description} (fit {decoding.fit}), from {source}"]}


def _metadata(ref_path: Path | None) -> dict:
    if ref_path is None:
        return {}
    from resnet_deploy.models.io import read_metadata

    return read_metadata(ref_path) or {}


def _metadata_shape(ref_path: Path | None):
    shape = _metadata(ref_path).get("input_shape")
    if not shape:
        raise BenchError("No artifact manifest and no model metadata say which input size to decode the image "
                         "folder to.", expected="artifacts exported by `resnet-deploy export` (their manifests "
                                                "record the input size and resize policy)",
                         fix="bench the exported artifacts, or give the reference model a metadata sidecar")
    return shape


def _preprocessing_contract(entries, ref_path: Path | None) -> InputContract:
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
