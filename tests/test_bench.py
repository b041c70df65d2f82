"""``python -m hyperkern bench`` end to end in its quick mode (a smoke run of the tool, not a timed
test: no speed is asserted), and the benchmark cases shared with the performance model."""
from __future__ import annotations

import json

import torch

from hyperkern import bench, perf_model


def test_quick_bench_writes_its_tables(tmp_path, capsys):
    n = torch.get_num_threads()
    try:
        assert bench.main(out=str(tmp_path), quick=True, cases=["small"], threads=1) == 0
    finally:
        torch.set_num_threads(n)
    result = json.loads((tmp_path / "bench.json").read_text())
    assert result["machine"]["threads"] == 1 and result["machine"]["cpu"]
    models = {(r["mode"], r["model"]) for r in result["measured"]}
    assert models == {(m, x) for m in ("forward", "forward+backward") for x in ("nn.LSTM", "HyperLSTM[torch]")}
    assert all(r["case"] == "small" and r["shape"]["T"] == 10 for r in result["measured"])
    assert len(result["gpu_model"]) == 2 * len(perf_model.SHAPES) and result["gpu_model_backward"]
    assert {r["shape"] for r in result["gpu_model_persistent"]} >= {s.name for s in perf_model.SHAPES}
    assert {r["backend"] for r in result["static"]} >= {"reference", "torch", "model: H100 (triton)"}
    out = capsys.readouterr().out
    assert "1 threads" in out and "wrote" in out and "persistent forward" in out


def test_cases_are_the_performance_models_shapes_with_targets():
    """One shape type for the benchmarks and the model (bench.Case extends perf_model.Shape)."""
    assert all(isinstance(c, perf_model.Shape) for c in bench.CASES)
    assert {c.name for c in bench.CASES} == {"ptb", "small", "latency"}
    assert all(c.target_fwd is not None for c in bench.CASES)
    assert bench.timed_backends("cpu") == ("torch",)
