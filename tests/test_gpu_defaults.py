"""GPU defaults that hold without a GPU (issue 18, item 5), checked on CPU under the interpreter:

- the device guard (``hyperkern.ops.launches.device_guard``) is entered at every Triton op's entry
  and every Triton launch happens inside it (HyperLSTM forward and backward, the persistent
  forward, static generation forward and backward); on CPU tensors it is a no-op, but it is called;
- the op is capturable by PyTorch's own mechanisms: with ``lengths`` None, a training call of
  ``HyperLSTM(backend="triton")`` reads nothing back to the host inside the op (no ``.item()``,
  ``.tolist()``, ``.cpu()``, ``.numpy()``, ``bool()``/``int()``/``float()`` of a tensor, no
  ``torch.cuda.synchronize``), forward or backward;
- the persistent forward reads its error flag exactly once per call, by design (it is opt-in,
  explicit only), and its backward reads nothing.

(The bound launcher's Triton version check and its stream: ``tests/test_step_launch.py``.)
"""
import os
import sys
from collections import Counter

import pytest
import torch

import hyperkern
from hyperkern import HyperLSTM
from hyperkern.ops import launches
from hyperkern.testing import randomize_

from conftest import record_launches

_HERE = os.path.dirname(os.path.abspath(__file__))
_PKG = os.path.join(os.path.dirname(_HERE), "hyperkern")
_FUSED = os.path.join(_PKG, "ops", "hyper_lstm", "fused_triton") + os.sep
_OP_FILES = (_FUSED, os.path.join(_PKG, "ops", "launches.py"))


def _jit_kernels(*modules):
    import triton

    return [v for m in modules for v in vars(m).values() if isinstance(v, triton.runtime.jit.KernelInterface) and hasattr(v, "run")]


def _hyper_kernels():
    from hyperkern.kernels import hyper_lstm_bwd, hyper_lstm_fwd, hyper_lstm_persistent

    return _jit_kernels(hyper_lstm_fwd, hyper_lstm_bwd, hyper_lstm_persistent)


def _layer(backend="triton", **kw):
    layer = HyperLSTM(3, 7, hyper_size=5, embed_size=2, backend=backend, **kw)
    randomize_(layer, torch.Generator().manual_seed(90))
    return layer


def _x(T=3, B=2):
    return torch.randn(T, B, 3, generator=torch.Generator().manual_seed(91)).requires_grad_()


class _GuardWatch:
    """``launches.device_guard`` wrapped: counts its entries (with the device of the tensors it
    was given) and how deep the calling thread is inside it when a kernel launches."""

    def __init__(self, monkeypatch, kernels):
        self.entries, self.depth, self.unguarded = [], 0, []
        real = launches.device_guard

        class _Counted:
            def __init__(s, tensors):
                s.inner = real(*tensors)

            def __enter__(s):
                self.depth += 1
                return s.inner.__enter__()

            def __exit__(s, *exc):
                self.depth -= 1
                return s.inner.__exit__(*exc)

        def guard(*tensors):
            self.entries.append((sys._getframe(1).f_code.co_name, tensors[0].device))
            return _Counted(tensors)

        monkeypatch.setattr(launches, "device_guard", guard)
        self.launches = record_launches(monkeypatch, kernels, record=lambda name, kw: self._launched(name))

    def _launched(self, name):
        if self.depth < 1:
            self.unguarded.append(name)
        return name


def test_every_hyper_lstm_launch_runs_inside_the_device_guard(monkeypatch):
    """Forward and backward of the per-step kernels, and the persistent forward: each op entry
    enters the guard once with its tensors' device, and no launch happens outside it."""
    watch = _GuardWatch(monkeypatch, _hyper_kernels())
    layer = _layer()
    out, _ = layer(_x())
    assert watch.entries == [("run_sequence_op", torch.device("cpu"))] and len(watch.launches) == 6
    out.sum().backward()
    assert [e[0] for e in watch.entries] == ["run_sequence_op", "hyper_lstm_triton_backward_op"]
    assert len(watch.launches) == 12 and watch.unguarded == []

    watch.entries.clear()
    layer.backend = "triton_persistent"
    out, _ = layer(_x())
    out.sum().backward()
    assert [e[0] for e in watch.entries] == ["run_sequence_op", "hyper_lstm_triton_backward_op"]
    assert "hyper_lstm_persistent_kernel" in watch.launches and watch.unguarded == []


def test_every_static_generation_launch_runs_inside_the_device_guard(monkeypatch):
    from hyperkern.kernels import static_gen

    watch = _GuardWatch(monkeypatch, _jit_kernels(static_gen))
    g = torch.Generator().manual_seed(92)
    E, n_z, n_in, d, n_out, k = 3, 4, 2, 5, 2, 3
    z, w_in, b_in = (torch.randn(*s, generator=g).requires_grad_() for s in ((E, n_z), (n_in, d, n_z), (n_in, d)))
    w_out, b_out = (torch.randn(*s, generator=g).requires_grad_() for s in ((n_out * k * k, d), (n_out * k * k,)))
    out = hyperkern.static_kernel_gen(z, w_in, b_in, w_out, b_out, kernel_size=k, backend="triton")
    out.square().sum().backward()
    assert [e[0] for e in watch.entries] == ["static_gen_triton_op", "static_gen_triton_backward_op"]
    assert len(watch.launches) == 3 and watch.unguarded == []
    assert z.grad is not None and w_out.grad is not None


