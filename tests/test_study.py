"""Calibration studies: held-out windows, mixtures, the saturation rule, cross-domain and sweep runs."""
import pytest
import torch
from test_lab_common import OTHER, TEXT, TinyTokenizer, tiny_llama

from gptq_lab import QuantConfig, data
from gptq_lab.errors import CalibrationError
from gptq_lab.study import (
    Runner,
    apportion,
    calibration_sets,
    cross_domain,
    enough_samples,
    eval_sets,
    heldout_starts,
    heldout_windows,
    load_windows,
    mixture_windows,
    sample_sweep,
    save_windows,
    study_windows,
)

CONFIG = QuantConfig(bits=4, group_size=32)


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    d = tmp_path_factory.mktemp("corpora")
    files = {"prose": d / "prose.txt", "code": d / "code.txt"}
    files["prose"].write_text(TEXT)
    files["code"].write_text(OTHER)
    return {k: str(v) for k, v in files.items()}


def test_heldout_starts_avoid_the_eval_region():
    starts = heldout_starts(10_000, 64, lo=500, hi=3_000, n_samples=2_000, seed=0)
    assert len(starts) == 2_000
    assert all(s + 64 <= 500 or 3_000 <= s <= 10_000 - 64 - 1 for s in starts)
    assert min(starts) < 500 and max(starts) >= 3_000                    # both sides are used
    assert starts == heldout_starts(10_000, 64, 500, 3_000, 2_000, 0)    # deterministic
    assert heldout_starts(600, 64, lo=30, hi=560, n_samples=3, seed=0) == []


def test_heldout_windows_never_overlap_eval_windows(corpora):
    tok, seqlen = TinyTokenizer(), 16
    ids = data.tokenize(tok, data.load_text(corpora["code"]))
    evals = data.eval_windows(tok, corpora["code"], 4, seqlen)
    lo = int(0.05 * len(ids))
    assert torch.equal(evals.flatten(), ids[lo:lo + 4 * seqlen])
    # the text repeats, so compare positions: rebuild each window's start from a position-coded copy
    calib = heldout_windows(tok, (corpora["code"],), 64, seqlen, seed=3, eval_sets=(corpora["code"],),
                            eval_windows=4)
    starts = heldout_starts(len(ids), seqlen, lo, lo + 4 * seqlen, 64, 3)
    assert torch.equal(calib, torch.stack([ids[s:s + seqlen] for s in starts]))
    assert all(s + seqlen <= lo or s >= lo + 4 * seqlen for s in starts)


def test_heldout_windows_equal_protocol_windows_when_not_evaluated(corpora):
    tok = TinyTokenizer()
    a = heldout_windows(tok, (corpora["prose"],), 8, 16, seed=0, eval_sets=(corpora["code"],))
    assert torch.equal(a, data.calibration_windows(tok, [corpora["prose"]], 8, 16, 0))
    with pytest.raises(CalibrationError, match="source of its own"):
        heldout_windows(tok, (corpora["prose"], corpora["code"]), 8, 16, eval_sets=(corpora["code"],))


def test_apportion_and_mixture(corpora):
    assert apportion(10, [1, 1, 1]) == [4, 3, 3] and sum(apportion(7, [0.2, 0.5, 0.3])) == 7
    assert apportion(5, [1, 0]) == [5, 0]
    with pytest.raises(CalibrationError):
        apportion(5, [0, 0])
    tok = TinyTokenizer()
    sources = {"prose": (corpora["prose"],), "code": (corpora["code"],)}
    mix = mixture_windows(tok, sources, {"prose": 3, "code": 1}, 8, 16, eval_sets=())
    code_bytes = set(data.tokenize(tok, OTHER).tolist())
    prose_like = [bool(set(w.tolist()) - code_bytes) for w in mix]      # prose has letters code lacks
    assert sum(prose_like) == 6 and not any(prose_like[6:])
    with pytest.raises(CalibrationError, match="not sources"):
        mixture_windows(tok, sources, {"poetry": 1}, 8, 16)


