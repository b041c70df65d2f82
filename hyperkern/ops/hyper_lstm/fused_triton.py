"""Triton backend (``"triton"``): fused forward kernels and the fused BPTT backward.

Per call (one cell, one direction, calling convention in :mod:`.common`):

1. before the time loop: validation, one library GEMM for the x-projections of all T steps,
   ``XP = x @ [weight_ih ; hyper_weight_ih[:, :X]]^T`` (fp32 ``[T, B, 4H + 4Hh]``), and every
   buffer the loop needs (fp32 ping-pong state, scratch, the output, device lengths);
2. the time loop: exactly two kernel launches per step (``kernels/hyper_lstm_fwd.py``:
   the gates kernel, then the cell kernel), with no allocation, no host synchronisation and no
   data-dependent shape, so it can be captured in a CUDA graph as it stands.

Variable length is masked inside the cell kernel from a device ``lengths`` tensor. Recurrent
dropout comes as a :class:`~.dropout.DropoutSeed` (what the module passes: each cell kernel draws
its step's masks with ``tl.rand`` in a first pass into a ``[B, H + Hh]`` scratch, and the backward
draws the same ones again; no ``[T, B, ·]`` mask is kept) or as given mask tensors (see :mod:`.dropout`). Training: when gradients are
required the whole sequence is one node, the custom op ``hyperkern::hyper_lstm_triton``
(registered with ``torch.library``, so ``torch.compile`` does not graph-break on it); its forward keeps every step's state, P, G, Â, z
(``run_sequence(save="full")``; or only the states inside :class:`recompute`) and its registered
backward (:func:`run_backward`) runs the kernels of ``kernels/hyper_lstm_bwd.py`` in reverse time,
two launches per step (four when recomputing), then one library GEMM per weight gradient over all
steps (docs/triton_backward.md).

Block configurations (the "dispatcher") come from :data:`GATES_TABLE` and :data:`CELL_TABLE`, the
same tables :func:`all_kernel_configs` enumerates for the compile check. They depend on the batch
size only (every loop over H, Hh, E runs in chunks), so the check covers every H up to 2048 and beyond.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from .common import CellConfig, Lengths, Masks
from .dropout import DropoutSeed, check_seed, keep_scale

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOT_PRECISION = "tf32"  # fp32 operands use tf32 tensor cores on a GPU (the interpreter's dot is exact)
# Tests only: float64 inputs run the kernels with float64 state, scratch and accumulators (the
# kernels take their accumulator dtype from the state buffers), in the interpreter on CPU tensors,
# so that torch.autograd.gradcheck can run through the Triton kernels. See :class:`float64_interpreter`.
FLOAT64_INTERPRETER = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    """dtype of the state, scratch and statistics buffers: fp32, or fp64 for fp64 inputs."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class float64_interpreter:
    """``with fused_triton.float64_interpreter():`` accept float64 CPU tensors (interpreter only;
    the kernels then compute in float64 throughout) — for ``gradcheck`` through the kernels."""

    def __enter__(self):
        global FLOAT64_INTERPRETER
        self.prev, FLOAT64_INTERPRETER = FLOAT64_INTERPRETER, True
        return self

    def __exit__(self, *exc):
        global FLOAT64_INTERPRETER
        FLOAT64_INTERPRETER = self.prev
        return False


@dataclass(frozen=True)
class GatesConfig:
    BM: int  # batch rows per program
    BH: int  # columns per gate per program (a tile covers 4 * BH gate-interleaved columns)
    BK: int  # reduction chunk
    num_warps: int
    num_stages: int  # software-pipeline depth of the K loop (tl.dot operand loads)


@dataclass(frozen=True)
class CellKernelConfig:
    BMC: int  # batch rows per program (the program owns whole rows)
    BN: int  # column chunk over H (and Hh)
    BZ: int  # z outputs per chunk
    BKZ: int  # reduction chunk of z = ĥ @ z_weight^T
    num_warps: int
    num_stages: int  # software-pipeline depth of the chunk loops (the kernel's PIPE constexpr)


# (largest batch size the row applies to, config); the last row applies to every larger batch.
GATES_TABLE: Tuple[Tuple[Optional[int], GatesConfig], ...] = (
    (16, GatesConfig(BM=16, BH=16, BK=32, num_warps=4, num_stages=3)),
    (32, GatesConfig(BM=32, BH=16, BK=32, num_warps=4, num_stages=3)),
    (None, GatesConfig(BM=64, BH=16, BK=32, num_warps=8, num_stages=3)),
)
CELL_TABLE: Tuple[Tuple[Optional[int], CellKernelConfig], ...] = (
    (32, CellKernelConfig(BMC=1, BN=256, BZ=64, BKZ=64, num_warps=8, num_stages=2)),
    (128, CellKernelConfig(BMC=2, BN=64, BZ=64, BKZ=16, num_warps=4, num_stages=1)),  # 2 stages: ptxas spills 4-8 B on sm_90 (half)
    (None, CellKernelConfig(BMC=4, BN=32, BZ=32, BKZ=16, num_warps=4, num_stages=2)),
)


@dataclass(frozen=True)
class GatesBwdConfig:
    BM: int  # batch rows per program
    BN: int  # output columns (of dh_{t-1} or dĥ_{t-1}) per program
    BK: int  # reduction chunk (over 4H, 4Hh)
    num_warps: int
    num_stages: int


@dataclass(frozen=True)
class CellBwdConfig:
    BMC: int  # batch rows per program (owns whole rows)
    BN: int  # column chunk over H (and Hh)
    BZ: int  # reduction chunk over the 12E embeddings (dĥ += dz @ z_weight)
    num_warps: int


