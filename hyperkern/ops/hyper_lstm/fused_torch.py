"""Fast PyTorch HyperLSTM backend (``backend="torch"``): the CPU path, and the blueprint of the
Triton kernels.

Decomposition (same as the kernels, see DESIGN.md):

- Before the loop, ONE GEMM projects every timestep's input for both cells:
  ``XP = x @ [weight_ih ; hyper_weight_ih[:, :X]]^T (+ hyper_bias)``, ``[T, B, 4H + 4Hh]``.
- ``h_t`` and ``h_hat_t`` live side by side in one buffer ``HS [T+1, B, H+Hh]`` so the hyper
  cell's two recurrent matmuls are one GEMM against ``[hyper_weight_ih[:, X:], hyper_weight_hh]``.
- Per step: 2 GEMMs (hyper gates, main ``h @ W_hh^T``; each the variant measured fastest for its
  shape here, :mod:`.cpu.gemm`), the 12 embeddings z, the 12 scaling vectors d, and the gate maths.
- The backward (hand-written, reverse time) does per step only what the recurrence needs, and
  recomputes the activations from the saved pre-activations and LN statistics; every weight
  gradient that is a sum over time is one large matmul after the loop, over gradients the loop
  wrote into ``[T, B, ...]`` buffers. Sums over the batch that would need ``[T, B, 12H]`` buffers
  (``d_weight``, ``bias``, the LN affine parameters) are accumulated step by step.

The time loop has two implementations over the same buffers, step for step the same maths:
the C++ loop of ``cpu/hyper_lstm.cpp`` (CPU, fp32/fp64, built at first use: :mod:`.cpu`), and
the eager loops below (:func:`_eager_forward_loop`, :func:`_eager_backward_loop`), which run
everywhere else (CUDA tensors, fp16/bf16, or where the extension cannot build).

The whole sequence is one ``torch.library`` custom op, ``hyperkern::hyper_lstm_torch``, with its
backward registered (``hyperkern::hyper_lstm_torch_backward``), so ``torch.compile`` sees one
opaque node instead of a Python loop: no graph break.

Variable length uses the shrinking-batch scheme of packed sequences: sequences are sorted by
length, so at step t only the first ``n_t`` rows are alive; the rest keep their state.
"""
from __future__ import annotations

import collections
import contextlib
import threading
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from . import cpu
from .common import (NUM_PATHS, NUM_SCALED_PATHS, CellConfig, Lengths, Masks, cell_config, fake_sequence_grads,
                     fake_sequence_outputs, needs_grad, register_sequence_autograd)
from .cpu.gemm import Linear
from .dropout import masks_from_op, masks_to_op, seeded_masks

_native_ln = torch.ops.aten.native_layer_norm.default
_native_ln_backward = torch.ops.aten.native_layer_norm_backward.default
_sigmoid_backward = torch.ops.aten.sigmoid_backward.default  # grad * y * (1 - y), one op
_tanh_backward = torch.ops.aten.tanh_backward.default  # grad * (1 - y²), one op
_tanh_backward_out = torch.ops.aten.tanh_backward.grad_input

XP_CHUNK = 16  # steps per input-projection GEMM in inference (see _forward)
INFER_IN_CPP = True  # an inference call (no lengths) as one C++ call (forward_infer); False: op by op below
N_STATS = 10  # LN statistics kept per row and step: per-gate mean[4], rstd[4], LN(c) mean, rstd
SAVED_NAMES = ("XP", "HS", "C", "CH", "A", "AH", "WH", "Z", "S")
"""What the forward keeps for the backward, each ``[T(+1), B, ·]``: the x-projections, the states
(``HS = [h | ĥ]``, ``C``, ``CH``), the pre-LN gate pre-activations of both cells (``A``, ``AH``),
``h_{t-1} @ W_hh^T`` (``WH``), the embeddings ``Z`` and the LN statistics of the main and the
hyper cell (``S [T, 2, B, 10]``; ``[T, 2, B, 0]`` without layer norm: one tensor, as no two
outputs of the op may share memory, and two empty ones would)."""


def _active_counts(lengths: Lengths, T: int, B: int) -> List[int]:
    """Rows alive at each step (lengths sorted non-increasing) — like PackedSequence.batch_sizes."""
    if lengths is None:
        return [B] * T
    return [int(n) for n in (torch.arange(T).unsqueeze(1) < lengths.cpu().unsqueeze(0)).sum(1)]


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums over time accumulate in fp32 for fp16/bf16 inputs."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


