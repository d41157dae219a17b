"""Quantizer: live heatmap via on_block, results table, requantize, save, interrupts."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("plotly")
from test_lab_common import CONFIG, OTHER, calibrator, no_hooks, tiny_llama

from gptq_lab import CalibrationError, QuantConfig
from gptq_lab.arch import weight_matrix
from gptq_lab.lab import Quantizer
from gptq_lab.lab.calibrator import load_hessians, save_hessians

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


@pytest.fixture(scope="module")
def collected():
    """GPTQ of a tiny Llama whose calibrator (and a second one, on code) has Hessians and means."""
    model, calib, other = tiny_llama(), calibrator(), calibrator(OTHER)
    for c in (calib, other):
        c.collect(model, device="cpu", compute_dtype=torch.float32, progress=False)
    return Quantizer(model, calib, CONFIG, device="cpu").run(progress=False), other


def shares_by_hand(q, ids) -> np.ndarray:
    """||dW mean(x)||^2 / mean ||dW x||^2 per layer from the float model's inputs, [blocks, modules]."""
    xs, handles = {}, []
    for name in q.names:
        def hook(_m, a, n=name):
            xs[n] = a[0].reshape(-1, a[0].shape[-1]).double()                # [tokens, K]
        handles.append(q.reference.get_submodule(name).register_forward_pre_hook(hook))
    with torch.no_grad():
        q.reference(ids)
    for h in handles:
        h.remove()
    out = np.full((q.n_blocks, len(q.family.linears)), np.nan)
    for name, x in xs.items():
        dw = (weight_matrix(q.reference.get_submodule(name)).detach().double()
              - weight_matrix(q.model.get_submodule(name)).detach().double())  # [N, K]
        block, module = name.split(".")[2], name.split(".", 3)[3]
        out[int(block), q.family.linears.index(module)] = \
            float((dw @ x.mean(0)).pow(2).sum() / (x @ dw.T).pow(2).sum(1).mean())
    return out


def test_constant_shift_share_matches_the_layer_inputs(collected):
    q, other = collected
    own, on_other = q.constant_shift_matrix(), q.constant_shift_matrix(on=other)
    assert own.shape == (2, 7) and np.isfinite(own).all() and ((own >= 0) & (own <= 1)).all()
    np.testing.assert_allclose(own, shares_by_hand(q, q.calibrator.ids), rtol=1e-4, atol=1e-7)
    np.testing.assert_allclose(on_other, shares_by_hand(q, other.ids), rtol=1e-4, atol=1e-7)
    assert np.abs(own - on_other).max() > 0.05                        # the inputs' mean matters


def test_constant_shift_figure_axes(collected):
    q, other = collected
    fig = q.constant_shift_figure()
    trace = fig.data[0]
    assert list(trace.x) == list(q.family.linears) and list(trace.y) == ["0", "1"]
    np.testing.assert_allclose(np.asarray(trace.z, dtype=float), q.constant_shift_matrix())
    assert (trace.zmin, trace.zmax) == (0, 1) and "its calibration data" in fig.layout.title.text
    assert repr(other.name) in q.constant_shift_figure(on=other).layout.title.text


def test_constant_shift_needs_hessians_and_means(tmp_path, capsys):
    model = tiny_llama()
    with pytest.raises(CalibrationError, match="has no Hessians"):          # never collected
        Quantizer(model, calibrator(), CONFIG, method="rtn").run(progress=False).constant_shift_figure()
    with pytest.raises(CalibrationError, match="pass on="):
        Quantizer(model, None, CONFIG, method="rtn").run(progress=False).constant_shift_matrix()
    calibrator().collect(model, device="cpu", cache_dir=tmp_path, progress=False)
    path = next(tmp_path.glob("hessians-*.safetensors"))
    hessians, absmax, means = load_hessians(path)
    save_hessians(path, hessians, absmax)                                  # a cache from before means
    again, seen = calibrator(), []
    again.collect(model, device="cpu", cache_dir=tmp_path, progress=lambda d, t, m: seen.append(d))
    assert seen and set(load_hessians(path)[2]) == set(means)               # collected anew, rewritten
    q = Quantizer(model, again, CONFIG, method="rtn").run(progress=False)
    assert np.isfinite(q.constant_shift_matrix()).all()
    again.means = {}                                                       # means lost some other way
    assert np.isfinite(q.loss_matrix()).all()                             # the Hessians still serve
    with pytest.raises(CalibrationError, match="no mean input for 14 .*model.layers.0.self_attn.q_proj"):
        q.constant_shift_figure()
    save_hessians(path, hessians, absmax)
    capsys.readouterr()
    calibrator().collect(model, device="cpu", cache_dir=tmp_path, progress=False)
    assert capsys.readouterr().out == ""                                   # progress=False: silent


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
