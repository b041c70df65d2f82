"""The persistent HyperLSTM forward (``backend="triton_persistent"``): one kernel launch per call
runs every timestep (``kernels/hyper_lstm_persistent.py``; design and numbers: docs/persistent.md).

Per call: validation, the hoisted x-projection GEMM and every buffer (as :func:`.launch.run_sequence`
makes them: the same :class:`~.launch._ForwardPlan`), then ONE cooperative launch with a grid of at
most one program per SM, then one read of the kernel's error flag. The kernel's grid syncs are
bounded spins: if one gives up (a program that never arrived), the kernel stops, the flag is set,
and this call is run again with the per-step kernels (:func:`.launch.run_sequence`) after a
one-time warning. A cooperative launch the driver refuses (a grid that cannot be resident at once)
falls back the same way. Under CUDA-graph capture the flag cannot be read on the host: the call is
captured as it is (the kernel still never hangs; a timed-out replay would leave its outputs
incomplete), so capture only what has run eagerly once on the same device.

Training: with ``save`` it keeps exactly what the per-step forward keeps (every step's state, P, G,
Â, z, XP and the device lengths, or only the states in recompute mode), so the backward is the
fused BPTT of :func:`.launch.run_backward`. The custom op ``hyperkern::hyper_lstm_triton_persistent``
(same schema as ``hyperkern::hyper_lstm_triton``) has that backward as its autograd formula.
"""
from __future__ import annotations

import warnings
from typing import Dict, List, Optional

import torch
from torch import Tensor

from hyperkern.kernels.common import cdiv

from ..common import CellConfig, Lengths, Masks, register_sequence_autograd
from . import configs
from . import launch as per_step
from .launch import _DTYPE_NAME, _Buffers, _check_inputs, _dot, _ForwardPlan, _output, t_stride
from .op import call_sequence_op, fake_outputs, run_sequence_op

# Polls of a grid sync before it gives up: at one L2 round trip (0.3-0.7 µs) per poll, 0.3-0.7 s — far
# beyond any skew between co-resident programs, short enough that a broken launch is noticed.
MAX_SPIN = 1 << 20
# the sync words: the arrival counter (int64, word 0) and the error flag (int32) 128 bytes apart
_SYNC_INT64S, _ERR_INT32 = 32, 32

_warned = False
_fallbacks = 0


def fallbacks() -> int:
    """How many calls of this process fell back to the per-step kernels (gpu-check counts them:
    on a GPU a fall-back is a failure of the persistent kernel, however correct the result)."""
    return _fallbacks


def _warn_fallback(why: str) -> None:
    """One warning per process: the persistent kernel fell back to the per-step kernels."""
    global _warned, _fallbacks
    _fallbacks += 1
    if not _warned:
        _warned = True
        warnings.warn(f"hyperkern: the persistent HyperLSTM forward {why}; this call (and any later one that "
                      "fails the same way) runs the per-step Triton kernels instead", RuntimeWarning, stacklevel=4)


def work_items(B: int, H: int, Hh: int, launch) -> Dict[str, int]:
    """The kernel's work per step: product tiles (row block x column tile) and cell row blocks."""
    BM, BH, BMC = (launch.constexpr(n) for n in ("BM", "BH", "BMC"))
    return {"tiles": (cdiv(H, BH) + cdiv(Hh, BH)) * cdiv(B, BM), "row_blocks": cdiv(B, BMC)}


def grid_size(device, n_work: int) -> int:
    """Programs of a launch: one per SM at most, never more than there is work for. One program
    per SM always fits (the compile check keeps every configuration within one SM's registers and
    shared memory), the syncs' cost grows with the programs that arrive, and more programs on an
    SM would not add to its L2 bandwidth. The interpreter runs programs one after another, so
    there it is one program that walks all the work."""
    if per_step.kernels_interpreted():
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(n_work, sms))


def _launch(kernel, launch, grid, args) -> None:
    """The call's one launch, with keyword arguments (a seam the tests watch)."""
    kernel[grid](**launch.kwargs(args))