class _Cell(NamedTuple):
    """The gate maths shared by the main and the hyper cell, vectorised over the 4 gates (the eager
    twin of ``Cell`` in cpu/hyper_lstm.cpp). ``shift [4, K]`` is the per-gate LN bias with the
    forget bias added on f (added after the LN), or the forget bias alone without layer norm."""

    K: int
    ln: bool
    eps: float
    ln_w: Optional[Tensor]  # [4, K]
    shift: Tensor  # [4, K]
    cw: Optional[Tensor]  # [K] LN(c) weight and bias
    cb: Optional[Tensor]

    def gates(self, a: Tensor, stats: Tensor):
        """Post-LN gates ``g [n, 4, K]`` and the normalised pre-activations (None without LN)."""
        if not self.ln:
            return a + self.shift, None
        an = (a - stats[:, :4, None]) * stats[:, 4:8, None]
        return torch.addcmul(self.shift, an, self.ln_w), an

    def forward(self, a: Tensor, c_prev: Tensor, mask: Optional[Tensor], c_out: Tensor, h_out: Tensor, stats: Tensor):
        """``a [n, 4, K]`` -> writes c, h and (with LN) the statistics ``stats [n, 10]``."""
        K = self.K
        if self.ln:
            an, mean, rstd = _native_ln(a, (K,), None, None, self.eps)
            stats[:, :4], stats[:, 4:8] = mean.view(-1, 4), rstd.view(-1, 4)
            g = torch.addcmul(self.shift, an, self.ln_w)
        else:
            g = a + self.shift
        s = torch.sigmoid(g)  # slot 2 (the g gate) goes unused
        tg = torch.tanh(g[:, 2])
        if mask is not None:
            tg = tg * mask
        torch.addcmul(s[:, 1] * c_prev, s[:, 0], tg, out=c_out)
        if self.ln:
            cn, c_mean, c_rstd = _native_ln(c_out, (K,), self.cw, self.cb, self.eps)
            stats[:, 8:9], stats[:, 9:10] = c_mean, c_rstd
        else:
            cn = c_out
        torch.mul(s[:, 3], torch.tanh(cn), out=h_out)

    def backward(self, dh: Tensor, dc: Tensor, a: Tensor, stats: Tensor, c_prev: Tensor, c: Tensor,
                 mask: Optional[Tensor]):
        """Activations recomputed from ``a`` and ``stats``. ``dc`` (d c_t) becomes d c_{t-1} in
        place. Returns (d pre-activations [n, 4, K], d post-LN gates, normalised gates, d LN(c),
        normalised c); the last four feed the LN affine gradients (None without LN)."""
        K = self.K
        g, an = self.gates(a, stats)
        s = torch.sigmoid(g)
        tg = torch.tanh(g[:, 2])
        tgm = tg * mask if mask is not None else tg
        if self.ln:
            ch = (c - stats[:, 8:9]) * stats[:, 9:10]
            tc = torch.tanh(torch.addcmul(self.cb, ch, self.cw))
        else:
            ch, tc = None, torch.tanh(c)
        dcn = _tanh_backward(dh * s[:, 3], tc)
        if self.ln:
            dc_tot = dc + _native_ln_backward(dcn, c, (K,), stats[:, 8:9].contiguous(), stats[:, 9:10].contiguous(),
                                              self.cw, None, [True, False, False])[0]
        else:
            dc_tot = dc + dcn
        # gradients w.r.t. the activations σ(i), σ(f), tanh(g), σ(o), then through them
        dact = torch.empty_like(s)
        torch.mul(dc_tot, tgm, out=dact[:, 0])
        torch.mul(dc_tot, c_prev, out=dact[:, 1])
        torch.mul(dc_tot, s[:, 0], out=dact[:, 2])
        if mask is not None:
            dact[:, 2] *= mask
        torch.mul(dh, tc, out=dact[:, 3])
        dg = _sigmoid_backward(dact, s)  # slot 2 is overwritten by tanh's derivative:
        _tanh_backward_out(dact[:, 2], tg, grad_input=dg[:, 2])
        torch.mul(dc_tot, s[:, 1], out=dc)
        if not self.ln:
            return dg, None, None, None, None
        da = _native_ln_backward(dg * self.ln_w, a, (K,), stats[:, :4, None].contiguous(),
                                 stats[:, 4:8, None].contiguous(), None, None, [True, False, False])[0]
        return da, dg, an, dcn, ch


def _cells(cfg: CellConfig, p: Dict[str, Tensor], like: Tensor) -> Tuple[_Cell, _Cell]:
    """The main and the hyper cell's constants (the forget bias folded into ``shift``)."""
    cells = []
    for K, pre in ((cfg.hidden_size, ""), (cfg.hyper_size, "hyper_")):
        fb = like.new_zeros(4, K)
        fb[1] = cfg.forget_bias
        if cfg.layer_norm:
            cells.append(_Cell(K, True, cfg.ln_eps, p[pre + "ln_weight"].contiguous(), (p[pre + "ln_bias"] + fb).contiguous(),
                               p[pre + "ln_cell_weight"].contiguous(), p[pre + "ln_cell_bias"].contiguous()))
        else:
            cells.append(_Cell(K, False, cfg.ln_eps, None, fb, None, None))
    return cells[0], cells[1]


