"""The persistent HyperLSTM forward (issue 13, ``backend="triton_persistent"``) against the float64
reference, the per-step kernels, and its own never-hang protocol.

Without a GPU the kernel runs in the Triton interpreter (``TRITON_INTERPRET=1``, set by conftest)
with a grid of ONE program, which walks every product tile and every row block itself, so each
grid sync is met by its own arrival. Sizes are odd (X=7, H=33, Hh=10, E=3, B=3: H spans three
column tiles of 16, Hh one, every row its own block); a second shape takes another row of the
launch table (several rows per block, rows in several chunks). The timeout path is exercised with
syncs that cannot complete (more expected arrivals than programs; or two programs, which the
interpreter runs one after the other): the kernel gives up, raises its error flag, and the
launcher reruns the call with the per-step kernels after one warning.
"""
from __future__ import annotations

import os
import re
import warnings

import pytest
import torch

from conftest import MASK_KINDS, cell_params, count_launches, kernel_tol, layer_pair, masks_to, rel_err, sequence_inputs
from hyperkern.ops.hyper_lstm import naive
from hyperkern.ops.hyper_lstm.common import CellConfig

triton = pytest.importorskip("triton")

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(not (CUDA or INTERPRET), reason="needs CUDA or TRITON_INTERPRET=1")
DEVICE = torch.device("cuda" if CUDA else "cpu")

from hyperkern.ops.hyper_lstm import fused_triton  # noqa: E402  (after the skip checks)
from hyperkern.ops.hyper_lstm.fused_triton import persistent  # noqa: E402

ODD = dict(input_size=7, hidden_size=33, hyper_size=10, embed_size=3)
WIDE = dict(input_size=9, hidden_size=70, hyper_size=65, embed_size=5)  # B=33: BMC=2, BN=64, BM=32


@pytest.fixture(autouse=True)
def _fresh_warning(monkeypatch):
    """Each test sees the launcher's once-per-process warning as if first."""
    monkeypatch.setattr(persistent, "_warned", False)


def _dev(dtype, x, st, p, masks=None):
    cv = lambda t: t.to(DEVICE, dtype)  # noqa: E731
    return cv(x), tuple(map(cv, st)), {n: cv(v) for n, v in p.items()}, masks_to(masks, DEVICE, dtype)


def _check(out, fin, want_out, want_state, dtype):
    tol = kernel_tol(dtype).out
    assert torch.isfinite(out.double()).all()
    for name, g, w in zip(("out", "h", "c", "h_hat", "c_hat"), (out, *fin), (want_out, *want_state)):
        e = rel_err(g.cpu(), w)
        assert e <= tol, f"{name} rel err {e:.3g} > {tol}"


# --- forward against the float64 reference and the per-step kernels ---------------------------

