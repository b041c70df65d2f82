"""Static hypernetworks (SPEC §2): a module that generates every conv weight of a CNN from one small
shared core and one embedding per tile, a conv layer that takes its weight from it, and a builder
for the paper's hyper wide ResNets.

    hyper = StaticHyperNetwork([(32, 32), (64, 32), (64, 64)], z_dim=16)
    conv = HyperConv2d(32, 64, layer_index=1, stride=2)
    weights = hyper()          # every layer's [C_out, C_in, k, k] weight (one launch on CUDA)
    y = conv(x, weights)

Default initialisation (``StaticHyperNetwork.reset_parameters``): ``w_in ~ N(0, 1/Nz)``,
``w_out ~ N(0, 1/d)``, biases 0, and the embeddings of layer l ``~ N(0, 2 / (C_in_l * k * k))``.
With zero biases the generated kernel is linear in z, and over the random initialisation
``Var(K) = d * (1/d) * Nz * (1/Nz) * Var(z) = Var(z)``: every layer's generated weights start
with the variance of a Kaiming-normal (fan_in, ReLU gain) initialised conv of its own fan-in,
even though all layers share one core. (The per-layer scale has to live in the embeddings: they
are the only per-layer parameters.)
"""
from __future__ import annotations

import math
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .ops.static_gen import static_kernel_gen_layers
from .ops.static_gen.common import count_tiles, normalize_layer_shapes


