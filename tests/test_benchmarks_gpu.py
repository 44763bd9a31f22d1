"""The GPU benchmark script (benchmarks/gpu.py) runs end to end on the CPU: only the GPU calls
differ on the day a GPU is lent, so the script cannot rot in between."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_script_runs_on_the_cpu(tmp_path: Path, monkeypatch) -> None:
    sys.path.insert(0, str(ROOT))
    from benchmarks import gpu

    out = tmp_path / "gpu.jsonl"
    assert gpu.main(["--device", "cpu", "--quick", "--no-tests", "--json", str(out)]) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    kinds = [r["what"] for r in recs]
    assert kinds[0] == "machine" and recs[0]["halo"] > 0
    only = {r["precision"]: r for r in recs if r["what"] == "model_only" and r["backend"] == "torch"}
    assert set(only) == {"fp32", "bf16"} and all(r["mp_per_s"] > 0 for r in only.values())
    (e2e,) = [r for r in recs if r["what"] == "end_to_end" and r["backend"] == "torch"]
    assert e2e["mp_per_s"] > 0 and 0 < e2e["model_over_wall"] <= 1 and e2e["overlap"] >= 2 * recs[0]["halo"]
    # the onnxruntime backend is measured too, or the record says why not (not installed)
    ort = [r for r in recs if r.get("backend") == "onnxruntime" or r["what"] == "onnxruntime"]
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        assert [r["what"] for r in ort] == ["onnxruntime"] and "geovae[onnx]" in ort[0]["error"]
    else:
        assert [r["what"] for r in ort] == ["model_only", "end_to_end"]
        assert all(r["mp_per_s"] > 0 for r in ort)
    # a GPU run is refused cleanly where there is none
    import torch

    if not torch.cuda.is_available():
        assert gpu.main(["--device", "cuda"]) == 2
