"""Static kernel generation (SPEC §2): every backend against the float64 reference.

Without a GPU the Triton kernels run in the interpreter (TRITON_INTERPRET=1, set by conftest) on CPU
tensors. Sizes are odd on purpose (E=3, Nz=3, d=6, N_in=5, N_out=7, k=3: nothing is a multiple of
a block); every buffer the kernels write is NaN-poisoned with guard zones (no NaN may survive,
interiors must be fully written, guards must keep their sentinel), and the inputs live inside NaN
guard zones, so a read out of bounds shows up as NaN in the results.
"""
from __future__ import annotations

import math
import os

import pytest
import torch

from conftest import kernel_tol, rel_err
from hyperkern import static_kernel_gen, static_kernel_gen_layers, wrn_hyper_layer_shapes
from hyperkern.ops import static_gen as op
from hyperkern.ops.static_gen import naive
from hyperkern.ops.static_gen.common import check_inputs, make_plan
from hyperkern.testing import GuardedAlloc

ODD = dict(E=3, Nz=3, d=6, Ni=5, No=7, k=3)
GUARD = 37  # elements of NaN on each side of every guarded buffer

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
needs_triton = pytest.mark.skipif(not (CUDA or INTERPRET) or not op.backend_status("triton")[0],
                                  reason="needs triton and CUDA or TRITON_INTERPRET=1")
DEVICE = torch.device("cuda" if CUDA else "cpu")
# hyperkern.ops.precision: the interpreter's exact dots on CPU, the dot policy on a GPU (fp32: full
# precision unless TF32 is switched on) — outputs here; these tests hold gradients to the same bound.
TOL_HERE = {dt: kernel_tol(dt).out for dt in (torch.float32, torch.float16, torch.float64)}


