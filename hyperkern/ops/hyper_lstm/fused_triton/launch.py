"""The launchers of the HyperLSTM Triton kernels: :func:`run_sequence` (forward) and
:func:`run_backward` (BPTT), one cell over a whole sequence (calling convention in ``..common``).

Per forward call:

1. before the time loop: validation, one library GEMM for the x-projections of all T steps,
   ``XP = x @ [weight_ih ; hyper_weight_ih[:, :X]]^T`` (fp32 ``[T, B, 4H + 4Hh]``), and every
   buffer the loop needs (fp32 ping-pong state, scratch, the output, device lengths);
2. the time loop: exactly two kernel launches per step (``kernels/hyper_lstm_fwd.py``: the gates
   kernel, then the cell kernel), with no allocation, no host synchronisation and no
   data-dependent shape, so it can be captured in a CUDA graph as it stands.

The backward walks time in reverse, two launches per step (four when recomputing the forward
steps), then one library GEMM per weight gradient over all steps (docs/triton_backward.md).

Launch configurations come from :mod:`.configs` (one table); dots follow
:mod:`hyperkern.ops.precision`; every launch passes keyword arguments. Variable length is masked
inside the kernels from a device ``lengths`` tensor. Recurrent dropout comes as a
:class:`~..dropout.DropoutSeed` (each cell kernel draws its step's masks with ``tl.rand``, the
backward draws the same ones again; no ``[T, B, ·]`` mask is kept) or as given mask tensors.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from hyperkern.kernels.common import cdiv, interpreted

from ... import precision
from ..common import NUM_PATHS, NUM_SCALED_PATHS, CellConfig, Lengths, Masks, check_state
from ..dropout import DropoutSeed, check_seed, keep_scale
from ...launches import StepLaunch
from . import configs

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # on CUDA
# In the interpreter (CPU tensors): the interpreter's bf16 arithmetic is wrong. The kernels also
# run float64 there (their state, scratch and accumulators take the buffers' dtype): the tests add
# float64 here (a fixture) so that gradcheck can run through the kernels; users cannot.
INTERPRETER_DTYPES = (torch.float32, torch.float16)
_DTYPE_NAME = precision.DTYPE_NAMES
def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the state, scratch and statistics buffers: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def kernels_interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (decided when they were first imported;
    this imports them, hence Triton)."""
    from hyperkern.kernels import hyper_lstm_fwd

    return interpreted(hyper_lstm_fwd.hyper_lstm_cell_kernel)


class _Buffers:
    """Device buffers of one call, allocated before the time loop.

    With ``guard > 0`` every buffer (and a private copy of every parameter) sits inside a larger
    NaN-filled allocation: ``guard`` NaNs before and after each row and one NaN row/plane around
    each leading dimension, so the kernels see real row strides. :meth:`check_guards` lists the
    buffers whose guard zone was written (any out-of-bounds store)."""

    def __init__(self, device, guard: int):
        self.device, self.guard = device, guard
        self._full: Dict[str, Tuple[Tensor, Tensor]] = {}

    def new(self, name: str, shape, dtype, fill: Optional[float] = None) -> Tensor:
        g = self.guard
        if g == 0:
            t = (torch.empty(shape, dtype=dtype, device=self.device) if fill is None
                 else torch.full(shape, fill, dtype=dtype, device=self.device))
            return t
        padded = tuple(s + 2 for s in shape[:-1]) + (shape[-1] + 2 * g,)
        full = torch.full(padded, float("nan"), dtype=dtype, device=self.device)
        index = tuple(slice(1, 1 + s) for s in shape[:-1]) + (slice(g, g + shape[-1]),)
        view = full[index]
        if fill is not None:
            view.fill_(fill)
        self._full[name] = (full, index)
        return view

    def new_flat(self, name: str, src: Tensor) -> Tensor:
        """A contiguous copy of ``src`` with ``guard`` NaNs before and after (guard mode), else ``src``."""
        src = src.contiguous()
        g = self.guard
        if g == 0:
            return src
        full = torch.full((src.numel() + 2 * g,), float("nan"), dtype=src.dtype, device=self.device)
        view = full[g:g + src.numel()].view(src.shape)
        view.copy_(src)
        self._full[name] = (full, (slice(g, g + src.numel()),))
        return view

    def copy_strided(self, name: str, src: Tensor) -> Tensor:
        """``src`` (inner stride 1) as it is (no guard), or copied into a guarded buffer."""
        if self.guard == 0:
            return src if src.stride(-1) == 1 else src.contiguous()
        view = self.new(name, tuple(src.shape), src.dtype)
        view.copy_(src)
        return view

    def check_guards(self) -> List[str]:
        """Names of the buffers whose NaN guard zone no longer is all NaN."""
        bad = []
        for name, (full, index) in self._full.items():
            outside = torch.ones(full.shape, dtype=torch.bool, device=full.device)
            outside[index] = False
            if not bool(torch.isnan(full[outside]).all()):
                bad.append(name)
        return bad


