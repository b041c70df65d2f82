"""HyperLSTM op: one dispatch point over the backends.

- ``naive``        — the float64-capable reference (the oracle), backend name ``"reference"``.
- ``fused_torch``  — the fast PyTorch backend (hoisted input GEMM, hand-written backward),
                     backend name ``"torch"``; the CPU path.
- ``fused_triton`` — fused Triton kernels (``"triton"``), once they ship.

Every backend follows the calling convention documented in :mod:`.common`.
"""
from __future__ import annotations

import importlib
from typing import Callable, Dict, Tuple

import torch

from .common import CellConfig, HyperLSTMState, PARAM_NAMES  # noqa: F401  (re-exported)

BACKENDS = ("reference", "torch")
_MODULES = {"reference": ".naive", "torch": ".fused_torch"}


def backend_status(name: str) -> Tuple[bool, str]:
    """(usable here, why or why not)."""
    if name in ("reference", "torch"):
        return True, "plain PyTorch, any device"
    return False, f"unknown backend {name!r}; expected one of {BACKENDS + ('auto',)}"


def resolve_backend(name: str, device: torch.device) -> str:
    """Map ``"auto"`` to the fastest correct backend for ``device``; validate explicit names."""
    if name == "auto":
        return "torch"
    ok, why = backend_status(name)
    if not ok:
        raise ValueError(f"backend {name!r} is not available: {why}")
    return name


def get_backend(name: str) -> Callable:
    """The ``hyper_lstm_sequence`` function of a resolved backend name."""
    if name not in _MODULES:
        raise ValueError(f"backend must be one of {BACKENDS + ('auto',)}, got {name!r}")
    return importlib.import_module(_MODULES[name], __name__).hyper_lstm_sequence


def available_backends() -> Dict[str, Tuple[bool, str]]:
    return {name: backend_status(name) for name in BACKENDS}
