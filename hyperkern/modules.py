"""``HyperLSTMCell`` and ``HyperLSTM``: thin modules over the dispatched HyperLSTM op.

The modules own the parameters (names, shapes and initialisation per SPEC §1), validate input,
and handle what is the same for every backend: stacking, directions, variable length,
inter-layer dropout and recurrent-dropout masks. The maths lives in ``hyperkern.ops.hyper_lstm``.
"""
from __future__ import annotations

import numbers
import warnings
from typing import List, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from .ops import hyper_lstm as op
from .ops.precision import autocast_dtype
from .ops.hyper_lstm.common import NUM_SCALED_PATHS, CellConfig, HyperLSTMState, Masks, check_state
from .ops.hyper_lstm.dropout import DropoutSeed


class _BackendAttr:
    """``backend``: a constructor argument and a settable attribute, validated when set."""

    @property
    def backend(self) -> str:
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        op.REGISTRY.check_name(name)
        self._backend = name


def _cell_setting(name: str, allow_none: bool, doc: str, default: Optional[bool] = False) -> property:
    """A settable, validated True/False (or None) attribute; on :class:`HyperLSTM` setting it sets
    every cell."""
    private = "_" + name

    def get(self):
        return getattr(self, private, default)

    def set(self, value):
        if not (isinstance(value, bool) or (allow_none and value is None)):
            raise ValueError(f"{name} must be {'None, ' if allow_none else ''}True or False, got {value!r}")
        setattr(self, private, value)
        for cell in getattr(self, "cells", ()):
            setattr(cell, name, value)
    return property(get, set, doc=doc)


_SEEDED_DOC = ("How training-mode recurrent dropout is drawn. None (default): from a seed on the Triton backends "
               "(the kernels draw each step's masks, none is kept), as Bernoulli mask tensors on the others (faster "
               "on CPU). True: from a seed on every backend (the same torch.manual_seed gives every backend "
               "identical masks). False: always mask tensors.")
_RECOMPUTE_DOC = ("Training memory (the Triton backend): keep only every step's state between forward and "
                  "backward and recompute the rest there (2 more launches per step; bitwise the same gradients). "
                  "Default False. The other backends ignore it.")
_CUDA_GRAPHS_DOC = ("Opt-in, not yet verified on a GPU (the Triton backend): replay each whole forward and backward "
                    "call from a CUDA graph of the layer's own cache, captured the second time a call with the same "
                    "shapes, dtype, flags and parameters is seen (skipped inside an outer graph capture and while "
                    "torch.compile traces; cache bounds: hyperkern.set_cuda_graph_cache). Default False: the eager "
                    "loop, 2 launches per step, which torch.compile(mode='reduce-overhead') and "
                    "torch.cuda.make_graphed_callables can capture. The other backends ignore it.")


