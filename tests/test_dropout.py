"""Seeded recurrent dropout (issue 4): the plain-PyTorch Philox reference against Triton's
``tl.rand`` and the cell kernels' mask pass, bit for bit; the masks' statistics; how the modules
and every backend take a seed.
"""
from __future__ import annotations

import os

import pytest
import torch

from conftest import cell_params, layer_pair, rel_err, sequence_inputs
from hyperkern import HyperLSTMCell
from hyperkern.ops.hyper_lstm import fused_torch, naive
from hyperkern.ops.hyper_lstm.common import CellConfig
from hyperkern.ops.hyper_lstm.dropout import (DropoutSeed, check_seed, keep_scale, mask_tensors, philox_uniform,
                                              seeded_masks)

try:
    import triton
    import triton.language as tl
except ImportError:  # pragma: no cover  (triton comes with the test extra)
    triton = None

CUDA = torch.cuda.is_available()
TRITON_RUNS = triton is not None and (CUDA or os.environ.get("TRITON_INTERPRET") == "1")
DEVICE = torch.device("cuda" if CUDA else "cpu")
SEEDS = (0, 12345, 2 ** 62 + 987654321, 2 ** 63 - 2)  # incl. seeds whose high word is set
needs_triton = pytest.mark.skipif(not TRITON_RUNS, reason="needs triton and CUDA or TRITON_INTERPRET=1")

if triton is not None:
    from hyperkern.kernels.hyper_lstm_fwd import _draw_masks

    @triton.jit
    def _rand_kernel(seed_ptr, out_ptr, base, n, BLOCK: tl.constexpr):
        """out[i] = tl.rand(seed, base + i): the public Triton API the kernels' stream is built on."""
        i = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        u = tl.rand(tl.load(seed_ptr), base + i.to(tl.int64))
        tl.store(out_ptr + i, u, mask=i < n)

    @triton.jit
    def _draw_all_kernel(seed_ptr, m_ptr, stride_t, stride_b, t0, B, N, p_drop, drop_scale,
                         BMC: tl.constexpr, BN: tl.constexpr):
        """Steps t0 + i through the cell kernels' own pass: program (i, row block) writes m[i]."""
        i = tl.program_id(0)
        rows = tl.program_id(1) * BMC + tl.arange(0, BMC)
        _draw_masks(seed_ptr, m_ptr + i * stride_t, stride_b, rows, rows < B, tl.full([], 0, tl.int64) + t0 + i,
                    B, N, p_drop, drop_scale, BMC, BN)


def _masks(seed: int, p: float, T: int, B: int, H: int, Hh: int, dtype=torch.float32):
    return seeded_masks(DropoutSeed(torch.tensor([seed], dtype=torch.int64), p), T, B, H, Hh, dtype)


# --- the reference stream ------------------------------------------------------------------------

def test_masks_statistics_values_and_independence():
    T, B, H, Hh, p = 40, 5, 33, 10, 0.3
    m_main, m_hyp = _masks(777, p, T, B, H, Hh)
    assert m_main.shape == (T, B, H) and m_hyp.shape == (T, B, Hh)
    both = torch.cat([m_main, m_hyp], -1)
    scale = keep_scale(p)
    assert scale == float(torch.tensor(1 / 0.7, dtype=torch.float32))
    assert set(both.unique().tolist()) == {0.0, scale}
    n = both.numel()
    kept = float((both > 0).double().mean())
    assert abs(kept - (1 - p)) < 4 * ((p * (1 - p) / n) ** 0.5)  # 4 sigma
    assert abs(float(both.double().mean()) - 1.0) < 0.03  # inverted: expectation 1
    for t in range(T - 1):  # a fresh mask every step
        assert not torch.equal(both[t], both[t + 1])
    assert not torch.equal(both[:, 0], both[:, 1])  # rows of one step differ
    # same seed -> same masks; another seed -> other masks
    assert torch.equal(both, torch.cat(_masks(777, p, T, B, H, Hh), -1))
    assert not torch.equal(both, torch.cat(_masks(778, p, T, B, H, Hh), -1))
    # p = 0 keeps everything, at exactly 1
    assert bool((torch.cat(_masks(5, 0.0, 2, 3, 4, 2), -1) == 1.0).all())


