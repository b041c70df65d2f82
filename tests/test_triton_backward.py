"""Triton backward (BPTT) of the HyperLSTM (issue 4) against float64 reference autograd.

Without a GPU the kernels run in the Triton interpreter on CPU tensors (conftest sets
TRITON_INTERPRET=1). Gradients of the input, the initial state and every parameter are compared
with the float64 reference's autograd at odd sizes (nothing a multiple of a block), with and
without layer norm, multi-layer, bidirectional, variable length, recurrent dropout (given masks, and
seeded: the kernels draw the masks with tl.rand and the reference rebuilds the same ones); plus
NaN guard zones around every buffer, launch counting and bitwise determinism.
"""
from __future__ import annotations

import contextlib
import functools
import os

import pytest
import torch

from conftest import (MASK_KINDS, cell_params, count_launches, kernel_tol, layer_pair, masks_to, rel_err,
                      sequence_inputs)
from hyperkern import HyperLSTM
from hyperkern.ops.hyper_lstm import naive
from hyperkern.ops.hyper_lstm.common import CellConfig
from hyperkern.testing import randomize_

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = torch.device("cuda" if CUDA else "cpu")
# gradient tolerances (hyperkern.ops.precision): the interpreter's exact dots, or the GPU's dot policy
GTOL = {dt: kernel_tol(dt).grad for dt in (torch.float32, torch.float16)}

from hyperkern.ops.hyper_lstm import fused_triton  # noqa: E402

ODD = dict(input_size=7, hidden_size=33, hyper_size=10, embed_size=3)


# --- helpers ---------------------------------------------------------------------------------

def _pair(dtype, seed=0, **kw):
    """(float64 reference layer, the same parameters in ``dtype`` with backend='triton')."""
    return layer_pair(dtype, "triton", DEVICE, seed, **kw)


def _layer_grads(layer, x, state, lengths, dtype, seed):
    """Output, final state and the gradients of a fixed random functional of both w.r.t. the
    input, the initial state and every parameter."""
    x = x.to(DEVICE, dtype).requires_grad_()
    st = None if state is None else tuple(s.to(DEVICE, dtype).requires_grad_() for s in state)
    out, fin = layer(x, st, lengths=lengths)
    g = torch.Generator().manual_seed(seed)
    loss = (out.double().cpu() * torch.randn(out.shape, generator=g, dtype=torch.float64)).sum()
    for f in fin:
        loss = loss + (f.double().cpu() * torch.randn(f.shape, generator=g, dtype=torch.float64)).sum()
    names = [n for n, _ in layer.named_parameters()]
    leaves = [x] + ([] if st is None else list(st)) + [p for _, p in layer.named_parameters()]
    grads = torch.autograd.grad(loss, leaves)
    return ["input"] + ([] if st is None else ["h0", "c0", "h_hat0", "c_hat0"]) + names, grads


def _compare(names, got, want, tol):
    assert len(got) == len(want) == len(names)
    bad = []
    for n, g, w in zip(names, got, want):
        assert g is not None, n
        assert torch.isfinite(g.double()).all(), n
        assert float(w.abs().max()) > 0, f"{n}: reference gradient is zero (test would be vacuous)"
        e = rel_err(g.cpu(), w)
        if e > tol:
            bad.append(f"{n}: {e:.3g}")
    assert not bad, f"gradients above {tol}: {bad}"


def _states(L, B, H, Hh, seed=1):
    g = torch.Generator().manual_seed(seed)
    return tuple(0.5 * torch.randn(L, B, n, generator=g, dtype=torch.float64) for n in (H, H, Hh, Hh))


# --- the layer through backend="triton" ------------------------------------------------------

@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_layer_grads_odd_sizes_with_initial_state(layer_norm):
    T, B = 5, 3
    ref, fast = _pair(torch.float32, seed=30, layer_norm=layer_norm, **ODD)
    x = torch.randn(T, B, ODD["input_size"], generator=torch.Generator().manual_seed(31), dtype=torch.float64)
    state = _states(1, B, ODD["hidden_size"], ODD["hyper_size"], seed=32)
    names, want = _layer_grads(ref, x, state, None, torch.float64, 33)
    _, got = _layer_grads(fast, x, state, None, torch.float32, 33)
    _compare(names, got, want, GTOL[torch.float32])


