"""hyperkern: HyperNetworks (Ha, Dai & Le, ICLR 2017) for PyTorch — a drop-in ``HyperLSTM``
layer with a float64 reference, a fast PyTorch backend and fused Triton kernels."""
from .modules import HyperLSTM, HyperLSTMCell
from .ops.hyper_lstm import available_backends
from .ops.hyper_lstm.common import CellConfig, HyperLSTMState
from .ops.static_gen import static_kernel_gen, static_kernel_gen_layers
from .static import HyperConv2d, HyperWideResNet, StaticHyperNetwork, wrn_hyper_layer_shapes

__version__ = "0.1.0"
__all__ = ["HyperLSTM", "HyperLSTMCell", "HyperLSTMState", "CellConfig", "available_backends",
           "static_kernel_gen", "static_kernel_gen_layers", "StaticHyperNetwork", "HyperConv2d",
           "HyperWideResNet", "wrn_hyper_layer_shapes"]