@pytest.mark.parametrize("masks_kind", [None, *MASK_KINDS])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=["fp32", "fp16"])
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_forward_matches_reference_inside_nan_guards(layer_norm, dtype, masks_kind):
    """Odd sizes, an initial state, variable lengths, recurrent dropout (none, mask tensors, seeded:
    the kernel draws today's stream), every internal buffer and parameter copy inside NaN guard
    zones and the output a view into a NaN tensor: no guard written, the result the reference's —
    and bitwise the per-step kernels' (the same helpers, block sizes and order)."""
    cfg = CellConfig(**ODD, layer_norm=layer_norm, forget_bias=0.4, ln_eps=1e-2)
    T, B = 5, 3
    p = cell_params(cfg, 1)
    x, st, masks = sequence_inputs(cfg, T, B, 2, dropout=0.4 if masks_kind else 0.0, seeded=masks_kind == "seeded")
    lengths = torch.tensor([5, 3, 1])
    want_out, want_state = naive.hyper_lstm_sequence(x, st, p, cfg, lengths, masks)
    xd, std, pd, md = _dev(dtype, x, st, p, masks)
    big = torch.full((T + 2, B + 3, cfg.hidden_size + 11), float("nan"), dtype=dtype, device=DEVICE)
    out_view = big[1:T + 1, 2:B + 2, 5:5 + cfg.hidden_size]
    out, fin, buf = persistent.run_sequence(xd, std, pd, cfg, lengths, md, out=out_view, guard=7)
    assert not buf.persistent["fell_back"] and out.data_ptr() == out_view.data_ptr()
    assert buf.persistent["syncs_per_launch"] == 2 * T - 1
    inside = torch.zeros(big.shape, dtype=torch.bool)
    inside[1:T + 1, 2:B + 2, 5:5 + cfg.hidden_size] = True
    assert bool(torch.isnan(big.cpu()[~inside]).all()), "output guard zone written"
    assert buf.check_guards() == [] and {"H", "C", "HH", "CH", "P", "G", "AH", "Z", "xp", "weight_hh"} <= set(buf._full)
    _check(out, fin, want_out, want_state, dtype)
    if not CUDA:  # the interpreter's exact dots: bit for bit the per-step kernels
        ref_out, ref_fin, _ = fused_triton.run_sequence(xd, std, pd, cfg, lengths, md)
        assert torch.equal(out, ref_out) and all(torch.equal(a, b) for a, b in zip(fin, ref_fin))


def test_forward_other_table_row_several_row_blocks_and_chunks():
    """B=33 takes another launch-table row: 17 row blocks of 2 rows for the cell (one program walks
    them all), rows of H=70 and Hh=65 in two chunks, two 32-row product tiles (one partial)."""
    cfg = CellConfig(**WIDE)
    T, B = 2, 33
    p = cell_params(cfg, 3)
    x, st, _ = sequence_inputs(cfg, T, B, 4)
    lengths = torch.sort(torch.randint(1, T + 1, (B,), generator=torch.Generator().manual_seed(5)),
                         descending=True).values
    want_out, want_state = naive.hyper_lstm_sequence(x, st, p, cfg, lengths)
    out, fin, buf = persistent.run_sequence(*_dev(torch.float32, x, st, p)[:3], cfg, lengths, guard=3)
    assert buf.persistent["work"] == {"tiles": (5 + 5) * 2, "row_blocks": 17} and buf.check_guards() == []
    _check(out, fin, want_out, want_state, torch.float32)


@pytest.mark.skipif(CUDA, reason="float64 kernels are an interpreter-only test mode")
def test_float64_kernel_matches_reference_to_1e12(monkeypatch):
    """With float64 state and accumulators (the interpreter-only test mode) the persistent forward
    agrees with the float64 reference to rounding: the fp32 tolerance above measures rounding."""
    monkeypatch.setattr(fused_triton.launch, "INTERPRETER_DTYPES",
                        fused_triton.launch.INTERPRETER_DTYPES + (torch.float64,))
    cfg = CellConfig(**ODD)
    p = cell_params(cfg, 6)
    x, st, masks = sequence_inputs(cfg, 4, 3, 7, dropout=0.3, seeded=True)
    lengths = torch.tensor([4, 4, 2])
    want_out, want_state = naive.hyper_lstm_sequence(x, st, p, cfg, lengths, masks)
    out, fin, buf = persistent.run_sequence(x, st, p, cfg, lengths, masks)
    assert not buf.persistent["fell_back"]
    for g, w in zip((out, *fin), (want_out, *want_state)):
        assert rel_err(g, w) < 1e-12


