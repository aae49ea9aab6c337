"""Which files take part in a bench run: the artifacts given, their float reference (from the
manifests or ``--reference``), the runtimes each runs in (an ONNX file once per ``--runtimes`` entry)
and the FP32 baseline each quantized artifact is compared with (same format, same runtime, same source
model); and which of them are refused before anything runs: a file whose sha256 is not its
manifest's (a file copied over another's name), an artifact exported from another float model than
the reference (stale; ``--allow-stale`` benches it, marked and not gated), an ONNX INT8 file whose
U8S8 kernels saturate on this CPU (``--allow-saturating`` benches it, marked).

Each file is an ``ArtifactResult`` from here on: selection fills what is known before measuring (format,
manifest, role, runtime, refusals as its ``error``), the run fills in the figures.
"""

from __future__ import annotations

import os
from pathlib import Path

from resnet_deploy.artifact import Manifest, read_manifest
from resnet_deploy.bench.results import ArtifactResult, error_dict
from resnet_deploy.config import Format, Precision
from resnet_deploy.errors import BenchError, ResnetDeployError
from resnet_deploy.records import Int8Calibration

NO_MANIFEST_DEFAULTS = ("no manifest: benched with the defaults — preprocessing = raw RGB pixels 0..255 "
                        "(the resnet-deploy model convention), CIFAR-10 class order, precision unknown, "
                        "integer I/O quantization read from the model itself")


def identify(path: str | os.PathLike, role: str) -> ArtifactResult:
    """The result of ``path`` as selected: its format and, from its manifest, precision; errors are recorded,
    not raised."""
    p = Path(path)
    e = ArtifactResult(label="", path=p, role=role)
    try:
        if not p.exists():
            raise BenchError(f"{p} does not exist.", fix="check the path (export writes artifacts/<name>.tflite)")
        e.format = Format.from_path(p).value
        e.runtime_name = _default_runtime(e.format)
        e.size_bytes, e.sha256 = file_facts(p)
        if e.format == Format.KERAS.value:
            e.precision = Precision.FP32.value
            return e
        e.manifest = checked_manifest(p)
        if e.manifest is not None and e.manifest.sha256 != e.sha256:
            raise BenchError(f"{p} has sha256 {e.sha256[:16]}…, but its manifest {p.name}.json was written for a "
                             f"file with sha256 {str(e.manifest.sha256)[:16]}… ({e.manifest.format} "
                             f"{e.manifest.precision}).",
                             expected="the file the manifest describes (export writes the two together)",
                             fix="re-export it, or restore the file the manifest belongs to; a file copied over "
                                 "another's name must not keep the other's manifest (delete it to bench the file "
                                 "with defaults)")
    except ResnetDeployError as exc:
        e.error = error_dict(exc)
        return e
    except OSError as exc:  # e.g. a folder on the path that cannot be searched
        e.error = error_dict(BenchError(f"{p} cannot be read: {exc.strerror or exc}.",
                                        fix="check the path and its permissions"))
        return e
    if e.manifest is None:
        e.notes.append(NO_MANIFEST_DEFAULTS)
    else:
        e.precision = e.manifest.precision
    return e


def _default_runtime(fmt: str) -> str:
    from resnet_deploy.runtimes import DEFAULT_RUNTIME

    return DEFAULT_RUNTIME[Format(fmt)]


def expand_runtimes(entries: list[ArtifactResult], runtimes) -> list[ArtifactResult]:
    """Each ONNX entry once per runtime in ``runtimes`` (in that order); other entries as they are."""
    out: list[ArtifactResult] = []
    for e in entries:
        if e.format != Format.ONNX.value or e.error:
            out.append(e)
            continue
        copies = [e.in_runtime(rt) for rt in runtimes[1:]]
        e.runtime_name = runtimes[0]
        out += [e, *copies]
    return out


def file_facts(path: Path) -> tuple[int, str]:
    """Size and sha256 of a file; a BenchError for one that cannot be read (never a hang on a FIFO or a
    device, which are refused before anything opens them)."""
    from resnet_deploy import artifact

    if not (path.is_file() or path.is_dir()):
        raise BenchError(f"{path} is not a regular file or folder.",
                         expected="a .tflite/.onnx file, or a .keras file / SavedModel folder",
                         fix="bench the exported file itself")
    try:
        f = artifact.file_facts(path)
    except OSError as exc:
        raise BenchError(f"{path} cannot be read: {exc.strerror or exc}.",
                         expected="a readable artifact file",
                         fix="check the file's permissions and that the disk is readable; re-export it") from exc
    return f["size_bytes"], f["sha256"]


