"""Recurrent dropout (SPEC §1 ``rdrop``): the two ways a backend receives it, and the reference of
the seeded mask stream.

A backend's ``masks`` argument (calling convention in :mod:`.common`) is one of

- ``None``: no dropout;
- a pair ``(m_main [T, B, H], m_hyper [T, B, Hh])`` of mask tensors, already scaled by ``1/(1-p)``;
- a :class:`DropoutSeed` ``(seed, p)``: the masks are a pure function of a seed. The Triton cell
  kernels draw each step's masks with ``tl.rand`` into a ``[B, H + Hh]`` scratch at the start of
  the step (the backward draws the same numbers again; no ``[T, B, ·]`` mask is ever kept), and
  :func:`seeded_masks` rebuilds exactly the same masks in plain PyTorch, so the reference and the
  torch backend can consume a seed too (:func:`mask_tensors`; in fp16/bf16 they then hold the
  kept value rounded to the input dtype, where the kernels keep it in fp32).

The seeded stream. Element ``(t, b, k)`` of the concatenated mask ``[T, B, H + Hh]`` (main columns
``k < H`` first, then the hyper cell's) has the counter ``n = (t·B + b)·(H + Hh) + k`` and is kept iff
``u ≥ p``, where ``u`` is Triton's ``tl.rand(seed, n)``: Philox4x32-10 keyed by the 64-bit seed
(low word, high word) on the counter ``(n_lo, n_hi, 0, 0)``; its first output word, read as int32
``x`` (``~x`` if negative), times ``4.6566127342e-10`` in fp32. Kept elements are ``1/(1-p)``
rounded to fp32, dropped ones 0; ``p`` is compared as fp32. Main and hyper masks are therefore
independent, fresh every step, and independent across the batch.
"""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Optional, Tuple, Union

import torch
from torch import Tensor

_M32 = 0xFFFFFFFF
# Philox4x32 constants, as in triton.language.random (round multipliers, key increments)
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85
_N_ROUNDS = 10
_UNIFORM_SCALE = 4.6566127342e-10  # triton.language.random.uint_to_uniform_float, 32-bit


@dataclass(frozen=True)
class DropoutSeed:
    """Recurrent dropout drawn from a seed (see the module doc). Deliberately not a tuple, so it is
    never mistaken for a ``(m_main, m_hyper)`` mask pair."""

    seed: Tensor  # int64, one element, on the input's device (a device tensor: no host sync)
    p: float  # drop probability, in [0, 1)

    @staticmethod
    def draw(p: float, device, generator: Optional[torch.Generator] = None) -> "DropoutSeed":
        """A fresh seed from torch's generator of ``device`` (reproducible with ``torch.manual_seed``)."""
        seed = torch.randint(0, 2 ** 63 - 1, (1,), dtype=torch.int64, device=device, generator=generator)
        return DropoutSeed(seed, float(p))


def keep_scale(p: float) -> float:
    """The value of a kept element, ``1/(1-p)`` rounded to fp32 (a Python float)."""
    return float(torch.tensor(1.0 / (1.0 - p), dtype=torch.float32))


def _mul32(a: Tensor, m: int) -> Tuple[Tensor, Tensor]:
    """(high, low) 32-bit words of ``a · m`` for ``a`` (int64 tensor) and ``m`` in [0, 2^32), exact."""
    m_hi, m_lo = m >> 16, m & 0xFFFF
    p_lo, p_hi = a * m_lo, a * m_hi  # each < 2^48: no int64 overflow
    high = (p_hi + (p_lo >> 16)) >> 16
    low = (p_lo + ((p_hi & 0xFFFF) << 16)) & _M32
    return high, low


