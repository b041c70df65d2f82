"""HyperLSTM op: one dispatch point over the backends.

- ``naive``        — the float64-capable reference (the oracle), backend name ``"reference"``.
- ``fused_torch``  — the fast PyTorch backend (hoisted input GEMM, hand-written backward),
                     backend name ``"torch"``; the CPU path.
- ``fused_triton`` — fused Triton kernels (``"triton"``): forward and BPTT backward; CUDA
                     tensors, or CPU tensors under ``TRITON_INTERPRET=1`` (tests).

Every backend follows the calling convention documented in :mod:`.common`.
"""
from __future__ import annotations

import importlib
import os
from typing import Callable, Dict, Tuple

import torch

from .common import CellConfig, HyperLSTMState, PARAM_NAMES  # noqa: F401  (re-exported)
from .dropout import DropoutSeed  # noqa: F401  (re-exported)

BACKENDS = ("reference", "torch", "triton")
_MODULES = {"reference": ".naive", "torch": ".fused_torch", "triton": ".fused_triton"}
_LOADED: Dict[str, object] = {}


def _triton_status(device=None) -> Tuple[bool, str]:
    """Triton imports AND (CUDA tensors, or CPU tensors with TRITON_INTERPRET=1). Imports triton
    only when asked (never when hyperkern is imported)."""
    try:
        import triton
    except Exception as e:  # noqa: BLE001
        return False, f"triton does not import ({type(e).__name__}: {e})"
    interp = os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")
    where = "CUDA" if device is None else str(device)
    if (device is None and torch.cuda.is_available()) or (device is not None and torch.device(device).type == "cuda"):
        return True, f"Triton {triton.__version__} kernels on {where} (forward and backward)"
    if interp and (device is None or torch.device(device).type == "cpu"):
        return True, f"Triton {triton.__version__} interpreter on CPU tensors (TRITON_INTERPRET=1; slow, for tests)"
    return False, f"needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1); got {where if device is not None else 'no CUDA device'}"


def backend_status(name: str, device=None) -> Tuple[bool, str]:
    """(usable here, why or why not); ``device``: the tensors' device, if known."""
    if name in ("reference", "torch"):
        return True, "plain PyTorch, any device"
    if name == "triton":
        return _triton_status(device)
    return False, f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}"


def resolve_backend(name: str, device: torch.device) -> str:
    """Map ``"auto"`` to the fastest correct backend for ``device``; validate explicit names."""
    if name == "auto":
        # Triton on CUDA, for inference and training (fused forward + BPTT backward kernels).
        if torch.device(device).type == "cuda" and backend_status("triton", device)[0]:
            return "triton"
        return "torch"
    ok, why = backend_status(name, device)
    if not ok:
        raise ValueError(f"backend {name!r} is not available: {why}")
    return name


def get_backend(name: str) -> Callable:
    """The ``hyper_lstm_sequence`` function of a resolved backend name."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    if name not in _LOADED:  # a plain dict lookup afterwards: torch.compile traces it without a break
        _LOADED[name] = importlib.import_module(_MODULES[name], __name__)
    return _LOADED[name].hyper_lstm_sequence


def available_backends() -> Dict[str, Tuple[bool, str]]:
    return {name: backend_status(name) for name in BACKENDS}
