"""Fused Triton static kernel generation: launchers and the autograd.Function.

Forward: ONE launch of ``static_gen_fwd_kernel`` writes every tile of every layer straight into
one flat buffer that holds all the layers' ``[C_out, C_in, k, k]`` weights back to back; the layers
are views of it (no concatenation, no permutation copy).

Both directions are ``torch.library`` custom ops (``hyperkern::static_gen_triton`` and its
backward), so ``torch.compile`` keeps them as opaque nodes.

Backward (deterministic: every reduction in a fixed order, no atomics):
1. ``static_gen_bwd_rows_kernel`` recomputes A and computes dA = dS @ w_out (gathering dS from the
   flat gradient with the forward's addressing), both to ``[E, N_in, d]`` scratch in the input dtype;
2. ``static_gen_bwd_weights_kernel`` computes dz, dw_in, db_in and split partials of dw_out, db_out;
3. the partials are summed over the split axis (``torch.sum``, fixed order) and cast.

Triton (and the kernel module) is imported on first use, never by ``import hyperkern``.
"""
from __future__ import annotations

from typing import List, Optional

import torch

from hyperkern.kernels.common import cdiv, interpreted

from .. import launches, precision
from . import configs
from .common import TilePlan, cached_destinations

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_PROGRAMS = 128  # programs the dw_out split aims for (the grid's other axes are small)


INTERPRETER_DTYPES = (torch.float16, torch.float32, torch.float64)  # the interpreter's bf16 arithmetic is wrong


def hidden_limit(hidden=None, **_):
    """Why the kernels cannot take hidden size ``hidden`` (None: they can); the registry asks too."""
    if hidden is not None and hidden > configs.MAX_BLOCK_D:
        return (f"holds the hidden vector in registers: d = w_in.shape[1] must be <= {configs.MAX_BLOCK_D}, "
                f"got {hidden} (use backend='torch')")
    return None


def kernels_interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (decided when they were first imported;
    this imports them, hence Triton)."""
    from hyperkern.kernels import static_gen

    return interpreted(static_gen.static_gen_fwd_kernel)


def check_supported(z: torch.Tensor, d: int) -> None:
    """Raise if the Triton path cannot run these inputs (dtype, device, hidden size)."""
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports float16, bfloat16, float32 and float64 inputs, got {z.dtype}")
    if z.device.type != "cuda" and not kernels_interpreted():
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {z.device}")
    why = hidden_limit(d)
    if why is not None:
        raise ValueError(f"the triton backend {why}")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write is allocated here (the tests poison it with NaN guard zones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(launch, grid, args: dict):
    """Every launch of this module goes through here (keyword arguments only; the tests count
    launches by patching it)."""
    launch.kernel_fn()[grid](**launch.kwargs(args))


def _launches(z: torch.Tensor, d: int, has_b_in: bool, has_b_out: bool):
    """The three kernels' launches for these inputs (configs.launch; dots per hyperkern.ops.precision)."""
    dt = precision.DTYPE_NAMES[z.dtype]
    dot = precision.dot_precision(z.dtype, interpreted=z.device.type == "cpu")  # CPU tensors: interpreted kernels
    return {k: configs.launch(k, d, dt, dot, has_b_in, has_b_out) for k in configs.KERNELS}


def forward_flat(z, w_in, b_in, w_out, b_out, plan: TilePlan) -> torch.Tensor:
    """One launch: the flat buffer holding every generated weight (layout per ``plan``)."""
    E, n_z = z.shape
    n_in, d, _ = w_in.shape
    n_cols = w_out.shape[0]
    out = _empty((plan.numel,), z.dtype, z.device)
    dst_base, dst_row = cached_destinations(plan, z.device)
    launch = _launches(z, d, b_in is not None, b_out is not None)["static_gen_fwd_kernel"]
    grid = (cdiv(E, configs.BLOCK_E), n_in)
    _launch(launch, grid, dict(
        z_ptr=z, w_in_ptr=w_in, b_in_ptr=b_in, w_out_ptr=w_out, b_out_ptr=b_out, out_ptr=out,
        dst_base_ptr=dst_base, dst_row_ptr=dst_row, n_tiles=E, n_z=n_z, d=d, n_in=n_in, n_cols=n_cols, KK=plan.kk))
    return out