def test_layer_grads_two_layers_bidirectional_variable_length():
    """Unsorted lengths (the layer sorts them), two layers, both directions, layer norm."""
    T, B = 4, 3
    ref, fast = _pair(torch.float32, seed=34, num_layers=2, bidirectional=True, **ODD)
    x = torch.randn(T, B, ODD["input_size"], generator=torch.Generator().manual_seed(35), dtype=torch.float64)
    state = _states(4, B, ODD["hidden_size"], ODD["hyper_size"], seed=36)
    lengths = torch.tensor([2, 4, 3])
    names, want = _layer_grads(ref, x, state, lengths, torch.float64, 37)
    _, got = _layer_grads(fast, x, state, lengths, torch.float32, 37)
    _compare(names, got, want, GTOL[torch.float32])


def test_layer_grads_fp16():
    T, B = 3, 3
    ref, fast = _pair(torch.float16, seed=38, **ODD)
    x = torch.randn(T, B, ODD["input_size"], generator=torch.Generator().manual_seed(39), dtype=torch.float64)
    names, want = _layer_grads(ref, x, None, None, torch.float64, 40)
    _, got = _layer_grads(fast, x, None, None, torch.float16, 40)
    assert all(g.dtype == torch.float16 for g in got)
    _compare(names, got, want, GTOL[torch.float16])


@pytest.mark.parametrize("B,kw", [
    (2, dict(input_size=5, hidden_size=130, hyper_size=129, embed_size=5)),  # BN=128: two chunks per row
    (33, dict(input_size=9, hidden_size=70, hyper_size=65, embed_size=2)),   # BMC=2, BN=64, gates BM=64
], ids=["B2-H130", "B33-H70"])
def test_multi_chunk_rows_and_block_configs(B, kw):
    """Rows longer than one column chunk (chunked LN statistics and sums in every pass) at every
    row of the backward dispatcher's cell table, with variable lengths."""
    T = 2
    cfg = CellConfig(**kw)
    p = cell_params(cfg, 41)
    x, st, _ = sequence_inputs(cfg, T, B, 42)
    lengths = torch.sort(torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(43)),
                         descending=True).values
    lengths[0] = T
    want = _backend_grads(naive.hyper_lstm_sequence, x, st, p, cfg, lengths, None, torch.float64, 44)
    got = _backend_grads(fused_triton.hyper_lstm_sequence, x, st, p, cfg, lengths, None, torch.float32, 44)
    _compare(list(want), list(got.values()), list(want.values()), GTOL[torch.float32])


# --- the backend entry points: masks, NaN guard zones, launches, determinism -------------------

def _upstream(T, B, cfg, seed):
    g = torch.Generator().manual_seed(seed)
    d_out = torch.randn(T, B, cfg.hidden_size, generator=g, dtype=torch.float64)
    d_fin = tuple(torch.randn(B, n, generator=g, dtype=torch.float64)
                  for n in (cfg.hidden_size, cfg.hidden_size, cfg.hyper_size, cfg.hyper_size))
    return d_out, d_fin


def _backend_grads(fn, x, st, p, cfg, lengths, masks, dtype, seed):
    """{name: grad} of <d_out, out> + <d_fin, final state> through a backend function."""
    cv = lambda t: t.to(DEVICE, dtype).clone().requires_grad_()  # noqa: E731
    xs, ss, ps = cv(x), tuple(map(cv, st)), {n: cv(v) for n, v in p.items()}
    out, fin = fn(xs, ss, ps, cfg, lengths, masks_to(masks, DEVICE, dtype))
    d_out, d_fin = _upstream(x.shape[0], x.shape[1], cfg, seed)
    leaves = [xs, *ss, *ps.values()]
    grads = torch.autograd.grad([out, *fin], leaves, [d_out.to(out), *(d.to(out) for d in d_fin)])
    return dict(zip(["input", "h0", "c0", "h_hat0", "c_hat0", *ps], grads))


