"""The torch backend's CPU fast path: the C++ time loop (``hyper_lstm.cpp``, built at first use),
the GEMM chooser (``cpu/gemm.py``) and the custom op ``hyperkern::hyper_lstm_torch``.

- the C++ loop against the float64 reference (1e-9) and in fp32 (the stated tolerance), at odd
  sizes, with variable lengths, recurrent dropout (mask tensors and a seed), without layer norm;
  against the eager loop over the same buffers; bitwise repeatable gradients with several row
  chunks running on two threads;
- the GEMM chooser under a fake clock: the cheapest ``pack + uses · apply``, never slower than
  ``mm``, one measurement per (shape, dtype, threads), a wrong variant never chosen;
- what happens when the extension cannot build (simulated): the eager loop runs, ``status`` and
  ``python -m hyperkern info`` say why;
- ``torch.library.opcheck`` on both custom ops, and ``torch.compile(fullgraph=True)`` through the
  backend (a graph break raises).
"""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import GRAD_TOL_FP32, TOL, cell_params, masks_to, rel_err, sequence_inputs
from hyperkern.ops.hyper_lstm import CellConfig, cpu, fused_torch, naive
from hyperkern.ops.hyper_lstm.cpu import gemm

F64, F32 = torch.float64, torch.float32
X, H, Hh, E, B, T = 7, 33, 10, 3, 3, 5  # odd, non-power-of-two sizes


def _run(fn, x, state, p, cfg, lengths, masks, dtype, g_out, g_state):
    """(outputs, final state, gradients of x, the state and every parameter) of one backend call."""
    xx = x.to(dtype).requires_grad_()
    ss = [s.to(dtype).requires_grad_() for s in state]
    pp = {n: q.to(dtype).requires_grad_() for n, q in p.items()}
    out, fin = fn(xx, ss, pp, cfg, lengths, masks_to(masks, "cpu", dtype))
    loss = (out * g_out.to(dtype)).sum() + sum((f * g.to(dtype)).sum() for f, g in zip(fin, g_state))
    grads = torch.autograd.grad(loss, [xx, *ss, *pp.values()])
    return [out.detach(), *[f.detach() for f in fin], *grads]


NAMES = ["out", "h", "c", "h_hat", "c_hat", "dx", "dh0", "dc0", "dhh0", "dch0"]

CASES = {
    # id: (CellConfig kwargs, T, B, lengths, dropout, seeded)
    "ln": ({}, T, B, None, 0.0, False),
    "no_ln": ({"layer_norm": False, "forget_bias": -0.4}, T, B, None, 0.0, False),
    "eps_forget_bias": ({"forget_bias": 0.3, "ln_eps": 0.02}, T, B, None, 0.0, False),
    "lengths": ({}, T, B, [5, 4, 2], 0.0, False),
    "dropout": ({}, T, B, None, 0.3, False),
    "dropout_seed_lengths": ({}, T, B, [5, 3, 3], 0.25, True),
    "no_ln_dropout_lengths": ({"layer_norm": False}, T, B, [5, 2, 1], 0.4, False),
    "many_chunks": ({}, 4, 19, [4] * 9 + [3] * 6 + [1] * 4, 0.2, False),  # 3 chunks of 8 rows, shrinking
    "T1_B1": ({}, 1, 1, None, 0.0, False),
}


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
@pytest.mark.parametrize("case", list(CASES))
def test_cpu_loop_matches_reference(ext, case, dtype, one_thread):
    kw, Tn, Bn, lengths, drop, seeded = CASES[case]
    cfg = CellConfig(X, H, Hh, E, **kw)
    p = cell_params(cfg, seed=list(CASES).index(case))
    x, st, masks = sequence_inputs(cfg, Tn, Bn, seed=3, dropout=drop, seeded=seeded)
    if dtype == F32:  # round every input to fp32 first: the comparison measures the fp32 arithmetic
        p = {n: q.float().double() for n, q in p.items()}
        x, st = x.float().double(), [s.float().double() for s in st]
        masks = masks if masks is None or seeded else tuple(m.float().double() for m in masks)
    g = torch.Generator().manual_seed(5)
    g_out = torch.randn(Tn, Bn, H, generator=g, dtype=F64)
    g_state = [torch.randn(Bn, n, generator=g, dtype=F64) for n in (H, H, Hh, Hh)]
    lens = None if lengths is None else torch.tensor(lengths)
    want = _run(naive.hyper_lstm_sequence, x, st, p, cfg, lens, masks, F64, g_out, g_state)
    got = _run(fused_torch.hyper_lstm_sequence, x, st, p, cfg, lens, masks, dtype, g_out, g_state)
    names = NAMES + [f"d {n}" for n in p]
    tol = {n: (TOL[dtype] if dtype == F64 or i < 5 else GRAD_TOL_FP32) for i, n in enumerate(names)}
    errs = {n: rel_err(a, b) for n, a, b in zip(names, got, want)}
    bad = {n: f"{e:.1e}" for n, e in errs.items() if not e <= tol[n]}
    assert not bad, f"{case} {dtype}: over tolerance: {bad}"
    if lengths is not None:  # outputs past each end are exactly zero
        for b, L in enumerate(lengths):
            assert torch.equal(got[0][L:, b], torch.zeros_like(got[0][L:, b]))


