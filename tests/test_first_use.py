"""First use of the torch backend's C++ CPU loop, as a user without this machine's extras sees it:
the pip-installed ninja is found with the venv not activated and a broken ninja first on PATH,
one line is printed before a build starts, and a build that cannot happen warns once and falls
back to the eager loop (issue 18, item 4). The build itself is faked: these tests check what
hyperkern does around ``torch.utils.cpp_extension.load``, not the compiler."""
import os
import sys
import warnings

import pytest
import torch
from torch.utils import cpp_extension

from hyperkern.ops.hyper_lstm import cpu


@pytest.fixture
def fresh(monkeypatch, tmp_path):
    """A process in which the loop was never tried, with an empty extension cache."""
    monkeypatch.setattr(cpu, "_state", {"module": None, "tried": False, "why": "not built yet"})
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / "ext" / name))
    monkeypatch.delenv("HYPERKERN_CPU_EXTENSION", raising=False)
    return tmp_path


def _broken_ninja_first_on_path(monkeypatch, tmp_path):
    bad = tmp_path / "badbin"
    bad.mkdir()
    (bad / "ninja").write_text("#!/bin/sh\necho 'ninja: broken' >&2\nexit 1\n")
    (bad / "ninja").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bad}{os.pathsep}{os.environ['PATH']}")
    return str(bad)


def test_the_pip_installed_ninja_is_found_past_a_broken_one_on_path(monkeypatch, tmp_path):
    pytest.importorskip("ninja")  # an install requirement: pip brought it
    bad = _broken_ninja_first_on_path(monkeypatch, tmp_path)
    folder = cpu.find_ninja()
    assert folder is not None and folder != bad
    assert cpu._runs(os.path.join(folder, "ninja"))


def test_no_ninja_anywhere_is_none(monkeypatch, tmp_path):
    import ninja

    empty = tmp_path / "empty"
    empty.mkdir()
    monkeypatch.setattr(ninja, "BIN_DIR", str(empty))
    monkeypatch.setattr(sys, "executable", str(empty / "python"))
    monkeypatch.setenv("PATH", str(empty))
    assert cpu.find_ninja() is None


def test_a_build_says_so_before_it_starts_and_uses_the_found_ninja(fresh, monkeypatch, tmp_path, capsys):
    pytest.importorskip("ninja")
    _broken_ninja_first_on_path(monkeypatch, tmp_path)
    path_before = os.environ["PATH"]
    seen = {}

    def fake_load(name, sources, extra_cflags, extra_ldflags, verbose):
        seen["printed"] = capsys.readouterr().err  # what the user saw before the build began
        seen["ninja_first"] = os.environ["PATH"].split(os.pathsep)[0]
        return "module"

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    assert cpu.load() == "module"
    line = seen["printed"].strip()
    assert line.startswith("hyperkern: building") and "C++ CPU time loop" in line and "30-60 s" in line
    assert str(fresh / "ext") in line and len(line.splitlines()) == 1
    assert cpu._runs(os.path.join(seen["ninja_first"], "ninja"))  # the build saw a working ninja first
    assert os.environ["PATH"] == path_before  # and the user's PATH is theirs again
    assert cpu.status() == (True, cpu._state["why"]) and "built for" in cpu.status()[1]


def test_an_existing_build_loads_without_a_message(fresh, monkeypatch, capsys):
    name, _ = cpu._build_args()
    so = fresh / "ext" / name / f"{name}.so"
    so.parent.mkdir(parents=True)
    so.write_bytes(b"")
    monkeypatch.setattr(cpp_extension, "load", lambda **kw: "module")
    assert cpu.load() == "module"
    assert capsys.readouterr().err == ""


@pytest.mark.parametrize("missing", ["compiler", "ninja", "build"])
def test_a_build_that_cannot_happen_warns_once_and_falls_back(fresh, monkeypatch, missing):
    calls = []

    def fake_load(**kw):
        calls.append(kw)
        raise RuntimeError("Error building extension 'x'\nx.cpp:1:1: error: it broke")

    monkeypatch.setattr(cpp_extension, "load", fake_load)
    if missing == "compiler":
        monkeypatch.setenv("CXX", "no-such-compiler-here")
    elif missing == "ninja":
        monkeypatch.setattr(cpu, "find_ninja", lambda: None)
    with pytest.warns(RuntimeWarning, match="did not build.*install a C\\+\\+ compiler.*pip install ninja"):
        assert cpu.load() is None
    ok, why = cpu.status()
    assert not ok and "eager loop runs" in why
    assert {"compiler": "no-such-compiler-here", "ninja": "ninja was not found", "build": "it broke"}[missing] in why
    assert len(calls) == (1 if missing == "build" else 0)  # no build attempted without its tools
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: a second call neither warns nor retries
        assert cpu.load() is None
    assert len(calls) == (1 if missing == "build" else 0)


def test_the_layer_still_runs_after_a_failed_build(fresh, monkeypatch):
    """The fall-back is the eager loop: same results as the reference."""
    import hyperkern
    from hyperkern.testing import randomize_

    monkeypatch.setenv("CXX", "no-such-compiler-here")
    rnn = randomize_(hyperkern.HyperLSTM(3, 5, hyper_size=4, embed_size=2, dtype=torch.float64),
                     torch.Generator().manual_seed(0))
    x = torch.randn(4, 2, 3, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="did not build"):
        got, _ = rnn(x)
    rnn.backend = "reference"
    want, _ = rnn(x)
    assert (got - want).abs().max() <= 1e-9 * want.abs().max()
