"""Fused Triton forward kernels of one HyperLSTM cell (SPEC §1), two launches per timestep.

The launcher (``hyperkern/ops/hyper_lstm/fused_triton/launch.py``) hoists the x-projections of all T
steps into one library GEMM, ``XP = x @ [weight_ih ; hyper_weight_ih[:, :X]]^T`` (fp32,
``[T, B, 4H + 4Hh]``), then runs per step t:

1. :func:`hyper_lstm_gates_kernel` — grid ``(cdiv(H, BH) + cdiv(Hh, BH), cdiv(B, BM))``. Every
   product that needs ``h_{t-1}`` as one tiled ``tl.dot`` GEMM whose output columns are
   gate-interleaved (a tile covers the same BH columns of all four gates):

   - main tiles:  ``P = h_{t-1} @ weight_hh^T`` (raw, unscaled, fp32 ``[B, 4H]``);
   - hyper tiles: ``Â = XP_hyper[t] + h_{t-1} @ hyper_weight_ih[:, X:]^T + ĥ_{t-1} @ hyper_weight_hh^T
     + hyper_bias`` (the hyper cell's pre-norm gates, fp32 ``[B, 4Hh]``).

2. :func:`hyper_lstm_cell_kernel` — grid ``cdiv(B, BMC)``; a program owns whole rows and walks them
   in chunks of BN columns:

   - seeded recurrent dropout only (``DROPOUT == 2``): :func:`_draw_masks` first draws the step's
     masks for its rows (``tl.rand``) into a small scratch that the update passes then read;

   - the hyper cell: per-gate LN statistics of Â, the update (ĉ_t), LN(ĉ_t), ĥ_t;
   - the 12 embeddings ``z = ĥ_t @ z_weight^T + [z_bias; 0]`` (a tiny scratch ``[B, 12E]``);
   - the main pre-gates ``a = d_x ⊙ XP[t] + d_h ⊙ P + bias + beta``: the scaling vectors
     ``d_k[b, j] = Σ_e z[b, kE+e] · d_weight[k, j, e]`` are generated chunk by chunk in registers
     and never stored; no dynamic weight matrix is ever formed;
   - per-gate LN over H (single pass, Chan's parallel mean/variance merge), the LSTM update,
     LN(c_t), h_t, and the step's output (zero past a sequence's end).

Gate maths is written once on ``[rows, 4, columns]`` tiles (gate axis in the middle) and shared by
the hyper and the main cell. The chunk loops of the cell kernel are software-pipelined
``PIPE`` deep (``tl.range(num_stages=PIPE)``): no loop reads a buffer it writes. Everything
elementwise runs in fp32 (precisely: in the dtype of the state / scratch buffers, read from the
pointers; fp32 except in the interpreter-only float64 test mode of ``fused_triton``); dots
accumulate in fp32, their operands treated as the ``DOT_PRECISION`` constexpr says
(``hyperkern.ops.precision``). Inside a program, a pass that re-reads what an earlier pass of the
same program stored is separated by ``tl.debug_barrier()``; no program ever waits on another program.

Modes are constexprs (``LAYER_NORM``, ``DROPOUT``: 0 off, 1 given mask tensors, 2 seeded), and an
input a mode does not use is passed as ``None`` (no dummy pointers). Launch with keyword arguments.

Constant launches: both kernels take the base pointers of the per-step buffers and the step ``t``
and address step t themselves, in int64 (``[T, B, *]`` buffers at ``t · stride_t``, a t-stride of
0 for a scratch every step reuses; the state in rings ``[S, B, *]``, read at slot ``t % S``,
written at ``(t + 1) % S``), so a loop's launches differ only in ``t`` and are bound once per call
(``hyperkern.ops.launches.StepLaunch``; ``docs/cuda_graphs.md``).
The launch configurations (block sizes, warps, stages) live in one table,
``hyperkern/ops/hyper_lstm/fused_triton/configs.py``, which the launcher and the compile check read.
"""
from __future__ import annotations

import triton
import triton.language as tl
from triton.language.extra import libdevice

from hyperkern.kernels import common


# libdevice tanh on a GPU; the interpreter cannot run libdevice, so 2*sigmoid(2x)-1 there (~1e-7 in
# fp32). Decided when this module is imported, which is when Triton decides it builds these kernels
# for the interpreter (kernels.common.interpret_requested).
USE_LIBDEVICE_TANH = tl.constexpr(not common.interpret_requested())
# SPEC's path counts (hyperkern.kernels.common): z and d_weight hold 12 paths of E, in blocks
NUM_PATHS = tl.constexpr(common.NUM_PATHS)
NUM_SCALED_PATHS = tl.constexpr(common.NUM_SCALED_PATHS)  # x- and h-paths: only they have a z bias
H_PATH = tl.constexpr(common.H_PATH)
BIAS_PATH = tl.constexpr(common.BIAS_PATH)


