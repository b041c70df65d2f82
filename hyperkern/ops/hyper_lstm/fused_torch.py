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

from typing import List, NamedTuple, Optional

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from .common import CellConfig, Lengths, Masks
from .dropout import mask_tensors

_native_ln = torch.ops.aten.native_layer_norm.default
_native_ln_backward = torch.ops.aten.native_layer_norm_backward.default
_sigmoid_backward = torch.ops.aten.sigmoid_backward.default  # grad * y * (1 - y), one op
_tanh_backward = torch.ops.aten.tanh_backward.default  # grad * (1 - y²), one op
_tanh_backward_out = torch.ops.aten.tanh_backward.grad_input


def _active_counts(lengths: Lengths, T: int, B: int) -> List[int]:
    """Rows alive at each step (lengths sorted non-increasing) — like PackedSequence.batch_sizes."""
    if lengths is None:
        return [B] * T
    return [int(n) for n in (torch.arange(T).unsqueeze(1) < lengths.unsqueeze(0)).sum(1)]


class _Saved(NamedTuple):
    """What one cell's step keeps for its backward."""

    a: Tensor  # pre-activations [n, 4, K] (before the per-gate LN)
    mean: Optional[Tensor]  # per-gate LN statistics [n, 4, 1]
    rstd: Optional[Tensor]
    an: Optional[Tensor]  # normalised gates [n, 4, K]
    s: Tensor  # σ of every gate slot [n, 4, K] (slot 2 unused)
    tg: Tensor  # tanh(g) [n, K]
    tgm: Tensor  # tanh(g) after the recurrent-dropout mask
    c_prev: Tensor
    c: Tensor  # c_t (a view of the sequence buffer)
    c_mean: Optional[Tensor]  # LN(c) statistics [n, 1]
    c_rstd: Optional[Tensor]
    tc: Tensor  # tanh(LN(c_t))
    mask: Optional[Tensor]


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
        s_i, s_f, _, s_o = s.unbind(1)
        tg = torch.tanh(g[:, 2])
        tgm = tg * mask if mask is not None else tg
        torch.addcmul(s_f * c_prev, s_i, tgm, out=c_out)
        if self.layer_norm:
            cn, c_mean, c_rstd = _native_ln(c_out, (K,), self.ln_cell_w, self.ln_cell_b, self.eps)
        else:
            cn = c_out
            c_mean = c_rstd = None
        tc = torch.tanh(cn)
        torch.mul(s_o, tc, out=h_out)
        return _Saved(a, mean, rstd, an, s, tg, tgm, c_prev, c_out, c_mean, c_rstd, tc, mask)

    def backward(self, dh: Tensor, dc: Tensor, saved: _Saved):
        """Returns (d pre-activations [n, 4, K], d c_prev, d post-LN gates, d LN(c))."""
        a, mean, rstd, an, s, tg, tgm, c_prev, c, c_mean, c_rstd, tc, mask = saved
        K = self.K
        dcn = _tanh_backward(dh * s[:, 3], tc)
        if self.layer_norm:
            dc = dc + _native_ln_backward(dcn, c, (K,), c_mean, c_rstd, self.ln_cell_w, None,
                                          [True, False, False])[0]
        else:
            dc = dc + dcn
        # gradients w.r.t. the activations σ(i), σ(f), tanh(g), σ(o), then through them
        dact = torch.empty_like(s)
        torch.mul(dc, tgm, out=dact[:, 0])
        torch.mul(dc, c_prev, out=dact[:, 1])
        torch.mul(dc, s[:, 0], out=dact[:, 2])
        if mask is not None:
            dact[:, 2] *= mask
        torch.mul(dh, tc, out=dact[:, 3])
        dg = _sigmoid_backward(dact, s)  # slot 2 is overwritten by tanh's derivative:
        _tanh_backward_out(dact[:, 2], tg, grad_input=dg[:, 2])
        if self.layer_norm:
            da = _native_ln_backward(dg * self.ln_w, a, (K,), mean, rstd, None, None, [True, False, False])[0]
        else:
            da = dg
        return da, dc * s[:, 1], dg, dcn

    def param_grads(self, dgs: List[Tensor], dcns: List[Tensor], saved: List[_Saved]):
        """LN affine gradients over all steps at once (after the reverse loop).

        ``dgs``/``dcns`` come in reverse time order (as the loop produced them), ``saved`` forward.
        """
        if not self.layer_norm:
            return ()
        dgs, dcns = dgs[::-1], dcns[::-1]
        dg = torch.cat(dgs)
        an = torch.cat([sv.an for sv in saved])
        dcn = torch.cat(dcns)
        c_hat = torch.cat([(sv.c - sv.c_mean) * sv.c_rstd for sv in saved])
        return (dg * an).sum(0), dg.sum(0), (dcn * c_hat).sum(0), dcn.sum(0)


