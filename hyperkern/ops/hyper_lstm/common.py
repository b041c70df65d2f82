"""What every HyperLSTM backend shares: the cell's configuration, its parameter names and the
calling convention of a backend (SPEC §1 is the contract for the maths).

A backend runs ONE cell (one layer, one direction) over a whole sequence:

    out, (h, c, h_hat, c_hat) = backend(x, state, params, cfg, lengths=None, masks=None, *,
                                        recompute=False, cuda_graphs=False)

- ``x``: ``[T, B, X]``, already in processing order (the module reverses sequences for the
  reverse direction, so backends only ever run forward in time).
- ``state``: 4-tuple of ``[B, H]``, ``[B, H]``, ``[B, Hh]``, ``[B, Hh]``.
- ``params``: dict name -> tensor, names from :data:`PARAM_NAMES` (layer-norm ones only when
  ``cfg.layer_norm``).
- ``lengths``: ``None`` (every sequence has T steps) or a CPU int64 tensor ``[B]`` sorted
  non-increasing, each in ``[1, T]``. Past a sequence's end its state is carried unchanged and
  its outputs are zero.
- ``masks``: recurrent dropout (multiplies ``tanh(g)``): ``None``, a pair ``(m_main [T, B, H],
  m_hyper [T, B, Hh])`` already scaled by ``1 / (1 - p)``, or a :class:`~.dropout.DropoutSeed`
  ``(seed, p)`` standing for masks every backend derives identically (:mod:`.dropout`).
- ``recompute``: a training-memory choice. The Triton backend then keeps only every step's state
  and recomputes the rest in the backward (same gradients, bitwise); the other backends ignore it.
- ``cuda_graphs``: opt-in (default False, the eager loop): the Triton backend replays each whole
  call from its own cache of CUDA graphs where it can (``fused_triton.graphs``; not yet verified
  on a GPU). The other backends ignore it.

Returns ``out [T, B, H]`` and the final state (each sequence's state at its own last step).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Dict, NamedTuple, Optional, Tuple, Union

import torch
from torch import Tensor

from hyperkern.kernels.common import NUM_PATHS, NUM_SCALED_PATHS  # noqa: F401  (SPEC's counts, re-exported)

from ..precision import autocast_dtype
from .dropout import DropoutSeed

BASE_PARAM_NAMES = (
    "weight_ih", "weight_hh", "bias",
    "hyper_weight_ih", "hyper_weight_hh", "hyper_bias",
    "z_weight", "z_bias", "d_weight",
)
LN_PARAM_NAMES = (
    "ln_weight", "ln_bias", "ln_cell_weight", "ln_cell_bias",
    "hyper_ln_weight", "hyper_ln_bias", "hyper_ln_cell_weight", "hyper_ln_cell_bias",
)
PARAM_NAMES = BASE_PARAM_NAMES + LN_PARAM_NAMES


class HyperLSTMState(NamedTuple):
    """Recurrent state; in the layer each field is ``[num_layers * num_directions, B, *]``."""

    h: Tensor
    c: Tensor
    h_hat: Tensor
    c_hat: Tensor


@dataclass(frozen=True)
class CellConfig:
    input_size: int
    hidden_size: int
    hyper_size: int = 128
    embed_size: int = 4
    layer_norm: bool = True
    forget_bias: float = 1.0
    ln_eps: float = 1e-3

    def param_names(self) -> Tuple[str, ...]:
        return PARAM_NAMES if self.layer_norm else BASE_PARAM_NAMES

    def param_shapes(self) -> Dict[str, Tuple[int, ...]]:
        X, H, Hh, E = self.input_size, self.hidden_size, self.hyper_size, self.embed_size
        shapes = {
            "weight_ih": (4 * H, X),
            "weight_hh": (4 * H, H),
            "bias": (4 * H,),
            "hyper_weight_ih": (4 * Hh, X + H),
            "hyper_weight_hh": (4 * Hh, Hh),
            "hyper_bias": (4 * Hh,),
            "z_weight": (NUM_PATHS * E, Hh),
            "z_bias": (NUM_SCALED_PATHS * E,),
            "d_weight": (NUM_PATHS, H, E),
            "ln_weight": (4, H),
            "ln_bias": (4, H),
            "ln_cell_weight": (H,),
            "ln_cell_bias": (H,),
            "hyper_ln_weight": (4, Hh),
            "hyper_ln_bias": (4, Hh),
            "hyper_ln_cell_weight": (Hh,),
            "hyper_ln_cell_bias": (Hh,),
        }
        return {name: shapes[name] for name in self.param_names()}

    def num_parameters(self) -> int:
        """SPEC §1 closed form (checked against the modules' real count in the tests)."""
        X, H, Hh, E = self.input_size, self.hidden_size, self.hyper_size, self.embed_size
        n = 4 * Hh * (X + H + Hh) + 4 * Hh + 4 * H * (X + H) + 4 * H
        n += NUM_PATHS * Hh * E + NUM_SCALED_PATHS * E + NUM_PATHS * E * H
        if self.layer_norm:
            n += 10 * Hh + 10 * H
        return n


Lengths = Optional[Tensor]
Masks = Optional[Union[Tuple[Tensor, Tensor], DropoutSeed]]


def cell_config(X: int, H: int, Hh: int, E: int, layer_norm: bool, forget_bias: float, ln_eps: float) -> CellConfig:
    """A :class:`CellConfig` from the scalar arguments of the backends' ``torch.library`` ops."""
    return CellConfig(X, H, Hh, E, bool(layer_norm), float(forget_bias), float(ln_eps))


def needs_grad(x: Tensor, state, params: Dict[str, Tensor]) -> bool:
    """Whether a backend call must keep what its backward needs (grad mode on and any input
    requiring a gradient)."""
    if not torch.is_grad_enabled():
        return False
    return (x.requires_grad or any(isinstance(s, Tensor) and s.requires_grad for s in state)
            or any(isinstance(p, Tensor) and p.requires_grad for p in params.values()))


def fake_sequence_outputs(x: Tensor, H: int, Hh: int):
    """The shapes of a sequence op's first outputs ``[out, h, c, ĥ, ĉ]`` (its ``register_fake``)."""
    T, B = x.shape[:2]
    return [x.new_empty(T, B, H), x.new_empty(B, H), x.new_empty(B, H), x.new_empty(B, Hh), x.new_empty(B, Hh)]


def fake_sequence_grads(x: Tensor, params, H: int, Hh: int):
    """The shapes of a sequence backward op's outputs ``[dx, dh0, dc0, dĥ0, dĉ0] + parameter grads``."""
    return [torch.empty_like(x)] + fake_sequence_outputs(x, H, Hh)[1:] + [torch.empty_like(q) for q in params]


def _register_no_double_backward(backward_op) -> None:
    """The backward op's own autograd formula: a clear error. A first backward with
    ``create_graph=True`` still works; differentiating its result (a gradient penalty, a
    Hessian-vector product) raises before anything of it is computed."""
    qualname = backward_op._qualified_op_name  # "hyperkern::..._backward"
    forward = qualname.removesuffix("_backward")

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"double backward through {forward} is not supported: its backward ({qualname}) is a hand-written "
            "BPTT with no derivative of its own. For higher-order gradients (a gradient penalty, Hessian-vector "
            "products) run the layer with backend='reference' (autograd through the reference; slow)")

    torch.library.register_autograd(qualname, backward, setup_context=setup_context)


