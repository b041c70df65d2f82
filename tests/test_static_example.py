"""The static-hypernetwork digits example (examples/static_digits.py): a one-epoch smoke run and the
message shown without scikit-learn. The full run and its result table are in docs/static.md."""
from __future__ import annotations

import importlib.util
import json
import pathlib
import sys

import pytest
import torch

EXAMPLE = pathlib.Path(__file__).resolve().parents[1] / "examples" / "static_digits.py"


def _load():
    spec = importlib.util.spec_from_file_location("static_digits", EXAMPLE)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_example_smoke_run(tmp_path, capsys):
    pytest.importorskip("sklearn")
    ex = _load()
    n = torch.get_num_threads()
    try:
        assert ex.main(["--epochs", "1", "--seeds", "1", "--json", str(tmp_path / "r.json")]) == 0
    finally:
        torch.set_num_threads(n)
    out = capsys.readouterr().out
    assert "| hyper CNN" in out and "| plain CNN" in out and "epoch   1/1" in out
    res = json.loads((tmp_path / "r.json").read_text())["results"]
    assert res["plain"]["conv_params"] == 110_592  # 32*32*9*2 + 64*32*9 + 64*64*9*2
    assert res["hyper"]["conv_params"] == 7_568  # 48 tiles * 16 + 16*16*17 + 144*17
    assert res["hyper"]["embeddings"] == 48
    for r in res.values():
        assert 0.0 <= r["test_acc"][0] <= 100.0


def test_example_without_sklearn_says_how_to_install(monkeypatch):
    ex = _load()
    monkeypatch.setitem(sys.modules, "sklearn", None)  # makes `import sklearn...` raise ImportError
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(SystemExit, match=r"pip install 'hyperkern\[examples\]'"):
        ex.load_data()