def test_masks_follow_the_documented_counter():
    """The layout: element (t, b, k) of the concatenated mask uses counter (t·B + b)·(H + Hh) + k
    (that the numbers are Triton's is the tl.rand test below)."""
    T, B, H, Hh, p, seed = 3, 4, 7, 5, 0.5, 99
    m_main, m_hyp = _masks(seed, p, T, B, H, Hh)
    u = philox_uniform(seed, torch.arange(T * B * (H + Hh), dtype=torch.int64)).view(T, B, H + Hh)
    want = torch.where(u >= torch.tensor(p, dtype=torch.float32), keep_scale(p), 0.0)
    assert torch.equal(torch.cat([m_main, m_hyp], -1), want)
    assert m_hyp.dtype == torch.float32 and _masks(seed, p, T, B, H, Hh, torch.float64)[0].dtype == torch.float64


def test_mask_tensors_passes_pairs_and_none_through():
    pair = (torch.ones(2, 1, 3), torch.ones(2, 1, 2))
    assert mask_tensors(pair, 2, 1, 3, 2, torch.float32) is pair
    assert mask_tensors(None, 2, 1, 3, 2, torch.float32) is None


@pytest.mark.parametrize("seed,p,msg", [
    (torch.tensor([1.0]), 0.1, "int64 tensor"),
    (torch.tensor([1, 2]), 0.1, "one element"),
    (torch.tensor([1]), 1.0, r"\[0, 1\)"),
    (torch.tensor([1]), -0.1, r"\[0, 1\)"),
    (torch.tensor([1]), True, "number"),
])
def test_check_seed_rejects_malformed_seeds(seed, p, msg):
    with pytest.raises((TypeError, ValueError), match=msg):
        check_seed(DropoutSeed(seed, p), "cpu")


def test_a_seed_is_not_a_mask_pair():
    """DropoutSeed is not a tuple: code written for ``m_main, m_hyper = masks`` cannot silently
    unpack (seed, p). An int p is accepted."""
    drop = DropoutSeed(torch.tensor([3]), 0)
    assert not isinstance(drop, tuple)
    with pytest.raises(TypeError):
        m_main, m_hyper = drop
    check_seed(drop, "cpu")


def test_seeded_masks_in_chunks_equal_one_batch(monkeypatch):
    """seeded_masks generates a few steps at a time; the chunking must not change a bit."""
    from hyperkern.ops.hyper_lstm import dropout

    drop = DropoutSeed(torch.tensor([2 ** 40 + 5]), 0.3)
    whole = torch.cat(seeded_masks(drop, 7, 3, 11, 4), -1)
    monkeypatch.setattr(dropout, "_CHUNK", 2 * 3 * 15 + 1)  # two steps per chunk, a ragged last one
    assert torch.equal(torch.cat(seeded_masks(drop, 7, 3, 11, 4), -1), whole)
    # a tensor seed and the same Python int give the same stream
    c = torch.arange(50, dtype=torch.int64)
    assert torch.equal(philox_uniform(drop.seed, c), philox_uniform(2 ** 40 + 5, c))
    assert torch.equal(philox_uniform(torch.tensor([-1]), c), philox_uniform(2 ** 64 - 1, c))


# --- Triton: tl.rand and the cell kernels' mask pass, bit for bit ---------------------------------

@needs_triton
@pytest.mark.parametrize("seed", SEEDS)
def test_reference_equals_tl_rand_bitwise(seed):
    """Counters past 2^32 and 2^33 too (the high word of the Philox counter)."""
    n = 300
    for base in (0, 2 ** 32 - 150, 3 * 2 ** 33 + 17):
        out = torch.full((n,), float("nan"), device=DEVICE)
        _rand_kernel[(3,)](torch.tensor([seed], dtype=torch.int64, device=DEVICE), out, base, n, BLOCK=128)
        want = philox_uniform(seed, torch.arange(n, dtype=torch.int64) + base)
        assert torch.equal(out.cpu(), want), (seed, base)


