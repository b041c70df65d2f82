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

import pytest  # noqa: E402
import torch  # noqa: E402

# Tolerances, stated once (see README): relative max-error bounds against a float64 reference.
TOL = {torch.float64: 1e-9, torch.float32: 1e-5, torch.float16: 1e-2}
GRAD_TOL_FP32 = 1e-4


def rel_err(got, want) -> float:
    """max |got - want| / max(max |want|, tiny): one number per tensor, in float64."""
    got, want = got.detach().double(), want.detach().double()
    scale = want.abs().max().clamp_min(1e-30)
    return float((got - want).abs().max() / scale)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(1234)
    yield
