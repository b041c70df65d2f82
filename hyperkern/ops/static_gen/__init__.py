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


__all__ = ["REGISTRY", "BACKENDS", "static_kernel_gen", "static_kernel_gen_layers", "available_backends",
           "backend_status", "resolve_backend"]