@pytest.fixture(autouse=True)
def _one_thread():
    """These tests run thousands of tiny ops: on a shared 2-core machine a second intra-op thread
    only adds synchronisation (measured: the WRN-40-1 float64 reference backward takes 0.1 s on
    one thread and 4 s on two while other jobs run)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def make_inputs(E, Nz, d, Ni, No, k, bias=True, seed=0):
    """float64 inputs of SPEC §2 with O(1) outputs (never zeros)."""
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return [r(E, Nz), r(Ni, d, Nz) / math.sqrt(Nz), 0.5 * r(Ni, d) if bias else None,
            r(No * k * k, d) / math.sqrt(d), 0.5 * r(No * k * k) if bias else None]


def guarded(t: torch.Tensor) -> torch.Tensor:
    """A contiguous copy of ``t`` living inside a buffer with NaN guard zones on both sides."""
    buf = torch.full((t.numel() + 2 * GUARD,), float("nan"), dtype=t.dtype, device=t.device)
    buf[GUARD:GUARD + t.numel()] = t.reshape(-1)
    return buf[GUARD:GUARD + t.numel()].view(t.shape)


@pytest.fixture
def fused(monkeypatch):
    """The Triton launcher module, with guarded allocations and a launch counter."""
    from hyperkern.ops.static_gen import fused_triton

    alloc = GuardedAlloc(GUARD)
    launched = []  # kernel names, in launch order (not `launches`: the module imports ops.launches)
    real_launch = fused_triton._launch

    def counting_launch(launch, grid, args):
        launched.append(launch.kernel)
        return real_launch(launch, grid, args)

    monkeypatch.setattr(fused_triton, "_empty", alloc)
    monkeypatch.setattr(fused_triton, "_launch", counting_launch)
    monkeypatch.setattr(fused_triton, "alloc", alloc, raising=False)
    monkeypatch.setattr(fused_triton, "launched", launched, raising=False)
    yield fused_triton


def _reference(inputs64, kernel_size, layer_shapes, upstream):
    """float64 reference outputs and gradients of sum(out * upstream)."""
    leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs64]
    if layer_shapes is None:
        outs = [static_kernel_gen(*leaves, kernel_size=kernel_size, backend="reference")]
    else:
        outs = static_kernel_gen_layers(*leaves, kernel_size=kernel_size, layer_shapes=layer_shapes,
                                        backend="reference")
    torch.autograd.backward(outs, upstream)
    return [o.detach() for o in outs], [t.grad if t is not None else None for t in leaves]


def _compare(backend, inputs64, dtype, kernel_size, layer_shapes=None, guard_inputs=False, seed=1):
    """Run ``backend`` in ``dtype`` and compare outputs and all gradients with the float64 reference
    evaluated at the same (rounded) inputs; returns the outputs."""
    rounded = [t.to(dtype) if t is not None else None for t in inputs64]
    plan_shapes = make_plan(check_inputs(*inputs64, kernel_size), layer_shapes)
    k = kernel_size
    shapes = ([(plan_shapes.n_tiles, plan_shapes.block_out, plan_shapes.block_in, k, k)] if layer_shapes is None
              else [(c_out, c_in, k, k) for c_out, c_in in plan_shapes.layer_shapes])
    g = torch.Generator().manual_seed(seed)
    upstream = [torch.randn(s, generator=g, dtype=torch.float64).to(dtype) for s in shapes]
    ref_out, ref_grads = _reference([t.double() if t is not None else None for t in rounded], k, layer_shapes,
                                    [u.double() for u in upstream])

    leaves = []
    for t in rounded:
        if t is None:
            leaves.append(None)
            continue
        t = t.to(DEVICE)
        leaves.append((guarded(t) if guard_inputs else t.clone()).requires_grad_())
    if layer_shapes is None:
        outs = [static_kernel_gen(*leaves, kernel_size=k, backend=backend)]
    else:
        outs = static_kernel_gen_layers(*leaves, kernel_size=k, layer_shapes=layer_shapes, backend=backend)
    up = [guarded(u.to(DEVICE)) if guard_inputs else u.to(DEVICE) for u in upstream]
    torch.autograd.backward(outs, up)

    tol = TOL_HERE[dtype]
    for l, (o, r) in enumerate(zip(outs, ref_out)):
        assert o.dtype == dtype and tuple(o.shape) == tuple(r.shape)
        assert not torch.isnan(o).any()
        assert rel_err(o, r) <= tol, f"output {l}: rel err {rel_err(o, r):.2e} > {tol}"
    for name, leaf, rg in zip(("z", "w_in", "b_in", "w_out", "b_out"), leaves, ref_grads):
        if leaf is None:
            continue
        assert leaf.grad is not None and leaf.grad.dtype == dtype, name
        assert rel_err(leaf.grad, rg) <= tol, f"grad {name}: rel err {rel_err(leaf.grad, rg):.2e} > {tol}"
    return outs


# --- the reference itself and the torch path ---------------------------------------------------

def test_reference_matches_spec_einsum():
    z, w_in, b_in, w_out, b_out = make_inputs(**ODD)
    k, No, Ni = ODD["k"], ODD["No"], ODD["Ni"]
    A = torch.einsum("idz,ez->eid", w_in, z) + b_in
    S = torch.einsum("jd,eid->eij", w_out, A) + b_out
    want = S.view(ODD["E"], Ni, No, k, k).permute(0, 2, 1, 3, 4)
    got = static_kernel_gen(z, w_in, b_in, w_out, b_out, kernel_size=k, backend="reference")
    assert got.shape == (ODD["E"], No, Ni, k, k)
    assert rel_err(got, want) <= 1e-12


def test_layer_assembly_places_tiles_output_block_major():
    """Tile (ob, ib) of a layer with n input blocks is embedding offset + ob*n + ib (SPEC §2)."""
    No, Ni, k = ODD["No"], ODD["Ni"], ODD["k"]
    layers = [(No, 2 * Ni), (3 * No, 2 * Ni)]  # 2 + 6 tiles
    inputs = make_inputs(**{**ODD, "E": 8})
    tiles = static_kernel_gen(*inputs, kernel_size=k, backend="reference")
    for backend in ("reference", "torch"):
        ws = static_kernel_gen_layers(*inputs, kernel_size=k, layer_shapes=layers, backend=backend)
        offset = 0
        for (c_out, c_in), w in zip(layers, ws):
            assert w.shape == (c_out, c_in, k, k) and w.is_contiguous()
            n = c_in // Ni
            for ob in range(c_out // No):
                for ib in range(n):
                    block = w[ob * No:(ob + 1) * No, ib * Ni:(ib + 1) * Ni]
                    assert rel_err(block, tiles[offset + ob * n + ib]) <= 1e-12, (backend, ob, ib)
            offset += (c_out // No) * n


@pytest.mark.parametrize("bias", [True, False])
def test_torch_backend_matches_reference(bias):
    inputs = make_inputs(**{**ODD, "E": 1 + 4 + 3}, bias=bias)
    layers = [(7, 5), (14, 10), (7, 15)]
    _compare("torch", inputs, torch.float64, ODD["k"], layers)
    _compare("torch", make_inputs(**ODD, bias=bias), torch.float32, ODD["k"])


# --- the fused Triton kernels -------------------------------------------------------------------

@needs_triton
@pytest.mark.parametrize("bias", [True, False])
def test_triton_fp32_tile_stack_odd_sizes(fused, bias):
    _compare("triton", make_inputs(**ODD, bias=bias), torch.float32, ODD["k"], guard_inputs=True)
    fused.alloc.check()
    assert fused.launched == ["static_gen_fwd_kernel", "static_gen_bwd_rows_kernel",
                              "static_gen_bwd_weights_kernel"]


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
def test_triton_fp32_layer_list_odd_block(fused, bias):
    """Several layers of an odd 7x5 block, 40 tiles: more than one tile group and column block."""
    layers = [(7, 5), (14, 10), (21, 15), (7, 15)]  # 1 + 4 + 9 + 3 tiles ... plus (7, 5) x 23 below
    layers += [(7, 5)] * 23
    E = sum((o // 7) * (i // 5) for o, i in layers)
    assert E == 40
    outs = _compare("triton", make_inputs(**{**ODD, "E": E}, bias=bias), torch.float32, ODD["k"], layers,
                    guard_inputs=True)
    fused.alloc.check()
    assert fused.launched[0] == "static_gen_fwd_kernel" and len(fused.launched) == 3
    # every layer is a view of the one buffer the single forward launch wrote
    base = outs[0].untyped_storage().data_ptr()
    assert all(o.untyped_storage().data_ptr() == base for o in outs)


@needs_triton
def test_triton_fp16_forward_and_grads(fused):
    layers = [(7, 5), (14, 10)]
    _compare("triton", make_inputs(**{**ODD, "E": 5}), torch.float16, ODD["k"], layers, guard_inputs=True)
    fused.alloc.check()


@needs_triton
def test_triton_backward_flat_guarded(fused):
    """Direct call of both directions with every input (including the flat gradient) guarded."""
    layers = [(14, 5), (7, 10)]
    inputs = [guarded(t.float().to(DEVICE)) for t in make_inputs(**{**ODD, "E": 4})]
    plan = make_plan(check_inputs(*inputs, ODD["k"]), layers)
    flat = fused.forward_flat(*inputs, plan)
    dout = guarded(torch.randn(plan.numel, generator=torch.Generator().manual_seed(3)).to(DEVICE))
    grads = fused.backward_flat(dout, *inputs, plan)
    fused.alloc.check()
    leaves = [t.detach().double().requires_grad_() for t in inputs]
    ref = naive.static_gen(*leaves, plan)
    ref_flat = torch.cat([w.reshape(-1) for w in ref])
    assert rel_err(flat, ref_flat) <= TOL_HERE[torch.float32]
    ref_flat.backward(dout.double())
    for g, leaf in zip(grads, leaves):
        assert rel_err(g, leaf.grad) <= TOL_HERE[torch.float32]


@needs_triton
def test_triton_wrn40_1_layer_list_one_launch(fused):
    """WRN-40-1's 36 hyper layers (242 tiles, Nz = d = 64): forward and every gradient, one launch."""
    layers = wrn_hyper_layer_shapes(40, 1)
    inputs = make_inputs(E=242, Nz=64, d=64, Ni=16, No=16, k=3)
    outs = _compare("triton", inputs, torch.float32, 3, layers)
    assert len(outs) == 36 and [tuple(o.shape[:2]) for o in outs] == layers
    assert fused.launched.count("static_gen_fwd_kernel") == 1
    assert fused.launched == ["static_gen_fwd_kernel", "static_gen_bwd_rows_kernel",
                              "static_gen_bwd_weights_kernel"]
    fused.alloc.check()
    base = outs[0].untyped_storage().data_ptr()
    assert all(o.untyped_storage().data_ptr() == base and o.is_contiguous() for o in outs)