def test_one_launch_per_call_and_cooperative(monkeypatch):
    """One kernel launch per call whatever T (none of the per-step kernels), launched as a
    cooperative grid with keyword arguments only."""
    from hyperkern.kernels import hyper_lstm_fwd as kf
    from hyperkern.kernels import hyper_lstm_persistent as kp

    seen = []
    real = kp.hyper_lstm_persistent_kernel.run

    def run(*args, **kw):
        assert not args
        seen.append((kw["launch_cooperative_grid"], kw["T"], kw["grid"]))
        return real(*args, **kw)

    monkeypatch.setattr(kp.hyper_lstm_persistent_kernel, "run", run)
    per_step = count_launches(monkeypatch, (kf.hyper_lstm_gates_kernel, kf.hyper_lstm_cell_kernel))
    cfg = CellConfig(input_size=5, hidden_size=16, hyper_size=8, embed_size=2)
    p = cell_params(cfg, 8)
    for T in (1, 4):
        x, st, _ = sequence_inputs(cfg, T, 2, 9)
        with torch.no_grad():
            fused_triton.persistent.hyper_lstm_sequence(*_dev(torch.float32, x, st, p)[:3], cfg)
    assert [s[:2] for s in seen] == [(True, 1), (True, 4)] and per_step == []
    if not CUDA:
        assert all(s[2] == (1,) for s in seen)  # the interpreter: one program walks everything


# --- training: what the backward reads, gradients, the custom op -------------------------------

@pytest.mark.parametrize("mode", ["full", "states"])
def test_saves_exactly_what_the_backward_reads(mode):
    """``save`` keeps the per-step forward's tensors under the same names, bit for bit (the
    interpreter) — every step's state, P, G, Â, z, XP, lengths — or only the states."""
    cfg = CellConfig(**ODD)
    p = cell_params(cfg, 10)
    x, st, masks = sequence_inputs(cfg, 4, 3, 11, dropout=0.3, seeded=True)
    args = (*_dev(torch.float32, x, st, p, masks)[:3], cfg, torch.tensor([4, 2, 3]), masks_to(masks, DEVICE,
                                                                                            torch.float32))
    _, _, got = persistent.run_sequence(*args, save=mode, guard=3)
    _, _, want = fused_triton.run_sequence(*args, save=mode)
    assert set(got.saved) == set(want.saved) and got.check_guards() == []
    for n, w in want.saved.items():
        if isinstance(w, torch.Tensor):
            assert got.saved[n].shape == w.shape and got.saved[n].dtype == w.dtype, n
            if not CUDA:
                assert torch.equal(got.saved[n], w), n


def _grads(fn, x, st, p, cfg, lengths, masks, dtype, seed):
    cv = lambda t: t.to(DEVICE, dtype).clone().requires_grad_()  # noqa: E731
    xs, ss, ps = cv(x), tuple(map(cv, st)), {n: cv(v) for n, v in p.items()}
    out, fin = fn(xs, ss, ps, cfg, lengths, masks_to(masks, DEVICE, dtype))
    g = torch.Generator().manual_seed(seed)
    d_out = torch.randn(out.shape, generator=g, dtype=torch.float64).to(out)
    d_fin = [torch.randn(f.shape, generator=g, dtype=torch.float64).to(f) for f in fin]
    leaves = [xs, *ss, *ps.values()]
    return dict(zip(["input", "h0", "c0", "h_hat0", "c_hat0", *ps],
                    torch.autograd.grad([out, *fin], leaves, [d_out, *d_fin])))


@pytest.mark.parametrize("masks_kind", MASK_KINDS)
@pytest.mark.parametrize("layer_norm", [True, False], ids=["ln", "noln"])
def test_training_end_to_end_gradients(layer_norm, masks_kind):
    """Gradients of the input, the initial state and every parameter through the persistent
    forward and today's backward kernels, against float64 reference autograd (and bitwise the
    per-step backend's in the interpreter)."""
    cfg = CellConfig(**ODD, layer_norm=layer_norm)
    p = cell_params(cfg, 12)
    x, st, masks = sequence_inputs(cfg, 4, 3, 13, dropout=0.3, seeded=masks_kind == "seeded")
    lengths = torch.tensor([4, 2, 3])
    want = _grads(naive.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float64, 14)
    got = _grads(persistent.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float32, 14)
    tol = kernel_tol(torch.float32).grad
    for n, w in want.items():
        assert float(w.abs().max()) > 0, n
        assert rel_err(got[n].cpu(), w) <= tol, (n, rel_err(got[n].cpu(), w))
    if not CUDA:
        per_step = _grads(fused_triton.hyper_lstm_sequence, x, st, p, cfg, lengths, masks, torch.float32, 14)
        assert all(torch.equal(got[n], per_step[n]) for n in got)


