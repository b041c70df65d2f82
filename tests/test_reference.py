"""The reference backend and the modules themselves (SPEC §1): parameter counts, names, shapes and
initialisation; an independent hand check of one step's maths; state carrying; variable length,
packing, directions, stacking, layouts; dropout; input validation; a 10,000-step sequence.

Everything here runs on the float64 reference (``backend="reference"``) except the last test,
which also compares the fast ``"torch"`` backend over 10,000 steps.
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from conftest import rel_err
from hyperkern import CellConfig, HyperLSTM, HyperLSTMCell, HyperLSTMState
from hyperkern.ops.hyper_lstm import naive
from hyperkern.testing import randomize_

F64 = torch.float64


pytestmark = pytest.mark.usefixtures("one_thread")


# --- helpers ---------------------------------------------------------------------------------

def ref_model(input_size=7, hidden_size=9, hyper_size=5, embed_size=3, seed=0, **kw) -> HyperLSTM:
    """A float64 reference HyperLSTM with non-initial random parameters."""
    kw.setdefault("backend", "reference")
    m = HyperLSTM(input_size, hidden_size, hyper_size=hyper_size, embed_size=embed_size, dtype=F64, **kw)
    return randomize_(m, torch.Generator().manual_seed(seed))


def rand_state(m: HyperLSTM, B: int, scale: float = 0.5):
    L = m.num_layers * m.num_directions
    H, Hh = m.hidden_size, m.hyper_size
    return HyperLSTMState(*(scale * torch.randn(L, B, n, dtype=F64) for n in (H, H, Hh, Hh)))


def single_layer_from(m: HyperLSTM, cell_indices, input_size) -> HyperLSTM:
    """A one-layer HyperLSTM whose cells are copies of ``m.cells[i]`` for i in cell_indices."""
    c = m.cells[cell_indices[0]].cfg
    one = HyperLSTM(input_size, c.hidden_size, hyper_size=c.hyper_size, embed_size=c.embed_size, num_layers=1,
                    bidirectional=len(cell_indices) == 2, layer_norm=c.layer_norm,
                    forget_bias=c.forget_bias, ln_eps=c.ln_eps, backend="reference", dtype=F64)
    for j, i in enumerate(cell_indices):
        one.cells[j].load_state_dict(m.cells[i].state_dict())
    return one


def assert_close(got, want, tol=1e-12, what=""):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    err = rel_err(got, want)
    assert err <= tol, f"{what}: max rel error {err:.3e} > {tol:.0e}"


def assert_state_close(got, want, tol=1e-12, what="state"):
    for field, g, w in zip(HyperLSTMState._fields, got, want):
        assert_close(g, w, tol, f"{what}.{field}")


# --- parameter counts, names, shapes -----------------------------------------------------------

# (paper row, V, H, Hh, E, layers, layer_norm, exact total of SPEC's table, printed total in M)
SPEC_ROWS = [
    ("PTB HyperLSTM", 50, 1000, 128, 4, 1, False, 4_911_874, 4.91),
    ("PTB LayerNorm HyperLSTM", 50, 1000, 128, 4, 1, True, 4_923_154, 4.92),
    ("PTB 2-layer LayerNorm HyperLSTM", 50, 1000, 128, 16, 2, True, 14_407_714, 14.41),
    ("enwik8 HyperLSTM", 205, 1800, 256, 64, 1, False, 18_708_213, 18.71),
    ("enwik8 LayerNorm HyperLSTM", 205, 2048, 512, 64, 1, True, 26_541_773, 26.54),
]


@pytest.mark.parametrize("row", SPEC_ROWS, ids=[r[0] for r in SPEC_ROWS])
def test_parameter_count_reproduces_spec_table(row):
    _, V, H, Hh, E, layers, ln, total, printed = row
    m = HyperLSTM(V, H, hyper_size=Hh, embed_size=E, num_layers=layers, layer_norm=ln, device="meta")
    cell_params = sum(p.numel() for p in m.parameters())
    softmax = H * V + V
    assert cell_params + softmax == total
    assert round(total / 1e6, 2) == printed  # and that is what the paper printed
    # the closed form in CellConfig agrees with the module's real count, cell by cell
    assert sum(c.cfg.num_parameters() for c in m.cells) == cell_params
    for c in m.cells:
        assert sum(p.numel() for p in c.parameters()) == c.cfg.num_parameters()


def test_single_cell_counts_of_spec():
    # SPEC: "cell 4,861,824" without and "cell 4,873,104" with layer norm (PTB sizes)
    for ln, want in ((False, 4_861_824), (True, 4_873_104)):
        cell = HyperLSTMCell(50, 1000, hyper_size=128, embed_size=4, layer_norm=ln, device="meta")
        assert sum(p.numel() for p in cell.parameters()) == want


def _expected_shapes(X, H, Hh, E, ln):
    shapes = {
        "weight_ih": (4 * H, X), "weight_hh": (4 * H, H), "bias": (4 * H,),
        "hyper_weight_ih": (4 * Hh, X + H), "hyper_weight_hh": (4 * Hh, Hh), "hyper_bias": (4 * Hh,),
        "z_weight": (12 * E, Hh), "z_bias": (8 * E,), "d_weight": (12, H, E),
    }
    if ln:
        shapes.update({
            "ln_weight": (4, H), "ln_bias": (4, H), "ln_cell_weight": (H,), "ln_cell_bias": (H,),
            "hyper_ln_weight": (4, Hh), "hyper_ln_bias": (4, Hh),
            "hyper_ln_cell_weight": (Hh,), "hyper_ln_cell_bias": (Hh,),
        })
    return shapes


@pytest.mark.parametrize("ln", [True, False], ids=["ln", "no_ln"])
def test_parameter_names_and_shapes(ln):
    X, H, Hh, E = 5, 7, 3, 2
    m = HyperLSTM(X, H, hyper_size=Hh, embed_size=E, num_layers=2, bidirectional=True, layer_norm=ln, device="meta")
    want = {}
    # layer-major, then direction: cells 0, 1 = layer 0 (fwd, rev) read X; cells 2, 3 read 2H
    for k, layer_in in enumerate((X, X, 2 * H, 2 * H)):
        for name, shape in _expected_shapes(layer_in, H, Hh, E, ln).items():
            want[f"cells.{k}.{name}"] = shape
    got = {name: tuple(p.shape) for name, p in m.named_parameters()}
    assert got == want
    assert "cells.0.weight_ih" in got and ("cells.3.hyper_ln_cell_bias" in got) == ln
    # the cell exposes the same names without the prefix, and params() returns them all
    cell = HyperLSTMCell(X, H, hyper_size=Hh, embed_size=E, layer_norm=ln, device="meta")
    assert {n: tuple(p.shape) for n, p in cell.named_parameters()} == _expected_shapes(X, H, Hh, E, ln)
    assert set(cell.params()) == set(_expected_shapes(X, H, Hh, E, ln))
    assert not list(m.buffers())


def test_defaults_match_spec():
    cell = HyperLSTMCell(4, 6)
    c = cell.cfg
    assert (c.hyper_size, c.embed_size, c.layer_norm, c.forget_bias, c.ln_eps) == (128, 4, True, 1.0, 1e-3)
    assert cell.recurrent_dropout == 0.0
    m = HyperLSTM(4, 6)
    c = m.cells[0].cfg
    assert (c.hyper_size, c.embed_size, c.layer_norm, c.forget_bias, c.ln_eps) == (128, 4, True, 1.0, 1e-3)
    assert (m.num_layers, m.batch_first, m.dropout, m.bidirectional) == (1, False, 0.0, False)


# --- initialisation ----------------------------------------------------------------------------

def _scaling_vectors(cell: HyperLSTMCell, h_hat):
    """SPEC step 2 written out: z from h_hat, then d_k = z_k @ d_weight[k]^T. -> [12, B, H]."""
    E = cell.cfg.embed_size
    z = h_hat @ cell.z_weight.T + torch.cat([cell.z_bias, cell.z_bias.new_zeros(4 * E)])
    return torch.stack([z[:, k * E:(k + 1) * E] @ cell.d_weight[k].T for k in range(12)])


@pytest.mark.parametrize("dtype", [torch.float32, F64], ids=["fp32", "fp64"])
def test_init_every_d_is_one_tenth_and_beta_zero(dtype):
    # default embed size (E = 4): exactly 0.1 and exactly 0, for any hyper state
    cell = HyperLSTMCell(7, 11, hyper_size=13, dtype=dtype).requires_grad_(False)
    h_hat = torch.randn(5, 13, dtype=dtype) * 3
    d = _scaling_vectors(cell, h_hat)
    assert torch.equal(d[:8], torch.full_like(d[:8], 0.1)), "d_x, d_h must be 0.1 exactly at init"
    assert torch.equal(d[8:], torch.zeros_like(d[8:])), "beta must be 0 exactly at init"


@pytest.mark.parametrize("E", [1, 2, 3, 5, 16, 64])
def test_init_d_is_one_tenth_other_embed_sizes(E):
    # For E that do not divide 0.1 evenly, sum_e (0.1/E) rounds: allow a few ulps (see report);
    # beta stays exactly 0 whatever h_hat is (d_weight's bias-path blocks are 0).
    for dtype, ulps in ((torch.float32, 2 ** -23), (F64, 2 ** -52)):
        cell = HyperLSTMCell(3, 10, hyper_size=6, embed_size=E, dtype=dtype).requires_grad_(False)
        d = _scaling_vectors(cell, torch.randn(4, 6, dtype=dtype) * 3)
        assert float((d[:8] - 0.1).abs().max()) <= 8 * ulps * 0.1
        assert torch.equal(d[8:], torch.zeros_like(d[8:]))


def test_init_values_per_spec_table():
    X, H, Hh, E = 37, 64, 128, 4
    cell = HyperLSTMCell(X, H, hyper_size=Hh, embed_size=E, dtype=F64).requires_grad_(False)
    # biases 0
    for name in ("bias", "hyper_bias", "ln_bias", "ln_cell_bias", "hyper_ln_bias", "hyper_ln_cell_bias"):
        assert torch.equal(getattr(cell, name), torch.zeros_like(getattr(cell, name))), name
    for name in ("ln_weight", "ln_cell_weight", "hyper_ln_weight", "hyper_ln_cell_weight"):
        assert torch.equal(getattr(cell, name), torch.ones_like(getattr(cell, name))), name
    # z: x- and h-path rows 0; bias-path rows N(0, 0.01^2); z_bias 1
    assert torch.equal(cell.z_weight[:8 * E], torch.zeros(8 * E, Hh, dtype=F64))
    zb = cell.z_weight[8 * E:]
    assert abs(float(zb.std()) - 0.01) < 0.001 and abs(float(zb.mean())) < 0.001
    assert torch.equal(cell.z_bias, torch.ones(8 * E, dtype=F64))
    # d_weight: 0.1/E on the x- and h-paths, 0 on the bias path
    assert torch.equal(cell.d_weight[:8], torch.full((8, H, E), 0.1 / E, dtype=F64))
    assert torch.equal(cell.d_weight[8:], torch.zeros(4, H, E, dtype=F64))
    # xavier_uniform over the whole matrix: bound sqrt(6 / (fan_in + fan_out))
    for name, fan_in, fan_out in (("weight_ih", X, 4 * H), ("hyper_weight_ih", X + H, 4 * Hh)):
        w = getattr(cell, name)
        bound = math.sqrt(6.0 / (fan_in + fan_out))
        assert float(w.abs().max()) <= bound
        assert abs(float(w.std()) - bound / math.sqrt(3)) < 0.1 * bound / math.sqrt(3), name
    # orthogonal separately per gate block (a single orthogonal [4n, n] would fail W_y^T W_y = I)
    for name, n in (("weight_hh", H), ("hyper_weight_hh", Hh)):
        w = getattr(cell, name)
        for y in range(4):
            blk = w[y * n:(y + 1) * n]
            assert torch.allclose(blk @ blk.T, torch.eye(n, dtype=F64), atol=1e-10), f"{name} gate {y}"
    with pytest.raises(ValueError, match="init"):
        cell.reset_parameters("xavier")


def test_randomize_gives_non_initial_parameters():
    cell = HyperLSTMCell(3, 5, hyper_size=4, embed_size=2, dtype=F64)
    init = {n: p.clone() for n, p in cell.named_parameters()}
    randomize_(cell)
    for n, p in cell.named_parameters():
        assert not torch.equal(p, init[n]), n
        assert bool((p != 0).all()), n


# --- an independent hand check of one step's maths ---------------------------------------------

def hand_step(x, state, P, cfg: CellConfig, masks=(None, None), variant=None):
    """SPEC §1 step written a second way: F.layer_norm, einsums, per-sample dynamic weights.

    ``variant`` injects one specific deviation from the SPEC (used to prove the check has teeth).
    """
    h, c, hh, ch = state
    B = x.shape[0]
    X, H, Hh, E = cfg.input_size, cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    fb, eps = cfg.forget_bias, cfg.ln_eps
    sig = torch.sigmoid

    def LN(a, w, b):
        if variant == "eps_outside_sqrt":
            mu = a.mean(-1, keepdim=True)
            sd = ((a - mu) ** 2).mean(-1, keepdim=True).sqrt()
            return (a - mu) / (sd + eps) * w + b
        if variant == "unbiased_var":
            mu = a.mean(-1, keepdim=True)
            return (a - mu) / torch.sqrt(a.var(-1, keepdim=True, unbiased=True) + eps) * w + b
        return F.layer_norm(a, (a.shape[-1],), w, b, eps)  # biased variance, eps inside sqrt

    def gates_of(a, n):
        i, f, g, o = a.reshape(B, 4, n).unbind(1)
        if variant == "gate_order_ifog":
            i, f, o, g = i, f, g, o
        return i, f, g, o

    def update(i, f, g, o, c_prev, ln_w, ln_b, lnc_w, lnc_b, mask):
        if cfg.layer_norm:
            if variant == "forget_bias_before_ln":
                f = f + fb
            i, f, g, o = (LN(a, ln_w[y], ln_b[y]) for y, a in enumerate((i, f, g, o)))
            if variant != "forget_bias_before_ln":
                f = f + fb
        else:
            f = f + fb
        tg = torch.tanh(g)
        if mask is not None:
            tg = tg * mask
        c_new = sig(f) * c_prev + sig(i) * tg
        c_out = LN(c_new, lnc_w, lnc_b) if cfg.layer_norm else c_new
        h_new = sig(o) * torch.tanh(c_out)
        return h_new, (c_out if variant == "store_normalised_c" else c_new)

    # 1. hyper cell: x FIRST in the hyper input
    x_hat = torch.cat([h, x], 1) if variant == "hyper_input_h_first" else torch.cat([x, h], 1)
    a_hat = F.linear(x_hat, P["hyper_weight_ih"], P["hyper_bias"]) + F.linear(hh, P["hyper_weight_hh"])
    hh_new, ch_new = update(*gates_of(a_hat, Hh), ch, P.get("hyper_ln_weight"), P.get("hyper_ln_bias"),
                            P.get("hyper_ln_cell_weight"), P.get("hyper_ln_cell_bias"), masks[1])

    # 2. z from the NEW h_hat, 12 blocks of E; d_k = z_k @ d_weight[k]^T
    z_src = hh if variant == "z_from_old_h_hat" else hh_new
    z = F.linear(z_src, P["z_weight"]) + F.pad(P["z_bias"], (0, 4 * E))
    d = torch.einsum("bke,khe->bkh", z.view(B, 12, E), P["d_weight"])  # [B, 12, H]
    d_x, d_h, beta = d[:, 0:4], d[:, 4:8], d[:, 8:12]

    # 3. main cell with the dynamic weights materialised per sample: (diag(d) W) v
    Wx = d_x.unsqueeze(-1) * P["weight_ih"].view(1, 4, H, X)
    Wh = d_h.unsqueeze(-1) * P["weight_hh"].view(1, 4, H, H)
    a = (torch.einsum("byhx,bx->byh", Wx, x) + torch.einsum("byhk,bk->byh", Wh, h)
         + P["bias"].view(4, H) + beta).reshape(B, 4 * H)
    h_new, c_new = update(*gates_of(a, H), c, P.get("ln_weight"), P.get("ln_bias"),
                          P.get("ln_cell_weight"), P.get("ln_cell_bias"), masks[0])
    return h_new, c_new, hh_new, ch_new


VARIANTS_LN = ["eps_outside_sqrt", "unbiased_var", "forget_bias_before_ln", "store_normalised_c"]
VARIANTS_ALL = ["z_from_old_h_hat", "gate_order_ifog", "hyper_input_h_first"]


@pytest.mark.parametrize("ln", [True, False], ids=["ln", "no_ln"])
def test_reference_step_matches_hand_formula(ln):
    X, H, Hh, E, B = 5, 7, 6, 3, 4
    cell = randomize_(HyperLSTMCell(X, H, hyper_size=Hh, embed_size=E, layer_norm=ln, forget_bias=0.7, ln_eps=0.05,
                                    backend="reference", dtype=F64))
    cfg, P = cell.cfg, cell.params()
    state = tuple(0.7 * torch.randn(B, n, dtype=F64) for n in (H, H, Hh, Hh))
    x1, x2 = torch.randn(B, X, dtype=F64), torch.randn(B, X, dtype=F64)
    with torch.no_grad():
        # two steps, so the second one reads a state the first one produced
        want1 = hand_step(x1, state, P, cfg)
        want2 = hand_step(x2, want1, P, cfg)
        got1 = naive.cell_step(x1, state, P, cfg)
        got2 = naive.cell_step(x2, got1, P, cfg)
        _, mod1 = cell(x1, HyperLSTMState(*state))
        _, mod2 = cell(x2, mod1)
    for g1, g2, name in ((got1, got2, "naive.cell_step"), (mod1, mod2, "HyperLSTMCell")):
        assert_state_close(g1, want1, 1e-12, f"{name} step 1")
        assert_state_close(g2, want2, 1e-12, f"{name} step 2")
    # the hand check has teeth: each single deviation from SPEC gives a visibly different step
    for variant in VARIANTS_ALL + (VARIANTS_LN if ln else []):
        with torch.no_grad():
            bad = hand_step(x2, want1, P, cfg, variant=variant)
        err = max(rel_err(b, w) for b, w in zip(bad, want2))
        assert err > 1e-4, f"variant {variant} is indistinguishable (err {err:.1e})"


def test_reference_step_with_recurrent_dropout_masks_matches_hand_formula():
    # rdrop multiplies tanh(g) only, in both cells, with independent masks
    X, H, Hh, E, B = 4, 6, 5, 2, 3
    cell = randomize_(HyperLSTMCell(X, H, hyper_size=Hh, embed_size=E, backend="reference", dtype=F64))
    cfg, P = cell.cfg, cell.params()
    state = tuple(0.7 * torch.randn(B, n, dtype=F64) for n in (H, H, Hh, Hh))
    x = torch.randn(B, X, dtype=F64)
    keep = 0.6
    m_main = torch.bernoulli(torch.full((B, H), keep, dtype=F64)) / keep
    m_hyp = torch.bernoulli(torch.full((B, Hh), keep, dtype=F64)) / keep
    with torch.no_grad():
        want = hand_step(x, state, P, cfg, masks=(m_main, m_hyp))
        got = naive.cell_step(x, state, P, cfg, masks=(m_main, m_hyp))
        plain = naive.cell_step(x, state, P, cfg)
        # through the sequence entry point with [T, B, *] masks
        out, seq = naive.hyper_lstm_sequence(x[None], state, P, cfg, None, (m_main[None], m_hyp[None]))
    assert_state_close(got, want, 1e-12, "masked step")
    assert_state_close(seq, want, 1e-12, "masked sequence")
    assert_close(out[0], want[0], 1e-12, "masked sequence output")
    assert rel_err(got[0], plain[0]) > 1e-3  # the masks did something


def test_recurrent_dropout_masks_are_inverted_fresh_and_off_in_eval():
    T, B, H, Hh = 50, 4, 9, 7
    p = 0.3
    cell = HyperLSTMCell(3, H, hyper_size=Hh, embed_size=2, recurrent_dropout=p, dtype=F64)
    like = torch.zeros(1, dtype=F64)
    cell.train()
    m_main, m_hyp = cell.dropout_masks(T, B, like)
    assert m_main.shape == (T, B, H) and m_hyp.shape == (T, B, Hh)
    for m in (m_main, m_hyp):
        vals = set(torch.unique(m).tolist())
        assert vals == {0.0, 1.0 / (1.0 - p)}
        assert abs(float((m == 0).double().mean()) - p) < 0.07
        assert not torch.equal(m[0], m[1])  # a fresh mask every step
    cell.eval()
    assert cell.dropout_masks(T, B, like) is None
    assert HyperLSTMCell(3, H, hyper_size=Hh, embed_size=2, dtype=F64).train().dropout_masks(T, B, like) is None


# --- sequences: state carrying, cell vs layer ---------------------------------------------------

def test_T_steps_equal_two_halves_with_state_carried():
    m = ref_model(num_layers=2)
    T, B = 9, 3
    x = torch.randn(T, B, 7, dtype=F64)
    s0 = rand_state(m, B)
    with torch.no_grad():
        out, sT = m(x, s0)
        o1, s1 = m(x[:4], s0)
        o2, s2 = m(x[4:], s1)
    assert_close(torch.cat([o1, o2]), out, 1e-12, "output")
    assert_state_close(s2, sT, 1e-12)
    # and step by step, one call per step
    s = s0
    outs = []
    with torch.no_grad():
        for t in range(T):
            o, s = m(x[t:t + 1], s)
            outs.append(o)
    assert_close(torch.cat(outs), out, 1e-12, "stepwise output")
    assert_state_close(s, sT, 1e-12, "stepwise state")


def test_cell_stepping_equals_one_layer():
    m = ref_model()
    cell = HyperLSTMCell(7, 9, hyper_size=5, embed_size=3, backend="reference", dtype=F64)
    cell.load_state_dict(m.cells[0].state_dict())
    T, B = 6, 2
    x = torch.randn(T, B, 7, dtype=F64)
    s0 = rand_state(m, B)
    with torch.no_grad():
        out, sT = m(x, s0)
        s = HyperLSTMState(*(t[0] for t in s0))
        for t in range(T):
            h, s = cell(x[t], s)
            assert_close(h, out[t], 1e-12, f"step {t}")
    assert_state_close(s, tuple(t[0] for t in sT), 1e-12)
    # zero state when omitted
    with torch.no_grad():
        h0, _ = cell(x[0])
        o, _ = m(x[:1])
    assert_close(h0, o[0], 1e-12, "zero initial state")


def test_missing_state_means_zeros():
    m = ref_model(num_layers=2, bidirectional=True)
    x = torch.randn(4, 3, 7, dtype=F64)
    zeros = HyperLSTMState(*(torch.zeros_like(s) for s in rand_state(m, 3)))
    with torch.no_grad():
        a, sa = m(x)
        b, sb = m(x, zeros)
        c, sc = m(x, tuple(zeros))  # a plain 4-tuple is accepted
    assert torch.equal(a, b) and torch.equal(a, c)
    assert all(torch.equal(p, q) for p, q in zip(sa, sb))
    assert isinstance(sa, HyperLSTMState)


# --- variable length -----------------------------------------------------------------------------

LENGTHS = [5, 2, 7, 3]  # unsorted, one full-length


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_variable_length_matches_each_sequence_alone(bidirectional):
    m = ref_model(num_layers=2, bidirectional=bidirectional)
    T, B = 7, len(LENGTHS)
    x = torch.randn(T, B, 7, dtype=F64)
    s0 = rand_state(m, B)
    with torch.no_grad():
        out, sT = m(x, s0, lengths=torch.tensor(LENGTHS))
        for b, L in enumerate(LENGTHS):
            ob, sb = m(x[:L, b:b + 1], tuple(s[:, b:b + 1] for s in s0))
            assert_close(out[:L, b:b + 1], ob, 1e-12, f"output of sequence {b} (length {L})")
            assert torch.equal(out[L:, b], torch.zeros_like(out[L:, b])), f"output past end of {b}"
            for field, got, want in zip(HyperLSTMState._fields, sT, sb):
                assert_close(got[:, b:b + 1], want, 1e-12, f"final {field} of sequence {b}")


def test_lengths_forms_and_full_lengths():
    m = ref_model()
    T, B = 7, 4
    x = torch.randn(T, B, 7, dtype=F64)
    with torch.no_grad():
        want, ws = m(x, lengths=torch.tensor(LENGTHS))
        for form in (LENGTHS, tuple(LENGTHS), torch.tensor(LENGTHS, dtype=torch.int32)):
            got, gs = m(x, lengths=form)
            assert torch.equal(got, want)
            assert all(torch.equal(p, q) for p, q in zip(gs, ws))
        full, fs = m(x, lengths=[T] * B)
        none, ns = m(x)
    assert torch.equal(full, none)
    assert all(torch.equal(p, q) for p, q in zip(fs, ns))


@pytest.mark.parametrize("enforce_sorted", [False, True], ids=["unsorted", "sorted"])
@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_packed_sequence_follows_nn_lstm_conventions(enforce_sorted, bidirectional):
    lengths = sorted(LENGTHS, reverse=True) if enforce_sorted else LENGTHS
    m = ref_model(num_layers=2, bidirectional=bidirectional)
    T, B = 7, len(lengths)
    x = torch.randn(T, B, 7, dtype=F64)
    s0 = rand_state(m, B)
    packed = pack_padded_sequence(x, lengths, enforce_sorted=enforce_sorted)
    lstm = nn.LSTM(7, 9, num_layers=2, bidirectional=bidirectional, dtype=F64)
    with torch.no_grad():
        out, sT = m(packed, s0)
        lstm_out, _ = lstm(packed)
        want, ws = m(x, s0, lengths=lengths)
    assert isinstance(out, PackedSequence)
    for attr in ("batch_sizes", "sorted_indices", "unsorted_indices"):
        a, b = getattr(out, attr), getattr(lstm_out, attr)
        assert (a is None and b is None) or torch.equal(a, b), attr
    assert out.data.shape == (sum(lengths), m.num_directions * 9)
    padded, out_lengths = pad_packed_sequence(out, total_length=T)
    assert out_lengths.tolist() == list(lengths)
    assert_close(padded, want, 1e-12, "packed output vs padded + lengths")
    assert_state_close(sT, ws, 1e-12, "packed final state")
    # final states are in the ORIGINAL batch order (like nn.LSTM's h_n)
    with torch.no_grad():
        ob, sb = m(x[:lengths[0], 0:1], tuple(s[:, 0:1] for s in s0))
    assert_close(sT.h[:, 0:1], sb.h, 1e-12, "final h of sequence 0")
    with pytest.raises(ValueError, match="lengths"):
        m(packed, lengths=lengths)


# --- directions, stacking, layouts ------------------------------------------------------------

@pytest.mark.parametrize("lengths", [None, [4, 6, 1]], ids=["full", "lengths"])
def test_bidirectional_reverse_is_reverse_cell_on_reversed_sequence(lengths):
    m = ref_model(bidirectional=True)
    T, B, H = 6, 3, 9
    x = torch.randn(T, B, 7, dtype=F64)
    s0 = rand_state(m, B)
    fwd = single_layer_from(m, [0], 7)
    rev = single_layer_from(m, [1], 7)
    with torch.no_grad():
        out, sT = m(x, s0, lengths=lengths)
        assert out.shape == (T, B, 2 * H)
        for b in range(B):
            L = T if lengths is None else lengths[b]
            sf = tuple(s[0:1, b:b + 1] for s in s0)
            sr = tuple(s[1:2, b:b + 1] for s in s0)
            of, stf = fwd(x[:L, b:b + 1], sf)
            orv, str_ = rev(x[:L, b:b + 1].flip(0), sr)
            assert_close(out[:L, b:b + 1, :H], of, 1e-12, f"forward half of {b}")
            assert_close(out[:L, b:b + 1, H:], orv.flip(0), 1e-12, f"reverse half of {b}")
            assert torch.equal(out[L:, b], torch.zeros_like(out[L:, b]))
            for field, got, wf, wr in zip(HyperLSTMState._fields, sT, stf, str_):
                assert_close(got[0:1, b:b + 1], wf, 1e-12, f"final fwd {field} of {b}")
                assert_close(got[1:2, b:b + 1], wr, 1e-12, f"final rev {field} of {b}")


@pytest.mark.parametrize("bidirectional", [False, True], ids=["uni", "bi"])
def test_stacking_layer2_consumes_layer1_output(bidirectional):
    m = ref_model(num_layers=2, bidirectional=bidirectional)
    D, H = m.num_directions, 9
    T, B = 5, 3
    x = torch.randn(T, B, 7, dtype=F64)
    s0 = rand_state(m, B)
    l1 = single_layer_from(m, list(range(D)), 7)
    l2 = single_layer_from(m, list(range(D, 2 * D)), D * H)
    lengths = [5, 3, 4]
    with torch.no_grad():
        out, sT = m(x, s0, lengths=lengths)
        y1, s1 = l1(x, tuple(s[:D] for s in s0), lengths=lengths)
        y2, s2 = l2(y1, tuple(s[D:] for s in s0), lengths=lengths)
    assert_close(out, y2, 1e-12, "stack output")
    for field, got, a, b in zip(HyperLSTMState._fields, sT, s1, s2):
        assert_close(got, torch.cat([a, b]), 1e-12, f"final {field}")
    assert m.cells[D].cfg.input_size == D * H


def test_batch_first():
    m = ref_model(num_layers=2, bidirectional=True)
    mb = copy.deepcopy(m)
    mb.batch_first = True
    T, B = 5, 3
    x = torch.randn(T, B, 7, dtype=F64)
    s0 = rand_state(m, B)
    with torch.no_grad():
        out, sT = m(x, s0, lengths=[5, 2, 4])
        outb, sTb = mb(x.transpose(0, 1).contiguous(), s0, lengths=[5, 2, 4])  # state stays [L, B, *]
    assert outb.shape == (B, T, 18)
    assert torch.equal(outb, out.transpose(0, 1))
    assert all(torch.equal(p, q) for p, q in zip(sT, sTb))


def test_unbatched_input():
    m = ref_model(num_layers=2, bidirectional=True)
    T = 5
    x = torch.randn(T, 7, dtype=F64)
    s0 = rand_state(m, 1)
    with torch.no_grad():
        out, sT = m(x, tuple(s[:, 0] for s in s0))
        want, ws = m(x[:, None], s0)
        out0, _ = m(x)
    assert out.shape == (T, 18)
    assert all(s.shape == (4, n) for s, n in zip(sT, (9, 9, 5, 5)))
    assert_close(out, want[:, 0], 1e-12, "unbatched output")
    assert_state_close(sT, tuple(s[:, 0] for s in ws), 1e-12, "unbatched state")
    assert out0.shape == (T, 18)
    # the cell, unbatched
    cell = m.cells[0]
    with torch.no_grad():
        h, s = cell(x[0], tuple(t[0, 0] for t in s0))
        hb, sb = cell(x[:1], tuple(t[0, :1] for t in s0))
    assert h.shape == (9,) and s.h_hat.shape == (5,)
    assert_close(h, hb[0], 1e-12, "unbatched cell")


# --- dropout ---------------------------------------------------------------------------------------

def test_dropout_and_recurrent_dropout_are_no_ops_in_eval_and_active_in_train():
    drop = ref_model(num_layers=2, dropout=0.5, recurrent_dropout=0.4)
    plain = ref_model(num_layers=2)
    plain.load_state_dict(drop.state_dict())
    x = torch.randn(6, 3, 7, dtype=F64)
    drop.eval()
    with torch.no_grad():
        a, sa = drop(x)
        b, sb = plain(x)
    assert torch.equal(a, b) and all(torch.equal(p, q) for p, q in zip(sa, sb))
    drop.train()
    with torch.no_grad():
        c, _ = drop(x)
    assert rel_err(c, b) > 1e-3
    # each one alone changes the output in train mode
    only_inter = ref_model(num_layers=2, dropout=0.5).train()
    only_inter.load_state_dict(drop.state_dict())
    only_rec, rec_plain = ref_model(recurrent_dropout=0.4).train(), ref_model()
    only_rec.cells[0].load_state_dict(drop.cells[0].state_dict())
    rec_plain.cells[0].load_state_dict(drop.cells[0].state_dict())
    with torch.no_grad():
        assert rel_err(only_inter(x)[0], b) > 1e-3
        assert rel_err(only_rec(x)[0], rec_plain(x)[0]) > 1e-3
    # inter-layer dropout only between layers: a 1-layer model ignores it even in train
    one = ref_model(dropout=0.5).train()
    one_plain = ref_model()
    one_plain.load_state_dict(one.state_dict())
    with torch.no_grad():
        assert torch.equal(one(x)[0], one_plain(x)[0])


# --- bad input ------------------------------------------------------------------------------------

def _bad_model():
    return ref_model(num_layers=2)  # X=7, H=9, Hh=5, L=2


def _ok_state(B=3):
    return [torch.zeros(2, B, n, dtype=F64) for n in (9, 9, 5, 5)]


def _state_with(i, t):
    s = _ok_state()
    s[i] = t
    return tuple(s)


X_OK = lambda: torch.randn(4, 3, 7, dtype=F64)  # noqa: E731

BAD_INPUTS = [
    # id, call(model), exception type, words the message must contain
    ("rank4", lambda m: m(torch.randn(2, 4, 3, 7, dtype=F64)), ValueError, ["input", "shape"]),
    ("rank1", lambda m: m(torch.randn(7, dtype=F64)), ValueError, ["input"]),
    ("features", lambda m: m(torch.randn(4, 3, 6, dtype=F64)), ValueError, ["input", "input_size", "7"]),
    ("dtype", lambda m: m(torch.randn(4, 3, 7)), TypeError, ["input", "dtype"]),
    ("int_dtype", lambda m: m(torch.ones(4, 3, 7, dtype=torch.int64)), TypeError, ["input", "dtype"]),
    ("device", lambda m: m(torch.empty(4, 3, 7, dtype=F64, device="meta")), ValueError, ["input", "device"]),
    ("not_tensor", lambda m: m([[0.0] * 7] * 4), TypeError, ["input"]),
    ("empty_batch", lambda m: m(torch.randn(4, 0, 7, dtype=F64)), ValueError, ["input"]),
    ("T0", lambda m: m(torch.randn(0, 3, 7, dtype=F64)), ValueError, ["input"]),
    ("state_type_tensor", lambda m: m(X_OK(), torch.zeros(2, 3, 9, dtype=F64)), TypeError, ["hx"]),
    ("state_len3", lambda m: m(X_OK(), tuple(_ok_state()[:3])), TypeError, ["hx"]),
    ("state_field_type", lambda m: m(X_OK(), _state_with(1, [[0.0]])), TypeError, ["hx.c"]),
    ("state_h_layers", lambda m: m(X_OK(), _state_with(0, torch.zeros(1, 3, 9, dtype=F64))), ValueError, ["hx.h", "shape"]),
    ("state_c_batch", lambda m: m(X_OK(), _state_with(1, torch.zeros(2, 4, 9, dtype=F64))), ValueError, ["hx.c", "shape"]),
    ("state_h_hat_size", lambda m: m(X_OK(), _state_with(2, torch.zeros(2, 3, 9, dtype=F64))), ValueError, ["hx.h_hat", "shape"]),
    ("state_c_hat_rank", lambda m: m(X_OK(), _state_with(3, torch.zeros(3, 5, dtype=F64))), ValueError, ["hx.c_hat", "shape"]),
    ("state_dtype", lambda m: m(X_OK(), _state_with(0, torch.zeros(2, 3, 9))), TypeError, ["hx.h", "dtype"]),
    ("state_device", lambda m: m(X_OK(), _state_with(2, torch.zeros(2, 3, 5, dtype=F64, device="meta"))), ValueError, ["hx.h_hat", "device"]),
    ("lengths_zero", lambda m: m(X_OK(), lengths=[4, 0, 2]), ValueError, ["lengths"]),
    ("lengths_too_long", lambda m: m(X_OK(), lengths=[4, 5, 2]), ValueError, ["lengths"]),
    ("lengths_count", lambda m: m(X_OK(), lengths=[4, 2]), ValueError, ["lengths"]),
    ("lengths_float", lambda m: m(X_OK(), lengths=torch.tensor([4.0, 2.0, 1.0])), TypeError, ["lengths"]),
    ("lengths_2d", lambda m: m(X_OK(), lengths=torch.tensor([[4, 2, 1]])), TypeError, ["lengths"]),
    ("lengths_negative", lambda m: m(X_OK(), lengths=[4, -1, 2]), ValueError, ["lengths"]),
]


@pytest.mark.parametrize("call,exc,words", [b[1:] for b in BAD_INPUTS], ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_clear_error(call, exc, words):
    m = _bad_model()
    with pytest.raises(exc) as info:
        call(m)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} does not name {w!r}"


BAD_CELL_INPUTS = [
    ("rank3", lambda c: c(torch.randn(1, 3, 7, dtype=F64)), ValueError, ["input"]),
    ("features", lambda c: c(torch.randn(3, 6, dtype=F64)), ValueError, ["input", "input_size"]),
    ("dtype", lambda c: c(torch.randn(3, 7)), TypeError, ["input", "dtype"]),
    ("device", lambda c: c(torch.empty(3, 7, dtype=F64, device="meta")), ValueError, ["input", "device"]),
    ("empty_batch", lambda c: c(torch.randn(0, 7, dtype=F64)), ValueError, ["input"]),
    ("state_type", lambda c: c(torch.randn(3, 7, dtype=F64), torch.zeros(3, 9, dtype=F64)), TypeError, ["hx"]),
    ("state_shape", lambda c: c(torch.randn(3, 7, dtype=F64), tuple(torch.zeros(3, n, dtype=F64) for n in (9, 8, 5, 5))),
     ValueError, ["hx.c", "shape"]),
]


@pytest.mark.parametrize("call,exc,words", [b[1:] for b in BAD_CELL_INPUTS], ids=[b[0] for b in BAD_CELL_INPUTS])
def test_bad_cell_input_raises_clear_error(call, exc, words):
    cell = _bad_model().cells[0]
    with pytest.raises(exc) as info:
        call(cell)
    msg = str(info.value)
    for w in words:
        assert w in msg, f"message {msg!r} does not name {w!r}"


BAD_CONSTRUCTION = [
    ("hidden_size", lambda: HyperLSTM(3, 0), ValueError, "hidden_size"),
    ("input_size", lambda: HyperLSTM(-1, 4), ValueError, "input_size"),
    ("hyper_size", lambda: HyperLSTM(3, 4, hyper_size=2.5), TypeError, "hyper_size"),  # nn.LSTM: TypeError for a non-int size
    ("embed_size", lambda: HyperLSTMCell(3, 4, embed_size=0), ValueError, "embed_size"),
    ("num_layers", lambda: HyperLSTM(3, 4, num_layers=0), ValueError, "num_layers"),
    ("dropout", lambda: HyperLSTM(3, 4, dropout=1.5), ValueError, "dropout"),
    ("recurrent_dropout", lambda: HyperLSTM(3, 4, recurrent_dropout=1.0), ValueError, "recurrent_dropout"),
    ("backend", lambda: HyperLSTM(3, 4, backend="nope"), ValueError, "backend"),
]


@pytest.mark.parametrize("make,exc,word", [b[1:] for b in BAD_CONSTRUCTION], ids=[b[0] for b in BAD_CONSTRUCTION])
def test_bad_construction_raises_clear_error(make, exc, word):
    with pytest.raises(exc, match=word):
        make()


def test_backend_attribute_validated_on_set():
    m = ref_model()
    with pytest.raises(ValueError, match="backend"):
        m.backend = "cuda-magic"
    assert m.backend == "reference"


# --- a long sequence -----------------------------------------------------------------------------

def test_10000_steps_stay_finite_and_torch_backend_matches_reference():
    X, H, Hh, E, B, T = 3, 8, 4, 2, 2, 10_000
    ref = randomize_(HyperLSTM(X, H, hyper_size=Hh, embed_size=E, backend="reference", dtype=F64),
                     torch.Generator().manual_seed(7))
    fast = copy.deepcopy(ref)
    fast.backend = "torch"
    x = torch.randn(T, B, X, dtype=F64)
    s0 = rand_state(ref, B)
    with torch.inference_mode():
        want, ws = ref(x, s0)
    assert bool(torch.isfinite(want).all()) and all(bool(torch.isfinite(s).all()) for s in ws)
    assert float(want[-100:].std()) > 1e-3  # still moving after 10,000 steps (not saturated / dead)

    xg = x.clone().requires_grad_()
    sg = tuple(s.clone().requires_grad_() for s in s0)
    got, gs = fast(xg, sg)
    assert bool(torch.isfinite(got).all())
    assert_close(got, want, 1e-9, "10k-step output")
    assert_state_close(gs, ws, 1e-9, "10k-step final state")
    loss = got[-1].sum() + got[::97].pow(2).sum() + sum(s.sum() for s in gs)
    grads = torch.autograd.grad(loss, [xg, *sg, *fast.parameters()])
    for g in grads:
        assert bool(torch.isfinite(g).all())
    assert float(grads[0][0].abs().max()) > 0 or float(grads[0][-1].abs().max()) > 0
