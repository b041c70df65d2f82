"""The persistent HyperLSTM forward: one launch runs every timestep of one cell (SPEC §1).

The launcher (``hyperkern/ops/hyper_lstm/fused_triton/persistent.py``) hoists the x-projections of
all T steps into one library GEMM (``XP [T, B, 4H + 4Hh]``, as the per-step launcher does), then
launches :func:`hyper_lstm_persistent_kernel` once with a grid of at most one program per SM (all
resident at once: a cooperative launch). Every program walks the time loop; per step t:

1. **products** — the work of the per-step gates kernel, as tiles ``(row block, column tile)``
   dealt round-robin to the programs (the same tiles every step, so each program streams the same
   slice of the weights from L2 every step): ``P = h_{t-1} @ weight_hh^T`` (main tiles, the four
   gates of BH hidden units) and ``Â = XP_hyper[t] + h_{t-1} @ hyper_weight_ih[:, X:]^T +
   ĥ_{t-1} @ hyper_weight_hh^T + hyper_bias`` (hyper tiles);
2. **grid sync (1)** — every P and Â tile of step t is written;
3. **cell** — the work of the per-step cell kernel, as row blocks of BMC rows dealt round-robin:
   the hyper cell (per-gate LN over Hh, update, LN(ĉ), ĥ_t), the 12 embeddings z, the main
   pre-gates with the scaling vectors generated in registers, per-gate LN over H, the update,
   LN(c_t), h_t and the output. A program owns whole rows here, so both layer norms' statistics are
   local: no sync for them;
4. **grid sync (2)** — every row of h_t, ĥ_t is written (what the next step's products read);
   skipped after the last step.

So **two grid-wide syncs per step, with or without layer norm** (2T − 1 per launch). The maths
is the per-step kernels' own: their bodies ``_products_step`` and ``_cell_step`` of
``hyper_lstm_fwd``, with the same block sizes, so under the interpreter the results equal the
per-step launcher's bit for bit. docs/persistent.md compares this split with a column-owned cell (four
syncs per step with layer norm) and gives the numbers behind the choice.

**Grid syncs never hang.** :func:`_grid_sync` is a monotonic counter barrier: sync k of the launch
completes when the counter reaches ``(k + 1) · n_sync``. Arrive: ``tl.debug_barrier()`` (every
thread's stores done), then one release ``atomic_add`` at GPU scope (SASS: ``MEMBAR.ALL.GPU`` +
``RED.STRONG.GPU``). Wait: poll the counter and the error flag with volatile loads (``LDG.STRONG``,
never served from L1) at most ``max_spin`` times; on success one acquire (SASS: ``CCTL.IVALL``, the
SM's L1 invalidated, so no later load reads a stale line) and ``tl.debug_barrier()`` so every
thread is ordered after it. On timeout, or when another program has already failed, the program
raises the error flag and stops working and arriving (``ok`` false); every other program then
stops at its next sync. The launcher reads the flag once after the launch and reruns the call with
the per-step kernels.

Under ``TRITON_INTERPRET=1`` the launcher uses a grid of one program, which walks every tile and
row block itself: each sync is met by its own arrival. Passing ``n_sync`` larger than the grid
makes a sync that can never complete (the tests' way to exercise the timeout path).

Modes are constexprs (``LAYER_NORM``, ``DROPOUT``: 0 off, 1 given mask tensors, 2 seeded: each row
block draws its step's masks with ``_draw_masks``, today's stream); an input a mode does not use is
None. Buffers with a step axis take a step stride (0 for a scratch reused every step); the state
buffers hold ``n_slots`` steps (step t reads slot ``t % n_slots``, writes ``(t + 1) % n_slots``: 2
for inference, T + 1 when every step's state is kept for the backward). Launch with keyword
arguments; the configurations live in ``hyperkern/ops/hyper_lstm/fused_triton/configs.py``.
"""
from __future__ import annotations

import triton
import triton.language as tl

from hyperkern.kernels.hyper_lstm_fwd import _cell_step, _products_step