@needs_triton
@pytest.mark.parametrize("p", [0.1, 0.45])
def test_cell_kernel_mask_pass_equals_reference_bitwise(p):
    """``_draw_masks`` (the pass the forward and backward cell kernels run first) writes exactly
    the masks ``seeded_masks`` rebuilds, at odd sizes, several column chunks, every step."""
    T, B, H, Hh, seed = 5, 3, 33, 10, 2 ** 62 + 4242
    N = H + Hh
    seed_t = torch.tensor([seed], dtype=torch.int64, device=DEVICE)
    m = torch.full((T, B + 1, N + 3), float("nan"), device=DEVICE)  # padded rows/columns stay NaN
    _draw_all_kernel[(T, 2)](seed_t, m, m.stride(0), m.stride(1), 0, B, N, p, keep_scale(p), BMC=2, BN=16)
    want = torch.cat(_masks(seed, p, T, B, H, Hh), -1)
    m = m.cpu()
    assert torch.equal(m[:, :B, :N], want)
    assert bool(torch.isnan(m[:, B:]).all()) and bool(torch.isnan(m[:, :, N:]).all())
    # steps so late that the counter passes 2^32 (int64 counter arithmetic in the kernel)
    t0 = 2 ** 32 // (B * N) + 1
    m = torch.full((2, B, N), float("nan"), device=DEVICE)
    _draw_all_kernel[(2, 2)](seed_t, m, m.stride(0), m.stride(1), t0, B, N, p, keep_scale(p), BMC=2, BN=16)
    u = philox_uniform(seed, torch.arange(t0 * B * N, (t0 + 2) * B * N, dtype=torch.int64)).view(2, B, N)
    assert torch.equal(m.cpu(), torch.where(u >= torch.tensor(p, dtype=torch.float32), keep_scale(p), 0.0))


# --- every backend takes a seed; the module hands one to the Triton backend ----------------------

def test_cpu_backends_take_a_seed_as_its_masks():
    """naive and the torch backend given a DropoutSeed compute what they compute from the
    materialised masks (forward and gradients, float64)."""
    cfg = CellConfig(input_size=4, hidden_size=9, hyper_size=5, embed_size=3)
    p = cell_params(cfg, 1)
    x, st, drop = sequence_inputs(cfg, 4, 3, 2, dropout=0.4, seeded=True)
    lengths = torch.tensor([4, 2, 1])
    pair = seeded_masks(drop, 4, 3, 9, 5, torch.float64)
    for backend in (naive, fused_torch):
        xs = x.clone().requires_grad_()
        out_s, fin_s = backend.hyper_lstm_sequence(xs, st, p, cfg, lengths, drop)
        g_s = torch.autograd.grad(out_s.sum() + fin_s[1].sum(), xs)[0]
        xm = x.clone().requires_grad_()
        out_m, fin_m = backend.hyper_lstm_sequence(xm, st, p, cfg, lengths, pair)
        g_m = torch.autograd.grad(out_m.sum() + fin_m[1].sum(), xm)[0]
        assert torch.equal(out_s, out_m) and torch.equal(g_s, g_m)
    out_n, _ = naive.hyper_lstm_sequence(x, st, p, cfg, lengths, None)
    assert rel_err(out_s.detach(), out_n) > 1e-2  # the dropout did something


def test_cell_draws_a_seed_for_triton_and_masks_otherwise():
    cell = HyperLSTMCell(3, 6, hyper_size=4, embed_size=2, recurrent_dropout=0.25).train()
    like = torch.zeros(1)
    torch.manual_seed(7)
    a = cell.dropout_masks(5, 2, like, "triton")
    torch.manual_seed(7)
    b = cell.dropout_masks(5, 2, like, "triton")
    assert isinstance(a, DropoutSeed) and a.p == 0.25 and a.seed.dtype == torch.int64
    assert torch.equal(a.seed, b.seed)  # torch.manual_seed reproduces it
    assert not torch.equal(a.seed, cell.dropout_masks(5, 2, like, "triton").seed)
    m_main, m_hyp = cell.dropout_masks(5, 2, like, "torch")
    assert m_main.shape == (5, 2, 6) and m_hyp.shape == (5, 2, 4)
    cell.seeded_dropout = True  # every backend from a seed
    assert isinstance(cell.dropout_masks(5, 2, like, "torch"), DropoutSeed)
    cell.seeded_dropout = False  # every backend from mask tensors
    pair = cell.dropout_masks(5, 2, like, "triton")
    assert not isinstance(pair, DropoutSeed) and [tuple(m.shape) for m in pair] == [(5, 2, 6), (5, 2, 4)]
    assert cell.eval().dropout_masks(5, 2, like, "triton") is None