@pytest.mark.parametrize("case", ["ln", "no_ln_dropout_lengths", "many_chunks"])
def test_cpu_loop_agrees_with_the_eager_loop(ext, case, monkeypatch):
    """The two implementations of the time loop, over the same buffers, in float64."""
    kw, Tn, Bn, lengths, drop, seeded = CASES[case]
    cfg = CellConfig(X, H, Hh, E, **kw)
    p = cell_params(cfg, seed=2)
    x, st, masks = sequence_inputs(cfg, Tn, Bn, seed=4, dropout=drop, seeded=seeded)
    g = torch.Generator().manual_seed(6)
    g_out = torch.randn(Tn, Bn, H, generator=g, dtype=F64)
    g_state = [torch.randn(Bn, n, generator=g, dtype=F64) for n in (H, H, Hh, Hh)]
    lens = None if lengths is None else torch.tensor(lengths)
    fused = _run(fused_torch.hyper_lstm_sequence, x, st, p, cfg, lens, masks, F64, g_out, g_state)
    monkeypatch.setattr(fused_torch, "_loop_impl", lambda x: None)  # the eager loop, same buffers
    eager = _run(fused_torch.hyper_lstm_sequence, x, st, p, cfg, lens, masks, F64, g_out, g_state)
    for n, a, b in zip(NAMES + list(p), fused, eager):
        assert rel_err(a, b) <= 1e-12, f"{case}: {n} differs between the C++ and the eager loop"


@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_cpu_loop_gradients_bitwise_repeatable_on_two_threads(ext, dtype):
    """Several chunks of rows on two threads: the batch sums (bias, d_weight, LN affine) are kept
    per chunk, so repeated runs give the same bits."""
    cfg = CellConfig(X, H, Hh, E)
    p = cell_params(cfg, seed=8)
    x, st, masks = sequence_inputs(cfg, 6, 21, seed=9, dropout=0.2)
    g = torch.Generator().manual_seed(1)
    g_out = torch.randn(6, 21, H, generator=g, dtype=F64)
    g_state = [torch.randn(21, n, generator=g, dtype=F64) for n in (H, H, Hh, Hh)]
    lens = torch.tensor([6] * 10 + [4] * 6 + [2] * 5)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        runs = [_run(fused_torch.hyper_lstm_sequence, x, st, p, cfg, lens, masks, dtype, g_out, g_state)
                for _ in range(3)]
    finally:
        torch.set_num_threads(n_threads)
    for other in runs[1:]:
        for n, a, b in zip(NAMES + list(p), runs[0], other):
            assert torch.equal(a, b), f"{n} differs between two identical runs"


# --- GEMM chooser -----------------------------------------------------------------------------

class _FakeClock:
    """A clock that advances only by the scripted cost of each pack / product as it runs."""

    def __init__(self, apply_cost, pack_cost):
        self.t, self.apply_cost, self.pack_cost = 0.0, apply_cost, pack_cost
        self.measured = []

    def now(self):
        return self.t

    def pack(self, variant, W, batch):
        self.t += self.pack_cost[variant]
        return None

    def apply(self, variant, x, W, packed, batch):
        self.t += self.apply_cost[variant]
        return torch.mm(x, W.t())


