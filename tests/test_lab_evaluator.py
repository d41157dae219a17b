"""Evaluator: perplexity / KL / top-1 table, figures, per-layer errors, generations."""
import numpy as np
import pytest
import torch

pytest.importorskip("plotly")
from test_lab_common import CONFIG, OTHER, TEXT, TinyTokenizer, no_hooks, tiny_llama

from gptq_lab import quantize_model
from gptq_lab.lab import Evaluator


@pytest.fixture(scope="module")
def ev():
    fp, q = tiny_llama(), tiny_llama()
    quantize_model(q, None, CONFIG, method="rtn")
    e = Evaluator({"fp": fp, "rtn": q}, TinyTokenizer(), eval_sets={"prose": [TEXT], "code": [OTHER]},
                  n_windows=2, seqlen=32)
    e.run(progress=False)
    return e


def test_run_table_and_figure(ev):
    r = ev.results
    assert len(r) == 4 and set(r.eval_set) == {"prose", "code"}
    fp = r[r.model == "fp"]
    assert (fp.kl == 0).all() and (fp.top1 == 1).all()
    rtn = r[r.model == "rtn"]
    assert (rtn.kl > 0).all() and (rtn.perplexity > 1).all()
    t = ev.table()
    assert list(t.index) == ["fp", "rtn"] and {"ppl prose", "ppl code", "kl", "memory_mb"} <= set(t.columns)
    assert t.loc["rtn", "quantized_linears_mb"] < t.loc["fp", "memory_mb"]
    fig = ev.figure()
    assert len(fig.data) == 6 and "2 windows per set" in fig.layout.title.text
    assert "reference 'fp'" in repr(ev) and "ppl prose" in repr(ev)


def test_layer_errors_use_scoped_hooks(ev):
    df = ev.layer_errors()
    assert list(df.columns) == ["rtn"] and len(df) == 14 and (df.rtn > 0).all()
    assert all(no_hooks(m) for m in ev.models.values())
    fig = ev.layer_error_figure()
    np.testing.assert_allclose(fig.data[0].y, df.rtn)


def test_generate_and_speed(ev):
    g = ev.generate("It is a truth", max_new_tokens=4)
    assert list(g.index) == ["fp", "rtn"] and all(len(t) == 4 for t in g.text)
    s = ev.speed(n_windows=1)
    assert (s.forward_tokens_per_s > 0).all()
    assert "forward_tokens_per_s" in ev.table().columns


def test_interrupted_run_keeps_models_clean():
    fp = tiny_llama()
    e = Evaluator({"fp": fp, "b": tiny_llama(1)}, TinyTokenizer(), eval_sets={"p": [TEXT]}, n_windows=1,
                  seqlen=16)

    def stop(*a):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        e.run(progress=stop)
    with pytest.raises(KeyboardInterrupt):
        e.layer_errors(progress=stop)
    assert no_hooks(fp) and torch.isfinite(fp(e.windows("p")).logits).all()