class _Linear:
    """``x @ W^T`` for a weight reused every step: MKL-packed sgemm for float32 on CPU (about
    1.4-1.8x faster than ``mm`` at the benchmark shapes), ``mm`` everywhere else."""

    def __init__(self, W: Tensor, batch: int, uses: int):
        self.W, self.Wt, self.batch, self.packed = W, W.t(), batch, None
        # packing costs about two plain matmuls: only worth it when the weight is reused
        if uses >= 4 and W.dtype == torch.float32 and W.device.type == "cpu" and torch.backends.mkl.is_available():
            try:
                self.packed = torch.ops.mkl._mkl_reorder_linear_weight(W, batch)
            except (RuntimeError, AttributeError):  # torch built without it
                self.packed = None

    def __call__(self, x: Tensor) -> Tensor:
        if self.packed is not None:
            return torch.ops.mkl._mkl_linear(x, self.packed, self.W, None, self.batch)
        return torch.mm(x, self.Wt)


def _scratch(buf: Tensor, *shape: int) -> Tensor:
    """A contiguous ``shape`` view of the front of a flat per-call buffer. Step temporaries live
    in buffers allocated once: a fresh allocation per step costs page faults (measured here:
    ~150 µs per fresh 512 KB block against ~12 µs reused)."""
    n = 1
    for s in shape:
        n *= s
    return buf[:n].view(shape)