# --------------------------------------------------------------------------------------------
# shared helpers
# --------------------------------------------------------------------------------------------

@triton.jit
def _tanh(x):
    if USE_LIBDEVICE_TANH:
        return libdevice.tanh(x)
    else:
        return 2.0 * tl.sigmoid(2.0 * x) - 1.0


@triton.jit
def _pick(x, gate, y: tl.constexpr):
    """Gate y of a ``[R, 4, C]`` tile as ``[R, 1, C]``."""
    return tl.sum(tl.where(gate == y, x, 0.0), axis=1, keep_dims=True)


@triton.jit
def _chunk_moments(a, valid, n_c):
    """Mean and sum of squared deviations over the last axis of one chunk (n_c valid columns)."""
    mean_c = tl.sum(tl.where(valid, a, 0.0), axis=2, keep_dims=True) / n_c
    dev = tl.where(valid, a - mean_c, 0.0)
    return mean_c, tl.sum(dev * dev, axis=2, keep_dims=True)


@triton.jit
def _chan_merge(n, mean, m2, n_c, mean_c, m2_c):
    """Merge running (n, mean, M2) with a chunk's (n_c, mean_c, M2_c) (Chan et al.)."""
    tot = n + n_c
    delta = mean_c - mean
    mean = mean + delta * (n_c / tot)
    m2 = m2 + m2_c + delta * delta * (n * n_c / tot)
    return mean, m2


@triton.jit
def _draw_masks(seed_ptr, m_ptr, stride_m, rows, row_ok, t64, B, N, p_drop, drop_scale,
                BMC: tl.constexpr, BN: tl.constexpr):
    """Seeded recurrent dropout of step t for the program's rows into the mask scratch ``m[rows, :N]``
    (N = H + Hh: the main cell's columns, then the hyper cell's): ``tl.rand(seed, (t·B + row)·N + k)
    >= p`` ? ``1/(1-p)`` : 0 — the stream of ``hyperkern/ops/hyper_lstm/dropout.py``. A pass of its
    own, so the Philox registers are never live beside the gate tiles."""
    seed = tl.load(seed_ptr)
    cols = tl.arange(0, BN)[None, :]
    counter = (t64 * B + rows[:, None]) * N
    for k0 in range(0, N, BN):
        k = k0 + cols
        u = tl.rand(seed, counter + k)
        keep = tl.where(u >= p_drop, drop_scale, 0.0)
        tl.store(m_ptr + rows[:, None] * stride_m + k, keep.to(m_ptr.dtype.element_ty),
                 mask=row_ok[:, None] & (k < N))