def test_seeded_dropout_gives_every_backend_the_same_masks():
    """With ``seeded_dropout = True`` the reference and the torch backend draw the Triton backend's
    masks: after the same torch.manual_seed, a training step agrees to rounding (2-layer, bidirectional)."""
    kw = dict(input_size=4, hidden_size=9, hyper_size=5, embed_size=2, num_layers=2, bidirectional=True,
              recurrent_dropout=0.4)
    ref, fast = layer_pair(torch.float64, "torch", "cpu", 10, **kw)
    x = torch.randn(3, 2, 4, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    outs = []
    for layer in (ref, fast):
        layer.seeded_dropout = True  # sets every cell
        assert all(c.seeded_dropout is True for c in layer.cells)
        torch.manual_seed(12)
        outs.append(layer.train()(x)[0])
    assert rel_err(outs[1], outs[0]) < 1e-12
    torch.manual_seed(12)
    fast.seeded_dropout = None  # back to Bernoulli tensors on the torch backend: other masks
    assert rel_err(fast(x)[0], outs[0]) > 1e-3
    for bad in ("yes", 1, 1.0):
        with pytest.raises(ValueError, match="seeded_dropout must be None, True or False"):
            fast.seeded_dropout = bad


@needs_triton
def test_triton_layer_with_recurrent_dropout_matches_reference_from_the_same_seed():
    """End to end: a training-mode layer on backend='triton' draws its seed from torch's generator;
    the float64 reference given that seed (drawn again after the same torch.manual_seed) computes
    the same outputs and gradients. Same seed -> bitwise-equal runs; eval mode -> no dropout."""
    kw = dict(input_size=5, hidden_size=17, hyper_size=6, embed_size=3, recurrent_dropout=0.35)
    ref, fast = _pair(kw)
    x = torch.randn(4, 3, 5, generator=torch.Generator().manual_seed(8), dtype=torch.float64)
    lengths = torch.tensor([4, 2, 3])

    def run(manual_seed):
        xs = x.to(DEVICE, torch.float32).requires_grad_()
        torch.manual_seed(manual_seed)
        out, _ = fast.train()(xs, lengths=lengths)
        return out, torch.autograd.grad((out * out).sum(), [xs, fast.cells[0].weight_hh])

    out, grads = run(21)
    out2, grads2 = run(21)
    assert torch.equal(out, out2) and all(torch.equal(a, b) for a, b in zip(grads, grads2))
    assert not torch.equal(out, run(22)[0])
    # the reference, given the seed the layer drew (same generator state -> same draw)
    torch.manual_seed(21)
    drop = DropoutSeed.draw(0.35, DEVICE)
    drop = DropoutSeed(drop.seed.cpu(), drop.p)
    cell = ref.cells[0]
    xr = x.clone().requires_grad_()
    w = cell.weight_hh
    order = torch.tensor([0, 2, 1])  # the layer sorts by length: run the reference in that order
    out_r, _ = naive.hyper_lstm_sequence(xr[:, order], tuple(torch.zeros(3, n, dtype=torch.float64)
                                                             for n in (17, 17, 6, 6)),
                                         cell.params(), cell.cfg, lengths[order], drop)
    out_r = out_r[:, torch.argsort(order)]
    g_r = torch.autograd.grad((out_r * out_r).sum(), [xr, w])
    assert rel_err(out.detach().cpu(), out_r) < 1e-5
    assert rel_err(grads[0].cpu(), g_r[0]) < 1e-4 and rel_err(grads[1].cpu(), g_r[1]) < 1e-4
    with torch.no_grad():
        fast.eval()
        a, _ = fast(x.to(DEVICE, torch.float32), lengths=lengths)
        b, _ = fast(x.to(DEVICE, torch.float32), lengths=lengths)
        fast.cells[0].recurrent_dropout = 0.0
        c, _ = fast(x.to(DEVICE, torch.float32), lengths=lengths)
    assert torch.equal(a, b) and torch.equal(a, c)


def _pair(kw):
    return layer_pair(torch.float32, "triton", DEVICE, 9, **kw)
