"""Quantizer: live heatmap via on_block, results table, requantize, save, interrupts."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("plotly")
from test_lab_common import CONFIG, calibrator, no_hooks, tiny_llama

from gptq_lab import QuantConfig
from gptq_lab.lab import Quantizer

DOWN = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def done():
    model, calib = tiny_llama(), calibrator()
    q = Quantizer(model, calib, CONFIG, device="cpu")
    heat = q.widget.children[1]                       # build the widget before running
    trace = heat.data[0]
    seen = []

    def record(done, total, msg):
        z = heat.data[0].z                              # widget messages are strict JSON:
        if isinstance(z, np.ndarray):                   # arrays go as binary buffers (finite only)
            assert np.isfinite(z).all()
        else:                                           # NaN (pending cells) must be None
            json.dumps(z, allow_nan=False)
        seen.append(np.asarray(heat.data[0].z, dtype=float).copy())

    q.run(progress=record)
    assert heat.data[0] is trace                      # updated in place, not rebuilt
    return q, seen


def test_heatmap_fills_block_by_block(done):
    _, seen = done
    assert len(seen) == 2
    assert np.isfinite(seen[0][0]).all() and np.isnan(seen[0][1]).all()
    assert np.isfinite(seen[1]).all()


def test_table_repr_and_figures(done):
    q, _ = done
    t = q.table()
    assert len(t) == 14 and {"loss", "damp_used", "time_s", "condition"} <= set(t.columns)
    assert (t.loss > 0).all() and (t.time_s > 0).all()
    assert "done: 14/14 layers" in repr(q) and "highest loss" in repr(q)
    sens = np.asarray(q.sensitivity_figure().data[0].customdata, dtype=float)
    np.testing.assert_allclose(np.median(sens, axis=0), 1)
    assert q.reference is not q.model and no_hooks(q.model)
    w_ref = q.reference.get_submodule(DOWN).weight
    assert not torch.equal(w_ref, q.model.get_submodule(DOWN).weight)


def test_requantize_only_touches_chosen_layers(done, tmp_path):
    q, _ = done
    other = {n: q.model.get_submodule(n).weight.clone() for n in q.names if n != DOWN}
    loss_before = q.results[DOWN].loss
    rows = q.requantize([DOWN], QuantConfig(bits=8, group_size=32))
    assert list(rows.layer) == [DOWN] and rows.bits.item() == 8 and rows.requantized.item()
    assert q.results[DOWN].loss < loss_before
    assert all(torch.equal(w, q.model.get_submodule(n).weight) for n, w in other.items())
    torch.testing.assert_close(q.model.get_submodule(DOWN).weight, q.results[DOWN].dequantize())
    path = q.save(tmp_path / "ckpt")
    assert (path / "config.json").is_file() and (path / "model.safetensors").is_file()


def test_interrupt_leaves_no_hooks_and_model_usable():
    model, calib = tiny_llama(), calibrator()
    q = Quantizer(model, calib, CONFIG, device="cpu", inplace=True)

    def stop(done, total, msg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        q.run(progress=stop)
    assert "interrupted after 1 of 2 blocks" in repr(q) and len(q.results) == 7
    assert no_hooks(model)
    with torch.no_grad():
        assert torch.isfinite(model(calib.ids[:1]).logits).all()


def test_rtn_needs_no_calibration():
    q = Quantizer(tiny_llama(), None, CONFIG, method="rtn").run(progress=False)
    assert len(q.results) == 14 and q.status == "done"


def test_rtn_heatmap_uses_output_error_from_calibrator_hessians():
    model, calib = tiny_llama(), calibrator()
    calib.collect(model, device="cpu", progress=False)
    q = Quantizer(model, calib, CONFIG, method="rtn").run(progress=False)
    t = q.table()
    assert t.loss.isna().all() and (t.output_error > 0).all()
    assert np.isfinite(q.loss_matrix()).all() and "highest output error" in repr(q)


class ZMQInteractiveShell:
    """Stands in for the Jupyter kernel's shell: ``in_notebook()`` looks at the type name."""

    execution_count = 1


def test_run_in_a_notebook_shows_its_view_once_per_cell(monkeypatch):
    import IPython
    import IPython.display
    shell, shown = ZMQInteractiveShell(), []
    monkeypatch.setattr(IPython, "get_ipython", lambda: shell)
    monkeypatch.setattr(IPython.display, "display", shown.append)
    q = Quantizer(tiny_llama(), None, CONFIG, method="rtn")
    result = q.run()                          # the cell `q.run()`: run shows the live view...
    result._ipython_display_()                # ...and IPython displays the returned Quantizer
    assert shown == [q.widget]
    assert q.widget.children[0].children[0].value == 2     # the bar in that one view filled
    shell.execution_count = 2                 # a later cell `q` shows it again, once
    q._ipython_display_()
    q._ipython_display_()
    assert shown == [q.widget, q.widget]
