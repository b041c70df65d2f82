"""Constant launches: within a call, every launch of a per-step kernel carries the same arguments
but the step index ``t`` (the kernels take base pointers and address step t's slices themselves),
so a call binds its launches once (``hyperkern.ops.launches.StepLaunch``).

- recorded through the JIT's launch wrapper in the interpreter, for the forward (inference and
  training), the backward, and the recompute mode (whose backward re-runs the forward kernels);
- :func:`~hyperkern.ops.launches.bind_compiled` (the GPU path after a step's first launch) against
  a stand-in compiled kernel: the argument order, pointers as integers, only ``t`` changing, and
  the fall-backs (a launch hook installed, ``BIND_COMPILED`` off).
"""
import pytest
import torch

from hyperkern.ops import launches
from hyperkern.ops.hyper_lstm import CellConfig
from hyperkern.ops.hyper_lstm.dropout import DropoutSeed
from hyperkern.ops.hyper_lstm.fused_triton import hyper_lstm_sequence

from conftest import cell_params, record_launches, sequence_inputs

FWD_KERNELS = ("hyper_lstm_gates_kernel", "hyper_lstm_cell_kernel")
BWD_KERNELS = ("hyper_lstm_cell_bwd_kernel", "hyper_lstm_gates_bwd_kernel")


def _kernels():
    from hyperkern.kernels import hyper_lstm_bwd as kb
    from hyperkern.kernels import hyper_lstm_fwd as kf

    return (kf.hyper_lstm_gates_kernel, kf.hyper_lstm_cell_kernel, kb.hyper_lstm_cell_bwd_kernel,
            kb.hyper_lstm_gates_bwd_kernel)


def _same(a, b) -> bool:
    """The same launch argument: the same tensor (address, shape, strides, dtype) or an equal value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.data_ptr() == b.data_ptr()
                and a.shape == b.shape and a.stride() == b.stride() and a.dtype == b.dtype)
    return type(a) is type(b) and a == b


def _check_constant(calls, names, ts):
    """Per kernel in ``names``: launched at steps ``ts`` in that order, every other argument
    (grid and launch options included) the same as at the first launch."""
    for name in names:
        kws = [kw for n, kw in calls if n == name]
        assert [kw["t"] for kw in kws] == list(ts), name
        first = kws[0]
        for kw in kws[1:]:
            assert kw.keys() == first.keys()
            changed = [k for k in kw if k != "t" and not _same(kw[k], first[k])]
            assert not changed, f"{name}: {changed} changed between steps"


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_launch_arguments_differ_only_in_t(monkeypatch, recompute):
    """Layer norm, lengths and seeded recurrent dropout: the modes with the most arguments."""
    calls = record_launches(monkeypatch, _kernels())
    cfg = CellConfig(input_size=3, hidden_size=7, hyper_size=5, embed_size=2)
    T, B = 4, 3
    p = {n: v.float().requires_grad_() for n, v in cell_params(cfg, 60).items()}
    x, st, _ = sequence_inputs(cfg, T, B, 61)
    x, st = x.float(), tuple(s.float() for s in st)
    masks = DropoutSeed(torch.tensor([12345], dtype=torch.int64), 0.3)
    lengths = torch.tensor([4, 3, 2])

    with torch.no_grad():  # inference: ping-pong state rings, one scratch
        hyper_lstm_sequence(x, st, p, cfg, lengths, masks, recompute=recompute)
    assert len(calls) == 2 * T
    _check_constant(calls, FWD_KERNELS, range(T))

    calls.clear()  # training forward: every step's state, P, G, Â, z kept
    out, _ = hyper_lstm_sequence(x, st, p, cfg, lengths, masks, recompute=recompute)
    _check_constant(calls, FWD_KERNELS, range(T))

    calls.clear()  # the backward: reverse time; recompute re-runs the forward kernels
    out.sum().backward()
    assert len(calls) == (4 if recompute else 2) * T
    _check_constant(calls, BWD_KERNELS, range(T - 1, -1, -1))
    if recompute:
        _check_constant(calls, FWD_KERNELS, range(T - 1, -1, -1))


# --- bind_compiled: the GPU path, against a stand-in compiled kernel ---------------------------

class _Compiled:
    """What ``bind_compiled`` uses of Triton's CompiledKernel: ``run`` (the launcher), ``function``
    and ``packed_metadata``; records each launch's arguments."""

    def __init__(self):
        self.launches = []
        self.function, self.packed_metadata = "cu-function", "metadata"

    @property
    def run(self):
        return lambda *args: self.launches.append(args)


class _Kernel:
    """A stand-in JIT kernel: ``kernel[grid](**kwargs)`` records the JIT launch, returns a compiled one."""

    arg_names = ["x_ptr", "n", "t", "BLOCK"]

    def __init__(self):
        self.compiled, self.jit_launches = _Compiled(), []

    def __getitem__(self, grid):
        def launch(**kwargs):
            self.jit_launches.append((grid, dict(kwargs)))
            return self.compiled
        return launch


class _Launch:
    """The two things StepLaunch asks of a :class:`~hyperkern.ops.launches.Launch`."""

    def __init__(self, kernel):
        self.kernel = kernel

    def kernel_fn(self):
        return self.kernel

    def kwargs(self, args):
        return dict(args, BLOCK=64, num_warps=4, num_stages=2)


