"""HyperLSTM as a drop-in for nn.LSTM: the usage patterns of ordinary nn.LSTM code (issue 18).

Each test runs the same pattern with ``torch.nn.LSTM`` and with ``hyperkern.HyperLSTM`` side by
side: what nn.LSTM accepts, HyperLSTM accepts with the same shapes, or refuses with the clear
error the README names (``bias=False``, ``proj_size``, double backward, ``out, (h, c) = rnn(x)``).
The patterns come from PyTorch's own examples (word-level language model with
``repackage_hidden``, seq2seq encoder/decoder, a classifier on ``h_n[-1]``) and from code written
for nn.LSTM (``flatten_parameters``, ``hx=``, autocast, DataParallel).
"""
import copy
import io
import os
import pickle
import subprocess
import sys
import threading
import warnings

import pytest
import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import hyperkern
from hyperkern import HyperLSTM, HyperLSTMCell, HyperLSTMState
from hyperkern.ops import precision
from hyperkern.testing import randomize_

X, H, Hh, E, T, B = 5, 7, 4, 3, 6, 3
SMALL = dict(hyper_size=Hh, embed_size=E)


def pair(*args, **kwargs):
    """(nn.LSTM, HyperLSTM) built from the same nn.LSTM arguments (HyperLSTM: small hyper sizes,
    non-initial parameters)."""
    torch.manual_seed(0)
    ref = nn.LSTM(*args, **kwargs)
    hyp = randomize_(HyperLSTM(*args, **kwargs, **SMALL), torch.Generator().manual_seed(1))
    return ref, hyp


def _reference_twin(model: HyperLSTM) -> HyperLSTM:
    """The same layer on the float64 reference backend (same parameters)."""
    twin = copy.deepcopy(model).double()
    twin.backend = "reference"
    return twin


# --- construction: nn.LSTM's signature ------------------------------------------------------------

def test_positional_arguments_are_nn_lstms():
    ref, hyp = pair(X, H, 2, True, True, 0.0, True)  # input, hidden, num_layers, bias, batch_first, dropout, bidir
    assert (hyp.num_layers, hyp.batch_first, hyp.bidirectional) == (ref.num_layers, ref.batch_first, ref.bidirectional)
    assert len(hyp.cells) == 4 and hyp.hyper_size == Hh
    x = torch.randn(B, T, X)
    (o1, (h1, c1)), (o2, s2) = ref(x), hyp(x)
    assert o1.shape == o2.shape and h1.shape == s2.h.shape and c1.shape == s2.c.shape


def test_hyper_arguments_are_keyword_only_and_old_positional_calls_fail_loudly():
    with pytest.raises(TypeError, match="bias must be True or False.*keyword-only"):
        HyperLSTM(X, H, 4, 2)  # the old order (input, hidden, hyper_size, embed_size)
    with pytest.raises(TypeError, match="bias must be True or False.*keyword-only"):
        HyperLSTMCell(X, H, 4, 2)
    with pytest.raises(TypeError, match="num_layers"):
        HyperLSTM(X, H, 2.0)
    with pytest.raises(TypeError, match="hidden_size"):
        nn.LSTM(X, 7.0)
    with pytest.raises(TypeError, match="hidden_size"):
        HyperLSTM(X, 7.0)


def test_bias_false_and_proj_size_raise_clear_errors():
    nn.LSTM(X, H, bias=False)
    nn.LSTM(X, H, proj_size=3)  # nn.LSTM has both; SPEC's cell has neither
    with pytest.raises(ValueError, match="bias=False is not supported"):
        HyperLSTM(X, H, bias=False)
    with pytest.raises(ValueError, match="bias=False is not supported"):
        HyperLSTMCell(X, H, bias=False)
    with pytest.raises(ValueError, match="proj_size=3 is not supported"):
        HyperLSTM(X, H, proj_size=3)
    with pytest.raises(ValueError, match="proj_size"):
        HyperLSTM(X, H, proj_size=-1)