def _check_inputs(x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig, lengths, masks, *,
                  dtypes: bool = True):
    """Raise a clear error for anything the kernels cannot take. ``dtypes=False`` skips the dtype
    checks (x's dtype, parameters in x's dtype): inside ``torch.autocast`` the op's autocast rule
    casts the inputs first, and the op checks them again after that."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, input_size], got shape {tuple(x.shape)}")
    T, B, X = x.shape
    if T < 1 or B < 1:
        raise ValueError(f"x must have at least one step and one sequence, got shape {tuple(x.shape)}")
    if X != cfg.input_size:
        raise ValueError(f"x has {X} features, the cell expects input_size={cfg.input_size}")
    if x.device.type == "cuda":
        if dtypes and x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {x.dtype}")
    elif x.device.type == "cpu":
        if dtypes and x.dtype == torch.bfloat16:
            raise TypeError("bfloat16 cannot run in the Triton interpreter (its bf16 arithmetic is wrong); "
                            "use a CUDA device, or float32/float16")
        if dtypes and x.dtype not in INTERPRETER_DTYPES:
            raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {x.dtype}")
        if not kernels_interpreted():
            raise RuntimeError("backend='triton' got CPU tensors but the Triton interpreter is off: set "
                               "TRITON_INTERPRET=1 before hyperkern's kernels are first imported, or use a CUDA device")
    else:
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device}")
    if cfg.embed_size > configs.MAX_EMBED:
        raise ValueError(f"backend='triton' takes embed_size up to {configs.MAX_EMBED} (the backward keeps dz "
                         f"in registers), got {cfg.embed_size}; use backend='torch'")
    shapes = cfg.param_shapes()
    missing = [n for n in shapes if n not in params]
    if missing:
        raise ValueError(f"params is missing {missing}")
    for name, shape in shapes.items():
        p = params[name]
        if not isinstance(p, Tensor):
            raise TypeError(f"params[{name!r}] must be a torch.Tensor, got {type(p).__name__}")
        if tuple(p.shape) != tuple(shape):
            raise ValueError(f"params[{name!r}] must have shape {tuple(shape)}, got {tuple(p.shape)}")
        if dtypes and p.dtype != x.dtype:
            raise TypeError(f"params[{name!r}] has dtype {p.dtype}, x has {x.dtype}: they must match")
        if p.device != x.device:
            raise ValueError(f"params[{name!r}] is on {p.device}, x on {x.device}")
    H, Hh = cfg.hidden_size, cfg.hyper_size
    check_state(state, [(B, n) for n in (H, H, Hh, Hh)], x.device)
    if lengths is not None:
        if not isinstance(lengths, Tensor) or lengths.dim() != 1 or lengths.numel() != B \
                or lengths.dtype.is_floating_point or lengths.dtype == torch.bool:
            raise TypeError(f"lengths must be None or an integer tensor [B={B}]")
        # before the loop: host sync allowed here (skipped while torch.compile traces: data-dependent)
        lo, hi = (1, T) if torch.compiler.is_compiling() else (int(lengths.min()), int(lengths.max()))
        if lo < 1 or hi > T:
            raise ValueError(f"lengths must lie in [1, {T}], got min {lo}, max {hi}")
    if isinstance(masks, DropoutSeed):
        check_seed(masks, x.device)
    elif masks is not None:
        if not isinstance(masks, (tuple, list)) or len(masks) != 2:
            raise TypeError("masks must be None, a DropoutSeed or a pair (m_main [T, B, H], m_hyper [T, B, Hh])")
        for what, m, n in (("m_main", masks[0], H), ("m_hyper", masks[1], Hh)):
            if not isinstance(m, Tensor) or not m.dtype.is_floating_point:
                raise TypeError(f"masks: {what} must be a floating-point tensor")
            if tuple(m.shape) != (T, B, n):
                raise ValueError(f"masks: {what} must have shape {(T, B, n)}, got {tuple(m.shape)}")
            if m.device != x.device:
                raise ValueError(f"masks: {what} is on {m.device}, x on {x.device}")


def _dot(dtype: torch.dtype) -> str:
    """The dot precision of this call (:mod:`hyperkern.ops.precision`)."""
    return precision.dot_precision(dtype, interpreted=kernels_interpreted())


@torch.no_grad()
def run_sequence(x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig,
                 lengths: Lengths = None, masks: Masks = None, *,
                 out: Optional[Tensor] = None, guard: int = 0, save=False, check: bool = True):
    """The forward launcher. Returns ``(out, final_state, buffers)``.

    ``out``: optional preallocated ``[T, B, H]`` output (x's dtype, inner stride 1; any other
    strides, e.g. a view into a larger NaN-filled tensor). ``guard``: NaN guard zones around every
    internal buffer and parameter copy (tests; see :class:`_Buffers`). ``save``: keep what the
    backward needs in ``buffers.saved`` (see :func:`run_backward`): ``True``/``"full"`` every
    step's state, P, G, Â, z and XP; ``"states"`` (recompute mode) only every step's state.
    ``check=False`` skips the validation (it reads ``lengths`` on the host): for a caller that
    validated the same inputs already, e.g. while capturing a CUDA graph (:mod:`.graphs`)."""
    if check:
        _check_inputs(x, state, params, cfg, lengths, masks)
    T, B, _ = x.shape
    H, dev, dtype = cfg.hidden_size, x.device, x.dtype
    buf = _Buffers(dev, guard)
    plan = _ForwardPlan(x, params, cfg, lengths, masks, buf)
    plan.x_projection(x)
    save = "states" if save == "states" else ("full" if save else False)

    ring, step_bufs = plan.sequence_buffers(buf, state, save)
    out = _output(buf, out, T, B, H, dtype, dev)

    gates, cell = plan.bind(ring, ring, step_bufs, out)
    for t in range(T):
        gates(t)
        cell(t)
    return out, plan.finish(buf, ring, step_bufs, save, masks), buf


def _output(buf: "_Buffers", out: Optional[Tensor], T: int, B: int, H: int, dtype, dev) -> Tensor:
    """A forward call's output: ``out`` validated, or a new ``[T, B, H]`` buffer."""
    if out is None:
        return buf.new("out", (T, B, H), dtype)
    if not isinstance(out, Tensor) or tuple(out.shape) != (T, B, H) or out.dtype != dtype \
            or out.device != dev or out.stride(-1) != 1:
        raise ValueError(f"out must be a [T, B, H] = {(T, B, H)} {dtype} tensor on {dev} with inner stride 1")
    return out