def refuse_stale(entries: list[ArtifactResult], reference: ArtifactResult | None, allow_stale: bool) -> list[str]:
    """An artifact whose manifest names another source sha256 than the reference's becomes an error
    (what/expected/fix); with ``allow_stale`` it is kept, marked ``stale``. Returns notes for the report."""
    if reference is None or reference.sha256 is None:
        return []
    notes = []
    for e in entries:
        if e.role == "reference" or e.error or not e.source_sha256 or e.source_sha256 == reference.sha256:
            continue
        what = (f"{e.path.name} was exported from a float model with sha256 {e.source_sha256[:16]}…, but the "
                f"reference {reference.path} has sha256 {reference.sha256[:16]}…")
        if allow_stale:
            e.stale = True
            e.notes.append(f"STALE: {what}; benched because of --allow-stale, its gates are skipped")
            notes.append(f"{e.path.name} is stale (--allow-stale): compared with a float model it was not "
                         "exported from")
            continue
        e.error = error_dict(BenchError(
            what + ": the model changed since the export, or the pair does not belong together.",
            expected="artifacts exported from the float reference as it is now",
            fix=f"re-export from {reference.path}, pass the model they were exported from with --reference, or "
                "bench anyway with --allow-stale (rows marked stale, gates skipped)"))
    return notes


# Pretend to be another CPU when judging saturation (bench only; documented in docs/bench.md): a list of
# /proc/cpuinfo flags ("avx2 fma") and a machine name ("x86_64"), e.g. to check a CI rule on a VNNI host.
CPU_FLAGS_ENV = "RESNET_DEPLOY_BENCH_CPU_FLAGS"
MACHINE_ENV = "RESNET_DEPLOY_BENCH_MACHINE"


def cpu_override() -> tuple[str | None, list[str] | None]:
    """(machine, flags) from ``MACHINE_ENV`` / ``CPU_FLAGS_ENV``; None for each one not set."""
    flags = os.environ.get(CPU_FLAGS_ENV)
    machine = os.environ.get(MACHINE_ENV) or None
    return machine, (flags.replace(",", " ").split() if flags is not None else None)


def u8s8_saturation_warning(manifest: Manifest, machine: str | None = None, flags=None) -> str | None:
    """Why an ONNX INT8 file with uint8 activations and full 8-bit int8 weights saturates on this CPU (an
    x86 CPU without VNNI, where ONNX Runtime's U8S8 kernels add pairs of products in saturating 16-bit
    sums, see docs/export.md), or None. The file was exported for another CPU (its
    ``calibration.target``, when recorded), or before the rule existed (no ``reduce_range`` recorded).
    ``machine``/``flags`` default to ``cpu_override()``, then to this machine's."""
    cal = manifest.int8_calibration or Int8Calibration()
    weights = cal.weight_type or "int8"  # the only weight type export writes
    if (manifest.format != Format.ONNX.value or manifest.precision != Precision.INT8.value
            or cal.activation_kind != "uint8" or weights != "int8" or cal.reduce_range):
        return None
    from resnet_deploy.envinfo import has_vnni, is_x86

    env_machine, env_flags = cpu_override()
    machine = machine if machine is not None else env_machine
    flags = flags if flags is not None else env_flags
    if not is_x86(machine) or has_vnni(flags) is not False:  # VNNI, or flags unknown: no claim
        return None
    made_for = f" (exported for target {cal.target})" if cal.target else ""
    return (f"uint8 activations with 8-bit int8 weights{made_for} on an x86 CPU without VNNI: ONNX Runtime's U8S8 "
            "kernels saturate here and accuracy can collapse; re-export on this CPU, or with --target x86-avx2 "
            "(u8s8-rr7: 7-bit weights; --onnx-reduce-range on --target host)")