@triton.jit
def _grid_sync(sync_ptr, err_ptr, k, n_sync, max_spin, ok):
    """Grid-wide sync number ``k`` of the launch (see the module doc). Returns whether it completed;
    a program that arrives with ``ok`` false neither arrives nor waits."""
    done = ok
    if ok:
        tl.debug_barrier()  # every thread of this program has issued its stores (CTA scope) ...
        tl.atomic_add(sync_ptr, 1, sem="release", scope="gpu")  # ... released at GPU scope with the arrival
        target = (tl.full([], 1, tl.int64) + k) * n_sync  # int64 (a plain int in the interpreter)
        count = tl.load(sync_ptr, volatile=True)
        failed = tl.load(err_ptr, volatile=True)
        spins = 0
        while (count < target) & (failed == 0) & (spins < max_spin):
            count = tl.load(sync_ptr, volatile=True)
            failed = tl.load(err_ptr, volatile=True)
            spins += 1
        if (count >= target) & (failed == 0):
            # what the arrivals released is visible (and the SM's L1 invalidated). Its result is used:
            # Triton 3.6 deletes an acquire add of 0 whose result is unused (no fence, no invalidation)
            count = tl.atomic_add(sync_ptr, 0, sem="acquire", scope="gpu")
        done = (count >= target) & (failed == 0)
        if not done:
            tl.atomic_xchg(err_ptr, 1, sem="relaxed", scope="gpu")  # stop every program; the host falls back
        tl.debug_barrier()  # every thread is ordered after the acquire
    return done


