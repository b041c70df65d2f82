"""Fast PyTorch static kernel generation (the CPU path, and a readable blueprint of the kernel).

Two GEMMs for every tile of every layer at once, then one permuting copy per run of consecutive
layers of the same shape (a WRN-40-1 layer list has 5 such runs)::

    A = z @ w_in.view(N_in*d, Nz)^T + b_in        [E, N_in*d]          -> [E*N_in, d]
    S = A @ w_out^T + b_out                       [E*N_in, N_out*k*k]
    run of L layers (C_out = m*N_out, C_in = n*N_in):
        S[run].view(L, m, n, N_in, N_out, k, k).permute(0, 1, 4, 2, 3, 5, 6) -> [L, C_out, C_in, k, k]

Autograd differentiates it: the backward is the transposed GEMMs, no hand-written code needed.
Unlike the Triton kernel, this path writes S once and copies it once into the final layout.
"""
from __future__ import annotations

from itertools import groupby
from typing import List

import torch

from .common import TilePlan


def _gemms(z, w_in, b_in, w_out, b_out):
    E, _ = z.shape
    n_in, d, n_z = w_in.shape
    a = z @ w_in.reshape(n_in * d, n_z).t()  # [E, N_in*d]
    if b_in is not None:
        a = a + b_in.reshape(1, n_in * d)
    a = a.view(E * n_in, d)
    if b_out is not None:
        return torch.addmm(b_out, a, w_out.t())  # [E*N_in, N_out*k*k]
    return a @ w_out.t()


def static_gen(z, w_in, b_in, w_out, b_out, plan: TilePlan) -> List[torch.Tensor]:
    k, No, Ni = plan.kernel_size, plan.block_out, plan.block_in
    s = _gemms(z, w_in, b_in, w_out, b_out).view(plan.n_tiles, Ni, No, k, k)
    if plan.layer_shapes is None:
        return [s.permute(0, 2, 1, 3, 4).contiguous()]
    layers: List[torch.Tensor] = []
    e = 0
    for (c_out, c_in), run in groupby(plan.layer_shapes):
        L, m, n = len(list(run)), c_out // No, c_in // Ni
        seg = s[e:e + L * m * n].view(L, m, n, Ni, No, k, k)
        w = seg.permute(0, 1, 4, 2, 3, 5, 6).reshape(L, c_out, c_in, k, k).contiguous()  # one copy
        layers.extend(w.unbind(0))
        e += L * m * n
    return layers
