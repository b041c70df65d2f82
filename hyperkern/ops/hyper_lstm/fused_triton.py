"""Triton backend (``"triton"``): fused forward kernels, inference only (until the backward issue).

Per call (one cell, one direction, calling convention in :mod:`.common`):

1. before the time loop: validation, one library GEMM for the x-projections of all T steps,
   ``XP = x @ [weight_ih ; hyper_weight_ih[:, :X]]^T`` (fp32 ``[T, B, 4H + 4Hh]``), and every
   buffer the loop needs (fp32 ping-pong state, scratch, the output, device lengths);
2. the time loop: exactly two kernel launches per step (``kernels/hyper_lstm_fwd.py``:
   the gates kernel, then the cell kernel), with no allocation, no host synchronisation and no
   data-dependent shape, so it can be captured in a CUDA graph as it stands.

Variable length is masked inside the cell kernel from a device ``lengths`` tensor; recurrent
dropout masks are taken as given. Training: the kernels have no backward yet, so a call that would
need gradients raises ``NotImplementedError`` naming ``backend='torch'`` (``"auto"`` only picks
``"triton"`` when grad mode is off, see ``resolve_backend``).

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

SUPPORTED_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DOT_PRECISION = "tf32"  # fp32 operands use tf32 tensor cores on a GPU (the interpreter's dot is exact)


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


def _refuse_training(x: Tensor, state, params: Dict[str, Tensor]) -> None:
    if not torch.is_grad_enabled():
        return
    needs = [n for n, p in params.items() if p.requires_grad]
    if x.requires_grad:
        needs.append("input")
    if any(s.requires_grad for s in state):
        needs.append("state")
    if needs:
        raise NotImplementedError(
            "backend='triton' is forward-only for now (the backward kernels are a later issue), but "
            f"gradients are required for {', '.join(needs[:4])}{', ...' if len(needs) > 4 else ''}. "
            "Train with backend='torch', or run inference under torch.no_grad() / torch.inference_mode().")


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
    if x.dtype not in SUPPORTED_DTYPES:
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
        lo, hi = int(lengths.min()), int(lengths.max())  # before the loop: host sync allowed here
        if lo < 1 or hi > T:
            raise ValueError(f"lengths must lie in [1, {T}], got min {lo}, max {hi}")
    if masks is not None:
        if not isinstance(masks, (tuple, list)) or len(masks) != 2:
            raise TypeError("masks must be None or a pair (m_main [T, B, H], m_hyper [T, B, Hh])")
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
    """Run one cell over ``x [T, B, X]`` with the fused Triton kernels (calling convention in ``common``)."""
    _refuse_training(x, state, params)
    out, final, _ = run_sequence(x, state, params, cfg, lengths, masks)
    return out, final


@torch.no_grad()
def run_sequence(x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig,
                 lengths: Lengths = None, masks: Masks = None, *,
                 out: Optional[Tensor] = None, guard: int = 0):
    """The launcher. Returns ``(out, final_state, buffers)``.

    ``out``: optional preallocated ``[T, B, H]`` output (x's dtype, inner stride 1; any other
    strides, e.g. a view into a larger NaN-filled tensor). ``guard``: NaN guard zones around every
    internal buffer and parameter copy (tests; see :class:`_Buffers`)."""
    _check_inputs(x, state, params, cfg, lengths, masks)
    k = _kernels()
    T, B, X = x.shape
    H, Hh, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    dev, dtype = x.device, x.dtype
    gcfg, ccfg = choose_configs(B, H, Hh)
    buf = _Buffers(dev, guard)

    # ---- parameters (inner stride 1; private guarded copies in guard mode) -----------------
    p = params
    w_hh = buf.copy_strided("weight_hh", p["weight_hh"])
    w_hih_full = buf.copy_strided("hyper_weight_ih", p["hyper_weight_ih"])
    w_hih = w_hih_full[:, X:]  # the h-part of x̂ = [x ; h]
    w_hhh = buf.copy_strided("hyper_weight_hh", p["hyper_weight_hh"])
    z_w = buf.copy_strided("z_weight", p["z_weight"])
    flat = {n: buf.new_flat(n, p[n]) for n in ("bias", "hyper_bias", "z_bias", "d_weight")}
    if cfg.layer_norm:
        ln = {n: buf.new_flat(n, p[n]) for n in ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias",
                                                   "hyper_ln_weight", "hyper_ln_bias",
                                                   "hyper_ln_cell_weight", "hyper_ln_cell_bias")}
    else:  # never read (LAYER_NORM is a constexpr); any pointer of the right dtype will do
        ln = {n: flat["bias"] for n in ("ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias",
                                        "hyper_ln_weight", "hyper_ln_bias",
                                        "hyper_ln_cell_weight", "hyper_ln_cell_bias")}

    # ---- the hoisted x-projection GEMM (fp32 accumulate and output) ------------------------
    w_x = torch.cat([p["weight_ih"], p["hyper_weight_ih"][:, :X]], dim=0)  # [4H + 4Hh, X]
    xp_flat = torch.matmul(x.reshape(T * B, X).float(), w_x.float().t()).view(T, B, 4 * H + 4 * Hh)
    if guard:
        xp_all = buf.new("xp", (T, B, 4 * H + 4 * Hh), torch.float32)
        xp_all.copy_(xp_flat)
    else:
        xp_all = xp_flat
    xp_main, xp_hyper = xp_all[:, :, :4 * H], xp_all[:, :, 4 * H:]

    # ---- state (fp32, ping-pong), scratch, output, lengths, masks --------------------------
    f32 = torch.float32
    hs = [buf.new(f"h{i}", (B, H), f32) for i in range(2)]
    cs = [buf.new(f"c{i}", (B, H), f32) for i in range(2)]
    hhs = [buf.new(f"h_hat{i}", (B, Hh), f32) for i in range(2)]
    chs = [buf.new(f"c_hat{i}", (B, Hh), f32) for i in range(2)]
    for dst, src in zip((hs[0], cs[0], hhs[0], chs[0]), state):
        dst.copy_(src)
    p_buf = buf.new("P", (B, 4 * H), f32)
    g_buf = buf.new("G", (B, 4 * H), f32)
    a_hat = buf.new("A_hat", (B, 4 * Hh), f32)
    z_buf = buf.new("z", (B, 12 * E), f32)
    if guard:  # scratch starts as NaN: reading anything not written this step would show
        for t_ in (p_buf, g_buf, a_hat, z_buf):
            t_.fill_(float("nan"))
    if out is None:
        out = buf.new("out", (T, B, H), dtype)
    else:
        if not isinstance(out, Tensor) or tuple(out.shape) != (T, B, H) or out.dtype != dtype \
                or out.device != dev or out.stride(-1) != 1:
            raise ValueError(f"out must be a [T, B, H] = {(T, B, H)} {dtype} tensor on {dev} with inner stride 1")
    if lengths is None:
        lens = torch.full((B,), T, dtype=torch.int32, device=dev)
    else:
        lens = lengths.to(device=dev, dtype=torch.int32)
    if masks is not None:
        m_main = buf.copy_strided("m_main", masks[0].to(dtype))
        m_hyp = buf.copy_strided("m_hyper", masks[1].to(dtype))
        has_masks = 1
    else:
        m_main = m_hyp = x  # never read (has_masks = 0); a pointer of x's dtype
        has_masks = 0
    stride_m = (m_main.stride(0), m_main.stride(1)) if masks is not None else (0, 0)
    stride_mh = (m_hyp.stride(0), m_hyp.stride(1)) if masks is not None else (0, 0)

    # ---- launch arguments for both parities, then the loop --------------------------------
    n_main, n_hyp = triton_cdiv(H, gcfg.BH), triton_cdiv(Hh, gcfg.BH)
    grid_gates = (n_main + n_hyp, triton_cdiv(B, gcfg.BM))
    grid_cell = (triton_cdiv(B, ccfg.BMC),)
    gates_kernel, cell_kernel = k.hyper_lstm_gates_kernel, k.hyper_lstm_cell_kernel
    gates_kw = dict(BM=gcfg.BM, BH=gcfg.BH, BK=gcfg.BK, DOT_PRECISION=DOT_PRECISION,
                    num_warps=gcfg.num_warps, num_stages=gcfg.num_stages)
    cell_kw = dict(LAYER_NORM=bool(cfg.layer_norm), BMC=ccfg.BMC, BN=ccfg.BN, BZ=ccfg.BZ, BKZ=ccfg.BKZ, PIPE=ccfg.num_stages,
                   num_warps=ccfg.num_warps, num_stages=ccfg.num_stages)
    fb, eps = float(cfg.forget_bias), float(cfg.ln_eps)
    for t in range(T):
        cur, nxt = t % 2, (t + 1) % 2
        gates_kernel[grid_gates](
            hs[cur], hs[cur].stride(0), hhs[cur], hhs[cur].stride(0),
            w_hh, w_hh.stride(0), w_hih, w_hih.stride(0), w_hhh, w_hhh.stride(0),
            flat["hyper_bias"], xp_hyper, xp_hyper.stride(0), xp_hyper.stride(1),
            p_buf, p_buf.stride(0), a_hat, a_hat.stride(0),
            t, B, H, Hh, n_main, **gates_kw)
        cell_kernel[grid_cell](
            t, B, H, Hh, E, lens,
            a_hat, a_hat.stride(0),
            chs[cur], chs[nxt], hhs[cur], hhs[nxt], hhs[cur].stride(0),
            ln["hyper_ln_weight"], ln["hyper_ln_bias"], ln["hyper_ln_cell_weight"], ln["hyper_ln_cell_bias"],
            m_hyp, stride_mh[0], stride_mh[1],
            z_w, z_w.stride(0), flat["z_bias"], z_buf, z_buf.stride(0),
            p_buf, p_buf.stride(0), xp_main, xp_main.stride(0), xp_main.stride(1),
            flat["bias"], flat["d_weight"], g_buf, g_buf.stride(0),
            cs[cur], cs[nxt], hs[cur], hs[nxt], hs[cur].stride(0),
            ln["ln_weight"], ln["ln_bias"], ln["ln_cell_weight"], ln["ln_cell_bias"],
            m_main, stride_m[0], stride_m[1],
            out, out.stride(0), out.stride(1),
            has_masks, fb, eps, **cell_kw)

    last = T % 2
    final = tuple(s[last].to(dtype).contiguous() for s in (hs, cs, hhs, chs))
    return out, final, buf


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)