# Register budget of both cell kernels (Triton's ``maxnreg``). Left alone, ptxas on sm_90 picks
# 96 registers for some cell configurations and spills 4-28 B to stay there (an occupancy heuristic).
# The cell kernels launch cdiv(B, BMC) programs: at most an H100's 132 SMs up to B = 528 (forward)
# / 264 (backward), where occupancy cannot matter; beyond, the 4-warp configurations used there
# still fit 2 blocks per SM at 255 registers (an SM has 64K). Not tuned on a GPU.
CELL_MAXNREG = 255

GATES_BWD_TABLE: Tuple[Tuple[Optional[int], GatesBwdConfig], ...] = (
    (16, GatesBwdConfig(BM=16, BN=32, BK=32, num_warps=4, num_stages=3)),
    (32, GatesBwdConfig(BM=32, BN=64, BK=32, num_warps=4, num_stages=3)),
    (None, GatesBwdConfig(BM=64, BN=64, BK=32, num_warps=8, num_stages=3)),
)
CELL_BWD_TABLE: Tuple[Tuple[Optional[int], CellBwdConfig], ...] = (
    (32, CellBwdConfig(BMC=1, BN=128, BZ=16, num_warps=4)),
    (None, CellBwdConfig(BMC=2, BN=32, BZ=16, num_warps=4)),
)


def choose_bwd_configs(B: int) -> Tuple[GatesBwdConfig, CellBwdConfig]:
    """The backward dispatcher (batch size only: every loop over H, Hh, E runs in chunks)."""
    return _pick_row(GATES_BWD_TABLE, B), _pick_row(CELL_BWD_TABLE, B)


def all_bwd_kernel_configs() -> Tuple[List[GatesBwdConfig], List[CellBwdConfig]]:
    return [c for _, c in GATES_BWD_TABLE], [c for _, c in CELL_BWD_TABLE]


def _pick_row(table, B: int):
    for max_b, conf in table:
        if max_b is None or B <= max_b:
            return conf
    raise AssertionError("unreachable: the last table row has no bound")


def choose_configs(B: int, H: int, Hh: int) -> Tuple[GatesConfig, CellKernelConfig]:
    """The dispatcher: block configurations of both kernels for a batch of B (H, Hh: any)."""
    if B < 1 or H < 1 or Hh < 1:
        raise ValueError(f"sizes must be positive, got B={B}, H={H}, Hh={Hh}")
    return _pick_row(GATES_TABLE, B), _pick_row(CELL_TABLE, B)


def all_kernel_configs() -> Tuple[List[GatesConfig], List[CellKernelConfig]]:
    """Every configuration :func:`choose_configs` can return (for any B, H, Hh)."""
    return [c for _, c in GATES_TABLE], [c for _, c in CELL_TABLE]


# --------------------------------------------------------------------------------------------

def _kernels():
    from hyperkern.kernels import hyper_lstm_fwd  # imports triton; only the Triton backend does

    return hyper_lstm_fwd


def _needs_grad(x: Tensor, state, params: Dict[str, Tensor]) -> bool:
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or any(isinstance(s, Tensor) and s.requires_grad for s in state)
            or any(isinstance(p, Tensor) and p.requires_grad for p in params.values()))


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


def _check_inputs(x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig, lengths, masks):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() != 3:
        raise ValueError(f"x must be [T, B, input_size], got shape {tuple(x.shape)}")
    T, B, X = x.shape
    if T < 1 or B < 1:
        raise ValueError(f"x must have at least one step and one sequence, got shape {tuple(x.shape)}")
    if X != cfg.input_size:
        raise ValueError(f"x has {X} features, the cell expects input_size={cfg.input_size}")
    if x.dtype not in SUPPORTED_DTYPES and not (x.dtype == torch.float64 and FLOAT64_INTERPRETER
                                                and x.device.type == "cpu"):
        raise TypeError(f"backend='triton' supports float32, float16 and bfloat16, got {x.dtype}")
    k = _kernels()
    if x.device.type == "cuda":
        pass
    elif x.device.type == "cpu":
        if not k.INTERPRETING:
            raise RuntimeError(
                "backend='triton' got CPU tensors but the Triton interpreter is off: set TRITON_INTERPRET=1 "
                "before hyperkern's kernels are first imported, or use a CUDA device")
        if x.dtype == torch.bfloat16:
            raise TypeError("bfloat16 cannot run in the Triton interpreter (its bf16 arithmetic is wrong); "
                            "use a CUDA device, or float32/float16")
    else:
        raise ValueError(f"backend='triton' needs CUDA tensors (or CPU under TRITON_INTERPRET=1), got {x.device}")
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
        if p.dtype != x.dtype:
            raise TypeError(f"params[{name!r}] has dtype {p.dtype}, x has {x.dtype}: they must match")
        if p.device != x.device:
            raise ValueError(f"params[{name!r}] is on {p.device}, x on {x.device}")
    H, Hh = cfg.hidden_size, cfg.hyper_size
    if not isinstance(state, (tuple, list)) or len(state) != 4:
        raise TypeError("state must be a 4-tuple (h, c, h_hat, c_hat)")
    for field, s, n in zip(("h", "c", "h_hat", "c_hat"), state, (H, H, Hh, Hh)):
        if not isinstance(s, Tensor):
            raise TypeError(f"state.{field} must be a torch.Tensor, got {type(s).__name__}")
        if tuple(s.shape) != (B, n):
            raise ValueError(f"state.{field} must have shape {(B, n)}, got {tuple(s.shape)}")
        if s.device != x.device:
            raise ValueError(f"state.{field} is on {s.device}, x on {x.device}")
        if not s.dtype.is_floating_point:
            raise TypeError(f"state.{field} must be floating point, got {s.dtype}")
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


