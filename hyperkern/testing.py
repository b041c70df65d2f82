"""Helpers for checking fast paths against the reference (used by the tests, ``verify`` and
``gpu-check``)."""
from __future__ import annotations

import math

import torch
from torch import nn


@torch.no_grad()
def randomize_(module: nn.Module, generator: torch.Generator = None, scale: float = 0.3) -> nn.Module:
    """Give every parameter fresh, non-initial random values (never zeros, never the init).

    Layer-norm weights land around 1, d_weight so that the scaling vectors d are O(1) and vary
    per row; everything else ~ N(0, scale²), enough to exercise every term of SPEC §1.
    """
    for name, p in module.named_parameters():
        leaf = name.rsplit(".", 1)[-1]
        noise = torch.randn(p.shape, generator=generator, dtype=torch.float64).to(p)
        if leaf.endswith("ln_weight") or leaf.endswith("ln_cell_weight"):
            p.copy_(1.0 + 0.2 * noise)
        elif leaf == "d_weight":
            E = p.shape[-1]
            p.copy_(noise / E ** 0.5)
        elif leaf == "z_bias":
            p.copy_(1.0 + 0.3 * noise)
        else:
            p.copy_(scale * noise)
    return module


class GuardedAlloc:
    """A stand-in for a launcher's buffer allocation (``static_gen.fused_triton._empty``): each
    buffer is NaN-filled and sits between ``guard`` elements holding a sentinel. :meth:`check`
    then proves every element was written (no NaN left) and nothing outside was (sentinels intact)."""

    SENTINEL = -1000.0  # exact in fp16, bf16, fp32, fp64

    def __init__(self, guard: int = 37):
        self.guard = guard
        self.buffers = []

    def __call__(self, shape, dtype, device):
        n, g = math.prod(shape), self.guard
        buf = torch.full((n + 2 * g,), self.SENTINEL, dtype=dtype, device=device)
        buf[g:g + n] = float("nan")
        self.buffers.append((buf, n))
        return buf[g:g + n].view(shape)

    def problems(self):
        """What went wrong, as sentences (empty: every buffer written exactly in bounds)."""
        if not self.buffers:
            return ["no buffer was allocated through the guarded allocator"]
        out, g = [], self.guard
        for i, (buf, n) in enumerate(self.buffers):
            if not bool((torch.cat([buf[:g], buf[g + n:]]) == self.SENTINEL).all()):
                out.append(f"buffer {i}: write out of bounds")
            if bool(torch.isnan(buf[g:g + n]).any()):
                out.append(f"buffer {i}: element left unwritten (or NaN computed)")
        return out

    def check(self):
        bad = self.problems()
        assert not bad, "; ".join(bad)


def training_step(layer: nn.Module, x: torch.Tensor, lengths, seed: int):
    """One training call of a ``HyperLSTM``: its output, final state and every gradient (the
    input's, then the parameters'), after ``torch.manual_seed(seed)`` (which draws its recurrent
    dropout). Gradients start from nothing; ``x`` is cloned."""
    layer.zero_grad(set_to_none=True)
    x = x.clone().requires_grad_()
    torch.manual_seed(seed)
    out, st = layer(x, lengths=lengths)
    (out.float().square().sum() + st.c.float().sum() + st.h_hat.float().sum()).backward()
    return [out.detach(), *(s.detach() for s in st), x.grad] + [p.grad.clone() for p in layer.parameters()]


class RerunCapture:
    """A stand-in for ``fused_triton.graphs.CudaGraphCapture`` on a machine without a GPU (the
    tests, ``gpu-check --dry-run``). "Capture" runs the call once on static copies of its inputs
    and keeps those outputs; "replay" runs it again on the static inputs and writes the results
    into the same output tensors — what a graph replay does (the same buffers rewritten; whatever
    the call closed over is baked in). So the cache's keys, eviction and skip conditions, and the
    op's data flow through static inputs, run on CPU."""

    def __init__(self):
        self.captures = self.replays = 0

    def supports(self, device):
        return True

    def device_memory(self, device):
        return None  # no byte budget unless one is set

    def capture(self, fn, inputs):
        from hyperkern.ops.hyper_lstm.fused_triton.graphs import Captured

        static = [None if t is None else t.clone() for t in inputs]
        outputs = list(fn(*static))
        self.captures += 1

        def replay():
            self.replays += 1
            for o, n in zip(outputs, fn(*static)):
                o.copy_(n)

        nbytes = sum(t.numel() * t.element_size() for t in [*static, *outputs] if t is not None)
        return Captured(static, outputs, replay, nbytes)