@torch.no_grad()
def run_sequence(x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig,
                 lengths: Lengths = None, masks: Masks = None, *,
                 out: Optional[Tensor] = None, guard: int = 0, save=False,
                 grid: Optional[int] = None, n_sync: Optional[int] = None, max_spin: int = MAX_SPIN,
                 check: bool = True):
    """The persistent forward launcher; arguments and results as :func:`.launch.run_sequence`.

    ``grid`` (default :func:`grid_size`) and ``n_sync`` (the arrivals a grid sync waits for,
    default the grid) are for tests: a grid sync that can never complete (``n_sync > grid``, or
    ``grid > 1`` under the interpreter) exercises the timeout and the fallback. ``buffers.persistent``
    says what happened: the grid, the syncs per launch, whether the call fell back. ``check=False``
    skips the validation (the custom op validated already)."""
    if check:
        _check_inputs(x, state, params, cfg, lengths, masks)
    T, B, X = x.shape
    H, Hh, E = cfg.hidden_size, cfg.hyper_size, cfg.embed_size
    dev, dtype = x.device, x.dtype
    save = "states" if save == "states" else ("full" if save else False)
    buf = _Buffers(dev, guard)
    plan = _ForwardPlan(x, params, cfg, lengths, masks, buf)
    xp_all = plan.x_projection(x)
    # state slots (step t reads slot t % n_slots) and P, G, Â, z, as the per-step launcher has them
    st, per_t = plan.sequence_buffers(buf, state, save)
    n_slots = st["H"].shape[0]
    steps = {n: (v, t_stride(v), v.stride(1)) for n, v in per_t.items()}
    out = _output(buf, out, T, B, H, dtype, dev)
    sync = torch.zeros(_SYNC_INT64S * 2, dtype=torch.int64, device=dev)
    counter, err = sync[:1], sync.view(torch.int32)[2 * _ERR_INT32:2 * _ERR_INT32 + 1]

    launch = configs.persistent_launch(B, _DTYPE_NAME[dtype], _dot(dtype), cfg.layer_norm, plan.drop.mode)
    work = work_items(B, H, Hh, launch)
    G = grid if grid is not None else grid_size(dev, max(work.values()))
    n_sync = G if n_sync is None else n_sync
    if G < 1 or n_sync < G:
        raise ValueError(f"grid must be positive and n_sync at least the grid, got grid={G}, n_sync={n_sync}")
    Hs, Cs, HHs, CHs = st["H"], st["C"], st["HH"], st["CH"]
    if Hs.stride() != Cs.stride() or HHs.stride() != CHs.stride():
        raise AssertionError("the kernel takes one pair of strides for h/c and one for ĥ/ĉ")
    (P, stp, spb), (Gb, sgt, sgb), (AH, sat, sab), (Z, szt, szb) = (steps[n] for n in ("P", "G", "AH", "Z"))
    d, fl = plan.drop, plan.flat
    args = dict(
        T=T, B=B, H=H, Hh=Hh, E=E, lengths_ptr=plan.lens,
        hs_ptr=Hs, cs_ptr=Cs, stride_st=Hs.stride(0), stride_sb=Hs.stride(1),
        hhs_ptr=HHs, chs_ptr=CHs, stride_hst=HHs.stride(0), stride_hsb=HHs.stride(1), n_slots=n_slots,
        w_hh_ptr=plan.w_hh, stride_whh=plan.w_hh.stride(0), w_hih_ptr=plan.w_hih, stride_whih=plan.w_hih.stride(0),
        w_hhh_ptr=plan.w_hhh, stride_whhh=plan.w_hhh.stride(0), hbias_ptr=fl["hyper_bias"],
        xp_ptr=xp_all, stride_xpt=xp_all.stride(0), stride_xpb=xp_all.stride(1),
        p_ptr=P, stride_pt=stp, stride_pb=spb, ahat_ptr=AH, stride_at=sat, stride_ab=sab,
        g_ptr=Gb, stride_gt=sgt, stride_gb=sgb, z_ptr=Z, stride_zt=szt, stride_zb=szb,
        zw_ptr=plan.z_w, stride_zw=plan.z_w.stride(0), zb_ptr=fl["z_bias"], bias_ptr=fl["bias"], dw_ptr=fl["d_weight"],
        m_ptr=d.m_main, stride_mt=d.strides_main[0], stride_mb=d.strides_main[1],
        mh_ptr=d.m_hyper, stride_mht=d.strides_hyper[0], stride_mhb=d.strides_hyper[1],
        seed_ptr=d.seed, p_drop=d.p, drop_scale=d.scale,
        out_ptr=out, stride_ot=out.stride(0), stride_ob=out.stride(1),
        forget_bias=plan.fb, eps=plan.eps,
        sync_ptr=counter, err_ptr=err, n_sync=n_sync, max_spin=int(max_spin), **plan.ln)
    why = None
    try:
        _launch(launch.kernel_fn(), launch, (G,), args)
    except RuntimeError as e:  # the driver refused the cooperative grid: nothing ran
        if "cooperative" not in str(e).lower():
            raise
        why = f"could not be launched ({str(e).splitlines()[0][:120]})"
    if why is None and not (dev.type == "cuda" and torch.cuda.is_current_stream_capturing()):
        # the one host read of the call, by design (a device sync): why this backend is explicit
        # only, never picked by "auto", and cannot be captured by the layer (docs/persistent.md)
        if int(err.item()):
            why = "gave up waiting at a grid sync (a program never arrived)"
    info = {"grid": G, "n_sync": n_sync, "syncs_per_launch": 2 * T - 1, "work": work, "fell_back": why is not None}
    if why is not None:
        _warn_fallback(why)
        res = per_step.run_sequence(x, state, params, cfg, lengths, masks, out=out, guard=guard, save=save,
                                    check=False)  # (validated above or by the op: no host read of lengths)
        res[2].persistent = dict(info, reason=why)
        return res

    buf.persistent = info
    return out, plan.finish(buf, st, per_t, save, masks), buf


