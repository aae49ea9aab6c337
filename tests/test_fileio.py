"""Atomic writes: nothing half-written ever carries a final name."""

from __future__ import annotations

import pytest

from resnet_deploy.errors import OutputExistsError
from resnet_deploy.fileio import atomic_path, check_can_write, sha256_file, sidecar_path, write_json_atomic


def test_atomic_file_replaces_only_on_success(tmp_path):
    final = tmp_path / "a.bin"
    final.write_bytes(b"old")
    with pytest.raises(RuntimeError):
        with atomic_path(final) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert final.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.bin"], "a temporary file was left behind"
    with atomic_path(final) as tmp:
        tmp.write_bytes(b"new")
    assert final.read_bytes() == b"new"


def test_atomic_folder(tmp_path):
    final = tmp_path / "saved_model"
    with atomic_path(final, suffix="") as tmp:
        tmp.mkdir()
        (tmp / "x").write_text("1")
    with atomic_path(final, suffix="") as tmp:
        tmp.mkdir()
        (tmp / "y").write_text("2")
    assert sorted(p.name for p in final.iterdir()) == ["y"]


def test_writer_that_writes_nothing_fails(tmp_path):
    with pytest.raises(FileNotFoundError):
        with atomic_path(tmp_path / "x"):
            pass
    assert not (tmp_path / "x").exists()


def test_json_sidecar_hash_and_overwrite_guard(tmp_path):
    p = tmp_path / "m.tflite"
    p.write_bytes(b"abc")
    assert sidecar_path(p).name == "m.tflite.json"
    assert sha256_file(p) == "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    write_json_atomic(sidecar_path(p), {"a": 1})
    assert sidecar_path(p).read_text().strip().startswith("{")
    with pytest.raises(OutputExistsError, match="--force"):
        check_can_write(p, force=False)
    check_can_write(p, force=True)