def philox_uniform(seed: Union[int, Tensor], counter: Tensor) -> Tensor:
    """``tl.rand(seed, counter)`` in plain PyTorch: fp32 uniforms in [0, 1) for an int64 counter
    tensor. ``seed``: a Python int or a one-element int64 tensor (kept on the device: no host read)."""
    if not isinstance(seed, Tensor):
        seed &= (1 << 64) - 1
        seed = torch.tensor(seed - (1 << 64) if seed >= 1 << 63 else seed, dtype=torch.int64)
    seed = seed.reshape(()).to(counter.device)
    k0, k1 = seed & _M32, (seed >> 32) & _M32  # the 64 bits as (low, high) words, as Triton splits them
    c0 = counter & _M32
    c1 = (counter >> 32) & _M32
    c2 = torch.zeros_like(c0)
    c3 = torch.zeros_like(c0)
    for _ in range(_N_ROUNDS):
        hi_b, lo_b = _mul32(c2, _ROUND_B)
        hi_a, lo_a = _mul32(c0, _ROUND_A)
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _M32, (k1 + _KEY_B) & _M32
    x = torch.where(c0 >= 2 ** 31, c0 - 2 ** 32, c0)  # the word as int32
    x = torch.where(x < 0, -x - 1, x)  # ~x
    return x.to(torch.float32) * torch.tensor(_UNIFORM_SCALE, dtype=torch.float32)


_CHUNK = 1 << 20  # counters per Philox batch in seeded_masks (bounds its int64 temporaries)


def seeded_masks(dropout: DropoutSeed, T: int, B: int, H: int, Hh: int,
                 dtype: torch.dtype = torch.float32) -> Tuple[Tensor, Tensor]:
    """The masks ``(m_main [T, B, H], m_hyper [T, B, Hh])`` a :class:`DropoutSeed` stands for
    (generated a few steps at a time, with device tensor ops only)."""
    dev = dropout.seed.device
    N = H + Hh
    m = torch.empty(T, B, N, dtype=dtype, device=dev)
    p = torch.tensor(dropout.p, dtype=torch.float32, device=dev)
    scale = torch.tensor(keep_scale(dropout.p), dtype=torch.float32, device=dev)
    zero = torch.zeros((), dtype=torch.float32, device=dev)
    steps = max(1, _CHUNK // max(1, B * N))
    for t0 in range(0, T, steps):
        t1 = min(T, t0 + steps)
        counter = torch.arange(t0 * B * N, t1 * B * N, dtype=torch.int64, device=dev)
        u = philox_uniform(dropout.seed, counter)
        m[t0:t1] = torch.where(u >= p, scale, zero).view(t1 - t0, B, N)
    return m[..., :H], m[..., H:]


def mask_tensors(masks, T: int, B: int, H: int, Hh: int, dtype: torch.dtype):
    """``masks`` as ``None`` or a tensor pair (a :class:`DropoutSeed` is materialised)."""
    if isinstance(masks, DropoutSeed):
        return seeded_masks(masks, T, B, H, Hh, dtype)
    return masks


def check_seed(masks: DropoutSeed, device) -> None:
    """A clear error for a malformed :class:`DropoutSeed`."""
    seed, p = masks.seed, masks.p
    if not isinstance(seed, Tensor) or seed.dtype != torch.int64 or seed.numel() != 1:
        raise TypeError("masks: DropoutSeed.seed must be an int64 tensor with one element")
    if seed.device != torch.device(device):
        raise ValueError(f"masks: DropoutSeed.seed is on {seed.device}, x on {device}")
    if not isinstance(p, numbers.Real) or isinstance(p, bool) or not 0.0 <= p < 1.0:
        raise ValueError(f"masks: DropoutSeed.p must be a number in [0, 1), got {p!r}")


def masks_to_op(masks):
    """A backend's ``masks`` as a ``torch.library`` op's ``(m_main, m_hyper, seed, p_drop)`` arguments."""
    if isinstance(masks, DropoutSeed):
        return None, None, masks.seed, float(masks.p)
    if masks is None:
        return None, None, None, 0.0
    return masks[0], masks[1], None, 0.0


def masks_from_op(m_main, m_hyper, seed, p_drop):
    """The inverse of :func:`masks_to_op`."""
    if seed is not None:
        return DropoutSeed(seed, float(p_drop))
    return None if m_main is None else (m_main, m_hyper)