def refuse_saturating(entries: list[ArtifactResult], allow: bool, machine: str | None = None, flags=None) -> list[str]:
    """An ONNX INT8 entry that saturates on this CPU (``u8s8_saturation_warning``) becomes an error
    (what/expected/fix); with ``allow`` it is kept, marked ``saturating``. Returns notes for the report."""
    notes, done = [], set()
    for e in entries:
        if e.error or e.manifest is None or e.role == "reference":
            continue
        why = u8s8_saturation_warning(e.manifest, machine, flags)
        if why is None:
            continue
        if allow:
            e.saturating = True
            e.notes.append(f"SATURATING: {why}; benched because of --allow-saturating")
            if e.path not in done:
                notes.append(f"{e.path.name} saturates on this CPU (--allow-saturating): its figures show the "
                             "damage, not the file's quality on a CPU it was made for")
            done.add(e.path)
            continue
        cal = e.manifest.int8_calibration or Int8Calibration()
        e.error = error_dict(BenchError(
            f"{e.path.name} is an ONNX INT8 file with uint8 activations and 8-bit int8 weights (manifest: "
            f"reduce_range {bool(cal.reduce_range)}"
            + (f", target {cal.target}" if cal.target else "")
            + "), and this is an x86 CPU without VNNI: ONNX Runtime's U8S8 kernels saturate here (pairs of "
              "products added in 16 bits), so its accuracy and speed would describe the saturation, not the file.",
            expected="an ONNX INT8 file exported for this CPU (7-bit weights with --onnx-reduce-range, or int8 "
                     "activations)",
            fix="re-export on this CPU (--target host avoids it), or with --target x86-avx2 (7-bit weights; "
                "--onnx-reduce-range on --target host); or bench it anyway with --allow-saturating (rows marked "
                "SATURATING)"))
    return notes


def checked_manifest(path: Path) -> Manifest | None:
    """``read_manifest`` plus the checks bench relies on; every way a manifest can be bad is a
    BenchError (so it becomes that file's error, not the end of the run)."""
    from resnet_deploy.fileio import sidecar_path

    side = sidecar_path(path)
    try:
        m = read_manifest(path)
    except ResnetDeployError:
        raise
    except (ValueError, TypeError, AttributeError, KeyError, OSError) as exc:  # e.g. JSON that is not an object
        raise _bad_manifest(side, f"{type(exc).__name__}: {exc}") from exc
    if m is None:
        return None
    if m.precision not in _PRECISIONS:
        raise _bad_manifest(side, f"precision {m.precision!r} is not one of {', '.join(_PRECISIONS)}")
    if not isinstance(m.format, str):
        raise _bad_manifest(side, f"format {m.format!r} is not a string")
    for name in ("calibration", "validation", "int8_accuracy", "options"):
        block = getattr(m, name)
        if block is not None and not isinstance(block, dict):
            raise _bad_manifest(side, f"{name} {str(block)[:80]!r} is not an object")
    src = m.source_model
    if src is not None and not (isinstance(src, dict) and all(
            src.get(k) is None or isinstance(src.get(k), str) for k in ("path", "sha256"))):
        raise _bad_manifest(side, f"source_model {src!r} is not an object with string path and sha256")
    try:
        m.preprocessing_spec
    except (ValueError, TypeError, AttributeError) as exc:
        raise _bad_manifest(side, f"preprocessing {m.preprocessing!r}: {exc}") from exc
    return m


_PRECISIONS = tuple(p.value for p in Precision)


def _bad_manifest(side: Path, why: str) -> BenchError:
    return BenchError(f"The manifest {side} is unreadable: {why}.",
                      expected="the JSON written by `resnet-deploy export`",
                      fix="re-export the artifact, or delete the manifest to bench with defaults")


def reference_from_manifest(entry: ArtifactResult) -> Path | None:
    """The float model an artifact was exported from: ``source_model.path`` relative to the manifest's
    folder (or absolute), else ``abs_path`` where it was at export (an artifacts folder copied away
    from its model); the relative candidate when neither exists, so the error names it."""
    src = entry.manifest.source if entry.manifest else None
    if not src or not src.path:
        return None
    p = Path(src.path).expanduser()
    p = p if p.is_absolute() else (entry.path.parent / p)
    at_export = Path(src.abs_path).expanduser() if src.abs_path else None
    return at_export if not p.exists() and at_export is not None and at_export.exists() else p


