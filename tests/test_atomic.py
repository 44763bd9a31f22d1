"""Outputs appear whole under their final name, with ordinary permissions."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from geovae.atomic import atomic_path, write_text


def test_atomic_path_renames_on_success_and_cleans_up_on_failure(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        write_text(tmp_path / "a.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "a.json").read_text() == "{}"
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o644  # not mkstemp's 0600
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "b.bin") as tmp:
        tmp.write_bytes(b"half")
        raise RuntimeError("killed")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.json"]


def test_output_checks_say_what_is_wrong_and_create_nothing(tmp_path: Path) -> None:
    from geovae.atomic import check_output_dir, check_output_file
    from geovae.errors import OutputError

    assert check_output_file(tmp_path / "a.gpkg") == tmp_path / "a.gpkg"
    assert not (tmp_path / "a.gpkg").exists()
    with pytest.raises(OutputError, match="is a folder"):
        check_output_file(tmp_path)
    with pytest.raises(OutputError, match=r"is a folder; give a file name such as .*model\.safetensors"):
        check_output_file(tmp_path, example="model.safetensors")
    with pytest.raises(OutputError, match="does not exist; create it first"):
        check_output_file(tmp_path / "missing" / "a.gpkg")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputError, match="is a file, not a folder"):
        check_output_dir(tmp_path / "f")
    assert check_output_dir(tmp_path / "new" / "deep").is_dir()
    assert list((tmp_path / "new" / "deep").iterdir()) == []  # the write probe is gone
    if os.geteuid() != 0:  # root may write anywhere
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OutputError, match="not writable"):
            check_output_file(ro / "a.gpkg")