def _alive(n: int, B: int, *views):
    """The first n rows (the sequences still running) of each ``[B, ...]`` view (None passes)."""
    if n == B:
        return views
    return tuple(None if v is None else v[:n] for v in views)


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
        xp_main = XP[..., :4 * H].unflatten(-1, (4, H)).unbind(0)  # T x [B, 4, H]
        xp_hyper = XP[..., 4 * H:].unbind(0)  # T x [B, 4K]
        # the hyper cell's two recurrent matmuls as one, over [h_{t-1} | h_hat_{t-1}]
        W_rec_t = torch.cat([p["hyper_weight_ih"][:, X:], p["hyper_weight_hh"]], 1).t()  # [H+K, 4K]
        lin_hh = _Linear(p["weight_hh"], B, uses=T)
        zb = torch.cat([p["z_bias"], p["z_bias"].new_zeros(4 * E)])
        z_w_t = p["z_weight"].t()
        d_w_t = p["d_weight"].transpose(1, 2).contiguous()  # [12, E, H]
        bias4 = p["bias"].view(4, H)

        HS = x.new_empty(T + 1, B, H + K)  # [h_t | h_hat_t], the matmul operand of every step
        Cm, Ch = x.new_empty(T + 1, B, H), x.new_empty(T + 1, B, K)  # c_t, c_hat_t
        HS[0, :, :H], HS[0, :, H:], Cm[0], Ch[0] = h0, hh0, c0, ch0
        ZT = x.new_empty(T, 12, B, E)  # embeddings, path-major (the bmm's layout)
        d_buf = x.new_empty(12 * B * H)  # the step's scaling vectors (recomputed in the backward)
        hs, h_v, hh_v = HS.unbind(0), HS[..., :H].unbind(0), HS[..., H:].unbind(0)
        cm, ch, zt_v = Cm.unbind(0), Ch.unbind(0), ZT.unbind(0)
        main, hyper = _cells(cfg, p, x)
        # what the backward needs, per step; kept only when a gradient is wanted (otherwise every
        # step's temporaries are freed and their memory reused by the next step)
        training = any(ctx.needs_input_grad)
        saved_main, saved_hyper, whs = [], [], []

        for t in range(T):
            n = counts[t]
            if n < B:  # finished sequences carry their state
                HS[t + 1, n:], Cm[t + 1, n:], Ch[t + 1, n:] = HS[t, n:], Cm[t, n:], Ch[t, n:]
            xph, hs_t, c_hat_prev, c_hat, h_hat, xpm, h_prev, c_prev, c_new, h_new, mh, mm = _alive(
                n, B, xp_hyper[t], hs[t], ch[t], ch[t + 1], hh_v[t + 1], xp_main[t], h_v[t], cm[t], cm[t + 1],
                h_v[t + 1], None if m_hyper is None else m_hyper[t], None if m_main is None else m_main[t])
            a_hat = torch.addmm(xph, hs_t, W_rec_t).view(n, 4, K)
            sv_hyper = hyper.forward(a_hat, c_hat_prev, c_hat, h_hat, mh)
            z = torch.addmm(zb, h_hat, z_w_t)  # [n, 12E], from the NEW h_hat
            zt = zt_v[t] if n == B else zt_v[t][:, :n]
            zt.copy_(z.view(n, 12, E).transpose(0, 1))
            d = torch.bmm(zt, d_w_t, out=_scratch(d_buf, 12, n, H))
            d_x, d_h, beta = d.view(3, 4, n, H).transpose(1, 2).unbind(0)  # [n, 4, H] each
            wh = lin_hh(h_prev).view(n, 4, H)
            a = torch.add(beta, bias4, out=x.new_empty(n, 4, H))  # contiguous, whatever d's layout
            a.addcmul_(d_x, xpm).addcmul_(d_h, wh)
            sv_main = main.forward(a, c_prev, c_new, h_new, mm)
            if training:
                saved_hyper.append(sv_hyper)
                saved_main.append(sv_main)
                whs.append(wh)

        out = HS[1:, :, :H]
        if counts[-1] < B:
            alive = torch.arange(B).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)  # [T, B]
            out = out * alive.to(out).unsqueeze(-1)
        else:
            out = out.contiguous()
        if training:
            ctx.save_for_backward(x, *flat)
            ctx.buffers = (XP, HS, ZT, whs, m_main, m_hyper)
            ctx.saved_cells = (saved_main, saved_hyper)
            ctx.counts, ctx.cfg = counts, cfg
        final = (HS[T, :, :H], Cm[T], HS[T, :, H:], Ch[T])
        return (out,) + tuple(s.clone() if s.is_contiguous() else s.contiguous() for s in final)

    @staticmethod
    @once_differentiable
    def backward(ctx, d_out, dh, dc, dhh, dch):
        x, *flat = ctx.saved_tensors
        cfg, counts = ctx.cfg, ctx.counts
        p = dict(zip(cfg.param_names(), flat))
        XP, HS, ZT, whs, m_main, m_hyper = ctx.buffers
        saved_main, saved_hyper = ctx.saved_cells
        T, B, X = x.shape
        H, K, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
        main, hyper = _cells(cfg, p, x)
        d_w = p["d_weight"]
        d_w_t = d_w.transpose(1, 2).contiguous()
        W_rec = torch.cat([p["hyper_weight_ih"][:, X:], p["hyper_weight_hh"]], 1)  # [4K, H+K]
        lin_hh_t = _Linear(p["weight_hh"].t().contiguous(), B, uses=T)  # dG @ W_hh
        xp_main = XP[..., :4 * H].unflatten(-1, (4, H)).unbind(0)

        def grad_or_zeros(g, n):
            return g.clone() if g is not None else x.new_zeros(B, n)

        dh, dc, dhh, dch = (grad_or_zeros(g, n) for g, n in ((dh, H), (dc, H), (dhh, K), (dch, K)))
        d_out = d_out.unbind(0) if d_out is not None else [x.new_zeros(B, H)] * T
        # per-step gradients the post-loop GEMMs consume; rows of finished sequences stay zero
        DXP = x.new_zeros(T, B, 4 * H + 4 * K)  # d/dXP: [d_x ⊙ da (main) | d a_hat (hyper)]
        DWH = x.new_zeros(T, B, 4 * H)  # d/d(h_{t-1} W_hh^T) = d_h ⊙ da
        DZ = x.new_zeros(T, B, 12 * E)
        dxp_main = DXP[..., :4 * H].unflatten(-1, (4, H)).unbind(0)
        dxp_hyper, dwh_v, dz_v = DXP[..., 4 * H:].unbind(0), DWH.unbind(0), DZ.unbind(0)
        dd_weight = torch.zeros_like(d_w)
        d_buf, dd_buf = x.new_empty(8 * B * H), x.new_empty(12 * B * H)
        das, dgs_main, dcns_main, dgs_hyper, dcns_hyper = [], [], [], [], []

        for t in reversed(range(T)):
            n = counts[t]
            dh_t, dc_t, dhh_t, dch_t, dout_t, xpm, dxpm, dxph, dwh, dz = _alive(
                n, B, dh, dc, dhh, dch, d_out[t], xp_main[t], dxp_main[t], dxp_hyper[t],
                dwh_v[t].view(B, 4, H), dz_v[t])
            zt = ZT[t] if n == B else ZT[t][:, :n]  # [12, n, E]
            da, dc_prev, dg, dcn = main.backward(dh_t + dout_t, dc_t, saved_main[t])
            das.append(da)
            dgs_main.append(dg)
            dcns_main.append(dcn)
            # a = d_x ⊙ wx + d_h ⊙ wh + bias + beta
            d = torch.bmm(zt[:8], d_w_t[:8], out=_scratch(d_buf, 8, n, H))
            d_x, d_h = d.view(2, 4, n, H).transpose(1, 2).unbind(0)
            torch.mul(da, d_x, out=dxpm)
            torch.mul(da, d_h, out=dwh)
            dd = _scratch(dd_buf, 12, n, H)  # d/d(scaling vectors), paths x, h, bias
            dd_x, dd_h, dd_b = dd.view(3, 4, n, H).transpose(1, 2).unbind(0)
            torch.mul(da, xpm, out=dd_x)
            torch.mul(da, whs[t], out=dd_h)
            dd_b.copy_(da)
            torch.bmm(dd, d_w, out=dz.view(n, 12, E).transpose(0, 1))
            dd_weight.baddbmm_(dd.transpose(1, 2), zt)
            dh_hat = torch.addmm(dhh_t, dz, p["z_weight"])
            da_hat, dch_prev, dg_h, dcn_h = hyper.backward(dh_hat, dch_t, saved_hyper[t])
            dgs_hyper.append(dg_h)
            dcns_hyper.append(dcn_h)
            da_hat = da_hat.view(n, 4 * K)
            dxph.copy_(da_hat)
            dHS = torch.mm(da_hat, W_rec)  # [n, H+K]
            dh_prev = lin_hh_t(dwh.view(n, 4 * H)).add_(dHS[:, :H])
            if n == B:
                dh, dc, dhh, dch = dh_prev, dc_prev, dHS[:, H:], dch_prev
            else:  # sequences that end before t keep their gradients in the rows past n
                dh_t.copy_(dh_prev), dc_t.copy_(dc_prev), dhh_t.copy_(dHS[:, H:]), dch_t.copy_(dch_prev)

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
        d_state = tuple(g.contiguous() for g in (dh, dc, dhh, dch))
        return (dx,) + d_state + (None, None, None, None) + tuple(grads[n] for n in cfg.param_names())


