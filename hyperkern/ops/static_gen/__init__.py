"""Static hypernetwork kernel generation (SPEC §2): one dispatch point over the backends.

- ``naive``        — the float64-capable reference, backend name ``"reference"``;
- ``fused_torch``  — two GEMMs and one permuting copy per run of same-shape layers (``"torch"``);
- ``fused_triton`` — one fused Triton launch for every tile of every layer, with its own fused,
                     deterministic backward (``"triton"``).

:data:`REGISTRY` says what each supports: ``"auto"`` picks ``"triton"`` for CUDA tensors the kernels
take (hidden size d <= 128, any float dtype) when Triton imports, else ``"torch"``.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

from ..registry import FLOATS, Backend, Registry, triton_requires
from . import fused_torch, fused_triton, naive
from .common import TilePlan, StaticGenShapes, check_inputs, count_tiles, make_plan  # noqa: F401

REGISTRY = Registry("static kernel generation", (
    Backend("reference", "float64-capable reference (SPEC §2 as einsums)", naive.static_gen,
            {"cpu": FLOATS, "cuda": FLOATS}),
    Backend("torch", "two GEMMs and one permuting copy per run of same-shape layers; any device",
            fused_torch.static_gen, {"cpu": FLOATS, "cuda": FLOATS}),
    Backend("triton", "one fused Triton launch for every tile of every layer, fused deterministic backward",
            fused_triton.static_gen, {"cuda": fused_triton.SUPPORTED_DTYPES, "cpu": fused_triton.INTERPRETER_DTYPES},
            auto_devices=("cuda",), requires=triton_requires, limits=fused_triton.hidden_limit),
), auto_order=("triton", "torch"))
BACKENDS = REGISTRY.names


def backend_status(name: str, device=None, dtype=None, training=None, **facts) -> Tuple[bool, str]:
    """(usable here, why or what) for a backend name, optionally for a given call (``hidden=d``)."""
    return REGISTRY.status(name, device, dtype, training, **facts)


def resolve_backend(name: str, device, dtype: Optional[torch.dtype] = None, hidden: Optional[int] = None) -> str:
    """``"auto"`` -> ``"triton"`` for CUDA tensors the kernels take (d <= 128), else ``"torch"``;
    explicit names validated (ValueError saying why)."""
    return REGISTRY.resolve(name, device, dtype, torch.is_grad_enabled(), hidden=hidden)


def _run(z, w_in, b_in, w_out, b_out, kernel_size, layer_shapes, backend) -> List[Tensor]:
    shapes = check_inputs(z, w_in, b_in, w_out, b_out, kernel_size)
    plan = make_plan(shapes, layer_shapes)
    name = resolve_backend(backend, z.device, z.dtype, shapes.hidden)
    return REGISTRY.get(name)(z, w_in, b_in, w_out, b_out, plan)


def static_kernel_gen_layers(z: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor,
                             b_out: Optional[Tensor], *, kernel_size: int,
                             layer_shapes: Sequence[Tuple[int, int]], backend: str = "auto") -> List[Tensor]:
    """Every layer's ``[C_out, C_in, k, k]`` weight from the tiles' embeddings (SPEC §2).

    ``layer_shapes = [(C_out, C_in), ...]``, each a multiple of the basic block ``(N_out, N_in)``
    read off ``w_out`` and ``w_in``; ``z`` holds one embedding per tile, layer after layer,
    output-block-major within a layer. With the Triton backend one launch writes every tile in
    place and the returned weights are views of one buffer.
    """
    if layer_shapes is None:
        raise ValueError("layer_shapes must list the layers' (C_out, C_in); use static_kernel_gen for a plain tile stack")
    return _run(z, w_in, b_in, w_out, b_out, kernel_size, layer_shapes, backend)


def static_kernel_gen(z: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
                      *, kernel_size: int, backend: str = "auto") -> Tensor:
    """``K [E, N_out, N_in, k, k]``: one generated ``N_out x N_in x k x k`` kernel per embedding (SPEC §2).

    ``z [E, Nz]``, ``w_in [N_in, d, Nz]``, ``b_in [N_in, d]`` or None, ``w_out [N_out*k*k, d]``,
    ``b_out [N_out*k*k]`` or None; float16/bfloat16/float32 (float64 on the reference and torch
    backends). Differentiable with respect to all five tensors.
    """
    return _run(z, w_in, b_in, w_out, b_out, kernel_size, None, backend)[0]


def available_backends() -> Dict[str, Tuple[bool, str]]:
    return REGISTRY.available()


# --- benchmark rows and the performance model (for `python -m hyperkern bench`) -----------------

H100_HBM_BYTES_PER_S = 3.35e12  # H100 SXM, HBM3
H100_PEAK_FLOPS = {  # dense, per dot precision the kernels use
    "bf16": 990e12, "fp16": 990e12,  # tensor cores
    "tf32": 495e12,  # tensor cores, fp32 with torch.backends.cuda.matmul.allow_tf32
    "fp32": 67e12,  # "ieee" fp32 dots run on the CUDA cores (the default for fp32, like torch)
    "fp64": 67e12,  # fp64 tensor cores
}
LAUNCH_SECONDS = 3e-6  # one kernel launch from the host (about 1 us inside a CUDA graph)
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4, "tf32": 4, "fp64": 8}


def wrn_layer_shapes(depth: int = 40, widen_factor: int = 1) -> List[Tuple[int, int]]:
    """The 3x3 convs of a WRN-depth-k that a 16x16 basic block can generate (all but the stem)."""
    from hyperkern.static import wrn_hyper_layer_shapes

    return wrn_hyper_layer_shapes(depth, widen_factor)


def performance_model(layer_shapes: Sequence[Tuple[int, int]], z_dim: int = 64, hidden: int = 64,
                      block: Tuple[int, int] = (16, 16), kernel_size: int = 3, precision: str = "fp32",
                      bias: bool = True, layer_list: bool = True) -> Dict[str, float]:
    """FLOPs, bytes and predicted H100 time of one full generation, forward and backward.

    ``precision``: "fp32" (ieee dots, the default for fp32 inputs), "tf32", "fp16", "bf16", "fp64".
    Forward: FLOPs = 2 per multiply-add of the embedding GEMM (``E x Nz -> N_in*d``) and the output
    GEMM (``E*N_in x d -> N_out*k*k``); minimum bytes = every generated weight written once + every
    input read once, which is also what the kernel moves (the weights are read from L2 by each
    program). Backward (this implementation): the flat gradient is read twice (dA, then dw_out),
    A and dA go through ``[E, N_in, d]`` scratch (written and read once each), and the gradients
    are written once; minimum = gradient read once + inputs read + gradients written. Launches:
    the two backward kernels and the two fixed-order sums of the dw_out/db_out split partials (and
    their casts for 16-bit inputs), plus,
    for a layer list, autograd's one concatenation of the layers' gradients (``layer_list``: the
    gradient written and read once more).
    Predicted time = max(bytes / HBM bandwidth, FLOPs / peak) + launches x ~3 us: at these sizes
    every roofline term is a few microseconds, so the launch latency dominates.
    """
    n_out, n_in = block
    kk = kernel_size * kernel_size
    n_cols = n_out * kk
    E = count_tiles(layer_shapes, block)
    W = E * n_out * n_in * kk  # generated weights
    rows = E * n_in
    gemm_in, gemm_out = 2 * rows * hidden * z_dim, 2 * rows * hidden * n_cols
    inputs = E * z_dim + n_in * hidden * z_dim + n_cols * hidden + ((n_in * hidden + n_cols) if bias else 0)
    b = _BYTES[precision]
    peak = H100_PEAK_FLOPS[precision]
    fwd_flops, fwd_bytes = gemm_in + gemm_out, (W + inputs) * b
    bwd_flops = 3 * gemm_in + 2 * gemm_out  # A recomputed, dz, dw_in; dA, dw_out
    bwd_min_bytes = (W + 2 * inputs) * b
    bwd_bytes = (2 * W + 4 * rows * hidden + 2 * inputs + (2 * W if layer_list else 0)) * b
    bwd_launches = 4 + (2 if b == 2 else 0) + (1 if layer_list else 0)  # 16-bit: the summed partials are cast
    t = lambda flops, nbytes, launches: max(nbytes / H100_HBM_BYTES_PER_S, flops / peak) + launches * LAUNCH_SECONDS  # noqa: E731
    return {
        "tiles": E, "generated_weights": W, "precision": precision,
        "fwd_flops": fwd_flops, "fwd_min_bytes": fwd_bytes, "fwd_launches": 1,
        "fwd_t_mem_us": fwd_bytes / H100_HBM_BYTES_PER_S * 1e6, "fwd_t_flop_us": fwd_flops / peak * 1e6,
        "fwd_predicted_us": t(fwd_flops, fwd_bytes, 1) * 1e6,
        "bwd_flops": bwd_flops, "bwd_min_bytes": bwd_min_bytes, "bwd_bytes": bwd_bytes, "bwd_launches": bwd_launches,
        "bwd_t_mem_us": bwd_bytes / H100_HBM_BYTES_PER_S * 1e6, "bwd_t_flop_us": bwd_flops / peak * 1e6,
        "bwd_predicted_us": t(bwd_flops, bwd_bytes, bwd_launches) * 1e6,
    }


def bench_rows(layer_shapes: Optional[Sequence[Tuple[int, int]]] = None, z_dim: int = 64, hidden: int = 64,
               backends: Sequence[str] = ("reference", "torch", "triton"), device: Optional[str] = None,
               dtype: torch.dtype = torch.float32, repeats: int = 5, backward: bool = False) -> List[Dict]:
    """One row per usable backend: ms per full generation (median of ``repeats``) of a layer list
    (default: WRN-40-1's), plus a ``model`` row from :func:`performance_model`.

    The Triton backend is timed only on CUDA (under the interpreter its time means nothing).
    """
    layer_shapes = list(layer_shapes) if layer_shapes is not None else wrn_layer_shapes(40, 1)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    E = count_tiles(layer_shapes, (16, 16))
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * 0.1).to(device, dtype).requires_grad_(backward)  # noqa: E731
    args = (mk(E, z_dim), mk(16, hidden, z_dim), mk(16, hidden), mk(16 * 9, hidden), mk(16 * 9))
    from hyperkern.bench import time_interleaved

    def make_run(name):
        def run():
            ws = static_kernel_gen_layers(*args, kernel_size=3, layer_shapes=layer_shapes, backend=name)
            if backward:
                torch.autograd.backward(ws, [torch.ones_like(w) for w in ws])
        return run

    # the Triton backend is timed only on CUDA (under the interpreter its time means nothing)
    usable = [n for n in backends if backend_status(n, device, dtype, backward, hidden=hidden)[0]
              and (n != "triton" or device.type == "cuda")]
    times = time_interleaved({n: make_run(n) for n in usable}, repeats, device)
    rows = [{"backend": name, "device": str(device), "dtype": str(dtype).replace("torch.", ""),
             "tiles": E, "pass": "fwd+bwd" if backward else "fwd", "ms": 1e3 * sec}
            for name, sec in times.items()]
    from ..precision import dot_precision

    dot = dot_precision(dtype)
    model = performance_model(layer_shapes, z_dim, hidden, precision="fp32" if dot == "ieee" else dot)
    key = "bwd_predicted_us" if backward else "fwd_predicted_us"
    rows.append({"backend": "model: H100 (triton)", "device": "H100 SXM", "dtype": str(dtype).replace("torch.", ""),
                 "tiles": E, "pass": "fwd+bwd" if backward else "fwd",
                 "ms": (model["fwd_predicted_us"] + (model[key] if backward else 0)) / 1e3, **model})
    return rows


def format_bench_rows(rows: Sequence[Dict]) -> str:
    """The static-generation table ``python -m hyperkern bench`` can print."""
    lines = ["| backend | device | dtype | tiles | pass | ms per generation |", "|---|---|---|---:|---|---:|"]
    for r in rows:
        lines.append(f"| {r['backend']} | {r['device']} | {r['dtype']} | {r['tiles']} | {r['pass']} | {r['ms']:.4f} |")
    m = next((r for r in rows if "fwd_flops" in r), None)
    if m is not None:
        lines.append(
            f"\nmodel ({m['precision']}): forward {m['fwd_flops'] / 1e6:.1f} MFLOP, {m['fwd_min_bytes'] / 1e6:.2f} MB "
            f"minimum HBM traffic (weights written once + inputs read once), 1 launch -> "
            f"{m['fwd_t_mem_us']:.2f} us memory, {m['fwd_t_flop_us']:.2f} us compute, ~{m['fwd_predicted_us']:.1f} us "
            f"with launch; backward {m['bwd_flops'] / 1e6:.1f} MFLOP, {m['bwd_bytes'] / 1e6:.2f} MB "
            f"(minimum {m['bwd_min_bytes'] / 1e6:.2f} MB), {m['bwd_launches']} launches -> ~{m['bwd_predicted_us']:.1f} us. "
            f"Assumptions: H100 SXM {H100_HBM_BYTES_PER_S / 1e12:.2f} TB/s HBM, dense peaks bf16/fp16 990, tf32 495, "
            f"fp32 (CUDA cores) 67 TFLOP/s, {LAUNCH_SECONDS * 1e6:.0f} us per launch.")
    return "\n".join(lines)


__all__ = ["static_kernel_gen", "static_kernel_gen_layers", "available_backends", "backend_status",
           "resolve_backend", "performance_model", "bench_rows", "format_bench_rows", "BACKENDS"]
