"""StaticHyperNetwork, HyperConv2d and HyperWideResNet: parameter counts of SPEC §2, the module
against the functional reference, the documented initialisation, and use inside a CNN."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from conftest import TOL, rel_err
from hyperkern import (HyperConv2d, HyperWideResNet, StaticHyperNetwork, static_kernel_gen_layers,
                       wrn_hyper_layer_shapes)
from hyperkern.ops import static_gen as op


@pytest.fixture(autouse=True)
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny ops: a second thread only adds synchronisation on a shared machine
    yield
    torch.set_num_threads(n)


def _count(module) -> int:
    return sum(p.numel() for p in module.parameters())


# --- SPEC §2 parameter counts ----------------------------------------------------------------------

def test_paper_mnist_hypernetwork_counts():
    h = StaticHyperNetwork([(16, 16)], z_dim=4, kernel_size=7)
    assert h.num_embeddings == 1
    assert h.core_parameters() == 4240
    assert _count(h) == 4240 + 4
    assert h.generated_numel() == 12544
    assert [tuple(w.shape) for w in h()] == [(16, 16, 7, 7)]


def test_wrn40_1_counts():
    layers = wrn_hyper_layer_shapes(40, 1)
    assert len(layers) == 36
    h = StaticHyperNetwork(layers, z_dim=64)
    assert h.num_embeddings == 242
    assert h.core_parameters() == 75_920
    assert _count(h) == 75_920 + 242 * 64
    # the whole CIFAR-10 model: stem, 1x1 shortcuts, batch norms and classifier are ordinary layers
    assert HyperWideResNet(40, 1).num_parameters() == 97_770


def test_wrn40_2_embeddings():
    assert StaticHyperNetwork(wrn_hyper_layer_shapes(40, 2), z_dim=64).num_embeddings == 966


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("Nz, d, block, k", [(3, 5, (7, 4), 3), (8, 8, (16, 16), 1), (4, 6, (2, 3), 5)])
def test_parameter_count_formula(Nz, d, block, k, bias):
    No, Ni = block
    layers = [(No, Ni), (2 * No, 3 * Ni), (No, 2 * Ni)]
    h = StaticHyperNetwork(layers, z_dim=Nz, hidden_dim=d, kernel_size=k, block=block, bias=bias)
    E = 1 + 6 + 2
    core = d * Nz * Ni + k * k * No * d + ((d * Ni + k * k * No) if bias else 0)
    assert h.num_embeddings == E and h.core_parameters() == core and _count(h) == Nz * E + core
    if bias:
        assert _count(h) == Nz * E + d * (Nz + 1) * Ni + k * k * No * (d + 1)  # SPEC §2's formula


# --- the module computes SPEC §2 --------------------------------------------------------------------

@pytest.mark.parametrize("bias", [True, False])
def test_module_matches_functional_reference(bias):
    layers = [(14, 5), (7, 10), (21, 15)]
    h = StaticHyperNetwork(layers, z_dim=3, hidden_dim=6, kernel_size=3, block=(7, 5), bias=bias,
                           dtype=torch.float64, backend="torch")
    with torch.no_grad():  # leave the init: biases would be zero
        for p in h.parameters():
            p.normal_()
    want = static_kernel_gen_layers(h.z, h.w_in, h.b_in, h.w_out, h.b_out, kernel_size=3, layer_shapes=layers,
                                    backend="reference")
    got = h()
    assert [tuple(w.shape) for w in got] == [(o, i, 3, 3) for o, i in layers]
    for g, w in zip(got, want):
        assert g.is_contiguous() and rel_err(g, w) <= TOL[torch.float64]


@pytest.mark.skipif(not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1")
                    or not op.backend_status("triton")[0], reason="needs triton and CUDA or TRITON_INTERPRET=1")
def test_module_triton_backend_matches_torch_backend():
    layers = [(16, 16), (32, 16)]
    torch.manual_seed(0)
    h = StaticHyperNetwork(layers, z_dim=5, hidden_dim=7, backend="torch")
    h_tr = StaticHyperNetwork(layers, z_dim=5, hidden_dim=7, backend="triton")
    h_tr.load_state_dict(h.state_dict())
    up = [torch.randn(o, i, 3, 3) for o, i in layers]
    for m in (h, h_tr):
        torch.autograd.backward(m(), up)
    for a, b in zip(h_tr(), h()):
        assert rel_err(a, b) <= TOL[torch.float32]
    for (name, a), b in zip(h_tr.named_parameters(), h.parameters()):
        assert rel_err(a.grad, b.grad) <= TOL[torch.float32], name


def test_initialisation_has_kaiming_variance():
    """Generated weights start with Var = 2 / (C_in * k * k) per layer (Kaiming normal, fan_in, ReLU)."""
    layers = [(16, 16), (32, 16), (64, 64), (32, 64)]
    ratios = []
    for seed in range(20):
        torch.manual_seed(seed)
        with torch.no_grad():
            ws = StaticHyperNetwork(layers, z_dim=16)()
            ratios.append([float(w.var() * w.shape[1] * 9 / 2) for w in ws])
    mean = torch.tensor(ratios).mean(0)
    assert ((mean > 0.8) & (mean < 1.25)).all(), mean
    h = StaticHyperNetwork(layers, z_dim=16, bias=True)
    assert torch.count_nonzero(h.b_in) == 0 and torch.count_nonzero(h.b_out) == 0


def test_bad_constructor_arguments():
    with pytest.raises(ValueError, match="multiple of N_out"):
        StaticHyperNetwork([(24, 16)])
    with pytest.raises(ValueError, match="z_dim"):
        StaticHyperNetwork([(16, 16)], z_dim=0)
    with pytest.raises(ValueError, match="block"):
        StaticHyperNetwork([(16, 16)], block=(16,))
    with pytest.raises(ValueError, match="depth"):
        HyperWideResNet(depth=41)


# --- use inside a CNN --------------------------------------------------------------------------------

def test_hyperconv2d_uses_its_generated_weight():
    h = StaticHyperNetwork([(16, 16), (32, 16)], z_dim=4)
    conv = HyperConv2d(16, 32, layer_index=1, stride=2)
    x = torch.randn(2, 16, 9, 9)
    ws = h()
    assert torch.equal(conv(x, ws), F.conv2d(x, ws[1], None, 2, 1))
    with pytest.raises(ValueError, match=r"weights\[0\] must be \(32, 16, 3, 3\)"):
        HyperConv2d(16, 32, layer_index=0)(x, ws)


def test_hyper_wide_resnet_trains_end_to_end():
    torch.manual_seed(0)
    model = HyperWideResNet(depth=10, widen_factor=1, num_classes=4, z_dim=8)
    assert model.hyper.layer_shapes == tuple(wrn_hyper_layer_shapes(10, 1))
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 3])
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(15):
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(p.grad is not None for p in model.hyper.parameters())
    assert losses[-1] < 0.5 * losses[0]  # it fits four points: gradients reach the hypernetwork