def test_enough_samples_rule():
    # gains per doubling: 10%, 0.56%, 0.11%: enough at the second point
    assert enough_samples([8, 16, 32, 64], [10.0, 9.0, 8.95, 8.94]) == 16
    # a late improvement resets it
    assert enough_samples([8, 16, 32, 64], [10.0, 9.99, 9.0, 8.999]) == 32
    assert enough_samples([8, 16, 32], [10.0, 9.0, 8.0]) is None             # still helping
    assert enough_samples([8, 16], [10.0, 10.5]) == 8                        # worse counts as no help
    with pytest.raises(CalibrationError, match="double"):
        enough_samples([8, 24], [1.0, 1.0])


def test_study_windows_and_file_round_trip(corpora, tmp_path):
    tok = TinyTokenizer()
    sources = {"prose": (corpora["prose"],), "code": (corpora["code"],)}
    w = study_windows(tok, sources, n_samples=4, max_samples=8, seqlen=16, eval_sets=(corpora["code"],),
                      eval_windows=2, kl_windows=2)
    assert w["calib.prose"].shape == (8, 16) and w["calib.code"].shape == (4, 16)
    assert w["calib.mixture"].shape == (4, 16) and w["kl"].shape == (2, 16)
    assert set(calibration_sets(w, 4)) == {"prose", "code", "mixture"}
    assert calibration_sets(w, 4)["prose"].shape == (4, 16)
    assert list(eval_sets(w)) == [corpora["code"]]
    save_windows(tmp_path / "w.safetensors", w)
    back = load_windows(tmp_path / "w.safetensors")
    assert set(back) == set(w) and all(torch.equal(back[k], w[k]) for k in w)


@pytest.fixture(scope="module")
def runs():
    torch.manual_seed(0)
    pool = torch.randint(1, 128, (8, 32))
    calib = {"random": pool[:4], "repeated": pool[:1].repeat(4, 1)}
    evals = {"a": torch.randint(1, 128, (2, 32)), "b": torch.randint(1, 128, (2, 32))}
    loads = []

    def load():
        loads.append(1)
        return tiny_llama()
    runner = Runner(load, evals)
    matrix = cross_domain(load, calib, evals, CONFIG, runner=runner)
    sweep = sample_sweep(load, pool, (2, 4, 8), evals, CONFIG, runner=runner)
    return matrix, sweep, runner, loads


def test_cross_domain_matrix(runs):
    matrix, _, _, _ = runs
    assert matrix.calib == ["random", "repeated"] and matrix.evals == ["a", "b"]
    m = matrix.matrix()
    assert len(m) == 2 and all(len(r) == 2 and all(v > 1 for v in r) for r in m)
    assert set(matrix.perplexity) == {"FP", "random", "repeated"}
    assert all(v > 0 for v in matrix.gptq_loss.values())
    assert matrix.perplexity["random"] != matrix.perplexity["repeated"]    # the calibration matters
    assert set(matrix.best()) == {"a", "b"}
    text = matrix.table()
    assert "FP" in text and "repeated" in text and "*" in text


def test_sample_sweep_reuses_identical_runs(runs):
    _, sweep, runner, loads = runs
    assert sweep.n_samples == [2, 4, 8] and len(sweep.gptq_loss) == 3
    # "random" (pool[:4]) and n=4 are the same run: FP + 2 calibrations + n=2 + n=8
    assert len(runner.done) == 5 and len(loads) == 5
    assert sweep.perplexity["a"][1] == runs[0].perplexity["random"]["a"]
    assert "rule:" in sweep.table() and "a:" in sweep.table()
    with pytest.raises(CalibrationError, match="pool has"):
        sample_sweep(None, torch.zeros(2, 4, dtype=torch.long), (2, 4), {})


def test_study_figures(runs):
    pytest.importorskip("plotly")
    from gptq_lab.lab.studies import cross_domain_figure, sample_curve_figure
    matrix, sweep, _, _ = runs
    fig = cross_domain_figure(matrix)
    assert fig.data[0].type == "heatmap" and fig.data[0].text[0][0] == f"{matrix.matrix()[0][0]:.2f}"
    fig = sample_curve_figure(sweep)
    assert [t.name for t in fig.data] == ["a", "b", "enough samples", "GPTQ loss"]


def test_austen_alias_cannot_calibrate_against_its_own_novel():
    with pytest.raises(CalibrationError, match="six novels"):
        heldout_windows(TinyTokenizer(), ("austen",), 4, 16, eval_sets=("pride_and_prejudice",))
