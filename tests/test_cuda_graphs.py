"""Whole-call CUDA graphs (``hyperkern/ops/hyper_lstm/fused_triton/graphs.py``), on CPU: the capture
is the stand-in ``hyperkern.testing.RerunCapture`` (fixture ``rerun_graphs``), which replays a
call by running it again on its static inputs into the same output tensors. The real capture runs
in ``gpu-check`` (bitwise equality with the eager loop, host and device time per step).

- the layer trained through the graphs gives bitwise the eager results, call after call, with
  fresh inputs, lengths and dropout seeds each call (a seed baked into the graph would show);
- the parameters are read in place (an optimizer step is seen; a new parameter is a new key);
- keys: what makes a new graph and what does not; the cache's LRU eviction by count and bytes,
  the "too big" rule, the limits;
- the skip conditions: ``cuda_graphs=False``, a non-CUDA device, an outer capture, compiling;
- the cache is opt-in: ``cuda_graphs=False`` is the default of the layer, the cell and every
  backend entry point (docs/cuda_graphs.md: until ``gpu-check`` shows it beats PyTorch's own
  mechanisms on a GPU).
"""
import inspect

import copy

import pytest
import torch

import hyperkern
from hyperkern import HyperLSTM
from hyperkern.ops.hyper_lstm.fused_triton import graphs
from hyperkern.testing import RerunCapture, randomize_, training_step


def _layer(num_layers=1, **kw):
    kw.setdefault("cuda_graphs", True)  # opt-in
    layer = HyperLSTM(3, 7, hyper_size=5, embed_size=2, num_layers=num_layers, backend="triton", **kw)
    randomize_(layer, torch.Generator().manual_seed(70))
    return layer


def _calls(n: int, T=3, B=3):
    g = torch.Generator().manual_seed(71)
    for i in range(n):
        x = torch.randn(T, B, 3, generator=g)
        lengths = torch.tensor([T, T - 1, 2])[torch.randperm(B, generator=g)]
        yield x, lengths, 100 + i


@pytest.mark.parametrize("recompute", [False, True], ids=["saved", "recompute"])
def test_replays_are_bitwise_the_eager_loop(rerun_graphs, recompute):
    """Three training steps, each with a new input, lengths and dropout seed: calls 1 (eager), 2
    (captured, then replayed) and 3 (replayed) equal the eager loop bitwise, forward and backward."""
    layers = 1 if recompute else 2
    graphed = _layer(num_layers=layers, recurrent_dropout=0.3, recompute=recompute)
    eager = copy.deepcopy(graphed)
    eager.cuda_graphs = False
    results = []
    for x, lengths, seed in _calls(3):
        got, want = training_step(graphed, x, lengths, seed), training_step(eager, x, lengths, seed)
        for g, w in zip(got, want):
            assert torch.equal(g, w)
        results.append(got)
    assert not torch.equal(results[1][0], results[2][0])  # new inputs and seeds did change the outputs
    counts = rerun_graphs.info().counts
    # each layer's forward and backward: first seen eagerly, captured at the second call, then
    # replayed; the eager layer's calls skipped
    n = 2 * layers
    assert counts == {"eager_first": n, "captured": n, "replayed": 2 * n, "skipped_disabled": 3 * n}
    assert rerun_graphs.capturer.replays == 2 * n


def test_dropout_seed_is_an_input_of_the_graph(rerun_graphs):
    """Same input, different seeds: replayed outputs differ as the eager ones do (a seed baked into
    the capture would repeat the captured call's masks)."""
    layer = _layer(recurrent_dropout=0.5)
    x, lengths, _ = next(_calls(1))
    outs = [training_step(layer, x, lengths, seed)[0] for seed in (1, 2, 3)]
    assert rerun_graphs.info().counts["replayed"] == 4  # calls 2 and 3, forward and backward
    assert not torch.equal(outs[1], outs[2])
    eager = copy.deepcopy(layer)
    eager.cuda_graphs = False
    assert torch.equal(training_step(eager, x, lengths, 3)[0], outs[2])