# --------------------------------------------------------------------------------------------
# the backend entry point and its torch.library custom op
# --------------------------------------------------------------------------------------------

def hyper_lstm_sequence(x: Tensor, state, params: Dict[str, Tensor], cfg: CellConfig,
                        lengths: Lengths = None, masks: Masks = None, *, recompute: bool = False,
                        cuda_graphs: bool = False):
    """Run one cell over ``x [T, B, X]`` with the persistent forward (calling convention in
    ``..common``): one call of ``hyperkern::hyper_lstm_triton_persistent``, whose backward is the
    per-step Triton BPTT (``hyperkern::hyper_lstm_triton_backward``; ``recompute`` and
    ``cuda_graphs`` as there). The forward itself is never captured by the layer: it is one launch,
    and a graph could not read its error flag."""
    return call_sequence_op(torch.ops.hyperkern.hyper_lstm_triton_persistent, x, state, params, cfg, lengths, masks,
                            recompute, cuda_graphs)


@torch.library.custom_op("hyperkern::hyper_lstm_triton_persistent", mutates_args=())
def hyper_lstm_triton_persistent_op(
    x: Tensor, h0: Tensor, c0: Tensor, hh0: Tensor, ch0: Tensor, params: List[Tensor],
    lengths: Optional[Tensor], m_main: Optional[Tensor], m_hyper: Optional[Tensor],
    seed: Optional[Tensor], p_drop: float,
    H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float, save: int, cuda_graphs: bool,
) -> List[Tensor]:
    """``hyperkern::hyper_lstm_triton``'s schema and outputs, computed by the persistent kernel
    (``cuda_graphs`` applies to the backward only: this call is never captured)."""
    return run_sequence_op(run_sequence, "hyper_lstm_triton_persistent", x, (h0, c0, hh0, ch0), params, lengths,
                           m_main, m_hyper, seed, p_drop, H, Hh, E, layer_norm, forget_bias, ln_eps, save,
                           cuda_graphs=False)


@hyper_lstm_triton_persistent_op.register_fake
def _(x, h0, c0, hh0, ch0, params, lengths, m_main, m_hyper, seed, p_drop, H, Hh, E, layer_norm, forget_bias,
      ln_eps, save, cuda_graphs):
    return fake_outputs(x, H, Hh, E, save)


register_sequence_autograd(hyper_lstm_triton_persistent_op, torch.ops.hyperkern.hyper_lstm_triton_backward)