def hyper_lstm_sequence(
    x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig,
    lengths: Lengths = None, masks: Masks = None,
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Run one cell over ``x [T, B, X]`` with the fused Triton kernels (calling convention in ``common``).

    The whole sequence is one call of the custom op ``hyperkern::hyper_lstm_triton`` (so
    ``torch.compile`` keeps it as one opaque node, no graph break). With gradients required the op
    also returns every step's state, P, G, Â and z, and its registered backward is the fused BPTT
    of ``hyper_lstm_bwd`` (``hyperkern::hyper_lstm_triton_backward``)."""
    _check_inputs(x, state, params, cfg, lengths, masks)
    save = (2 if RECOMPUTE else 1) if _needs_grad(x, state, params) else 0
    flat = [params[n] for n in cfg.param_names()]
    m_main, m_hyper, seed, p_drop = _masks_to_op(masks)
    res = torch.ops.hyperkern.hyper_lstm_triton(
        x, *state, flat, lengths, m_main, m_hyper, seed, p_drop, cfg.hidden_size, cfg.hyper_size, cfg.embed_size,
        bool(cfg.layer_norm), float(cfg.forget_bias), float(cfg.ln_eps), save)
    return res[0], tuple(res[1:5])


@torch.no_grad()
def run_sequence(x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig,
                 lengths: Lengths = None, masks: Masks = None, *,
                 out: Optional[Tensor] = None, guard: int = 0, save=False):
    """The launcher. Returns ``(out, final_state, buffers)``.

    ``out``: optional preallocated ``[T, B, H]`` output (x's dtype, inner stride 1; any other
    strides, e.g. a view into a larger NaN-filled tensor). ``guard``: NaN guard zones around every
    internal buffer and parameter copy (tests; see :class:`_Buffers`). ``save``: keep what the
    backward needs in ``buffers.saved`` (see :func:`run_backward`): ``True``/``"full"`` every
    step's state, P, G, Â, z and XP; ``"states"`` (recompute mode) only every step's state."""
    _check_inputs(x, state, params, cfg, lengths, masks)
    T, B, X = x.shape
    H, Hh, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    dev, dtype = x.device, x.dtype
    buf = _Buffers(dev, guard)
    plan = _ForwardPlan(x, params, cfg, lengths, masks, buf)
    xp_all = plan.x_projection(x)
    save = "states" if save == "states" else ("full" if save else False)

    # ---- state (fp32, ping-pong; or every step's, kept for the backward), scratch ------------
    f32 = _acc_dtype(dtype)  # state / scratch / statistics: fp32 (fp64 only for fp64 inputs)
    seq = saved = {}
    if save:  # training: every step's state stays in [T+1, B, *] buffers ...
        seq = {n: buf.new(n, (T + 1, B, k_), f32) for n, k_ in (("H", H), ("C", H), ("HH", Hh), ("CH", Hh))}
        hs, cs, hhs, chs = (seq[n].unbind(0) for n in ("H", "C", "HH", "CH"))
    else:
        hs = [buf.new(f"h{i}", (B, H), f32) for i in range(2)]
        cs = [buf.new(f"c{i}", (B, H), f32) for i in range(2)]
        hhs = [buf.new(f"h_hat{i}", (B, Hh), f32) for i in range(2)]
        chs = [buf.new(f"c_hat{i}", (B, Hh), f32) for i in range(2)]
    if save == "full":  # ... and, unless recomputed in the backward, P, G, Â and z too
        saved = {n: buf.new(n, (T, B, k_), f32) for n, k_ in (("P", 4 * H), ("G", 4 * H), ("AH", 4 * Hh),
                                                             ("Z", 12 * E))}
        p_bufs, g_bufs, ah_bufs, z_bufs = (saved[n].unbind(0) for n in ("P", "G", "AH", "Z"))
        if guard:
            for t_ in saved.values():
                t_.fill_(float("nan"))
    else:
        scratch = plan.scratch(buf, T, B)
        p_bufs, g_bufs, ah_bufs, z_bufs = ((s_,) * T for s_ in scratch)
    for dst, src in zip((hs[0], cs[0], hhs[0], chs[0]), state):
        dst.copy_(src)
    if out is None:
        out = buf.new("out", (T, B, H), dtype)
    else:
        if not isinstance(out, Tensor) or tuple(out.shape) != (T, B, H) or out.dtype != dtype \
                or out.device != dev or out.stride(-1) != 1:
            raise ValueError(f"out must be a [T, B, H] = {(T, B, H)} {dtype} tensor on {dev} with inner stride 1")

    for t in range(T):
        cur, nxt = (t, t + 1) if save else (t % 2, (t + 1) % 2)
        plan.step(t, xp_all, (hs[cur], cs[cur], hhs[cur], chs[cur]), (hs[nxt], cs[nxt], hhs[nxt], chs[nxt]),
                  p_bufs[t], g_bufs[t], ah_bufs[t], z_bufs[t], out)

    last = T if save else T % 2
    final = tuple(s[last].to(dtype).contiguous() for s in (hs, cs, hhs, chs))
    if save:
        buf.saved = dict(seq, **saved, lens=plan.lens, masks=masks)
        if save == "full":
            buf.saved["XP"] = xp_all
    return out, final, buf


class _ForwardPlan:
    """Everything the forward kernels of one call need except the per-step buffers: parameter
    copies, lengths, masks, block configurations. :meth:`step` is one timestep (two launches);
    the backward's recompute mode calls it again with the saved states."""

    def __init__(self, x: Tensor, params: Dict[str, Tensor], cfg: CellConfig, lengths, masks, buf: "_Buffers"):
        self.k = _kernels()
        T, B, X = x.shape
        H, Hh, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
        self.T, self.B, self.X, self.H, self.Hh, self.E = T, B, X, H, Hh, E
        self.cfg, self.guard, self.buf, self.dtype = cfg, buf.guard, buf, x.dtype
        dev, dtype = x.device, x.dtype
        gcfg, ccfg = choose_configs(B, H, Hh)
        p = params
        self.params = p
        self.w_hh = buf.copy_strided("weight_hh", p["weight_hh"])
        w_hih_full = buf.copy_strided("hyper_weight_ih", p["hyper_weight_ih"])
        self.w_hih = w_hih_full[:, X:]  # the h-part of x̂ = [x ; h]
        self.w_hhh = buf.copy_strided("hyper_weight_hh", p["hyper_weight_hh"])
        self.z_w = buf.copy_strided("z_weight", p["z_weight"])
        self.flat = {n: buf.new_flat(n, p[n]) for n in ("bias", "hyper_bias", "z_bias", "d_weight")}
        ln_names = ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias",
                    "hyper_ln_weight", "hyper_ln_bias", "hyper_ln_cell_weight", "hyper_ln_cell_bias")
        if cfg.layer_norm:
            self.ln = {n: buf.new_flat(n, p[n]) for n in ln_names}
        else:  # never read (LAYER_NORM is a constexpr); any pointer of the right dtype will do
            self.ln = {n: self.flat["bias"] for n in ln_names}
        if lengths is None:
            self.lens = torch.full((B,), T, dtype=torch.int32, device=dev)
        else:
            self.lens = lengths.to(device=dev, dtype=torch.int32)
        self.drop = _DropoutArgs(masks, x, buf, H, Hh)
        self.n_main = triton_cdiv(H, gcfg.BH)
        self.grid_gates = (self.n_main + triton_cdiv(Hh, gcfg.BH), triton_cdiv(B, gcfg.BM))
        self.grid_cell = (triton_cdiv(B, ccfg.BMC),)
        self.gates_kw = dict(BM=gcfg.BM, BH=gcfg.BH, BK=gcfg.BK, DOT_PRECISION=DOT_PRECISION,
                             num_warps=gcfg.num_warps, num_stages=gcfg.num_stages)
        self.cell_kw = dict(LAYER_NORM=bool(cfg.layer_norm), BMC=ccfg.BMC, BN=ccfg.BN, BZ=ccfg.BZ, BKZ=ccfg.BKZ,
                            PIPE=ccfg.num_stages, num_warps=ccfg.num_warps, num_stages=ccfg.num_stages,
                            maxnreg=CELL_MAXNREG)
        self.fb, self.eps = float(cfg.forget_bias), float(cfg.ln_eps)

    def x_projection(self, x: Tensor) -> Tensor:
        """The hoisted x-projection GEMM (fp32 accumulate and output), ``[T, B, 4H + 4Hh]``."""
        T, B, X, H, Hh, p = self.T, self.B, self.X, self.H, self.Hh, self.params
        w_x = torch.cat([p["weight_ih"], p["hyper_weight_ih"][:, :X]], dim=0)  # [4H + 4Hh, X]
        acc = _acc_dtype(self.dtype)
        xp_flat = torch.matmul(x.reshape(T * B, X).to(acc), w_x.to(acc).t()).view(T, B, 4 * H + 4 * Hh)
        if self.guard:
            xp_all = self.buf.new("xp", (T, B, 4 * H + 4 * Hh), acc)
            xp_all.copy_(xp_flat)
            return xp_all
        return xp_flat

    def scratch(self, buf: "_Buffers", T: int, B: int, prefix: str = ""):
        """One step's P, G, Â, z scratch (NaN in guard mode: anything read before written shows)."""
        f32, H, Hh, E = _acc_dtype(self.dtype), self.H, self.Hh, self.E
        bufs = (buf.new(prefix + "P", (B, 4 * H), f32), buf.new(prefix + "G", (B, 4 * H), f32),
                buf.new(prefix + "A_hat", (B, 4 * Hh), f32), buf.new(prefix + "z", (B, 12 * E), f32))
        if buf.guard:
            for t_ in bufs:
                t_.fill_(float("nan"))
        return bufs

    def step(self, t: int, xp_all: Tensor, cur, nxt, p_buf, g_buf, a_hat, z_buf, out):
        """Timestep t: the gates kernel, then the cell kernel. ``cur``/``nxt``: (h, c, ĥ, ĉ) [B, *] views."""
        B, H, Hh, E, fl, ln = self.B, self.H, self.Hh, self.E, self.flat, self.ln
        (h0, c0, hh0, ch0), (h1, c1, hh1, ch1) = cur, nxt
        if not (h0.stride(0) == h1.stride(0) == c0.stride(0) == c1.stride(0)
                and hh0.stride(0) == hh1.stride(0) == ch0.stride(0) == ch1.stride(0)):
            raise AssertionError("the cell kernel takes one row stride for all main / all hyper state views")
        xp_main, xp_hyper = xp_all[:, :, :4 * H], xp_all[:, :, 4 * H:]
        self.k.hyper_lstm_gates_kernel[self.grid_gates](
            h0, h0.stride(0), hh0, hh0.stride(0),
            self.w_hh, self.w_hh.stride(0), self.w_hih, self.w_hih.stride(0), self.w_hhh, self.w_hhh.stride(0),
            fl["hyper_bias"], xp_hyper, xp_hyper.stride(0), xp_hyper.stride(1),
            p_buf, p_buf.stride(0), a_hat, a_hat.stride(0),
            t, B, H, Hh, self.n_main, **self.gates_kw)
        self.k.hyper_lstm_cell_kernel[self.grid_cell](
            t, B, H, Hh, E, self.lens,
            a_hat, a_hat.stride(0),
            ch0, ch1, hh0, hh1, hh0.stride(0),
            ln["hyper_ln_weight"], ln["hyper_ln_bias"], ln["hyper_ln_cell_weight"], ln["hyper_ln_cell_bias"],
            self.drop.m_hyper, *self.drop.strides_hyper,
            self.z_w, self.z_w.stride(0), fl["z_bias"], z_buf, z_buf.stride(0),
            p_buf, p_buf.stride(0), xp_main, xp_main.stride(0), xp_main.stride(1),
            fl["bias"], fl["d_weight"], g_buf, g_buf.stride(0),
            c0, c1, h0, h1, h0.stride(0),
            ln["ln_weight"], ln["ln_bias"], ln["ln_cell_weight"], ln["ln_cell_bias"],
            self.drop.m_main, *self.drop.strides_main,
            out, out.stride(0), out.stride(1),
            *self.drop.scalars, self.fb, self.eps, **self.cell_kw)