_LN_NAMES = ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias",
             "hyper_ln_weight", "hyper_ln_bias", "hyper_ln_cell_weight", "hyper_ln_cell_bias")
_LN_ARGS = ("ln_w_ptr", "ln_b_ptr", "lnc_w_ptr", "lnc_b_ptr", "hln_w_ptr", "hln_b_ptr", "hlnc_w_ptr", "hlnc_b_ptr")


def _ln_args(cfg: CellConfig, params: Dict[str, Tensor], buf: "_Buffers") -> Dict[str, Optional[Tensor]]:
    """The layer-norm parameters as the cell kernels' arguments (absent without layer norm)."""
    if not cfg.layer_norm:
        return {}
    return {arg: buf.new_flat(n, params[n]) for arg, n in zip(_LN_ARGS, _LN_NAMES)}


def t_stride(step_buf: Tensor) -> int:
    """The step stride a kernel is given for a ``[T', B, *]`` per-step buffer: 0 for one scratch."""
    return step_buf.stride(0) if step_buf.shape[0] > 1 else 0


class _ForwardPlan:
    """Everything the forward kernels of one call need except the per-step buffers: parameter
    copies, lengths, masks, launch configurations. :meth:`step` is one timestep (two launches);
    the backward's recompute mode calls it again with the saved states."""

    def __init__(self, x: Tensor, params: Dict[str, Tensor], cfg: CellConfig, lengths, masks, buf: "_Buffers"):
        T, B, X = x.shape
        H, Hh, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
        self.T, self.B, self.X, self.H, self.Hh, self.E = T, B, X, H, Hh, E
        self.cfg, self.guard, self.buf, self.dtype = cfg, buf.guard, buf, x.dtype
        dev = x.device
        p = params
        self.params = p
        self.w_hh = buf.copy_strided("weight_hh", p["weight_hh"])
        w_hih_full = buf.copy_strided("hyper_weight_ih", p["hyper_weight_ih"])
        self.w_hih = w_hih_full[:, X:]  # the h-part of x̂ = [x ; h]
        self.w_hhh = buf.copy_strided("hyper_weight_hh", p["hyper_weight_hh"])
        self.z_w = buf.copy_strided("z_weight", p["z_weight"])
        self.flat = {n: buf.new_flat(n, p[n]) for n in ("bias", "hyper_bias", "z_bias", "d_weight")}
        self.ln = _ln_args(cfg, p, buf)
        if lengths is None:
            self.lens = torch.full((B,), T, dtype=torch.int32, device=dev)
        else:
            self.lens = lengths.to(device=dev, dtype=torch.int32)
        self.drop = _DropoutArgs(masks, x, buf, H, Hh)
        self.gates_launch, self.cell_launch = configs.forward_launches(
            B, _DTYPE_NAME[x.dtype], _dot(x.dtype), cfg.layer_norm, self.drop.mode)
        self.gates_kernel, self.cell_kernel = (launch.kernel_fn() for launch in (self.gates_launch, self.cell_launch))
        BH = self.gates_launch.constexpr("BH")
        self.n_main = cdiv(H, BH)
        self.grid_gates = (self.n_main + cdiv(Hh, BH), cdiv(B, self.gates_launch.constexpr("BM")))
        self.grid_cell = (cdiv(B, self.cell_launch.constexpr("BMC")),)
        self.fb, self.eps = float(cfg.forget_bias), float(cfg.ln_eps)

    def x_projection(self, x: Tensor) -> Tensor:
        """The hoisted x-projection GEMM (fp32 accumulate and output), ``[T, B, 4H + 4Hh]``; kept
        as ``self.xp`` for :meth:`bind`."""
        T, B, X, H, Hh, p = self.T, self.B, self.X, self.H, self.Hh, self.params
        w_x = torch.cat([p["weight_ih"], p["hyper_weight_ih"][:, :X]], dim=0)  # [4H + 4Hh, X]
        acc = _acc_dtype(self.dtype)
        xp_flat = torch.matmul(x.reshape(T * B, X).to(acc), w_x.to(acc).t()).view(T, B, 4 * H + 4 * Hh)
        self.xp = xp_flat
        if self.guard:
            self.xp = self.buf.new("xp", (T, B, 4 * H + 4 * Hh), acc)
            self.xp.copy_(xp_flat)
        return self.xp

    def sequence_buffers(self, buf: "_Buffers", state, save) -> Tuple[Dict[str, Tensor], Dict[str, Tensor]]:
        """A forward call's state rings ``{"H", "C", "HH", "CH"}`` (fp32, slot 0 = ``state``): every
        step's state ``[T+1, B, *]`` when ``save`` (kept for the backward), else 2 slots; and its
        P, G, Â, z (:meth:`step_buffers`): every step's with ``save="full"``, else one scratch."""
        T, B, H, Hh = self.T, self.B, self.H, self.Hh
        f32 = _acc_dtype(self.dtype)  # state / scratch / statistics: fp32 (fp64 only for fp64 inputs)
        slots = T + 1 if save else 2
        ring = {n: buf.new(n, (slots, B, k_), f32) for n, k_ in (("H", H), ("C", H), ("HH", Hh), ("CH", Hh))}
        for n, src in zip(("H", "C", "HH", "CH"), state):
            ring[n][0].copy_(src)
        return ring, self.step_buffers(buf, T if save == "full" else 1)

    def finish(self, buf: "_Buffers", ring: Dict[str, Tensor], step_bufs: Dict[str, Tensor], save, masks):
        """The call's final state (the ring's slot T, in x's dtype) and, when ``save``, what the
        backward reads in ``buf.saved`` (:func:`run_backward`)."""
        last = self.T % ring["H"].shape[0]
        final = tuple(ring[n][last].to(self.dtype).contiguous() for n in ("H", "C", "HH", "CH"))
        if save:
            buf.saved = dict(ring, lens=self.lens, masks=masks)
            if save == "full":
                buf.saved.update(step_bufs, XP=self.xp)
        return final

    def step_buffers(self, buf: "_Buffers", steps: int, prefix: str = "") -> Dict[str, Tensor]:
        """P, G, Â and z of ``steps`` steps, ``[steps, B, *]`` (``steps`` 1: one scratch that every
        step reuses); NaN in guard mode (anything read before written shows)."""
        f32, B, H, Hh, E = _acc_dtype(self.dtype), self.B, self.H, self.Hh, self.E
        bufs = {n: buf.new(prefix + n, (steps, B, k_), f32)
                for n, k_ in (("P", 4 * H), ("G", 4 * H), ("AH", 4 * Hh), ("Z", NUM_PATHS * E))}
        if buf.guard:
            for t_ in bufs.values():
                t_.fill_(float("nan"))
        return bufs

    def bind(self, prev: Dict[str, Tensor], new: Dict[str, Tensor], step_bufs: Dict[str, Tensor],
             out: Tensor) -> Tuple[StepLaunch, StepLaunch]:
        """The two launches of a forward step, bound for the whole loop: ``gates(t); cell(t)``.

        ``prev`` / ``new``: state rings ``{"H", "C", "HH", "CH"}`` of ``[S, B, *]``: step t reads
        slot ``t % S`` of ``prev`` and writes slot ``(t + 1) % S`` of ``new`` (the same rings in the
        forward; in the backward's recompute the saved states and a one-slot scratch). ``step_bufs``:
        ``{"P", "G", "AH", "Z"}`` of ``[T', B, *]``, step t's row t (T' = 1: one scratch, reused)."""
        B, H, Hh, E, fl = self.B, self.H, self.Hh, self.E, self.flat
        slots = prev["H"].shape[0]
        if not (new["H"].shape[0] in (1, slots) and prev["H"].stride(1) == prev["C"].stride(1) == new["H"].stride(1)
                == new["C"].stride(1) and prev["HH"].stride(1) == prev["CH"].stride(1) == new["HH"].stride(1)
                == new["CH"].stride(1) and prev["H"].stride(0) == prev["C"].stride(0)
                and prev["HH"].stride(0) == prev["CH"].stride(0) and new["H"].stride(0) == new["C"].stride(0)
                and new["HH"].stride(0) == new["CH"].stride(0)):
            raise AssertionError("the state rings must share their slot and row strides (main / hyper)")

        def slot_stride(ring: Dict[str, Tensor], name: str) -> int:
            return ring[name].stride(0) if ring[name].shape[0] > 1 else 0

        P, G, AH, Z = (step_bufs[n] for n in ("P", "G", "AH", "Z"))
        tstride = {n: t_stride(b_) for n, b_ in step_bufs.items()}
        xp_main, xp_hyper = self.xp[:, :, :4 * H], self.xp[:, :, 4 * H:]
        gates = StepLaunch(self.gates_launch, self.grid_gates, dict(
            h_ptr=prev["H"], hh_ptr=prev["HH"], slot_h=slot_stride(prev, "H"), slot_hh=slot_stride(prev, "HH"),
            stride_h=prev["H"].stride(1), stride_hh=prev["HH"].stride(1),
            w_hh_ptr=self.w_hh, stride_whh=self.w_hh.stride(0),
            w_hih_ptr=self.w_hih, stride_whih=self.w_hih.stride(0),
            w_hhh_ptr=self.w_hhh, stride_whhh=self.w_hhh.stride(0),
            hbias_ptr=fl["hyper_bias"], xph_ptr=xp_hyper, stride_xpt=xp_hyper.stride(0), stride_xpb=xp_hyper.stride(1),
            p_ptr=P, stride_pt=tstride["P"], stride_p=P.stride(1),
            ahat_ptr=AH, stride_aht=tstride["AH"], stride_ahat=AH.stride(1),
            t=0, n_slots=slots, B=B, H=H, Hh=Hh, n_main=self.n_main))
        d = self.drop
        cell = StepLaunch(self.cell_launch, self.grid_cell, dict(
            t=0, n_slots=slots, B=B, H=H, Hh=Hh, E=E, lengths_ptr=self.lens,
            ahat_ptr=AH, stride_aht=tstride["AH"], stride_ahat=AH.stride(1),
            chat_prev_ptr=prev["CH"], hhat_prev_ptr=prev["HH"], slot_hs=slot_stride(prev, "HH"),
            chat_new_ptr=new["CH"], hhat_new_ptr=new["HH"], slot_hs_new=slot_stride(new, "HH"),
            stride_hs=prev["HH"].stride(1),
            mh_ptr=d.m_hyper, stride_mht=d.strides_hyper[0], stride_mhb=d.strides_hyper[1],
            zw_ptr=self.z_w, stride_zw=self.z_w.stride(0), zb_ptr=fl["z_bias"],
            z_ptr=Z, stride_zt=tstride["Z"], stride_z=Z.stride(1),
            p_ptr=P, stride_pt=tstride["P"], stride_p=P.stride(1),
            xp_ptr=xp_main, stride_xpt=xp_main.stride(0), stride_xpb=xp_main.stride(1),
            bias_ptr=fl["bias"], dw_ptr=fl["d_weight"], g_ptr=G, stride_gt=tstride["G"], stride_g=G.stride(1),
            c_prev_ptr=prev["C"], h_prev_ptr=prev["H"], slot_s=slot_stride(prev, "H"),
            c_new_ptr=new["C"], h_new_ptr=new["H"], slot_s_new=slot_stride(new, "H"),
            stride_s=prev["H"].stride(1),
            m_ptr=d.m_main, stride_mt=d.strides_main[0], stride_mb=d.strides_main[1],
            out_ptr=out, stride_ot=out.stride(0), stride_ob=out.stride(1),
            seed_ptr=d.seed, p_drop=d.p, drop_scale=d.scale,
            forget_bias=self.fb, eps=self.eps, **self.ln))
        return gates, cell


