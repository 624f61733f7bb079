"""The benchmark scripts' CPU smoke pass runs, labels itself, and writes its tables."""
import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))


def test_attention_benchmark_smoke(tmp_path, monkeypatch, capsys):
    torch = pytest.importorskip("torch")
    if torch.cuda.is_available():
        pytest.skip("the GPU run is the benchmark itself (bench/attention.py), not a test")
    monkeypatch.setenv("VIDEOBERT_BENCH_OUT", str(tmp_path))
    import attention

    assert attention.main([]) == 0
    assert "NOT GPU figures" in capsys.readouterr().out
    data = json.loads((tmp_path / "attention.json").read_text())
    assert data["meta"]["device"] == "cpu-smoke" and not data["meta"]["gpu_figures"]
    providers = {row["provider"] for row in data["rows"]}
    assert {"videobert", "sdpa_dense_mask"} <= providers
    assert all(row["ms"] > 0 for row in data["rows"])
    assert (tmp_path / "attention.csv").exists() and (tmp_path / "attention.md").exists()
