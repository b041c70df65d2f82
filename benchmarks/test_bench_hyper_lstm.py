"""pytest-benchmark suite for the HyperLSTM (same cases as ``python -m hyperkern bench``).

Run with ``make bench-suite`` (or ``.venv/bin/python -m pytest benchmarks``); pytest-benchmark
groups each case and mode so nn.LSTM and the HyperLSTM backends sit side by side.
"""
import pytest
import torch

from hyperkern.bench import CASES, forward_backward_fn, forward_fn, make_models

torch.set_num_threads(2)


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("model", ["nn.LSTM", "torch"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_hyper_lstm(benchmark, case, model, mode):
    if mode == "forward+backward" and case.target_fwdbwd is None:
        pytest.skip("forward-only case")
    lstm, hyper, x = make_models(case, backend="torch")
    make = forward_fn if mode == "forward" else forward_backward_fn
    fn = make(lstm if model == "nn.LSTM" else hyper, x)
    benchmark.group = f"{case.name} {mode}"
    benchmark.extra_info.update(tokens=case.T * case.B)
    benchmark.pedantic(fn, rounds=5, warmup_rounds=1)