def _cell_args(cell: _Cell) -> List[Tensor]:
    """A cell's tensors for the C++ loop: (ln_weight, shift, ln_cell_weight, ln_cell_bias)."""
    return [t if t is not None else cell.shift for t in (cell.ln_w, cell.shift, cell.cw, cell.cb)]


# --------------------------------------------------------------------------------------------
# derived weights, cached per parameter version
# --------------------------------------------------------------------------------------------

class _Derived:
    """What a call derives from the parameters before its loop (concatenations, transposes, the
    cells' constants, the GEMMs' packed weights): computed once per version of the parameters and
    kept, so that a one-step call (sampling, ``HyperLSTMCell``) does only what a step needs."""

    def __init__(self, p: Dict[str, Tensor], cfg: CellConfig, like: Tensor):
        X, H, K, E = cfg.input_size, cfg.hidden_size, cfg.hyper_size, cfg.embed_size
        self.p = p
        self.bias = p["bias"]
        self.W_x = torch.cat([p["weight_ih"], p["hyper_weight_ih"][:, :X]])  # [4H+4K, X]
        self.xp_bias = torch.cat([p["bias"].new_zeros(4 * H), p["hyper_bias"]])
        # the hyper cell's two recurrent matmuls as one, over [h_{t-1} | h_hat_{t-1}]
        self.W_rec = torch.cat([p["hyper_weight_ih"][:, X:], p["hyper_weight_hh"]], 1)  # [4K, H+K]
        self.z_b = torch.cat([p["z_bias"], p["z_bias"].new_zeros(4 * E)])
        self.dwT = p["d_weight"].transpose(1, 2).contiguous()  # [12, E, H]
        self.z_wT = p["z_weight"].t().contiguous()  # [Hh, 12E]
        self.main, self.hyper = _cells(cfg, p, like)
        self.main_args, self.hyper_args = _cell_args(self.main), _cell_args(self.hyper)
        self._lin: Dict[tuple, Linear] = {}
        self._t: Dict[str, Tensor] = {}

    def linear(self, name: str, batch: int, uses: int) -> Linear:
        """The chosen GEMM for weight ``name`` ("hh", "rec", "hh_t", "rec_t"), packed once."""
        key = (name, batch, uses)
        lin = self._lin.get(key)
        if lin is None:
            W = {"hh": lambda: self.p["weight_hh"], "rec": lambda: self.W_rec,
                 "hh_t": lambda: self.transposed("hh"), "rec_t": lambda: self.transposed("rec")}[name]()
            lin = self._lin[key] = Linear(W, batch, uses)
        return lin

    def transposed(self, name: str) -> Tensor:
        """``W_hh^T`` / ``W_rec^T``, contiguous (the backward's GEMM operands)."""
        if name not in self._t:
            self._t[name] = (self.p["weight_hh"] if name == "hh" else self.W_rec).t().contiguous()
        return self._t[name]


DERIVED_CACHE_SIZE = 4  # parameter sets (cells) whose derived weights are kept, least recently used out
_derived_cache: "collections.OrderedDict[tuple, _Derived]" = collections.OrderedDict()
_derived_lock = threading.Lock()
_cache_scopes = threading.local()  # .depth: this thread's open cached_weights() blocks
_open_scopes = 0  # every thread's, together: the cache is emptied when the last one closes


@contextlib.contextmanager
def cached_weights():
    """Inside this block, the CPU path derives its weights (concatenations, transposes, the cells'
    constants, the GEMMs' packed weights) once per version of the parameters, not once per call.
    Like :func:`torch.nn.utils.parametrize.cached`; for loops of short calls (sampling one token
    per call, ``HyperLSTMCell`` step by step), where deriving costs more than the step.

    The promise the block asks: parameters are written only in place through the tensors
    themselves (an optimizer step, ``copy_``, ``load_state_dict``: each bumps a version counter,
    so the next call derives again), never through ``.data`` (which bumps nothing). Outside every
    block, each call derives its own weights, like ``nn.LSTM``: no write can be missed. The cache is
    emptied when the last open block (of any thread) closes. It changes nothing on other backends.
    """
    global _open_scopes
    _cache_scopes.depth = getattr(_cache_scopes, "depth", 0) + 1
    with _derived_lock:
        _open_scopes += 1
    try:
        yield
    finally:
        _cache_scopes.depth -= 1
        with _derived_lock:
            _open_scopes -= 1
            if _open_scopes == 0:
                _derived_cache.clear()