def backward_flat(dout, z, w_in, b_in, w_out, b_out, plan: TilePlan):
    """Gradients of (z, w_in, b_in, w_out, b_out) given the flat output gradient."""
    E, n_z = z.shape
    n_in, d, _ = w_in.shape
    n_cols = w_out.shape[0]
    dev, dt = z.device, z.dtype
    dout = dout.to(dt).contiguous()
    dst_base, dst_row = cached_destinations(plan, dev)
    has_b_in = b_in is not None
    launches = _launches(z, d, has_b_in, b_out is not None)
    n_groups = cdiv(E, configs.BLOCK_E)
    sizes = dict(n_tiles=E, n_z=n_z, d=d, n_in=n_in)

    a_buf = _empty((E, n_in, d), dt, dev)
    da_buf = _empty((E, n_in, d), dt, dev)
    _launch(launches["static_gen_bwd_rows_kernel"], (n_groups, n_in), dict(
        z_ptr=z, w_in_ptr=w_in, b_in_ptr=b_in, w_out_ptr=w_out, dout_ptr=dout, dst_base_ptr=dst_base,
        dst_row_ptr=dst_row, a_buf_ptr=a_buf, da_buf_ptr=da_buf, n_cols=n_cols, KK=plan.kk, **sizes))

    n_col_blocks = cdiv(n_cols, configs.BLOCK_N)
    n_row_blocks = n_groups * n_in
    n_split = max(1, min(n_row_blocks, TARGET_PROGRAMS // n_col_blocks))
    rows_per_split = cdiv(n_row_blocks, n_split)
    n_split = cdiv(n_row_blocks, rows_per_split)  # no empty splits
    n_z_blocks = cdiv(n_z, configs.BLOCK_Z)
    acc = torch.float64 if dt == torch.float64 else torch.float32  # the kernels' ACC dtype
    pw = _empty((n_split, n_cols, d), acc, dev)
    pb = _empty((n_split, n_cols), acc, dev)
    dz = _empty(z.shape, dt, dev)
    dw_in = _empty(w_in.shape, dt, dev)
    db_in = _empty(b_in.shape, dt, dev) if has_b_in else None
    grid = (n_col_blocks * n_split + n_in * n_z_blocks + n_groups * n_z_blocks,)
    _launch(launches["static_gen_bwd_weights_kernel"], grid, dict(
        z_ptr=z, w_in_ptr=w_in, dout_ptr=dout, dst_base_ptr=dst_base, dst_row_ptr=dst_row, a_buf_ptr=a_buf,
        da_buf_ptr=da_buf, pw_ptr=pw, pb_ptr=pb, dw_in_ptr=dw_in, db_in_ptr=db_in, dz_ptr=dz, n_cols=n_cols,
        KK=plan.kk, n_col_blocks=n_col_blocks, n_split=n_split, rows_per_split=rows_per_split,
        n_z_blocks=n_z_blocks, **sizes))
    dw_out = pw.sum(0).to(dt)
    db_out = pb.sum(0).to(dt) if b_out is not None else None
    return dz, dw_in, db_in, dw_out, db_out


# --------------------------------------------------------------------------------------------
# torch.library registration: the forward and the backward are custom ops (opaque to
# torch.compile: no graph break), the backward registered as the forward's autograd formula.
# A TilePlan travels as ints: its layer shapes flattened ([] for a plain tile stack).
# --------------------------------------------------------------------------------------------

def _plan_of(z: torch.Tensor, w_in: torch.Tensor, w_out: torch.Tensor, kernel_size: int, layers: List[int]) -> TilePlan:
    kk = kernel_size * kernel_size
    shapes = tuple(zip(layers[0::2], layers[1::2])) if layers else None
    return TilePlan(w_out.shape[0] // kk, w_in.shape[0], kernel_size, shapes, z.shape[0])


@torch.library.custom_op("hyperkern::static_gen_triton", mutates_args=())
def static_gen_triton_op(z: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor], w_out: torch.Tensor,
                         b_out: Optional[torch.Tensor], kernel_size: int, layers: List[int]) -> torch.Tensor:
    """The flat buffer of every generated weight (layout: :class:`TilePlan`), one launch."""
    with launches.device_guard(z):  # the inputs' device and its current stream (a no-op for CPU tensors)
        return forward_flat(z, w_in, b_in, w_out, b_out, _plan_of(z, w_in, w_out, kernel_size, layers))


@static_gen_triton_op.register_fake
def _(z, w_in, b_in, w_out, b_out, kernel_size, layers):
    return z.new_empty(_plan_of(z, w_in, w_out, kernel_size, layers).numel)


@torch.library.custom_op("hyperkern::static_gen_triton_backward", mutates_args=())
def static_gen_triton_backward_op(dout: torch.Tensor, z: torch.Tensor, w_in: torch.Tensor, b_in: Optional[torch.Tensor],
                                  w_out: torch.Tensor, b_out: Optional[torch.Tensor], kernel_size: int,
                                  layers: List[int]) -> List[torch.Tensor]:
    """[dz, dw_in, dw_out] + [db_in if b_in] + [db_out if b_out]."""
    with launches.device_guard(z):
        dz, dw_in, db_in, dw_out, db_out = backward_flat(dout, z, w_in, b_in, w_out, b_out,
                                                         _plan_of(z, w_in, w_out, kernel_size, layers))
    return [dz, dw_in, dw_out] + [g for g in (db_in, db_out) if g is not None]


@static_gen_triton_backward_op.register_fake
def _(dout, z, w_in, b_in, w_out, b_out, kernel_size, layers):
    return [torch.empty_like(t) for t in (z, w_in, w_out, b_in, b_out) if t is not None]


def _setup_context(ctx, inputs, output):
    z, w_in, b_in, w_out, b_out, kernel_size, layers = inputs
    ctx.kernel_size, ctx.layers = kernel_size, layers
    ctx.has_b = (b_in is not None, b_out is not None)
    ctx.save_for_backward(z, w_in, b_in, w_out, b_out)


def _backward(ctx, dout):
    z, w_in, b_in, w_out, b_out = ctx.saved_tensors
    g = torch.ops.hyperkern.static_gen_triton_backward(dout, z, w_in, b_in, w_out, b_out, ctx.kernel_size, ctx.layers)
    dz, dw_in, dw_out, rest = g[0], g[1], g[2], list(g[3:])
    db_in = rest.pop(0) if ctx.has_b[0] else None
    db_out = rest.pop(0) if ctx.has_b[1] else None
    return dz, dw_in, db_in, dw_out, db_out, None, None


static_gen_triton_op.register_autograd(_backward, setup_context=_setup_context)


def static_gen(z, w_in, b_in, w_out, b_out, plan: TilePlan) -> List[torch.Tensor]:
    """Backend entry point: the layers' weights, views of one flat buffer written by one launch
    (the custom op ``hyperkern::static_gen_triton``, its backward the fused deterministic kernels)."""
    check_supported(z, w_in.shape[1])
    z, w_in, w_out = z.contiguous(), w_in.contiguous(), w_out.contiguous()
    b_in = b_in.contiguous() if b_in is not None else None
    b_out = b_out.contiguous() if b_out is not None else None
    layers = [n for shape in plan.layer_shapes for n in shape] if plan.layer_shapes is not None else []
    flat = torch.ops.hyperkern.static_gen_triton(z, w_in, b_in, w_out, b_out, plan.kernel_size, layers)
    return plan.layer_views(flat)