class _DropoutArgs:
    """The cell kernels' recurrent-dropout arguments for ``masks`` (None, a mask pair or a
    :class:`DropoutSeed`): ``drop_mode`` 0 / 1 / 2, the fp32 mask buffers with their (t, b)
    strides, the seed tensor, p and the kept value 1/(1-p).

    Seeded (mode 2), each cell kernel first draws its step's masks for its own rows into one
    ``[B, H + Hh]`` scratch (``m_main``/``m_hyper`` are its two column blocks, t-stride 0): the forward,
    the backward and the recompute pass each draw them again; nothing is kept between steps."""

    def __init__(self, masks, x: Tensor, buf: "_Buffers", H: int, Hh: int):
        acc = _acc_dtype(x.dtype)
        B = x.shape[1]
        p, mode, seed = 0.0, 0, None
        if isinstance(masks, DropoutSeed):
            mode, p, seed = 2, float(masks.p), masks.seed.reshape(1)
            scratch = buf.new("m_seeded", (B, H + Hh), acc, fill=float("nan") if buf.guard else None)
            self.m_main, self.m_hyper = scratch[:, :H], scratch[:, H:]
            self.strides_main = self.strides_hyper = (0, scratch.stride(0))
        elif masks is not None:
            mode = 1
            self.m_main = buf.copy_strided("m_main", masks[0].to(acc))
            self.m_hyper = buf.copy_strided("m_hyper", masks[1].to(acc))
            self.strides_main, self.strides_hyper = self.m_main.stride()[:2], self.m_hyper.stride()[:2]
        else:  # never read; an fp32 pointer keeps one kernel signature
            self.m_main = self.m_hyper = buf.new("m_none", (1,), acc)
            self.strides_main = self.strides_hyper = (0, 0)
        if seed is None:  # never read; an int64 pointer keeps one kernel signature
            seed = torch.zeros(1, dtype=torch.int64, device=x.device)
        self.mode = mode
        self.scalars = (mode, seed, p, keep_scale(p))

    def step(self, t: int):
        """``(m_main of step t, its row stride, m_hyper of step t, its row stride)`` for the backward."""
        if self.mode == 1:
            return self.m_main[t], self.strides_main[1], self.m_hyper[t], self.strides_hyper[1]
        return self.m_main, self.strides_main[1], self.m_hyper, self.strides_hyper[1]


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