def _derived(p: Dict[str, Tensor], cfg: CellConfig, like: Tensor) -> _Derived:
    """The derived weights for these parameters: new ones, or inside :func:`cached_weights` the
    cached ones when no parameter changed since.

    The key is each parameter's data address and version counter (bumped by every in-place write
    through the tensor or its views), plus the config. The entry keeps the parameters it was made
    from alive, so their addresses cannot be reused by other tensors while it is cached."""
    if not getattr(_cache_scopes, "depth", 0):
        return _Derived(p, cfg, like)
    try:
        ext = _loop_impl(like)
        if ext is not None:  # the same key, computed in one C++ call (23 tensors: ~3 µs instead of ~15)
            key = (cfg, like.dtype, like.device, tuple(ext.param_key(list(p.values()))))
        else:
            key = (cfg, like.dtype, like.device) + tuple((q.data_ptr(), q._version) for q in p.values())
    except (RuntimeError, NotImplementedError, TypeError):  # inference tensors, subclasses: no version to key on
        return _Derived(p, cfg, like)
    with _derived_lock:
        d = _derived_cache.get(key)
        if d is not None:
            _derived_cache.move_to_end(key)
            return d
    d = _Derived(p, cfg, like)
    d.same_tensors = tuple(id(q) for q in p.values())
    with _derived_lock:
        if _open_scopes == 0:  # the last block closed meanwhile (another thread): keep nothing
            return d
        # an older version of the same parameters (training: every optimizer step) is never asked
        # for again: drop it now rather than keep its copies (~2x the weights at PTB) until evicted
        for k in [k for k, v in _derived_cache.items() if v.same_tensors == d.same_tensors]:
            del _derived_cache[k]
        _derived_cache[key] = d
        while len(_derived_cache) > DERIVED_CACHE_SIZE:
            _derived_cache.popitem(last=False)
    return d


def _loop_impl(x: Tensor):
    """The built C++ extension if it runs for ``x`` (building it on first use), else None (eager)."""
    return cpu.load() if cpu.applies(x) is None else None


# --------------------------------------------------------------------------------------------
# forward
# --------------------------------------------------------------------------------------------

def _eager_forward_loop(XP, HS, C, CH, A, AH, WH, Z, S, SH, lin_hh: Linear, lin_rec: Linear, bias, z_w, z_b, dwT,
                        main: _Cell, hyper: _Cell, m_main, m_hyper, counts, keep_wh: bool):
    """The time loop of the forward in torch ops (the C++ ``forward_loop`` step for step)."""
    T, B = XP.shape[:2]
    H, K, E = main.K, hyper.K, dwT.shape[1]
    d_buf = XP.new_empty(NUM_PATHS * B * H)  # the step's scaling vectors (a per-call buffer: no page faults per step)
    for t in range(T):
        n = counts[t]
        if n < B:  # finished sequences carry their state
            HS[t + 1, n:], C[t + 1, n:], CH[t + 1, n:] = HS[t, n:], C[t, n:], CH[t, n:]
        hs = HS[t, :n]
        ah = AH[t, :n]
        torch.add(lin_rec(hs), XP[t, :n, 4 * H:], out=ah)  # [h|ĥ] @ W_rec^T + (x W^T + hyper_bias)
        hyper.forward(ah.view(n, 4, K), CH[t, :n], None if m_hyper is None else m_hyper[t, :n],
                      CH[t + 1, :n], HS[t + 1, :n, H:], SH[t, :n])
        z = torch.addmm(z_b, HS[t + 1, :n, H:], z_w.t(), out=Z[t, :n])  # [n, 12E], from the NEW ĥ
        d = torch.bmm(z.view(n, NUM_PATHS, E).transpose(0, 1), dwT, out=d_buf[:NUM_PATHS * n * H].view(NUM_PATHS, n, H))
        d_x, d_h, beta = d.view(3, 4, n, H).transpose(1, 2).unbind(0)  # [n, 4, H] each
        wh = lin_hh(hs[:, :H])
        if keep_wh:
            WH[t, :n] = wh
        a = torch.add(beta, bias.view(4, H), out=A[t, :n].view(n, 4, H))
        a.addcmul_(d_x, XP[t, :n, :4 * H].view(n, 4, H)).addcmul_(d_h, wh.view(n, 4, H))
        main.forward(a, C[t, :n], None if m_main is None else m_main[t, :n], C[t + 1, :n], HS[t + 1, :n, :H], S[t, :n])