def test_dropout_with_one_layer_warns_like_nn_lstm():
    for make in (lambda: nn.LSTM(X, H, dropout=0.5), lambda: HyperLSTM(X, H, dropout=0.5, **SMALL)):
        with pytest.warns(UserWarning, match="num_layers greater than 1"):
            make()


def test_nn_lstm_attributes_and_flatten_parameters():
    ref, hyp = pair(X, H, num_layers=2)
    for name in ("input_size", "hidden_size", "num_layers", "bias", "batch_first", "dropout", "bidirectional",
                 "proj_size"):
        assert getattr(hyp, name) == getattr(ref, name), name
    assert ref.flatten_parameters() is None and hyp.flatten_parameters() is None


def test_cuda_graph_cache_is_opt_in():
    """Not verified on a GPU yet: the layer's own graph cache is off unless asked for."""
    assert HyperLSTM(X, H, **SMALL).cuda_graphs is False
    assert HyperLSTMCell(X, H, **SMALL).cuda_graphs is False
    assert HyperLSTM(X, H, cuda_graphs=True, **SMALL).cells[0].cuda_graphs is True


# --- forward: hx, (h0, c0) and the state ---------------------------------------------------------

@pytest.mark.parametrize("kw", [dict(), dict(batch_first=True), dict(num_layers=2, bidirectional=True),
                                dict(num_layers=2, dropout=0.3)], ids=["plain", "batch_first", "2-layer-bidir",
                                                                       "dropout"])
def test_shapes_match_nn_lstm(kw):
    ref, hyp = pair(X, H, **kw)
    x = torch.randn(B, T, X) if kw.get("batch_first") else torch.randn(T, B, X)
    (o1, (h1, c1)), (o2, s2) = ref(x), hyp(x)
    assert o1.shape == o2.shape and h1.shape == s2.h.shape and c1.shape == s2.c.shape
    # unbatched
    xu = x[0] if kw.get("batch_first") else x[:, 0]
    (o1, (h1, c1)), (o2, s2) = ref(xu), hyp(xu)
    assert o1.shape == o2.shape and h1.shape == s2.h.shape and c1.shape == s2.c.shape


def test_hx_keyword_and_state_carried():
    ref, hyp = pair(X, H, num_layers=2)
    x = torch.randn(T, B, X)
    _, st = ref(x)
    ref(x, hx=st)
    full, _ = hyp(torch.cat([x, x]))
    _, s1 = hyp(x)
    second, _ = hyp(x, hx=s1)
    torch.testing.assert_close(second, full[T:], rtol=0, atol=1e-6)
    assert isinstance(s1, HyperLSTMState) and s1.h_hat.shape == (2, B, Hh)


def test_h0_c0_from_an_nn_lstm_encoder_starts_the_hyper_state_at_zeros():
    ref, hyp = pair(X, H, num_layers=2)
    src, tgt = torch.randn(T, B, X), torch.randn(T - 2, B, X)
    _, (h, c) = ref(src)  # nn.LSTM encoder ...
    out, state = hyp(tgt, (h, c))  # ... HyperLSTM decoder
    zeros = torch.zeros(2, B, Hh)
    want, wstate = hyp(tgt, HyperLSTMState(h, c, zeros, zeros))
    assert torch.equal(out, want) and all(torch.equal(a, b) for a, b in zip(state, wstate))
    # and the other way round: a HyperLSTM encoder's (h, c) starts an nn.LSTM decoder
    _, s = hyp(src)
    ref(tgt, (s.h, s.c))
    # unbatched (h0, c0): [num_layers, hidden]
    o_u, s_u = hyp(tgt[:, 0], (h[:, 0], c[:, 0]))
    assert o_u.shape == (T - 2, H) and s_u.h_hat.shape == (2, Hh)
    torch.testing.assert_close(o_u, out[:, 0], rtol=0, atol=1e-6)