@needs_triton
def test_triton_gradcheck_tiny():
    """torch.autograd.gradcheck (float64) through the Triton kernels: full mode on a two-layer list
    of one-channel blocks, fast mode on a larger odd case."""
    g = torch.Generator().manual_seed(7)
    rnd = lambda *s: torch.randn(s, generator=g, dtype=torch.float64).to(DEVICE).requires_grad_()  # noqa: E731
    Nz, d, k = 2, 2, 2
    args = [rnd(3, Nz), rnd(1, d, Nz), rnd(1, d), rnd(1 * k * k, d), rnd(1 * k * k)]  # N_in = N_out = 1
    assert torch.autograd.gradcheck(
        lambda *a: static_kernel_gen_layers(*a, kernel_size=k, layer_shapes=[(1, 1), (1, 2)], backend="triton"),
        args)
    args = [t.to(DEVICE).requires_grad_() for t in make_inputs(**{**ODD, "E": 5})]
    assert torch.autograd.gradcheck(
        lambda *a: static_kernel_gen_layers(*a, kernel_size=3, layer_shapes=[(7, 5), (14, 10)], backend="triton"),
        args, fast_mode=True)


@needs_triton
def test_triton_backward_is_bitwise_repeatable():
    inputs = [t.float().to(DEVICE).requires_grad_() for t in make_inputs(**{**ODD, "E": 5})]
    layers = [(7, 5), (14, 10)]
    grads = []
    for _ in range(2):
        for t in inputs:
            t.grad = None
        ws = static_kernel_gen_layers(*inputs, kernel_size=3, layer_shapes=layers, backend="triton")
        torch.autograd.backward(ws, [torch.full_like(w, 0.5) + w.detach() for w in ws])
        grads.append([t.grad.clone() for t in inputs])
    for a, b in zip(*grads):
        assert torch.equal(a, b)