def _forward(x: Tensor, state, p: Dict[str, Tensor], cfg: CellConfig, counts: List[int], m_main, m_hyper,
             save: bool) -> List[Tensor]:
    """[out, h, c, ĥ, ĉ] + (with ``save``) the :data:`SAVED_NAMES` tensors."""
    T, B, X = x.shape
    H, K, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    N = 4 * H + 4 * K
    d = _derived(p, cfg, x)
    W_x, xp_bias, z_b, dwT, z_wT, main, hyper = d.W_x, d.xp_bias, d.z_b, d.dwT, d.z_wT, d.main, d.hyper
    lin_hh, lin_rec = d.linear("hh", B, T), d.linear("rec", B, T)
    ext = _loop_impl(x)
    if ext is not None and not save and counts[-1] == B and INFER_IN_CPP:  # inference: one C++ call
        return ext.forward_infer(x, *state, W_x, xp_bias, lin_hh.arg(), lin_rec.arg(), d.bias, z_wT, z_b, dwT,
                                 d.main_args, d.hyper_args, m_main, m_hyper, cfg.layer_norm, cfg.ln_eps, XP_CHUNK)

    HS = x.new_empty(T + 1, B, H + K)  # [h_t | h_hat_t], the matmul operand of every step
    C, CH = x.new_empty(T + 1, B, H), x.new_empty(T + 1, B, K)  # c_t, c_hat_t
    HS[0, :, :H], C[0], HS[0, :, H:], CH[0] = state  # (h, c, ĥ, ĉ)
    # per-step tensors: all T steps kept when training, else one step's worth reused every step
    # (rows of finished sequences are zero, so that every output of the op is defined)
    kept = T if save else 1
    new = x.new_zeros if counts[-1] < B else x.new_empty
    A, AH, WH, Z = (new(kept, B, w).expand(T, B, w) for w in (4 * H, 4 * K, 4 * H, NUM_PATHS * E))
    S = new(kept, 2, B, N_STATS if cfg.layer_norm else 0).expand(T, -1, -1, -1)
    SH = S[:, 1]
    # The hoisted input projection of both cells (hyper bias folded in), one GEMM over many steps:
    # all T when training (the backward reads XP), else XP_CHUNK steps at a time into one reused
    # buffer (first touching a fresh [T, B, 4H+4Hh] buffer costs more than the GEMM; see
    # docs/cpu_backend.md). The loop runs chunk by chunk over views of the same buffers.
    chunk = T if save else min(T, XP_CHUNK)
    xp_buf = x.new_empty(chunk * B, N)
    for t0 in range(0, T, chunk):
        t1 = min(T, t0 + chunk)
        XP = torch.addmm(xp_bias, x[t0:t1].reshape(-1, X), W_x.t(), out=xp_buf[:(t1 - t0) * B]).view(-1, B, N)
        states = (HS[t0:t1 + 1], C[t0:t1 + 1], CH[t0:t1 + 1])
        per_step = [v[t0:t1] for v in (A, AH, WH, Z, S[:, 0], SH)]
        masks = [None if m is None else m[t0:t1] for m in (m_main, m_hyper)]
        if ext is not None:
            ext.forward_loop(XP, *states, *per_step, lin_hh.arg(), lin_rec.arg(), d.bias, z_wT, z_b,
                             dwT, d.main_args, d.hyper_args, *masks, counts[t0:t1], cfg.layer_norm,
                             cfg.ln_eps, save)
        else:
            _eager_forward_loop(XP, *states, *per_step, lin_hh, lin_rec, p["bias"], p["z_weight"], z_b, dwT, main,
                                hyper, *masks, counts[t0:t1], save)
    out = HS[1:, :, :H]
    if counts[-1] < B:
        alive = torch.arange(B).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)  # [T, B]
        out = out * alive.to(out).unsqueeze(-1)
    else:  # a copy even where the view is contiguous (T = B = 1): no output may alias another
        out = out.clone(memory_format=torch.contiguous_format)
    final = [HS[T, :, :H].clone(), C[T].clone(), HS[T, :, H:].clone(), CH[T].clone()]
    return [out, *final] + ([XP, HS, C, CH, A, AH, WH, Z, S] if save else [])


# --------------------------------------------------------------------------------------------
# backward
# --------------------------------------------------------------------------------------------

