"""Smoke tests of examples/char_lm.py (the character-level language model), in-process, tiny sizes."""
import importlib.util
import math
import pathlib

import pytest
import torch

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("char_lm", ROOT / "examples" / "char_lm.py")
char_lm = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(char_lm)

TINY = ["--hidden", "16", "--hyper-size", "8", "--embed-size", "2", "--emb-dim", "8", "--batch", "4",
        "--seq-len", "20", "--eval-batch", "4", "--threads", "1", "--valid-frac", "0.2", "--test-frac", "0.2"]


@pytest.fixture(autouse=True)
def _keep_threads():
    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """30 small, very repetitive .py files, plus folders the corpus must skip."""
    d = tmp_path_factory.mktemp("corpus")
    for i in range(30):
        body = "".join(f"def f{j}(x):\n    return x + {j % 10}\n\n" for j in range(i % 7, i % 7 + 40))
        (d / f"mod{i:02d}.py").write_text(body)
    for skipped in ("site-packages", "test", "__pycache__"):
        (d / skipped).mkdir()
        (d / skipped / "skipped.py").write_text("@" * 5000)
    (d / "notes.txt").write_text("not python")
    return d


def run(argv):
    lines = []
    out = char_lm.run([str(a) for a in argv], log=lambda *a: lines.append(" ".join(map(str, a))))
    return out, "\n".join(lines)


def hyper_lstm_params(X, H, Hh, E):  # SPEC §1, with layer norm
    return 4 * Hh * (X + H + Hh) + 4 * Hh + 4 * H * (X + H) + 4 * H + 12 * Hh * E + 8 * E + 12 * E * H + 10 * Hh + 10 * H


def test_corpus_split_by_file(corpus):
    rels = char_lm.corpus_files(str(corpus))
    assert len(rels) == 30 and all(r.startswith("mod") for r in rels)  # skips site-packages, test, caches, .txt
    assert len(char_lm.corpus_files(str(corpus), include_tests=True)) == 31
    assert char_lm.corpus_files(str(corpus)) == rels  # deterministic order
    splits = [char_lm.split_of(r, 0.2, 0.2) for r in rels]
    assert set(splits) == {"train", "valid", "test"}
    args = char_lm.parse_args(["--corpus", str(corpus)] + TINY)
    data, info = char_lm.load_corpus(args)
    sizes = {r: (corpus / r).stat().st_size for r in rels}
    for s in ("train", "valid", "test"):
        files = [r for r, sp in zip(rels, splits) if sp == s]
        assert info[s]["files"] == len(files)
        assert info[s]["bytes"] == data[s].numel() == sum(sizes[r] for r in files)


def test_train_both_models(corpus, tmp_path):
    out, log = run(["--corpus", corpus, *TINY, "--steps", "40", "--lr", "0.01", "--log-every", "10",
                    "--eval-every", "20", "--ckpt-dir", tmp_path / "ck"])
    res = {r["kind"]: r for r in out["results"]}
    assert set(res) == {"hyper", "lstm"}
    # the models' real parameter counts: embedding + RNN + softmax head
    emb, head = 256 * 8, 16 * 256 + 256
    assert res["hyper"]["params"] == emb + hyper_lstm_params(8, 16, 8, 2) + head
    assert res["lstm"]["params"] == emb + 4 * 16 * (8 + 16) + 8 * 16 + head
    for r in res.values():
        assert r["steps"] == 40 and r["tokens"] == 40 * 4 * 20
        for key in ("valid_bpc", "test_bpc"):
            assert math.isfinite(r[key]) and r[key] < 6.0, (r["model"], key, r[key])  # uniform = 8 bits
        assert r["train_tokens_per_s"] > 0 and r["train_tokens_per_s_median_interval"] > 0
        assert r["history"][0]["step"] == 20
    assert "[hyper] step     20/40 | train bpc" in log and "valid bpc" in log
    assert "HyperLSTM" in log.splitlines()[-3] and "nn.LSTM" in log.splitlines()[-2]  # the final table
    assert (tmp_path / "ck" / "hyper.pt").exists() and (tmp_path / "ck" / "results.json").exists()


