"""Reference HyperLSTM: a plain, step-by-step transcription of SPEC §1 in PyTorch.

No cleverness on purpose: per-gate loops, explicit layer norms, ordinary autograd. It runs in
any dtype (the tests use float64) and is the oracle every fast path is checked against.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
from torch import Tensor

from .common import NUM_PATHS, CellConfig, Lengths, Masks
from .dropout import mask_tensors


def layer_norm(a: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
    """LN(a) = (a - mean(a)) / sqrt(var(a) + eps) * w + b, biased variance, over the last dim."""
    mean = a.mean(dim=-1, keepdim=True)
    var = ((a - mean) ** 2).mean(dim=-1, keepdim=True)
    return (a - mean) / torch.sqrt(var + eps) * weight + bias


def lstm_update(gates, c_prev, cfg: CellConfig, ln_w, ln_b, ln_cell_w, ln_cell_b, mask):
    """Per-gate LN (optional), the LSTM update and the output path; gates = [a_i, a_f, a_g, a_o]."""
    if cfg.layer_norm:
        gates = [layer_norm(a, ln_w[y], ln_b[y], cfg.ln_eps) for y, a in enumerate(gates)]
    a_i, a_f, a_g, a_o = gates
    g = torch.tanh(a_g)
    if mask is not None:
        g = g * mask
    c = torch.sigmoid(a_f + cfg.forget_bias) * c_prev + torch.sigmoid(a_i) * g
    c_out = layer_norm(c, ln_cell_w, ln_cell_b, cfg.ln_eps) if cfg.layer_norm else c
    h = torch.sigmoid(a_o) * torch.tanh(c_out)
    return h, c


def cell_step(x: Tensor, state, p: Dict[str, Tensor], cfg: CellConfig, masks=(None, None)):
    """One step of one HyperLSTM cell. Returns the new state (h, c, h_hat, c_hat)."""
    h, c, h_hat, c_hat = state
    H, Hh, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    mask_main, mask_hyper = masks

    # 1. hyper cell over x̂ = [x ; h_{t-1}]
    x_hat = torch.cat([x, h], dim=-1)
    a_hat = x_hat @ p["hyper_weight_ih"].T + h_hat @ p["hyper_weight_hh"].T + p["hyper_bias"]
    hyper_gates = [a_hat[:, y * Hh:(y + 1) * Hh] for y in range(4)]
    h_hat, c_hat = lstm_update(
        hyper_gates, c_hat, cfg,
        p.get("hyper_ln_weight"), p.get("hyper_ln_bias"),
        p.get("hyper_ln_cell_weight"), p.get("hyper_ln_cell_bias"), mask_hyper,
    )

    # 2. embeddings from the new hyper state, then the 12 scaling vectors
    z_bias = torch.cat([p["z_bias"], p["z_bias"].new_zeros(4 * E)])
    z = h_hat @ p["z_weight"].T + z_bias
    d = [z[:, k * E:(k + 1) * E] @ p["d_weight"][k].T for k in range(NUM_PATHS)]

    # 3. main cell: row-scaled matmuls, per gate
    gates = []
    for y in range(4):
        rows = slice(y * H, (y + 1) * H)
        wx = x @ p["weight_ih"][rows].T
        wh = h @ p["weight_hh"][rows].T
        gates.append(d[y] * wx + d[4 + y] * wh + p["bias"][rows] + d[8 + y])
    h, c = lstm_update(
        gates, c, cfg,
        p.get("ln_weight"), p.get("ln_bias"), p.get("ln_cell_weight"), p.get("ln_cell_bias"),
        mask_main,
    )
    return h, c, h_hat, c_hat


def hyper_lstm_sequence(
    x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig,
    lengths: Lengths = None, masks: Masks = None, *, recompute: bool = False, cuda_graphs: bool = False,
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Run one cell over ``x [T, B, X]`` (calling convention in ``common``; ``recompute`` and
    ``cuda_graphs`` do not apply: autograd keeps what it keeps, and it runs eagerly)."""
    T = x.shape[0]
    masks = mask_tensors(masks, T, x.shape[1], cfg.hidden_size, cfg.hyper_size, x.dtype)
    outputs = []
    for t in range(T):
        step_masks = (masks[0][t], masks[1][t]) if masks is not None else (None, None)
        new = cell_step(x[t], state, params, cfg, step_masks)
        if lengths is not None:
            alive = (t < lengths).to(x.device).unsqueeze(1)  # [B, 1]
            new = tuple(torch.where(alive, n, s) for n, s in zip(new, state))
            outputs.append(torch.where(alive, new[0], torch.zeros_like(new[0])))
        else:
            outputs.append(new[0])
        state = new
    return torch.stack(outputs), tuple(state)
