"""hyperkern: HyperNetworks (Ha, Dai & Le, ICLR 2017) for PyTorch — a drop-in ``HyperLSTM``
layer with a float64 reference, a fast PyTorch backend and fused Triton kernels."""


def _checkout_kernels() -> None:
    """``hyperkern.kernels`` is the top-level ``kernels/`` folder (setup.py maps it). Installed, the
    import system finds it; run from a plain checkout (``python -m hyperkern ...`` in the repository,
    nothing pip-installed: the lent GPU machine), register that folder as the package here."""
    import importlib.util
    import os
    import sys

    if "hyperkern.kernels" in sys.modules or importlib.util.find_spec("hyperkern.kernels") is not None:
        return
    folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "kernels")
    init = os.path.join(folder, "__init__.py")
    if os.path.isfile(init):
        spec = importlib.util.spec_from_file_location("hyperkern.kernels", init, submodule_search_locations=[folder])
        module = importlib.util.module_from_spec(spec)
        sys.modules["hyperkern.kernels"] = module
        spec.loader.exec_module(module)


_checkout_kernels()

from .modules import HyperLSTM, HyperLSTMCell  # noqa: E402
from .ops.hyper_lstm import available_backends, cached_weights  # noqa: E402
from .ops.hyper_lstm.common import CellConfig, HyperLSTMState  # noqa: E402
from .ops.hyper_lstm.fused_triton.graphs import (clear_cuda_graph_cache, cuda_graph_cache_info,  # noqa: E402
                                                 set_cuda_graph_cache)
from .ops.static_gen import static_kernel_gen, static_kernel_gen_layers  # noqa: E402
from .static import HyperConv2d, HyperWideResNet, StaticHyperNetwork, wrn_hyper_layer_shapes  # noqa: E402

__version__ = "0.1.0"
__all__ = ["HyperLSTM", "HyperLSTMCell", "HyperLSTMState", "CellConfig", "available_backends", "cached_weights",
           "static_kernel_gen", "static_kernel_gen_layers", "StaticHyperNetwork", "HyperConv2d",
           "HyperWideResNet", "wrn_hyper_layer_shapes", "set_cuda_graph_cache", "cuda_graph_cache_info",
           "clear_cuda_graph_cache"]
