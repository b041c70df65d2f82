"""The HyperLSTM Triton backend as PyTorch sees it: :func:`hyper_lstm_sequence` (the backend entry
point, calling convention in ``..common``) and the two ``torch.library`` custom ops behind it.

The whole sequence is one call of ``hyperkern::hyper_lstm_triton`` (so ``torch.compile`` keeps it
as one opaque node, no graph break); with gradients required the op also returns what the
backward needs, and its registered autograd formula is ``hyperkern::hyper_lstm_triton_backward``
(the fused BPTT of :func:`.launch.run_backward`). Each op's body runs inside the device guard
(:func:`hyperkern.ops.launches.device_guard`: the tensors' device and its current stream). With
``cuda_graphs=True`` (opt-in) each op replays its whole call from a CUDA graph where it can
(:mod:`.graphs`); by default it runs the eager loop, which has no host synchronisation and no
host read when ``lengths`` is None, so PyTorch's own mechanisms (``torch.cuda.graph``,
``make_graphed_callables``, ``torch.compile(mode="reduce-overhead")``) can capture it.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from ..common import (NUM_PATHS, CellConfig, Lengths, Masks, cell_config, fake_sequence_grads, fake_sequence_outputs,
                      needs_grad, register_sequence_autograd)
from ... import launches
from ..dropout import masks_from_op, masks_to_op
from . import graphs
from .launch import _acc_dtype, _check_inputs, _dot, run_backward, run_sequence


def hyper_lstm_sequence(
    x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig,
    lengths: Lengths = None, masks: Masks = None, *, recompute: bool = False, cuda_graphs: bool = False,
) -> Tuple[Tensor, Tuple[Tensor, Tensor, Tensor, Tensor]]:
    """Run one cell over ``x [T, B, X]`` with the fused Triton kernels (calling convention in ``common``).

    One call of the custom op ``hyperkern::hyper_lstm_triton``. With gradients required the op
    also returns every step's state, P, G, Â and z — or, with ``recompute``, only every step's
    state: the backward then rebuilds XP with one GEMM and re-runs each step's forward kernels (2
    more launches per step, 4 in all) to get P, G, Â and z, giving bitwise the same gradients —
    and its registered backward is the fused BPTT (``hyperkern::hyper_lstm_triton_backward``).
    ``cuda_graphs`` (opt-in): replay the forward and the backward from the layer's own CUDA graphs
    where possible (:mod:`.graphs`)."""
    return call_sequence_op(torch.ops.hyperkern.hyper_lstm_triton, x, state, params, cfg, lengths, masks, recompute,
                            cuda_graphs)


def call_sequence_op(sequence_op, x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig, lengths: Lengths,
                     masks: Masks, recompute: bool, cuda_graphs: bool):
    """One call of a Triton sequence op (``hyper_lstm_triton`` or ``hyper_lstm_triton_persistent``:
    one schema), keeping what the backward needs when gradients are required. Inside
    ``torch.autocast`` the dtypes are left to the op's autocast rule (it casts every floating
    input to one dtype before the op runs, and the op checks them then)."""
    autocast = isinstance(x, Tensor) and torch.is_autocast_enabled(x.device.type)
    _check_inputs(x, state, params, cfg, lengths, masks, dtypes=not autocast)
    save = (2 if recompute else 1) if needs_grad(x, state, params) else 0
    flat = [params[n] for n in cfg.param_names()]
    m_main, m_hyper, seed, p_drop = masks_to_op(masks)
    res = sequence_op(x, *state, flat, lengths, m_main, m_hyper, seed, p_drop, cfg.hidden_size, cfg.hyper_size,
                      cfg.embed_size, bool(cfg.layer_norm), float(cfg.forget_bias), float(cfg.ln_eps), save,
                      bool(cuda_graphs))
    return res[0], tuple(res[1:5])


# --------------------------------------------------------------------------------------------
# torch.library registration: one custom op over a whole sequence (forward) and one for its
# backward, so torch.compile treats the time loop as a single opaque node (no graph break).
# --------------------------------------------------------------------------------------------

SAVED_NAMES = ("H", "C", "HH", "CH", "P", "G", "AH", "Z", "XP", "lens")  # save=1 (full)
SAVED_NAMES_STATES = ("H", "C", "HH", "CH", "lens")  # save=2 (recompute mode)

def _saved_shapes(T, B, H, Hh, E):
    return {"H": (T + 1, B, H), "C": (T + 1, B, H), "HH": (T + 1, B, Hh), "CH": (T + 1, B, Hh),
            "P": (T, B, 4 * H), "G": (T, B, 4 * H), "AH": (T, B, 4 * Hh), "Z": (T, B, NUM_PATHS * E),
            "XP": (T, B, 4 * H + 4 * Hh), "lens": (B,)}


@torch.library.custom_op("hyperkern::hyper_lstm_triton", mutates_args=())
def hyper_lstm_triton_op(
    x: Tensor, h0: Tensor, c0: Tensor, hh0: Tensor, ch0: Tensor, params: List[Tensor],
    lengths: Optional[Tensor], m_main: Optional[Tensor], m_hyper: Optional[Tensor],
    seed: Optional[Tensor], p_drop: float,
    H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float, save: int, cuda_graphs: bool,
) -> List[Tensor]:
    """[out, h, c, ĥ, ĉ] + what the backward needs: nothing (``save=0``, inference), every step's
    tensors (1: :data:`SAVED_NAMES`) or only every step's states (2, recompute mode:
    :data:`SAVED_NAMES_STATES`). Recurrent dropout: the masks ``m_main, m_hyper``, or ``seed`` with
    drop probability ``p_drop`` (see :func:`..dropout.masks_to_op`), or neither."""
    return run_sequence_op(run_sequence, "hyper_lstm_triton", x, (h0, c0, hh0, ch0), params, lengths, m_main,
                           m_hyper, seed, p_drop, H, Hh, E, layer_norm, forget_bias, ln_eps, save, cuda_graphs)


def run_sequence_op(run, name: str, x, state, params, lengths, m_main, m_hyper, seed, p_drop, H, Hh, E, layer_norm,
                    forget_bias, ln_eps, save, cuda_graphs: bool) -> List[Tensor]:
    """The body of the Triton sequence op ``name``: ``run`` (a forward launcher with
    :func:`.launch.run_sequence`'s signature) over the op's arguments, the whole call replayed
    from a CUDA graph where :mod:`.graphs` allows (``cuda_graphs``), and the op's outputs."""
    with launches.device_guard(x):  # the tensors' device and its current stream, whatever is current
        cfg = cell_config(x.shape[2], H, Hh, E, layer_norm, forget_bias, ln_eps)
        p = dict(zip(cfg.param_names(), params))
        _check_inputs(x, state, p, cfg, lengths, masks_from_op(m_main, m_hyper, seed, p_drop))
        mode = {0: False, 1: "full", 2: "states"}[int(save)]
        names = SAVED_NAMES if save == 1 else SAVED_NAMES_STATES

        def forward(x, h0, c0, hh0, ch0, lens, m_main, m_hyper, seed) -> List[Tensor]:
            masks = masks_from_op(m_main, m_hyper, seed, p_drop)
            out, final, buf = run(x, (h0, c0, hh0, ch0), p, cfg, lens, masks, save=mode, check=False)
            res = [out] + [f.clone() for f in final]  # never alias another output
            if save:
                res += [buf.saved[n] for n in names]
            return res

        lens = None if lengths is None else lengths.to(device=x.device, dtype=torch.int32)
        inputs = [x, *state, lens, m_main, m_hyper, seed]
        key = graphs.graph_key(name, (H, Hh, E, bool(layer_norm), float(forget_bias), float(ln_eps), int(save),
                                      float(p_drop)), inputs, params, x.device, _dot(x.dtype))
        return graphs.CACHE.run(key, forward, inputs, enabled=cuda_graphs)


def fake_outputs(x, H, Hh, E, save) -> List[Tensor]:
    """The outputs of a Triton sequence op, as empty tensors (its fake implementation)."""
    res = fake_sequence_outputs(x, H, Hh)
    if save:
        shapes = _saved_shapes(x.shape[0], x.shape[1], H, Hh, E)
        for n in (SAVED_NAMES if save == 1 else SAVED_NAMES_STATES):
            res.append(x.new_empty(shapes[n], dtype=torch.int32 if n == "lens" else _acc_dtype(x.dtype)))
    return res


@hyper_lstm_triton_op.register_fake
def _(x, h0, c0, hh0, ch0, params, lengths, m_main, m_hyper, seed, p_drop, H, Hh, E, layer_norm, forget_bias,
      ln_eps, save, cuda_graphs):
    return fake_outputs(x, H, Hh, E, save)


@torch.library.custom_op("hyperkern::hyper_lstm_triton_backward", mutates_args=())
def hyper_lstm_triton_backward_op(
    x: Tensor, params: List[Tensor], saved: List[Tensor], lengths: Optional[Tensor], m_main: Optional[Tensor],
    m_hyper: Optional[Tensor], seed: Optional[Tensor], p_drop: float, d_out: Optional[Tensor], dh: Optional[Tensor],
    dc: Optional[Tensor], dhh: Optional[Tensor], dch: Optional[Tensor],
    H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float, cuda_graphs: bool,
) -> List[Tensor]:
    """[d x, d h0, d c0, d ĥ0, d ĉ0] + the parameter gradients (``cfg.param_names()`` order).
    (``lengths``: the sequence op's schema; the device lengths are among the ``saved`` tensors.)"""
    cfg = cell_config(x.shape[2], H, Hh, E, layer_norm, forget_bias, ln_eps)
    p = dict(zip(cfg.param_names(), params))
    names = SAVED_NAMES if len(saved) == len(SAVED_NAMES) else SAVED_NAMES_STATES
    n_saved = len(names)

    def backward(x, *rest) -> List[Tensor]:
        sv = dict(zip(names, rest[:n_saved]))
        m_main, m_hyper, seed, d_out, *d_final = rest[n_saved:]
        sv["masks"] = masks_from_op(m_main, m_hyper, seed, p_drop)
        dx, d_state, grads, _ = run_backward(x, p, cfg, sv, d_out, tuple(d_final))
        return [dx, *d_state] + [grads[n] for n in cfg.param_names()]

    inputs = [x, *saved, m_main, m_hyper, seed, d_out, dh, dc, dhh, dch]
    key = graphs.graph_key("hyper_lstm_triton_backward", (H, Hh, E, bool(layer_norm), float(forget_bias),
                                                          float(ln_eps), float(p_drop)),
                           inputs, params, x.device, _dot(x.dtype))
    with launches.device_guard(x):
        return graphs.CACHE.run(key, backward, inputs, enabled=cuda_graphs)


@hyper_lstm_triton_backward_op.register_fake
def _(x, params, saved, lengths, m_main, m_hyper, seed, p_drop, d_out, dh, dc, dhh, dch, H, Hh, E, layer_norm,
      forget_bias, ln_eps, cuda_graphs):
    return fake_sequence_grads(x, params, H, Hh)


register_sequence_autograd(hyper_lstm_triton_op, torch.ops.hyperkern.hyper_lstm_triton_backward)