class HyperLSTMCell(_BackendAttr, nn.Module):
    """One HyperLSTM cell (SPEC §1), with ``nn.LSTMCell``'s signature:
    ``HyperLSTMCell(input_size, hidden_size, bias=True, device=None, dtype=None, *, hyper_size=128,
    embed_size=4, ...)``; every HyperLSTM-specific argument is keyword-only.

    ``forward(input, hx=None) -> (h, state)`` runs one step. ``input`` is ``[B, input_size]`` (or
    ``[input_size]`` unbatched); ``hx`` is a :class:`HyperLSTMState` ``(h, c, h_hat, c_hat)``, or
    ``nn.LSTMCell``'s ``(h_0, c_0)`` (the hyper state then starts at zeros), or None (zeros).
    Unlike ``nn.LSTMCell`` it returns ``(h, state)``: the new state has four fields, and feeding
    it back (``cell(x, state)``) carries the hyper state too.

    ``seeded_dropout``, ``recompute`` and ``cuda_graphs``: settable attributes (also constructor
    arguments), see their docs (:data:`_SEEDED_DOC`, :data:`_RECOMPUTE_DOC`, :data:`_CUDA_GRAPHS_DOC`).
    """

    seeded_dropout = _cell_setting("seeded_dropout", True, _SEEDED_DOC, default=None)
    recompute = _cell_setting("recompute", False, _RECOMPUTE_DOC)
    cuda_graphs = _cell_setting("cuda_graphs", False, _CUDA_GRAPHS_DOC)

    def __init__(self, input_size: int, hidden_size: int, bias: bool = True, device=None, dtype=None, *,
                 hyper_size: int = 128, embed_size: int = 4, layer_norm: bool = True, forget_bias: float = 1.0,
                 ln_eps: float = 1e-3, recurrent_dropout: float = 0.0, init: str = "supercell",
                 backend: str = "auto", seeded_dropout: Optional[bool] = None, recompute: bool = False,
                 cuda_graphs: bool = False):
        super().__init__()
        for name, v in (("input_size", input_size), ("hidden_size", hidden_size),
                        ("hyper_size", hyper_size), ("embed_size", embed_size)):
            _check_size(name, v)
        _check_bias(bias, "HyperLSTMCell(input_size, hidden_size, bias, device, dtype, *, hyper_size=..., embed_size=...)")
        if not 0.0 <= recurrent_dropout < 1.0:
            raise ValueError(f"recurrent_dropout must be in [0, 1), got {recurrent_dropout!r}")
        self.cfg = CellConfig(input_size, hidden_size, hyper_size, embed_size, bool(layer_norm),
                              float(forget_bias), float(ln_eps))
        self.recurrent_dropout = float(recurrent_dropout)
        self.backend = backend
        self.seeded_dropout, self.recompute, self.cuda_graphs = seeded_dropout, recompute, cuda_graphs
        factory = {"device": device, "dtype": dtype}
        for name, shape in self.cfg.param_shapes().items():
            setattr(self, name, nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters(init)

    @classmethod
    def from_config(cls, cfg: CellConfig, **kwargs) -> "HyperLSTMCell":
        """A cell of ``cfg``'s sizes and settings (``kwargs``: the other constructor arguments)."""
        return cls(cfg.input_size, cfg.hidden_size, hyper_size=cfg.hyper_size, embed_size=cfg.embed_size,
                   layer_norm=cfg.layer_norm, forget_bias=cfg.forget_bias, ln_eps=cfg.ln_eps, **kwargs)

    # --- SPEC §1 initialisation ------------------------------------------------------------
    @torch.no_grad()
    def reset_parameters(self, init: str = "supercell") -> None:
        if init != "supercell":
            raise ValueError(f"init must be 'supercell', got {init!r}")
        H, Hh, E = self.cfg.hidden_size, self.cfg.hyper_size, self.cfg.embed_size
        nn.init.xavier_uniform_(self.weight_ih)
        nn.init.xavier_uniform_(self.hyper_weight_ih)
        for w, n in ((self.weight_hh, H), (self.hyper_weight_hh, Hh)):
            for y in range(4):
                nn.init.orthogonal_(w[y * n:(y + 1) * n])
        self.bias.zero_()
        self.hyper_bias.zero_()
        self.z_weight.zero_()
        self.z_weight[NUM_SCALED_PATHS * E:].normal_(0.0, 0.01)  # bias path only
        self.z_bias.fill_(1.0)
        self.d_weight[:NUM_SCALED_PATHS].fill_(0.1 / E)  # x- and h-paths: d = 0.1 exactly at init
        self.d_weight[NUM_SCALED_PATHS:].zero_()  # bias path: beta = 0 at init
        if self.cfg.layer_norm:
            for name in ("ln_weight", "ln_cell_weight", "hyper_ln_weight", "hyper_ln_cell_weight"):
                getattr(self, name).fill_(1.0)
            for name in ("ln_bias", "ln_cell_bias", "hyper_ln_bias", "hyper_ln_cell_bias"):
                getattr(self, name).zero_()

    def params(self) -> dict:
        return {name: getattr(self, name) for name in self.cfg.param_names()}

    @property
    def input_size(self) -> int:
        return self.cfg.input_size

    @property
    def hidden_size(self) -> int:
        return self.cfg.hidden_size

    @property
    def hyper_size(self) -> int:
        return self.cfg.hyper_size

    def extra_repr(self) -> str:
        c = self.cfg
        return (f"{c.input_size}, {c.hidden_size}, hyper_size={c.hyper_size}, embed_size={c.embed_size}, "
                f"layer_norm={c.layer_norm}, forget_bias={c.forget_bias}, ln_eps={c.ln_eps}, "
                f"recurrent_dropout={self.recurrent_dropout}, backend={self.backend!r}")

    def dropout_masks(self, T: int, B: int, like: Tensor, backend: str = "torch") -> Masks:
        """Recurrent dropout for T steps, or None when it is off: a fresh :class:`DropoutSeed` or
        inverted Bernoulli mask tensors (see ``seeded_dropout``). Both come from torch's generator
        of ``like``'s device, so ``torch.manual_seed`` reproduces them."""
        p = self.recurrent_dropout
        if not (self.training and p > 0):
            return None
        seeded = backend in op.TRITON_BACKENDS if self.seeded_dropout is None else self.seeded_dropout
        if seeded:
            return DropoutSeed.draw(p, like.device)
        keep = 1.0 - p
        def draw(n):
            return torch.empty(T, B, n, device=like.device, dtype=like.dtype).bernoulli_(keep).div_(keep)
        return draw(self.cfg.hidden_size), draw(self.cfg.hyper_size)

    def run(self, x: Tensor, state, lengths=None, backend: Optional[str] = None):
        """Run over ``x [T, B, X]`` in time order (the op's calling convention, no validation).
        The backend is resolved for the dtype the call computes in (:func:`_compute_dtype`)."""
        name = op.resolve_backend(backend or self.backend, x.device, _compute_dtype(x, self.weight_ih),
                                  torch.is_grad_enabled(), embed_size=self.cfg.embed_size)
        masks = self.dropout_masks(x.shape[0], x.shape[1], x, name)
        return op.get_backend(name)(x, tuple(state), self.params(), self.cfg, lengths, masks, recompute=self.recompute,
                                    cuda_graphs=self.cuda_graphs)

    def forward(self, input: Tensor, hx=None) -> Tuple[Tensor, HyperLSTMState]:
        _check_tensor("input", input, self.weight_ih)
        if input.dim() not in (1, 2):
            raise ValueError(f"input must be [batch, input_size] or [input_size], got shape {tuple(input.shape)}")
        unbatched = input.dim() == 1
        x = input.unsqueeze(0) if unbatched else input
        _check_features("input", x, self.cfg.input_size)
        state = _initial_state(hx, x, self.cfg, (), unbatched, "HyperLSTMCell")
        _, new = self.run(x.unsqueeze(0), state)
        new = HyperLSTMState(*(s.squeeze(0) for s in new)) if unbatched else HyperLSTMState(*new)
        return new.h, new


class HyperLSTM(_BackendAttr, nn.Module):
    """A stack of HyperLSTM cells with ``nn.LSTM``'s signature:
    ``HyperLSTM(input_size, hidden_size, num_layers=1, bias=True, batch_first=False, dropout=0.0,
    bidirectional=False, proj_size=0, device=None, dtype=None, *, hyper_size=128, embed_size=4, ...)``;
    every HyperLSTM-specific argument is keyword-only. ``bias=False`` and ``proj_size > 0`` raise
    ``ValueError`` (SPEC's cell always has its biases and no projection).

    ``forward(input, hx=None, *, lengths=None) -> (output, state)``:

    - ``input``: ``[T, B, input_size]`` (``[B, T, input_size]`` with ``batch_first``), an
      unbatched ``[T, input_size]``, or a ``PackedSequence`` (the output is then packed too).
    - ``hx``: a :class:`HyperLSTMState` ``(h, c, h_hat, c_hat)`` (a plain 4-tuple is accepted),
      each ``[num_layers * num_directions, B, hidden_size or hyper_size]``; or ``nn.LSTM``'s
      ``(h_0, c_0)``, each ``[num_layers * num_directions, B, hidden_size]``, and the hyper state
      starts at zeros; or None (zeros).
    - ``lengths``: optional ``[B]`` valid lengths for a padded ``input`` (an alternative to packing).
    - ``output``: ``[T, B, num_directions * hidden_size]``; zero past each sequence's end.
    - ``state``: a :class:`HyperLSTMState` of four fields, so ``out, (h, c) = rnn(x)`` does not
      unpack: write ``out, state = rnn(x)`` and read ``state.h``, ``state.c`` (``h_n``, ``c_n``).

    Inside ``torch.autocast`` it computes as ``nn.LSTM`` does there: on CUDA in the autocast dtype
    (16-bit operands, fp32 accumulation and state; output in that dtype), on CPU in the parameters'
    dtype whatever the input's (output in the parameters' dtype) — :func:`~.ops.precision.autocast_dtype`.

    ``seeded_dropout``, ``recompute`` and ``cuda_graphs`` (keyword arguments and attributes;
    setting one sets every cell): see :class:`HyperLSTMCell`.
    """

    seeded_dropout = _cell_setting("seeded_dropout", True, _SEEDED_DOC, default=None)
    recompute = _cell_setting("recompute", False, _RECOMPUTE_DOC)
    cuda_graphs = _cell_setting("cuda_graphs", False, _CUDA_GRAPHS_DOC)

    def __init__(self, input_size: int, hidden_size: int, num_layers: int = 1, bias: bool = True,
                 batch_first: bool = False, dropout: float = 0.0, bidirectional: bool = False, proj_size: int = 0,
                 device=None, dtype=None, *, hyper_size: int = 128, embed_size: int = 4, layer_norm: bool = True,
                 forget_bias: float = 1.0, ln_eps: float = 1e-3, recurrent_dropout: float = 0.0,
                 backend: str = "auto", seeded_dropout: Optional[bool] = None, recompute: bool = False,
                 cuda_graphs: bool = False):
        super().__init__()
        _check_size("num_layers", num_layers)
        _check_bias(bias, "HyperLSTM(input_size, hidden_size, num_layers, bias, batch_first, dropout, bidirectional, "
                          "proj_size, device, dtype, *, hyper_size=..., embed_size=...)")
        if not isinstance(proj_size, int) or isinstance(proj_size, bool) or proj_size < 0:
            raise ValueError(f"proj_size must be a non-negative int, got {proj_size!r}")
        if proj_size > 0:
            raise ValueError(f"proj_size={proj_size} is not supported: a HyperLSTM has no output projection "
                             "(SPEC §1); use proj_size=0 and a separate nn.Linear on the output")
        if not isinstance(dropout, numbers.Number) or isinstance(dropout, bool) or not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be a number in [0, 1], got {dropout!r}")
        if dropout > 0 and num_layers == 1:
            warnings.warn("dropout option adds dropout after all but last recurrent layer, so non-zero dropout "
                          f"expects num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                          stacklevel=2)
        self.input_size, self.hidden_size, self.hyper_size = input_size, hidden_size, hyper_size
        self.embed_size, self.num_layers = embed_size, num_layers
        self.bias, self.proj_size = True, 0
        self.batch_first, self.dropout, self.bidirectional = bool(batch_first), float(dropout), bool(bidirectional)
        self.num_directions = 2 if bidirectional else 1
        self.backend = backend
        cells = []
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else hidden_size * self.num_directions
            for _ in range(self.num_directions):
                cells.append(HyperLSTMCell(layer_in, hidden_size, device=device, dtype=dtype, hyper_size=hyper_size,
                                           embed_size=embed_size, layer_norm=layer_norm, forget_bias=forget_bias,
                                           ln_eps=ln_eps, recurrent_dropout=recurrent_dropout,
                                           seeded_dropout=seeded_dropout, recompute=recompute,
                                           cuda_graphs=cuda_graphs))
        self.cells = nn.ModuleList(cells)  # layer-major, then direction (forward, reverse)
        self.seeded_dropout, self.recompute, self.cuda_graphs = seeded_dropout, recompute, cuda_graphs

    def flatten_parameters(self) -> None:
        """A no-op, for code written for ``nn.LSTM`` (``DataParallel`` replicas call it too): the
        parameters live per cell and are never flattened."""

    def extra_repr(self) -> str:
        return (f"{self.input_size}, {self.hidden_size}, hyper_size={self.hyper_size}, "
                f"embed_size={self.embed_size}, num_layers={self.num_layers}, batch_first={self.batch_first}, "
                f"dropout={self.dropout}, bidirectional={self.bidirectional}, backend={self.backend!r}")

    def forward(self, input: Union[Tensor, PackedSequence], hx=None, *,
                lengths: Optional[Union[Tensor, Sequence[int]]] = None):
        ref = self.cells[0].weight_ih
        packed = isinstance(input, PackedSequence)
        unbatched = False
        if packed:
            if lengths is not None:
                raise ValueError("lengths must not be given with a PackedSequence input (it carries its own)")
            _check_tensor("input", input.data, ref)
            x, lengths = pad_packed_sequence(input)  # [T, B, X], original batch order
            order = input.sorted_indices
        else:
            _check_tensor("input", input, ref)
            if input.dim() == 2:
                unbatched, x = True, input.unsqueeze(1)
            elif input.dim() == 3:
                x = input.transpose(0, 1) if self.batch_first else input
            else:
                raise ValueError(f"input must be [T, B, input_size]{' (batch_first: [B, T, input_size])' if self.batch_first else ''}"
                                 f" or unbatched [T, input_size], got shape {tuple(input.shape)}")
            order = None
        T, B = x.shape[0], x.shape[1]
        if T == 0 or B == 0:
            raise ValueError(f"input must have at least one step and one sequence, got T={T}, B={B}")
        _check_features("input", x, self.input_size)
        if lengths is not None:
            lengths = _check_lengths(lengths, B, T)
            if order is None:
                order = torch.argsort(lengths, descending=True, stable=True)
            lengths = lengths[order]
            if bool((lengths == T).all()):
                lengths = None  # every sequence is full: the fixed-length path
        L = self.num_layers * self.num_directions
        state = _initial_state(hx, x, self.cells[0].cfg, (L,), unbatched, "HyperLSTM")
        if order is not None:
            dev_order = order.to(x.device)
            x = x.index_select(1, dev_order)
            state = [s.index_select(1, dev_order) for s in state]

        finals: List[Tuple[Tensor, ...]] = []
        layer_in = x
        rev_index = _reverse_index(lengths, T, B, x.device) if self.bidirectional else None
        for layer in range(self.num_layers):
            outs = []
            for direction in range(self.num_directions):
                k = layer * self.num_directions + direction
                s0 = tuple(s[k] for s in state)
                if direction == 0:
                    out, sT = self.cells[k].run(layer_in, s0, lengths, self.backend)
                else:
                    out, sT = self.cells[k].run(_reverse(layer_in, rev_index), s0, lengths, self.backend)
                    out = _reverse(out, rev_index)
                outs.append(out)
                finals.append(sT)
            layer_in = outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_in = nn.functional.dropout(layer_in, self.dropout, training=True)
        output = layer_in
        final = [torch.stack([f[i] for f in finals]) for i in range(4)]

        if order is not None:
            inverse = torch.empty_like(order)
            inverse[order] = torch.arange(B, device=order.device)
            final = [s.index_select(1, inverse.to(x.device)) for s in final]
        if packed:
            full = lengths if lengths is not None else torch.full((B,), T, dtype=torch.int64)
            data = pack_padded_sequence(output, full, enforce_sorted=True).data
            output = PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices)
        else:
            if order is not None:
                output = output.index_select(1, inverse.to(x.device))
            if unbatched:
                output, final = output.squeeze(1), [s.squeeze(1) for s in final]
            elif self.batch_first:
                output = output.transpose(0, 1)
        return output, HyperLSTMState(*final)


# --- helpers shared by the two modules -------------------------------------------------------

def _state_sizes(cfg: CellConfig):
    return (cfg.hidden_size, cfg.hidden_size, cfg.hyper_size, cfg.hyper_size)


def _check_size(name: str, v) -> None:
    """A size argument: an int (TypeError otherwise, as nn.LSTM) and positive (ValueError)."""
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"{name} should be of type int, got: {type(v).__name__} ({v!r})")
    if v < 1:
        raise ValueError(f"{name} must be a positive int, got {v!r}")


