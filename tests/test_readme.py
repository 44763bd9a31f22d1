"""Every ```python block of README.md runs, so the README cannot drift from the API.

The blocks run in order, in one namespace, in a temporary folder that holds the files they
name (made from the committed window of the real NC data): ``scene.tif`` and ``train.tif`` (the NC Landsat-7 scene),
``labels.tif`` (its land-class map), ``model.safetensors`` (a small VAE model file),
``task.ckpt`` (a TorchGeo U-Net checkpoint with 2 classes) and ``a.tif`` / ``b.tif`` (the
scene's west and east halves). Each top-level statement runs on its own, so a failure names
its line.
"""

from __future__ import annotations

import ast
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def python_blocks(text: str) -> list[tuple[int, str]]:
    """(first line number, code) of every ```python block."""
    out = []
    for m in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        out.append((text[: m.start()].count("\n") + 2, m.group(1)))
    return out


@pytest.fixture(scope="module")
def folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import rasterio
    from conftest import fixture_path
    from test_outputs import _model_for

    sys_path = str(ROOT / "examples")
    import sys

    sys.path.insert(0, sys_path)
    try:
        from batch_dask import halves
        from torchgeo_checkpoint import make_checkpoint
    finally:
        sys.path.remove(sys_path)

    scene = fixture_path("nc_landsat7_landclass96", "nc_lsat7_2000_6band_uint8.tif")
    labels = fixture_path("nc_landsat7_landclass96", "nc_landclass96_label_uint8.tif")
    d = tmp_path_factory.mktemp("readme")
    shutil.copyfile(scene, d / "scene.tif")
    shutil.copyfile(scene, d / "train.tif")
    shutil.copyfile(labels, d / "labels.tif")
    _model_for(scene, d / "model.safetensors")
    for p, name in zip(halves(scene, d / "halves"), ("a.tif", "b.tif")):
        p.rename(d / name)
    # a 2-class TorchGeo checkpoint (the README names two classes)
    two = d / "halves" / "labels2.tif"
    with rasterio.open(labels) as src:
        prof, lab = src.profile, src.read(1)
    with rasterio.open(two, "w", **prof) as dst:
        dst.write(((lab == 5) + 1).astype("uint8") * (lab > 0), 1)
    make_checkpoint(scene, two, d / "task.ckpt", steps=1, num_classes=2)
    return d


def test_every_python_block_of_the_readme_runs(folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = python_blocks(text)
    assert len(blocks) >= 3, "the README's Python API blocks were not found"
    monkeypatch.chdir(folder)
    ns: dict[str, object] = {"__name__": "readme"}
    for first, code in blocks:
        for stmt in ast.parse(code).body:
            src = ast.get_source_segment(code, stmt) or ""
            line = first + stmt.lineno - 1
            try:
                exec(compile(ast.Module([stmt], []), f"README.md:{line}", "exec"), ns)
            except Exception as e:
                raise AssertionError(f"README.md line {line} fails: {type(e).__name__}: {e}\n{src}") from e
    res = ns["res"]
    assert Path(res.outputs["stac"]).is_file()  # type: ignore[attr-defined]
    assert (folder / "runs" / "catalog.json").is_file() and (folder / "torchgeo.safetensors").is_file()