def register_sequence_autograd(forward_op, backward_op) -> None:
    """The autograd formula of a backend's sequence op (``hyperkern::hyper_lstm_torch``,
    ``hyperkern::hyper_lstm_triton``): both share one schema — forward ``(x, h0, c0, ĥ0, ĉ0,
    params, lengths, m_main, m_hyper, seed, p_drop, H, Hh, E, layer_norm, forget_bias, ln_eps,
    save, *options)`` returning ``[out, h, c, ĥ, ĉ] + saved``, backward ``(x, params, saved,
    lengths, m_main, m_hyper, seed, p_drop, d_out, dh, dc, dĥ, dĉ, H, Hh, E, layer_norm,
    forget_bias, ln_eps, *options)`` returning ``[dx, dh0, dc0, dĥ0, dĉ0] + parameter gradients``.
    ``options``: scalar arguments of an op's own (the Triton ops' ``cuda_graphs``), passed on."""
    name = str(forward_op)

    def setup_context(ctx, inputs, output):
        x, h0, c0, hh0, ch0, params, lengths, m_main, m_hyper, seed, p_drop, *scalars = inputs
        ctx.scalars, ctx.p_drop = scalars[:6] + scalars[7:], p_drop  # H .. ln_eps, then the options (not ``save``)
        ctx.state_dtypes = [s.dtype for s in (h0, c0, hh0, ch0)]
        ctx.n_params, ctx.n_nondiff = len(params), len(inputs) - 6  # x, the 4 states, params
        optional = (lengths, m_main, m_hyper, seed)
        ctx.present = [t is not None for t in optional]  # only tensors are saved (AOT autograd drops Nones)
        ctx.save_for_backward(x, *(t for t in optional if t is not None), *params, *output[5:])

    def backward(ctx, grads):
        x, *rest = ctx.saved_tensors
        rest = iter(rest)
        lengths, m_main, m_hyper, seed = (next(rest) if present else None for present in ctx.present)
        rest = list(rest)
        params, saved = rest[:ctx.n_params], rest[ctx.n_params:]
        if not saved:
            raise RuntimeError(f"{name} ran with save=False: nothing kept for the backward")
        res = backward_op(x, list(params), list(saved), lengths, m_main, m_hyper, seed, ctx.p_drop, *grads[:5],
                          *ctx.scalars)
        d_state = [g.to(dt) for g, dt in zip(res[1:5], ctx.state_dtypes)]
        return (res[0], *d_state, list(res[5:])) + (None,) * ctx.n_nondiff

    forward_op.register_autograd(backward, setup_context=setup_context)
    _register_no_double_backward(backward_op)