@pytest.mark.parametrize("masks_kind", MASK_KINDS)
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_nan_guard_zones_lengths_and_dropout_masks(layer_norm, masks_kind):
    """The backward launcher with NaN guard zones around every buffer and parameter copy, every
    per-step gradient buffer (and the seeded-mask scratch) starting as NaN (each row must be
    written), recurrent dropout and variable length; gradients against float64 reference autograd."""
    cfg = CellConfig(**ODD, layer_norm=layer_norm, forget_bias=0.4, ln_eps=1e-2)
    T, B = 4, 3
    p = cell_params(cfg, 45)
    x, st, masks = sequence_inputs(cfg, T, B, 46, dropout=0.4, seeded=masks_kind == "seeded")
    lengths = torch.tensor([4, 3, 1])
    want = _backend_grads(naive.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float64, 47)

    f32 = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    xd, std, pd = f32(x), tuple(map(f32, st)), {n: f32(v) for n, v in p.items()}
    md = masks_to(masks, DEVICE, torch.float32)
    _, _, fbuf = fused_triton.run_sequence(xd, std, pd, cfg, lengths, md, guard=5, save=True)
    assert fbuf.check_guards() == []
    d_out, d_fin = _upstream(T, B, cfg, 47)
    big = torch.full((T + 2, B + 2, cfg.hidden_size + 8), float("nan"), dtype=torch.float32, device=DEVICE)
    d_out_view = big[1:T + 1, 1:B + 1, 3:3 + cfg.hidden_size]
    d_out_view.copy_(d_out)
    dx, d_state, grads, bbuf = fused_triton.run_backward(xd, pd, cfg, fbuf.saved, d_out_view,
                                                         tuple(map(f32, d_fin)), guard=5)
    assert bbuf.check_guards() == []
    assert len(bbuf._full) >= 15  # every buffer really is guarded
    got = {"input": dx, "h0": d_state[0], "c0": d_state[1], "h_hat0": d_state[2], "c_hat0": d_state[3], **grads}
    assert list(got) == list(want)
    _compare(list(want), list(got.values()), list(want.values()), GTOL[torch.float32])


@pytest.mark.parametrize("masks_kind", MASK_KINDS)
def test_dropout_masks_matter_in_backward(masks_kind):
    """A test that could not fail would be a defect: the backward must use the masks."""
    cfg = CellConfig(**ODD)
    p = cell_params(cfg, 48)
    x, st, masks = sequence_inputs(cfg, 3, 2, 49, dropout=0.5, seeded=masks_kind == "seeded")
    a = _backend_grads(fused_triton.hyper_lstm_sequence, x, st, p, cfg, None, masks, torch.float32, 50)
    b = _backend_grads(fused_triton.hyper_lstm_sequence, x, st, p, cfg, None, None, torch.float32, 50)
    assert rel_err(a["weight_hh"].cpu(), b["weight_hh"].cpu()) > 1e-2


def _count_launches(monkeypatch):
    from hyperkern.kernels import hyper_lstm_bwd as kb
    from hyperkern.kernels import hyper_lstm_fwd as kf

    return count_launches(monkeypatch, (kf.hyper_lstm_gates_kernel, kf.hyper_lstm_cell_kernel,
                                        kb.hyper_lstm_cell_bwd_kernel, kb.hyper_lstm_gates_bwd_kernel))


@pytest.mark.parametrize("dropout", [None, "seeded"], ids=["nodrop", "seeded"])
def test_backward_launches_per_step(monkeypatch, dropout):
    """(backward launches at T=6 - at T=3) / 3: exactly 2 per step (issue: at most 4), nothing
    launched outside the loop; seeded recurrent dropout adds no launch (drawn inside the cell
    kernels) — and what the performance model charges."""
    from hyperkern import perf_model as pm

    counts = _count_launches(monkeypatch)
    cfg = CellConfig(input_size=5, hidden_size=16, hyper_size=8, embed_size=2)
    p = cell_params(cfg, 51)
    per_T = {}
    for T in (3, 6):
        x, st, masks = sequence_inputs(cfg, T, 2, 52, dropout=0.3 if dropout else 0.0, seeded=True)
        cv = lambda t: t.to(DEVICE, torch.float32).requires_grad_()  # noqa: E731
        xs, ps = cv(x), {n: cv(v) for n, v in p.items()}
        out, fin = fused_triton.hyper_lstm_sequence(xs, tuple(s.to(DEVICE, torch.float32) for s in st), ps, cfg,
                                                    None, masks_to(masks, DEVICE, torch.float32))
        counts.clear()
        torch.autograd.grad(out.sum() + fin[1].sum(), [xs, *ps.values()])
        assert all("bwd" in c for c in counts)
        per_T[T] = len(counts)
    per_step = (per_T[6] - per_T[3]) / 3
    assert per_step == 2
    assert per_T[3] == 3 * per_step
    assert pm.launches_per_step(pm.Shape("t", X=5, H=16, Hh=8, E=2, B=2, T=6), "fp32")[1] == per_step