def resolve_reference(entries: list[ArtifactResult], given: Path | None) -> tuple[Path | None, list[str]]:
    """The float Keras model of the run and notes on how it was found (or why there is none)."""
    if given is not None:
        if Format.from_path(given) is not Format.KERAS:
            raise BenchError(f"--reference {given} is not a Keras model.",
                             expected="the float model as .keras/.h5 or a SavedModel folder",
                             fix="pass the model.keras the artifacts were exported from")
        if not given.exists():
            raise BenchError(f"--reference {given} does not exist.", fix="check the path")
        return given, ["float reference given with --reference"]
    keras_inputs = [e.path for e in entries if e.format == Format.KERAS.value and e.error is None]
    found = {}
    for e in entries:
        ref = reference_from_manifest(e)
        if ref is not None:
            found.setdefault(_key(ref), (ref, e.path))
    if len(found) > 1:
        listed = "; ".join(f"{a} (from {b.name})" for a, b in found.values())
        raise BenchError(f"The artifacts come from different float models: {listed}.",
                         expected="artifacts exported from one float model per bench run",
                         fix="bench each model's artifacts separately, or pick one with --reference")
    if found:
        ref, via = next(iter(found.values()))
        if not ref.exists():
            return None, [f"the float model recorded in {via.name}'s manifest ({ref}) was not found: no accuracy "
                          "change, agreement or float figures; pass --reference MODEL"]
        return ref, [f"float reference found through the manifest of {via.name}"]
    if len(keras_inputs) == 1:
        return keras_inputs[0], ["the Keras model among the inputs is the float reference"]
    return None, ["no float reference: no manifest names one and --reference was not given, so the report "
                  "has no accuracy change, agreement or float figures"]


def add_baselines(entries: list[ArtifactResult], search_folders: bool) -> list[ArtifactResult]:
    """For each quantized artifact, the FP32 artifact of the same format it is compared with: one among
    the inputs, else (``search_folders``) an FP32 sibling in its folder whose manifest names the
    same source model. Returns the entries added."""
    added: list[ArtifactResult] = []
    for e in list(entries):
        if e.role != "artifact" or e.error or e.format in (None, Format.KERAS.value) or e.precision == "fp32":
            continue
        if find_baseline(e, entries + added) is not None or not search_folders or e.source_sha256 is None:
            continue
        for cand in sorted(e.path.parent.glob(f"*.{e.format}")):
            m = _quiet_manifest(cand)
            if m and m.precision == "fp32" and m.format == e.format and m.source and m.source.sha256 == e.source_sha256:
                b = identify(cand, "baseline")
                b.runtime_name = e.runtime_name
                b.notes.append(f"added as the FP32 baseline of {e.path.name} (same source model, same runtime: "
                               f"{e.runtime_name})")
                added.append(b)
                break
    return added


def find_baseline(e: ArtifactResult, entries: list[ArtifactResult]) -> ArtifactResult | None:
    """The FP32 entry of the same format, run in the same runtime, exported from the same float model (same
    source sha256): a baseline from another model would measure two networks, not a quantization, and one
    run in another runtime would measure two runtimes."""
    if e.format in (None, Format.KERAS.value) or e.precision == "fp32" or not e.source_sha256:
        return None
    same = [b for b in entries if b is not e and b.error is None and b.format == e.format and b.precision == "fp32"
            and b.runtime_name == e.runtime_name and b.role != "reference" and b.source_sha256 == e.source_sha256]
    return (same or [None])[0]


def assign_labels(entries: list[ArtifactResult]) -> None:
    """The file's name (its path where two files share a name), with ``[runtime]`` after it when the file
    runs in more than one runtime or not in its format's default one."""
    names = {e.path.name: {str(o.path) for o in entries if o.path.name == e.path.name} for e in entries}
    runtimes: dict[str, set] = {}
    for e in entries:
        runtimes.setdefault(str(e.path), set()).add(e.runtime_name)
    for e in entries:
        base = e.path.name if len(names[e.path.name]) == 1 else str(e.path)
        shown = e.runtime_name and e.format and (len(runtimes[str(e.path)]) > 1
                                                 or e.runtime_name != _default_runtime(e.format))
        e.label = f"{base} [{e.runtime_name}]" if shown else base


def _quiet_manifest(path: Path) -> Manifest | None:
    try:
        return checked_manifest(path)
    except ResnetDeployError:
        return None


def _key(p: Path) -> str:
    try:
        return str(p.resolve())
    except OSError:
        return str(p)