# The two phases are real calls (noinline), not inlined into the time loop: inlined, LLVM hoists
# their loop-invariant index and address arithmetic (~375 instructions) out of the time loop, where
# it stays live for the whole launch — 255 registers and 40-230 B of spills on sm_80 (compile
# check), where as calls the kernel needs 192-238 registers and spills nothing.
@triton.jit(noinline=True)
def _products_tile(q, t64, slot_prev, n_col, n_main, B, H, Hh,
                   hs_ptr, hhs_ptr, stride_st, stride_sb, stride_hst, stride_hsb,
                   w_hh_ptr, stride_whh, w_hih_ptr, stride_whih, w_hhh_ptr, stride_whhh, hbias_ptr,
                   xp_ptr, stride_xpt, stride_xpb, p_ptr, stride_pt, stride_pb, ahat_ptr, stride_at, stride_ab,
                   BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """Tile q of step t's products: the per-step gates kernel's program ``(q % n_col, q // n_col)``."""
    _products_step(q % n_col, q // n_col, t64, hs_ptr + slot_prev * stride_st, stride_sb,
                   hhs_ptr + slot_prev * stride_hst, stride_hsb, w_hh_ptr, stride_whh, w_hih_ptr, stride_whih,
                   w_hhh_ptr, stride_whhh, hbias_ptr, xp_ptr + 4 * H, stride_xpt, stride_xpb,
                   p_ptr, stride_pt, stride_pb, ahat_ptr, stride_at, stride_ab, B, H, Hh, n_main,
                   BM, BH, BK, DOT_PRECISION)


@triton.jit(noinline=True)
def _cell_rows(r, t, t64, slot_prev, slot_new, B, H, Hh, E, lengths_ptr,
               hs_ptr, cs_ptr, stride_st, stride_sb, hhs_ptr, chs_ptr, stride_hst, stride_hsb,
               ahat_ptr, stride_at, stride_ab, hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr,
               mh_ptr, stride_mht, stride_mhb,
               zw_ptr, stride_zw, zb_ptr, z_ptr, stride_zt, stride_zb,
               p_ptr, stride_pt, stride_pb, xp_ptr, stride_xpt, stride_xpb, bias_ptr, dw_ptr,
               g_ptr, stride_gt, stride_gb, ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr,
               m_ptr, stride_mt, stride_mb, out_ptr, stride_ot, stride_ob,
               seed_ptr, p_drop, drop_scale, forget_bias, eps,
               LAYER_NORM: tl.constexpr, DROPOUT: tl.constexpr, BMC: tl.constexpr, BN: tl.constexpr,
               BZ: tl.constexpr, BKZ: tl.constexpr, PIPE: tl.constexpr):
    """Row block r of step t's cell: the per-step cell kernel's program r."""
    _cell_step((r * BMC + tl.arange(0, BMC)).to(tl.int64), t, t64, B, H, Hh, E, lengths_ptr,
               ahat_ptr + t64 * stride_at, stride_ab,
               chs_ptr + slot_prev * stride_hst, chs_ptr + slot_new * stride_hst,
               hhs_ptr + slot_prev * stride_hst, hhs_ptr + slot_new * stride_hst, stride_hsb,
               hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr,
               mh_ptr + t64 * stride_mht if DROPOUT > 0 else mh_ptr, stride_mhb,
               zw_ptr, stride_zw, zb_ptr, z_ptr + t64 * stride_zt, stride_zb,
               p_ptr + t64 * stride_pt, stride_pb, xp_ptr + t64 * stride_xpt, stride_xpb, bias_ptr, dw_ptr,
               g_ptr + t64 * stride_gt, stride_gb,
               cs_ptr + slot_prev * stride_st, cs_ptr + slot_new * stride_st,
               hs_ptr + slot_prev * stride_st, hs_ptr + slot_new * stride_st, stride_sb,
               ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr,
               m_ptr + t64 * stride_mt if DROPOUT > 0 else m_ptr, stride_mb,
               out_ptr + t64 * stride_ot, stride_ob,
               seed_ptr, p_drop, drop_scale, forget_bias, eps,
               LAYER_NORM, DROPOUT, BMC, BN, BZ, BKZ, PIPE)


@triton.jit(do_not_specialize=["T", "n_slots", "n_sync", "max_spin"])
def hyper_lstm_persistent_kernel(
    T, B, H, Hh, E, lengths_ptr,                     # lengths: int32 [B] on the device
    # state slots [n_slots, B, *] fp32: step t reads slot t % n_slots and writes slot (t + 1) % n_slots
    hs_ptr, cs_ptr, stride_st, stride_sb,            # h, c [n_slots, B, H]
    hhs_ptr, chs_ptr, stride_hst, stride_hsb,        # ĥ, ĉ [n_slots, B, Hh]
    n_slots,
    # weights of the products
    w_hh_ptr, stride_whh,                            # weight_hh [4H, H]
    w_hih_ptr, stride_whih,                          # hyper_weight_ih[:, X:] [4Hh, H] (a view)
    w_hhh_ptr, stride_whhh,                          # hyper_weight_hh [4Hh, Hh]
    hbias_ptr,                                       # hyper_bias [4Hh]
    xp_ptr, stride_xpt, stride_xpb,                  # XP [T, B, 4H + 4Hh] fp32 (main columns, then hyper)
    # per-step buffers [., B, *] fp32 with a step stride (0: a scratch re-used every step)
    p_ptr, stride_pt, stride_pb,                     # P [., B, 4H]
    ahat_ptr, stride_at, stride_ab,                  # Â [., B, 4Hh]
    g_ptr, stride_gt, stride_gb,                     # pre-norm gates [., B, 4H]
    z_ptr, stride_zt, stride_zb,                     # embeddings [., B, 12E]
    # cell parameters
    hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr,    # None without layer norm
    zw_ptr, stride_zw, zb_ptr,                       # z_weight [12E, Hh], z_bias [8E]
    bias_ptr, dw_ptr,                                # bias [4H], d_weight [12, H, E] (contiguous)
    ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr,        # None without layer norm
    # recurrent dropout: masks [T, B, *] (DROPOUT 1) or the [B, H + Hh] scratch (2); None without
    m_ptr, stride_mt, stride_mb, mh_ptr, stride_mht, stride_mhb,
    seed_ptr, p_drop, drop_scale,                    # seeded dropout (DROPOUT == 2): int64 seed, p, 1/(1-p)
    out_ptr, stride_ot, stride_ob,                   # output [T, B, H]
    forget_bias, eps,
    # grid syncs: the arrival counter (int64) and the error flag (int32), zero before the launch
    sync_ptr, err_ptr, n_sync, max_spin,
    LAYER_NORM: tl.constexpr, DROPOUT: tl.constexpr,
    BM: tl.constexpr, BH: tl.constexpr, BK: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BMC: tl.constexpr, BN: tl.constexpr, BZ: tl.constexpr, BKZ: tl.constexpr, PIPE: tl.constexpr,
):
    pid = tl.program_id(0)
    n_prog = tl.num_programs(0)
    n_main = tl.cdiv(H, BH)
    n_col = n_main + tl.cdiv(Hh, BH)
    n_tiles = n_col * tl.cdiv(B, BM)
    n_rows = tl.cdiv(B, BMC)
    ok = pid >= 0  # this program has met every sync so far
    for t in range(0, T):
        t64 = tl.full([], 0, tl.int64) + t  # int64 offsets; also valid if t were specialised to a constexpr
        slot_prev = t64 % n_slots
        slot_new = (t64 + 1) % n_slots
        if ok:
            for q in range(pid, n_tiles, n_prog):
                _products_tile(q, t64, slot_prev, n_col, n_main, B, H, Hh,
                               hs_ptr, hhs_ptr, stride_st, stride_sb, stride_hst, stride_hsb,
                               w_hh_ptr, stride_whh, w_hih_ptr, stride_whih, w_hhh_ptr, stride_whhh, hbias_ptr,
                               xp_ptr, stride_xpt, stride_xpb, p_ptr, stride_pt, stride_pb,
                               ahat_ptr, stride_at, stride_ab, BM, BH, BK, DOT_PRECISION)
        ok = _grid_sync(sync_ptr, err_ptr, 2 * t, n_sync, max_spin, ok)  # (1) every P and Â tile of step t
        if ok:
            for r in range(pid, n_rows, n_prog):
                _cell_rows(r, t, t64, slot_prev, slot_new, B, H, Hh, E, lengths_ptr,
                           hs_ptr, cs_ptr, stride_st, stride_sb, hhs_ptr, chs_ptr, stride_hst, stride_hsb,
                           ahat_ptr, stride_at, stride_ab, hln_w_ptr, hln_b_ptr, hlnc_w_ptr, hlnc_b_ptr,
                           mh_ptr, stride_mht, stride_mhb,
                           zw_ptr, stride_zw, zb_ptr, z_ptr, stride_zt, stride_zb,
                           p_ptr, stride_pt, stride_pb, xp_ptr, stride_xpt, stride_xpb, bias_ptr, dw_ptr,
                           g_ptr, stride_gt, stride_gb, ln_w_ptr, ln_b_ptr, lnc_w_ptr, lnc_b_ptr,
                           m_ptr, stride_mt, stride_mb, out_ptr, stride_ot, stride_ob,
                           seed_ptr, p_drop, drop_scale, forget_bias, eps,
                           LAYER_NORM, DROPOUT, BMC, BN, BZ, BKZ, PIPE)
        if t + 1 < T:
            ok = _grid_sync(sync_ptr, err_ptr, 2 * t + 1, n_sync, max_spin, ok)  # (2) every row of h_t, ĥ_t


# --------------------------------------------------------------------------------------------
# argument types, for the ahead-of-time compile check (hyperkern.compile_check)
# --------------------------------------------------------------------------------------------

# always fp32 (the state, the x-projection and the per-step buffers) or integer, whatever the
# parameters' dtype; the other pointers (parameters, the output) have the inputs' dtype
_F32_BUFFERS = ("hs_ptr", "cs_ptr", "hhs_ptr", "chs_ptr", "xp_ptr", "p_ptr", "ahat_ptr", "g_ptr", "z_ptr",
                "m_ptr", "mh_ptr")
ARG_TYPES = dict(
    pointers={**{n: "fp32" for n in _F32_BUFFERS}, "lengths_ptr": "i32", "seed_ptr": "i64", "sync_ptr": "i64",
              "err_ptr": "i32"},
    default_pointer="param",
    scalars={n: "fp32" for n in ("forget_bias", "eps", "p_drop", "drop_scale")},
)