def test_the_guard_is_a_no_op_on_cpu_and_enters_the_tensors_cuda_device(monkeypatch):
    import contextlib

    assert isinstance(launches.device_guard(torch.zeros(1)), contextlib.nullcontext)
    assert isinstance(launches.device_guard(None, 3), contextlib.nullcontext)
    entered = []
    monkeypatch.setattr(torch.cuda, "device", lambda dev: entered.append(dev) or contextlib.nullcontext())

    class _OnCuda1(torch.Tensor):  # a CPU tensor that says it is on cuda:1 (no GPU here)
        @property
        def device(self):
            return torch.device("cuda", 1)

    with launches.device_guard(torch.zeros(1), torch.zeros(2).as_subclass(_OnCuda1)):
        pass
    assert entered == [torch.device("cuda", 1)]


# --- no host read inside the op when lengths is None ------------------------------------------

_READS = ("item", "tolist", "cpu", "numpy", "__bool__", "__int__", "__float__")
# Reads allowed inside the op, each a host tensor built from a Python number, never a device
# tensor: dropout.keep_scale rounds 1 / (1 - p) to fp32 through a CPU scalar tensor.
_HOST_SCALARS = {"keep_scale"}


class _HostReads:
    """Every host read of a tensor (the methods in :data:`_READS`, ``torch.cuda.synchronize``)
    made while ``active``, as ``(what, file:line of the caller, inside the op)``. Reads made by
    Triton's interpreter are not counted (it runs the kernels on the host: a GPU launch does not
    read); a read counts as inside the op when the call stack passes through ``fused_triton/`` or
    ``ops/launches.py``."""

    def __init__(self, monkeypatch):
        self.active, self.reads = False, []
        for name in _READS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))
        monkeypatch.setattr(torch.cuda, "synchronize", self._wrap("synchronize", lambda *a, **k: None))

    def _wrap(self, name, real):
        def read(*args, **kwargs):
            if self.active:
                self._record(name)
            return real(*args, **kwargs)
        return read

    def _record(self, name):
        frame, files, caller = sys._getframe(2), [], None
        while frame is not None:
            files.append(frame.f_code.co_filename)
            if caller is None and not frame.f_code.co_filename.startswith(os.path.dirname(torch.__file__)):
                caller = frame
            frame = frame.f_back
        if any(os.sep + "triton" + os.sep in f for f in files):
            return
        if caller is not None and caller.f_code.co_name in _HOST_SCALARS:
            return
        where = f"{os.path.basename(caller.f_code.co_filename)}:{caller.f_lineno} ({caller.f_code.co_name})" \
            if caller is not None else "?"
        self.reads.append((name, where, any(f.startswith(_OP_FILES) for f in files)))

    def __enter__(self):
        self.active = True
        return self

    def __exit__(self, *exc):
        self.active = False

    def inside_op(self):
        return [r for r in self.reads if r[2]]


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_no_host_read_inside_the_op_without_lengths(monkeypatch, recompute):
    """A training call (2 layers, bidirectional, seeded recurrent dropout) forward and backward:
    nothing inside the op reads a tensor back to the host, so ``torch.cuda.graph``,
    ``make_graphed_callables`` and ``torch.compile(mode="reduce-overhead")`` can capture it."""
    layer = _layer(num_layers=2, bidirectional=True, recurrent_dropout=0.3, recompute=recompute)
    x = _x()
    reads = _HostReads(monkeypatch)
    with reads:
        out, state = layer(x)
    assert reads.inside_op() == [], reads.inside_op()
    loss = out.square().sum() + state.c.sum()
    with reads:
        loss.backward()
    assert reads.inside_op() == [], reads.inside_op()
    assert x.grad is not None and all(p.grad is not None for p in layer.parameters())


def test_no_host_read_in_the_whole_layer_call_without_lengths(monkeypatch):
    """The same for the whole module call (what ``make_graphed_callables`` captures): the layer's
    own code around the op reads nothing either when ``lengths`` is None."""
    layer = _layer(num_layers=2, bidirectional=True)
    x = _x()
    with _HostReads(monkeypatch) as reads:
        out, _ = layer(x)
        out.sum().backward()
    assert reads.reads == [], reads.reads


def test_lengths_are_read_before_the_loop_as_documented(monkeypatch):
    """The counter sees host reads: with ``lengths`` the validation reads min and max once (a
    caller capturing the op passes lengths None, or validates them itself)."""
    layer = _layer()
    with _HostReads(monkeypatch) as reads:
        layer(_x(), lengths=torch.tensor([3, 2]))
    assert reads.inside_op(), "the counter missed the lengths validation's host read"


def test_the_persistent_forward_reads_its_error_flag_once_per_call(monkeypatch):
    """backend="triton_persistent" (opt-in, explicit only; docs/persistent.md): its forward reads
    the kernel's error flag once per call (a device sync, so the layer never captures it); its
    backward, the per-step BPTT, reads nothing."""
    layer = _layer(backend="triton_persistent")
    reads = _HostReads(monkeypatch)
    for _ in range(2):
        with reads:
            out, _ = layer(_x())
        loss = out.sum()
        with reads:
            loss.backward()
    assert Counter((what, where.split(" ")[1]) for what, where, inside in reads.reads) == \
        Counter({("item", "(run_sequence)"): 2}), reads.reads