def _check_bias(bias, signature: str) -> None:
    if not isinstance(bias, bool):  # most likely an old positional hyper_size / embed_size
        raise TypeError(f"bias must be True or False, got {bias!r}; the signature is {signature} "
                        "(the HyperLSTM-specific arguments are keyword-only)")
    if not bias:
        raise ValueError("bias=False is not supported: SPEC's cell always has its biases (bias, hyper_bias, "
                         "z_bias); pass bias=True")


def _compute_dtype(x: Tensor, ref: Tensor) -> torch.dtype:
    """The dtype a call computes in: the parameters' (= the input's, outside autocast), or the
    autocast policy's (:func:`~.ops.precision.autocast_dtype`)."""
    return autocast_dtype(x.device.type, ref.dtype) or ref.dtype


def _check_tensor(name: str, t, ref: Tensor) -> None:
    """A tensor on the parameters' device, in their dtype — or, inside ``torch.autocast`` for that
    device, any floating dtype (the op casts it by the autocast policy)."""
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the parameters' device {ref.device}, got {t.device}")
    if t.dtype != ref.dtype and not (t.is_floating_point() and torch.is_autocast_enabled(t.device.type)):
        raise TypeError(f"{name} must have the parameters' dtype {ref.dtype}, got {t.dtype} "
                        f"(convert the input, call .to({t.dtype}) on the module, or run inside torch.autocast)")