def test_layer_two_layers_bidirectional_lengths():
    """The layer with backend="triton_persistent": two layers, both directions, unsorted lengths,
    forward and gradients against the float64 reference layer."""
    ref, fast = layer_pair(torch.float32, "triton_persistent", DEVICE, 15, num_layers=2, bidirectional=True, **ODD)
    x = torch.randn(3, 3, ODD["input_size"], generator=torch.Generator().manual_seed(16), dtype=torch.float64)
    lengths = torch.tensor([2, 3, 1])
    out_w, st_w = ref(x, lengths=lengths)
    xs = x.to(DEVICE, torch.float32).requires_grad_()
    out, st = fast(xs, lengths=lengths)
    _check(out, st, out_w, st_w, torch.float32)
    g_w = torch.autograd.grad((out_w * out_w).sum(), list(ref.parameters()))
    g = torch.autograd.grad((out * out).sum(), list(fast.parameters()))
    tol = kernel_tol(torch.float32).grad
    assert max(rel_err(a.cpu(), b) for a, b in zip(g, g_w)) <= tol


@pytest.mark.parametrize("seeded", [False, True], ids=["nodrop", "seeded"])
@pytest.mark.parametrize("requires_grad", [False, True], ids=["nograd", "grad"])
def test_custom_op_opcheck(requires_grad, seeded):
    """torch.library.opcheck of hyperkern::hyper_lstm_triton_persistent: schema, fake
    implementation, autograd registration (the per-step BPTT) and AOT dispatch."""
    cfg = CellConfig(input_size=3, hidden_size=5, hyper_size=4, embed_size=2)
    g = torch.Generator().manual_seed(17)
    P = [(0.3 * torch.randn(s, generator=g)).to(DEVICE).requires_grad_(requires_grad)
         for s in cfg.param_shapes().values()]
    x = torch.randn(2, 2, 3, generator=g).to(DEVICE).requires_grad_(requires_grad)
    st = [(0.5 * torch.randn(2, n, generator=g)).to(DEVICE) for n in (5, 5, 4, 4)]
    seed = torch.tensor([987654321], dtype=torch.int64, device=DEVICE) if seeded else None
    torch.library.opcheck(torch.ops.hyperkern.hyper_lstm_triton_persistent.default,
                          (x, *st, P, None, None, None, seed, 0.25 if seeded else 0.0, 5, 4, 2, True, 1.0, 1e-3,
                           int(requires_grad), True))


# --- it never hangs: the timeout path ---------------------------------------------------------

def _small(T=3, B=3, seed=18):
    cfg = CellConfig(**ODD)
    p = cell_params(cfg, seed)
    x, st, _ = sequence_inputs(cfg, T, B, seed + 1)
    return (*_dev(torch.float32, x, st, p)[:3], cfg)


@pytest.mark.skipif(CUDA, reason="the interpreter's grid of one; on a GPU gpu-check runs the real grid")
def test_kernel_raises_the_flag_and_stops_at_a_sync_that_cannot_complete(monkeypatch):
    """The kernel itself (the fall-back switched off): a sync expecting one arrival more than the
    grid gives up after ``max_spin`` polls, raises the error flag and stops — the program arrived
    once (sync 0, after the first products) and never ran a cell phase (the output is untouched)."""
    x, st, p, cfg = _small()
    seen = {}
    real = persistent._launch

    def spy(kernel, launch, grid, args):
        seen.update(args)
        return real(kernel, launch, grid, args)

    monkeypatch.setattr(persistent, "_launch", spy)
    monkeypatch.setattr(persistent.per_step, "run_sequence", lambda *a, **k: (None, None, type("Buf", (), {})()))
    out = torch.full((3, 3, cfg.hidden_size), float("nan"), device=DEVICE)
    with pytest.warns(RuntimeWarning, match="gave up waiting"):
        persistent.run_sequence(x, st, p, cfg, out=out, n_sync=2, max_spin=4)
    assert int(seen["err_ptr"].item()) == 1 and int(seen["sync_ptr"].item()) == 1
    assert bool(torch.isnan(out).all())


