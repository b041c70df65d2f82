"""hyperkern.report: the time-per-token sweep and the benchmark plot."""
import json
import math

import pytest

from hyperkern import report

TINY = dict(T_values=(4, 8), H_values=(8, 16), T_fixed=4, H_fixed=8, B=2, X=4, Hh=4, E=2, repeats=1,
            device="cpu", verbose=False)


def test_sweep_rows_are_sane():
    rows = report.sweep(**TINY)
    # shapes: T sweep (T=4, 8 at H=8) + H sweep at T=4 (H=16; H=8 is the shared point, measured once)
    shapes = sorted({(r["T"], r["H"]) for r in rows})
    assert shapes == [(4, 8), (4, 16), (8, 8)]
    assert {r["mode"] for r in rows} == {"forward", "forward+backward"}
    assert {r["model"] for r in rows} == {"nn.LSTM", "HyperLSTM[torch]", "HyperLSTM[reference]"}  # no GPU here
    assert len(rows) == 3 * 2 * 3
    assert {r["sweep"] for r in rows if (r["T"], r["H"]) == (4, 8)} == {"T,H"}
    assert {r["sweep"] for r in rows if (r["T"], r["H"]) == (8, 8)} == {"T"}
    assert {r["sweep"] for r in rows if (r["T"], r["H"]) == (4, 16)} == {"H"}
    for r in rows:
        assert r["ms"] > 0 and math.isfinite(r["ms"]) and r["measured"] is True
        assert r["us_per_token"] == pytest.approx(r["ms"] * 1e3 / (r["T"] * r["B"]))
        assert r["tokens_per_s"] == pytest.approx(r["T"] * r["B"] / (r["ms"] / 1e3))
        assert (r["Hh"], r["E"], r["B"], r["X"]) == (4, 2, 2, 4)
        if r["model"] == "nn.LSTM":
            assert r["ratio_to_lstm"] == 1.0 and r["backend"] == "nn.LSTM"
    json.dumps(rows)  # JSON-ready
    table = report.format_sweep(rows)
    assert "us/token" in table and table.count("\n") == len(rows) + 1


def test_sweep_limits_the_reference_and_validates():
    rows = report.sweep(**{**TINY, "reference_max": (4, 8), "modes": ("forward",)})
    ref = {(r["T"], r["H"]) for r in rows if r["backend"] == "reference"}
    assert ref == {(4, 8)}
    assert {r["mode"] for r in rows} == {"forward"}
    rows = report.sweep(**{**TINY, "backends": ["torch"], "H_values": ()})
    assert {r["model"] for r in rows} == {"nn.LSTM", "HyperLSTM[torch]"}
    with pytest.raises(ValueError, match="modes"):
        report.sweep(**{**TINY, "modes": ("backward",)})
    with pytest.raises(ValueError, match="unknown backend"):
        report.sweep(**{**TINY, "backends": ["cudnn"]})
    with pytest.raises(ValueError, match="T_values"):
        report.sweep(**{**TINY, "T_values": (0,)})


def _synthetic():
    rows = []
    for axis, T, H in (("T", 25, 256), ("T,H", 50, 256), ("T", 100, 256), ("H", 50, 128), ("H", 50, 512)):
        for mode in ("forward", "forward+backward"):
            for model, scale in (("nn.LSTM", 1.0), ("HyperLSTM[torch]", 3.0)):
                us = scale * H / 100 * (2 if mode != "forward" else 1)
                rows.append({"sweep": axis, "mode": mode, "model": model, "backend": model, "T": T, "H": H,
                             "Hh": 64, "E": 4, "B": 16, "X": 64, "ms": us * T * 16 / 1e3, "us_per_token": us,
                             "tokens_per_s": 1e6 / us, "ratio_to_lstm": scale, "device": "cpu", "measured": True})
    return {
        "machine": {"cpu": "Example CPU 9000", "threads": 2, "torch": "2.13.0+cpu", "gpu": None},
        "device": "cpu",
        "sweep": rows,
        "static": [{"backend": "reference", "pass": "fwd", "dtype": "float32", "tiles": 242, "ms": 80.0},
                   {"backend": "torch", "pass": "fwd", "dtype": "float32", "tiles": 242, "ms": 3.5},
                   {"backend": "model (H100, floor)", "device": "H100 SXM", "pass": "fwd", "tiles": 242,
                    "ms": 0.004, "predicted_us": 4.0}],
        "gpu_model": [{"shape": "PTB (paper)", "dtype": "fp32", "pred_us_host": 20.0, "pred_us_graph": 17.0,
                       "measured_us": None}],
        "gpu_model_backward": [{"shape": "PTB (paper)", "dtype": "fp32", "pred_us_step": 44.0}],
    }


def _titles(fig):
    return [ax.get_title() for ax in fig.axes]


