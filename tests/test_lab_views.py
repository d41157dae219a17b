"""View functions: plain data in, plotly figures with the expected data out."""
import numpy as np
import pandas as pd
import plotly.graph_objects as go
import pytest
import torch

pytest.importorskip("plotly")
from gptq_lab.lab import views
from gptq_lab.lab.widgets import refresh


def test_spectrum_has_eigenvalues_damped_and_damping_line():
    fig = views.spectrum_figure(torch.tensor([1.0, 4.0, 0.0]), 0.5, 9.0, 1, "x")
    assert isinstance(fig, go.Figure) and len(fig.data) == 3
    np.testing.assert_allclose(fig.data[0].y[:2], [4, 1])
    assert fig.data[0].y[2] == views.TINY                       # zero eigenvalue floored for log
    np.testing.assert_allclose(fig.data[1].y, [4.5, 1.5, 0.5])
    np.testing.assert_allclose(fig.data[2].y, [0.5, 0.5])
    assert fig.layout.yaxis.type == "log" and "dead channels = 1" in fig.layout.title.text


def test_diagonal_marks_outliers():
    d = torch.ones(50)
    d[7], d[9] = 100, 0
    fig = views.hessian_diagonal_figure(d)
    assert list(fig.data[1].x) == [7]
    assert "1 outlier" in fig.layout.title.text and "1 dead" in fig.layout.title.text


def test_weight_error_heatmaps_are_pooled():
    w = torch.randn(300, 500)
    fig = views.weight_error_figure(w, w + 0.1, max_rows=100, max_cols=100)
    z_w, z_e = np.asarray(fig.data[0].z), np.asarray(fig.data[1].z)
    assert z_w.shape == (100, 100) and z_e.shape == (100, 100)
    np.testing.assert_allclose(z_e, 0.1, rtol=1e-4)            # RMS of a constant error
    assert "3x5 tiles" in fig.layout.title.text


def test_column_error_and_scales_and_act_order():
    fig = views.column_error_figure(torch.tensor([1.0, 1.0]), torch.tensor([3.0, 3.0]))
    np.testing.assert_allclose(fig.data[1].y, [1, 1])
    assert "3.00x lower" in fig.layout.title.text
    fig = views.group_scales_figure(torch.rand(8, 3))
    assert np.asarray(fig.data[0].z).shape == (8, 3)
    perm = torch.tensor([2, 0, 1])
    fig = views.act_order_figure(perm, torch.tensor([1.0, 2.0, 3.0]))
    assert list(fig.data[0].y) == [2, 0, 1] and "on:" in fig.layout.title.text
    assert "off:" in views.act_order_figure(None, torch.ones(3)).layout.title.text


def test_loss_heatmap_keeps_nan_pending_and_logs():
    v = np.array([[1.0, 10.0], [np.nan, 100.0]])
    fig = views.loss_heatmap_figure(v, ["0", "1"], ["q", "k"])
    z = np.asarray(fig.data[0].z, dtype=float)
    np.testing.assert_allclose(z[0], [0, 1])
    assert np.isnan(z[1, 0]) and z[1, 1] == 2


def test_constant_shift_heatmap_is_linear_in_0_1_and_keeps_nan_blank():
    v = np.array([[0.25, 1.0], [np.nan, 0.0]])
    fig = views.constant_shift_figure(v, ["0", "1"], ["q", "k"], title="t")
    trace = fig.data[0]
    assert trace.z[1][0] is None                                      # strict JSON: NaN -> None
    np.testing.assert_allclose(np.asarray(trace.z, dtype=float), v)   # shares as given, not logged
    assert list(trace.x) == ["q", "k"] and list(trace.y) == ["0", "1"] and (trace.zmin, trace.zmax) == (0, 1)
    assert fig.layout.yaxis.title.text == "block" and fig.layout.title.text == "t"


def test_calibration_and_evaluation_figures():
    fig = views.calibration_figure({"a": 30, "b": 10}, [5, 6, 7], torch.tensor([0, 5, 2, 9]))
    assert list(fig.data[0].y) == [30, 10] and list(fig.data[2].y) == [9, 5, 2]
    table = pd.DataFrame({"model": ["fp", "fp", "q", "q"], "eval_set": ["a", "b", "a", "b"],
                          "perplexity": [1, 2, 3, 4], "kl": [0, 0, .1, .2], "top1": [1, 1, .9, .8]})
    fig = views.evaluation_figure(table)
    assert len(fig.data) == 6 and list(fig.data[3].y) == [3, 4]
    fig = views.calibration_compare_figure(["l0", "l1"], [0.9, 0.8], [1.1, 1.3])
    assert list(fig.data[1].y) == [1.1, 1.3]


def test_refresh_updates_figure_widget_in_place():
    fw = go.FigureWidget(views.column_error_figure(torch.zeros(4), torch.ones(4)))
    before = fw.data[0]
    refresh(fw, views.column_error_figure(torch.full((4,), 2.0), torch.ones(4)))
    assert fw.data[0] is before                                 # same trace objects, new data
    np.testing.assert_allclose(fw.data[1].y, [2, 2, 2, 2])