# --- autocast: one policy (``precision.autocast_dtype``) for every backend ----------------------

AUTOCAST_DEVICES = ("cpu", "cuda")
_autocast_libs = []  # the registrations' libraries, kept alive for the process


def _cast_floats(args, dtype: torch.dtype):
    """``args`` with every floating tensor (also inside lists) cast to ``dtype`` (differentiably)."""
    def cast(a):
        if isinstance(a, Tensor) and a.is_floating_point() and a.dtype != dtype:
            return a.to(dtype)
        if isinstance(a, (list, tuple)):
            return [cast(v) for v in a] if isinstance(a, list) else tuple(cast(v) for v in a)
        return a
    return [cast(a) for a in args]


def register_sequence_autocast(qualname: str) -> None:
    """The autocast rule of a sequence op (the schema of :func:`register_sequence_autograd`; the
    parameters are argument 5): inside ``torch.autocast`` every floating input — x, the state,
    the parameters, dropout masks — is cast to :func:`..precision.autocast_dtype` and the op runs
    with autocast off. What ``torch.library.register_autocast`` does, with the dtype chosen per
    call by the policy instead of fixed at registration (CPU: the parameters' dtype; CUDA: the
    autocast dtype). Registered for the Python dispatcher too, so ``torch.compile`` traces it."""
    namespace, name = qualname.split("::")
    overload = getattr(getattr(torch.ops, namespace), name).default
    lib = torch.library.Library(namespace, "IMPL")
    _autocast_libs.append(lib)
    for device_type in AUTOCAST_DEVICES:
        key = "Autocast" + torch._C._dispatch_key_for_device(device_type)

        def rule(*args, _device_type=device_type):
            dtype = autocast_dtype(_device_type, args[5][0].dtype)
            with torch.autocast(_device_type, enabled=False):
                return overload(*(_cast_floats(args, dtype) if dtype is not None else args))

        overload.py_impl(getattr(torch._C.DispatchKey, key))(rule)
        lib.impl(name, lambda _keyset, *args, _rule=rule: _rule(*args), key, with_keyset=True)


def autocast_backend(fn):
    """A backend entry point that is a plain Python function (the reference) under the same
    autocast policy as the custom ops: its inputs cast, its body run with autocast off."""

    @functools.wraps(fn)
    def run(x, state, params, cfg, lengths=None, masks=None, **options):
        dtype = autocast_dtype(x.device.type, next(iter(params.values())).dtype)
        if dtype is None:
            return fn(x, state, params, cfg, lengths, masks, **options)
        x, state, masks = _cast_floats((x, tuple(state), masks), dtype)
        params = dict(zip(params, _cast_floats(params.values(), dtype)))
        with torch.autocast(x.device.type, enabled=False):
            return fn(x, state, params, cfg, lengths, masks, **options)

    return run


def check_state(state, shapes, device, name: str = "state", dtype=None,
                fields: Tuple[str, ...] = HyperLSTMState._fields) -> Tuple[Tensor, ...]:
    """Validate a state tuple (``fields``: by default the 4 of ``(h, c, h_hat, c_hat)``) against
    ``shapes`` (one per field) and ``device`` (and ``dtype``; None: any floating dtype). Raises
    TypeError / ValueError naming the field."""
    if not isinstance(state, (tuple, list)) or len(state) != len(fields):
        raise TypeError(f"{name} must be a HyperLSTMState or a {len(fields)}-tuple ({', '.join(fields)}), "
                        f"got {type(state).__name__}")
    for field, s, shape in zip(fields, state, shapes):
        if not isinstance(s, Tensor):
            raise TypeError(f"{name}.{field} must be a torch.Tensor, got {type(s).__name__}")
        if tuple(s.shape) != tuple(shape):
            raise ValueError(f"{name}.{field} must have shape {tuple(shape)}, got {tuple(s.shape)}")
        if dtype is not None and s.dtype != dtype:
            raise TypeError(f"{name}.{field} must have dtype {dtype}, got {s.dtype}")
        if not s.dtype.is_floating_point:
            raise TypeError(f"{name}.{field} must be floating point, got {s.dtype}")
        if s.device != torch.device(device):
            raise ValueError(f"{name}.{field} must be on device {device}, got {s.device}")
    return tuple(state)
