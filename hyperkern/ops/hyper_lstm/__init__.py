"""HyperLSTM op: one dispatch point over the backends.

- ``naive``        — the float64-capable reference (the oracle), backend name ``"reference"``.
- ``fused_torch``  — the fast PyTorch backend (hoisted input GEMM, hand-written backward),
                     backend name ``"torch"``; the CPU path.
- ``fused_triton`` — fused Triton kernels (``"triton"``): forward and BPTT backward; CUDA
                     tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests). And
                     ``"triton_persistent"``: the forward in one launch per sequence (grid syncs,
                     bounded: it falls back to the per-step kernels rather than hang), the same
                     backward; never picked by ``"auto"`` until a GPU run has measured it.

:data:`REGISTRY` says what each supports; ``"auto"`` picks ``triton`` for CUDA tensors it can
run (float32/16, bfloat16, embed_size <= 64) and ``torch`` for everything else. Every backend
follows the calling convention documented in :mod:`.common`. Importing this package imports every
backend's Python module but never Triton (the kernels are imported at their first launch).
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Tuple

from ..registry import FLOATS, Backend, Registry, triton_requires
from . import fused_torch, fused_triton, naive
from .common import CellConfig, HyperLSTMState, PARAM_NAMES, autocast_backend, register_sequence_autocast  # noqa: F401
from .dropout import DropoutSeed  # noqa: F401  (re-exported)
from .fused_torch import cached_weights  # noqa: F401  (re-exported)


def _triton_limits(embed_size: Optional[int] = None, **_) -> Optional[str]:
    limit = fused_triton.configs.MAX_EMBED
    if embed_size is not None and embed_size > limit:
        return f"takes embed_size up to {limit} (the backward keeps dz in registers), got {embed_size}"
    return None


REGISTRY = Registry("HyperLSTM", (
    Backend("reference", "float64-capable reference (SPEC transcribed step by step; the oracle)",
            autocast_backend(naive.hyper_lstm_sequence), {"cpu": FLOATS, "cuda": FLOATS}),
    Backend("torch", "fast PyTorch path (hoisted GEMM, hand-written BPTT); any device",
            fused_torch.hyper_lstm_sequence, {"cpu": FLOATS, "cuda": FLOATS}),
    Backend("triton", "fused Triton kernels, forward and backward (2 launches per step each way)",
            fused_triton.hyper_lstm_sequence,
            {"cuda": fused_triton.SUPPORTED_DTYPES, "cpu": fused_triton.INTERPRETER_DTYPES},
            auto_devices=("cuda",), requires=triton_requires, limits=_triton_limits),
    Backend("triton_persistent", "the Triton forward in one persistent launch (2 grid syncs per step), "
            "the same backward; not run on a GPU yet, so never picked by auto",
            fused_triton.persistent.hyper_lstm_sequence,
            {"cuda": fused_triton.SUPPORTED_DTYPES, "cpu": fused_triton.INTERPRETER_DTYPES},
            auto_devices=("cuda",), requires=triton_requires, limits=_triton_limits),
), auto_order=("triton", "torch"))
BACKENDS = REGISTRY.names
# Inside torch.autocast every backend computes in precision.autocast_dtype (CPU: the parameters'
# dtype; CUDA: the autocast dtype): the custom ops by their autocast rules, the reference by its
# wrapper above. The backward ops need none (they run in the forward's dtypes).
for _op in ("hyper_lstm_torch", "hyper_lstm_triton", "hyper_lstm_triton_persistent"):
    register_sequence_autocast("hyperkern::" + _op)
# the backends built on the Triton kernels: recurrent dropout as a seed by default (the kernels draw
# the masks); CPU tensors only under the interpreter
TRITON_BACKENDS = ("triton", "triton_persistent")


def backend_status(name: str, device=None, dtype=None, training=None, **facts) -> Tuple[bool, str]:
    """(usable here, why or what) for a backend name, optionally for a given call."""
    return REGISTRY.status(name, device, dtype, training, **facts)


def resolve_backend(name: str, device, dtype=None, training=None, **facts) -> str:
    """``"auto"`` -> the backend that runs this call; explicit names validated (ValueError saying why)."""
    return REGISTRY.resolve(name, device, dtype, training, **facts)


def get_backend(name: str) -> Callable:
    """The ``hyper_lstm_sequence`` function of a resolved backend name (a dict lookup: no import,
    so ``torch.compile`` traces through it)."""
    return REGISTRY.get(name)


def available_backends() -> Dict[str, Tuple[bool, str]]:
    return REGISTRY.available()


__all__ = ["REGISTRY", "BACKENDS", "TRITON_BACKENDS", "backend_status", "resolve_backend", "get_backend", "available_backends",
           "CellConfig", "HyperLSTMState", "DropoutSeed", "cached_weights"]