# --------------------------------------------------------------------------------------------
# backward (BPTT): two launches per step in reverse time, then library GEMMs over all steps
# --------------------------------------------------------------------------------------------

def _bwd_kernels():
    from hyperkern.kernels import hyper_lstm_bwd

    return hyper_lstm_bwd


@torch.no_grad()
def run_backward(x: Tensor, params: Dict[str, Tensor], cfg: CellConfig, saved: Dict[str, Tensor],
                 d_out: Optional[Tensor], d_final, *, guard: int = 0):
    """Gradients of one cell over a whole sequence from what ``run_sequence(save=True)`` kept.

    ``d_out``: ``[T, B, H]`` or None; ``d_final``: 4-tuple of ``[B, *]`` gradients of the final
    state (entries may be None). Returns ``(dx, (dh0, dc0, dĥ0, dĉ0), {name: grad}, buffers)``,
    gradients in x's dtype. Per step exactly two launches (cell-backward, gates-backward), no
    allocation and no host synchronisation inside the loop."""
    k = _bwd_kernels()
    T, B, X = x.shape
    H, Hh, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    dev, dtype = x.device, x.dtype
    f32 = _acc_dtype(dtype)
    gcfg, ccfg = choose_bwd_configs(B)
    buf = _Buffers(dev, guard)
    p = params
    w_hh = buf.copy_strided("weight_hh", p["weight_hh"])
    w_hih = buf.copy_strided("hyper_weight_ih", p["hyper_weight_ih"])[:, X:]
    w_hhh = buf.copy_strided("hyper_weight_hh", p["hyper_weight_hh"])
    z_w = buf.copy_strided("z_weight", p["z_weight"])
    d_w = buf.new_flat("d_weight", p["d_weight"])
    ln_names = ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias",
                "hyper_ln_weight", "hyper_ln_bias", "hyper_ln_cell_weight", "hyper_ln_cell_bias")
    ln = ({n: buf.new_flat(n, p[n]) for n in ln_names} if cfg.layer_norm else {n: d_w for n in ln_names})
    S = saved
    drop = _DropoutArgs(S["masks"], x, buf, H, Hh)

    # per-step gradient buffers the post-loop GEMMs consume (every row written by the kernels)
    DA = buf.new("DA", (T, B, 4 * H), f32)
    DXP = buf.new("DXP", (T, B, 4 * H + 4 * Hh), f32)
    DWH = buf.new("DWH", (T, B, 4 * H), f32)
    DZ = buf.new("DZ", (T, B, 12 * E), f32)
    if cfg.layer_norm:
        DG, DCN = buf.new("DG", (T, B, 4 * H), f32), buf.new("DCN", (T, B, H), f32)
        HDG, HDCN = buf.new("HDG", (T, B, 4 * Hh), f32), buf.new("HDCN", (T, B, Hh), f32)
    else:  # never written nor read (LAYER_NORM is a constexpr)
        DG = DCN = HDG = HDCN = DA
    dhh_tot = buf.new("dhh_tot", (B, Hh), f32)
    carries = {n: [buf.new(f"{n}{i}", (B, w), f32) for i in range(2)]
               for n, w in (("dh", H), ("dc", H), ("dhh", Hh), ("dch", Hh))}
    if guard:
        for t_ in (DA, DXP, DWH, DZ, DG, DCN, HDG, HDCN, dhh_tot):
            t_.fill_(float("nan"))
    for (n, pair), g in zip(carries.items(), d_final):
        pair[0].copy_(g) if g is not None else pair[0].zero_()
    if d_out is None:
        d_out = buf.new("d_out", (T, B, H), dtype, fill=0.0)
    elif d_out.stride(-1) != 1 or guard:
        d_out = buf.copy_strided("d_out", d_out)
    lens = S["lens"]
    recompute = "P" not in S
    if recompute:  # only the states were kept: rebuild XP (one GEMM) and, per step, P, G, Â, z
        S = dict(S)
        plan_buf = _Buffers(dev, guard)
        plan = _ForwardPlan(x, p, cfg, lens, S["masks"], plan_buf)
        S["XP"] = plan.x_projection(x)
        for n, w in (("P", 4 * H), ("G", 4 * H), ("AH", 4 * Hh), ("Z", 12 * E)):
            S[n] = buf.new("re_" + n, (T, B, w), f32, fill=float("nan") if guard else None)
        nxt_scratch = tuple(buf.new("re_" + n, (B, w), f32) for n, w in (("h", H), ("c", H), ("hh", Hh), ("ch", Hh)))
        out_scratch = buf.new("re_out", (1, B, H), dtype).expand(T, B, H)  # every step writes one row
    xp_main = S["XP"][:, :, :4 * H]
    dxp_main, dxp_hyp = DXP[:, :, :4 * H], DXP[:, :, 4 * H:]
    BE = max(2, triton_next_pow2(E))
    n_main = triton_cdiv(H, gcfg.BN)
    grid_gates = (n_main + triton_cdiv(Hh, gcfg.BN), triton_cdiv(B, gcfg.BM))
    grid_cell = (triton_cdiv(B, ccfg.BMC),)
    cell_kw = dict(LAYER_NORM=bool(cfg.layer_norm), BMC=ccfg.BMC, BN=ccfg.BN, BE=BE, BZ=ccfg.BZ,
                   num_warps=ccfg.num_warps, num_stages=1, maxnreg=CELL_MAXNREG)
    gates_kw = dict(BM=gcfg.BM, BN=gcfg.BN, BK=gcfg.BK, DOT_PRECISION=DOT_PRECISION,
                    num_warps=gcfg.num_warps, num_stages=gcfg.num_stages)
    fb, eps = float(cfg.forget_bias), float(cfg.ln_eps)
    Hs, Cs, HHs, CHs = S["H"], S["C"], S["HH"], S["CH"]
    dh, dc, dhh, dch = (carries[n] for n in ("dh", "dc", "dhh", "dch"))
    cell_kernel, gates_kernel = k.hyper_lstm_cell_bwd_kernel, k.hyper_lstm_gates_bwd_kernel
    for step, t in enumerate(reversed(range(T))):
        cur, nxt = step % 2, (step + 1) % 2
        if recompute:  # the forward step again (2 launches), from the saved states of step t
            plan.step(t, S["XP"], (Hs[t], Cs[t], HHs[t], CHs[t]), nxt_scratch,
                      S["P"][t], S["G"][t], S["AH"][t], S["Z"][t], out_scratch)
        cell_kernel[grid_cell](
            t, B, H, Hh, E, lens,
            S["G"][t], S["G"].stride(1), S["P"][t], S["P"].stride(1), xp_main[t], xp_main.stride(1),
            S["Z"][t], S["Z"].stride(1), Cs[t], Cs[t + 1], Cs.stride(1),
            S["AH"][t], S["AH"].stride(1), CHs[t], CHs[t + 1], CHs.stride(1),
            d_w, z_w, z_w.stride(0),
            ln["ln_weight"], ln["ln_bias"], ln["ln_cell_weight"], ln["ln_cell_bias"],
            ln["hyper_ln_weight"], ln["hyper_ln_bias"], ln["hyper_ln_cell_weight"], ln["hyper_ln_cell_bias"],
            *drop.step(t),
            d_out[t], d_out.stride(1),
            dh[cur], dh[cur].stride(0), dhh[cur], dhh[cur].stride(0),
            dc[cur], dc[nxt], dc[cur].stride(0), dch[cur], dch[nxt], dch[cur].stride(0),
            DA[t], DA.stride(1), dxp_main[t], DXP.stride(1), DWH[t], DWH.stride(1),
            dxp_hyp[t], DXP.stride(1), DZ[t], DZ.stride(1),
            DG[t], DG.stride(1), DCN[t], DCN.stride(1), HDG[t], HDG.stride(1), HDCN[t], HDCN.stride(1),
            dhh_tot, dhh_tot.stride(0),
            *drop.scalars, fb, eps, **cell_kw)
        gates_kernel[grid_gates](
            DWH[t], DWH.stride(1), dxp_hyp[t], DXP.stride(1),
            w_hh, w_hh.stride(0), w_hih, w_hih.stride(0), w_hhh, w_hhh.stride(0),
            dh[cur], dh[cur].stride(0), dhh[cur], dhh[cur].stride(0), dh[nxt], dhh[nxt],
            lens, t, B, H, Hh, n_main, **gates_kw)
    last = T % 2
    d_state = tuple(c_[last].to(dtype).contiguous() for c_ in (dh, dc, dhh, dch))
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
    dd = torch.stack([DA * xp_main, DA * S["P"], DA]).view(3, TB, 4, H).permute(0, 2, 3, 1).reshape(12, H, TB)
    zz = S["Z"].reshape(TB, 12, E).transpose(0, 1)  # [12, TB, E]
    grads = {
        "weight_ih": dW_x[:4 * H],
        "weight_hh": DWH.reshape(TB, 4 * H).t() @ hs2,
        "bias": DA2.sum(0),
        "hyper_weight_ih": torch.cat([dW_x[4 * H:], DXh.t() @ hs2], 1),
        "hyper_weight_hh": DXh.t() @ hhs2,
        "hyper_bias": DXh.sum(0),
        "z_weight": DZ.reshape(TB, 12 * E).t() @ HHs[1:].reshape(TB, Hh),
        "z_bias": DZ.reshape(TB, 12 * E)[:, :8 * E].sum(0),
        "d_weight": torch.bmm(dd, zz),
    }
    if cfg.layer_norm:
        ln_t = torch.nn.functional.layer_norm
        for pre, G_, DG_, C_, DCN_, K_ in (("", S["G"], DG, Cs, DCN, H), ("hyper_", S["AH"], HDG, CHs, HDCN, Hh)):
            an = ln_t(G_.reshape(TB, 4, K_), (K_,), eps=cfg.ln_eps)
            cn = ln_t(C_[1:].reshape(TB, K_), (K_,), eps=cfg.ln_eps)
            dg2, dcn2 = DG_.reshape(TB, 4, K_), DCN_.reshape(TB, K_)
            grads[pre + "ln_weight"] = (dg2 * an).sum(0)
            grads[pre + "ln_bias"] = dg2.sum(0)
            grads[pre + "ln_cell_weight"] = (dcn2 * cn).sum(0)
            grads[pre + "ln_cell_bias"] = dcn2.sum(0)
    grads = {n: g.reshape(p[n].shape).to(p[n].dtype) for n, g in grads.items()}
    return dx, d_state, grads, buf