@pytest.fixture
def fake_gemm(monkeypatch):
    """The chooser with fresh caches, all three variants offered and a fake clock."""
    clock = _FakeClock(apply_cost={"mm": 10.0, "mkl": 5.0, "onednn": 4.0, "dot": 12.0},
                       pack_cost={"mm": 0.0, "mkl": 100.0, "onednn": 1000.0, "dot": 0.0})
    monkeypatch.setattr(gemm, "_measured", {})
    monkeypatch.setattr(gemm, "_chosen", {})
    monkeypatch.setattr(gemm, "timer", clock.now)
    monkeypatch.setattr(gemm, "pack", clock.pack)
    monkeypatch.setattr(gemm, "apply", clock.apply)
    monkeypatch.setattr(gemm, "available", lambda dtype: list(gemm.VARIANTS))
    return clock


@pytest.mark.parametrize("uses, want", [(1, "mm"), (10, "mm"), (100, "mkl"), (10_000, "onednn")])
def test_gemm_choice_is_the_cheapest_pack_plus_uses_times_apply(fake_gemm, uses, want):
    # costs per call: mm 10·uses; mkl 100 + 5·uses; onednn 1000 + 4·uses
    assert gemm.choose(8, 12, 6, F32, uses) == want
    times = gemm.measure(8, 12, 6, F32)
    assert times == {"mm": (0.0, 10.0), "mkl": (100.0, 5.0), "onednn": (1000.0, 4.0), "dot": (0.0, 12.0)}
    cost = {v: p + uses * a for v, (p, a) in times.items()}
    assert cost[want] <= cost["mm"]  # never slower than plain mm
    assert "-> " + want in gemm.format_choices()


def test_gemm_measurement_is_cached_per_shape_dtype_and_threads(fake_gemm, monkeypatch):
    calls = []
    real_pack = fake_gemm.pack
    monkeypatch.setattr(gemm, "pack", lambda v, W, b: calls.append(v) or real_pack(v, W, b))
    gemm.choose(8, 12, 6, F32, 50)
    first = len(calls)
    assert first > 0
    gemm.choose(8, 12, 6, F32, 5000)  # same key, other uses: no new measurement
    assert len(calls) == first
    keys = {(8, 12, 6, F32), (8, 12, 7, F32), (4, 12, 6, F32), (8, 12, 6, F64)}
    for k in keys:
        gemm.measure(*k)
    n_threads = torch.get_num_threads()
    torch.set_num_threads(1 if n_threads != 1 else 2)
    try:
        gemm.measure(8, 12, 6, F32)
    finally:
        torch.set_num_threads(n_threads)
    assert len(gemm._measured) == len(keys) + 1  # every new shape, dtype or thread count measured once


def test_gemm_variant_with_wrong_results_is_never_chosen(fake_gemm, monkeypatch):
    def apply(variant, x, W, packed, batch):
        fake_gemm.t += fake_gemm.apply_cost[variant]
        y = torch.mm(x, W.t())
        return y + 1.0 if variant == "onednn" else y

    monkeypatch.setattr(gemm, "apply", apply)
    assert "onednn" not in gemm.measure(8, 12, 6, F32)
    assert gemm.choose(8, 12, 6, F32, 10_000) == "mkl"


def test_gemm_linear_real_variants_agree_with_mm():
    """Every variant this torch offers, for real: same product as mm (fp32 rounding)."""
    g = torch.Generator().manual_seed(0)
    x, W = torch.randn(5, 17, generator=g), torch.randn(23, 17, generator=g)
    for v in gemm.available(F32):
        got = gemm.apply(v, x, W, gemm.pack(v, W, 5), 5)
        assert rel_err(got, x @ W.t()) <= 1e-5, v
    lin = gemm.Linear(W, batch=5, uses=100)
    assert lin.variant in gemm.available(F32) and rel_err(lin(x), x @ W.t()) <= 1e-5