# --- dispatch and input validation --------------------------------------------------------------

def test_auto_backend_on_cpu_is_torch():
    assert op.resolve_backend("auto", torch.device("cpu")) == "torch"
    with pytest.raises(ValueError, match="backend must be one of"):
        op.resolve_backend("cuda-magic", torch.device("cpu"))


def test_import_hyperkern_does_not_import_triton():
    import subprocess
    import sys

    code = ("import sys, torch, hyperkern\n"
            "w = hyperkern.StaticHyperNetwork([(16, 16)], z_dim=4)()\n"
            "assert 'triton' not in sys.modules, 'triton was imported'\n")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         env={k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"})
    assert res.returncode == 0, res.stderr


@pytest.mark.parametrize("mutate, exc, match", [
    (lambda a: a.__setitem__(0, a[0][:, :2]), ValueError, "w_in must be"),
    (lambda a: a.__setitem__(0, a[0][0]), ValueError, "z must be"),
    (lambda a: a.__setitem__(2, a[2][:, :2]), ValueError, "b_in must be"),
    (lambda a: a.__setitem__(3, a[3][:-1]), ValueError, "w_out must be"),
    (lambda a: a.__setitem__(4, a[4][:-1]), ValueError, "b_out must be"),
    (lambda a: a.__setitem__(3, a[3].float()), TypeError, "w_out has dtype"),
    (lambda a: a.__setitem__(1, a[1].long()), TypeError, "w_in must be float"),
    (lambda a: a.__setitem__(4, [1.0]), TypeError, "b_out must be a torch.Tensor"),
])
def test_bad_inputs_raise_naming_the_argument(mutate, exc, match):
    args = make_inputs(**ODD)
    mutate(args)
    with pytest.raises(exc, match=match):
        static_kernel_gen(*args, kernel_size=3, backend="torch")


def test_bad_layer_shapes_and_kernel_size():
    args = make_inputs(**ODD)  # E = 3 tiles of 7x5
    with pytest.raises(ValueError, match="multiple of N_out"):
        static_kernel_gen_layers(*args, kernel_size=3, layer_shapes=[(8, 5)], backend="torch")
    with pytest.raises(ValueError, match="need 2 tiles"):
        static_kernel_gen_layers(*args, kernel_size=3, layer_shapes=[(14, 5)], backend="torch")
    with pytest.raises(TypeError, match="layer_shapes"):
        static_kernel_gen_layers(*args, kernel_size=3, layer_shapes=[7, 5], backend="torch")
    with pytest.raises(ValueError, match="kernel_size"):
        static_kernel_gen(*args, kernel_size=0, backend="torch")
    with pytest.raises(ValueError, match="w_out must be"):
        static_kernel_gen(*args, kernel_size=2, backend="torch")  # 63 rows are not N_out * 4


@needs_triton
def test_triton_rejects_what_it_cannot_run(monkeypatch):
    args = make_inputs(E=2, Nz=3, d=129, Ni=2, No=2, k=3)
    with pytest.raises(ValueError, match="d = w_in.shape"):
        static_kernel_gen(*[t.float() for t in args], kernel_size=3, backend="triton")
    if not CUDA:
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(ValueError, match="needs CUDA tensors"):
            static_kernel_gen(*[t.float() for t in make_inputs(**ODD)], kernel_size=3, backend="triton")


@needs_triton
@pytest.mark.parametrize("bias", [True, False])
def test_triton_custom_op_opcheck(bias):
    """torch.library.opcheck of hyperkern::static_gen_triton: schema, fake implementation (the flat
    size from the plan's ints), autograd registration and AOT dispatch — with and without biases."""
    g = torch.Generator().manual_seed(11)
    r = lambda *s: torch.randn(*s, generator=g).to(DEVICE).requires_grad_()  # noqa: E731
    args = (r(5, 3), r(5, 6, 3), r(5, 6) if bias else None, r(7 * 9, 6), r(7 * 9) if bias else None, 3, [7, 5, 14, 10])
    torch.library.opcheck(torch.ops.hyperkern.static_gen_triton.default, args)
