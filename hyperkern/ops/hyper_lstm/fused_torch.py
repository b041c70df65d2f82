"""Fast PyTorch HyperLSTM backend (``backend="torch"``): the CPU path, and the blueprint of the
Triton kernels.

Decomposition (same as the kernels, see DESIGN.md):

- Before the loop, ONE GEMM projects every timestep's input for both cells:
  ``XP = x @ [weight_ih ; hyper_weight_ih[:, :X]]^T (+ hyper_bias)``, ``[T, B, 4H + 4Hh]``.
- ``h_t`` and ``h_hat_t`` live side by side in one buffer ``HS [T+1, B, H+Hh]`` so the hyper
  cell's two recurrent matmuls are one ``addmm`` against ``[hyper_weight_ih[:, X:], hyper_weight_hh]``.
- Per step: 2 matmuls (hyper gates, main ``h @ W_hh^T``), one ``addmm`` for the 12 embeddings z,
  one ``bmm`` for the 12 scaling vectors d, and the gate maths vectorised over the 4 gates.
- The backward (hand-written, reverse time) does per step only what the recurrence needs; every
  weight gradient that is a sum over time is one large matmul after the loop, over gradients the
  loop wrote into preallocated ``[T, B, ...]`` buffers. ``d_weight`` is the exception: its
  gradient is a tiny ``baddbmm`` per step (storing the 12 scaling-vector gradients for all steps
  would cost 12·T·B·H values).

Variable length uses the shrinking-batch scheme of packed sequences: sequences are sorted by
length, so at step t only the first ``n_t`` rows are alive; the rest keep their state.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .common import CellConfig, Lengths, Masks

_native_ln = torch.ops.aten.native_layer_norm.default
_native_ln_backward = torch.ops.aten.native_layer_norm_backward.default


def _active_counts(lengths: Lengths, T: int, B: int) -> List[int]:
    """Rows alive at each step (lengths sorted non-increasing) — like PackedSequence.batch_sizes."""
    if lengths is None:
        return [B] * T
    return [int(n) for n in (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).sum(1)]


class _GatedCell:
    """The gate maths shared by the main and the hyper cell, vectorised over the 4 gates.

    Pre-activations ``a`` come as ``[n, 4, K]`` (gate order i, f, g, o). With layer norm:
    per-gate LN over K, ``+ forget_bias`` on f after the LN, the LSTM update, and
    ``h = σ(o) · tanh(LN(c))``. ``forward`` writes c and h into the given views (slices of the
    sequence buffers) and returns what ``backward`` needs.
    """

    def __init__(self, K: int, cfg: CellConfig, like: Tensor, ln_w=None, ln_b=None, ln_cell_w=None, ln_cell_b=None):
        self.K, self.eps, self.layer_norm = K, cfg.ln_eps, cfg.layer_norm
        self.ln_w, self.ln_cell_w, self.ln_cell_b = ln_w, ln_cell_w, ln_cell_b
        fb = like.new_zeros(4, 1)
        fb[1] = cfg.forget_bias
        # the forget bias is added after the LN: fold it into the f gate's LN bias
        self.shift = ln_b + fb if cfg.layer_norm else fb  # [4, K] or [4, 1]

    def forward(self, a: Tensor, c_prev: Tensor, c_out: Tensor, h_out: Tensor, mask: Optional[Tensor]):
        K = self.K
        if self.layer_norm:
            an, mean, rstd = _native_ln(a, (K,), None, None, self.eps)
            g = torch.addcmul(self.shift, an, self.ln_w)
        else:
            an = mean = rstd = None
            g = a + self.shift
        s = torch.sigmoid(g)  # slot 2 (the g gate) goes unused
        tg = torch.tanh(g[:, 2])
        tgm = tg * mask if mask is not None else tg
        torch.addcmul(s[:, 1] * c_prev, s[:, 0], tgm, out=c_out)
        if self.layer_norm:
            cn, c_mean, c_rstd = _native_ln(c_out, (K,), self.ln_cell_w, self.ln_cell_b, self.eps)
        else:
            cn = c_out
            c_mean = c_rstd = None
        tc = torch.tanh(cn)
        torch.mul(s[:, 3], tc, out=h_out)
        return a, mean, rstd, an, s, tg, tgm, c_prev, c_out, c_mean, c_rstd, tc, mask

    def backward(self, dh: Tensor, dc: Tensor, saved):
        """Returns (d pre-activations [n, 4, K], d c_prev, d post-LN gates, d LN(c))."""
        a, mean, rstd, an, s, tg, tgm, c_prev, c, c_mean, c_rstd, tc, mask = saved
        K = self.K
        s_i, s_f, s_o = s[:, 0], s[:, 1], s[:, 3]
        dcn = dh * s_o * (1.0 - tc * tc)
        if self.layer_norm:
            dc = dc + _native_ln_backward(dcn, c, (K,), c_mean, c_rstd, self.ln_cell_w, None,
                                          [True, False, False])[0]
        else:
            dc = dc + dcn
        # through the activations σ(i), σ(f), tanh(g), σ(o): d act * d act / d pre
        dtg = dc * s_i if mask is None else dc * s_i * mask
        dact = torch.stack([dc * tgm, dc * c_prev, dtg, dh * tc], 1)
        deriv = s * (1.0 - s)
        deriv[:, 2] = 1.0 - tg * tg
        dg = dact * deriv
        if self.layer_norm:
            da = _native_ln_backward(dg * self.ln_w, a, (K,), mean, rstd, None, None, [True, False, False])[0]
        else:
            da = dg
        return da, dc * s_f, dg, dcn

    def param_grads(self, dgs: List[Tensor], dcns: List[Tensor], saved: List[tuple]):
        """LN affine gradients over all steps at once (after the reverse loop).

        ``dgs``/``dcns`` come in reverse time order (as the loop produced them), ``saved`` forward.
        """
        if not self.layer_norm:
            return ()
        dgs, dcns = dgs[::-1], dcns[::-1]
        dg = torch.cat(dgs)
        an = torch.cat([sv[3] for sv in saved])
        dcn = torch.cat(dcns)
        c_hat = torch.cat([(sv[8] - sv[9]) * sv[10] for sv in saved])
        return (dg * an).sum(0), dg.sum(0), (dcn * c_hat).sum(0), dcn.sum(0)


class _HyperLSTMSequence(torch.autograd.Function):
    """One HyperLSTM cell over a whole sequence, with a hand-written backward."""

    @staticmethod
    def forward(ctx, x, h0, c0, hh0, ch0, m_main, m_hyper, counts, cfg: CellConfig, *flat):
        p = dict(zip(cfg.param_names(), flat))
        T, B, X = x.shape
        H, K, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
        # hoisted input projection of every step, for both cells (hyper bias folded in)
        W_x = torch.cat([p["weight_ih"], p["hyper_weight_ih"][:, :X]])  # [4H+4K, X]
        xp_bias = torch.cat([p["bias"].new_zeros(4 * H), p["hyper_bias"]])
        XP = torch.addmm(xp_bias, x.reshape(T * B, X), W_x.t()).view(T, B, 4 * H + 4 * K)
        W_rec = torch.cat([p["hyper_weight_ih"][:, X:], p["hyper_weight_hh"]], 1)  # [4K, H+K]
        W_rec_t, W_hh_t = W_rec.t(), p["weight_hh"].t()
        zb = torch.cat([p["z_bias"], p["z_bias"].new_zeros(4 * E)])
        z_w_t = p["z_weight"].t()
        d_w_t = p["d_weight"].transpose(1, 2)  # [12, E, H]
        bias4 = p["bias"].view(4, H)

        HS = x.new_empty(T + 1, B, H + K)  # [h_t | h_hat_t]
        C = x.new_empty(T + 1, B, H + K)  # [c_t | c_hat_t]
        HS[0, :, :H], HS[0, :, H:], C[0, :, :H], C[0, :, H:] = h0, hh0, c0, ch0
        Z = x.new_empty(T, B, 12 * E)
        WH = x.new_empty(T, B, 4 * H)
        main, hyper = _cells(cfg, p, x)
        saved_main, saved_hyper = [], []

        for t in range(T):
            n = counts[t]
            if n < B:  # finished sequences carry their state
                HS[t + 1, n:], C[t + 1, n:] = HS[t, n:], C[t, n:]
            hs = HS[t, :n]  # [h_{t-1} | h_hat_{t-1}]
            a_hat = torch.addmm(XP[t, :n, 4 * H:], hs, W_rec_t).view(n, 4, K)
            saved_hyper.append(hyper.forward(a_hat, C[t, :n, H:], C[t + 1, :n, H:], HS[t + 1, :n, H:],
                                             None if m_hyper is None else m_hyper[t, :n]))
            z = torch.addmm(zb, HS[t + 1, :n, H:], z_w_t, out=Z[t, :n])
            d = torch.bmm(z.view(n, 12, E).transpose(0, 1), d_w_t).view(3, 4, n, H).transpose(1, 2)
            wh = torch.mm(hs[:, :H], W_hh_t, out=WH[t, :n]).view(n, 4, H)
            a = torch.addcmul(torch.addcmul(d[2] + bias4, d[0], XP[t, :n, :4 * H].view(n, 4, H)), d[1], wh)
            saved_main.append(main.forward(a, C[t, :n, :H], C[t + 1, :n, :H], HS[t + 1, :n, :H],
                                           None if m_main is None else m_main[t, :n]))

        out = HS[1:, :, :H]
        if counts[-1] < B:
            alive = torch.arange(B).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)  # [T, B]
            out = out * alive.to(out).unsqueeze(-1)
        else:
            out = out.contiguous()
        if any(ctx.needs_input_grad):
            ctx.save_for_backward(x, *flat)
            ctx.buffers = (XP, HS, C, Z, WH, m_main, m_hyper)
            ctx.saved_cells = (saved_main, saved_hyper)
            ctx.counts, ctx.cfg = counts, cfg
        final = (HS[T, :, :H], C[T, :, :H], HS[T, :, H:], C[T, :, H:])
        return (out,) + tuple(s.contiguous() for s in final)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, dh, dc, dhh, dch):
        x, *flat = ctx.saved_tensors
        cfg, counts = ctx.cfg, ctx.counts
        p = dict(zip(cfg.param_names(), flat))
        XP, HS, C, Z, WH, m_main, m_hyper = ctx.buffers
        saved_main, saved_hyper = ctx.saved_cells
        T, B, X = x.shape
        H, K, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
        main, hyper = _cells(cfg, p, x)
        d_w, d_w_t = p["d_weight"], p["d_weight"].transpose(1, 2)
        W_rec = torch.cat([p["hyper_weight_ih"][:, X:], p["hyper_weight_hh"]], 1)  # [4K, H+K]

        def grad_or_zeros(g, n):
            return g.clone() if g is not None else x.new_zeros(B, n)

        dh, dc, dhh, dch = (grad_or_zeros(g, n) for g, n in ((dh, H), (dc, H), (dhh, K), (dch, K)))
        d_out = d_out if d_out is not None else x.new_zeros(T, B, H)
        DXP = x.new_zeros(T, B, 4 * H + 4 * K)  # d/dXP: [d_x ⊙ da (main) | d a_hat (hyper)]
        DWH = x.new_zeros(T, B, 4 * H)  # d/d(h_{t-1} W_hh^T) = d_h ⊙ da
        DZ = x.new_zeros(T, B, 12 * E)
        dd_weight = torch.zeros_like(d_w)
        das, dgs_main, dcns_main, dgs_hyper, dcns_hyper = [], [], [], [], []

        for t in reversed(range(T)):
            n = counts[t]
            da, dc_prev, dg, dcn = main.backward(dh[:n] + d_out[t, :n], dc[:n], saved_main[t])
            das.append(da)
            dgs_main.append(dg)
            dcns_main.append(dcn)
            z = Z[t, :n].view(n, 12, E).transpose(0, 1)  # [12, n, E]
            d = torch.bmm(z, d_w_t).view(3, 4, n, H).transpose(1, 2)  # [3, n, 4, H]
            torch.mul(da, d[0], out=DXP[t, :n, :4 * H].view(n, 4, H))
            torch.mul(da, d[1], out=DWH[t, :n].view(n, 4, H))
            dd = x.new_empty(12, n, H)  # d/d(scaling vectors), paths x, h, bias
            dd4 = dd.view(3, 4, n, H).transpose(1, 2)
            torch.mul(da, XP[t, :n, :4 * H].view(n, 4, H), out=dd4[0])
            torch.mul(da, WH[t, :n].view(n, 4, H), out=dd4[1])
            dd4[2].copy_(da)
            torch.bmm(dd, d_w, out=DZ[t, :n].view(n, 12, E).transpose(0, 1))
            dd_weight.baddbmm_(dd.transpose(1, 2), z)
            dh_hat = torch.addmm(dhh[:n], DZ[t, :n], p["z_weight"])
            da_hat, dch_prev, dg_h, dcn_h = hyper.backward(dh_hat, dch[:n], saved_hyper[t])
            dgs_hyper.append(dg_h)
            dcns_hyper.append(dcn_h)
            DXP[t, :n, 4 * H:] = da_hat.view(n, 4 * K)
            dHS = torch.mm(DXP[t, :n, 4 * H:], W_rec)  # [n, H+K]
            torch.addmm(dHS[:, :H], DWH[t, :n], p["weight_hh"], out=dh[:n])
            dhh[:n] = dHS[:, H:]
            dc[:n], dch[:n] = dc_prev, dch_prev

        # every weight gradient that sums over time: one large matmul each
        DXP2, TB = DXP.view(T * B, 4 * H + 4 * K), T * B
        W_x = torch.cat([p["weight_ih"], p["hyper_weight_ih"][:, :X]])
        dx = (DXP2 @ W_x).view(T, B, X)
        dW_x = DXP2.t() @ x.reshape(TB, X)  # [4H+4K, X]
        dW_rec = DXP2[:, 4 * H:].t() @ HS[:T].reshape(TB, H + K)  # [4K, H+K]
        grads = {
            "weight_ih": dW_x[:4 * H],
            "weight_hh": DWH.view(TB, 4 * H).t() @ HS[:T, :, :H].reshape(TB, H),
            "bias": torch.cat(das).sum(0).reshape(4 * H),
            "hyper_weight_ih": torch.cat([dW_x[4 * H:], dW_rec[:, :H]], 1),
            "hyper_weight_hh": dW_rec[:, H:].contiguous(),
            "hyper_bias": DXP2[:, 4 * H:].sum(0),
            "z_weight": DZ.view(TB, 12 * E).t() @ HS[1:, :, H:].reshape(TB, K),
            "z_bias": DZ.view(TB, 12 * E)[:, :8 * E].sum(0),
            "d_weight": dd_weight,
        }
        if cfg.layer_norm:
            names = ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias")
            grads.update(zip(names, main.param_grads(dgs_main, dcns_main, saved_main)))
            grads.update(zip(("hyper_" + n for n in names), hyper.param_grads(dgs_hyper, dcns_hyper, saved_hyper)))
        return (dx, dh, dc, dhh, dch, None, None, None, None) + tuple(grads[n] for n in cfg.param_names())


def _cells(cfg: CellConfig, p, like: Tensor):
    ln = cfg.layer_norm
    main = _GatedCell(cfg.hidden_size, cfg, like, *(p[n] if ln else None for n in
                      ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias")))
    hyper = _GatedCell(cfg.hyper_size, cfg, like, *(p[n] if ln else None for n in
                       ("hyper_ln_weight", "hyper_ln_bias", "hyper_ln_cell_weight", "hyper_ln_cell_bias")))
    return main, hyper


def hyper_lstm_sequence(x: Tensor, state, params, cfg: CellConfig, lengths: Lengths = None, masks: Masks = None):
    """Run one cell over ``x [T, B, X]`` (calling convention in ``common``)."""
    T, B = x.shape[0], x.shape[1]
    counts = tuple(_active_counts(lengths, T, B))
    m_main, m_hyper = masks if masks is not None else (None, None)
    flat = [params[n] for n in cfg.param_names()]
    out, h, c, h_hat, c_hat = _HyperLSTMSequence.apply(x, *state, m_main, m_hyper, counts, cfg, *flat)
    return out, (h, c, h_hat, c_hat)
