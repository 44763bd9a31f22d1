"""Without the optional onnx extra: one line naming it, exit 1, nothing written.

These run whether or not onnxruntime is installed: its absence is simulated (a ``None`` entry
in ``sys.modules`` makes ``import onnxruntime`` raise ImportError, as a missing package does).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from geovae.cli import main
from geovae.model.base import ModelInfo
from geovae.model.io import save_model
from geovae.model.vae import VAESegmenter


@pytest.fixture
def without_onnx(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("onnxruntime", "onnx", "onnxscript"):
        monkeypatch.setitem(__import__("sys").modules, name, None)


@pytest.fixture
def small_model(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    net = VAESegmenter(6, 3, base_channels=4, depth=1, latent_channels=2).eval()
    info = ModelInfo(in_channels=6, num_classes=3, mean=[80.0] * 6, std=[30.0] * 6, tile_size=64, halo=8)
    return save_model(tmp_path / "m.safetensors", net, info)


def one_line_error(capsys: pytest.CaptureFixture[str], *args: str) -> str:
    code = main(list(args))
    err = capsys.readouterr().err
    assert code == 1, err
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("geovae: error: "), err
    assert "pip install geovae[onnx]" in lines[0]
    return lines[0]


def test_onnx_model_without_onnxruntime(
    without_onnx: None, nc_stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model = tmp_path / "model.onnx"
    model.write_bytes(b"\x08\x08")  # refused before it is read
    out = tmp_path / "out"
    line = one_line_error(capsys, "segment", str(nc_stack), "-m", str(model), "-o", str(out))
    assert "model.onnx needs onnxruntime" in line
    assert not out.exists()


def test_backend_onnxruntime_without_it(
    without_onnx: None, small_model: Path, nc_stack: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    line = one_line_error(
        capsys, "segment", str(nc_stack), "-m", str(small_model), "-o", str(out), "--backend", "onnxruntime"
    )
    assert "--backend onnxruntime needs onnxruntime" in line
    assert not out.exists()


def test_export_onnx_without_it(
    without_onnx: None, small_model: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "m.onnx"
    one_line_error(capsys, "export", str(small_model), "--onnx", "-o", str(out))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.safetensors"]