def _params(path):
    return torch.load(path, map_location="cpu", weights_only=False)


def test_resume_continues_exactly(corpus, tmp_path):
    common = ["--corpus", corpus, *TINY, "--log-every", "1", "--eval-every", "0"]
    run(common + ["--steps", "6", "--ckpt-dir", tmp_path / "whole"])
    run(common + ["--steps", "3", "--ckpt-dir", tmp_path / "split"])
    assert _params(tmp_path / "split" / "hyper.pt")["step"] == 3
    _, log = run(common + ["--steps", "6", "--ckpt-dir", tmp_path / "split", "--resume"])
    assert "resumed from" in log and "at step 3" in log
    steps = [line for line in log.splitlines() if line.startswith("[hyper] step ")]
    assert steps[0].startswith("[hyper] step      4/6")
    for kind in ("hyper", "lstm"):
        a, b = _params(tmp_path / "whole" / f"{kind}.pt"), _params(tmp_path / "split" / f"{kind}.pt")
        assert a["step"] == b["step"] == 6
        for name, t in a["model"].items():
            assert torch.equal(t, b["model"][name]), (kind, name)
        for s, t in zip(a["rnn_state"], b["rnn_state"]):
            assert torch.equal(s, t)
    # changing a setting that fixes the model or the data is refused, with the reason
    with pytest.raises(SystemExit, match="--hidden 16"):
        run(["--corpus", corpus, *TINY[:-2], "--test-frac", "0.2", "--hidden", "24", "--steps", "8",
             "--ckpt-dir", tmp_path / "split", "--resume"])


def test_sample(corpus, tmp_path):
    run(["--corpus", corpus, *TINY, "--steps", "2", "--model", "hyper", "--ckpt-dir", tmp_path])
    out, log = run(["--ckpt-dir", tmp_path, "--sample", "37", "--model", "hyper", "--prime", "def "])
    assert isinstance(out["samples"]["hyper"], str) and len(out["samples"]["hyper"]) == 37
    assert "--- HyperLSTM (step 2" in log
    model = char_lm.CharLM("lstm", 16, 8)
    for n, temp in ((1, 1.0), (50, 0.5), (120, 2.0)):
        text = char_lm.sample(model, n, temperature=temp, prime="x = ", seed=n)
        assert isinstance(text, str) and len(text) == n
    assert char_lm.sample(model, 30, seed=3) == char_lm.sample(model, 30, seed=3)
    with pytest.raises(SystemExit, match="no checkpoint"):
        run(["--ckpt-dir", tmp_path, "--sample", "5", "--model", "lstm"])


@pytest.mark.parametrize("argv, message", [
    (["--steps", "0"], "--steps must be a positive integer"),
    (["--temperature", "0"], "--temperature must be positive"),
    (["--sample", "10"], "--sample needs --ckpt-dir"),
    (["--resume"], "--resume needs --ckpt-dir"),
    (["--valid-frac", "0.7"], "--valid-frac must lie in"),
    (["--corpus", "/nonexistent/dir"], "is not a folder"),
    (["--model", "gru"], "invalid choice"),
    (["--backend", "triton", "--device", "cpu"], "needs --device cuda"),
])
def test_bad_flags(argv, message, capsys):
    with pytest.raises(SystemExit) as e:
        char_lm.parse_args(argv)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_too_few_files_is_a_clear_error(corpus, tmp_path):
    (tmp_path / "one.py").write_text("x = 1\n" * 100)
    with pytest.raises(SystemExit, match="split is empty"):
        run(["--corpus", tmp_path, *TINY, "--steps", "1"])


def test_time_budget_stops_training(corpus):
    out, log = run(["--corpus", corpus, *TINY, "--model", "lstm", "--steps", "1000000", "--time-budget", "0.3",
                    "--log-every", "1000000", "--eval-every", "0"])
    (r,) = out["results"]
    assert 0 < r["steps"] < 1000000 and r["train_time_s"] >= 0.3
    assert f"step {r['steps']:6d}/1000000" in log  # the last step is always reported