class StaticHyperNetwork(nn.Module):
    """Generates the weights of a list of conv layers from a shared core (SPEC §2).

    Args:
        layer_shapes: ``[(C_out, C_in), ...]``, each a multiple of ``block``.
        z_dim: embedding size Nz. hidden_dim: d (default ``z_dim``).
        kernel_size: k. block: the basic block ``(N_out, N_in)``.
        bias: learn ``b_in`` and ``b_out``. backend: ``"auto"``, ``"torch"``, ``"triton"`` or ``"reference"``.

    Parameters: ``z [E, Nz]`` (one embedding per tile, layer after layer, output-block-major),
    ``w_in [N_in, d, Nz]``, ``b_in [N_in, d]``, ``w_out [N_out*k*k, d]``, ``b_out [N_out*k*k]``;
    ``Nz*E + d*(Nz+1)*N_in + k*k*N_out*(d+1)`` in all with biases.

    ``forward()`` returns the list of layer weights ``[C_out, C_in, k, k]``.
    """

    def __init__(self, layer_shapes: Sequence[Tuple[int, int]], z_dim: int = 64, hidden_dim: Optional[int] = None,
                 kernel_size: int = 3, block: Tuple[int, int] = (16, 16), bias: bool = True, backend: str = "auto",
                 device=None, dtype=None):
        super().__init__()
        hidden_dim = z_dim if hidden_dim is None else hidden_dim
        for name, v in (("z_dim", z_dim), ("hidden_dim", hidden_dim), ("kernel_size", kernel_size)):
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        try:
            block_out, block_in = (int(b) for b in block)
        except (TypeError, ValueError):
            raise ValueError(f"block must be a pair (N_out, N_in) of positive ints, got {block!r}") from None
        if block_out < 1 or block_in < 1:
            raise ValueError(f"block must be a pair (N_out, N_in) of positive ints, got {block!r}")
        self.layer_shapes = normalize_layer_shapes(layer_shapes, block_out, block_in)
        self.block = (block_out, block_in)
        self.z_dim, self.hidden_dim, self.kernel_size = z_dim, hidden_dim, kernel_size
        self.backend = backend
        self.num_embeddings = count_tiles(self.layer_shapes, self.block)
        kk = kernel_size * kernel_size
        factory = {"device": device, "dtype": dtype}
        self.z = nn.Parameter(torch.empty(self.num_embeddings, z_dim, **factory))
        self.w_in = nn.Parameter(torch.empty(block_in, hidden_dim, z_dim, **factory))
        self.w_out = nn.Parameter(torch.empty(block_out * kk, hidden_dim, **factory))
        if bias:
            self.b_in = nn.Parameter(torch.empty(block_in, hidden_dim, **factory))
            self.b_out = nn.Parameter(torch.empty(block_out * kk, **factory))
        else:
            self.register_parameter("b_in", None)
            self.register_parameter("b_out", None)
        self.reset_parameters()

    def embedding_ranges(self) -> List[Tuple[int, int]]:
        """``[start, stop)`` rows of ``z`` owned by each layer."""
        ranges, start = [], 0
        for c_out, c_in in self.layer_shapes:
            n = (c_out // self.block[0]) * (c_in // self.block[1])
            ranges.append((start, start + n))
            start += n
        return ranges

    def kaiming_std(self, layer: int) -> float:
        """Standard deviation of a Kaiming-normal (fan_in, ReLU) init of layer ``layer``'s conv."""
        c_in = self.layer_shapes[layer][1]
        return math.sqrt(2.0 / (c_in * self.kernel_size * self.kernel_size))

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Generated kernels start with the variance of a Kaiming-normal conv (see the module docstring)."""
        nn.init.normal_(self.w_in, 0.0, 1.0 / math.sqrt(self.z_dim))
        nn.init.normal_(self.w_out, 0.0, 1.0 / math.sqrt(self.hidden_dim))
        if self.b_in is not None:
            nn.init.zeros_(self.b_in)
            nn.init.zeros_(self.b_out)
        for layer, (start, stop) in enumerate(self.embedding_ranges()):
            nn.init.normal_(self.z[start:stop], 0.0, self.kaiming_std(layer))

    def core_parameters(self) -> int:
        """Parameters of the shared core (everything but the embeddings)."""
        return sum(p.numel() for name, p in self.named_parameters() if name != "z")

    def generated_numel(self) -> int:
        return sum(c_out * c_in for c_out, c_in in self.layer_shapes) * self.kernel_size ** 2

    def forward(self) -> List[Tensor]:
        return static_kernel_gen_layers(self.z, self.w_in, self.b_in, self.w_out, self.b_out,
                                        kernel_size=self.kernel_size, layer_shapes=self.layer_shapes,
                                        backend=self.backend)

    def extra_repr(self) -> str:
        return (f"layers={len(self.layer_shapes)}, embeddings={self.num_embeddings}, z_dim={self.z_dim}, "
                f"hidden_dim={self.hidden_dim}, kernel_size={self.kernel_size}, block={self.block}, "
                f"bias={self.b_in is not None}, backend={self.backend!r}")


class HyperConv2d(nn.Module):
    """A 2-D convolution whose weight is layer ``layer_index`` of a :class:`StaticHyperNetwork`'s output.

    ``forward(x, weights)`` takes the whole list returned by the hypernetwork (generate it once per
    forward pass and hand it to every ``HyperConv2d``). The layer owns no weight; ``bias`` adds an
    ordinary learned bias.
    """

    def __init__(self, in_channels: int, out_channels: int, layer_index: int, kernel_size: int = 3,
                 stride: int = 1, padding: Optional[int] = None, bias: bool = False, device=None, dtype=None):
        super().__init__()
        self.in_channels, self.out_channels, self.kernel_size = in_channels, out_channels, kernel_size
        self.layer_index, self.stride = layer_index, stride
        self.padding = kernel_size // 2 if padding is None else padding
        self.bias = nn.Parameter(torch.zeros(out_channels, device=device, dtype=dtype)) if bias else None

    def forward(self, x: Tensor, weights: Sequence[Tensor]) -> Tensor:
        w = weights[self.layer_index]
        want = (self.out_channels, self.in_channels, self.kernel_size, self.kernel_size)
        if tuple(w.shape) != want:
            raise ValueError(f"weights[{self.layer_index}] must be {want} for this HyperConv2d, got {tuple(w.shape)}")
        return F.conv2d(x, w, self.bias, self.stride, self.padding)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, layer_index={self.layer_index}, "
                f"kernel_size={self.kernel_size}, stride={self.stride}, padding={self.padding}")


# --- wide ResNets with hyper-generated 3x3 convs (the paper's CIFAR-10 setting) ------------------

def _wrn_widths(depth: int, widen_factor: int) -> Tuple[int, List[int]]:
    if (depth - 4) % 6 != 0 or depth < 10:
        raise ValueError(f"WRN depth must be 6n + 4 (e.g. 16, 28, 40), got {depth}")
    if widen_factor < 1:
        raise ValueError(f"widen_factor must be >= 1, got {widen_factor}")
    return (depth - 4) // 6, [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]


def wrn_hyper_layer_shapes(depth: int = 40, widen_factor: int = 1) -> List[Tuple[int, int]]:
    """``[(C_out, C_in), ...]`` of every 3x3 conv inside the residual blocks of a WRN, in order.

    WRN-40-1 gives 36 layers and 242 tiles of 16x16; WRN-40-2 gives 966 tiles.
    """
    n, widths = _wrn_widths(depth, widen_factor)
    shapes, c_in = [], widths[0]
    for c_out in widths[1:]:
        for b in range(n):
            shapes += [(c_out, c_in if b == 0 else c_out), (c_out, c_out)]
        c_in = c_out
    return shapes


class _HyperBlock(nn.Module):
    """Pre-activation WRN basic block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3 (+ 1x1 shortcut if shapes change)."""

    def __init__(self, c_in: int, c_out: int, stride: int, layer_index: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(c_in)
        self.conv1 = HyperConv2d(c_in, c_out, layer_index, 3, stride)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.conv2 = HyperConv2d(c_out, c_out, layer_index + 1, 3, 1)
        self.shortcut = None if (c_in == c_out and stride == 1) else nn.Conv2d(c_in, c_out, 1, stride, bias=False)

    def forward(self, x: Tensor, weights: Sequence[Tensor]) -> Tensor:
        a = F.relu(self.bn1(x))
        y = self.conv1(a, weights)
        y = self.conv2(F.relu(self.bn2(y)), weights)
        return y + (x if self.shortcut is None else self.shortcut(a))


class HyperWideResNet(nn.Module):
    """WRN-depth-k (Zagoruyko & Komodakis) whose residual 3x3 convs come from one StaticHyperNetwork.

    The stem conv (3 -> 16), the 1x1 shortcuts, batch norms and the classifier are ordinary
    layers, as in the paper. ``HyperWideResNet(40, 1).num_parameters()`` is 97,770 (75,920 in the
    hypernetwork core, 242 x 64 in the embeddings).
    """

    def __init__(self, depth: int = 40, widen_factor: int = 1, num_classes: int = 10, in_channels: int = 3,
                 z_dim: int = 64, hidden_dim: Optional[int] = None, bias: bool = True, backend: str = "auto"):
        super().__init__()
        n, widths = _wrn_widths(depth, widen_factor)
        self.hyper = StaticHyperNetwork(wrn_hyper_layer_shapes(depth, widen_factor), z_dim=z_dim,
                                        hidden_dim=hidden_dim, kernel_size=3, block=(16, 16), bias=bias,
                                        backend=backend)
        self.stem = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        blocks, layer, c_in = [], 0, widths[0]
        for g, c_out in enumerate(widths[1:]):
            for b in range(n):
                stride = 2 if (g > 0 and b == 0) else 1
                blocks.append(_HyperBlock(c_in, c_out, stride, layer))
                layer += 2
                c_in = c_out
        self.blocks = nn.ModuleList(blocks)
        self.bn = nn.BatchNorm2d(c_in)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: Tensor) -> Tensor:
        weights = self.hyper()  # every hyper conv's weight, generated once per forward
        x = self.stem(x)
        for block in self.blocks:
            x = block(x, weights)
        x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))