def test_parameters_are_read_in_place(rerun_graphs):
    """An optimizer's in-place update reaches the replays; a new parameter tensor is a new key."""
    layer = _layer()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x, lengths, _ = next(_calls(1))
    for _ in range(3):  # eager, capture, replay
        training_step(layer, x, lengths, 0)
        opt.step()
    eager = copy.deepcopy(layer)
    eager.cuda_graphs = False
    assert torch.equal(training_step(layer, x, lengths, 0)[0], training_step(eager, x, lengths, 0)[0])
    before = rerun_graphs.info().counts
    layer.cells[0].weight_hh = torch.nn.Parameter(layer.cells[0].weight_hh.detach() * 1.5)
    training_step(layer, x, lengths, 0)
    after = rerun_graphs.info().counts
    assert after["eager_first"] == before["eager_first"] + 2  # the forward and the backward: new keys


def test_inference_and_training_are_separate_graphs(rerun_graphs):
    layer = _layer()
    x, _, _ = next(_calls(1))
    with torch.no_grad():
        for _ in range(3):
            want = layer(x)[0]
    layer.cuda_graphs = False
    with torch.no_grad():
        assert torch.equal(layer(x)[0], want)
    assert rerun_graphs.info().counts == {"eager_first": 1, "captured": 1, "replayed": 2, "skipped_disabled": 1}
    layer.cuda_graphs = True
    out, _ = layer(x)  # training forward (save): a new key
    assert rerun_graphs.info().counts["eager_first"] == 2


def test_the_persistent_forward_is_never_captured_its_backward_is(rerun_graphs):
    """backend="triton_persistent": its forward is one launch whose error flag the host reads,
    so it never runs in a graph; its backward is the per-step BPTT and replays like triton's."""
    layer = _layer(recurrent_dropout=0.3)
    layer.backend = "triton_persistent"
    eager = copy.deepcopy(layer)
    eager.backend, eager.cuda_graphs = "triton", False
    for x, lengths, seed in _calls(3):
        got, want = training_step(layer, x, lengths, seed), training_step(eager, x, lengths, seed)
        assert all(torch.equal(g, w) for g, w in zip(got, want))
    # skipped: the persistent forward's 3 calls and the eager layer's 3 forwards and 3 backwards
    assert rerun_graphs.info().counts == {"skipped_disabled": 9, "eager_first": 1, "captured": 1, "replayed": 2}


def _key(T=4, B=3, dtype=torch.float32, p_drop=0.0, save=0, seed=False, dot="ieee", params=None):
    x = torch.zeros(T, B, 3, dtype=dtype)
    seed_t = torch.zeros(1, dtype=torch.int64) if seed else None
    params = params if params is not None else [torch.zeros(2, 2)]
    return graphs.graph_key("op", (7, 5, 2, True, 1.0, 1e-3, save, p_drop), [x, None, seed_t], params,
                            x.device, dot)


def test_graph_keys():
    w = torch.zeros(2, 2)
    base = _key(params=[w])
    assert _key(params=[w]) == base  # same everything, other input values: one graph
    for other in (_key(T=5, params=[w]), _key(B=2, params=[w]), _key(dtype=torch.float16, params=[w]),
                  _key(p_drop=0.3, params=[w]), _key(save=1, params=[w]), _key(seed=True, params=[w]),
                  _key(dot="tf32", params=[w]), _key(params=[w.clone()]), _key(params=[w.t()])):
        assert other != base
    hash(base)


def _toy(cache, key, x):
    return cache.run(key, lambda t: [t * 2.0, t.sum(0)], [x])


def test_cache_evicts_least_recently_used():
    cache = graphs.GraphCache(max_entries=2, capturer=RerunCapture())
    x = torch.arange(6.0).view(2, 3)
    for key in ("a", "a", "b", "b", "a", "c", "c"):  # a, b captured; a used; c captured: b goes
        out = _toy(cache, key, x + len(key))
        assert torch.equal(out[0], (x + len(key)) * 2.0)
    assert list(cache._entries) == ["a", "c"]
    assert cache.info().counts["evicted"] == 1
    cache.set_limits(max_bytes=cache._entries["c"].nbytes)  # over the byte budget: the oldest goes
    assert list(cache._entries) == ["c"] and cache.info().nbytes <= cache.max_bytes


