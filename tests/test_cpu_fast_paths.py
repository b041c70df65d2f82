"""The CPU path's fast paths of issue 19 (docs/cpu_backend.md):

- the ``dot`` GEMM variant (the C++ extension's own kernel) against ``mm`` in fp32 and fp64, with
  tails, strided rows and the two products of a step in one parallel region; the same bits on one
  and on two threads;
- the chooser times each candidate warm: in blocks of consecutive calls, each after an untimed one;
- the inference call in one C++ call (``forward_infer``) against the float64 reference and the
  op's own path, at T=1 (sampling) and over several input-projection chunks;
- the derived-weight cache: off outside ``cached_weights()`` (a write through ``.data`` is seen, as
  by ``nn.LSTM``); inside, hit while nothing changed, never stale after an optimizer step, an
  in-place ``copy_``, ``load_state_dict``, or a new parameter; emptied when the block closes;
- the direct call of the op's body (inference on plain CPU tensors) gives the op's results, and
  training / autocast still go through the op.
"""
from __future__ import annotations

import shutil

import pytest
import torch

from conftest import TOL, cell_params, rel_err, sequence_inputs
from hyperkern import HyperLSTM, HyperLSTMCell
from hyperkern.testing import randomize_
from hyperkern.ops.hyper_lstm import CellConfig, cpu, fused_torch, naive
from hyperkern.ops.hyper_lstm.cpu import gemm

F64, F32 = torch.float64, torch.float32


def _threads(n, fn):
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        return fn()
    finally:
        torch.set_num_threads(old)


# --- the dot kernel ------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [F32, F64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("M, K, N", [(1, 17, 23), (2, 8, 4), (3, 1000, 37), (5, 19, 29), (4, 130, 513)])
def test_dot_against_mm_and_thread_count(ext, dtype, M, K, N):
    g = torch.Generator().manual_seed(M * 100 + K)
    x, W = torch.randn(M, K, generator=g, dtype=dtype), torch.randn(N, K, generator=g, dtype=dtype)
    want = x.double() @ W.double().t()
    tol = 1e-5 if dtype == F32 else 1e-13
    one = _threads(1, lambda: gemm.apply("dot", x, W, None, M))
    two = _threads(2, lambda: gemm.apply("dot", x, W, None, M))
    assert rel_err(one, want) <= tol
    assert torch.equal(one, two), "dot must give the same bits at any thread count"
    # strided rows (the loop hands it HS's rows [h | ĥ] directly)
    wide = torch.randn(M, K + 9, generator=g, dtype=dtype)
    xs = wide[:, 3:3 + K]
    assert torch.equal(ext.dot_pair(xs, W, xs, W)[0], gemm.apply("dot", xs.contiguous(), W, None, M))


def test_dot_pair_is_the_two_products_bitwise(ext):
    g = torch.Generator().manual_seed(3)
    hs = torch.randn(2, 1128, generator=g)
    h = hs[:, :1000]
    W_hh, W_rec = torch.randn(4000, 1000, generator=g), torch.randn(512, 1128, generator=g)
    a, b = ext.dot_pair(h, W_hh, hs, W_rec)
    assert torch.equal(a, gemm.apply("dot", h.contiguous(), W_hh, None, 2))
    assert torch.equal(b, gemm.apply("dot", hs, W_rec, None, 2))
    assert rel_err(a, h @ W_hh.t()) <= 1e-5 and rel_err(b, hs @ W_rec.t()) <= 1e-5


def test_loop_gemm_kind_dot(ext):
    g = torch.Generator().manual_seed(4)
    x, W = torch.randn(6, 19, generator=g), torch.randn(29, 19, generator=g)
    lin = gemm.Linear(W, batch=6, uses=1)
    lin.variant, lin.packed = "dot", None
    assert lin.arg()[0] == gemm.VARIANTS.index("dot") == 3
    assert rel_err(ext.gemm(lin.arg(), x), x @ W.t()) <= 1e-5
    assert rel_err(ext.gemm(lin.arg(), x[:4]), x[:4] @ W.t()) <= 1e-5


# --- the chooser times warm ------------------------------------------------------------------------

def test_chooser_times_each_candidate_warm_in_blocks(monkeypatch):
    calls, clock = [], {"t": 0.0}
    cost = {"mm": 3.0, "mkl": 2.0, "onednn": 1.0, "dot": 4.0}

    def apply(v, x, W, packed, batch):
        calls.append(v)
        clock["t"] += cost[v]
        return torch.mm(x, W.t())

    monkeypatch.setattr(gemm, "_measured", {})
    monkeypatch.setattr(gemm, "_chosen", {})
    monkeypatch.setattr(gemm, "timer", lambda: clock["t"])
    monkeypatch.setattr(gemm, "pack", lambda v, W, b: None)
    monkeypatch.setattr(gemm, "apply", apply)
    monkeypatch.setattr(gemm, "available", lambda dtype: list(gemm.VARIANTS))
    times = gemm.measure(4, 8, 6, F32)
    assert {v: a for v, (_, a) in times.items()} == cost
    timed = calls[len(gemm.VARIANTS):]  # after the correctness check, one call per variant
    block = gemm.REPEATS + 1
    assert len(timed) == gemm.ROUNDS * len(gemm.VARIANTS) * block
    for i in range(0, len(timed), block):  # a block: one untimed call, then the timed ones, one variant
        assert len(set(timed[i:i + block])) == 1
    assert [timed[i] for i in range(0, block * len(gemm.VARIANTS), block)] == list(gemm.VARIANTS)  # round-robin


