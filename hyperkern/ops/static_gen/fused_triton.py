"""Fused Triton static kernel generation: launchers and the autograd.Function.

Forward: ONE launch of ``static_gen_fwd_kernel`` writes every tile of every layer straight into
one flat buffer that holds all the layers' ``[C_out, C_in, k, k]`` weights back to back; the layers
are views of it (no concatenation, no permutation copy).

Backward (deterministic: every reduction in a fixed order, no atomics):
1. ``static_gen_bwd_rows_kernel`` recomputes A and computes dA = dS @ w_out (gathering dS from the
   flat gradient with the forward's addressing), both to ``[E, N_in, d]`` scratch in the input dtype;
2. ``static_gen_bwd_weights_kernel`` computes dz, dw_in, db_in and split partials of dw_out, db_out;
3. the partials are summed over the split axis (``torch.sum``, fixed order) and cast.

Triton (and the kernel module) is imported on first use, never by ``import hyperkern``.
"""
from __future__ import annotations

import functools
import os
from typing import List

import torch

from .common import TilePlan, cached_destinations

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
TARGET_PROGRAMS = 128  # programs the dw_out split aims for (the grid's other axes are small)


@functools.lru_cache(maxsize=None)
def _kernels():
    from hyperkern.kernels import static_gen

    return static_gen


def interpreter_active() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def check_supported(z: torch.Tensor, d: int) -> None:
    """Raise if the Triton path cannot run these inputs (dtype, device, hidden size)."""
    if z.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"the triton backend supports float16, bfloat16, float32 and float64 inputs, got {z.dtype}")
    if z.device.type != "cuda" and not interpreter_active():
        raise ValueError(f"the triton backend needs CUDA tensors (or TRITON_INTERPRET=1), got device {z.device}")
    max_d = _kernels().MAX_BLOCK_D
    if d > max_d:
        raise ValueError(f"the triton backend holds the hidden vector in registers: d = w_in.shape[1] must be "
                         f"<= {max_d}, got {d} (use backend='torch')")


def _empty(shape, dtype, device) -> torch.Tensor:
    """Every buffer the kernels write is allocated here (the tests poison it with NaN guard zones)."""
    return torch.empty(shape, dtype=dtype, device=device)


def _launch(kernel, grid, *args, **kwargs):
    """Every launch of this module goes through here (the tests count launches by patching it)."""
    kernel[grid](*args, **kwargs)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


_DTYPE_NAME = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "fp64"}


def _meta(d: int, dtype: torch.dtype) -> dict:
    """Block sizes, dot precision, accumulator dtype and num_warps (kernels.static_gen.launch_meta)."""
    return _kernels().launch_meta(d, _DTYPE_NAME[dtype], allow_tf32=torch.backends.cuda.matmul.allow_tf32)


def forward_flat(z, w_in, b_in, w_out, b_out, plan: TilePlan) -> torch.Tensor:
    """One launch: the flat buffer holding every generated weight (layout per ``plan``)."""
    k = _kernels()
    E, n_z = z.shape
    n_in, d, _ = w_in.shape
    n_cols = w_out.shape[0]
    out = _empty((plan.numel,), z.dtype, z.device)
    dst_base, dst_row = cached_destinations(plan, z.device)
    meta = _meta(d, z.dtype)
    grid = (_cdiv(E, meta["BLOCK_E"]), n_in)
    _launch(k.static_gen_fwd_kernel, grid,
            z, w_in, b_in if b_in is not None else w_in, w_out, b_out if b_out is not None else w_out,
            out, dst_base, dst_row, E, n_z, d, n_in, n_cols, plan.kk,
            HAS_B_IN=b_in is not None, HAS_B_OUT=b_out is not None, **meta)
    return out