def test_an_evicted_key_never_evicts_in_turn():
    """Two keys taking turns in a one-graph cache: the second capture evicts the first, which then
    runs eagerly instead of being captured again (no capture churn)."""
    cache = graphs.GraphCache(max_entries=1, capturer=RerunCapture())
    x = torch.arange(4.0)
    for i, key in enumerate("abababab"):
        assert torch.equal(_toy(cache, key, x + i)[0], (x + i) * 2.0)
    counts = cache.info().counts
    assert counts["captured"] == 2 and counts["evicted"] == 1 and counts["no_room"] == 2
    assert list(cache._entries) == ["b"]
    cache.set_limits(max_entries=2)  # room again: "a" comes back
    _toy(cache, "a", x)
    assert list(cache._entries) == ["b", "a"] and cache.info().counts["captured"] == 3


def test_a_graph_over_the_budget_alone_is_not_kept():
    cache = graphs.GraphCache(max_bytes=8, capturer=RerunCapture())
    x = torch.arange(6.0)
    outs = [_toy(cache, "k", x + i) for i in range(4)]
    assert [torch.equal(o[0], (x + i) * 2.0) for i, o in enumerate(outs)] == [True] * 4
    info = cache.info()
    assert info.entries == 0 and info.counts == {"eager_first": 1, "captured": 1, "too_big": 2}


def test_replay_results_are_the_callers_own():
    """A later replay rewrites the graph's output buffers, never what an earlier call returned."""
    cache = graphs.GraphCache(capturer=RerunCapture())
    x = torch.arange(4.0)
    first = [_toy(cache, "k", x + i)[0] for i in range(4)]
    assert [torch.equal(f, (x + i) * 2.0) for i, f in enumerate(first)] == [True] * 4


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_entries"):
        hyperkern.set_cuda_graph_cache(max_entries=-1)
    with pytest.raises(ValueError, match="max_bytes"):
        hyperkern.set_cuda_graph_cache(max_bytes=1.5)


@pytest.mark.parametrize("limit", ["max_entries", "max_bytes"])
def test_zero_limits_never_capture(rerun_graphs, limit):
    rerun_graphs.set_limits(**{limit: 0})
    x = torch.arange(3.0)
    for _ in range(3):
        _toy(rerun_graphs, "k", x)
    assert rerun_graphs.info().counts == {"skipped_disabled": 3}


def test_an_evicted_key_is_recaptured_after_enough_eager_calls():
    """A key that keeps finding no room is captured again after RECAPTURE_AFTER eager calls (a
    phase that fits the cache gets its graphs back; a larger working set recaptures seldom)."""
    cache = graphs.GraphCache(max_entries=1, capturer=RerunCapture())
    x = torch.arange(4.0)
    for key in "aabb":  # a captured, then b captured: a evicted
        _toy(cache, key, x)
    for i in range(graphs.RECAPTURE_AFTER - 1):
        assert torch.equal(_toy(cache, "a", x + i)[0], (x + i) * 2.0)
    assert cache.info().counts["no_room"] == graphs.RECAPTURE_AFTER - 1 and list(cache._entries) == ["b"]
    assert torch.equal(_toy(cache, "a", x)[0], x * 2.0)
    assert list(cache._entries) == ["a"] and cache.info().counts["captured"] == 3


class _FailingCapture(RerunCapture):
    def capture(self, fn, inputs):
        self.captures += 1
        raise torch.OutOfMemoryError("no memory for the graph's pool")


def test_a_failed_capture_warns_once_and_leaves_the_key_eager(monkeypatch):
    monkeypatch.setattr(graphs, "_warned", False)
    cache = graphs.GraphCache(capturer=_FailingCapture())
    x = torch.arange(4.0)
    with pytest.warns(RuntimeWarning, match="capturing .* failed .*OutOfMemoryError"):
        outs = [_toy(cache, "k", x + i)[0] for i in range(4)]
    assert [torch.equal(o, (x + i) * 2.0) for i, o in enumerate(outs)] == [True] * 4
    assert cache.capturer.captures == 1  # never tried again
    assert cache.info().counts == {"eager_first": 1, "capture_failed": 3} and cache.info().entries == 0