def triton_next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


# --------------------------------------------------------------------------------------------
# torch.library registration: one custom op over a whole sequence (forward) and one for its
# backward, so torch.compile treats the time loop as a single opaque node (no graph break).
# --------------------------------------------------------------------------------------------

SAVED_NAMES = ("H", "C", "HH", "CH", "P", "G", "AH", "Z", "XP", "lens")  # save=1 (full)
SAVED_NAMES_STATES = ("H", "C", "HH", "CH", "lens")  # save=2 (recompute mode)

RECOMPUTE = False  # training memory mode of backend="triton"; see :func:`recompute`


class recompute:
    """``with fused_triton.recompute():`` (or ``recompute(False)``) — training forwards inside
    keep only the states h, c, ĥ, ĉ of every step; the backward rebuilds XP with one GEMM and
    re-runs each step's forward kernels (2 more launches per step, 4 in all) to get P, G, Â, z.
    Gradients are bitwise identical to the default mode (same kernels, same inputs)."""

    def __init__(self, on: bool = True):
        self.on = bool(on)

    def __enter__(self):
        global RECOMPUTE
        self.prev, RECOMPUTE = RECOMPUTE, self.on
        return self

    def __exit__(self, *exc):
        global RECOMPUTE
        RECOMPUTE = self.prev
        return False