def _initial_state(hx, x: Tensor, cfg: CellConfig, lead: Tuple[int, ...], unbatched: bool, who: str) -> List[Tensor]:
    """``hx`` as the four initial state tensors ``[*lead, B, n]`` (``x``: the batched input, ``[..., B, X]``).

    ``hx`` may be None (zeros), a :class:`HyperLSTMState` or 4-tuple ``(h, c, h_hat, c_hat)``, or
    ``nn.LSTM``'s ``(h_0, c_0)`` (the hyper state starts at zeros); unbatched calls take them
    without the batch dimension. Outside autocast they must have the input's dtype."""
    B = x.shape[-2]
    sizes = _state_sizes(cfg)
    if hx is None:
        return [x.new_zeros(*lead, B, n) for n in sizes]
    if not isinstance(hx, (tuple, list)) or len(hx) not in (2, 4):
        raise TypeError(f"hx must be None, nn.LSTM's (h_0, c_0), or a HyperLSTMState (h, c, h_hat, c_hat), "
                        f"got {type(hx).__name__}{f' of length {len(hx)}' if isinstance(hx, (tuple, list)) else ''}")
    if len(hx) == 2 and isinstance(hx[1], tuple):
        raise TypeError(f"hx must be None, (h_0, c_0) or a HyperLSTMState, got (Tensor, {type(hx[1]).__name__}): "
                        f"{who} returns (output, state) with a 4-field state; pass that state back as hx")
    names = HyperLSTMState._fields[:len(hx)]
    want = [(*lead, n) if unbatched else (*lead, B, n) for n in sizes[:len(hx)]]
    dtype = None if torch.is_autocast_enabled(x.device.type) else x.dtype
    given = list(check_state(hx, want, x.device, "hx", dtype, names))
    if unbatched:
        given = [s.unsqueeze(len(lead)) for s in given]
    return given + [x.new_zeros(*lead, B, n) for n in sizes[len(hx):]]