class _DropoutArgs:
    """The cell kernels' recurrent-dropout arguments for ``masks`` (None, a mask pair or a
    :class:`DropoutSeed`): the ``DROPOUT`` mode 0 / 1 / 2, the fp32 mask buffers with their
    (t, b) strides, the seed tensor, p and the kept value 1/(1-p).

    Seeded (mode 2), each cell kernel first draws its step's masks for its own rows into one
    ``[B, H + Hh]`` scratch (``m_main``/``m_hyper`` are its two column blocks, t-stride 0): the forward,
    the backward and the recompute pass each draw them again; nothing is kept between steps.
    What a mode does not use is None (the launch passes it as an absent input)."""

    def __init__(self, masks, x: Tensor, buf: "_Buffers", H: int, Hh: int):
        acc = _acc_dtype(x.dtype)
        B = x.shape[1]
        self.mode, self.p, self.seed = 0, 0.0, None
        self.m_main = self.m_hyper = None
        self.strides_main = self.strides_hyper = (0, 0)
        if isinstance(masks, DropoutSeed):
            self.mode, self.p, self.seed = 2, float(masks.p), masks.seed.reshape(1)
            scratch = buf.new("m_seeded", (B, H + Hh), acc, fill=float("nan") if buf.guard else None)
            self.m_main, self.m_hyper = scratch[:, :H], scratch[:, H:]
            self.strides_main = self.strides_hyper = (0, scratch.stride(0))
        elif masks is not None:
            self.mode = 1
            self.m_main = buf.copy_strided("m_main", masks[0].to(acc))
            self.m_hyper = buf.copy_strided("m_hyper", masks[1].to(acc))
            self.strides_main, self.strides_hyper = self.m_main.stride()[:2], self.m_hyper.stride()[:2]
        self.scale = keep_scale(self.p)


