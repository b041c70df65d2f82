"""Fused Triton backward (BPTT) kernels of one HyperLSTM cell (SPEC §1): two launches per step.

The training forward (``fused_triton.run_sequence(save=True)``) keeps, per step, the states
``h, c, ĥ, ĉ`` ([T+1, B, *]), the raw recurrent product ``P = h_{t-1} @ W_hh^T``, the main pre-norm
gates ``G``, the hyper pre-norm gates ``Â`` and the embeddings ``z`` (all fp32), plus the hoisted
``XP``. The backward (``fused_triton.run_backward``) walks time in reverse, per step t:

1. :func:`hyper_lstm_cell_bwd_kernel` — grid ``cdiv(B, BMC)``; a program owns whole rows:

   - seeded recurrent dropout: the step's masks drawn again exactly as the forward drew them
     (``_draw_masks``, the forward module's first pass);

   - main cell: LN statistics of G and c_t rebuilt from the saved tensors, then the gradient
     through LN(c), the LSTM update and the per-gate LN -> ``da`` (main pre-norm gates), ``dc_{t-1}``;
     the post-LN gate gradients ``dg`` and the LN(c) input gradients ``dcn`` are stored per step
     for the layer-norm parameter gradients (after the loop);
   - row scaling: ``d_x, d_h`` regenerated from z and d_weight in registers (never stored):
     ``DXP[t] = d_x ⊙ da`` (-> d x, d weight_ih), ``DWH[t] = d_h ⊙ da`` (-> dh_{t-1}, d weight_hh),
     and ``dz_k = Σ_j dd_k[:, j] d_weight[k, j, :]`` with ``dd = (da ⊙ XP, da ⊙ P, da)``
     accumulated in registers over the row (``DZ[t]``);
   - hyper cell: ``dĥ_t = dĥ_carry + dz @ z_weight``, then the same gated-cell backward over Hh
     -> ``dÂ`` (stored into the hyper half of DXP[t]) and ``dĉ_{t-1}``.

2. :func:`hyper_lstm_gates_bwd_kernel` — grid ``(cdiv(H, BN) + cdiv(Hh, BN), cdiv(B, BM))``, a
   tiled GEMM: ``dh_{t-1} = DWH[t] @ W_hh + dÂ @ hyper_weight_ih[:, X:]``,
   ``dĥ_{t-1} = dÂ @ hyper_weight_hh``.

Past a sequence's end (``t >= length``) every per-step gradient row is zero and the state
gradients pass through unchanged. Every sum over time (all weight, bias and layer-norm
gradients, and d_weight's) is a library GEMM / reduction after the loop over the stacked
per-step buffers: no atomics anywhere, so repeated backward passes are bitwise identical.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hyperkern.kernels.hyper_lstm_fwd import (  # shared helpers and constants, one definition
    BIAS_PATH, H_PATH, NUM_PATHS, _chan_merge, _chunk_moments, _draw_masks, _gate_stats, _pick, _tanh,
)


@triton.jit
def _row_stats(c_ptr, stride_c, rows3, row_ok3, N, BMC: tl.constexpr, BN: tl.constexpr):
    """(mean, M2) over N columns of ``c[rows, :N]`` as [BMC, 1, 1]."""
    cols = tl.arange(0, BN)[None, None, :]
    mean = tl.zeros([BMC, 1, 1], dtype=c_ptr.dtype.element_ty)
    m2 = tl.zeros([BMC, 1, 1], dtype=c_ptr.dtype.element_ty)
    for j0 in range(0, N, BN):
        j = j0 + cols
        col_ok = j < N
        c = tl.load(c_ptr + rows3 * stride_c + j, mask=row_ok3 & col_ok, other=0.0)
        n_c = tl.minimum(N - j0, BN) * 1.0
        mean_c, m2_c = _chunk_moments(c, col_ok, n_c)
        mean, m2 = _chan_merge(j0 * 1.0, mean, m2, n_c, mean_c, m2_c)
    return mean, m2


@triton.jit
def _cell_bwd(a_ptr, stride_a, N,                       # saved pre-norm gates [rows, 4N]
              c_prev_ptr, c_new_ptr, stride_s,          # saved c_{t-1}, c_t
              dh_ptr, stride_dh, dh2_ptr, stride_dh2,   # dh (+ dh2 if ADD_DH2), [rows, N]
              dc_ptr, dcp_ptr, stride_dc,               # in: dc_t; out: dc_{t-1}
              lnw_ptr, lnb_ptr, lncw_ptr, lncb_ptr,
              m_ptr, stride_m,
              da_ptr, stride_da,                        # out: d pre-norm gates [rows, 4N]
              dg_ptr, stride_dg, dcn_ptr, stride_dcn,   # out (LAYER_NORM): dg [rows, 4N], dcn [rows, N]
              rows3, row_ok3, alive3, gate3, forget_bias, eps,
              LAYER_NORM: tl.constexpr, HAS_MASK: tl.constexpr, ADD_DH2: tl.constexpr, BMC: tl.constexpr,
              BN: tl.constexpr):
    """Backward of one gated cell (main or hyper) for the program's rows; see the module doc."""
    cols = tl.arange(0, BN)[None, None, :]
    zeros_g = tl.zeros([BMC, 4, 1], dtype=c_new_ptr.dtype.element_ty)
    zeros_r = tl.zeros([BMC, 1, 1], dtype=c_new_ptr.dtype.element_ty)
    g_mean = zeros_g
    g_rstd = zeros_g
    c_mean = zeros_r
    c_rstd = zeros_r
    s1 = zeros_r  # Σ dcn·cw        (LN(c) backward)
    s2 = zeros_r  # Σ dcn·cw·ĉn
    if LAYER_NORM:
        g_mean, g_m2 = _gate_stats(a_ptr, stride_a, rows3, row_ok3, gate3, N, BMC, BN, 1)
        g_rstd = tl.rsqrt(g_m2 / N + eps)
        c_mean, c_m2 = _row_stats(c_new_ptr, stride_s, rows3, row_ok3, N, BMC, BN)
        c_rstd = tl.rsqrt(c_m2 / N + eps)
        # pass A: the two row sums of the LN(c) backward
        for j0 in range(0, N, BN):
            j = j0 + cols
            col_ok = j < N
            ok = row_ok3 & col_ok
            a_o = tl.load(a_ptr + rows3 * stride_a + 3 * N + j, mask=ok, other=0.0)
            w_o = tl.load(lnw_ptr + 3 * N + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            b_o = tl.load(lnb_ptr + 3 * N + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            s_o = tl.sigmoid((a_o - _pick(g_mean, gate3, 3)) * _pick(g_rstd, gate3, 3) * w_o + b_o)
            c = tl.load(c_new_ptr + rows3 * stride_s + j, mask=ok, other=0.0)
            cw = tl.load(lncw_ptr + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            cb = tl.load(lncb_ptr + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            cn = (c - c_mean) * c_rstd
            tc = _tanh(cn * cw + cb)
            dh = tl.load(dh_ptr + rows3 * stride_dh + j, mask=ok, other=0.0)
            if ADD_DH2:
                dh += tl.load(dh2_ptr + rows3 * stride_dh2 + j, mask=ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            dcnw = tl.where(ok, dh * s_o * (1.0 - tc * tc) * cw, 0.0)
            s1 += tl.sum(dcnw, axis=2, keep_dims=True)
            s2 += tl.sum(dcnw * cn, axis=2, keep_dims=True)
    s1 = s1 / N
    s2 = s2 / N
    # pass B: dc, the gate gradients, dc_{t-1}; per-gate sums of the LN backward
    t1 = zeros_g  # Σ dg·w
    t2 = zeros_g  # Σ dg·w·an
    for j0 in range(0, N, BN):
        j = j0 + cols
        col_ok = j < N
        ok = row_ok3 & col_ok
        okg = ok & (gate3 < 4)
        a = tl.load(a_ptr + rows3 * stride_a + gate3 * N + j, mask=okg, other=0.0)
        if LAYER_NORM:
            w = tl.load(lnw_ptr + gate3 * N + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            b = tl.load(lnb_ptr + gate3 * N + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            an = (a - g_mean) * g_rstd
            a = an * w + b
        s = tl.sigmoid(a + tl.where(gate3 == 1, forget_bias, 0.0))
        s_i = _pick(s, gate3, 0)
        s_f = _pick(s, gate3, 1)
        s_o = _pick(s, gate3, 3)
        tg = _tanh(_pick(a, gate3, 2))
        rd = 1.0
        if HAS_MASK:  # recurrent dropout on tanh(g)
            rd = tl.load(m_ptr + rows3 * stride_m + j, mask=ok, other=1.0).to(c_new_ptr.dtype.element_ty)
        s_off = rows3 * stride_s + j
        c_prev = tl.load(c_prev_ptr + s_off, mask=ok, other=0.0)
        c = tl.load(c_new_ptr + s_off, mask=ok, other=0.0)
        dh = tl.load(dh_ptr + rows3 * stride_dh + j, mask=ok, other=0.0)
        if ADD_DH2:
            dh += tl.load(dh2_ptr + rows3 * stride_dh2 + j, mask=ok, other=0.0).to(c_new_ptr.dtype.element_ty)
        dc_in = tl.load(dc_ptr + rows3 * stride_dc + j, mask=ok, other=0.0)
        if LAYER_NORM:
            cw = tl.load(lncw_ptr + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            cb = tl.load(lncb_ptr + j, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            cn = (c - c_mean) * c_rstd
            tc = _tanh(cn * cw + cb)
            dcn = dh * s_o * (1.0 - tc * tc)
            dc = dc_in + c_rstd * (dcn * cw - s1 - cn * s2)
            tl.store(dcn_ptr + rows3 * stride_dcn + j, tl.where(alive3, dcn, 0.0), mask=ok)
        else:
            tc = _tanh(c)
            dc = dc_in + dh * s_o * (1.0 - tc * tc)
        # d/d activations (σ(i), σ(f), tanh(g), σ(o)), then through them
        dact = tl.where(gate3 == 0, dc * (tg * rd),
                        tl.where(gate3 == 1, dc * c_prev,
                                 tl.where(gate3 == 2, dc * s_i * rd, dh * tc)))
        dg = tl.where(gate3 == 2, dact * (1.0 - tg * tg), dact * s * (1.0 - s))
        dg = tl.where(alive3, dg, 0.0)
        tl.store(dcp_ptr + rows3 * stride_dc + j, tl.where(alive3, dc * s_f, dc_in), mask=ok)
        if LAYER_NORM:
            tl.store(dg_ptr + rows3 * stride_dg + gate3 * N + j, dg, mask=okg)
            dgw = tl.where(okg, dg * w, 0.0)
            t1 += tl.sum(dgw, axis=2, keep_dims=True)
            t2 += tl.sum(dgw * an, axis=2, keep_dims=True)
        else:
            tl.store(da_ptr + rows3 * stride_da + gate3 * N + j, dg, mask=okg)
    if LAYER_NORM:
        t1 = t1 / N
        t2 = t2 / N
        tl.debug_barrier()
        # pass C: through the per-gate LN (dg re-read from this program's own stores)
        for j0 in range(0, N, BN):
            j = j0 + cols
            col_ok = j < N
            okg = row_ok3 & col_ok & (gate3 < 4)
            off = gate3 * N + j
            a = tl.load(a_ptr + rows3 * stride_a + off, mask=okg, other=0.0)
            w = tl.load(lnw_ptr + off, mask=col_ok, other=0.0).to(c_new_ptr.dtype.element_ty)
            dg = tl.load(dg_ptr + rows3 * stride_dg + off, mask=okg, other=0.0)
            an = (a - g_mean) * g_rstd
            da = g_rstd * (dg * w - t1 - an * t2)
            tl.store(da_ptr + rows3 * stride_da + off, tl.where(alive3, da, 0.0), mask=okg)


@triton.jit(do_not_specialize=["t"])
def hyper_lstm_cell_bwd_kernel(
    t, B, H, Hh, E, lengths_ptr,
    # saved forward tensors (stride_*t: the time stride; step t's slice is taken here)
    g_ptr, stride_gt, stride_g,                       # main pre-norm gates G [T, B, 4H]
    p_ptr, stride_pt, stride_p,                       # P = h_{t-1} @ W_hh^T [T, B, 4H]
    xp_ptr, stride_xpt, stride_xpb,                   # XP_main [T, B, 4H] (view)
    z_ptr, stride_zt, stride_z,                       # z [T, B, 12E]
    c_ptr, slot_s, stride_s,                          # c [T+1, B, H]: c_{t-1} = slot t, c_t = slot t + 1
    ahat_ptr, stride_aht, stride_ahat,                # Â [T, B, 4Hh]
    chat_ptr, slot_hs, stride_hs,                     # ĉ [T+1, B, Hh]
    # parameters
    dw_ptr, zw_ptr, stride_zw,                        # d_weight [12, H, E], z_weight [12E, Hh]
    ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr,
    hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr,
    m_ptr, stride_mt, stride_mb,                      # dropout masks [T, B, H], [T, B, Hh] (fp32)
    mh_ptr, stride_mht, stride_mhb,
    # incoming gradients
    dout_ptr, stride_doutt, stride_dout,              # d out [T, B, H]
    # the state gradients' rings [2, B, *]: the gradient of state k sits in slot k % 2, so step t
    # reads slot (t + 1) % 2 (dh_t, dc_t, dĥ_t, dĉ_t) and writes slot t % 2 (dc_{t-1}, dĉ_{t-1})
    dh_ptr, slot_dh, stride_dh, dhh_ptr, slot_dhh, stride_dhh,
    dc_ptr, slot_dc, stride_dc, dch_ptr, slot_dch, stride_dch,
    # per-step gradient outputs [T, B, *]
    da_ptr, stride_dat, stride_da,                    # DA = d main pre-norm gates [T, B, 4H]
    dxp_ptr, stride_dxpt, stride_dxp,                 # DXP_main = d_x ⊙ da; DXP_hyper = dÂ: one
    dahat_ptr,                                        #   [T, B, 4H + 4Hh] buffer (two column views)
    dwh_ptr, stride_dwht, stride_dwh,                 # DWH = d_h ⊙ da [T, B, 4H]
    dz_ptr, stride_dzt, stride_dz,                    # DZ [T, B, 12E]
    dg_ptr, stride_dgt, stride_dg,                    # main dg [T, B, 4H], dcn [T, B, H] (LN)
    dcn_ptr, stride_dcnt, stride_dcn,
    hdg_ptr, stride_hdgt, stride_hdg,                 # hyper dg [T, B, 4Hh], dcn [T, B, Hh] (LN)
    hdcn_ptr, stride_hdcnt, stride_hdcn,
    dhh_tot_ptr, stride_dht,                          # scratch: total dĥ_t [B, Hh]
    seed_ptr, p_drop, drop_scale,                     # as in the forward cell kernel
    forget_bias, eps,
    LAYER_NORM: tl.constexpr, DROPOUT: tl.constexpr, BMC: tl.constexpr, BN: tl.constexpr, BE: tl.constexpr,
    BZ: tl.constexpr,
):
    pid = tl.program_id(0)
    rows = (pid * BMC + tl.arange(0, BMC)).to(tl.int64)  # int64 row offsets (see the forward kernels)
    row_ok = rows < B
    rows3 = rows[:, None, None]
    row_ok3 = row_ok[:, None, None]
    lens = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    alive3 = (t < lens)[:, None, None]
    gate3 = tl.arange(0, 4)[None, :, None]
    # step t's slices of every per-step buffer, from the base pointers (int64 offsets)
    t64 = tl.full([], 0, tl.int64) + t
    cur = (t64 + 1) % 2
    nxt = t64 % 2
    g_ptr += t64 * stride_gt
    p_ptr += t64 * stride_pt
    xp_ptr += t64 * stride_xpt
    z_ptr += t64 * stride_zt
    c_prev_ptr = c_ptr + t64 * slot_s
    ahat_ptr += t64 * stride_aht
    chat_prev_ptr = chat_ptr + t64 * slot_hs
    if DROPOUT == 1:  # the given masks; seeded (2): one scratch, drawn again below (stride_mt 0)
        m_ptr += t64 * stride_mt
        mh_ptr += t64 * stride_mht
    dout_ptr += t64 * stride_doutt
    dh_in = dh_ptr + cur * slot_dh
    dhh_in = dhh_ptr + cur * slot_dhh
    dc_in = dc_ptr + cur * slot_dc
    dc_out = dc_ptr + nxt * slot_dc
    dch_in = dch_ptr + cur * slot_dch
    dch_out = dch_ptr + nxt * slot_dch
    da_ptr += t64 * stride_dat
    dahat_ptr += t64 * stride_dxpt
    dxp_ptr += t64 * stride_dxpt
    dwh_ptr += t64 * stride_dwht
    dz_ptr += t64 * stride_dzt
    if LAYER_NORM:
        dg_ptr += t64 * stride_dgt
        dcn_ptr += t64 * stride_dcnt
        hdg_ptr += t64 * stride_hdgt
        hdcn_ptr += t64 * stride_hdcnt

    # 0. seeded recurrent dropout (DROPOUT 2): the forward's masks of step t, drawn again
    if DROPOUT == 2:
        _draw_masks(seed_ptr, m_ptr, stride_mb, rows, row_ok, t64, B, H + Hh, p_drop, drop_scale, BMC, BN)
        tl.debug_barrier()

    # 1. main cell: dh_t = carry + d out[t]  ->  da (DA[t]), dc_{t-1}
    _cell_bwd(g_ptr, stride_g, H, c_prev_ptr, c_prev_ptr + slot_s, stride_s,
              dh_in, stride_dh, dout_ptr, stride_dout, dc_in, dc_out, stride_dc,
              ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr, m_ptr, stride_mb,
              da_ptr, stride_da, dg_ptr, stride_dg, dcn_ptr, stride_dcn,
              rows3, row_ok3, alive3, gate3, forget_bias, eps, LAYER_NORM, DROPOUT > 0, True, BMC, BN)
    tl.debug_barrier()

    # 2. row scaling: DXP = d_x ⊙ da, DWH = d_h ⊙ da, dz = Σ_j dd_k[j] d_weight[k, j, :]
    cols = tl.arange(0, BN)[None, None, :]
    e_ar = tl.arange(0, BE)[None, None, :]
    HE = H * E
    z_rows = z_ptr + rows3 * stride_z + gate3 * E
    dz_x = tl.zeros([BMC, 4, BE], dtype=da_ptr.dtype.element_ty)
    dz_h = tl.zeros([BMC, 4, BE], dtype=da_ptr.dtype.element_ty)
    dz_b = tl.zeros([BMC, 4, BE], dtype=da_ptr.dtype.element_ty)
    for j0 in range(0, H, BN):
        j = j0 + cols
        col_ok = j < H
        ok = row_ok3 & col_ok & (gate3 < 4)
        off = gate3 * H + j
        da = tl.load(da_ptr + rows3 * stride_da + off, mask=ok, other=0.0)
        xp = tl.load(xp_ptr + rows3 * stride_xpb + off, mask=ok, other=0.0)
        p = tl.load(p_ptr + rows3 * stride_p + off, mask=ok, other=0.0)
        dd_x = da * xp
        dd_h = da * p
        d_x = tl.zeros([BMC, 4, BN], dtype=da_ptr.dtype.element_ty)
        d_h = tl.zeros([BMC, 4, BN], dtype=da_ptr.dtype.element_ty)
        w_cols = dw_ptr + gate3 * HE + j * E
        for e in range(E):
            z_x = tl.load(z_rows + e, mask=row_ok3, other=0.0)
            z_h = tl.load(z_rows + H_PATH * E + e, mask=row_ok3, other=0.0)
            w_x = tl.load(w_cols + e, mask=col_ok, other=0.0).to(da_ptr.dtype.element_ty)
            w_h = tl.load(w_cols + H_PATH * HE + e, mask=col_ok, other=0.0).to(da_ptr.dtype.element_ty)
            w_b = tl.load(w_cols + BIAS_PATH * HE + e, mask=col_ok, other=0.0).to(da_ptr.dtype.element_ty)
            d_x += z_x * w_x
            d_h += z_h * w_h
            sel = e_ar == e
            dz_x += tl.where(sel, tl.sum(dd_x * w_x, axis=2, keep_dims=True), 0.0)
            dz_h += tl.where(sel, tl.sum(dd_h * w_h, axis=2, keep_dims=True), 0.0)
            dz_b += tl.where(sel, tl.sum(da * w_b, axis=2, keep_dims=True), 0.0)
        tl.store(dxp_ptr + rows3 * stride_dxp + off, da * d_x, mask=ok)
        tl.store(dwh_ptr + rows3 * stride_dwh + off, da * d_h, mask=ok)
    dz_off = dz_ptr + rows3 * stride_dz + gate3 * E + e_ar
    e_ok = row_ok3 & (e_ar < E) & (gate3 < 4)
    tl.store(dz_off, dz_x, mask=e_ok)
    tl.store(dz_off + H_PATH * E, dz_h, mask=e_ok)
    tl.store(dz_off + BIAS_PATH * E, dz_b, mask=e_ok)
    tl.debug_barrier()

    # 3. dĥ_t = carry + dz @ z_weight -> scratch (this program's rows)
    NZ = NUM_PATHS * E
    q_ar = tl.arange(0, BZ)[None, :, None]
    for k0 in range(0, Hh, BN):
        k = k0 + cols
        k_ok = k < Hh
        acc = tl.load(dhh_in + rows3 * stride_dhh + k, mask=row_ok3 & k_ok, other=0.0)
        for q0 in range(0, NZ, BZ):
            q = q0 + q_ar
            q_ok = q < NZ
            dzv = tl.load(dz_ptr + rows3 * stride_dz + q, mask=row_ok3 & q_ok, other=0.0)
            wv = tl.load(zw_ptr + q * stride_zw + k, mask=q_ok & k_ok, other=0.0).to(da_ptr.dtype.element_ty)
            acc += tl.sum(dzv * wv, axis=1, keep_dims=True)
        tl.store(dhh_tot_ptr + rows3 * stride_dht + k, acc, mask=row_ok3 & k_ok)
    tl.debug_barrier()

    # 4. hyper cell: -> dÂ (the hyper half of DXP[t]), dĉ_{t-1}
    _cell_bwd(ahat_ptr, stride_ahat, Hh, chat_prev_ptr, chat_prev_ptr + slot_hs, stride_hs,
              dhh_tot_ptr, stride_dht, dhh_tot_ptr, stride_dht, dch_in, dch_out, stride_dch,
              hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr, mh_ptr, stride_mhb,
              dahat_ptr, stride_dxp, hdg_ptr, stride_hdg, hdcn_ptr, stride_hdcn,
              rows3, row_ok3, alive3, gate3, forget_bias, eps, LAYER_NORM, DROPOUT > 0, False, BMC, BN)


@triton.jit
def _tile_matmul_kn(acc, a_ptr, stride_a, rows, row_ok, w_ptr, stride_w, cols, col_ok, K,
                    BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """acc[BM, BN] += a[rows, :K] @ w[:K, cols] (a fp32; w any float dtype, upcast to fp32)."""
    kk = tl.arange(0, BK)
    a_ptrs = a_ptr + rows[:, None] * stride_a + kk[None, :]
    w_ptrs = w_ptr + kk[:, None] * stride_w + cols[None, :]
    for k0 in range(0, K, BK):
        k_ok = (k0 + kk) < K
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0).to(a_ptr.dtype.element_ty)
        # out_dtype = the accumulator's: the default (fp32) except in the float64 interpreter test
        # mode, where Triton 3.7 insists on it being given
        acc = tl.dot(a, w, acc, input_precision=DOT_PRECISION, out_dtype=acc.dtype)
        a_ptrs += BK
        w_ptrs += BK * stride_w
    return acc


@triton.jit(do_not_specialize=["t"])
def hyper_lstm_gates_bwd_kernel(
    dwh_ptr, stride_dwht, stride_dwh,                 # DWH [T, B, 4H] fp32
    dahat_ptr, stride_daht, stride_dahat,             # dÂ [T, B, 4Hh] fp32 (a view)
    w_hh_ptr, stride_whh,                             # weight_hh [4H, H]
    w_hih_ptr, stride_whih,                           # hyper_weight_ih[:, X:] [4Hh, H] (view)
    w_hhh_ptr, stride_whhh,                           # hyper_weight_hh [4Hh, Hh]
    dh_ptr, slot_dh, stride_dh,                       # rings [2, B, H], [2, B, Hh]: read dh_t, dĥ_t (dead
    dhh_ptr, slot_dhh, stride_dhh,                    #   rows) from slot (t + 1) % 2, write slot t % 2
    lengths_ptr, t, B, H, Hh, n_main,
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    rows = (pid_m * BM + tl.arange(0, BM)).to(tl.int64)
    row_ok = rows < B
    lens = tl.load(lengths_ptr + rows, mask=row_ok, other=0)
    dead = (t >= lens)[:, None]
    t64 = tl.full([], 0, tl.int64) + t
    dwh_ptr += t64 * stride_dwht
    dahat_ptr += t64 * stride_daht
    # (the rings' slots are taken after the K loops: computed here they would hold registers
    # across them, which spilled 4 B in the fp16 BM32 row on sm_90a with Triton 3.6)
    acc = tl.zeros([BM, BN], dtype=dh_ptr.dtype.element_ty)
    if pid_n < n_main:
        cols = pid_n * BN + tl.arange(0, BN)
        col_ok = cols < H
        acc = _tile_matmul_kn(acc, dwh_ptr, stride_dwh, rows, row_ok, w_hh_ptr, stride_whh, cols, col_ok,
                              4 * H, BK, DOT_PRECISION)
        acc = _tile_matmul_kn(acc, dahat_ptr, stride_dahat, rows, row_ok, w_hih_ptr, stride_whih, cols, col_ok,
                              4 * Hh, BK, DOT_PRECISION)
        _carry_store(acc, dh_ptr, slot_dh, stride_dh, rows, row_ok, cols, col_ok, dead, t)
    else:
        cols = (pid_n - n_main) * BN + tl.arange(0, BN)
        col_ok = cols < Hh
        acc = _tile_matmul_kn(acc, dahat_ptr, stride_dahat, rows, row_ok, w_hhh_ptr, stride_whhh, cols, col_ok,
                              4 * Hh, BK, DOT_PRECISION)
        _carry_store(acc, dhh_ptr, slot_dhh, stride_dhh, rows, row_ok, cols, col_ok, dead, t)


@triton.jit
def _carry_store(acc, ring_ptr, slot, stride, rows, row_ok, cols, col_ok, dead, t):
    """Slot t % 2 of a gradient ring = ``acc`` + (for ``dead`` rows, past their sequence's end) the
    carried gradient in slot (t + 1) % 2, which flows through the dead step unchanged."""
    m = row_ok[:, None] & col_ok[None, :]
    off = rows[:, None] * stride + cols[None, :]
    cur = ((t + 1) % 2).to(tl.int64)
    nxt = (t % 2).to(tl.int64)
    carry = tl.load(ring_ptr + cur * slot + off, mask=m & dead, other=0.0)
    tl.store(ring_ptr + nxt * slot + off, acc + carry, mask=m)


# --------------------------------------------------------------------------------------------
# argument types, for the ahead-of-time compile check (hyperkern.compile_check)
# --------------------------------------------------------------------------------------------

# parameters and d out carry the inputs' dtype; every other pointer is an fp32 buffer (the masks too)
_PARAM_PTRS = ("dw_ptr", "zw_ptr", "ln_w_ptr", "ln_b_ptr", "lnc_w_ptr", "lnc_b_ptr", "hln_w_ptr", "hln_b_ptr",
               "hlnc_w_ptr", "hlnc_b_ptr", "dout_ptr", "w_hh_ptr", "w_hih_ptr", "w_hhh_ptr")
ARG_TYPES = dict(
    pointers={**{n: "param" for n in _PARAM_PTRS}, "lengths_ptr": "i32", "seed_ptr": "i64"},
    default_pointer="fp32",
    scalars={n: "fp32" for n in ("forget_bias", "eps", "p_drop", "drop_scale")},
)
