"""What every static-generation backend shares (SPEC §2 is the contract for the maths).

Shapes (E tiles, embedding size Nz, hidden size d, basic block N_out x N_in x k x k)::

    z      [E, Nz]              one embedding per tile
    w_in   [N_in, d, Nz]        b_in  [N_in, d]       (or None)
    w_out  [N_out*k*k, d]       b_out [N_out*k*k]     (or None)

    A[e, i]  = w_in[i] @ z[e] + b_in[i]                       [E, N_in, d]
    S[e, i]  = w_out @ A[e, i] + b_out                        [E, N_in, N_out*k*k]
    K[e]     = S[e].view(N_in, N_out, k, k).permute(1, 0, 2, 3)   [N_out, N_in, k, k]

A :class:`TilePlan` says where every tile goes. With ``layer_shapes = [(C_out, C_in), ...]`` the
weights of all layers live back to back in one flat buffer; a layer with ``C_out = m*N_out``,
``C_in = n*N_in`` owns ``m*n`` consecutive embeddings, output-block-major: tile ``(ob, ib)`` is
embedding ``offset + ob*n + ib`` and fills ``W[ob*N_out:(ob+1)*N_out, ib*N_in:(ib+1)*N_in]``.
Element ``(o, i, p)`` of tile ``e`` (``p`` runs over the ``k*k`` taps) lives at::

    flat[dst_base[e] + o * dst_row[e] + i * k*k + p]

with ``dst_base[e] = layer_offset + ob*N_out*C_in*k*k + ib*N_in*k*k`` and ``dst_row[e] = C_in*k*k``.
Without layer shapes the plan is the plain tile stack ``[E, N_out, N_in, k, k]``.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor

LayerShapes = Tuple[Tuple[int, int], ...]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


@dataclass(frozen=True)
class StaticGenShapes:
    """Sizes read off (and checked against) the five input tensors."""

    n_tiles: int  # E
    z_dim: int  # Nz
    hidden: int  # d
    block_in: int  # N_in
    block_out: int  # N_out
    kernel_size: int  # k

    @property
    def kk(self) -> int:
        return self.kernel_size * self.kernel_size

    @property
    def n_cols(self) -> int:  # N_out * k * k, the columns of S
        return self.block_out * self.kk


def check_inputs(z: Tensor, w_in: Tensor, b_in: Optional[Tensor], w_out: Tensor, b_out: Optional[Tensor],
                 kernel_size: int) -> StaticGenShapes:
    """Validate the five inputs (shapes, dtypes, devices); raise ValueError/TypeError naming the argument."""
    if not _is_int(kernel_size) or kernel_size < 1:
        raise ValueError(f"kernel_size must be a positive int, got {kernel_size!r}")
    named = {"z": z, "w_in": w_in, "b_in": b_in, "w_out": w_out, "b_out": b_out}
    for name, t in named.items():
        if t is None and name in ("b_in", "b_out"):
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in FLOAT_DTYPES:
            raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {t.dtype}")
    if z.dim() != 2:
        raise ValueError(f"z must be [E, Nz] (one embedding per tile), got shape {tuple(z.shape)}")
    E, Nz = z.shape
    if w_in.dim() != 3 or w_in.shape[2] != Nz:
        raise ValueError(f"w_in must be [N_in, d, Nz] with Nz = z.shape[1] = {Nz}, got shape {tuple(w_in.shape)}")
    N_in, d, _ = w_in.shape
    kk = kernel_size * kernel_size
    if w_out.dim() != 2 or w_out.shape[1] != d or w_out.shape[0] % kk != 0:
        raise ValueError(f"w_out must be [N_out*k*k, d] with k = kernel_size = {kernel_size} and d = w_in.shape[1] "
                         f"= {d}, got shape {tuple(w_out.shape)}")
    N_out = w_out.shape[0] // kk
    if b_in is not None and tuple(b_in.shape) != (N_in, d):
        raise ValueError(f"b_in must be [N_in, d] = {(N_in, d)} or None, got shape {tuple(b_in.shape)}")
    if b_out is not None and tuple(b_out.shape) != (N_out * kk,):
        raise ValueError(f"b_out must be [N_out*k*k] = {(N_out * kk,)} or None, got shape {tuple(b_out.shape)}")
    if min(E, Nz, N_in, d, N_out) < 1:
        raise ValueError(f"every size must be positive: E={E}, Nz={Nz}, N_in={N_in}, d={d}, N_out={N_out}")
    for name, t in named.items():
        if t is None:
            continue
        if t.dtype != z.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but z has {z.dtype}: all inputs must share one dtype")
        if t.device != z.device:
            raise ValueError(f"{name} is on {t.device} but z is on {z.device}: all inputs must share one device")
    return StaticGenShapes(E, Nz, d, N_in, N_out, kernel_size)


def normalize_layer_shapes(layer_shapes, block_out: int, block_in: int) -> LayerShapes:
    """``[(C_out, C_in), ...]`` as a tuple of int pairs, each a multiple of the basic block."""
    try:
        shapes = tuple((operator.index(c_out), operator.index(c_in)) for c_out, c_in in layer_shapes)
    except (TypeError, ValueError):
        raise TypeError(f"layer_shapes must be a sequence of (C_out, C_in) int pairs, got {layer_shapes!r}") from None
    if not shapes:
        raise ValueError("layer_shapes must name at least one layer")
    for l, (c_out, c_in) in enumerate(shapes):
        if c_out < 1 or c_in < 1 or c_out % block_out or c_in % block_in:
            raise ValueError(f"layer_shapes[{l}] = {(c_out, c_in)}: C_out must be a positive multiple of N_out = "
                             f"{block_out} and C_in a positive multiple of N_in = {block_in}")
    return shapes


@dataclass(frozen=True)
class TilePlan:
    """Where each generated tile goes in the flat output buffer (see the module docstring)."""

    block_out: int
    block_in: int
    kernel_size: int
    layer_shapes: Optional[LayerShapes]  # None: the plain tile stack [E, N_out, N_in, k, k]
    n_tiles: int

    @property
    def kk(self) -> int:
        return self.kernel_size * self.kernel_size

    @property
    def layer_numels(self) -> List[int]:
        if self.layer_shapes is None:
            return [self.n_tiles * self.block_out * self.block_in * self.kk]
        return [c_out * c_in * self.kk for c_out, c_in in self.layer_shapes]

    @property
    def numel(self) -> int:
        return sum(self.layer_numels)

    def layer_views(self, flat: Tensor) -> List[Tensor]:
        """Split the flat buffer into the layers' ``[C_out, C_in, k, k]`` weights (views, no copy).

        ``torch.split`` is one autograd node, so the backward gathers the layers' gradients into
        one flat gradient with a single concatenation.
        """
        k = self.kernel_size
        if self.layer_shapes is None:
            return [flat.view(self.n_tiles, self.block_out, self.block_in, k, k)]
        parts = torch.split(flat, self.layer_numels)
        return [p.view(c_out, c_in, k, k) for p, (c_out, c_in) in zip(parts, self.layer_shapes)]

    def destinations(self) -> Tuple[Tensor, Tensor]:
        """``(dst_base, dst_row)``: int64 CPU tensors ``[E]`` (see the module docstring)."""
        kk, No, Ni = self.kk, self.block_out, self.block_in
        if self.layer_shapes is None:
            e = torch.arange(self.n_tiles, dtype=torch.int64)
            return e * (No * Ni * kk), torch.full((self.n_tiles,), Ni * kk, dtype=torch.int64)
        bases, rows, offset = [], [], 0
        for c_out, c_in in self.layer_shapes:
            m, n = c_out // No, c_in // Ni
            ob = torch.arange(m, dtype=torch.int64).repeat_interleave(n)
            ib = torch.arange(n, dtype=torch.int64).repeat(m)
            bases.append(offset + ob * (No * c_in * kk) + ib * (Ni * kk))
            rows.append(torch.full((m * n,), c_in * kk, dtype=torch.int64))
            offset += c_out * c_in * kk
        return torch.cat(bases), torch.cat(rows)


def make_plan(shapes: StaticGenShapes, layer_shapes=None) -> TilePlan:
    """A :class:`TilePlan` for these inputs; checks that the layers use exactly E tiles."""
    if layer_shapes is None:
        return TilePlan(shapes.block_out, shapes.block_in, shapes.kernel_size, None, shapes.n_tiles)
    ls = normalize_layer_shapes(layer_shapes, shapes.block_out, shapes.block_in)
    need = count_tiles(ls, (shapes.block_out, shapes.block_in))
    if need != shapes.n_tiles:
        raise ValueError(f"layer_shapes need {need} tiles of {shapes.block_out}x{shapes.block_in} but z has "
                         f"{shapes.n_tiles} embeddings (z must be [{need}, Nz])")
    return TilePlan(shapes.block_out, shapes.block_in, shapes.kernel_size, ls, shapes.n_tiles)


def count_tiles(layer_shapes: Sequence[Tuple[int, int]], block: Tuple[int, int]) -> int:
    """Number of embeddings (tiles) a layer list needs with basic block ``(N_out, N_in)``."""
    block_out, block_in = block
    return sum((c_out // block_out) * (c_in // block_in) for c_out, c_in in layer_shapes)


_DEST_CACHE: Dict[Tuple, Tuple[Tensor, Tensor]] = {}


def cached_destinations(plan: TilePlan, device: torch.device) -> Tuple[Tensor, Tensor]:
    """:meth:`TilePlan.destinations` on ``device``, built once per (plan, device)."""
    key = (plan, str(device))
    hit = _DEST_CACHE.get(key)
    if hit is None:
        if len(_DEST_CACHE) > 64:  # plans are few in practice; never grow without bound
            _DEST_CACHE.clear()
        hit = tuple(t.to(device) for t in plan.destinations())
        _DEST_CACHE[key] = hit
    return hit