def _step_launch(monkeypatch, stream=7):
    monkeypatch.setattr(launches, "_current_stream", lambda device=None: stream)  # no GPU here
    kernel = _Kernel()
    x = torch.arange(6.0)
    return kernel, x, launches.StepLaunch(_Launch(kernel), (3, 2), dict(x_ptr=x, n=6, t=0))


def test_bound_launches_call_the_compiled_kernel_with_only_t_changing(monkeypatch):
    kernel, x, step = _step_launch(monkeypatch)
    for t in range(4):
        step(t)
    assert len(kernel.jit_launches) == 1  # the first step only
    grid, kw = kernel.jit_launches[0]
    assert grid == (3, 2) and kw["x_ptr"] is x and kw["t"] == 0 and kw["BLOCK"] == 64
    got = kernel.compiled.launches
    assert len(got) == 3
    for t, args in zip((1, 2, 3), got):
        # grid padded to 3-D, the stream, function, metadata, no launch metadata or hooks, then
        # every parameter in signature order: the pointer as an integer, constexprs included
        assert args == (3, 2, 1, 7, "cu-function", "metadata", None, None, None, x.data_ptr(), 6, t, 64)


def test_bound_launches_fall_back_to_the_jit(monkeypatch):
    """With a launch hook installed (a profiler's) or BIND_COMPILED off, every step goes through the JIT."""
    from triton import knobs

    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", lambda *a: None)
    kernel, _, step = _step_launch(monkeypatch)
    for t in range(3):
        step(t)
    assert [kw["t"] for _, kw in kernel.jit_launches] == [0, 1, 2] and kernel.compiled.launches == []

    monkeypatch.setattr(knobs.runtime, "launch_enter_hook", None)
    monkeypatch.setattr(launches, "BIND_COMPILED", False)
    kernel, _, step = _step_launch(monkeypatch)
    for t in range(3):
        step(t)
    assert len(kernel.jit_launches) == 3 and kernel.compiled.launches == []


def test_interpreted_kernels_are_never_bound(monkeypatch):
    """The interpreter's launch returns no compiled kernel: StepLaunch keeps the JIT path (and
    does not try to bind again at every step)."""
    calls = record_launches(monkeypatch, _kernels()[:1])
    cfg = CellConfig(input_size=3, hidden_size=5, hyper_size=4, embed_size=2)
    p = {n: v.float() for n, v in cell_params(cfg, 62).items()}
    x, st, _ = sequence_inputs(cfg, 3, 2, 63)
    with torch.no_grad():
        hyper_lstm_sequence(x.float(), tuple(s.float() for s in st), p, cfg)
    assert [kw["t"] for _, kw in calls] == [0, 1, 2]


# --- the bound launcher only on the Triton versions it was written for -----------------------

@pytest.mark.parametrize("version", ["3.6.0", "3.7.1", "3.8.0", "3.9.0", "3.9.2+git1a2b3c"])
def test_launches_are_bound_on_the_verified_triton_versions(monkeypatch, version):
    from hyperkern.ops import registry

    monkeypatch.setattr(registry, "TRITON_VERSION", version)
    monkeypatch.setattr(launches, "_bound_verdicts", {})
    kernel, _, step = _step_launch(monkeypatch)
    for t in range(3):
        step(t)
    assert len(kernel.jit_launches) == 1 and len(kernel.compiled.launches) == 2


@pytest.mark.parametrize("version", ["3.5.1", "3.10.0", "4.0.0", "", "nightly"])
def test_other_triton_versions_launch_through_the_jit_and_warn_once(monkeypatch, version):
    """``CompiledKernel.run`` is private: its positional order was read from Triton 3.6 and 3.9.
    On any other version (or one that cannot be read) every step goes through the JIT, and one
    warning says why."""
    from hyperkern.ops import registry

    monkeypatch.setattr(registry, "TRITON_VERSION", version)
    monkeypatch.setattr(launches, "_bound_verdicts", {})
    with pytest.warns(RuntimeWarning, match="launches through Triton's JIT") as warned:
        for _ in range(2):  # two calls: one warning
            kernel, _, step = _step_launch(monkeypatch)
            for t in range(3):
                step(t)
            assert [kw["t"] for _, kw in kernel.jit_launches] == [0, 1, 2] and kernel.compiled.launches == []
    assert len(warned) == 1
    assert launches.bound_launch_refusal(version) is not None and not launches.bound_launches_verified()


def test_bound_launches_take_the_stream_of_the_tensors_device(monkeypatch):
    """The stream handed to the compiled launcher is the current stream of the device the
    tensors are on (here a stand-in tensor on cuda:1), not the current device's."""
    asked = []
    monkeypatch.setattr(launches, "_current_stream", lambda device=None: asked.append(device) or 70 + (device or 0))

    class _OnCuda1(torch.Tensor):  # a CPU tensor that says it is on cuda:1 (no GPU here)
        @property
        def device(self):
            return torch.device("cuda", 1)

    kernel = _Kernel()
    x = torch.arange(6.0).as_subclass(_OnCuda1)
    step = launches.StepLaunch(_Launch(kernel), (3, 2), dict(x_ptr=x, n=6, t=0))
    step(0)
    step(1)
    assert asked == [1] and kernel.compiled.launches[0][3] == 71
