"""pytest-benchmark suite for static kernel generation: WRN-40-1's 36 hyper layers (242 tiles of
16x16x3x3, Nz = d = 64), every weight of the network per call, reference vs torch backend on CPU
(and the fused Triton kernel when a GPU is present).

Run with ``make bench-suite`` (or ``.venv/bin/python -m pytest benchmarks -k static``).
``python -m hyperkern bench`` prints the same comparison plus the performance model's line
(``hyperkern.bench.static_rows``).
"""
import pytest
import torch

from hyperkern import static_kernel_gen_layers, wrn_hyper_layer_shapes


@pytest.fixture(autouse=True)
def bench_threads(benchmark):
    """Small GEMMs: one intra-op thread (a second one mostly adds synchronisation on a busy 2-core
    machine); restored afterwards (overrides the suite's fixture in benchmarks/conftest.py)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    benchmark.extra_info["threads"] = 1
    yield 1
    torch.set_num_threads(n)

LAYERS = wrn_hyper_layer_shapes(40, 1)
BACKENDS = ["reference", "torch"] + (["triton"] if torch.cuda.is_available() else [])


def _inputs(device, requires_grad):
    g = torch.Generator().manual_seed(0)
    shapes = [(242, 64), (16, 64, 64), (16, 64), (144, 64), (144,)]
    return [(0.1 * torch.randn(s, generator=g)).to(device).requires_grad_(requires_grad) for s in shapes]


@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_static_generation_wrn40_1(benchmark, backend, mode):
    device = "cuda" if backend == "triton" else "cpu"
    args = _inputs(device, mode != "forward")
    ones = None

    def run():
        nonlocal ones
        ws = static_kernel_gen_layers(*args, kernel_size=3, layer_shapes=LAYERS, backend=backend)
        if mode != "forward":
            ones = ones or [torch.ones_like(w) for w in ws]
            torch.autograd.backward(ws, ones)
        if device == "cuda":
            torch.cuda.synchronize()
        return ws

    benchmark.group = f"static generation WRN-40-1 {mode}"
    benchmark.extra_info.update(tiles=242, generated_weights=sum(o * i * 9 for o, i in LAYERS))
    ws = benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    assert len(ws) == 36