@pytest.mark.parametrize("masks_kind", MASK_KINDS)
def test_backward_is_bitwise_deterministic(masks_kind):
    """Two backward passes over the same graph (retain_graph) and a second forward+backward give
    bitwise-identical gradients: no atomics, fixed reduction orders (seeded: the same masks drawn
    again each time)."""
    cfg = CellConfig(**ODD)
    p = cell_params(cfg, 53)
    x, st, masks = sequence_inputs(cfg, 4, 3, 54, dropout=0.3, seeded=masks_kind == "seeded")
    cv = lambda t: t.to(DEVICE, torch.float32).requires_grad_()  # noqa: E731
    xs, ss, ps = cv(x), tuple(map(cv, st)), {n: cv(v) for n, v in p.items()}
    ms = masks_to(masks, DEVICE, torch.float32)
    leaves = [xs, *ss, *ps.values()]
    out, fin = fused_triton.hyper_lstm_sequence(xs, ss, ps, cfg, torch.tensor([4, 4, 2]), ms)
    loss = (out * out).sum() + sum((f * f).sum() for f in fin)
    g1 = torch.autograd.grad(loss, leaves, retain_graph=True)
    g2 = torch.autograd.grad(loss, leaves)
    out, fin = fused_triton.hyper_lstm_sequence(xs, ss, ps, cfg, torch.tensor([4, 4, 2]), ms)
    g3 = torch.autograd.grad((out * out).sum() + sum((f * f).sum() for f in fin), leaves)
    for a, b, c in zip(g1, g2, g3):
        assert torch.equal(a, b) and torch.equal(a, c)
    assert any(float(a.abs().max()) > 0 for a in g1)


# --- torch.library registration, torch.compile -------------------------------------------------

def _op_args(requires_grad: bool, save: bool, seeded: bool = False, cuda_graphs: bool = True):
    cfg = CellConfig(input_size=3, hidden_size=5, hyper_size=4, embed_size=2)
    g = torch.Generator().manual_seed(55)
    P = [(0.3 * torch.randn(s, generator=g)).to(DEVICE).requires_grad_(requires_grad)
         for s in cfg.param_shapes().values()]
    x = torch.randn(2, 2, 3, generator=g).to(DEVICE).requires_grad_(requires_grad)
    st = [(0.5 * torch.randn(2, n, generator=g)).to(DEVICE) for n in (5, 5, 4, 4)]
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE) if seeded else None
    return (x, *st, P, None, None, None, seed, 0.25 if seeded else 0.0, 5, 4, 2, True, 1.0, 1e-3, save, cuda_graphs)


