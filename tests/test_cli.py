"""The gptq-lab command: help texts, errors, and (with the demo assets) a real run."""
import pytest

from gptq_lab import cli, data
from gptq_lab.errors import AssetMissingError


@pytest.mark.parametrize("verb", ["fetch", "demo", "quantize", "eval", "inspect"])
def test_every_verb_has_help_with_examples(verb, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main([verb, "--help"])
    assert e.value.code == 0
    assert "example" in capsys.readouterr().out


def test_bad_config_is_a_clear_error_not_a_traceback(capsys, monkeypatch):
    monkeypatch.setattr(data, "load_model", lambda name: pytest.fail("must validate before loading"))
    assert cli.main(["quantize", "demo", "--bits", "5"]) == 2
    assert "bits=5 is not supported; use 2, 3, 4 or 8" in capsys.readouterr().err


def test_missing_assets_name_the_fetch_command(capsys, monkeypatch, tmp_path):
    monkeypatch.setenv("GPTQ_LAB_CACHE", str(tmp_path))
    assert cli.main(["quantize", "demo", "--method", "rtn"]) == 2
    assert "gptq-lab fetch" in capsys.readouterr().err


def _assets_cached() -> bool:
    try:
        data.demo_model_path()
        data.corpus("pride_and_prejudice")
        return True
    except AssetMissingError:
        return False


@pytest.mark.slow
@pytest.mark.skipif(not _assets_cached(), reason="demo assets not fetched (run `gptq-lab fetch`)")
def test_quantize_the_demo_model_from_the_command_line(capsys):
    code = cli.main(["quantize", "demo", "--bits", "4", "--n-samples", "4", "--seqlen", "128",
                     "--eval", "--windows", "2"])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "quantized 210 linear layers with gptq" in out
    ppl = float(out.split("perplexity on pride_and_prejudice (2 windows):")[1].split()[0])
    assert 5 < ppl < 100, ppl
