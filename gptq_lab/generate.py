"""Greedy generation, two ways, and the decode-speed figures measured on them.

    model = prepare_model(gptq_lab.load("out/", device="cuda"))   # kernels chosen once
    model = prepare_model(gptq_lab.load("out/", device="cuda"), fuse=True)    # q/k/v: one matmul
    ids = StaticGreedy(model)(prompt_ids, 128)      # static KV cache, compiled step, CUDA graphs
    ids = eager_greedy(model, prompt_ids, 128)      # transformers' generate, its default cache
    report = measure_decode(model, "fast", DecodeSettings())      # {figure: value}
    model = random_llama("7b", "cuda")              # Llama-2-7B-shaped, random fp16 weights

``StaticGreedy`` runs the prompt (prefill) uncompiled into a transformers ``StaticCache`` and
each later token through ``torch.compile(fullgraph=True)``, with one cache per (batch, cache
length), reused. On a GPU the compiled step of each cache is recorded once in a CUDA graph of
its own and replayed per token, so a token costs one graph launch on the host (no dynamo guard
checks, no Python per layer); on CPU inductor runs it alone. The same loop serves float and
quantized models, so their speeds compare on the same path. Engine code: returns data, prints
nothing.
"""
from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from .fuse import fuse_model
from .qlinear import quant_linears

PATHS = ("eager", "fast")


def prepare_model(model: nn.Module, release_checkpoint: bool = False, cuda_decode: bool = False,
                  fuse: bool = False) -> nn.Module:
    """``QuantLinear.prepare`` every quantized layer (after the model is on its device) and
    return the model. ``release_checkpoint`` frees the checkpoint-layout ``qweight`` of layers
    that got a kernel layout: the model then runs but cannot be saved. ``cuda_decode`` keeps
    the CUDA decode kernel's layout instead of the Triton one (faster decoding, same memory;
    see ``QuantLinear.prepare``), made for the model's dtype (``activation_dtype``).
    ``fuse`` first fuses, in place, the quantized linears that read the same input (q/k/v,
    gate/up; ``gptq_lab.fuse.fuse_model``) so each group is one matmul; groups that cannot fuse
    are left as they are. A fused model runs (and compiles) but cannot be saved as a GPTQ
    checkpoint (its state_dict names changed; ``save`` refuses it): save first, or reload."""
    if fuse:
        fuse_model(model)
    act_dtype = activation_dtype(model)
    for layer in quant_linears(model).values():
        layer.prepare(release_checkpoint=release_checkpoint, cuda_decode=cuda_decode, act_dtype=act_dtype)
    return model


def activation_dtype(model: nn.Module) -> torch.dtype | None:
    """The dtype the model computes in: that of its first float16/bfloat16 parameter (QuantLinear
    holds buffers only, so this is an embedding or a norm), or None for a float32 model."""
    return next((p.dtype for p in model.parameters() if p.dtype in (torch.float16, torch.bfloat16)), None)


def weight_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters and buffers, each storage once (tied weights)."""
    seen, total = set(), 0
    for t in [*model.parameters(), *model.buffers()]:
        if t.numel() and t.data_ptr() not in seen:
            seen.add(t.data_ptr())
            total += t.numel() * t.element_size()
    return total


@torch.no_grad()
def eager_greedy(model: nn.Module, ids: torch.Tensor, new_tokens: int) -> torch.Tensor:
    """ids [B, T] -> [B, T + new_tokens] by transformers' ``generate`` (greedy, default dynamic
    cache, no compilation); exactly ``new_tokens`` are produced (end-of-text is ignored)."""
    ids = ids.to(_device(model))
    return model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, do_sample=False, pad_token_id=0,
                          disable_compile=True, cache_implementation=None)


def _cache_kwarg(model: nn.Module) -> str:
    """transformers >= 5.x names the cache argument ``cache``; earlier ones ``past_key_values``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