@pytest.mark.parametrize("change", ["forget_bias", "ln_eps", "tf32"])
def test_the_op_keys_every_scalar_it_bakes_in(rerun_graphs, change):
    """Through the op: the same tensors with another forget bias, eps or TF32 flag are another key
    (a first sighting, run eagerly), not a replay of the first call's graph."""
    import dataclasses

    from hyperkern.ops import precision
    from hyperkern.ops.hyper_lstm import fused_triton

    cell = _layer().cells[0]
    x = torch.randn(3, 2, 3, generator=torch.Generator().manual_seed(3))
    state = tuple(torch.zeros(2, n) for n in (7, 7, 5, 5))
    with torch.no_grad():
        for _ in range(2):  # first sighting, then captured and replayed
            fused_triton.hyper_lstm_sequence(x, state, cell.params(), cell.cfg, cuda_graphs=True)
        cfg = cell.cfg
        if change == "tf32":
            with precision.tf32_matmuls(True):
                fused_triton.hyper_lstm_sequence(x, state, cell.params(), cfg, cuda_graphs=True)
        else:
            cfg = dataclasses.replace(cfg, **{change: getattr(cfg, change) * 2})
            fused_triton.hyper_lstm_sequence(x, state, cell.params(), cfg, cuda_graphs=True)
    assert rerun_graphs.info().counts == {"eager_first": 2, "captured": 1, "replayed": 1}


@pytest.mark.parametrize("condition", ["opt_out", "outer_capture", "compiling"])
def test_skip_conditions_run_the_eager_loop(rerun_graphs, monkeypatch, condition):
    """Each condition keeps every call eager (nothing captured) with the eager results."""
    layer = _layer()
    if condition == "opt_out":
        layer.cuda_graphs = False
        assert all(cell.cuda_graphs is False for cell in layer.cells)
    elif condition == "outer_capture":
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    else:
        monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    x, lengths, _ = next(_calls(1))
    with torch.no_grad():
        outs = [layer(x, lengths=lengths)[0] for _ in range(3)]
    reason = {"opt_out": "disabled"}.get(condition, condition)
    assert rerun_graphs.info().counts == {f"skipped_{reason}": 3}
    assert rerun_graphs.capturer.captures == 0
    assert torch.equal(outs[0], outs[2])


def test_the_real_capture_needs_cuda():
    """Without the stand-in, CPU tensors (the interpreter) never reach a CUDA graph."""
    cache = graphs.GraphCache()
    assert cache.skip_reason(True, torch.device("cpu")) == "device"
    assert not graphs.CudaGraphCapture().supports(torch.device("cpu"))


def test_cuda_graphs_is_a_validated_setting():
    layer = HyperLSTM(3, 5, hyper_size=4, embed_size=2, cuda_graphs=False)
    assert layer.cuda_graphs is False and layer.cells[0].cuda_graphs is False
    layer.cuda_graphs = True
    assert all(c.cuda_graphs for c in layer.cells)
    with pytest.raises(ValueError, match="cuda_graphs"):
        layer.cuda_graphs = "yes"



def test_the_graph_cache_is_opt_in(rerun_graphs):
    """``cuda_graphs=False`` is the default of the layer, the cell and every backend entry point:
    without asking, no call is captured (docs/cuda_graphs.md: opt-in until gpu-check shows on a
    GPU that it captures, replays bitwise and beats both of PyTorch's own mechanisms)."""
    from hyperkern import HyperLSTMCell
    from hyperkern.ops.hyper_lstm import fused_torch, fused_triton
    from hyperkern.ops.hyper_lstm.fused_triton.persistent import hyper_lstm_sequence as persistent_entry

    assert HyperLSTM(3, 5).cuda_graphs is False
    assert HyperLSTMCell(3, 5).cuda_graphs is False
    for entry in (fused_triton.hyper_lstm_sequence, persistent_entry, fused_torch.hyper_lstm_sequence):
        assert inspect.signature(entry).parameters["cuda_graphs"].default is False, entry
    layer = HyperLSTM(3, 7, hyper_size=5, embed_size=2, backend="triton")
    randomize_(layer, torch.Generator().manual_seed(70))
    x, lengths, _ = next(_calls(1))
    for _ in range(3):
        training_step(layer, x, lengths, 0)
    assert rerun_graphs.info().counts == {"skipped_disabled": 6} and rerun_graphs.capturer.captures == 0