def _eager_backward_loop(XP, C, CH, A, AH, WH, Z, S, SH, d_out, dh, dc, dhh, dch, DXP, DWH, DZ, acc: List[Tensor],
                         lin_hh_t: Linear, lin_rec_t: Linear, z_w, dwT, main: _Cell, hyper: _Cell, m_main, m_hyper,
                         counts):
    """The reverse time loop in torch ops (the C++ ``backward_loop`` step for step). ``dh, dc, dhh,
    dch`` are the carried state gradients (updated in place); ``acc``: the per-step sums (bias,
    d_weight^T [12, E, H], then with LN the main and the hyper cell's ln_w, ln_b, ln_cw, ln_cb)."""
    T, B = XP.shape[:2]
    H, K, E = main.K, hyper.K, dwT.shape[1]
    d_w = dwT.transpose(1, 2)  # [12, H, E]
    d_buf, dd_buf = XP.new_empty(NUM_SCALED_PATHS * B * H), XP.new_empty(NUM_PATHS * B * H)
    for t in reversed(range(T)):
        n = counts[t]
        if d_out is not None:
            dh[:n] += d_out[t, :n]
        da, dg, an, dcn, ch = main.backward(dh[:n], dc[:n], A[t, :n].view(n, 4, H), S[t, :n], C[t, :n],
                                            C[t + 1, :n], None if m_main is None else m_main[t, :n])
        # a = d_x ⊙ xp + d_h ⊙ wh + bias + beta
        zt = Z[t, :n].view(n, NUM_PATHS, E).transpose(0, 1)  # [12, n, E]
        d = torch.bmm(zt[:NUM_SCALED_PATHS], dwT[:NUM_SCALED_PATHS], out=d_buf[:NUM_SCALED_PATHS * n * H].view(NUM_SCALED_PATHS, n, H))
        d_x, d_h = d.view(2, 4, n, H).transpose(1, 2).unbind(0)
        torch.mul(da, d_x, out=DXP[t, :n, :4 * H].view(n, 4, H))
        torch.mul(da, d_h, out=DWH[t, :n].view(n, 4, H))
        dd = dd_buf[:NUM_PATHS * n * H].view(NUM_PATHS, n, H)  # d/d(scaling vectors), paths x, h, bias
        dd_x, dd_h, dd_b = dd.view(3, 4, n, H).transpose(1, 2).unbind(0)
        torch.mul(da, XP[t, :n, :4 * H].view(n, 4, H), out=dd_x)
        torch.mul(da, WH[t, :n].view(n, 4, H), out=dd_h)
        dd_b.copy_(da)
        dz = Z.new_empty(NUM_PATHS, n, E)
        torch.bmm(dd, d_w, out=dz)
        DZ[t, :n] = dz.transpose(0, 1).reshape(n, NUM_PATHS * E)
        acc[0].add_(da.sum(0).view(4 * H))
        acc[1].baddbmm_(zt.transpose(1, 2).to(acc[1].dtype), dd.to(acc[1].dtype))
        dhh[:n].addmm_(DZ[t, :n], z_w)
        da_hat, dg_h, an_h, dcn_h, ch_h = hyper.backward(dhh[:n], dch[:n], AH[t, :n].view(n, 4, K), SH[t, :n],
                                                          CH[t, :n], CH[t + 1, :n],
                                                          None if m_hyper is None else m_hyper[t, :n])
        DXP[t, :n, 4 * H:] = da_hat.view(n, 4 * K)
        if main.ln:
            for i, (g_, a_, dn_, cn_) in enumerate(((dg, an, dcn, ch), (dg_h, an_h, dcn_h, ch_h))):
                for j, v in enumerate(((g_ * a_).sum(0), g_.sum(0), (dn_ * cn_).sum(0), dn_.sum(0))):
                    acc[2 + 4 * i + j].add_(v)
        dHS = lin_rec_t(DXP[t, :n, 4 * H:])  # [n, H+K]
        dh[:n] = lin_hh_t(DWH[t, :n]) + dHS[:, :H]
        dhh[:n] = dHS[:, H:]


def _backward(x: Tensor, p: Dict[str, Tensor], cfg: CellConfig, counts: List[int], saved: List[Tensor],
              m_main, m_hyper, d_out, d_final) -> List[Tensor]:
    """[d x, d h0, d c0, d ĥ0, d ĉ0] + the parameter gradients (``cfg.param_names()`` order)."""
    XP, HS, C, CH, A, AH, WH, Z, S = saved
    S, SH = S[:, 0], S[:, 1]
    T, B, X = x.shape
    H, K, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    d = _derived(p, cfg, x)
    main, hyper, dwT = d.main, d.hyper, d.dwT
    lin_hh_t = d.linear("hh_t", B, T)  # d(W_hh h) @ W_hh
    lin_rec_t = d.linear("rec_t", B, T)
    dh, dc, dhh, dch = (g.clone() if g is not None else x.new_zeros(B, n) for g, n in zip(d_final, (H, H, K, K)))
    d_out = d_out.contiguous() if d_out is not None else None
    # per-step gradients the post-loop GEMMs consume (the loop writes every row alive; rows of
    # finished sequences must be zero)
    new = x.new_zeros if counts[-1] < B else x.new_empty
    DXP = new(T, B, 4 * H + 4 * K)  # d/dXP: [d_x ⊙ da (main) | d a_hat (hyper)]
    DWH = new(T, B, 4 * H)  # d/d(h_{t-1} W_hh^T) = d_h ⊙ da
    DZ = new(T, B, NUM_PATHS * E)
    acc_dt = _acc_dtype(x.dtype)
    acc = [torch.zeros(4 * H, dtype=acc_dt, device=x.device), torch.zeros(NUM_PATHS, E, H, dtype=acc_dt, device=x.device)]
    if cfg.layer_norm:
        acc += [torch.zeros(s, dtype=acc_dt, device=x.device) for k in (H, K) for s in ((4, k), (4, k), (k,), (k,))]
    ext = _loop_impl(x)
    if ext is not None:
        ext.backward_loop(XP, C, CH, A, AH, WH, Z, S, SH, d_out, dh, dc, dhh, dch, DXP, DWH, DZ, acc, lin_hh_t.arg(),
                          lin_rec_t.arg(), p["z_weight"], dwT, d.main_args, d.hyper_args,
                          m_main, m_hyper, counts, cfg.layer_norm, cfg.ln_eps)
    else:
        _eager_backward_loop(XP, C, CH, A, AH, WH, Z, S, SH, d_out, dh, dc, dhh, dch, DXP, DWH, DZ, acc, lin_hh_t,
                             lin_rec_t, p["z_weight"], dwT, main, hyper, m_main, m_hyper, counts)

    # every weight gradient that sums over time: one large matmul each
    DXP2, TB = DXP.view(T * B, 4 * H + 4 * K), T * B
    dx = (DXP2 @ d.W_x).view(T, B, X)
    dW_x = DXP2.t() @ x.reshape(TB, X)  # [4H+4K, X]
    dW_rec = DXP2[:, 4 * H:].t() @ HS[:T].reshape(TB, H + K)  # [4K, H+K]
    grads = {
        "weight_ih": dW_x[:4 * H],
        "weight_hh": DWH.view(TB, 4 * H).t() @ HS[:T, :, :H].reshape(TB, H),
        "bias": acc[0],
        "hyper_weight_ih": torch.cat([dW_x[4 * H:], dW_rec[:, :H]], 1),
        "hyper_weight_hh": dW_rec[:, H:],
        "hyper_bias": DXP2[:, 4 * H:].sum(0),
        "z_weight": DZ.view(TB, NUM_PATHS * E).t() @ HS[1:, :, H:].reshape(TB, K),
        "z_bias": DZ.view(TB, NUM_PATHS * E)[:, :NUM_SCALED_PATHS * E].sum(0),
        "d_weight": acc[1].transpose(1, 2),
    }
    if cfg.layer_norm:
        names = ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias")
        grads.update(zip(names + tuple("hyper_" + n for n in names), acc[2:]))
    return [dx, dh, dc, dhh, dch] + [grads[n].to(x.dtype).contiguous() for n in cfg.param_names()]