def test_state_does_not_unpack_as_h_c_but_reads_like_it():
    ref, hyp = pair(X, H)
    x = torch.randn(T, B, X)
    out, (h_n, c_n) = ref(x)
    with pytest.raises(ValueError, match="too many values to unpack"):
        out, (h_n, c_n) = hyp(x)
    out, state = hyp(x)
    out2, (h_n, c_n, _, _) = hyp(x)
    assert torch.equal(state.h, h_n) and torch.equal(state.c, c_n) and torch.equal(out, out2)


@pytest.mark.parametrize("hx, exc, words", [
    (lambda: (torch.zeros(1, B, H),), TypeError, "hx must be None"),
    (lambda: torch.zeros(1, B, H), TypeError, "hx must be None"),
    (lambda: (torch.zeros(1, B, H), torch.zeros(1, B + 1, H)), ValueError, "hx.c must have shape"),
    (lambda: (torch.zeros(1, B, H, dtype=torch.float64), torch.zeros(1, B, H)), TypeError, "hx.h must have dtype"),
])
def test_bad_hx_names_the_field(hx, exc, words):
    _, hyp = pair(X, H)
    with pytest.raises(exc, match=words):
        hyp(torch.randn(T, B, X), hx())


def test_lengths_is_keyword_only():
    _, hyp = pair(X, H)
    x = torch.randn(T, B, X)
    with pytest.raises(TypeError):
        hyp(x, None, [T, 2, 1])
    out, _ = hyp(x, lengths=[T, 2, 1])
    assert torch.all(out[2:, 2] == 0)


def test_cell_like_nn_lstm_cell():
    torch.manual_seed(0)
    ref, hyp = nn.LSTMCell(X, H), randomize_(HyperLSTMCell(X, H, **SMALL), torch.Generator().manual_seed(1))
    xs = torch.randn(T, B, X)
    hx, cx = torch.zeros(B, H), torch.zeros(B, H)
    state = None
    for t in range(T):  # nn.LSTMCell: hx, cx = cell(x, (hx, cx)); HyperLSTMCell: h, state = cell(x, state)
        hx, cx = ref(xs[t], (hx, cx))
        h, state = hyp(xs[t], state)
    assert h.shape == hx.shape and torch.equal(h, state.h)
    h2, _ = hyp(xs[0], (hx, cx))  # nn.LSTMCell's (h, c) starts it too
    zeros = torch.zeros(B, Hh)
    assert torch.equal(h2, hyp(xs[0], HyperLSTMState(hx, cx, zeros, zeros))[0])
    with pytest.raises(TypeError, match="pass that state back"):
        hyp(xs[0], (h, state))  # nn.LSTMCell's loop written literally: hx, cx = cell(x, (hx, cx))
    whole = HyperLSTM(X, H, **SMALL)  # the layer over the sequence equals the cell step by step
    with torch.no_grad():
        whole.cells[0].load_state_dict(hyp.state_dict())
        out, _ = whole(xs)
        s, hs = None, []
        for t in range(T):
            h, s = hyp(xs[t], s)
            hs.append(h)
    torch.testing.assert_close(torch.stack(hs), out, rtol=0, atol=1e-6)


# --- real nn.LSTM programs -----------------------------------------------------------------------

class WordLM(nn.Module):
    """PyTorch's examples/word_language_model RNNModel (LSTM), with the recurrent layer swappable."""

    def __init__(self, rnn_cls, ntoken=11, ninp=X, nhid=H, nlayers=2, dropout=0.2, **kw):
        super().__init__()
        self.drop = nn.Dropout(dropout)
        self.encoder = nn.Embedding(ntoken, ninp)
        self.rnn = rnn_cls(ninp, nhid, nlayers, dropout=dropout, **kw)
        self.decoder = nn.Linear(nhid, ntoken)
        self.nlayers, self.nhid = nlayers, nhid

    def forward(self, input, hidden):
        emb = self.drop(self.encoder(input))
        output, hidden = self.rnn(emb, hidden)
        return self.decoder(self.drop(output)), hidden

    def init_hidden(self, bsz):
        weight = next(self.parameters())
        return (weight.new_zeros(self.nlayers, bsz, self.nhid), weight.new_zeros(self.nlayers, bsz, self.nhid))