@pytest.mark.parametrize("how", ["more_arrivals_than_programs", "two_programs_in_the_interpreter"])
def test_timeout_falls_back_with_one_warning_and_the_right_result(how):
    """A grid sync that cannot complete: the launch ends (bounded spin), the launcher sees the
    flag, reruns the call with the per-step kernels and warns exactly once per process; the
    result is the per-step kernels' own."""
    if how == "two_programs_in_the_interpreter" and CUDA:
        pytest.skip("on a GPU two programs are co-resident and meet")
    kw = dict(n_sync=2, max_spin=4) if how == "more_arrivals_than_programs" else dict(grid=2, max_spin=4)
    x, st, p, cfg = _small()
    want_out, want_fin, _ = fused_triton.run_sequence(x, st, p, cfg)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out, fin, buf = persistent.run_sequence(x, st, p, cfg, **kw)
        out2, _, buf2 = persistent.run_sequence(x, st, p, cfg, **kw)
    msgs = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(msgs) == 1 and "gave up waiting at a grid sync" in msgs[0] and "per-step" in msgs[0]
    assert buf.persistent["fell_back"] and buf2.persistent["fell_back"]
    assert torch.equal(out, want_out) and torch.equal(out2, want_out)
    assert all(torch.equal(a, b) for a, b in zip(fin, want_fin))


def test_timeout_in_training_falls_back_with_what_the_backward_reads():
    x, st, p, cfg = _small(T=2)
    with warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        _, _, got = persistent.run_sequence(x, st, p, cfg, save=True, n_sync=3, max_spin=2)
    _, _, want = fused_triton.run_sequence(x, st, p, cfg, save=True)
    assert got.persistent["fell_back"] and set(got.saved) == set(want.saved)
    assert all(torch.equal(got.saved[n], w) for n, w in want.saved.items() if isinstance(w, torch.Tensor))


def test_a_refused_cooperative_launch_falls_back_and_other_errors_raise(monkeypatch):
    x, st, p, cfg = _small(T=2)
    want, _, _ = fused_triton.run_sequence(x, st, p, cfg)

    def refused(*_a, **_k):
        raise RuntimeError("Triton Error [CUDA]: too many blocks in cooperative launch")

    monkeypatch.setattr(persistent, "_launch", refused)
    with pytest.warns(RuntimeWarning, match="could not be launched .*cooperative"):
        out, _, buf = persistent.run_sequence(x, st, p, cfg)
    assert buf.persistent["fell_back"] and torch.equal(out, want)

    def broken(*_a, **_k):
        raise RuntimeError("an unrelated failure")

    monkeypatch.setattr(persistent, "_launch", broken)
    with pytest.raises(RuntimeError, match="unrelated"):
        persistent.run_sequence(x, st, p, cfg)


def test_bad_arguments():
    x, st, p, cfg = _small(T=2)
    with pytest.raises(ValueError, match="n_sync at least the grid"):
        persistent.run_sequence(x, st, p, cfg, grid=2, n_sync=1)
    with pytest.raises(ValueError, match="out must be"):
        persistent.run_sequence(x, st, p, cfg, out=torch.empty(2, 3, 5, device=DEVICE))
    with pytest.raises(TypeError, match="float32, float16 and bfloat16"):
        persistent.run_sequence(x.double(), tuple(s.double() for s in st), {n: v.double() for n, v in p.items()}, cfg)
    with pytest.raises(ValueError, match="lengths"):
        persistent.run_sequence(x, st, p, cfg, torch.tensor([3, 2, 1]))