def _check_features(name: str, x: Tensor, size: int) -> None:
    if x.shape[-1] != size:
        raise ValueError(f"{name} must have {size} features (input_size) in its last dimension, "
                         f"got shape {tuple(x.shape)}")
    if x.shape[-2] == 0:
        raise ValueError(f"{name} has an empty batch (shape {tuple(x.shape)}); need at least one sequence")


def _check_lengths(lengths, B: int, T: int) -> Tensor:
    lengths = torch.as_tensor(lengths).to("cpu")
    if lengths.dtype.is_floating_point or lengths.dtype == torch.bool or lengths.dim() != 1:
        raise TypeError(f"lengths must be a 1-D integer tensor or sequence of {B} ints, got "
                        f"dtype {lengths.dtype} and shape {tuple(lengths.shape)}")
    if lengths.numel() != B:
        raise ValueError(f"lengths must have one entry per sequence ({B}), got {lengths.numel()}")
    if bool((lengths < 1).any()) or bool((lengths > T).any()):
        raise ValueError(f"lengths must lie in [1, {T}] (T = input's time dimension), got {lengths.tolist()}")
    return lengths.to(torch.int64)


def _reverse_index(lengths: Optional[Tensor], T: int, B: int, device) -> Optional[Tensor]:
    """Index [T, B] that reverses each sequence within its own length (an involution)."""
    if lengths is None:
        return None
    t = torch.arange(T).unsqueeze(1)
    idx = torch.where(t < lengths, lengths - 1 - t, t)
    return idx.to(device)


def _reverse(x: Tensor, index: Optional[Tensor]) -> Tensor:
    if index is None:
        return x.flip(0)
    return x.gather(0, index.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