def repackage_hidden(h):
    """Wraps hidden states in new Tensors, to detach them from their history (the example's own)."""
    if isinstance(h, torch.Tensor):
        return h.detach()
    return tuple(repackage_hidden(v) for v in h)


@pytest.mark.parametrize("rnn_cls, kw", [(nn.LSTM, {}), (HyperLSTM, SMALL)], ids=["nn.LSTM", "HyperLSTM"])
def test_word_language_model_with_repackage_hidden(rnn_cls, kw):
    torch.manual_seed(0)
    model = WordLM(rnn_cls, **kw)
    data = (torch.arange(40).unsqueeze(1) * torch.tensor([3, 5])) % 11  # predictable next tokens
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    hidden = model.init_hidden(2)  # nn.LSTM's (h0, c0)
    losses = []
    for epoch in range(4):
        hidden = model.init_hidden(2)
        for i in range(0, data.size(0) - 1, 8):
            inp, tgt = data[i:i + 8], data[i + 1:i + 9]
            hidden = repackage_hidden(hidden)  # a HyperLSTM's 4-field state detaches the same way
            model.zero_grad()
            out, hidden = model(inp[:len(tgt)], hidden)
            loss = nn.functional.cross_entropy(out.view(-1, 11), tgt.reshape(-1))
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 0.25)
            opt.step()
            losses.append(loss.item())
    assert all(h.grad_fn is None for h in repackage_hidden(hidden))
    per_epoch = len(losses) // 4
    assert sum(losses[-per_epoch:]) < sum(losses[:per_epoch])  # it learns


@pytest.mark.parametrize("rnn_cls, kw", [(nn.LSTM, {}), (HyperLSTM, SMALL)], ids=["nn.LSTM", "HyperLSTM"])
def test_seq2seq_encoder_decoder(rnn_cls, kw):
    """An nn.LSTM-style encoder/decoder: the encoder's final (h, c) starts the decoder."""
    torch.manual_seed(0)
    enc = rnn_cls(X, H, 2, batch_first=True, **kw)
    dec = rnn_cls(X, H, 2, batch_first=True, **kw)
    src, tgt = torch.randn(B, T, X), torch.randn(B, T - 1, X)
    _, enc_state = enc(src)
    h, c = enc_state[0], enc_state[1]  # works for (h_n, c_n) and for a HyperLSTMState
    out, _ = dec(tgt, (h, c))
    out.sum().backward()
    assert out.shape == (B, T - 1, H)
    assert all(p.grad is not None for p in enc.parameters())


@pytest.mark.parametrize("rnn_cls, kw", [(nn.LSTM, {}), (HyperLSTM, SMALL)], ids=["nn.LSTM", "HyperLSTM"])
def test_classifier_on_last_hidden_state(rnn_cls, kw):
    torch.manual_seed(0)
    rnn = rnn_cls(X, H, 2, batch_first=True, bidirectional=True, **kw)
    head = nn.Linear(2 * H, 4)
    x = torch.randn(B, T, X)
    _, state = rnn(x)
    h_n = state[0]  # nn.LSTM: (h_n, c_n)[0]; HyperLSTM: state.h
    feats = torch.cat([h_n[-2], h_n[-1]], dim=1)  # last layer, forward and reverse
    logits = head(feats)
    nn.functional.cross_entropy(logits, torch.tensor([0, 1, 3])).backward()
    assert logits.shape == (B, 4) and h_n.shape == (4, B, H)


@pytest.mark.parametrize("rnn_cls, kw", [(nn.LSTM, {}), (HyperLSTM, SMALL)], ids=["nn.LSTM", "HyperLSTM"])
def test_packed_sequence_and_data_parallel_wrapper(rnn_cls, kw):
    torch.manual_seed(0)
    rnn = nn.DataParallel(rnn_cls(X, H, **kw))  # on a CPU-only machine it calls the module
    x = torch.randn(T, B, X)
    packed = pack_padded_sequence(x, torch.tensor([T, 2, 4]), enforce_sorted=False)
    out, state = rnn(packed)
    padded, lens = pad_packed_sequence(out)
    assert padded.shape == (T, B, H) and lens.tolist() == [T, 2, 4] and state[0].shape == (1, B, H)