def test_gemm_bad_arguments():
    with pytest.raises(ValueError, match="uses"):
        gemm.choose(4, 4, 4, F32, 0)
    with pytest.raises(TypeError, match="W must be"):
        gemm.Linear(torch.zeros(3), batch=2, uses=3)
    with pytest.raises(ValueError, match="variant"):
        gemm.pack("blas", torch.zeros(2, 2), 2)


# --- no extension --------------------------------------------------------------------------------

def test_eager_loop_runs_when_the_extension_cannot_build(monkeypatch, capsys):
    from torch.utils import cpp_extension

    def no_compiler(*args, **kwargs):
        raise RuntimeError("Error building extension: c++: command not found")

    monkeypatch.setattr(cpu, "_state", {"module": None, "tried": False, "why": "not built yet"})
    monkeypatch.setattr(cpp_extension, "load", no_compiler)
    cfg = CellConfig(X, H, Hh, E)
    p = cell_params(cfg, seed=1)
    x, st, _ = sequence_inputs(cfg, T, B, seed=2)
    g_out = torch.randn(T, B, H, dtype=F64)
    g_state = [torch.randn(B, n, dtype=F64) for n in (H, H, Hh, Hh)]
    got = _run(fused_torch.hyper_lstm_sequence, x, st, p, cfg, None, None, F64, g_out, g_state)
    want = _run(naive.hyper_lstm_sequence, x, st, p, cfg, None, None, F64, g_out, g_state)
    for n, a, b in zip(NAMES + list(p), got, want):
        assert rel_err(a, b) <= TOL[F64], n
    ok, why = cpu.status()
    assert not ok and "did not build" in why and "command not found" in why
    from hyperkern.__main__ import main

    assert main(["info"]) == 0
    assert "did not build" in capsys.readouterr().out


def test_extension_can_be_turned_off(monkeypatch):
    monkeypatch.setattr(cpu, "_state", {"module": None, "tried": False, "why": "not built yet"})
    monkeypatch.setenv("HYPERKERN_CPU_EXTENSION", "0")
    assert cpu.load() is None
    assert "HYPERKERN_CPU_EXTENSION=0" in cpu.status()[1]


def test_where_the_cpu_loop_applies():
    assert cpu.applies(torch.zeros(1)) is None and cpu.applies(torch.zeros(1, dtype=F64)) is None
    assert "bfloat16" in cpu.applies(torch.zeros(1, dtype=torch.bfloat16))
    assert cpu.isa() in ("AVX512", "AVX2", "DEFAULT")


def test_low_precision_runs_the_eager_loop():
    cfg = CellConfig(X, H, Hh, E)
    p = {n: q.to(torch.bfloat16) for n, q in cell_params(cfg, seed=1).items()}
    x, st, _ = sequence_inputs(cfg, T, B, seed=2)
    out, fin = fused_torch.hyper_lstm_sequence(x.to(torch.bfloat16), [s.to(torch.bfloat16) for s in st], p, cfg)
    want, _ = naive.hyper_lstm_sequence(x, st, {n: q.double() for n, q in p.items()}, cfg)
    assert out.dtype == torch.bfloat16 and rel_err(out, want) < 5e-2


# --- custom op -------------------------------------------------------------------------------

def _op_args(dtype, lengths=None, masks=None, save=True):
    cfg = CellConfig(X, H, Hh, E, forget_bias=0.5)
    p = cell_params(cfg, seed=3)
    x, st, _ = sequence_inputs(cfg, T, B, seed=4)
    flat = [p[n].to(dtype).requires_grad_(save) for n in cfg.param_names()]
    m_main, m_hyper = (None, None) if masks is None else (masks[0].to(dtype), masks[1].to(dtype))
    return (x.to(dtype).requires_grad_(save), *[s.to(dtype).requires_grad_(save) for s in st], flat, lengths,
            m_main, m_hyper, None, 0.0, H, Hh, E, True, 0.5, 1e-3, save)


