"""The backend registry of both ops: what each backend supports, how "auto" resolves, and why an
explicit choice cannot run. Pure logic: CUDA is simulated where a rule depends on it (no tensor is
created on a GPU), so every rule is checked on any machine."""
from __future__ import annotations

import pytest
import torch

from hyperkern.ops import hyper_lstm as lstm_op
from hyperkern.ops import registry
from hyperkern.ops import static_gen as static_op

F64, F32, F16, BF16 = torch.float64, torch.float32, torch.float16, torch.bfloat16
CUDA, CPU = torch.device("cuda"), torch.device("cpu")


@pytest.fixture
def gpu_machine(monkeypatch):
    """A machine with a CUDA device and Triton (the interpreter off): the registry's view of it."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(registry, "TRITON_VERSION", "3.6.0")
    monkeypatch.setenv("TRITON_INTERPRET", "0")


@pytest.mark.parametrize("training", [False, True], ids=["inference", "training"])
@pytest.mark.parametrize("dtype", [F32, F16, BF16])
def test_auto_is_triton_on_cuda_for_what_the_kernels_take(gpu_machine, dtype, training):
    assert lstm_op.resolve_backend("auto", CUDA, dtype, training, embed_size=4) == "triton"
    assert static_op.resolve_backend("auto", CUDA, dtype, hidden=64) == "triton"


def test_auto_falls_back_to_torch_and_says_why_explicitly(gpu_machine):
    # float64 on CUDA: the HyperLSTM kernels compute in fp32 at most
    assert lstm_op.resolve_backend("auto", CUDA, F64, True, embed_size=4) == "torch"
    with pytest.raises(ValueError, match="float64"):
        lstm_op.resolve_backend("triton", CUDA, F64, True, embed_size=4)
    # an embedding the backward cannot hold in registers
    assert lstm_op.resolve_backend("auto", CUDA, F32, True, embed_size=65) == "torch"
    with pytest.raises(ValueError, match="embed_size up to 64"):
        lstm_op.resolve_backend("triton", CUDA, F32, True, embed_size=65)
    # static generation: float64 runs on its kernels, a hidden size past 128 does not
    assert static_op.resolve_backend("auto", CUDA, F64, hidden=64) == "triton"
    assert static_op.resolve_backend("auto", CUDA, F32, hidden=129) == "torch"
    with pytest.raises(ValueError, match="d = w_in.shape"):
        static_op.resolve_backend("triton", CUDA, F32, hidden=129)


def test_auto_never_picks_the_interpreter(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    monkeypatch.setattr(registry, "TRITON_VERSION", "3.9.0")
    for dt in (F32, F16):
        assert lstm_op.resolve_backend("auto", CPU, dt, True, embed_size=3) == "torch"
        assert static_op.resolve_backend("auto", CPU, dt, hidden=6) == "torch"
    assert lstm_op.resolve_backend("triton", CPU, F32, True, embed_size=3) == "triton"  # explicit: allowed
    with pytest.raises(ValueError, match="bfloat16"):  # the interpreter's bf16 arithmetic is wrong
        lstm_op.resolve_backend("triton", CPU, BF16, True, embed_size=3)


def test_explicit_triton_on_cpu_without_the_interpreter_says_why(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(registry, "TRITON_VERSION", "3.9.0")
    for resolve in (lambda: lstm_op.resolve_backend("triton", CPU, F32),
                    lambda: static_op.resolve_backend("triton", CPU, F32, hidden=8)):
        with pytest.raises(ValueError, match="TRITON_INTERPRET=1"):
            resolve()


def test_without_triton_installed(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(registry, "TRITON_VERSION", "")
    assert lstm_op.resolve_backend("auto", CUDA, F32, True) == "torch"
    ok, why = lstm_op.backend_status("triton")
    assert not ok and "triton package" in why
    with pytest.raises(ValueError, match="triton package"):
        static_op.resolve_backend("triton", CUDA, F32, hidden=8)


def test_no_cuda_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    ok, why = lstm_op.backend_status("triton")
    assert not ok and "CUDA" in why


def test_reference_and_torch_run_everything_and_unknown_names_are_errors():
    for op_ in (lstm_op, static_op):
        for name in ("reference", "torch"):
            for dt in (F64, F32, F16, BF16):
                assert op_.backend_status(name, CPU, dt, True)[0]
        with pytest.raises(ValueError, match="backend must be one of"):
            op_.resolve_backend("cuda-magic", CPU)
        assert op_.REGISTRY.names[:3] == ("reference", "torch", "triton")
        assert op_.REGISTRY.auto_order == ("triton", "torch")
    assert lstm_op.REGISTRY.names == ("reference", "torch", "triton", "triton_persistent")
    assert static_op.REGISTRY.names == ("reference", "torch", "triton")


def test_persistent_backend_is_explicit_only(gpu_machine):
    """``triton_persistent`` runs what ``triton`` runs (devices, dtypes, embed sizes) but ``auto``
    never picks it: no GPU run has measured it yet."""
    for dt in (F32, F16, BF16):
        for training in (True, False):
            assert lstm_op.resolve_backend("triton_persistent", CUDA, dt, training, embed_size=4) == "triton_persistent"
            assert lstm_op.resolve_backend("auto", CUDA, dt, training, embed_size=4) == "triton"
    with pytest.raises(ValueError, match="embed_size up to 64"):
        lstm_op.resolve_backend("triton_persistent", CUDA, F32, True, embed_size=65)
    with pytest.raises(ValueError, match="float64"):
        lstm_op.resolve_backend("triton_persistent", CUDA, F64, True, embed_size=4)


def test_get_backend_is_a_lookup_of_the_registered_function():
    from hyperkern.ops.hyper_lstm import fused_torch, fused_triton, naive

    assert lstm_op.get_backend("reference").__wrapped__ is naive.hyper_lstm_sequence  # under the autocast policy
    assert lstm_op.get_backend("torch") is fused_torch.hyper_lstm_sequence
    assert lstm_op.get_backend("triton") is fused_triton.hyper_lstm_sequence
    assert lstm_op.get_backend("triton_persistent") is fused_triton.persistent.hyper_lstm_sequence
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        lstm_op.get_backend("auto")


def test_module_backend_attribute_is_validated_by_the_registry():
    from hyperkern import HyperLSTM

    rnn = HyperLSTM(3, 5, hyper_size=4, embed_size=2)
    for name in ("auto", "reference", "torch", "triton", "triton_persistent"):
        rnn.backend = name
    with pytest.raises(ValueError, match="backend must be one of"):
        rnn.backend = "cudnn"


def test_a_float64_layer_on_cuda_would_run_on_torch(gpu_machine, monkeypatch):
    """The module asks the registry with its dtype and embed size: a float64 HyperLSTM on CUDA
    resolves to the torch backend instead of raising in the kernels."""
    from hyperkern import HyperLSTMCell

    cell = HyperLSTMCell(3, 5, hyper_size=4, embed_size=2, dtype=F64)
    asked = []
    real = lstm_op.resolve_backend

    def spy(name, device, dtype=None, training=None, **facts):
        asked.append((name, dtype, facts))
        return real(name, CUDA, dtype, training, **facts)  # as if the tensors were on the GPU

    monkeypatch.setattr(lstm_op, "resolve_backend", spy)
    with torch.no_grad():
        cell(torch.randn(2, 3, dtype=F64))
    assert asked == [("auto", F64, {"embed_size": 2})]
    assert real("auto", CUDA, F64, False, embed_size=2) == "torch"
