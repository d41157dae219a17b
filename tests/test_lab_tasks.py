"""Evaluator.tasks: lm-evaluation-harness on a local multiple-choice task, offline."""
import os

os.environ["HF_DATASETS_OFFLINE"] = "1"      # before datasets / lm_eval are imported
os.environ["HF_HUB_OFFLINE"] = "1"

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("plotly")
pytest.importorskip("lm_eval")
from test_lab_common import CONFIG, TinyTokenizer, tiny_llama

from gptq_lab.errors import ConfigError, ExtraMissingError, TaskDataError
from gptq_lab.lab import Evaluator, Quantizer
from gptq_lab.lab.tasks import score

DATA = Path(__file__).parent / "data" / "lm_eval"
TASK = DATA / "gptq_lab_tiny_mc.yaml"
LIMIT = 8


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub: also for modules that read the flags before this file set them. One torch
    thread: the tiny model's matmuls run several times faster so on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as mp:
        for mod, attr in (("datasets.config", "HF_HUB_OFFLINE"), ("huggingface_hub.constants", "HF_HUB_OFFLINE")):
            if mod in sys.modules:
                mp.setattr(sys.modules[mod], attr, True)
        yield
    torch.set_num_threads(threads)


def char_tokenizer():
    """A Hugging Face tokenizer built in code: one token per printable ASCII character."""
    import transformers as tf
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<eos>": 0, "<unk>": 1, "\n": 2} | {chr(i): i - 29 for i in range(32, 127)}   # ids < 98
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    tok.decoder = decoders.Fuse()
    return tf.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>",
                                      pad_token="<eos>")


def destroyed(model, seed=1):
    """The same model with noise far larger than its weights on every linear."""
    model = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(torch.randn(m.weight.shape, generator=gen) * 10 * m.weight.std())
    return model


@pytest.fixture(scope="module")
def scored(tmp_path_factory):
    """The float model, its destroyed copy, and a 4-bit checkpoint of it (QuantLinear layers)."""
    fp = tiny_llama()
    ckpt = Quantizer(fp, None, CONFIG, method="rtn").run(progress=False).save(
        tmp_path_factory.mktemp("ckpt") / "rtn4")
    ev = Evaluator({"fp": fp, "noisy": destroyed(fp), "ckpt": ckpt}, char_tokenizer(), batch_size=4)
    assert type(ev.models["ckpt"].model.layers[0].mlp.down_proj).__name__ == "QuantLinear"
    table, fig = ev.tasks([str(TASK)], limit=LIMIT)
    return ev, table, fig


def test_scores_are_accuracies_over_the_expected_docs(scored):
    ev, table, fig = scored
    assert list(table.columns) == ["model", "task", "metric", "value", "stderr", "n_docs"]
    assert sorted(zip(table.model, table.metric)) == [(m, k) for m in ("ckpt", "fp", "noisy")
                                                      for k in ("acc", "acc_norm")]
    assert (table.task == "gptq_lab_tiny_mc").all() and (table.n_docs == LIMIT).all()
    assert table.value.between(0, 1).all() and (table.stderr >= 0).all()
    for v in table.value:                                 # a mean over LIMIT docs of 0/1 hits
        assert math.isclose(v * LIMIT, round(v * LIMIT), abs_tol=1e-9)
    assert [t.name for t in fig.data] == ["fp", "noisy", "ckpt"]
    assert list(fig.data[0].y) == list(table[table.model == "fp"].value)
    assert ev.task_figure().data[1].error_y.array is not None


def test_same_value_twice_and_through_include_path(scored, monkeypatch):
    ev, table, _ = scored
    rng = torch.random.get_rng_state()
    again = score(ev.models["fp"], ev.tokenizer, [str(TASK)], limit=LIMIT, batch_size=1)
    assert torch.equal(rng, torch.random.get_rng_state())         # lm_eval's seeding is undone
    first = table[table.model == "fp"].reset_index(drop=True)
    assert list(again.value) == list(first.value) and list(again.metric) == list(first.metric)
    monkeypatch.chdir(DATA)          # lm_eval reads include_path tasks' data_files from the cwd
    local = score(ev.models["fp"], ev.tokenizer, ["gptq_lab_tiny_mc"], include_path=DATA, limit=LIMIT)
    assert list(local.value) == list(first.value)