@pytest.mark.parametrize("variant", ["plain", "lengths_masks", "inference"])
def test_opcheck_hyper_lstm_torch(variant):
    masks = (torch.bernoulli(torch.full((T, B, H), 0.7)) / 0.7, torch.bernoulli(torch.full((T, B, Hh), 0.7)) / 0.7)
    args = {"plain": _op_args(F64),
            "lengths_masks": _op_args(F32, lengths=torch.tensor([5, 3, 2]), masks=masks),
            "inference": _op_args(F64, save=False)}[variant]
    torch.library.opcheck(torch.ops.hyperkern.hyper_lstm_torch.default, args)


def test_opcheck_hyper_lstm_torch_backward():
    args = _op_args(F64)
    with torch.no_grad():
        res = torch.ops.hyperkern.hyper_lstm_torch(*args)
    x, flat = args[0].detach(), [q.detach() for q in args[5]]
    g = torch.Generator().manual_seed(0)
    d_out = torch.randn(T, B, H, generator=g, dtype=F64)
    dc = torch.randn(B, H, generator=g, dtype=F64)
    bargs = (x, flat, list(res[5:]), torch.tensor([5, 4, 2]), None, None, None, 0.0, d_out, None, dc, None, None,
             H, Hh, E, True, 0.5, 1e-3)
    torch.library.opcheck(torch.ops.hyperkern.hyper_lstm_torch_backward.default, bargs)


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph_through_the_torch_backend(backend):
    """One opaque node: ``fullgraph=True`` raises on any graph break. (The call goes to the
    backend function directly: ``get_backend``'s first-use import is the dispatch point's
    business.)"""
    torch._dynamo.reset()
    cfg = CellConfig(X, H, Hh, E)
    p = {n: q.float().requires_grad_() for n, q in cell_params(cfg, seed=5).items()}
    x, st, _ = sequence_inputs(cfg, T, B, seed=6)
    x, st = x.float(), [s.float() for s in st]
    lengths = torch.tensor([5, 4, 1])

    def f(x, st, p, lengths):
        out, fin = fused_torch.hyper_lstm_sequence(x, st, p, cfg, lengths)
        return (out.tanh() * 2).sum() + fin[1].sum()

    compiled = torch.compile(f, fullgraph=True, backend=backend)
    want = f(x, st, p, lengths)
    g_want = torch.autograd.grad(want, list(p.values()))
    got = compiled(x, st, p, lengths)
    g_got = torch.autograd.grad(got, list(p.values()))
    assert rel_err(got, want) <= 1e-6
    for n, a, b in zip(p, g_got, g_want):
        assert rel_err(a, b) <= 1e-5, n


def test_torch_compile_fullgraph_through_the_module_once_the_backend_is_loaded():
    """The module path has no graph break of its own; ``get_backend``'s first call imports the
    backend module (a break), so it is loaded here first. (Without lengths: the module's lengths
    validation reads tensor values, a data-dependent break outside the backend.)"""
    from hyperkern import HyperLSTM
    from hyperkern.ops import hyper_lstm as op

    op.get_backend("torch")
    torch._dynamo.reset()
    m = HyperLSTM(X, H, hyper_size=Hh, embed_size=E, num_layers=2, backend="torch")
    x = torch.randn(T, B, X)
    compiled = torch.compile(m, fullgraph=True, backend="aot_eager")
    out, st = compiled(x)
    want, _ = m(x)
    (out.sum() + st.c.sum()).backward()
    assert rel_err(out, want) <= 1e-6 and m.cells[0].weight_hh.grad is not None


def test_the_loops_gemm_calls_every_variant_right(ext):
    """The C++ loop calls the packed variants through the dispatcher: each one against mm."""
    g = torch.Generator().manual_seed(1)
    x, W = torch.randn(6, 19, generator=g), torch.randn(29, 19, generator=g)
    for v in gemm.available(F32):
        lin = gemm.Linear(W, batch=6, uses=1)
        lin.variant, lin.packed = v, gemm.pack(v, W, 6)
        assert rel_err(ext.gemm(lin.arg(), x), x @ W.t()) <= 1e-5, v
        assert rel_err(ext.gemm(lin.arg(), x[:4]), x[:4] @ W.t()) <= 1e-5, f"{v}, fewer rows than packed for"