@triton.jit
def _tile_matmul(acc, a_ptr, stride_a, rows, row_ok, w_ptr, stride_w, wrow, col_ok, K,
                 BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[BM, N] += a[rows, :K] @ w[wrow, :K]^T, K in chunks of BK (a is fp32 state)."""
    kk = tl.arange(0, BK)
    a_ptrs = a_ptr + rows[:, None] * stride_a + kk[None, :]
    w_ptrs = w_ptr + wrow[None, :] * stride_w + kk[:, None]
    for k0 in range(0, K, BK):
        k_ok = (k0 + kk) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[None, :] & k_ok[:, None], other=0.0)
        # out_dtype = the accumulator's: the default (fp32) except in the float64 interpreter test
        # mode, where Triton 3.7 insists on it being given
        acc = tl.dot(a.to(w.dtype), w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        a_ptrs += BK
        w_ptrs += BK
    return acc


# --------------------------------------------------------------------------------------------
# launch 1 of a step: every product of h_{t-1} (and ĥ_{t-1})
# --------------------------------------------------------------------------------------------

@triton.jit
def _products_step(pid_n, pid_m, t64, h_ptr, stride_h, hh_ptr, stride_hh,
                   w_hh_ptr, stride_whh, w_hih_ptr, stride_whih, w_hhh_ptr, stride_whhh, hbias_ptr,
                   xph_ptr, stride_xpt, stride_xpb, p_ptr, stride_pt, stride_p, ahat_ptr, stride_aht, stride_ahat,
                   B, H, Hh, n_main,
                   BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Tile ``(pid_n, pid_m)`` of step t's products from ``h_{t-1}``, ``ĥ_{t-1}`` (``h_ptr``,
    ``hh_ptr``: ``[B, *]``): a main tile of P, or a hyper tile of Â. The body of the per-step
    gates kernel and of the persistent kernel's products phase (one place)."""
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)  # int64: row x stride offsets may pass 2^31
    row_ok = rows < B
    n = tl.arange(0, 4 * BH)
    gate = n // BH  # columns are gate-interleaved: [i-block | f-block | g-block | o-block]
    jj = n % BH
    acc = tl.zeros([BM, 4 * BH], dtype=p_ptr.dtype.element_ty)
    # (P's and Â's step offsets are added at the stores: a pointer computed before the K loop would
    # hold two registers across it, which spilled 8 B in the fp32 FMA BM32 row on sm_90a)
    if pid_n < n_main:
        j = pid_n * BH + jj
        col_ok = j < H
        wrow = (gate * H + j).to(tl.int64)  # weight row x stride: 4H·H may pass 2^31
        acc = _tile_matmul(acc, h_ptr, stride_h, rows, row_ok, w_hh_ptr, stride_whh, wrow, col_ok, H,
                           BK, DOT_PRECISION)
        tl.store(p_ptr + t64 * stride_pt + rows[:, None] * stride_p + wrow[None, :], acc,
                 mask=row_ok[:, None] & col_ok[None, :])
    else:
        j = (pid_n - n_main) * BH + jj
        col_ok = j < Hh
        wrow = (gate * Hh + j).to(tl.int64)
        acc = _tile_matmul(acc, h_ptr, stride_h, rows, row_ok, w_hih_ptr, stride_whih, wrow, col_ok, H,
                           BK, DOT_PRECISION)
        acc = _tile_matmul(acc, hh_ptr, stride_hh, rows, row_ok, w_hhh_ptr, stride_whhh, wrow, col_ok, Hh,
                           BK, DOT_PRECISION)
        m = row_ok[:, None] & col_ok[None, :]
        xph = tl.load(xph_ptr + t64 * stride_xpt + rows[:, None] * stride_xpb + wrow[None, :],
                      mask=m, other=0.0)
        hb = tl.load(hbias_ptr + wrow, mask=col_ok, other=0.0).to(p_ptr.dtype.element_ty)
        acc = acc + xph + hb[None, :]
        tl.store(ahat_ptr + t64 * stride_aht + rows[:, None] * stride_ahat + wrow[None, :], acc, mask=m)