class _Step(nn.Module):
    """One decode step: tokens [B, 1] at ``position`` [1] -> the greedy next tokens [B, 1]."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.cache_kwarg = _cache_kwarg(model)

    def forward(self, tokens: torch.Tensor, cache, position: torch.Tensor) -> torch.Tensor:
        logits = self.model(input_ids=tokens, cache_position=position, use_cache=True,
                            **{self.cache_kwarg: cache}).logits                   # [B, 1, V]
        return logits[:, -1].argmax(-1, keepdim=True)


def compile_mode(mode: str | None, pdl: bool) -> dict:
    """torch.compile's keyword for ``mode``, as ``options`` when programmatic dependent launch is
    added (torch.compile takes a mode or options, not both)."""
    if not pdl:
        return {"mode": mode}
    from torch._inductor import list_mode_options
    return {"options": {**list_mode_options(mode or "default"), "triton.enable_pdl": True}}


def _pdl_available(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


class _GraphedStep:
    """One cache's compiled decode step recorded in a CUDA graph. Each ``graph.replay()`` decodes
    ``token`` [B, 1] at ``position`` [1] and leaves the next token in ``token`` and the next
    position in ``position``, so a token costs the host one graph launch."""

    def __init__(self, step: Callable, uncompiled: Callable, cache, batch: int, device: torch.device,
                 warmup: int = 2):
        self.token = torch.zeros((batch, 1), dtype=torch.long, device=device)
        self.position = torch.zeros(1, dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)             # warm-up off the default stream, as capture wants
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            uncompiled(self.token, cache, self.position)   # fills the cache's lazy layers, tunes kernels
            for _ in range(warmup):                  # compile (for the filled cache, as it will run)
                step(self.token, cache, self.position)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.token.copy_(step(self.token, cache, self.position))
            self.position.add_(1)


class StaticGreedy:
    """Greedy decoding with a static KV cache and a compiled decode step.

    compile: wrap the step in ``torch.compile(fullgraph=True, mode=mode, dynamic=dynamic)``;
    False runs the same loop uncompiled (for tests and CPUs where compiling costs more than it
    saves). With ``dynamic=None`` (torch's default) the first (batch, cache length) compiles
    static and a second one recompiles with those sizes symbolic.

    graphs: record the compiled step of each (batch, cache length) in a CUDA graph of our own
    when its cache is first made (``cache``), and replay it per token. None (default): on when
    compiling on a CUDA device. Replaying skips what a compiled call costs the host each time:
    dynamo's guard checks over every layer's tensors (1.2 ms per step of the fused int4 7B model
    under the profiler, against a 2.3 ms GPU step), then the graph launch. ``graphs=False`` with
    ``mode="reduce-overhead"`` gives torch's own CUDA graphs instead (the first step of each new
    shape then runs uncompiled, so kernels tune themselves outside graph capture).

    pdl: inductor launches its own Triton kernels as programmatic dependents
    (``triton.enable_pdl``), so each kernel's start overlaps the previous one's tail; with the
    CUDA decode kernel, which lets its dependents start early too, the weights of the next matmul
    stream while the norms and rotary run. None (default): on for CUDA cards of compute
    capability 9 and up (Hopper), where the launch attribute exists.
    """

    def __init__(self, model: nn.Module, compile: bool = True, mode: str | None = None,
                 dynamic: bool | None = None, pdl: bool | None = None, graphs: bool | None = None):
        self.device = device = _device(model)
        self.model = model
        self.uncompiled = _Step(model)
        self.compiled = compile
        self.graphs = compile and device.type == "cuda" if graphs is None else graphs
        if self.graphs and (not compile or mode == "reduce-overhead"):
            raise ValueError("graphs=True records the compiled step itself: use it with compile=True and "
                             "without mode='reduce-overhead' (torch's own CUDA graphs)")
        if self.graphs and device.type != "cuda":
            raise ValueError(f"graphs=True needs the model on a CUDA device, not {device}")
        self.pdl = _pdl_available(device) if pdl is None else pdl
        self.step = (torch.compile(self.uncompiled, fullgraph=True, dynamic=dynamic,
                                   **compile_mode(mode, self.pdl))
                     if compile else self.uncompiled)
        self._caches: dict[tuple[int, int], object] = {}
        self._graphed: dict[tuple[int, int], _GraphedStep] = {}
        self._stepped: set[tuple[int, int]] = set()           # shapes the compiled step has run

    @torch.no_grad()
    def cache(self, batch: int, length: int):
        """The StaticCache for (batch, length), zeroed (one per shape, so CUDA graphs keep their
        addresses). With ``graphs``, a new shape's step is compiled and recorded here."""
        from transformers import StaticCache
        key = (batch, length)
        if key not in self._caches:
            self._caches[key] = StaticCache(config=self.model.config, max_cache_len=length)
            if self.graphs:                           # its warm-up writes the cache: reset below
                self._graphed[key] = _GraphedStep(self.step, self.uncompiled, self._caches[key],
                                                  batch, self.device)
        cache = self._caches[key]
        cache.reset()
        return cache

    @torch.no_grad()
    def prefill(self, ids: torch.Tensor, cache) -> torch.Tensor:
        """Run the prompt ids [B, T] into ``cache`` (uncompiled); -> first new tokens [B, 1]."""
        position = torch.arange(ids.shape[1], device=ids.device)
        logits = self.model(input_ids=ids, cache_position=position, use_cache=True, logits_to_keep=1,
                            **{self.uncompiled.cache_kwarg: cache}).logits          # [B, 1, V]
        return logits[:, -1].argmax(-1, keepdim=True)

    @torch.no_grad()
    def steps(self, token: torch.Tensor, cache, start: int, count: int) -> Iterator[torch.Tensor]:
        """Decode ``count`` tokens after ``token`` [B, 1] at position ``start`` of ``cache``
        (from ``self.cache``, filled up to ``start``): yields each next token [B, 1], valid until
        the next one is asked for (copy it to keep it)."""
        key = next((k for k, c in self._caches.items() if c is cache), None)
        if key is None:
            raise ValueError("cache is not one of this StaticGreedy's: get it from .cache(batch, length)")
        if start + count > key[1]:
            raise ValueError(f"{count} steps from position {start} overrun the cache's {key[1]} positions")
        graphed = self._graphed.get(key)
        if graphed is not None:
            graphed.token.copy_(token)
            graphed.position.fill_(start)
            for _ in range(count):
                graphed.graph.replay()
                yield graphed.token
            return
        positions = torch.arange(start, start + count, device=token.device)
        for i in range(count):
            step = self.step if key in self._stepped else self.uncompiled
            if step is not self.uncompiled:
                torch.compiler.cudagraph_mark_step_begin()
            elif self.compiled:
                self._stepped.add(key)                # the next step of this shape compiles
            token = step(token, cache, positions[i:i + 1]).clone()     # graphs reuse outputs
            yield token

    @torch.no_grad()
    def __call__(self, ids: torch.Tensor, new_tokens: int, cache_length: int | None = None) -> torch.Tensor:
        """ids [B, T] -> [B, T + new_tokens]. ``cache_length`` (default T + new_tokens) fixes the
        cache shape, so calls with fewer tokens reuse the compiled step of longer ones."""
        if new_tokens < 1:
            raise ValueError(f"new_tokens={new_tokens}; ask for at least 1")
        ids = ids.to(self.device)
        b, t = ids.shape
        length = cache_length or t + new_tokens
        if length < t + new_tokens - 1:
            raise ValueError(f"cache_length={length} cannot hold a {t}-token prompt and {new_tokens} new tokens")
        cache = self.cache(b, length)
        out = torch.empty((b, t + new_tokens), dtype=ids.dtype, device=ids.device)
        out[:, :t] = ids
        first = out[:, t:t + 1] = self.prefill(ids, cache)
        for i, token in enumerate(self.steps(first, cache, t, new_tokens - 1)):
            out[:, t + i + 1:t + i + 2] = token
        return out