def test_figure_labels_measured_and_modelled():
    pytest.importorskip("matplotlib")
    fig = report.build_figure(_synthetic())
    titles = _titles(fig)
    assert len(titles) == 4
    assert "measured on Example CPU 9000 (cpu, 2 threads" in titles[0] and "vs sequence length" in titles[0]
    assert "measured on Example CPU 9000" in titles[1] and "vs hidden size" in titles[1]
    assert "static" in titles[2] and "measured on Example CPU 9000" in titles[2] and "modelled" in titles[2]
    assert "modelled" in titles[3] and "not measured" in titles[3]
    assert [t.get_text() for t in fig.axes[3].get_legend().get_texts()] == [
        "forward, modelled (H100 SXM)", "backward, modelled (H100 SXM)"]
    labels = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert labels[0].startswith("nn.LSTM") and any(l.startswith("HyperLSTM[torch]") for l in labels)
    # a GPU run says which GPU
    gpu = dict(_synthetic(), device="cuda", machine={"cpu": "Host CPU", "gpu": "NVIDIA H100 80GB HBM3"})
    assert "measured on NVIDIA H100 80GB HBM3 (cuda" in _titles(report.build_figure(gpu))[0]


def test_plot_writes_png(tmp_path):
    pytest.importorskip("matplotlib")
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(_synthetic()))
    png = tmp_path / "bench.png"
    assert report.plot(str(src), str(png)) == str(png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000


def test_plot_tolerates_missing_sections(tmp_path):
    pytest.importorskip("matplotlib")
    full = _synthetic()
    # only the sweep; a dict-shaped static section; nothing at all
    variants = [{k: full[k] for k in ("machine", "device", "sweep")},
                {**full, "static": {"rows": full["static"]}, "gpu_model": [], "gpu_model_backward": None},
                {"machine": {}, "measured": []}]
    expected_panels = [2, 3, 1]
    for i, (result, n) in enumerate(zip(variants, expected_panels)):
        assert len(report.build_figure(result).axes) == n
        src, png = tmp_path / f"b{i}.json", tmp_path / f"b{i}.png"
        src.write_text(json.dumps(result))
        assert report.plot(str(src), str(png)) == str(png) and png.stat().st_size > 1000


def test_plot_real_sweep_rows(tmp_path):
    pytest.importorskip("matplotlib")
    from hyperkern.timing import machine_description

    src = tmp_path / "bench.json"
    src.write_text(json.dumps({"machine": machine_description(), "device": "cpu", "sweep": report.sweep(**TINY)}))
    assert report.plot(str(src), str(tmp_path / "real.png"))


def test_plot_without_matplotlib(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(report, "_import_figure", lambda: None)
    src = tmp_path / "bench.json"
    src.write_text(json.dumps(_synthetic()))
    assert report.plot(str(src), str(tmp_path / "x.png")) is None
    assert "pip install -e .[plot]" in capsys.readouterr().out
    assert not (tmp_path / "x.png").exists()


def test_quick_settings_are_valid_sweep_arguments():
    import inspect

    inspect.signature(report.sweep).bind(**report.QUICK)
    assert report.QUICK["T_fixed"] in report.QUICK["T_values"] and report.QUICK["H_fixed"] in report.QUICK["H_values"]


def test_gpu_check_measurements_are_plotted_beside_the_model(tmp_path):
    """bench --gpu-check: a gpu-check.json's measured µs per step join the modelled rows of the
    same shape and dtype, and the GPU panel shows them (graph-replayed and host-launched)."""
    pytest.importorskip("matplotlib")
    from hyperkern import perf_model

    result = {"gpu_model": perf_model.rows(measure_on_gpu=False), "gpu_model_backward": perf_model.rows_bwd()}
    s = perf_model.SHAPES[0]
    timing = {"shape": s.name, "dtype": "fp32", "T": 64, "fwd_eager_us": 31.0, "fwd_graph_us": 16.5,
              "fwdbwd_eager_us": 95.0, "fwdbwd_graph_us": 61.5}
    gc = {"environment": {"gpu": "NVIDIA H200", "date": "2026-12-03", "torch": "2.11.0", "triton": "3.6.0"},
          "sections": {"timing": {"rows": [timing]}}}
    path = tmp_path / "gpu-check.json"
    path.write_text(json.dumps(gc))
    line = report.merge_gpu_check(result, str(path))
    assert line.startswith("attached 2 measured GPU rows") and "NVIDIA H200" in line
    fwd = next(r for r in result["gpu_model"] if r["shape"] == s.name and r["dtype"] == "fp32")
    bwd = next(r for r in result["gpu_model_backward"] if r["shape"] == s.name and r["dtype"] == "fp32")
    assert fwd["measured_graph_us"] == 16.5 and fwd["measured_eager_us"] == 31.0 and bwd["measured_graph_us"] == 45.0
    fig = report.build_figure(result)
    title = _titles(fig)[0]
    assert "measured on NVIDIA H200 (2026-12-03" in title and "modelled H100 SXM (hatched)" in title
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert legend == ["forward, modelled (H100 SXM)", "forward, measured on NVIDIA H200 (2026-12-03, torch 2.11.0, "
                      "triton 3.6.0), graph-replayed", "forward, measured on NVIDIA H200 (2026-12-03, torch 2.11.0, "
                      "triton 3.6.0), host launches", "backward, modelled (H100 SXM)",
                      "backward, measured on NVIDIA H200 (2026-12-03, torch 2.11.0, triton 3.6.0), graph-replayed"]