def _cfg_of(X: int, H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float) -> CellConfig:
    return CellConfig(X, H, Hh, E, bool(layer_norm), float(forget_bias), float(ln_eps))


def _saved_shapes(T, B, H, Hh, E):
    return {"H": (T + 1, B, H), "C": (T + 1, B, H), "HH": (T + 1, B, Hh), "CH": (T + 1, B, Hh),
            "P": (T, B, 4 * H), "G": (T, B, 4 * H), "AH": (T, B, 4 * Hh), "Z": (T, B, 12 * E),
            "XP": (T, B, 4 * H + 4 * Hh), "lens": (B,)}


@torch.library.custom_op("hyperkern::hyper_lstm_triton", mutates_args=())
def hyper_lstm_triton_op(
    x: Tensor, h0: Tensor, c0: Tensor, hh0: Tensor, ch0: Tensor, params: List[Tensor],
    lengths: Optional[Tensor], m_main: Optional[Tensor], m_hyper: Optional[Tensor],
    seed: Optional[Tensor], p_drop: float,
    H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float, save: int,
) -> List[Tensor]:
    """[out, h, c, ĥ, ĉ] + what the backward needs: nothing (``save=0``, inference), every step's
    tensors (1: :data:`SAVED_NAMES`) or only every step's states (2, recompute mode:
    :data:`SAVED_NAMES_STATES`). Recurrent dropout: the masks ``m_main, m_hyper``, or ``seed`` with
    drop probability ``p_drop`` (see :func:`_masks_to_op`), or neither."""
    cfg = _cfg_of(x.shape[2], H, Hh, E, layer_norm, forget_bias, ln_eps)
    p = dict(zip(cfg.param_names(), params))
    masks = _masks_from_op(m_main, m_hyper, seed, p_drop)
    mode = {0: False, 1: "full", 2: "states"}[int(save)]
    out, final, buf = run_sequence(x, (h0, c0, hh0, ch0), p, cfg, lengths, masks, save=mode)
    res = [out] + [f.clone() for f in final]  # never alias another output
    if save:
        res += [buf.saved[n] for n in (SAVED_NAMES if save == 1 else SAVED_NAMES_STATES)]
    return res