# --- the memory ordering, at the instruction level (no GPU needed) ------------------------------

_SASS = r"""
import os, subprocess, sys, tempfile
import triton
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia import compiler as nv
from triton.compiler import ASTSource
from hyperkern.compile_check import compile_config
from hyperkern.ops.hyper_lstm.fused_triton import configs

cfg = compile_config(configs.persistent_launch(16, "bf16", "bf16", True, 0))
opts = dict(num_warps=cfg.num_warps, num_stages=cfg.num_stages, maxnreg=cfg.maxnreg, launch_cooperative_grid=True)
k = triton.compile(ASTSource(fn=cfg.fn, signature=cfg.signature, constexprs=cfg.constexprs),
                   target=GPUTarget("cuda", int(sys.argv[1]), 32), options=opts)
with tempfile.TemporaryDirectory() as d:
    path = os.path.join(d, "k.cubin")
    open(path, "wb").write(k.asm["cubin"])
    tool = os.path.join(os.path.dirname(nv.__file__), "bin", "cuobjdump")
    print(subprocess.run([tool, "-sass", path], capture_output=True, text=True, check=True).stdout)
"""


@pytest.mark.parametrize("arch", [80, 90])
def test_sync_instructions_order_memory(arch, tmp_path):
    """What the grid sync compiles to (ptxas of the installed Triton, no GPU): the arrival is a
    GPU-scope fence then a strong reduction (``MEMBAR.ALL.GPU`` ... ``RED.E.ADD.64.STRONG.GPU``: every
    store of the program reaches L2 before its arrival counts); the polls are strong loads (never
    an L1 hit); the acquire invalidates the SM's L1 (``CCTL.IVALL``), so no load after the sync can
    read a line cached before it; the error flag is a GPU-scope atomic exchange."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _SASS, str(arch)], capture_output=True, text=True, env=env,
                         timeout=600, cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if res.returncode != 0 and "cuobjdump" in res.stderr and "No such file" in res.stderr:
        pytest.skip("this Triton wheel bundles no cuobjdump")
    assert res.returncode == 0, res.stderr[-3000:]
    # the instructions ("/*0a60*/  @P0 CCTL.IVALL ;" at any address), their predicates dropped
    sass = [m.group(1) for m in re.finditer(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([^;]*?)\s*;", res.stdout)]
    red = [i for i, s in enumerate(sass) if s.startswith("RED") and ".STRONG.GPU" in s and ".ADD.64" in s]
    assert len(red) == 2, red  # the two arrivals of a step (sync 1 and sync 2)
    for i in red:  # a GPU-scope fence before the arrival, and no global store between them
        fence = max((j for j in range(i) if sass[j].startswith("MEMBAR") and ".GPU" in sass[j]), default=None)
        assert fence is not None and i - fence < 32, sass[max(0, i - 32):i + 1]
        assert not any(s.startswith(("STG", "ST.E", "RED", "ATOM")) for s in sass[fence + 1:i]), sass[fence:i + 1]
    polls = [s for s in sass if s.startswith("LDG") and ".64" in s and ".STRONG." in s]
    assert len(polls) >= 2 and all(".STRONG.SYS" in s or ".STRONG.GPU" in s for s in polls)
    # the acquire: an acquire load/atomic, then the L1 invalidated, once per sync (Triton 3.6 deleted
    # the acquire while its result went unused: no CCTL.IVALL at all)
    assert sum(s.startswith("CCTL.IVALL") for s in sass) == 2
    assert any(s.startswith("ATOMG") and "EXCH" in s and ".STRONG.GPU" in s for s in sass)


# --- the performance model's rows, the syncs the kernel really makes ----------------------------

def test_the_kernel_makes_the_syncs_the_model_charges(monkeypatch):
    """After a launch the arrival counter holds grid x (2T - 1): two grid syncs per step, none
    after the last — what docs/persistent.md counts and perf_model.predict_persistent charges."""
    from hyperkern import perf_model as pm

    seen = {}
    real = persistent._launch
    monkeypatch.setattr(persistent, "_launch", lambda k, l, g, a: (seen.update(a, grid=g), real(k, l, g, a))[1])
    x, st, p, cfg = _small(T=4, B=2)
    with torch.no_grad():
        persistent.run_sequence(x, st, p, cfg)
    G = seen["grid"][0]
    assert int(seen["sync_ptr"].item()) == G * (2 * 4 - 1) and int(seen["err_ptr"].item()) == 0
    s = pm.Shape("t", X=7, H=33, Hh=10, E=3, B=2, T=4)
    r = pm.predict_persistent(s, "fp32")
    assert r["syncs_per_step"] == 2 and r["syncs_us"] == pytest.approx((2 * 4 - 1) / 4 * pm.grid_sync_cost() * 1e6)


def test_perf_model_persistent_rows():
    """A row per model shape (and the two target shapes without layer norm): the phases, the syncs
    and their assumed cost, the targets (met or missed, never hidden), and the persistent backward's
    modelled design."""
    from hyperkern import perf_model as pm

    rs = pm.rows_persistent()
    assert {r["shape"] for r in rs} >= {s.name for s in pm.SHAPES}
    assert pm.grid_sync_cost() == pytest.approx(2.5 * pm.PEAKS["latency_l2"])
    for r in rs:
        assert r["total_us"] == pytest.approx(r["products_us"] + r["cell_us"] + r["syncs_us"] + r["per_call_us"])
        assert 0 < r["grid"] <= pm.PEAKS["sms"] and r["hbm_bytes_step"] < r["l2_bytes_step"]
        assert r["products_bound"] and r["cell_bound"]
    targets = {(r["shape"], r["dtype"]): r for r in rs if r["target_us"] is not None}
    assert {("H768 B16 (cuDNN cmp)", "bf16"), ("PTB (paper)", "fp32")} <= set(targets)
    assert all(r["meets_target"] == (r["total_us"] <= r["target_us"]) for r in targets.values())
    text = pm.format_table_persistent(rs)
    assert "modelled, not measured" in text and "0.75 µs" in text and "missed" in text
    for s in pm.SHAPES:
        b = pm.predict_persistent_bwd(s, "fp32")
        assert 0 < b["loop_us"] < b["total_us"] and b["per_step_total_us"] > 0


def test_compile_check_persistent_subset(tmp_path):
    """The heaviest persistent configurations (the longest cell chunks with seeded dropout and layer
    norm in fp32 on the CUDA cores; the widest product tile in FMA fp32; bf16) for sm_80 and sm_90:
    0 spills, one program per SM fits (registers x threads <= 64K), shared memory under the limit.
    ``python -m hyperkern compile-check --filter persistent`` covers every launch."""
    from conftest import run_compile_check
    from hyperkern.ops.hyper_lstm.fused_triton import configs

    picks = [configs.persistent_launch(B, dt, dot, True, drop) for B, dt, dot, drop in
             ((16, "fp32", "ieee", 2), (configs.batch_edges()[-1], "fp32", "ieee", 2), (32, "bf16", "bf16", 1))]
    subset = [f"{l.kernel} [{l.label}]" for l in picks]
    rows, _ = run_compile_check(subset, tmp_path)
    assert len(rows) == 2 * len(subset)
    for r in rows:
        assert r["error"] is None and r["spill_stores"] == 0 and r["spill_loads"] == 0, r
        assert r["registers"] * 32 * r["num_warps"] <= 65536, r
        assert r["shared"] <= {80: 166_912, 90: 232_448}[r["arch"]]
