"""Triton kernels for static kernel generation (SPEC §2). Launchers: hyperkern.ops.static_gen.fused_triton;
launch configurations (block sizes, warps, stages): hyperkern.ops.static_gen.configs.

Notation: E tiles, Nz embedding size, d hidden size, N_in input block, n_cols = N_out*k*k columns
of S, KK = k*k. All tensors contiguous:

    z [E, Nz]   w_in [N_in, d, Nz]   b_in [N_in, d]   w_out [n_cols, d]   b_out [n_cols]

Tile e's element (o, i, p) lives at ``out[dst_base[e] + o * dst_row[e] + i * KK + p]``
(see hyperkern.ops.static_gen.common), which is how one launch writes every tile of every layer
straight into its place in the layer's [C_out, C_in, k, k] weight.

Kernels
- ``static_gen_fwd_kernel``    grid (cdiv(E, BLOCK_E), N_in). Program (g, i) owns rows (e, i) for the
  BLOCK_E tiles of group g: ``A_i = z_g @ w_in[i]^T + b_in[i]`` (ACC accumulate, Nz in chunks of
  BLOCK_Z), then for each BLOCK_N slice of columns ``S = A_i @ w_out^T + b_out``, stored in place.
- ``static_gen_bwd_rows_kernel`` same grid: recomputes ``A_i`` (stored to scratch ``a_buf``) and
  ``dA_i = dS_i @ w_out`` (stored to ``da_buf``), where dS is gathered from the flat gradient with
  the same addressing as the forward store.
- ``static_gen_bwd_weights_kernel`` one 1-D launch, three kinds of program, every reduction in a
  fixed order (no atomics, bitwise repeatable):
    [0, n_w)             (column block jb, split s): partial dw_out / db_out over the split's row
                         blocks -> ``pw[s]``, ``pb[s]`` (summed over s on the host side, fixed order)
    [n_w, n_w + n_wi)    (i, Nz block): dw_in[i] = sum_e dA[e, i]^T z[e], db_in[i] = sum_e dA[e, i]
    [n_w + n_wi, ...)    (tile group g, Nz block): dz[e] = sum_i dA[e, i] @ w_in[i]

Portability (Triton 3.6-3.9, see TRITON_NOTES): no block pointers, no Python lists, every tl.dot
has M, N, K >= 16 and names its ``out_dtype`` (Triton 3.7 rejects an fp64 accumulator without
it), low-precision operands are upcast before any elementwise arithmetic, and every sum
accumulates in the ACC dtype (fp32; fp64 for fp64 inputs).
"""
import triton
import triton.language as tl


@triton.jit
def _embed_rows(z_ptr, w_in_ptr, b_in_ptr, e_offs, e_mask, i, n_z, d, offs_d, d_mask,
                HAS_B_IN: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_D: tl.constexpr,
                DOT_PREC: tl.constexpr, ACC: tl.constexpr):
    """A[e, i, :] = w_in[i] @ z[e] + b_in[i] for the tiles e_offs: [BLOCK_E, BLOCK_D] in the ACC dtype."""
    acc = tl.zeros((BLOCK_E, BLOCK_D), dtype=ACC)
    w_rows = w_in_ptr + (i * d + offs_d) * n_z  # [BLOCK_D] row starts of w_in[i]
    for z0 in range(0, n_z, BLOCK_Z):
        offs_z = z0 + tl.arange(0, BLOCK_Z)
        z_mask = offs_z < n_z
        zb = tl.load(z_ptr + e_offs[:, None] * n_z + offs_z[None, :],
                     mask=e_mask[:, None] & z_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_Z]
        wt = tl.load(w_rows[None, :] + offs_z[:, None],
                     mask=z_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_Z, BLOCK_D] = w_in[i]^T
        acc = tl.dot(zb, wt, acc, input_precision=DOT_PREC, out_dtype=ACC)
    if HAS_B_IN:
        acc += tl.load(b_in_ptr + i * d + offs_d, mask=d_mask, other=0.0).to(ACC)[None, :]
    return acc