@triton.jit(do_not_specialize=["t"])  # one compiled kernel for every step (t == 1 would become a constexpr)
def hyper_lstm_gates_kernel(
    h_ptr, hh_ptr, slot_h, slot_hh, stride_h, stride_hh,  # state rings h [S, B, H], ĥ [S, B, Hh] (fp32)
    w_hh_ptr, stride_whh,                            # weight_hh [4H, H]
    w_hih_ptr, stride_whih,                          # hyper_weight_ih[:, X:] [4Hh, H] (a view)
    w_hhh_ptr, stride_whhh,                          # hyper_weight_hh [4Hh, Hh]
    hbias_ptr,                                       # hyper_bias [4Hh]
    xph_ptr, stride_xpt, stride_xpb,                 # hyper x-projection [T, B, 4Hh] (fp32 view)
    p_ptr, stride_pt, stride_p,                      # out: P [T', B, 4H] fp32 (stride_pt 0: one scratch)
    ahat_ptr, stride_aht, stride_ahat,               # out: Â [T', B, 4Hh] fp32 (likewise)
    t, n_slots, B, H, Hh, n_main,                    # step t reads slot t % n_slots; n_main = cdiv(H, BH)
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    t64 = tl.full([], 0, tl.int64) + t  # int64 offsets; also valid if t were specialised to a constexpr
    prev = (t % n_slots).to(tl.int64)  # a 32-bit modulo (a 64-bit one is a long routine)
    _products_step(tl.program_id(0), tl.program_id(1), t64, h_ptr + prev * slot_h, stride_h,
                   hh_ptr + prev * slot_hh, stride_hh, w_hh_ptr, stride_whh, w_hih_ptr, stride_whih,
                   w_hhh_ptr, stride_whhh, hbias_ptr, xph_ptr, stride_xpt, stride_xpb,
                   p_ptr, stride_pt, stride_p, ahat_ptr, stride_aht, stride_ahat, B, H, Hh, n_main,
                   BM, BH, BK, DOT_PRECISION)


# --------------------------------------------------------------------------------------------
# launch 2 of a step: the row-owning cell kernel
# --------------------------------------------------------------------------------------------

@triton.jit
def _gate_stats(buf_ptr, stride_buf, rows3, row_ok3, gate3, N, BMC: tl.constexpr, BN: tl.constexpr,
                PIPE: tl.constexpr):
    """Per-gate (mean, M2) of the pre-gates ``buf[rows, 4N]`` in one pass: each [BMC, 4, 1]."""
    cols = tl.arange(0, BN)[None, None, :]
    mean = tl.zeros([BMC, 4, 1], dtype=buf_ptr.dtype.element_ty)
    m2 = tl.zeros([BMC, 4, 1], dtype=buf_ptr.dtype.element_ty)
    for j0 in tl.range(0, N, BN, num_stages=PIPE):
        j = j0 + cols
        col_ok = j < N
        a = tl.load(buf_ptr + rows3 * stride_buf + gate3 * N + j, mask=row_ok3 & col_ok, other=0.0)
        n_c = tl.minimum(N - j0, BN) * 1.0
        mean_c, m2_c = _chunk_moments(a, col_ok, n_c)
        mean, m2 = _chan_merge(j0 * 1.0, mean, m2, n_c, mean_c, m2_c)
    return mean, m2


@triton.jit
def _update_pass(buf_ptr, stride_buf, g_mean, g_rstd, lnw_ptr, lnb_ptr, N,
                 c_prev_ptr, c_new_ptr, h_prev_ptr, h_new_ptr, stride_s,
                 m_ptr, stride_m,
                 out_ptr, stride_out,
                 rows3, row_ok3, alive3, gate3, forget_bias,
                 LAYER_NORM: tl.constexpr, HAS_MASK: tl.constexpr, WRITE_OUT: tl.constexpr, BMC: tl.constexpr,
                 BN: tl.constexpr, PIPE: tl.constexpr):
    """c_t = σ(f + fb) c_{t-1} + σ(i) rdrop(tanh(g)) from the pre-gates in ``buf``; stores c_t.

    With LAYER_NORM, the gates are normalised first and the statistics of c_t are returned for
    :func:`_output_pass`; without it, h_t = σ(o) tanh(c_t) is stored here (and the output)."""
    cols = tl.arange(0, BN)[None, None, :]
    c_mean = tl.zeros([BMC, 1, 1], dtype=c_new_ptr.dtype.element_ty)
    c_m2 = tl.zeros([BMC, 1, 1], dtype=c_new_ptr.dtype.element_ty)
    for j0 in tl.range(0, N, BN, num_stages=PIPE):
        j = j0 + cols
        col_ok = j < N
        ok = row_ok3 & col_ok
        a = tl.load(buf_ptr + rows3 * stride_buf + gate3 * N + j, mask=ok, other=0.0)
        if LAYER_NORM:
            w = tl.load(lnw_ptr + gate3 * N + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            b = tl.load(lnb_ptr + gate3 * N + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            a = (a - g_mean) * g_rstd * w + b
        s = tl.sigmoid(a + tl.where(gate3 == 1, forget_bias, 0.0))
        g = _tanh(_pick(a, gate3, 2))
        if HAS_MASK:  # recurrent dropout on tanh(g)
            g = g * tl.load(m_ptr + rows3 * stride_m + j, mask=ok, other=1.0).to(c_new_ptr.dtype.element_ty)
        s_off = rows3 * stride_s + j
        c_prev = tl.load(c_prev_ptr + s_off, mask=ok, other=0.0)
        c = _pick(s, gate3, 1) * c_prev + _pick(s, gate3, 0) * g
        tl.store(c_new_ptr + s_off, tl.where(alive3, c, c_prev), mask=ok)
        if LAYER_NORM:
            n_c = tl.minimum(N - j0, BN) * 1.0
            mean_c, m2_c = _chunk_moments(c, col_ok, n_c)
            c_mean, c_m2 = _chan_merge(j0 * 1.0, c_mean, c_m2, n_c, mean_c, m2_c)
        else:
            h = _pick(s, gate3, 3) * _tanh(c)
            h_prev = tl.load(h_prev_ptr + s_off, mask=ok, other=0.0)
            tl.store(h_new_ptr + s_off, tl.where(alive3, h, h_prev), mask=ok)
            if WRITE_OUT:
                tl.store(out_ptr + rows3 * stride_out + j,
                         tl.where(alive3, h, 0.0).to(out_ptr.dtype.element_ty), mask=ok)
    return c_mean, c_m2


@triton.jit
def _output_pass(buf_ptr, stride_buf, g_mean, g_rstd, lnw_ptr, lnb_ptr, N,
                 c_new_ptr, h_prev_ptr, h_new_ptr, stride_s, c_mean, c_rstd, lncw_ptr, lncb_ptr,
                 out_ptr, stride_out, rows3, row_ok3, alive3, gate3,
                 WRITE_OUT: tl.constexpr, BMC: tl.constexpr, BN: tl.constexpr, PIPE: tl.constexpr):
    """Layer-norm output path: h_t = σ(LN_o(a_o)) · tanh(LN(c_t)); stores h_t (and the output)."""
    cols = tl.arange(0, BN)[None, None, :]
    o_mean = _pick(g_mean, gate3, 3)
    o_rstd = _pick(g_rstd, gate3, 3)
    for j0 in tl.range(0, N, BN, num_stages=PIPE):
        j = j0 + cols
        col_ok = j < N
        ok = row_ok3 & col_ok
        a_o = tl.load(buf_ptr + rows3 * stride_buf + 3 * N + j, mask=ok, other=0.0)
        w = tl.load(lnw_ptr + 3 * N + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
        b = tl.load(lnb_ptr + 3 * N + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
        a_o = (a_o - o_mean) * o_rstd * w + b
        s_off = rows3 * stride_s + j
        c = tl.load(c_new_ptr + s_off, mask=ok, other=0.0)
        cw = tl.load(lncw_ptr + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
        cb = tl.load(lncb_ptr + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
        h = tl.sigmoid(a_o) * _tanh((c - c_mean) * c_rstd * cw + cb)
        h_prev = tl.load(h_prev_ptr + s_off, mask=ok, other=0.0)
        tl.store(h_new_ptr + s_off, tl.where(alive3, h, h_prev), mask=ok)
        if WRITE_OUT:
            tl.store(out_ptr + rows3 * stride_out + j,
                     tl.where(alive3, h, 0.0).to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _embeddings(hh_ptr, stride_hh, zw_ptr, stride_zw, zb_ptr, z_ptr, stride_z, rows, row_ok, Hh, E,
                BMC: tl.constexpr, BZ: tl.constexpr, BKZ: tl.constexpr):
    """z = ĥ_t @ z_weight^T + [z_bias ; 0] for the program's rows -> scratch z[rows, 12E] (fp32)."""
    rows3 = rows[:, None, None]
    row_ok3 = row_ok[:, None, None]
    q_ar = tl.arange(0, BZ)[None, :, None]
    k_ar = tl.arange(0, BKZ)[None, None, :]
    q2_ar = tl.arange(0, BZ)[None, :]
    NZ = NUM_PATHS * E
    for q0 in range(0, NZ, BZ):
        q = q0 + q_ar
        q_ok = q < NZ
        acc = tl.zeros([BMC, BZ], dtype=z_ptr.dtype.element_ty)
        for k0 in range(0, Hh, BKZ):
            k = k0 + k_ar
            k_ok = k < Hh
            hv = tl.load(hh_ptr + rows3 * stride_hh + k, mask=row_ok3 & k_ok, other=0.0)
            wv = tl.load(zw_ptr + q * stride_zw + k, mask=q_ok & k_ok, other=0.0).to(z_ptr.dtype.element_ty)
            acc += tl.sum(hv * wv, axis=2)
        q2 = q0 + q2_ar
        zb = tl.load(zb_ptr + q2, mask=q2 < NUM_SCALED_PATHS * E, other=0.0).to(z_ptr.dtype.element_ty)
        tl.store(z_ptr + rows[:, None] * stride_z + q2, acc + zb, mask=row_ok[:, None] & (q2 < NZ))


@triton.jit
def _main_pregates(p_ptr, stride_p, xp_ptr, stride_xpb, bias_ptr, dw_ptr, z_ptr, stride_z,
                   g_ptr, stride_g, rows3, row_ok3, gate3, H, E,
                   LAYER_NORM: tl.constexpr, BMC: tl.constexpr, BN: tl.constexpr, PIPE: tl.constexpr):
    """a_y = d_x^y ⊙ XP_y + d_h^y ⊙ P_y + bias_y + beta^y -> scratch g; returns per-gate (mean, M2).

    The scaling vectors are generated here, chunk by chunk, from z and d_weight (E FMAs per value,
    12 paths): d_k[b, j] = Σ_e z[b, kE + e] · d_weight[k, j, e]. They never leave registers."""
    cols = tl.arange(0, BN)[None, None, :]
    mean = tl.zeros([BMC, 4, 1], dtype=g_ptr.dtype.element_ty)
    m2 = tl.zeros([BMC, 4, 1], dtype=g_ptr.dtype.element_ty)
    HE = H * E
    z_rows = z_ptr + rows3 * stride_z + gate3 * E  # [BMC, 4, 1]: path (x, gate) of each row
    for j0 in tl.range(0, H, BN, num_stages=PIPE):
        j = j0 + cols
        col_ok = j < H
        ok = row_ok3 & col_ok
        off = gate3 * H + j
        p = tl.load(p_ptr + rows3 * stride_p + off, mask=ok, other=0.0)
        xp = tl.load(xp_ptr + rows3 * stride_xpb + off, mask=ok, other=0.0)
        bias = tl.load(bias_ptr + off, mask=col_ok, other=0.0).to(g_ptr.dtype.element_ty)
        d_x = tl.zeros([BMC, 4, BN], dtype=g_ptr.dtype.element_ty)
        d_h = tl.zeros([BMC, 4, BN], dtype=g_ptr.dtype.element_ty)
        beta = tl.zeros([BMC, 4, BN], dtype=g_ptr.dtype.element_ty)
        w_cols = dw_ptr + gate3 * HE + j * E  # [1, 4, BN]: d_weight[gate, j, :]
        for e in range(E):
            z_x = tl.load(z_rows + e, mask=row_ok3, other=0.0)
            z_h = tl.load(z_rows + H_PATH * E + e, mask=row_ok3, other=0.0)
            z_b = tl.load(z_rows + BIAS_PATH * E + e, mask=row_ok3, other=0.0)
            w_x = tl.load(w_cols + e, mask=col_ok, other=0.0).to(g_ptr.dtype.element_ty)
            w_h = tl.load(w_cols + H_PATH * HE + e, mask=col_ok, other=0.0).to(g_ptr.dtype.element_ty)
            w_b = tl.load(w_cols + BIAS_PATH * HE + e, mask=col_ok, other=0.0).to(g_ptr.dtype.element_ty)
            d_x += z_x * w_x
            d_h += z_h * w_h
            beta += z_b * w_b
        a = d_x * xp + d_h * p + bias + beta
        tl.store(g_ptr + rows3 * stride_g + off, a, mask=ok)
        if LAYER_NORM:
            n_c = tl.minimum(H - j0, BN) * 1.0
            mean_c, m2_c = _chunk_moments(a, col_ok, n_c)
            mean, m2 = _chan_merge(j0 * 1.0, mean, m2, n_c, mean_c, m2_c)
    return mean, m2


@triton.jit
def _cell_step(rows, t, t64, B, H, Hh, E, lengths_ptr,
               ahat_ptr, stride_ahat,
               chat_prev_ptr, chat_new_ptr, hhat_prev_ptr, hhat_new_ptr, stride_hs,
               hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr, mh_ptr, stride_mhb,
               zw_ptr, stride_zw, zb_ptr, z_ptr, stride_z,
               p_ptr, stride_p, xp_ptr, stride_xpb, bias_ptr, dw_ptr, g_ptr, stride_g,
               c_prev_ptr, c_new_ptr, h_prev_ptr, h_new_ptr, stride_s,
               ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr, m_ptr, stride_mb, out_ptr, stride_ob,
               seed_ptr, p_drop, drop_scale, forget_bias, eps,
               LAYER_NORM: tl.constexpr, DROPOUT: tl.constexpr, BMC: tl.constexpr, BN: tl.constexpr,
               BZ: tl.constexpr, BKZ: tl.constexpr, PIPE: tl.constexpr):
    """Step t of the cell for ``rows``: every pointer is already step t's ``[B, *]`` slice (the
    state's previous and new slots, Â, z, P, XP, G, the masks, the output). The body of the
    per-step cell kernel and of the persistent kernel's cell phase (one place)."""
    row_ok = rows < B
    rows3 = rows[:, None, None]
    row_ok3 = row_ok[:, None, None]
    lens = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    alive3 = (t < lens)[:, None, None]
    gate3 = tl.arange(0, 4)[None, :, None]
    zeros_g = tl.zeros([BMC, 4, 1], dtype=g_ptr.dtype.element_ty)

    # 0. recurrent dropout: DROPOUT 0 off, 1 the mask tensors, 2 seeded: this step's masks are
    #    drawn into the mask scratch (m_ptr = [B, H + Hh], mh_ptr = m_ptr + H)
    if DROPOUT == 2:
        _draw_masks(seed_ptr, m_ptr, stride_mb, rows, row_ok, t64, B, H + Hh, p_drop, drop_scale, BMC, BN)
        tl.debug_barrier()

    # 1. hyper cell (state ĥ, ĉ) from its pre-gates Â
    hg_mean = zeros_g
    hg_rstd = zeros_g
    if LAYER_NORM:
        hg_mean, hg_m2 = _gate_stats(ahat_ptr, stride_ahat, rows3, row_ok3, gate3, Hh, BMC, BN, PIPE)
        hg_rstd = tl.rsqrt(hg_m2 / Hh + eps)
    hc_mean, hc_m2 = _update_pass(
        ahat_ptr, stride_ahat, hg_mean, hg_rstd, hln_w_ptr, hln_b_ptr, Hh,
        chat_prev_ptr, chat_new_ptr, hhat_prev_ptr, hhat_new_ptr, stride_hs,
        mh_ptr, stride_mhb, out_ptr, stride_ob,
        rows3, row_ok3, alive3, gate3, forget_bias, LAYER_NORM, DROPOUT > 0, False, BMC, BN, PIPE)
    if LAYER_NORM:
        tl.debug_barrier()
        _output_pass(ahat_ptr, stride_ahat, hg_mean, hg_rstd, hln_w_ptr, hln_b_ptr, Hh,
                     chat_new_ptr, hhat_prev_ptr, hhat_new_ptr, stride_hs,
                     hc_mean, tl.rsqrt(hc_m2 / Hh + eps), hlnc_w_ptr, hlnc_b_ptr,
                     out_ptr, stride_ob, rows3, row_ok3, alive3, gate3, False, BMC, BN, PIPE)
    tl.debug_barrier()

    # 2. the 12 embeddings of this step, from the new ĥ_t
    _embeddings(hhat_new_ptr, stride_hs, zw_ptr, stride_zw, zb_ptr, z_ptr, stride_z, rows, row_ok, Hh, E,
                BMC, BZ, BKZ)
    tl.debug_barrier()

    # 3. main cell: pre-gates with in-register scaling vectors, per-gate LN, update, LN(c), h
    g_mean, g_m2 = _main_pregates(p_ptr, stride_p, xp_ptr, stride_xpb, bias_ptr, dw_ptr,
                                  z_ptr, stride_z, g_ptr, stride_g, rows3, row_ok3, gate3, H, E,
                                  LAYER_NORM, BMC, BN, PIPE)
    g_rstd = tl.rsqrt(g_m2 / H + eps)
    tl.debug_barrier()
    c_mean, c_m2 = _update_pass(
        g_ptr, stride_g, g_mean, g_rstd, ln_w_ptr, ln_b_ptr, H,
        c_prev_ptr, c_new_ptr, h_prev_ptr, h_new_ptr, stride_s,
        m_ptr, stride_mb, out_ptr, stride_ob,
        rows3, row_ok3, alive3, gate3, forget_bias, LAYER_NORM, DROPOUT > 0, True, BMC, BN, PIPE)
    if LAYER_NORM:
        tl.debug_barrier()
        _output_pass(g_ptr, stride_g, g_mean, g_rstd, ln_w_ptr, ln_b_ptr, H,
                     c_new_ptr, h_prev_ptr, h_new_ptr, stride_s,
                     c_mean, tl.rsqrt(c_m2 / H + eps), lnc_w_ptr, lnc_b_ptr,
                     out_ptr, stride_ob, rows3, row_ok3, alive3, gate3, True, BMC, BN, PIPE)


@triton.jit(do_not_specialize=["t"])
def hyper_lstm_cell_kernel(
    t, n_slots, B, H, Hh, E, lengths_ptr,            # lengths: int32 [B] on the device
    # hyper cell
    ahat_ptr, stride_aht, stride_ahat,               # Â [T', B, 4Hh] fp32 (from the gates kernel)
    chat_prev_ptr, hhat_prev_ptr, slot_hs,           # state rings ĉ, ĥ [S, B, Hh] fp32: read slot t % S,
    chat_new_ptr, hhat_new_ptr, slot_hs_new,         #   write slot (t + 1) % S (slot_*_new 0: one scratch)
    stride_hs,
    hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr,    # None without layer norm
    mh_ptr, stride_mht, stride_mhb,                  # hyper dropout masks [T, B, Hh] (fp32); None without
    # embeddings
    zw_ptr, stride_zw, zb_ptr,                       # z_weight [12E, Hh], z_bias [8E]
    z_ptr, stride_zt, stride_z,                      # z [T', B, 12E] fp32
    # main cell
    p_ptr, stride_pt, stride_p,                      # P [T', B, 4H] fp32 (from the gates kernel)
    xp_ptr, stride_xpt, stride_xpb,                  # main x-projection [T, B, 4H] fp32 (view)
    bias_ptr, dw_ptr,                                # bias [4H], d_weight [12, H, E] (contiguous)
    g_ptr, stride_gt, stride_g,                      # pre-norm gates [T', B, 4H] fp32
    c_prev_ptr, h_prev_ptr, slot_s,                  # state rings c, h [S, B, H] fp32, as ĉ, ĥ
    c_new_ptr, h_new_ptr, slot_s_new,
    stride_s,
    ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr,        # None without layer norm
    m_ptr, stride_mt, stride_mb,                     # main dropout masks [T, B, H] (fp32; seeded: the
                                                     #   [B, H + Hh] scratch, t-stride 0); None without
    out_ptr, stride_ot, stride_ob,                   # output [T, B, H]
    seed_ptr, p_drop, drop_scale,                    # seeded dropout (DROPOUT == 2): int64 seed, p, 1/(1-p)
    forget_bias, eps,
    LAYER_NORM: tl.constexpr, DROPOUT: tl.constexpr, BMC: tl.constexpr, BN: tl.constexpr, BZ: tl.constexpr,
    BKZ: tl.constexpr, PIPE: tl.constexpr,
):
    rows = (tl.program_id(0) * BMC + tl.arange(0, BMC)).to(tl.int64)  # int64: an output view may have any strides
    # step t's slices of every per-step buffer, from the base pointers (int64 offsets)
    t64 = tl.full([], 0, tl.int64) + t  # also valid if t were specialised to a constexpr
    prev = (t % n_slots).to(tl.int64)  # a 32-bit modulo (a 64-bit one is a long routine)
    new = ((t + 1) % n_slots).to(tl.int64)
    _cell_step(rows, t, t64, B, H, Hh, E, lengths_ptr,
               ahat_ptr + t64 * stride_aht, stride_ahat,
               chat_prev_ptr + prev * slot_hs, chat_new_ptr + new * slot_hs_new,
               hhat_prev_ptr + prev * slot_hs, hhat_new_ptr + new * slot_hs_new, stride_hs,
               hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr,
               mh_ptr + t64 * stride_mht if DROPOUT > 0 else mh_ptr, stride_mhb,
               zw_ptr, stride_zw, zb_ptr, z_ptr + t64 * stride_zt, stride_z,
               p_ptr + t64 * stride_pt, stride_p, xp_ptr + t64 * stride_xpt, stride_xpb, bias_ptr, dw_ptr,
               g_ptr + t64 * stride_gt, stride_g,
               c_prev_ptr + prev * slot_s, c_new_ptr + new * slot_s_new,
               h_prev_ptr + prev * slot_s, h_new_ptr + new * slot_s_new, stride_s,
               ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr,
               m_ptr + t64 * stride_mt if DROPOUT > 0 else m_ptr, stride_mb,
               out_ptr + t64 * stride_ot, stride_ob,
               seed_ptr, p_drop, drop_scale, forget_bias, eps,
               LAYER_NORM, DROPOUT, BMC, BN, BZ, BKZ, PIPE)


# --------------------------------------------------------------------------------------------
# argument types, for the ahead-of-time compile check (hyperkern.compile_check)
# --------------------------------------------------------------------------------------------

# arguments that are always fp32 / int buffers, whatever the parameters' dtype; the other pointers
# (parameters, the output) have the inputs' dtype
_F32_BUFFERS = ("h_ptr", "hh_ptr", "xph_ptr", "p_ptr", "ahat_ptr", "chat_prev_ptr", "chat_new_ptr",
                "hhat_prev_ptr", "hhat_new_ptr", "z_ptr", "xp_ptr", "g_ptr", "c_prev_ptr", "c_new_ptr",
                "h_prev_ptr", "h_new_ptr", "m_ptr", "mh_ptr")
ARG_TYPES = dict(
    pointers={**{n: "fp32" for n in _F32_BUFFERS}, "lengths_ptr": "i32", "seed_ptr": "i64"},
    default_pointer="param",
    scalars={n: "fp32" for n in ("forget_bias", "eps", "p_drop", "drop_scale")},
)