# --------------------------------------------------------------------------------------------
# torch.library registration: the sequence (forward) and its backward, one custom op each, so
# torch.compile treats the time loop as a single opaque node (no graph break)
# --------------------------------------------------------------------------------------------

def _op_masks(x: Tensor, m_main, m_hyper, seed, p_drop, H: int, Hh: int):
    """The op's dropout arguments as mask tensors (a seed is materialised, as the reference does)."""
    masks = masks_from_op(m_main, m_hyper, seed, p_drop)
    if masks is None:
        return None, None
    if not isinstance(masks, tuple):  # a DropoutSeed
        masks = seeded_masks(masks, x.shape[0], x.shape[1], H, Hh, x.dtype)
    return tuple(m.to(x.dtype).contiguous() for m in masks)


@torch.library.custom_op("hyperkern::hyper_lstm_torch", mutates_args=())
def hyper_lstm_torch_op(
    x: Tensor, h0: Tensor, c0: Tensor, hh0: Tensor, ch0: Tensor, params: List[Tensor],
    lengths: Optional[Tensor], m_main: Optional[Tensor], m_hyper: Optional[Tensor],
    seed: Optional[Tensor], p_drop: float,
    H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float, save: bool,
) -> List[Tensor]:
    """[out, h, c, ĥ, ĉ] + (``save``) the :data:`SAVED_NAMES` tensors the backward reads.
    Recurrent dropout: the masks ``m_main, m_hyper``, or ``seed`` with drop probability
    ``p_drop``, or neither."""
    return _forward_op_impl(x, h0, c0, hh0, ch0, params, lengths, m_main, m_hyper, seed, p_drop, H, Hh, E,
                            layer_norm, forget_bias, ln_eps, save)


def _forward_op_impl(x, h0, c0, hh0, ch0, params, lengths, m_main, m_hyper, seed, p_drop, H, Hh, E, layer_norm,
                     forget_bias, ln_eps, save):
    """The body of ``hyperkern::hyper_lstm_torch`` (also called directly: see :func:`_direct_call_ok`)."""
    cfg = cell_config(x.shape[2], H, Hh, E, layer_norm, forget_bias, ln_eps)
    p = {n: q.contiguous() for n, q in zip(cfg.param_names(), params)}
    T, B = x.shape[:2]
    mm, mh = _op_masks(x, m_main, m_hyper, seed, p_drop, H, Hh)
    state = [s.to(x.dtype) for s in (h0, c0, hh0, ch0)]
    return _forward(x.contiguous(), state, p, cfg, _active_counts(lengths, T, B), mm, mh, save)


def _saved_shapes(T: int, B: int, X: int, H: int, Hh: int, E: int, layer_norm: bool):
    return [(T, B, 4 * H + 4 * Hh), (T + 1, B, H + Hh), (T + 1, B, H), (T + 1, B, Hh), (T, B, 4 * H), (T, B, 4 * Hh),
            (T, B, 4 * H), (T, B, NUM_PATHS * E), (T, 2, B, N_STATS if layer_norm else 0)]


