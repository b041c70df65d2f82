"""Test set-up shared by every test file.

TRITON_INTERPRET is read when ``@triton.jit`` decorates a function, so it is set here, before
any kernel module is imported: on a machine without a GPU the Triton kernels run in the
interpreter (on CPU tensors). TRITON_DEFAULT_FP_FUSION=1 keeps fusion and silences Triton 3.9.
"""
import os

os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
try:
    import torch

    _HAS_CUDA = torch.cuda.is_available()
except Exception:  # pragma: no cover
    _HAS_CUDA = False
if not _HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")
# A fresh Inductor cache per test session: AOTAutograd's on-disk cache does not key on a custom
# op's Python autograd formula, so another checkout's compiled backward could be replayed.
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    import tempfile

    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="hyperkern-tests-inductor-")

import pytest  # noqa: E402
import torch  # noqa: E402

from hyperkern.ops import precision  # noqa: E402

# Tolerances are stated once, in hyperkern.ops.precision (max relative error against a float64
# reference, by device, dtype and dot precision); verify reads the same table.
# The PyTorch backends on CPU: outputs and states ...
TOL = {dt: precision.tolerance_for("cpu", dt).out for dt in (torch.float64, torch.float32, torch.float16)}
GRAD_TOL_FP32 = precision.tolerance_for("cpu", torch.float32).grad  # ... and fp32 gradients


def kernel_tol(dtype) -> "precision.Tolerance":
    """The Triton kernels' tolerance where these tests run them: the interpreter's exact dots on
    CPU, the current dot policy on CUDA (fp32: full-precision dots unless TF32 is switched on)."""
    device = "cuda" if _HAS_CUDA else "cpu"
    return precision.tolerance_for(device, dtype, interpreted=not _HAS_CUDA)


def rel_err(got, want) -> float:
    """max |got - want| / max(max |want|, tiny): one number per tensor, in float64."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield


@pytest.fixture(scope="module")
def one_thread():
    """Tiny shapes gain nothing from threads, and on a shared 2-core machine an oversubscribed
    OpenMP pool makes each small parallel op (native_layer_norm) cost ~1 ms instead of ~5 µs."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def run_compile_check(filters, tmp_path):
    """``python -m hyperkern compile-check --filter F ...`` in a subprocess with the interpreter
    off (the check needs real JITFunctions); asserts exit 0 and returns (rows, stdout)."""
    import json
    import subprocess
    import sys

    out_json = tmp_path / "cc.json"
    cmd = [sys.executable, "-m", "hyperkern", "compile-check"]
    for f in filters:
        cmd += ["--filter", f]
    cmd += ["--json", str(out_json)]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stdout + res.stderr
    return json.loads(out_json.read_text()), res.stdout


def record_launches(monkeypatch, kernels, record=lambda name, kwargs: (name, dict(kwargs))):
    """Every launch of the given ``@triton.jit`` kernels, as ``record(name, keyword arguments)``
    (default: the pair), recorded by wrapping the JIT's ``run`` (every launch reaches it in the
    interpreter)."""
    calls = []
    for fn in kernels:
        def run(*args, _orig=fn.run, _name=fn.__name__, **kw):
            calls.append(record(_name, kw))
            return _orig(*args, **kw)

        monkeypatch.setattr(fn, "run", run)
    return calls


def count_launches(monkeypatch, kernels):
    """The name of every launch of the given kernels."""
    return record_launches(monkeypatch, kernels, record=lambda name, kwargs: name)


@pytest.fixture
def rerun_graphs(monkeypatch):
    """A fresh whole-call graph cache with ``hyperkern.testing.RerunCapture`` (CPU tensors allowed)."""
    from hyperkern.ops.hyper_lstm.fused_triton import graphs
    from hyperkern.testing import RerunCapture

    cache = graphs.GraphCache(capturer=RerunCapture())
    monkeypatch.setattr(graphs, "CACHE", cache)
    return cache


def layer_pair(dtype, backend, device="cpu", seed=0, **kw):
    """(float64 reference ``HyperLSTM`` with fresh random parameters, the same parameters in
    ``dtype`` on ``device`` under ``backend``)."""
    import copy

    from hyperkern import HyperLSTM
    from hyperkern.testing import randomize_

    ref = HyperLSTM(**kw, dtype=torch.float64, backend="reference")
    randomize_(ref, torch.Generator().manual_seed(seed))
    fast = copy.deepcopy(ref).to(device=device, dtype=dtype)
    fast.backend = backend
    return ref, fast


def cell_params(cfg, seed: int):
    """float64 parameters of one cell (fresh random, non-initial), as the functional op takes them."""
    from hyperkern import HyperLSTMCell
    from hyperkern.testing import randomize_

    cell = HyperLSTMCell.from_config(cfg, dtype=torch.float64)
    randomize_(cell, torch.Generator().manual_seed(seed))
    return {n: p.detach() for n, p in cell.params().items()}


def sequence_inputs(cfg, T: int, B: int, seed: int, dropout: float = 0.0, seeded: bool = False):
    """float64 ``x [T, B, X]``, an initial state and (with ``dropout``) recurrent dropout: inverted
    mask tensors, or (``seeded``) a ``DropoutSeed`` that every backend turns into the same masks."""
    from hyperkern.ops.hyper_lstm.dropout import DropoutSeed

    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, cfg.input_size, generator=g, dtype=torch.float64)
    st = tuple(0.5 * torch.randn(B, n, generator=g, dtype=torch.float64)
               for n in (cfg.hidden_size, cfg.hidden_size, cfg.hyper_size, cfg.hyper_size))
    masks = None
    if dropout and seeded:
        masks = DropoutSeed.draw(dropout, "cpu", generator=g)
    elif dropout:
        keep = 1.0 - dropout
        masks = tuple(torch.bernoulli(torch.full((T, B, n), keep, dtype=torch.float64), generator=g) / keep
                      for n in (cfg.hidden_size, cfg.hyper_size))
    return x, st, masks


def masks_to(masks, device, dtype):
    """Recurrent dropout moved to ``device``: mask tensors also cast to ``dtype``; a seed keeps int64."""
    from hyperkern.ops.hyper_lstm.dropout import DropoutSeed

    if masks is None:
        return None
    if isinstance(masks, DropoutSeed):
        return DropoutSeed(masks.seed.to(device), masks.p)
    return tuple(m.to(device, dtype) for m in masks)


MASK_KINDS = ("tensors", "seeded")  # parametrize ids: recurrent dropout as given masks / from a seed


@pytest.fixture(scope="module")
def ext():
    """The built C++ CPU loop (built here once if needed: ~30 s the first time on a machine)."""
    import shutil

    from hyperkern.ops.hyper_lstm import cpu

    if shutil.which("c++") is None and shutil.which("g++") is None:
        pytest.skip("no C++ compiler: the eager loop is what runs here (tested in test_torch_backend.py)")
    ok, why = cpu.status(build=True)
    assert ok, f"the C++ CPU loop did not build: {why}"
    return cpu.load()