@hyper_lstm_triton_op.register_fake
def _(x, h0, c0, hh0, ch0, params, lengths, m_main, m_hyper, seed, p_drop, H, Hh, E, layer_norm, forget_bias,
      ln_eps, save):
    T, B, _ = x.shape
    res = [x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(B, H), x.new_empty(B, Hh), x.new_empty(B, Hh)]
    if save:
        shapes = _saved_shapes(T, B, H, Hh, E)
        for n in (SAVED_NAMES if save == 1 else SAVED_NAMES_STATES):
            res.append(x.new_empty(shapes[n], dtype=torch.int32 if n == "lens" else _acc_dtype(x.dtype)))
    return res


@torch.library.custom_op("hyperkern::hyper_lstm_triton_backward", mutates_args=())
def hyper_lstm_triton_backward_op(
    x: Tensor, params: List[Tensor], saved: List[Tensor], m_main: Optional[Tensor], m_hyper: Optional[Tensor],
    seed: Optional[Tensor], p_drop: float, d_out: Optional[Tensor], dh: Optional[Tensor], dc: Optional[Tensor],
    dhh: Optional[Tensor], dch: Optional[Tensor], H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float,
) -> List[Tensor]:
    """[d x, d h0, d c0, d ĥ0, d ĉ0] + the parameter gradients (``cfg.param_names()`` order)."""
    cfg = _cfg_of(x.shape[2], H, Hh, E, layer_norm, forget_bias, ln_eps)
    p = dict(zip(cfg.param_names(), params))
    sv = dict(zip(SAVED_NAMES if len(saved) == len(SAVED_NAMES) else SAVED_NAMES_STATES, saved))
    sv["masks"] = _masks_from_op(m_main, m_hyper, seed, p_drop)
    dx, d_state, grads, _ = run_backward(x, p, cfg, sv, d_out, (dh, dc, dhh, dch))
    return [dx, *d_state] + [grads[n] for n in cfg.param_names()]


@hyper_lstm_triton_backward_op.register_fake
def _(x, params, saved, m_main, m_hyper, seed, p_drop, d_out, dh, dc, dhh, dch, H, Hh, E, layer_norm, forget_bias,
      ln_eps):
    B = x.shape[1]
    return [torch.empty_like(x), x.new_empty(B, H), x.new_empty(B, H), x.new_empty(B, Hh), x.new_empty(B, Hh)] + \
        [torch.empty_like(q) for q in params]


_SCALARS = ("H", "Hh", "E", "layer_norm", "forget_bias", "ln_eps")


def _setup_context(ctx, inputs, output):
    x, h0, c0, hh0, ch0, params, lengths, m_main, m_hyper, seed, p_drop, *scalars = inputs
    ctx.scalars = scalars[:6]
    ctx.p_drop = p_drop
    ctx.state_dtypes = [s.dtype for s in (h0, c0, hh0, ch0)]
    ctx.n_params = len(params)
    ctx.save_for_backward(x, m_main, m_hyper, seed, *params, *output[5:])


def _backward(ctx, grads):
    x, m_main, m_hyper, seed, *rest = ctx.saved_tensors
    params, saved = rest[:ctx.n_params], rest[ctx.n_params:]
    if not saved:
        raise RuntimeError("hyperkern::hyper_lstm_triton ran with save=False: nothing kept for the backward")
    d_out, dh, dc, dhh, dch = grads[:5]
    res = torch.ops.hyperkern.hyper_lstm_triton_backward(
        x, list(params), list(saved), m_main, m_hyper, seed, ctx.p_drop, d_out, dh, dc, dhh, dch, *ctx.scalars)
    d_state = [g.to(dt) for g, dt in zip(res[1:5], ctx.state_dtypes)]
    return (res[0], *d_state, list(res[5:])) + (None,) * 12  # lengths, m_main, m_hyper, seed, p_drop, 7 scalars


def _masks_to_op(masks):
    """A backend's ``masks`` as the op's ``(m_main, m_hyper, seed, p_drop)`` arguments."""
    if isinstance(masks, DropoutSeed):
        return None, None, masks.seed, float(masks.p)
    if masks is None:
        return None, None, None, 0.0
    return masks[0], masks[1], None, 0.0


def _masks_from_op(m_main, m_hyper, seed, p_drop):
    if seed is not None:
        return DropoutSeed(seed, float(p_drop))
    return None if m_main is None else (m_main, m_hyper)


hyper_lstm_triton_op.register_autograd(_backward, setup_context=_setup_context)