# --------------------------------------------------------------------------------------------
# backward (BPTT): two launches per step in reverse time, then library GEMMs over all steps
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def run_backward(x: Tensor, params: Dict[str, Tensor], cfg: CellConfig, saved: Dict[str, Tensor],
                 d_out: Optional[Tensor], d_final, *, guard: int = 0):
    """Gradients of one cell over a whole sequence from what ``run_sequence(save=True)`` kept.

    ``d_out``: ``[T, B, H]`` or None; ``d_final``: 4-tuple of ``[B, *]`` gradients of the final
    state (entries may be None). Returns ``(dx, (dh0, dc0, dĥ0, dĉ0), {name: grad}, buffers)``,
    gradients in x's dtype. Per step exactly two launches (cell-backward, gates-backward), no
    allocation and no host synchronisation inside the loop."""
    T, B, X = x.shape
    H, Hh, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    dev, dtype = x.device, x.dtype
    f32 = _acc_dtype(dtype)
    buf = _Buffers(dev, guard)
    p = params
    w_hh = buf.copy_strided("weight_hh", p["weight_hh"])
    w_hih = buf.copy_strided("hyper_weight_ih", p["hyper_weight_ih"])[:, X:]
    w_hhh = buf.copy_strided("hyper_weight_hh", p["hyper_weight_hh"])
    z_w = buf.copy_strided("z_weight", p["z_weight"])
    d_w = buf.new_flat("d_weight", p["d_weight"])
    ln = _ln_args(cfg, p, buf)
    S = saved
    drop = _DropoutArgs(S["masks"], x, buf, H, Hh)

    # per-step gradient buffers the post-loop GEMMs consume (every row written by the kernels)
    DA = buf.new("DA", (T, B, 4 * H), f32)
    DXP = buf.new("DXP", (T, B, 4 * H + 4 * Hh), f32)
    DWH = buf.new("DWH", (T, B, 4 * H), f32)
    DZ = buf.new("DZ", (T, B, NUM_PATHS * E), f32)
    ln_bufs = {}
    if cfg.layer_norm:  # written only with layer norm (LAYER_NORM is a constexpr)
        ln_bufs = {"DG": buf.new("DG", (T, B, 4 * H), f32), "DCN": buf.new("DCN", (T, B, H), f32),
                   "HDG": buf.new("HDG", (T, B, 4 * Hh), f32), "HDCN": buf.new("HDCN", (T, B, Hh), f32)}
    dhh_tot = buf.new("dhh_tot", (B, Hh), f32)
    # the state gradients' rings: the gradient of state k in slot k % 2 (d_final: slot T % 2)
    carries = {n: buf.new(n, (2, B, w), f32) for n, w in (("dh", H), ("dc", H), ("dhh", Hh), ("dch", Hh))}
    if guard:
        for t_ in (DA, DXP, DWH, DZ, dhh_tot, *ln_bufs.values()):
            t_.fill_(float("nan"))
    for ring, g in zip(carries.values(), d_final):
        ring[T % 2].copy_(g) if g is not None else ring[T % 2].zero_()
    if d_out is None:
        d_out = buf.new("d_out", (T, B, H), dtype, fill=0.0)
    elif d_out.stride(-1) != 1 or guard:
        d_out = buf.copy_strided("d_out", d_out)
    lens = S["lens"]
    recompute = "P" not in S
    rings = {n: S[n] for n in ("H", "C", "HH", "CH")}
    if recompute:  # only the states were kept: rebuild XP (one GEMM) and, per step, P, G, Â, z
        S = dict(S)
        plan_buf = _Buffers(dev, guard)
        plan = _ForwardPlan(x, p, cfg, lens, S["masks"], plan_buf)
        S["XP"] = plan.x_projection(x)
        step_bufs = plan.step_buffers(buf, T, prefix="re_")
        S.update(step_bufs)
        discard = {n: buf.new("re_" + n, (1, B, w), f32) for n, w in (("H", H), ("C", H), ("HH", Hh), ("CH", Hh))}
        out_scratch = buf.new("re_out", (1, B, H), dtype).expand(T, B, H)  # every step writes one row
        re_gates, re_cell = plan.bind(rings, discard, step_bufs, out_scratch)
    xp_main = S["XP"][:, :, :4 * H]
    dxp_main, dxp_hyp = DXP[:, :, :4 * H], DXP[:, :, 4 * H:]
    cell_launch, gates_launch = configs.backward_launches(B, E, _DTYPE_NAME[dtype], _dot(dtype), cfg.layer_norm,
                                                          drop.mode)
    n_main = cdiv(H, gates_launch.constexpr("BN"))
    grid_gates = (n_main + cdiv(Hh, gates_launch.constexpr("BN")), cdiv(B, gates_launch.constexpr("BM")))
    grid_cell = (cdiv(B, cell_launch.constexpr("BMC")),)
    dh, dc, dhh, dch = (carries[n] for n in ("dh", "dc", "dhh", "dch"))
    Hs, Cs, HHs, CHs = S["H"], S["C"], S["HH"], S["CH"]

    def per_step(name: str, t_: Tensor) -> Dict[str, object]:
        """``{name}_ptr``, its time stride and row stride: a [T, B, *] buffer for a kernel."""
        return {f"{name}_ptr": t_, f"stride_{name}t": t_.stride(0), f"stride_{name}": t_.stride(1)}

    def ring_args(name: str, t_: Tensor) -> Dict[str, object]:
        return {f"{name}_ptr": t_, f"slot_{name}": t_.stride(0), f"stride_{name}": t_.stride(1)}

    if cfg.layer_norm:
        ln_out = dict(**per_step("dg", ln_bufs["DG"]), **per_step("dcn", ln_bufs["DCN"]),
                      **per_step("hdg", ln_bufs["HDG"]), **per_step("hdcn", ln_bufs["HDCN"]))
    else:  # the LN gradient buffers are absent (None); their strides are still arguments
        ln_out = {f"stride_{n}{s_}": 0 for n in ("dg", "dcn", "hdg", "hdcn") for s_ in ("t", "")}
    m_main, m_hyper = drop.m_main, drop.m_hyper
    cell = StepLaunch(cell_launch, grid_cell, dict(
        t=0, B=B, H=H, Hh=Hh, E=E, lengths_ptr=lens,
        **per_step("g", S["G"]), **per_step("p", S["P"]), xp_ptr=xp_main, stride_xpt=xp_main.stride(0),
        stride_xpb=xp_main.stride(1), **per_step("z", S["Z"]),
        c_ptr=Cs, slot_s=Cs.stride(0), stride_s=Cs.stride(1),
        ahat_ptr=S["AH"], stride_aht=S["AH"].stride(0), stride_ahat=S["AH"].stride(1),
        chat_ptr=CHs, slot_hs=CHs.stride(0), stride_hs=CHs.stride(1),
        dw_ptr=d_w, zw_ptr=z_w, stride_zw=z_w.stride(0),
        m_ptr=m_main, stride_mt=drop.strides_main[0], stride_mb=drop.strides_main[1],
        mh_ptr=m_hyper, stride_mht=drop.strides_hyper[0], stride_mhb=drop.strides_hyper[1],
        **per_step("dout", d_out),
        **ring_args("dh", dh), **ring_args("dhh", dhh), **ring_args("dc", dc), **ring_args("dch", dch),
        **per_step("da", DA), dxp_ptr=dxp_main, stride_dxpt=DXP.stride(0), stride_dxp=DXP.stride(1), dahat_ptr=dxp_hyp,
        **per_step("dwh", DWH), **per_step("dz", DZ), **ln_out,
        dhh_tot_ptr=dhh_tot, stride_dht=dhh_tot.stride(0),
        seed_ptr=drop.seed, p_drop=drop.p, drop_scale=drop.scale, forget_bias=float(cfg.forget_bias),
        eps=float(cfg.ln_eps), **ln))
    gates = StepLaunch(gates_launch, grid_gates, dict(
        **per_step("dwh", DWH), dahat_ptr=dxp_hyp, stride_daht=DXP.stride(0), stride_dahat=DXP.stride(1),
        w_hh_ptr=w_hh, stride_whh=w_hh.stride(0), w_hih_ptr=w_hih, stride_whih=w_hih.stride(0),
        w_hhh_ptr=w_hhh, stride_whhh=w_hhh.stride(0), **ring_args("dh", dh), **ring_args("dhh", dhh),
        lengths_ptr=lens, t=0, B=B, H=H, Hh=Hh, n_main=n_main))

    for t in reversed(range(T)):
        if recompute:  # the forward step again (2 launches), from the saved states of step t
            re_gates(t)
            re_cell(t)
        cell(t)
        gates(t)
    d_state = tuple(c_[0].to(dtype).contiguous() for c_ in (dh, dc, dhh, dch))
    if recompute:
        buf._full.update({"fwd_" + n: v for n, v in plan_buf._full.items()})

    # ---- every sum over time: one library GEMM / reduction each (fp32) ----------------------
    TB = T * B
    pf = {n: p[n].to(f32) for n in ("weight_ih", "hyper_weight_ih")}
    DXP2 = DXP.reshape(TB, 4 * H + 4 * Hh)
    W_x = torch.cat([pf["weight_ih"], pf["hyper_weight_ih"][:, :X]])
    dx = (DXP2 @ W_x).view(T, B, X).to(dtype)
    x2 = x.reshape(TB, X).to(f32)
    dW_x = DXP2.t() @ x2
    DXh = DXP2[:, 4 * H:]
    hs2 = Hs[:T].reshape(TB, H)
    hhs2 = HHs[:T].reshape(TB, Hh)
    DA2 = DA.reshape(TB, 4 * H)
    # d_weight[path·4 + y][j, e] = Σ_{t,b} dd_path[t,b,y,j] · z[t,b,(path·4 + y)E + e]
    dd = torch.stack([DA * xp_main, DA * S["P"], DA]).view(3, TB, 4, H).permute(0, 2, 3, 1).reshape(NUM_PATHS, H, TB)
    zz = S["Z"].reshape(TB, NUM_PATHS, E).transpose(0, 1)  # [12, TB, E]
    grads = {
        "weight_ih": dW_x[:4 * H],
        "weight_hh": DWH.reshape(TB, 4 * H).t() @ hs2,
        "bias": DA2.sum(0),
        "hyper_weight_ih": torch.cat([dW_x[4 * H:], DXh.t() @ hs2], 1),
        "hyper_weight_hh": DXh.t() @ hhs2,
        "hyper_bias": DXh.sum(0),
        "z_weight": DZ.reshape(TB, NUM_PATHS * E).t() @ HHs[1:].reshape(TB, Hh),
        "z_bias": DZ.reshape(TB, NUM_PATHS * E)[:, :NUM_SCALED_PATHS * E].sum(0),
        "d_weight": torch.bmm(dd, zz),
    }
    if cfg.layer_norm:
        ln_t = torch.nn.functional.layer_norm
        for pre, G_, DG_, C_, DCN_, K_ in (("", S["G"], ln_bufs["DG"], Cs, ln_bufs["DCN"], H),
                                          ("hyper_", S["AH"], ln_bufs["HDG"], CHs, ln_bufs["HDCN"], Hh)):
            an = ln_t(G_.reshape(TB, 4, K_), (K_,), eps=cfg.ln_eps)
            cn = ln_t(C_[1:].reshape(TB, K_), (K_,), eps=cfg.ln_eps)
            dg2, dcn2 = DG_.reshape(TB, 4, K_), DCN_.reshape(TB, K_)
            grads[pre + "ln_weight"] = (dg2 * an).sum(0)
            grads[pre + "ln_bias"] = dg2.sum(0)
            grads[pre + "ln_cell_weight"] = (dcn2 * cn).sum(0)
            grads[pre + "ln_cell_bias"] = dcn2.sum(0)
    grads = {n: g_.reshape(p[n].shape).to(p[n].dtype) for n, g_ in grads.items()}
    return dx, d_state, grads, buf
