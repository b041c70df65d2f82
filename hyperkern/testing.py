"""Helpers for checking fast paths against the reference (used by the tests and ``verify``)."""
from __future__ import annotations

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator = None, scale: float = 0.3) -> nn.Module:
    """Give every parameter fresh, non-initial random values (never zeros, never the init).

    Layer-norm weights land around 1, d_weight so that the scaling vectors d are O(1) and vary
    per row; everything else ~ N(0, scale²), enough to exercise every term of SPEC §1.
    """
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
        if leaf.endswith("ln_weight") or leaf.endswith("ln_cell_weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif leaf == "d_weight":
            E = p.shape[-1]
            p.copy_(noise / E ** 0.5)
        elif leaf == "z_bias":
            p.copy_(1.0 + 0.3 * noise)
        else:
            p.copy_(scale * noise)
    return module