# --- autocast ------------------------------------------------------------------------------------

@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_on_cpu_computes_in_the_parameters_dtype(dtype):
    """With an autocast-produced 16-bit input, nn.LSTM runs and so does HyperLSTM: on CPU it
    computes in the parameters' dtype (fp32: the C++ loop) and returns fp32; gradients reach the
    fp32 parameters and the autocast-side input."""
    torch.manual_seed(0)
    ref, hyp = pair(X, H, num_layers=2)
    lin = nn.Linear(X, X)
    x = torch.randn(T, B, X)
    with torch.autocast("cpu", dtype=dtype):
        ref(lin(x))
        y = lin(x)
        assert y.dtype == dtype
        out, state = hyp(y)
    assert out.dtype == torch.float32 and state.h.dtype == torch.float32
    want, _ = hyp(y.float())  # the same computation outside autocast, on the rounded input
    assert torch.equal(out, want)
    out.square().sum().backward()
    assert lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()
    for p in hyp.parameters():
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_autocast_applies_to_every_backend_and_the_cell():
    torch.manual_seed(0)
    _, hyp = pair(X, H)
    x = torch.randn(T, B, X).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, _ = hyp(x)
        hyp.backend = "reference"
        ref, _ = hyp(x)
        cell = hyp.cells[0]
        h, state = cell(x[0])
        h2, _ = cell(x[0], (state.h.bfloat16(), state.c))  # a state in another dtype is cast too
    tol = precision.tolerance_for("cpu", torch.float32).out
    assert got.dtype == ref.dtype == h.dtype == h2.dtype == torch.float32
    assert (got - ref).abs().max() <= tol * ref.abs().max()
    with pytest.raises(TypeError, match="inside torch.autocast"):  # outside autocast the dtypes must agree
        hyp(x)


def test_autocast_policy_and_its_registration(monkeypatch):
    """The policy (one function) on each device, and its rule registered on every sequence op for
    CPU and CUDA (CUDA itself runs in gpu-check's autocast rows)."""
    for op_name in ("hyper_lstm_torch", "hyper_lstm_triton", "hyper_lstm_triton_persistent"):
        for key in ("AutocastCPU", "AutocastCUDA"):
            assert torch._C._dispatch_has_kernel_for_dispatch_key("hyperkern::" + op_name, key), (op_name, key)
    assert precision.autocast_dtype("cpu", torch.float32) is None  # autocast off: inputs must match
    monkeypatch.setattr(torch, "is_autocast_enabled", lambda device_type=None: True)
    monkeypatch.setattr(torch, "get_autocast_dtype", lambda device_type: torch.float16)
    assert precision.autocast_dtype("cuda", torch.float32) == torch.float16  # CUDA: the autocast dtype
    assert precision.autocast_dtype("cuda", torch.bfloat16) == torch.float16
    assert precision.autocast_dtype("cuda", torch.float64) == torch.float64  # as autocast leaves fp64 alone
    assert precision.autocast_dtype("cpu", torch.float32) == torch.float32  # CPU: the parameters' dtype
    assert precision.autocast_dtype("cpu", torch.float64) == torch.float64


def test_autocast_inside_torch_compile_fullgraph():
    """The autocast rule is registered for the Python dispatcher too: a compiled region traces it."""
    _, hyp = pair(X, H)

    def step(x):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return hyp(x.bfloat16())[0]

    x = torch.randn(T, B, X)
    want = step(x)
    got = torch.compile(step, fullgraph=True, backend="aot_eager")(x)
    assert got.dtype == torch.float32 and torch.equal(got, want)


def test_autocast_with_a_float64_model_computes_in_float64():
    _, hyp = pair(X, H)
    hyp = hyp.double()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, _ = hyp(torch.randn(T, B, X, dtype=torch.bfloat16))
    assert out.dtype == torch.float64


# --- double backward ------------------------------------------------------------------------------

