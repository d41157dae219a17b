"""Calibrator: sources, strategies, summary, Hessian collection, disk cache, compare."""
import numpy as np
import pytest
import torch

pytest.importorskip("plotly")
from test_lab_common import OTHER, TEXT, TinyTokenizer, calibrator, no_hooks, tiny_llama

from gptq_lab import CalibrationError
from gptq_lab.data import calibration_windows
from gptq_lab.lab import Calibrator


def test_random_strategy_is_the_protocol(tmp_path):
    tok = TinyTokenizer()
    f = tmp_path / "book.txt"
    f.write_text(TEXT)
    c = Calibrator(tok, [str(f), OTHER], n_samples=6, seqlen=40, seed=3)
    assert torch.equal(c.ids, calibration_windows(tok, [str(f), [OTHER]], n_samples=6, seqlen=40, seed=3))
    assert list(c.shares) == ["book.txt", "text 1"] and sum(c.shares.values()) == 240


def test_mixture_and_packed_strategies():
    tok = TinyTokenizer()
    mix = Calibrator(tok, {"a": TEXT, "b": OTHER}, n_samples=8, seqlen=16, strategy="mixture", weights=[3, 1])
    assert mix.shares == {"a": 6 * 16, "b": 2 * 16}
    docs = [f"document {i} " * (5 + i) for i in range(30)]
    packed = Calibrator(tok, {"docs": docs}, n_samples=5, seqlen=32, strategy="packed")
    assert packed.ids.shape == (5, 32) and (packed.ids == 0).any()         # EOS between documents
    assert len(packed.doc_lengths) == 30
    with pytest.raises(CalibrationError, match="packed documents give"):
        Calibrator(tok, {"docs": docs[:2]}, n_samples=50, seqlen=32, strategy="packed")
    with pytest.raises(CalibrationError, match="strategy"):
        Calibrator(tok, TEXT, strategy="nope")


def test_summary_repr_and_figure():
    c = calibrator()
    s = c.summary()
    assert s["tokens"] == 8 * 32 and s["shares"] == {"austen": 256}
    text = repr(c)
    assert "8 x 32 tokens (random)" in text and "not collected" in text
    fig = c.figure()
    assert list(fig.data[0].y) == [256] and fig.data[2].y[0] == max(s["top_tokens"][0][1], 0)


def test_collect_estimates_memory_caches_to_disk(tmp_path):
    model, c = tiny_llama(), calibrator()
    est = c.estimate_memory(model)
    assert est.hessian_bytes == 2 * (3 * 64 * 64 + 128 * 128) * 4 and "MiB" in str(est)
    seen = []
    hs = c.collect(model, device="cpu", cache_dir=tmp_path, progress=lambda d, t, m: seen.append(d))
    assert seen == [1, 2] and len(list(tmp_path.glob("hessians-*.safetensors"))) == 1
    c2 = calibrator()
    hs2 = c2.collect(model, device="cpu", cache_dir=tmp_path, progress=lambda *a: pytest.fail("recomputed"))
    assert set(hs2) == set(hs) and all(torch.equal(hs[n], hs2[n]) for n in hs)
    assert hs2["model.layers.0.self_attn.q_proj"] is hs2["model.layers.0.self_attn.v_proj"]
    assert set(c2.absmax) == set(hs) and "14 layers" in repr(c2)
    assert set(c2.means) == set(hs) and all(torch.equal(c.means[n], c2.means[n]) for n in hs)


def test_interrupted_collect_leaves_no_hooks_and_model_usable():
    model, c = tiny_llama(), calibrator()
    before = {k: v.clone() for k, v in model.state_dict().items()}

    def stop(done, total, msg):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        c.collect(model, device="cpu", progress=stop)
    assert no_hooks(model) and c.hessians is None
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with torch.no_grad():
        assert torch.isfinite(model(c.ids[:1]).logits).all()


def test_compare_similarity_and_cross_loss():
    model = tiny_llama()
    a, b = calibrator(), calibrator(OTHER)
    df = a.compare(b, model, layers=["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"],
                   progress=False) if a.collect(model, device="cpu", progress=False) else None
    assert list(df.columns) == ["layer", "similarity", "loss_own", "loss_cross", "cross_ratio"]
    assert ((df.similarity > 0) & (df.similarity <= 1 + 1e-6)).all()
    assert (df.cross_ratio > 0.99).all()
    same = a.compare(a, model, cross=False, progress=False)
    np.testing.assert_allclose(same.similarity, 1, rtol=1e-5)
    fig = a.compare_figure(df, "code")
    assert list(fig.data[1].y) == list(df.cross_ratio)


def test_dataset_source_and_core_imports_without_lab_deps():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [TEXT, "", OTHER]})
    c = Calibrator(TinyTokenizer(), {"ds": ds}, n_samples=4, seqlen=16, strategy="packed")
    assert c.ids.shape == (4, 16) and len(c.doc_lengths) == 2           # the empty row is dropped
    import subprocess
    import sys
    code = ("import sys; [sys.modules.__setitem__(m, None) for m in ('plotly', 'ipywidgets', 'pandas')]; "
            "import gptq_lab, gptq_lab.hessians, gptq_lab.pipeline; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         check=False)
    assert out.stdout.strip() == "ok", out.stderr[-2000:]


def test_collect_only_named_layers_then_add_more(tmp_path):
    model, c = tiny_llama(), calibrator()
    full = calibrator().collect(model, device="cpu", progress=False)
    first = ["model.layers.0.mlp.down_proj"]
    seen = []
    hs = c.collect(model, device="cpu", names=first, cache_dir=tmp_path,
                   progress=lambda d, t, m: seen.append((d, t)))
    assert set(hs) == set(first) and set(c.absmax) == set(first) and "1 layers" in repr(c)
    assert seen == [(1, 1)]                   # stopped after block 0: block 1 never ran
    torch.testing.assert_close(hs[first[0]], full[first[0]])
    more = ["model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.k_proj"]
    hs = c.collect(model, device="cpu", names=more, progress=False)          # same model: added
    assert set(hs) == set(first + more) and hs[more[0]] is hs[more[1]]
    assert all(torch.allclose(hs[n], full[n], rtol=1e-5, atol=1e-6) for n in hs)
    assert len(list(tmp_path.glob("hessians-*.safetensors"))) == 1
    c2 = calibrator()                         # the subset's cache file is its own
    assert set(c2.collect(model, device="cpu", cache_dir=tmp_path, names=first, progress=False)) == set(first)
    assert set(c2.collect(model, device="cpu", cache_dir=tmp_path, progress=False)) == set(full)
    with pytest.raises(KeyError, match="no quantizable linear"):
        c.collect(model, device="cpu", names=["model.layers.9.mlp.up_proj"], progress=False)