def backward_flat(dout, z, w_in, b_in, w_out, b_out, plan: TilePlan):
    """Gradients of (z, w_in, b_in, w_out, b_out) given the flat output gradient."""
    k = _kernels()
    E, n_z = z.shape
    n_in, d, _ = w_in.shape
    n_cols = w_out.shape[0]
    dev, dt = z.device, z.dtype
    dout = dout.to(dt).contiguous()
    dst_base, dst_row = cached_destinations(plan, dev)
    meta = _meta(d, dt)
    be, bn, bz = meta["BLOCK_E"], meta["BLOCK_N"], meta["BLOCK_Z"]
    n_groups = _cdiv(E, be)
    has_b_in = b_in is not None

    a_buf = _empty((E, n_in, d), dt, dev)
    da_buf = _empty((E, n_in, d), dt, dev)
    _launch(k.static_gen_bwd_rows_kernel, (n_groups, n_in),
            z, w_in, b_in if has_b_in else w_in, w_out, dout, dst_base, dst_row, a_buf, da_buf,
            E, n_z, d, n_in, n_cols, plan.kk, HAS_B_IN=has_b_in, **meta)

    n_col_blocks = _cdiv(n_cols, bn)
    n_row_blocks = n_groups * n_in
    n_split = max(1, min(n_row_blocks, TARGET_PROGRAMS // n_col_blocks))
    rows_per_split = _cdiv(n_row_blocks, n_split)
    n_split = _cdiv(n_row_blocks, rows_per_split)  # no empty splits
    n_z_blocks = _cdiv(n_z, bz)
    acc = torch.float64 if dt == torch.float64 else torch.float32  # the kernels' ACC dtype
    pw = _empty((n_split, n_cols, d), acc, dev)
    pb = _empty((n_split, n_cols), acc, dev)
    dz = _empty(z.shape, dt, dev)
    dw_in = _empty(w_in.shape, dt, dev)
    db_in = _empty(b_in.shape, dt, dev) if has_b_in else None
    grid = (n_col_blocks * n_split + n_in * n_z_blocks + n_groups * n_z_blocks,)
    _launch(k.static_gen_bwd_weights_kernel, grid,
            z, w_in, dout, dst_base, dst_row, a_buf, da_buf, pw, pb, dw_in, db_in if has_b_in else dw_in, dz,
            E, n_z, d, n_in, n_cols, plan.kk, n_col_blocks, n_split, rows_per_split, n_z_blocks,
            HAS_B_IN=has_b_in, **meta)
    dw_out = pw.sum(0).to(dt)
    db_out = pb.sum(0).to(dt) if b_out is not None else None
    return dz, dw_in, db_in, dw_out, db_out


class StaticGenFunction(torch.autograd.Function):
    """``(z, w_in, b_in, w_out, b_out) -> flat`` with the fused kernels in both directions."""

    @staticmethod
    def forward(ctx, z, w_in, b_in, w_out, b_out, plan):
        ctx.plan = plan
        ctx.save_for_backward(z, w_in, b_in, w_out, b_out)
        return forward_flat(z, w_in, b_in, w_out, b_out, plan)

    @staticmethod
    def backward(ctx, dout):
        z, w_in, b_in, w_out, b_out = ctx.saved_tensors
        with torch.cuda.device_of(z):
            grads = backward_flat(dout, z, w_in, b_in, w_out, b_out, ctx.plan)
        return (*grads, None)


def static_gen(z, w_in, b_in, w_out, b_out, plan: TilePlan) -> List[torch.Tensor]:
    """Backend entry point: the layers' weights, views of one flat buffer written by one launch."""
    check_supported(z, w_in.shape[1])
    z, w_in, w_out = z.contiguous(), w_in.contiguous(), w_out.contiguous()
    b_in = b_in.contiguous() if b_in is not None else None
    b_out = b_out.contiguous() if b_out is not None else None
    with torch.cuda.device_of(z):  # launch on the inputs' GPU (a no-op for CPU tensors)
        flat = StaticGenFunction.apply(z, w_in, b_in, w_out, b_out, plan)
    return plan.layer_views(flat)
