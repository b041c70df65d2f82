"""Reference static kernel generation: SPEC §2 written out tile by tile (the oracle).

Plain loops over tiles and layers, no fusion; works in any dtype including float64 and is
differentiable through ordinary autograd. The tests compare every other backend against this
one run in float64.
"""
from __future__ import annotations

from typing import List, Optional

import torch
from torch import Tensor

from .common import TilePlan


def generate_tiles(z: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
                   kernel_size: int) -> Tensor:
    """``K [E, N_out, N_in, k, k]``, one embedding at a time, exactly as SPEC §2 writes it."""
    k = kernel_size
    n_in = w_in.shape[0]
    tiles = []
    for z_e in z.unbind(0):  # (unbind: one autograd node, not one full-size zero gradient per tile)
        a = torch.einsum("idz,z->id", w_in, z_e)  # A[e, i] = w_in[i] @ z[e] for every i: [N_in, d]
        if b_in is not None:
            a = a + b_in
        s = a @ w_out.t()  # [N_in, N_out*k*k]
        if b_out is not None:
            s = s + b_out
        tiles.append(s.view(n_in, -1, k, k).permute(1, 0, 2, 3))
    return torch.stack(tiles)


def assemble_layers(tiles: Tensor, plan: TilePlan) -> List[Tensor]:
    """Place tile ``offset + ob*n + ib`` at block ``(ob, ib)`` of its layer, one tile at a time."""
    if plan.layer_shapes is None:
        return [tiles]
    k, No, Ni = plan.kernel_size, plan.block_out, plan.block_in
    tiles = tiles.unbind(0)
    layers, e = [], 0
    for c_out, c_in in plan.layer_shapes:
        rows = []
        for ob in range(c_out // No):
            rows.append(torch.cat([tiles[e + ib] for ib in range(c_in // Ni)], dim=1))
            e += c_in // Ni
        w = torch.cat(rows, dim=0)
        assert w.shape == (c_out, c_in, k, k)
        layers.append(w)
    return layers


def static_gen(z, w_in, b_in, w_out, b_out, plan: TilePlan) -> List[Tensor]:
    """Backend entry point: the layers' weights (or ``[tiles]`` for the plain tile stack)."""
    return assemble_layers(generate_tiles(z, w_in, b_in, w_out, b_out, plan.kernel_size), plan)