@hyper_lstm_torch_op.register_fake
def _(x, h0, c0, hh0, ch0, params, lengths, m_main, m_hyper, seed, p_drop, H, Hh, E, layer_norm, forget_bias,
      ln_eps, save):
    res = fake_sequence_outputs(x, H, Hh)
    if save:
        res += [x.new_empty(s) for s in _saved_shapes(*x.shape, H, Hh, E, layer_norm)]
    return res


@torch.library.custom_op("hyperkern::hyper_lstm_torch_backward", mutates_args=())
def hyper_lstm_torch_backward_op(
    x: Tensor, params: List[Tensor], saved: List[Tensor], lengths: Optional[Tensor], m_main: Optional[Tensor],
    m_hyper: Optional[Tensor], seed: Optional[Tensor], p_drop: float, d_out: Optional[Tensor], dh: Optional[Tensor],
    dc: Optional[Tensor], dhh: Optional[Tensor], dch: Optional[Tensor],
    H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float,
) -> List[Tensor]:
    """[d x, d h0, d c0, d ĥ0, d ĉ0] + the parameter gradients (``cfg.param_names()`` order)."""
    cfg = cell_config(x.shape[2], H, Hh, E, layer_norm, forget_bias, ln_eps)
    p = {n: q.contiguous() for n, q in zip(cfg.param_names(), params)}
    T, B = x.shape[:2]
    mm, mh = _op_masks(x, m_main, m_hyper, seed, p_drop, H, Hh)
    d_final = [None if g is None else g.to(x.dtype) for g in (dh, dc, dhh, dch)]
    return _backward(x.contiguous(), p, cfg, _active_counts(lengths, T, B), list(saved), mm, mh,
                     None if d_out is None else d_out.to(x.dtype), d_final)


@hyper_lstm_torch_backward_op.register_fake
def _(x, params, saved, lengths, m_main, m_hyper, seed, p_drop, d_out, dh, dc, dhh, dch, H, Hh, E, layer_norm,
      forget_bias, ln_eps):
    return fake_sequence_grads(x, params, H, Hh)


register_sequence_autograd(hyper_lstm_torch_op, torch.ops.hyperkern.hyper_lstm_torch_backward)


def hyper_lstm_sequence(x: Tensor, state, params, cfg: CellConfig, lengths: Lengths = None, masks: Masks = None,
                        *, recompute: bool = False, cuda_graphs: bool = False):
    """Run one cell over ``x [T, B, X]`` (calling convention in ``common``): one call of the custom
    op ``hyperkern::hyper_lstm_torch``, which keeps what the backward needs only when a gradient
    is wanted (``recompute`` and ``cuda_graphs`` do not apply: this backend keeps pre-activations
    and statistics, and runs eagerly)."""
    save = needs_grad(x, state, params)
    flat = [params[n] for n in cfg.param_names()]
    m_main, m_hyper, seed, p_drop = masks_to_op(masks)
    args = (x, *state, flat, lengths, m_main, m_hyper, seed, p_drop, cfg.hidden_size, cfg.hyper_size, cfg.embed_size,
            bool(cfg.layer_norm), float(cfg.forget_bias), float(cfg.ln_eps), save)
    if not save and _direct_call_ok(x, state, flat):
        res = _forward_op_impl(*args)
    else:
        res = torch.ops.hyperkern.hyper_lstm_torch(*args)
    return res[0], tuple(res[1:5])


try:  # vmap / grad transforms wrap tensors without changing their Python type
    _functorch_wrapped = torch._C._functorch.is_functorch_wrapped_tensor
except AttributeError:  # pragma: no cover
    def _functorch_wrapped(x):
        return False


def _direct_call_ok(x: Tensor, state, flat: List[Tensor]) -> bool:
    """Whether an inference call may run the op's body directly instead of through the dispatcher.

    Going through ``torch.ops`` costs ~50 µs per call here (the autograd wrapper, the dispatcher,
    the alias checks): as much as a whole one-step call of a small cell. With no gradient wanted
    and plain CPU tensors, outside ``torch.compile``, autocast and any torch function/dispatch
    mode, the dispatcher would run exactly that body, so it is called directly. Everything else
    (training, compiling, autocast, tensor subclasses, fake tensors, other devices) goes through
    the op."""
    if (x.device.type != "cpu" or torch.compiler.is_compiling() or torch.is_autocast_enabled("cpu")
            or torch._C._is_torch_function_mode_enabled() or torch._C._len_torch_dispatch_stack() > 0):
        return False
    if type(x) is not Tensor or any(type(s) is not Tensor for s in state) or _functorch_wrapped(x):
        return False
    return all(type(q) is Tensor or type(q) is torch.nn.Parameter for q in flat)
