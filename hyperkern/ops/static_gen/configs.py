"""Launch configurations of the static-generation Triton kernels (``kernels/static_gen.py``), as
data: the launcher and the compile check read them from here.

A launch depends on the hidden size d (held whole in registers: ``BLOCK_D`` = the next power of
two in [16, :data:`MAX_BLOCK_D`]), the inputs' dtype, the dot precision of fp32
(:mod:`hyperkern.ops.precision`) and which biases are given (``HAS_B_IN``, ``HAS_B_OUT``; a
missing bias is passed as None).
"""
from __future__ import annotations

from typing import Dict, List

from hyperkern.ops.launches import Launch
from hyperkern.ops.precision import triton_input_precision

MODULE = "hyperkern.kernels.static_gen"
BLOCK_E = 16  # tiles per program (the M of the row GEMMs)
BLOCK_Z = 32  # chunk of the embedding (K of the first GEMM)
BLOCK_N = 32  # slice of the n_cols = N_out*k*k columns
MAX_BLOCK_D = 128  # the whole hidden vector is held in registers: d <= 128 on this path
NUM_STAGES = 2  # software pipelining of the chunk loops
DTYPES = ("fp32", "fp16", "bf16", "fp64")
DOTS = {"fp32": ("tf32", "ieee"), "fp16": ("fp16",), "bf16": ("bf16",), "fp64": ("fp64",)}
KERNELS = ("static_gen_fwd_kernel", "static_gen_bwd_rows_kernel", "static_gen_bwd_weights_kernel")
# Triton's JIT turns an integer argument equal to 1 into a constexpr: the compile check also builds
# each kernel with these set to 1 (one tile, a 1x1 kernel, N_in = 1, ...).
UNIT_INTS = {k: ("n_tiles", "n_z", "d", "n_in", "KK") for k in KERNELS}


def block_d_for(d: int) -> int:
    """BLOCK_D for hidden size d: a power of two in [16, MAX_BLOCK_D] (ValueError beyond)."""
    if not 1 <= d <= MAX_BLOCK_D:
        raise ValueError(f"hidden size d must be in [1, {MAX_BLOCK_D}] on the Triton path, got {d}")
    return max(16, 1 << (d - 1).bit_length())


def launch(kernel: str, d: int, dtype: str, dot: str, has_b_in: bool, has_b_out: bool = False) -> Launch:
    """The launch of one static-generation kernel (``has_b_out``: the forward kernel only)."""
    import triton.language as tl  # the accumulator dtype is a Triton dtype (imported at launch time only)

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {DTYPES}, got {dtype!r}")
    if dot not in DOTS[dtype] and dot != "exact":
        raise ValueError(f"dot precision {dot!r} does not apply to {dtype} inputs")
    if kernel not in KERNELS:
        raise ValueError(f"unknown kernel {kernel!r}")
    bd = block_d_for(d)
    cx = [("HAS_B_IN", bool(has_b_in))]
    absent = [] if has_b_in else [("db_in_ptr" if kernel == "static_gen_bwd_weights_kernel" else "b_in_ptr")]
    if kernel == "static_gen_fwd_kernel":
        cx.append(("HAS_B_OUT", bool(has_b_out)))
        absent += [] if has_b_out else ["b_out_ptr"]
    cx += [("BLOCK_E", BLOCK_E), ("BLOCK_Z", BLOCK_Z), ("BLOCK_D", bd), ("BLOCK_N", BLOCK_N),
           ("DOT_PREC", triton_input_precision(dot)), ("ACC", tl.float64 if dtype == "fp64" else tl.float32)]
    # 8 warps for the widest hidden vectors, and for fp64 from d = 64 on (4 warps spill 4-8 B on
    # sm_90a with Triton 3.6: fp64 doubles the registers of the A tile)
    warps = 8 if bd > 64 or (dtype == "fp64" and bd >= 64) else 4
    return Launch(kernel, MODULE, dtype, tuple(cx), num_warps=warps, num_stages=NUM_STAGES, absent=tuple(absent))


def all_launches() -> List[Launch]:
    """Every launch :func:`launch` can return (each once)."""
    seen: Dict[Launch, None] = {}
    for dtype in DTYPES:
        for dot in DOTS[dtype]:
            for d in sorted({block_d_for(d) for d in range(1, MAX_BLOCK_D + 1)}):
                for b_in in (True, False):
                    for b_out in (True, False):
                        for kernel in KERNELS:
                            seen.setdefault(launch(kernel, d, dtype, dot, b_in, b_out))
    return list(seen)