@pytest.mark.parametrize("graphs", ["eager", "replayed"])
@pytest.mark.parametrize("seeded", [False, True], ids=["nodrop", "seeded"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_custom_op_opcheck(requires_grad, seeded, graphs, request):
    """torch.library.opcheck: schema, fake (meta) implementation, autograd registration and AOT
    dispatch of hyperkern::hyper_lstm_triton (with and without a dropout seed); "replayed": with
    whole-call graphs (the CPU stand-in capture, ``hyperkern.testing.RerunCapture``), so opcheck's repeated calls
    run through the capture and the replays, forward and backward."""
    if graphs == "replayed":
        request.getfixturevalue("rerun_graphs")
    torch.library.opcheck(torch.ops.hyperkern.hyper_lstm_triton.default,
                          _op_args(requires_grad, requires_grad, seeded, cuda_graphs=graphs == "replayed"))


def test_torch_compile_fullgraph_matches_eager():
    """torch.compile(fullgraph=True) of a function using the layer (backend="triton") traces the
    whole layer with the op as one node (fullgraph raises on any graph break) and gives the eager
    loss and gradients. aot_eager: the op's kernels run as in eager (interpreter on CPU). Recurrent
    dropout on: the seed is drawn inside the graph, so the same torch.manual_seed gives the same masks."""
    torch._dynamo.reset()
    layer = HyperLSTM(3, 5, hyper_size=4, embed_size=2, recurrent_dropout=0.3, backend="triton").to(DEVICE)
    randomize_(layer, torch.Generator().manual_seed(56))
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(57)).to(DEVICE)

    def f(inp):
        out, st = layer(inp)
        return (out * out).sum() + st.c.sum()

    xe = x.clone().requires_grad_()
    torch.manual_seed(3)
    le = f(xe)
    ge = torch.autograd.grad(le, [xe, *layer.parameters()])
    cf = torch.compile(f, backend="aot_eager", fullgraph=True)
    xc = x.clone().requires_grad_()
    torch.manual_seed(3)
    lc = cf(xc)
    gc = torch.autograd.grad(lc, [xc, *layer.parameters()])
    assert torch.equal(le.detach(), lc.detach())
    for a, b in zip(ge, gc):
        assert torch.equal(a, b)
    torch._dynamo.reset()


# --- recompute mode ----------------------------------------------------------------------------

@pytest.mark.parametrize("masks_kind", MASK_KINDS)
def test_recompute_mode_bitwise_equal_and_saves_less(monkeypatch, masks_kind):
    """Recompute mode keeps only the states; its backward re-runs the forward kernels per step
    (4 launches per step) and gives bitwise the same gradients as the default mode."""
    cfg = CellConfig(**ODD)
    p = cell_params(cfg, 58)
    x, st, masks = sequence_inputs(cfg, 3, 3, 59, dropout=0.3, seeded=masks_kind == "seeded")
    lengths = torch.tensor([3, 2, 1])
    full = _backend_grads(fused_triton.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float32, 60)
    counts = _count_launches(monkeypatch)
    recomputing = functools.partial(fused_triton.hyper_lstm_sequence, recompute=True)
    re = _backend_grads(recomputing, x, st, p, cfg, lengths, masks, torch.float32, 60)
    assert len(counts) == 3 * 2 + 3 * 4  # forward 2 per step; backward 2 recompute + 2 backward per step
    from hyperkern import perf_model as pm

    assert sum(pm.launches_per_step(pm.Shape("t", X=7, H=33, Hh=10, E=3, B=3, T=3), "fp32")) == 4
    for n in full:
        assert torch.equal(full[n], re[n]), n
    # what is kept between forward and backward
    f32 = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    args = (f32(x), tuple(map(f32, st)), {n: f32(v) for n, v in p.items()}, cfg)
    kept = {mode: sum(t.numel() * t.element_size() for n, t in
                      fused_triton.run_sequence(*args, save=mode)[2].saved.items() if isinstance(t, torch.Tensor))
            for mode in ("full", "states")}
    T, B, H, Hh, E = 3, 3, cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    lens = 4 * B
    assert kept["states"] == 4 * (B * (T + 1) * (2 * H + 2 * Hh)) + lens
    assert kept["full"] == kept["states"] + 4 * T * B * (4 * H + 4 * H + 4 * Hh + 12 * E + 4 * H + 4 * Hh)


@pytest.mark.parametrize("masks_kind", MASK_KINDS)
def test_recompute_mode_with_guards(masks_kind):
    cfg = CellConfig(**ODD, layer_norm=False)
    T, B = 3, 2
    p = cell_params(cfg, 61)
    x, st, masks = sequence_inputs(cfg, T, B, 62, dropout=0.3, seeded=masks_kind == "seeded")
    lengths = torch.tensor([3, 2])
    want = _backend_grads(naive.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float64, 63)
    f32 = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    xd, std, pd = f32(x), tuple(map(f32, st)), {n: f32(v) for n, v in p.items()}
    md = masks_to(masks, DEVICE, torch.float32)
    _, _, fbuf = fused_triton.run_sequence(xd, std, pd, cfg, lengths, md, guard=3, save="states")
    assert "P" not in fbuf.saved and "XP" not in fbuf.saved
    d_out, d_fin = _upstream(T, B, cfg, 63)
    dx, d_state, grads, bbuf = fused_triton.run_backward(xd, pd, cfg, fbuf.saved, f32(d_out),
                                                         tuple(map(f32, d_fin)), guard=3)
    assert bbuf.check_guards() == [] and fbuf.check_guards() == []
    got = {"input": dx, "h0": d_state[0], "c0": d_state[1], "h_hat0": d_state[2], "c_hat0": d_state[3], **grads}
    _compare(list(want), list(got.values()), list(want.values()), GTOL[torch.float32])


# --- compile check (no GPU needed: AOT compile + ptxas) -----------------------------------------

def test_compile_check_backward_subset(tmp_path):
    """The heaviest backward configurations (largest tiles, most registers, widest BE) for sm_80
    and sm_90: compile, 0 spills, shared memory under the limit. ``python -m hyperkern
    compile-check`` covers every backward launch (tests/test_triton_configs.py: all of them)."""
    from conftest import run_compile_check
    from hyperkern.ops.hyper_lstm.fused_triton import configs

    edges = configs.batch_edges()
    subset = []
    for B, E, dtype, dot, ln, drop, which in (
        (edges[1], 1, "fp32", "ieee", True, 0, 1),     # gates-backward, fp32 on the CUDA cores: most registers
        (edges[-1], 1, "bf16", "bf16", True, 0, 1),    # gates-backward, largest tile
        (1, 64, "fp32", "tf32", True, 2, 0),           # cell-backward: longest chunks, widest BE, seeded dropout
        (edges[-1], 64, "fp16", "fp16", False, 1, 0),  # cell-backward: most rows per program
    ):
        launch = configs.backward_launches(B, E, dtype, dot, ln, drop)[which]
        subset.append(f"{launch.kernel} [{launch.label}]")
    rows, _ = run_compile_check(subset, tmp_path)
    assert len(rows) == 2 * len(subset)
    assert {r["arch"] for r in rows} == {80, 90}
    for r in rows:
        assert r["error"] is None
        assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert 0 < r["registers"] <= 255
        assert r["shared"] <= {80: 166_912, 90: 232_448}[r["arch"]]


def test_perf_model_backward_rows():
    """The backward rows of the performance model: saved bytes equal to what run_sequence really
    keeps, the loop's GEMM FLOPs above the forward's recurrent ones (the launches per step are
    checked against the measured ones in the launch-counting tests)."""
    from hyperkern import perf_model as pm

    rs = pm.rows_bwd()
    assert len(rs) == 2 * len(pm.SHAPES)
    for r in rs:
        assert 0 < r["pred_us_step"] < r["pred_us_step_recompute"]
        assert r["saved_bytes_step_recompute"] < r["saved_bytes_step"]
        assert r["flops_step"] > r["flops_loop_step"] > 0
    s = pm.Shape("t", X=7, H=33, Hh=10, E=3, B=3, T=4)
    cfg = CellConfig(7, 33, 10, 3)
    f32 = lambda t: t.to(DEVICE, torch.float32)  # noqa: E731
    x, st, _ = sequence_inputs(cfg, s.T, s.B, 64)
    p = {n: f32(v) for n, v in cell_params(cfg, 65).items()}
    for mode in ("full", "states"):
        saved = fused_triton.run_sequence(f32(x), tuple(map(f32, st)), p, cfg, save=mode)[2].saved
        kept = sum(t.numel() * t.element_size() for n, t in saved.items()
                   if n in ("P", "G", "AH", "Z", "XP", "H", "C", "HH", "CH"))
        states_extra = s.B * (2 * s.H + 2 * s.Hh) * 4  # the [T+1] state buffers hold the initial state too
        assert kept == s.T * pm.saved_bytes_per_step(s, mode) + states_extra
    fl = pm.flops_per_step_bwd(s)
    fwd = pm.flops_per_step(s)
    assert fl["loop"] > 8 * s.B * s.H * s.H and fl["post"] > fwd["hoisted"]


# --- float64 through the kernels: gradcheck ---------------------------------------------------

@contextlib.contextmanager
def float64_kernels():
    """The test mode in which the interpreter runs the kernels on float64 CPU tensors (their state,
    scratch and accumulators take the buffers' dtype): float64 added to the launcher's interpreter
    dtypes for the block. Users cannot reach it; gradcheck through the kernels needs it."""
    mp = pytest.MonkeyPatch()
    mp.setattr(fused_triton.launch, "INTERPRETER_DTYPES", fused_triton.launch.INTERPRETER_DTYPES + (torch.float64,))
    try:
        yield
    finally:
        mp.undo()


@pytest.fixture
def float64_kernel_mode():
    with float64_kernels():
        yield


@pytest.mark.skipif(CUDA, reason="float64 kernels are an interpreter-only test mode")
@pytest.mark.parametrize("layer_norm", [False, True], ids=["noln", "ln"])
def test_gradcheck_float64_through_the_kernels(layer_norm, float64_kernel_mode):
    """torch.autograd.gradcheck (float64) of the custom op, forward AND backward through the
    Triton kernels (interpreter, float64 state / accumulators), on a tiny cell with and without
    layer norm, with variable length and seeded recurrent dropout: input, initial state and every
    parameter. ``fast_mode`` (a random projection of the Jacobian per input tensor): full mode needs
    ~550 interpreted forwards (minutes; run once by hand, see docs/triton_backward.md); the float64
    comparison below covers every entry."""
    cfg = CellConfig(input_size=2, hidden_size=3, hyper_size=2, embed_size=1, layer_norm=layer_norm)
    T, B = 2, 2
    p = cell_params(cfg, 66)
    x, st, masks = sequence_inputs(cfg, T, B, 67, dropout=0.3, seeded=True)
    lengths = torch.tensor([2, 1])
    names = list(p)

    def f(x_, h0, c0, hh0, ch0, *flat):
        out, fin = fused_triton.hyper_lstm_sequence(x_, (h0, c0, hh0, ch0), dict(zip(names, flat)), cfg,
                                                    lengths, masks)
        return (out, *fin)

    leaves = [t.clone().requires_grad_() for t in (x, *st, *p.values())]
    assert torch.autograd.gradcheck(f, leaves, eps=1e-6, atol=1e-7, rtol=1e-5, fast_mode=True,
                                    check_undefined_grad=False)


@pytest.mark.skipif(CUDA, reason="float64 kernels are an interpreter-only test mode")
@pytest.mark.parametrize("masks_kind", MASK_KINDS)
def test_float64_kernels_match_reference_to_1e12(masks_kind):
    """With float64 state and accumulators the kernels agree with the float64 reference to
    rounding (so the fp32 tolerances above measure fp32 rounding, not a wrong formula)."""
    cfg = CellConfig(**ODD)
    p = cell_params(cfg, 68)
    x, st, masks = sequence_inputs(cfg, 3, 3, 69, dropout=0.3, seeded=masks_kind == "seeded")
    lengths = torch.tensor([3, 3, 1])
    want = _backend_grads(naive.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float64, 70)
    with float64_kernels():
        got = _backend_grads(fused_triton.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float64, 70)
    _compare(list(want), list(got.values()), list(want.values()), 1e-12)
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):  # outside the test mode
        _backend_grads(fused_triton.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float64, 70)