@triton.jit
def static_gen_fwd_kernel(
    z_ptr, w_in_ptr, b_in_ptr, w_out_ptr, b_out_ptr, out_ptr, dst_base_ptr, dst_row_ptr,
    n_tiles, n_z, d, n_in, n_cols, KK,
    HAS_B_IN: tl.constexpr, HAS_B_OUT: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_Z: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid_g = tl.program_id(0)
    i = tl.program_id(1)
    e_offs = pid_g * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_offs < n_tiles
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < d

    a = _embed_rows(z_ptr, w_in_ptr, b_in_ptr, e_offs, e_mask, i, n_z, d, offs_d, d_mask,
                    HAS_B_IN, BLOCK_E, BLOCK_Z, BLOCK_D, DOT_PREC, ACC)
    a = a.to(w_out_ptr.dtype.element_ty)  # second GEMM in the input dtype (ACC accumulate)

    base = tl.load(dst_base_ptr + e_offs, mask=e_mask, other=0) + i * KK  # int64 [BLOCK_E]
    row = tl.load(dst_row_ptr + e_offs, mask=e_mask, other=0)  # int64 [BLOCK_E]
    for n0 in range(0, n_cols, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_cols
        wt = tl.load(w_out_ptr + offs_n[None, :] * d + offs_d[:, None],
                     mask=d_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_D, BLOCK_N] = w_out^T
        s = tl.dot(a, wt, out_dtype=ACC, input_precision=DOT_PREC)  # [BLOCK_E, BLOCK_N]
        if HAS_B_OUT:
            s += tl.load(b_out_ptr + offs_n, mask=n_mask, other=0.0).to(ACC)[None, :]
        o = offs_n // KK
        p = offs_n - o * KK
        dst = base[:, None] + o[None, :] * row[:, None] + p[None, :]
        tl.store(out_ptr + dst, s.to(out_ptr.dtype.element_ty), mask=e_mask[:, None] & n_mask[None, :])


@triton.jit
def static_gen_bwd_rows_kernel(
    z_ptr, w_in_ptr, b_in_ptr, w_out_ptr, dout_ptr, dst_base_ptr, dst_row_ptr, a_buf_ptr, da_buf_ptr,
    n_tiles, n_z, d, n_in, n_cols, KK,
    HAS_B_IN: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_Z: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid_g = tl.program_id(0)
    i = tl.program_id(1)
    e_offs = pid_g * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_offs < n_tiles
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    rd_mask = e_mask[:, None] & d_mask[None, :]
    buf_offs = (e_offs.to(tl.int64)[:, None] * n_in + i) * d + offs_d[None, :]  # [E, N_in, d] scratch

    a = _embed_rows(z_ptr, w_in_ptr, b_in_ptr, e_offs, e_mask, i, n_z, d, offs_d, d_mask,
                    HAS_B_IN, BLOCK_E, BLOCK_Z, BLOCK_D, DOT_PREC, ACC)
    tl.store(a_buf_ptr + buf_offs, a.to(a_buf_ptr.dtype.element_ty), mask=rd_mask)

    base = tl.load(dst_base_ptr + e_offs, mask=e_mask, other=0) + i * KK
    row = tl.load(dst_row_ptr + e_offs, mask=e_mask, other=0)
    da = tl.zeros((BLOCK_E, BLOCK_D), dtype=ACC)
    for n0 in range(0, n_cols, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        n_mask = offs_n < n_cols
        o = offs_n // KK
        p = offs_n - o * KK
        ds = tl.load(dout_ptr + base[:, None] + o[None, :] * row[:, None] + p[None, :],
                     mask=e_mask[:, None] & n_mask[None, :], other=0.0)  # dS [BLOCK_E, BLOCK_N]
        w = tl.load(w_out_ptr + offs_n[:, None] * d + offs_d[None, :],
                    mask=n_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_D]
        da = tl.dot(ds.to(w.dtype), w, da, input_precision=DOT_PREC, out_dtype=ACC)
    tl.store(da_buf_ptr + buf_offs, da.to(da_buf_ptr.dtype.element_ty), mask=rd_mask)


@triton.jit
def _w_out_partial(pid, dout_ptr, dst_base_ptr, dst_row_ptr, a_buf_ptr, pw_ptr, pb_ptr,
                   n_tiles, d, n_in, n_cols, KK, n_col_blocks, rows_per_split, n_row_blocks,
                   BLOCK_E: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                   ACC: tl.constexpr):
    """Partial dw_out[cols] = sum dS[r, cols]^T A[r] and db_out[cols] = sum dS[r, cols] over one split of rows."""
    jb = pid % n_col_blocks
    s = pid // n_col_blocks
    offs_n = jb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < n_cols
    o = offs_n // KK
    p = offs_n - o * KK
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    acc_w = tl.zeros((BLOCK_N, BLOCK_D), dtype=ACC)
    acc_b = tl.zeros((BLOCK_N,), dtype=ACC)
    b_end = tl.minimum((s + 1) * rows_per_split, n_row_blocks)
    for b in range(s * rows_per_split, b_end):  # row block b = (tile group g, input slice i)
        g = b // n_in
        i = b - g * n_in
        e_offs = g * BLOCK_E + tl.arange(0, BLOCK_E)
        e_mask = e_offs < n_tiles
        base = tl.load(dst_base_ptr + e_offs, mask=e_mask, other=0) + i * KK
        row = tl.load(dst_row_ptr + e_offs, mask=e_mask, other=0)
        ds = tl.load(dout_ptr + base[:, None] + o[None, :] * row[:, None] + p[None, :],
                     mask=e_mask[:, None] & n_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_N]
        a = tl.load(a_buf_ptr + (e_offs.to(tl.int64)[:, None] * n_in + i) * d + offs_d[None, :],
                    mask=e_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_D]
        acc_w = tl.dot(tl.trans(ds.to(a.dtype)), a, acc_w, input_precision=DOT_PREC, out_dtype=ACC)
        acc_b += tl.sum(ds.to(ACC), axis=0)
    part = s.to(tl.int64) * n_cols
    tl.store(pw_ptr + (part + offs_n[:, None]) * d + offs_d[None, :], acc_w,
             mask=n_mask[:, None] & d_mask[None, :])
    tl.store(pb_ptr + part + offs_n, acc_b, mask=n_mask)


@triton.jit
def _w_in_grad(r, z_ptr, da_buf_ptr, dw_in_ptr, db_in_ptr, n_tiles, n_z, d, n_in, n_z_blocks,
               HAS_B_IN: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_D: tl.constexpr,
               DOT_PREC: tl.constexpr, ACC: tl.constexpr):
    """dw_in[i, :, zb] = sum_e dA[e, i]^T z[e, zb];  db_in[i] = sum_e dA[e, i] (by the zb == 0 program)."""
    i = r // n_z_blocks
    zb = r - i * n_z_blocks
    offs_z = zb * BLOCK_Z + tl.arange(0, BLOCK_Z)
    z_mask = offs_z < n_z
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    acc = tl.zeros((BLOCK_D, BLOCK_Z), dtype=ACC)
    acc_b = tl.zeros((BLOCK_D,), dtype=ACC)
    for e0 in range(0, n_tiles, BLOCK_E):
        e_offs = e0 + tl.arange(0, BLOCK_E)
        e_mask = e_offs < n_tiles
        da = tl.load(da_buf_ptr + (e_offs.to(tl.int64)[:, None] * n_in + i) * d + offs_d[None, :],
                     mask=e_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_D]
        zt = tl.load(z_ptr + e_offs[:, None] * n_z + offs_z[None, :],
                     mask=e_mask[:, None] & z_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_Z]
        acc = tl.dot(tl.trans(da), zt.to(da.dtype), acc, input_precision=DOT_PREC, out_dtype=ACC)
        acc_b += tl.sum(da.to(ACC), axis=0)
    tl.store(dw_in_ptr + (i * d + offs_d[:, None]) * n_z + offs_z[None, :],
             acc.to(dw_in_ptr.dtype.element_ty), mask=d_mask[:, None] & z_mask[None, :])
    if HAS_B_IN:
        if zb == 0:
            tl.store(db_in_ptr + i * d + offs_d, acc_b.to(db_in_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _z_grad(r, w_in_ptr, da_buf_ptr, dz_ptr, n_tiles, n_z, d, n_in, n_z_blocks,
            BLOCK_E: tl.constexpr, BLOCK_Z: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr,
            ACC: tl.constexpr):
    """dz[e, zb] = sum_i dA[e, i] @ w_in[i][:, zb] for one group of BLOCK_E tiles."""
    g = r // n_z_blocks
    zb = r - g * n_z_blocks
    e_offs = g * BLOCK_E + tl.arange(0, BLOCK_E)
    e_mask = e_offs < n_tiles
    offs_z = zb * BLOCK_Z + tl.arange(0, BLOCK_Z)
    z_mask = offs_z < n_z
    offs_d = tl.arange(0, BLOCK_D)
    d_mask = offs_d < d
    acc = tl.zeros((BLOCK_E, BLOCK_Z), dtype=ACC)
    for i in range(0, n_in):
        da = tl.load(da_buf_ptr + (e_offs.to(tl.int64)[:, None] * n_in + i) * d + offs_d[None, :],
                     mask=e_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_E, BLOCK_D]
        w = tl.load(w_in_ptr + (i * d + offs_d[:, None]) * n_z + offs_z[None, :],
                    mask=d_mask[:, None] & z_mask[None, :], other=0.0)  # [BLOCK_D, BLOCK_Z]
        acc = tl.dot(da, w.to(da.dtype), acc, input_precision=DOT_PREC, out_dtype=ACC)
    tl.store(dz_ptr + e_offs[:, None] * n_z + offs_z[None, :], acc.to(dz_ptr.dtype.element_ty),
             mask=e_mask[:, None] & z_mask[None, :])


@triton.jit
def static_gen_bwd_weights_kernel(
    z_ptr, w_in_ptr, dout_ptr, dst_base_ptr, dst_row_ptr, a_buf_ptr, da_buf_ptr,
    pw_ptr, pb_ptr, dw_in_ptr, db_in_ptr, dz_ptr,
    n_tiles, n_z, d, n_in, n_cols, KK, n_col_blocks, n_split, rows_per_split, n_z_blocks,
    HAS_B_IN: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_Z: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, ACC: tl.constexpr,
):
    pid = tl.program_id(0)
    n_w = n_col_blocks * n_split
    n_wi = n_in * n_z_blocks
    n_row_blocks = tl.cdiv(n_tiles, BLOCK_E) * n_in
    if pid < n_w:
        _w_out_partial(pid, dout_ptr, dst_base_ptr, dst_row_ptr, a_buf_ptr, pw_ptr, pb_ptr,
                       n_tiles, d, n_in, n_cols, KK, n_col_blocks, rows_per_split, n_row_blocks,
                       BLOCK_E, BLOCK_D, BLOCK_N, DOT_PREC, ACC)
    elif pid < n_w + n_wi:
        _w_in_grad(pid - n_w, z_ptr, da_buf_ptr, dw_in_ptr, db_in_ptr, n_tiles, n_z, d, n_in, n_z_blocks,
                   HAS_B_IN, BLOCK_E, BLOCK_Z, BLOCK_D, DOT_PREC, ACC)
    else:
        _z_grad(pid - n_w - n_wi, w_in_ptr, da_buf_ptr, dz_ptr, n_tiles, n_z, d, n_in, n_z_blocks,
                BLOCK_E, BLOCK_Z, BLOCK_D, DOT_PREC, ACC)


# --- argument types, for the ahead-of-time compile check (hyperkern.compile_check) ------------------

# every pointer has the inputs' dtype but the tile destinations (int64) and the dw_out / db_out
# partials (the accumulator's dtype: fp32, fp64 for fp64 inputs); integers are i32
ARG_TYPES = dict(
    pointers={"dst_base_ptr": "i64", "dst_row_ptr": "i64", "pw_ptr": "acc", "pb_ptr": "acc"},
    default_pointer="param",
    scalars={},
)