def test_double_backward_names_the_limit_and_the_way_out():
    ref, hyp = pair(X, H)
    x = torch.randn(T, B, X, requires_grad=True)
    g, = torch.autograd.grad(ref(x)[0].square().sum(), x, create_graph=True)
    g.square().sum().backward()  # nn.LSTM on CPU: a gradient penalty works
    x.grad = None
    g, = torch.autograd.grad(hyp(x)[0].square().sum(), x, create_graph=True)  # the first backward works
    with pytest.raises(NotImplementedError, match="double backward.*backend='reference'"):
        g.square().sum().backward()
    assert x.grad is None  # nothing of the double backward was computed
    hyp.backend = "reference"  # the way out the error names
    g, = torch.autograd.grad(hyp(x)[0].square().sum(), x, create_graph=True)
    g.square().sum().backward()
    assert torch.isfinite(x.grad).all()


# --- what already worked and must keep working ---------------------------------------------------

def test_dtype_moves_state_dict_copies_and_inference_mode():
    _, hyp = pair(X, H, num_layers=2)
    x = torch.randn(T, B, X)
    want, _ = hyp(x)
    for clone in (copy.deepcopy(hyp), pickle.loads(pickle.dumps(hyp))):
        assert torch.equal(clone(x)[0], want)
    buf = io.BytesIO()
    torch.save(hyp.state_dict(), buf)
    fresh = HyperLSTM(X, H, 2, **SMALL)
    fresh.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    assert torch.equal(fresh(x)[0], want)
    with torch.inference_mode():
        assert torch.equal(hyp(x)[0], want)
    assert hyp.double()(x.double())[0].dtype == torch.float64
    assert hyp.to(torch.bfloat16)(x.bfloat16())[0].dtype == torch.bfloat16


def test_functional_call_jit_trace_and_export():
    _, hyp = pair(X, H)
    x = torch.randn(T, B, X)
    want, _ = hyp(x)
    params = {k: v.detach().clone() for k, v in hyp.named_parameters()}
    got, _ = torch.func.functional_call(hyp, params, (x,))
    assert torch.equal(got, want)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's own warnings about Python values
        traced = torch.jit.trace(hyp, (x,), check_trace=False)
    assert torch.equal(traced(x)[0], want)
    exported = torch.export.export(hyp, (x,))
    assert torch.equal(exported.module()(x)[0], want)


def test_two_threads_on_one_model():
    _, hyp = pair(X, H)
    xs = [torch.randn(T, B, X) for _ in range(2)]
    want = [hyp(x)[0] for x in xs]
    got = [None, None]

    def work(i):
        for _ in range(5):
            got[i] = hyp(xs[i])[0]

    threads = [threading.Thread(target=work, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(a, b) for a, b in zip(got, want))


_PROCESS_SCRIPT = """
import torch, hyperkern
from hyperkern.testing import randomize_
torch.manual_seed(0)
rnn = randomize_(hyperkern.HyperLSTM(5, 7, 2, hyper_size=4, embed_size=3), torch.Generator().manual_seed(1))
x = torch.randn(6, 3, 5, requires_grad=True)
out, state = rnn(x)
(out.square().sum() + state.c_hat.sum()).backward()
import hashlib
h = hashlib.sha1()
for t in [out, *state, x.grad, *(p.grad for p in rnn.parameters())]:
    h.update(t.detach().contiguous().numpy().tobytes())
print(h.hexdigest())
"""


def test_bitwise_identical_across_processes():
    env = {**os.environ, "OMP_NUM_THREADS": "2"}
    runs = [subprocess.run([sys.executable, "-c", _PROCESS_SCRIPT], capture_output=True, text=True, env=env,
                           timeout=300) for _ in range(2)]
    for r in runs:
        assert r.returncode == 0, r.stderr
    assert runs[0].stdout.split()[-1] == runs[1].stdout.split()[-1]


def test_info_says_whether_the_cpu_loop_is_built(capsys):
    from hyperkern.__main__ import main

    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "C++ loop" in out and ("built for" in out or "did not build" in out or "turned off" in out)
