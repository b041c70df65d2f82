"""pytest-benchmark suite for the HyperLSTM (same cases as ``python -m hyperkern bench``).

Run with ``make bench-suite`` (or ``.venv/bin/python -m pytest benchmarks``); pytest-benchmark
groups each case and mode so nn.LSTM and the HyperLSTM backends sit side by side. ``torch-eager``
is the torch backend with its eager Python loop (what runs where the C++ loop cannot build).
"""
import pytest

from hyperkern.bench import CASES, make_models
from hyperkern.ops.hyper_lstm import fused_torch
from hyperkern.timing import forward_backward_fn, forward_fn


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("model", ["nn.LSTM", "torch", "torch-eager"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hyper_lstm(benchmark, monkeypatch, case, model, mode):
    if mode == "forward+backward" and case.target_fwdbwd is None:
        pytest.skip("forward-only case")
    if model == "torch-eager":
        monkeypatch.setattr(fused_torch, "_loop_impl", lambda x: None)
    lstm, hyper, x = make_models(case, backend="torch")
    make = forward_fn if mode == "forward" else forward_backward_fn
    fn = make(lstm if model == "nn.LSTM" else hyper, x)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(tokens=case.T * case.B)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