# Llama shapes for speed measurements (random weights): Llama-2-7B, the GQA Llama-3-8B, and a tiny
# one for CPU runs and tests.
LLAMA_SHAPES = {
    "7b": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 32, "vocab_size": 32000, "max_position_embeddings": 4096},
    "8b": {"hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
           "num_key_value_heads": 8, "vocab_size": 128256, "max_position_embeddings": 8192,
           "rope_theta": 500000.0},
    "tiny": {"hidden_size": 128, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4,
             "num_key_value_heads": 2, "vocab_size": 256, "max_position_embeddings": 256},
}


def random_llama(shape: str, device: torch.device | str, dtype: torch.dtype = torch.float16) -> nn.Module:
    """A Llama of ``LLAMA_SHAPES[shape]`` with random weights, made on ``device`` (no CPU copy):
    norms 1, every other weight N(0, 0.02), as the model's own init would draw them (seed 0, so
    two calls give the same model). For speed and memory figures only: its text is noise."""
    from transformers import LlamaConfig, LlamaForCausalLM
    if shape not in LLAMA_SHAPES:
        raise ValueError(f"shape={shape!r}; use one of {', '.join(LLAMA_SHAPES)}")
    config = LlamaConfig(**LLAMA_SHAPES[shape], tie_word_embeddings=False, attn_implementation="sdpa")
    default = torch.get_default_dtype()
    try:
        torch.set_default_dtype(dtype)
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    device = torch.device(device)
    model = model.to_empty(device=device)
    gen = torch.Generator(device).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.fill_(1.0) if name.endswith("norm.weight") else p.normal_(0.0, 0.02, generator=gen)
        with torch.device(device):                         # buffers are not parameters: rebuild
            model.model.rotary_emb = type(model.model.rotary_emb)(config)
    return model.eval()


