"""hyperkern: HyperNetworks (Ha, Dai & Le, ICLR 2017) for PyTorch — a drop-in ``HyperLSTM``
layer with a float64 reference, a fast PyTorch backend and fused Triton kernels."""
from .modules import HyperLSTM, HyperLSTMCell
from .ops.hyper_lstm import available_backends
from .ops.hyper_lstm.common import CellConfig, HyperLSTMState

__version__ = "0.1.0"
__all__ = ["HyperLSTM", "HyperLSTMCell", "HyperLSTMState", "CellConfig", "available_backends"]
