"""Triton backends of the HyperLSTM (``backend="triton"``): fused forward kernels and the fused BPTT
backward (the kernels: ``kernels/hyper_lstm_fwd.py``, ``kernels/hyper_lstm_bwd.py``); and
``backend="triton_persistent"``: the whole forward in one launch (``kernels/hyper_lstm_persistent.py``)
with the same backward.

- :mod:`.configs` — the launch configurations, as data (the launcher and the compile check read it);
- :mod:`.launch`  — the launchers (:func:`run_sequence`, :func:`run_backward`), buffers, validation;
- :mod:`.graphs`  — whole-call CUDA graphs: keys, the bounded cache, the skip conditions;
- :mod:`.op`      — the backend entry point :func:`hyper_lstm_sequence` and its ``torch.library``
  custom ops with their autograd (each replays from :mod:`.graphs` where it can);
- :mod:`.persistent` — the persistent forward: its launcher (with the fall-back to the per-step
  kernels), entry point and custom op.

Importing this package does not import Triton (the kernels are imported at the first launch).
"""
from . import configs, graphs, launch, op, persistent
from .configs import (all_bwd_kernel_configs, all_kernel_configs, all_launches, choose_bwd_configs,  # noqa: F401
                      choose_configs)
from .launch import INTERPRETER_DTYPES, SUPPORTED_DTYPES, kernels_interpreted, run_backward, run_sequence  # noqa: F401
from .op import SAVED_NAMES, SAVED_NAMES_STATES, hyper_lstm_sequence  # noqa: F401