# ---------------------------------------------------------------------- measurement

@dataclass(frozen=True)
class DecodeSettings:
    """What ``measure_decode`` times. Decode rates exclude the prompt: (new_tokens - 1) * batch
    tokens over t(new_tokens) - t(1), each the median of ``repeats`` runs after ``warmup``;
    prefill is long_prompt / t(1) at batch 1."""
    prompt: int = 32
    long_prompt: int = 2048
    new_tokens: int = 128
    batches: tuple[int, ...] = (8, 32)
    repeats: int = 3                  # odd: a true median (the same int4 model varied ~5% between runs)
    warmup: int = 1
    vocab: int | None = None          # token ids drawn below this (default: the model's vocab)
    seed: int = 0
    compile: bool = True              # the fast path's step under torch.compile (False: same loop, eager)
    decode: bool = True               # False: only the prefill figure (and memory); no decode step runs


def figure_names(settings: DecodeSettings) -> list[str]:
    """The keys of ``measure_decode``'s result, in table order (tokens/s, then GB)."""
    s = settings
    if not s.decode:
        return [f"prefill p{s.long_prompt}", "weights GB", "peak GB"]
    return ([f"decode b1 p{s.prompt}", f"decode b1 p{s.long_prompt}", f"prefill p{s.long_prompt}"]
            + [f"decode b{b} p{s.prompt}" for b in s.batches] + ["weights GB", "peak GB"])


def measure_decode(model: nn.Module, path: str, settings: DecodeSettings | None = None,
                   progress: Callable[[str], None] | None = None) -> dict[str, float]:
    """Decode and prefill tokens/s of ``model`` on ``path`` ("eager": transformers' generate;
    "fast": StaticGreedy) and its memory: weights GB (parameters and buffers) and peak GB (the
    device's peak allocation during the runs; NaN on CPU). Keys: ``figure_names(settings)``.
    A compiled fast path ends with ``torch._dynamo.reset()``: each call compiles the same step
    function anew, and past dynamo's recompile limit later models would silently run
    uncompiled (other compiled code of the session recompiles on its next call)."""
    if path not in PATHS:
        raise ValueError(f"path={path!r}; use one of {PATHS}")
    s = settings or DecodeSettings()
    device = _device(model)
    vocab = s.vocab or model.config.vocab_size
    gen = torch.Generator().manual_seed(s.seed)

    def prompt(batch: int, length: int) -> torch.Tensor:
        return torch.randint(0, vocab, (batch, length), generator=gen).to(device)

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    fast = StaticGreedy(model, compile=s.compile and s.decode) if path == "fast" else None

    def run(ids: torch.Tensor, n: int) -> None:
        if fast is not None:
            fast(ids, n, cache_length=ids.shape[1] + s.new_tokens)
        else:
            eager_greedy(model, ids, n)

    out: dict[str, float] = {}
    shapes = [(1, s.prompt, f"decode b1 p{s.prompt}"), (1, s.long_prompt, f"decode b1 p{s.long_prompt}")]
    shapes += [(b, s.prompt, f"decode b{b} p{s.prompt}") for b in s.batches]
    if not s.decode:                                          # the long prompt's prefill alone
        shapes = [(1, s.long_prompt, f"prefill p{s.long_prompt}")]
    for batch, length, name in shapes:
        if progress:
            progress(f"{path}: {name}")
        ids = prompt(batch, length)
        if s.decode:
            full = _median_time(lambda ids=ids: run(ids, s.new_tokens), device, s.warmup, s.repeats)
        first = _median_time(lambda ids=ids: run(ids, 1), device, s.warmup, s.repeats)
        if s.decode:
            decode = full - first                # NaN when timing noise swamps the decode time
            out[name] = batch * (s.new_tokens - 1) / decode if decode > 0 else float("nan")
        if length == s.long_prompt and batch == 1:
            out[f"prefill p{s.long_prompt}"] = length / first
    if fast is not None and s.compile:
        torch._dynamo.reset()
    out["weights GB"] = weight_bytes(model) / 1e9
    out["peak GB"] = torch.cuda.max_memory_allocated(device) / 1e9 if device.type == "cuda" else float("nan")
    return {k: out[k] for k in figure_names(s)}


def _median_time(fn: Callable[[], None], device: torch.device, warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(repeats, 1)):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return sorted(times)[len(times) // 2]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