def preferred_choices(model, tok, docs) -> list[int]:
    """Our own scoring: the choice with the highest log-likelihood after the question."""
    picks = []
    with torch.no_grad():
        for d in docs:
            n = len(tok(d["question"])["input_ids"])
            ll = []
            for c in d["choices"]:
                ids = torch.tensor([tok(d["question"] + " " + c)["input_ids"]])
                logp = torch.log_softmax(model(ids).logits[0, :-1].double(), -1)
                ll.append(float(logp[torch.arange(n - 1, ids.shape[1] - 1), ids[0, n:]].sum()))
            picks.append(max(range(len(ll)), key=ll.__getitem__))
    return picks


def test_the_scores_come_from_the_models_logits(scored, tmp_path):
    """Answers set to the float model's own preferences: it scores 1.0; the destroyed model
    scores exactly the share of docs where its own preference agrees."""
    ev, _, _ = scored
    tok, gen = ev.tokenizer, torch.Generator().manual_seed(0)
    letters = "abcdefghijklmnopqrstuvwxyz"
    docs = [{"question": f"Q{i}: pick one.", "choices": ["".join(letters[j] for j in torch.randint(
        0, 26, (5,), generator=gen).tolist()) for _ in range(4)]} for i in range(10)]
    fp_pick = preferred_choices(ev.models["fp"], tok, docs)
    noisy_pick = preferred_choices(ev.models["noisy"], tok, docs)
    data = tmp_path / "own.jsonl"
    data.write_text("".join(json.dumps({**d, "answer": a}) + "\n" for d, a in zip(docs, fp_pick)))
    spec = {"task": "gptq_lab_own_choice", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data)}}, "test_split": "test",
            "output_type": "multiple_choice", "doc_to_text": "{{question}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "answer",
            "metric_list": [{"metric": "acc", "aggregation": "mean", "higher_is_better": True}]}
    table, _ = ev.tasks([spec], models=["fp", "noisy"])
    acc = dict(zip(table.model, table.value))
    agree = sum(a == b for a, b in zip(fp_pick, noisy_pick)) / len(docs)
    assert acc["fp"] == 1.0 and agree < 1
    assert acc["noisy"] == pytest.approx(agree)


def test_clear_errors(scored, tmp_path, monkeypatch):
    ev, _, _ = scored
    model, tok = ev.models["fp"], ev.tokenizer
    bad = tmp_path / "missing_data.yaml"
    bad.write_text(TASK.read_text().replace("gptq_lab_tiny_mc.jsonl", "nowhere.jsonl")
                   .replace("task: gptq_lab_tiny_mc", "task: gptq_lab_missing"))
    with pytest.raises(TaskDataError, match="cannot be read"):
        score(model, tok, [str(bad)])
    with pytest.raises(TaskDataError, match="does not exist"):
        score(model, tok, [str(tmp_path / "no_such_task.yaml")])
    from lm_eval.tasks import TaskManager

    from gptq_lab.lab import tasks
    local_only = TaskManager(include_path=str(DATA), include_defaults=False)   # skip the 20 s index
    monkeypatch.setattr(tasks, "task_manager", lambda *a: local_only)
    with pytest.raises(ConfigError, match="unknown lm_eval task"):
        score(model, tok, ["gptq_lab_no_such_task"], include_path=DATA)
    with pytest.raises(ConfigError, match="Hugging Face tokenizer"):
        score(model, TinyTokenizer(), [str(TASK)])
    monkeypatch.setitem(sys.modules, "lm_eval", None)          # as if the extra were not installed
    with pytest.raises(ExtraMissingError, match=r"pip install -e \.\[lmeval\]"):
        score(model, tok, [str(TASK)])