# --- the inference call in one C++ call ------------------------------------------------------------

@pytest.mark.parametrize("Tn, Bn", [(1, 1), (1, 3), (20, 1), (20, 5)])
@pytest.mark.parametrize("dtype", [F64, F32], ids=["fp64", "fp32"])
def test_inference_call_matches_reference(ext, Tn, Bn, dtype):
    cfg = CellConfig(7, 33, 10, 3)
    p = cell_params(cfg, seed=Tn + Bn)
    x, st, _ = sequence_inputs(cfg, Tn, Bn, seed=5)
    if dtype == F32:
        p = {n: q.float().double() for n, q in p.items()}
        x, st = x.float().double(), [s.float().double() for s in st]
    with torch.no_grad():
        want_out, want_st = naive.hyper_lstm_sequence(x, st, p, cfg)
        got_out, got_st = fused_torch.hyper_lstm_sequence(
            x.to(dtype), [s.to(dtype) for s in st], {n: q.to(dtype) for n, q in p.items()}, cfg)
    for a, b in zip((got_out, *got_st), (want_out, *want_st)):
        assert rel_err(a, b) <= TOL[dtype]


def test_inference_call_agrees_with_the_training_forward_and_the_op(ext, monkeypatch):
    cfg = CellConfig(7, 33, 10, 3)
    p = cell_params(cfg, seed=11)
    x, st, masks = sequence_inputs(cfg, 19, 4, seed=6, dropout=0.3)
    with torch.no_grad():
        fast = fused_torch.hyper_lstm_sequence(x, st, p, cfg, masks=masks)
        again = fused_torch.hyper_lstm_sequence(x, st, p, cfg, masks=masks)
        monkeypatch.setattr(fused_torch, "_direct_call_ok", lambda *a: False)
        via_op = fused_torch.hyper_lstm_sequence(x, st, p, cfg, masks=masks)
    xg = x.clone().requires_grad_()
    train = fused_torch.hyper_lstm_sequence(xg, st, p, cfg, masks=masks)  # the Python loop path, saving
    for a, b, c, d in zip((fast[0], *fast[1]), (again[0], *again[1]), (via_op[0], *via_op[1]),
                          (train[0], *train[1])):
        assert torch.equal(a, b) and torch.equal(a, c)
        assert rel_err(a, d.detach()) <= 1e-12


