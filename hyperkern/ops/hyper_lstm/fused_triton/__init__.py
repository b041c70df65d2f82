"""Triton backend of the HyperLSTM (``backend="triton"``): fused forward kernels and the fused BPTT
backward (the kernels: ``kernels/hyper_lstm_fwd.py``, ``kernels/hyper_lstm_bwd.py``).

- :mod:`.configs` — the launch configurations, as data (the launcher and the compile check read it);
- :mod:`.launch`  — the launchers (:func:`run_sequence`, :func:`run_backward`), buffers, validation;
- :mod:`.graphs`  — whole-call CUDA graphs: keys, the bounded cache, the skip conditions;
- :mod:`.op`      — the backend entry point :func:`hyper_lstm_sequence` and its ``torch.library``
  custom ops with their autograd (each replays from :mod:`.graphs` where it can).

Importing this package does not import Triton (the kernels are imported at the first launch).
"""
from . import configs, graphs, launch, op
from .configs import (all_bwd_kernel_configs, all_kernel_configs, all_launches, choose_bwd_configs,  # noqa: F401
                      choose_configs)
from .launch import INTERPRETER_DTYPES, SUPPORTED_DTYPES, kernels_interpreted, run_backward, run_sequence  # noqa: F401
from .op import SAVED_NAMES, SAVED_NAMES_STATES, hyper_lstm_sequence  # noqa: F401