def _cells(cfg: CellConfig, p, like: Tensor):
    ln = cfg.layer_norm
    main = _GatedCell(cfg.hidden_size, cfg, like, *(p[n] if ln else None for n in
                      ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias")))
    hyper = _GatedCell(cfg.hyper_size, cfg, like, *(p[n] if ln else None for n in
                       ("hyper_ln_weight", "hyper_ln_bias", "hyper_ln_cell_weight", "hyper_ln_cell_bias")))
    return main, hyper


@torch._disable_dynamo  # a Python time loop, run eagerly inside torch.compile (a graph break); imports dynamo at the first call only
def hyper_lstm_sequence(x: Tensor, state, params, cfg: CellConfig, lengths: Lengths = None, masks: Masks = None):
    """Run one cell over ``x [T, B, X]`` (calling convention in ``common``)."""
    T, B = x.shape[0], x.shape[1]
    counts = tuple(_active_counts(lengths, T, B))
    masks = mask_tensors(masks, T, B, cfg.hidden_size, cfg.hyper_size, x.dtype)
    m_main, m_hyper = masks if masks is not None else (None, None)
    flat = [params[n] for n in cfg.param_names()]
    out, h, c, h_hat, c_hat = _HyperLSTMSequence.apply(x, *state, m_main, m_hyper, counts, cfg, *flat)
    return out, (h, c, h_hat, c_hat)