def test_direct_call_only_where_the_op_would_run_that_body(ext):
    x, st = torch.randn(1, 1, 4), [torch.zeros(1, 3)] * 4
    flat = [torch.nn.Parameter(torch.zeros(2))]
    assert fused_torch._direct_call_ok(x, st, flat)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert not fused_torch._direct_call_ok(x, st, flat)
    from torch.utils._python_dispatch import TorchDispatchMode

    class Mode(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            return func(*args, **(kwargs or {}))

    with Mode():
        assert not fused_torch._direct_call_ok(x, st, flat)
    seen = []
    torch.vmap(lambda a: seen.append(fused_torch._direct_call_ok(a, st, flat)) or a)(torch.randn(2, 1, 1, 4))
    assert seen == [False]


# --- the derived-weight cache ----------------------------------------------------------------------

def _cell_step(cell, x, hx=None):
    with torch.no_grad():
        return cell(x, hx)[0]


def _reference_step(cell, x, hx=None):
    sizes = (cell.hidden_size, cell.hidden_size, cell.hyper_size, cell.hyper_size)
    state = list(hx) if hx is not None else [torch.zeros(x.shape[0], n, dtype=x.dtype) for n in sizes]
    with torch.no_grad():
        return cell.run(x.unsqueeze(0), state, backend="reference")[0][0]


def test_derived_cache_hits_and_is_never_stale(ext):
    cell = HyperLSTMCell(6, 12, hyper_size=5, embed_size=2, backend="torch").double()
    randomize_(cell, torch.Generator().manual_seed(0))
    x = torch.randn(2, 6, dtype=F64)
    with fused_torch.cached_weights():
        _derived_cache_body(cell, x)
    assert len(fused_torch._derived_cache) == 0  # emptied when the block closed


def _derived_cache_body(cell, x):
    first = _cell_step(cell, x)
    assert len(fused_torch._derived_cache) == 1
    entry = next(iter(fused_torch._derived_cache.values()))
    assert torch.equal(_cell_step(cell, x), first)
    assert next(iter(fused_torch._derived_cache.values())) is entry  # a hit: nothing recomputed
    assert rel_err(first, _reference_step(cell, x)) <= TOL[F64]

    # an optimizer step (in place: the versions move), then every kind of in-place write
    opt = torch.optim.SGD(cell.parameters(), lr=0.5)
    out, _ = cell(x)
    out.square().sum().backward()
    opt.step()
    after = _cell_step(cell, x)
    assert len(fused_torch._derived_cache) == 1  # the superseded version's entry was dropped
    assert not torch.equal(after, first)
    assert rel_err(after, _reference_step(cell, x)) <= TOL[F64]
    for write in (lambda: cell.hyper_weight_ih.copy_(torch.randn_like(cell.hyper_weight_ih)),  # a cat'ed one
                  lambda: cell.d_weight.mul_(1.5),  # a transposed one
                  lambda: cell.load_state_dict({k: v * 0.9 for k, v in cell.state_dict().items()}),
                  lambda: cell.ln_bias.add_(0.1)):  # a cell constant
        with torch.no_grad():
            write()
        got = _cell_step(cell, x)
        assert rel_err(got, _reference_step(cell, x)) <= TOL[F64]
    # a new parameter object (same values): a new key, same result
    cell.weight_hh = torch.nn.Parameter(cell.weight_hh.detach().clone())
    assert rel_err(_cell_step(cell, x), _reference_step(cell, x)) <= TOL[F64]
    assert len(fused_torch._derived_cache) <= fused_torch.DERIVED_CACHE_SIZE


def test_writes_through_data_are_seen_outside_cached_weights(ext):
    """Without a cached_weights() block every call derives its weights: a write through ``.data``
    (the classic hand-written SGD step, gradcheck's perturbations) changes the next result."""
    cell = HyperLSTMCell(6, 12, hyper_size=5, embed_size=2, backend="torch").double()
    randomize_(cell, torch.Generator().manual_seed(2))
    x = torch.randn(2, 6, dtype=F64)
    hx = tuple(0.5 * torch.randn(2, n, dtype=F64) for n in (12, 12, 5, 5))  # not zeros: W_hh matters
    first = _cell_step(cell, x, hx)
    for name in ("weight_hh", "hyper_weight_ih", "hyper_weight_hh", "d_weight", "ln_bias", "z_weight"):
        getattr(cell, name).data.mul_(1.25)  # bumps no version counter
        got = _cell_step(cell, x, hx)
        assert not torch.equal(got, first), name
        assert rel_err(got, _reference_step(cell, x, hx)) <= TOL[F64], name
        first = got
    assert len(fused_torch._derived_cache) == 0


def test_cached_weights_nests_and_empties_on_exit(ext):
    cell = HyperLSTMCell(6, 12, hyper_size=5, embed_size=2, backend="torch").double()
    randomize_(cell, torch.Generator().manual_seed(3))
    x = torch.randn(2, 6, dtype=F64)
    with fused_torch.cached_weights():
        with fused_torch.cached_weights():
            a = _cell_step(cell, x)
        assert len(fused_torch._derived_cache) == 1  # the outer block still holds it
        entry = next(iter(fused_torch._derived_cache.values()))
        assert torch.equal(_cell_step(cell, x), a)
        assert next(iter(fused_torch._derived_cache.values())) is entry
    assert len(fused_torch._derived_cache) == 0
    with pytest.raises(ZeroDivisionError):  # an exception in the block: emptied all the same
        with fused_torch.cached_weights():
            _cell_step(cell, x)
            1 / 0
    assert len(fused_torch._derived_cache) == 0


def test_derived_cache_in_training_sees_each_step(ext):
    """Training with a forward per optimizer step, inside cached_weights(): each forward and
    backward uses that step's weights."""
    with fused_torch.cached_weights():
        _training_sees_each_step()


def _training_sees_each_step():
    torch.manual_seed(1)
    m = HyperLSTM(5, 9, hyper_size=4, embed_size=2, backend="torch").double()
    ref = HyperLSTM(5, 9, hyper_size=4, embed_size=2, backend="reference").double()
    ref.load_state_dict(m.state_dict())
    x = torch.randn(4, 3, 5, dtype=F64)
    opts = [torch.optim.Adam(mod.parameters(), lr=0.05) for mod in (m, ref)]
    for _ in range(3):
        for mod, opt in zip((m, ref), opts):
            opt.zero_grad()
            mod(x)[0].square().mean().backward()
            opt.step()
    for a, b in zip(m.parameters(), ref.parameters()):
        assert rel_err(a, b) <= 1e-9
    with torch.no_grad():
        assert rel_err(m(x)[0], ref(x)[0]) <= TOL[F64]