def test_recompute_is_the_layers_configuration(monkeypatch):
    """``HyperLSTM(..., recompute=True)`` (or the attribute) puts every cell of the layer in
    recompute mode: 4 backward launches per step instead of 2, and bitwise the same gradients."""
    layer = HyperLSTM(**ODD, num_layers=2, backend="triton").to(DEVICE)
    randomize_(layer, torch.Generator().manual_seed(71))
    x = torch.randn(3, 2, ODD["input_size"], generator=torch.Generator().manual_seed(72)).to(DEVICE)
    counts = _count_launches(monkeypatch)

    def grads():
        counts.clear()
        xs = x.clone().requires_grad_()
        out, st = layer(xs)
        g = torch.autograd.grad((out * out).sum() + st.c.sum(), [xs, *layer.parameters()])
        return g, len(counts) - 2 * 2 * 3  # launches after the forward's 2 per step, 2 layers, 3 steps
    g_full, n_full = grads()
    layer.recompute = True
    assert all(c.recompute for c in layer.cells)
    g_re, n_re = grads()
    assert all(torch.equal(a, b) for a, b in zip(g_full, g_re))
    assert (n_full, n_re) == (2 * 2 * 3, 4 * 2 * 3)  # per step, per layer: 2 backward (+2 recomputed forward)
    assert HyperLSTM(3, 5, recompute=True).cells[0].recompute is True
    with pytest.raises(ValueError, match="recompute must be True or False"):
        layer.recompute = "yes"
