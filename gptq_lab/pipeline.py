"""Block-by-block quantization of a whole model.

    results = quantize_model(model, calibration_ids, QuantConfig(bits=4))

1. Capture the inputs of the first block (the model runs up to it, then stops).
2. For each block, on the compute device, one at a time:
   accumulate each true-sequential group's Hessian from its input (scoped
   pre-hooks), solve the group with GPTQ, write the quantized weights back, and
   pass the block's output (computed with quantized weights) to the next block.

When the whole calibration set fits in one batch (the default), a block needs a
single forward pass: the hook on a group's first linear sees the complete input,
solves the group on the spot, and the forward continues with quantized weights.
That is exactly true-sequential GPTQ at the cost of one pass per block. With
``batch_size`` smaller than the calibration set, each group takes a pass over the
batches that stops as soon as the group has seen its input, plus a final pass.

The model is left fake-quantized (float weights on the quantization grid); the
returned ``GPTQResult``s hold codes, scales, zeros and diagnostics, and the codes and
zeros already packed in the checkpoint layout (``qweight``/``qzeros``, packed on the
device right after each solve), so ``convert`` only wraps them.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import os
import time
import warnings
from collections.abc import Callable

import torch
from torch import nn

from . import distributed
from .arch import (
    block_linears,
    family_of,
    get_blocks,
    in_out_features,
    is_conv1d,
    set_weight_matrix,
    weight_matrix,
)
from .checks import check_calibration, check_config, check_model, check_weights, linear_names
from .config import QuantConfig
from .errors import ConfigError, NumericalError
from .gptq import GPTQResult, HessianAccumulator, inverse_factor, rtn_result, solve
from .progress import Progress
from .progress import resolve as resolve_progress
from .resume import ResumeError, RunState, fingerprint, module_digest
from .timing import NULL_TIMER, PhaseTimer


class _StopForward(Exception):
    """Raised by a hook to end a forward pass early once it has what it needs."""


@contextlib.contextmanager
def scoped_hooks(handles_factory):
    """Register hooks via ``handles_factory()`` (-> list of handles); always remove them."""
    handles = []
    try:
        handles = handles_factory()
        yield
    finally:
        for h in handles:
            h.remove()


def quantize_model(model: nn.Module, calibration: torch.Tensor | None = None,
                   config: QuantConfig | None = None, method: str = "gptq",
                   device: str | torch.device | None = None, batch_size: int | None = None,
                   progress: Progress | bool | None = None,
                   compute_dtype: torch.dtype | None = None,
                   on_block: Callable[[int, dict[str, GPTQResult]], None] | None = None,
                   *, resume_dir: str | os.PathLike | None = None, offload_activations: bool = False,
                   timer: PhaseTimer | None = None,
                   ) -> dict[str, GPTQResult]:
    """Quantize ``model`` in place (fake-quant) and return name -> GPTQResult (tensors on CPU).

    calibration: LongTensor [n_samples, seqlen] of token ids (not needed for RTN).
    method: "gptq" or "rtn".
    device: where each block runs (default: cuda if available, else cpu). The model itself
        stays where it is (CPU RAM, or memory-mapped weights): only a copy of the current block,
        its Hessians and float32 master weights, and the activations go to ``device``.
    batch_size: calibration samples per forward (default: all at once, one pass per block).
    progress: called as progress(done, total, message) after each block; None draws a
        tqdm.auto bar, False is silent.
    compute_dtype: dtype of the calibration forward (default: see _default_compute_dtype).
    on_block: called as on_block(block_index, {full_name: result}) after each block (live views).
    resume_dir: after each block, write the run's state here (atomically, see gptq_lab.resume);
        a later call with the same model, calibration and settings continues after the last
        finished block and returns exactly what an uninterrupted run returns.
    offload_activations: keep the calibration activations in CPU memory between blocks and move
        one batch at a time to ``device`` (set ``batch_size`` too, or the single batch is the
        whole calibration set).
    timer: a gptq_lab.timing.PhaseTimer that is charged per phase (benchmarks).
    Under torch.distributed (torchrun), see gptq_lab.distributed: every rank calls this with the
    same arguments and gets the same results.
    """
    config = config or QuantConfig()
    if method not in ("gptq", "rtn"):
        raise ConfigError(f"method={method!r} is not known; use 'gptq' or 'rtn'")
    timer = timer or NULL_TIMER
    with timer("checks"):
        check_model(model)
        family = family_of(model)
        blocks = get_blocks(model, family)
        notes = check_config(model, config)
        check_weights(model, linear_names(model))
    for note in dict.fromkeys(n.split(": ", 1)[1] for n in notes):
        warnings.warn(note, stacklevel=2)
    progress = resolve_progress(progress, f"{method} {config.bits}-bit")
    prefix = family.blocks
    if method == "rtn":
        if resume_dir is not None:
            raise ConfigError("resume_dir is for GPTQ runs; RTN takes seconds and has nothing to resume")
        results = _rtn_model(blocks, family, config, prefix, progress, on_block)
        model.gptq_config = config
        return results
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    ids = distributed.shard_calibration(check_calibration(model, calibration))
    dtype = compute_dtype or _default_compute_dtype(model, device)
    store = torch.device("cpu") if offload_activations else device
    state = None
    if resume_dir is not None:
        distributed.refuse("resume_dir")
        with timer("save state"):
            state = RunState(resume_dir, fingerprint(model, blocks, ids, config, method=method, dtype=dtype,
                                                     device=device.type, batch_size=batch_size))
            start, results, hiddens = state.load(blocks)
    else:
        start, results, hiddens = 0, {}, None
    with timer("capture inputs"):
        inputs = capture_block_inputs(model, blocks[0], ids, batch_size, store)
    if start:
        inputs = _restore(blocks, family, results, start, hiddens, inputs, store)
        progress(start, len(blocks), f"resumed after block {start - 1}")
    for i in range(start, len(blocks)):
        t0 = time.perf_counter()
        layer_results, inputs = _quantize_block_copy(blocks[i], family, inputs, device, dtype, config,
                                                     f"{prefix}.{i}", store, timer)
        named = {f"{prefix}.{i}.{n}": r for n, r in layer_results.items()}
        results.update(named)
        if state:
            with timer("save state"):
                state.save(i, named, [h for h, _ in inputs] if i + 1 < len(blocks) else None,
                           module_digest(blocks[i]))
        if on_block:
            on_block(i, named)
        progress(i + 1, len(blocks), f"block {i} in {time.perf_counter() - t0:.1f}s")
    model.gptq_config = config
    return results


def _restore(blocks, family, results, start, hiddens, inputs, store) -> Inputs:
    """Write the saved results of blocks [0, start) into the model; the saved hidden states
    replace the captured ones (the kwargs, the same for every block, are the captured ones)."""
    prefix = family.blocks
    for i in range(start):
        for n, mod in block_linears(blocks[i], family).items():
            set_weight_matrix(mod, results[f"{prefix}.{i}.{n}"].dequantize())
    if start == len(blocks):
        return inputs
    if len(hiddens) != len(inputs):
        raise ResumeError(f"the resume state holds {len(hiddens)} batches of activations, this run has "
                          f"{len(inputs)}; resume with the same batch_size")
    return [(h.to(store), kw) for h, (_, kw) in zip(hiddens, inputs)]


def _default_compute_dtype(model: nn.Module, device: torch.device) -> torch.dtype:
    """float32 models run their calibration forward in bfloat16 on CPU (several times faster on
    CPUs with bf16 matrix units) and in float16 on CUDA, as the reference GPTQ code does.
    Solves always use float32 master weights and float32 Hessians."""
    dtype = next(model.parameters()).dtype
    if dtype != torch.float32:
        return dtype
    return torch.float16 if device.type == "cuda" else torch.bfloat16


def block_to(block: nn.Module, device: torch.device, dtype: torch.dtype,
             moved: dict[int, torch.Tensor] | None = None) -> nn.Module:
    """A copy of ``block`` on ``device``, floating parameters and buffers cast to ``dtype``.
    Each tensor crosses to ``device`` once, in its own dtype, and is cast there: a plain copy
    (a blocking ``.to(cuda, dtype)`` would convert on the CPU first, and an fp16 -> fp32 cast
    doubles the bytes sent), no intermediate CPU copy of the block (memory-mapped weights are
    read once). moved: if given, filled with id(tensor of ``block``) -> its copy on ``device``
    before the cast."""
    memo: dict = {}
    for t in itertools.chain(block.parameters(), block.buffers()):
        on_device = t.detach().to(device, copy=True)
        if moved is not None:
            moved[id(t)] = on_device
        cast = on_device.to(dtype) if t.is_floating_point() else on_device
        memo[id(t)] = nn.Parameter(cast, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else cast
    return copy.deepcopy(block, memo)


def _masters(linears: dict[str, nn.Module], moved: dict[int, torch.Tensor], dtype: torch.dtype):
    """name -> float32 [out, in] weight on the device, made there from block_to's ``moved``
    copies: the moved tensor itself when it is float32 and the working copy is another dtype,
    else a float32 copy (never the working copy's storage, which the solves overwrite)."""
    masters = {}
    for name, mod in linears.items():
        w = moved[id(mod.weight)]
        w = w.t() if is_conv1d(mod) else w                                           # [out, in]
        masters[name] = w if w.dtype == torch.float32 and dtype != torch.float32 else w.to(torch.float32, copy=True)
    return masters


def _quantize_block_copy(block, family, inputs, device, dtype, config, block_name, store=None,
                         timer=NULL_TIMER):
    """Quantize a working copy of ``block`` on ``device`` in ``dtype``; write the results into
    the original block only once the whole block succeeded. Results come back on the CPU."""
    originals = block_linears(block, family)
    with timer("move weights"):
        moved: dict[int, torch.Tensor] = {}
        work = block_to(block, device, dtype, moved)
        masters = _masters(originals, moved, dtype)
        del moved
    try:
        layer_results, outputs = quantize_block(
            work, family, inputs, lambda n: config.for_module(f"{block_name}.{n}"),
            config.true_sequential, masters, prefix=f"{block_name}.", device=device, dtype=dtype,
            store=store or device, timer=timer)
    except NumericalError as e:
        raise NumericalError(f"{e}. Nothing was written to {block_name} or later blocks; earlier "
                             f"blocks are quantized in place") from None
    finally:
        del work, masters
    with timer("move weights"):
        for name, mod in originals.items():
            set_weight_matrix(mod, layer_results[name].dequantize())
            layer_results[name] = layer_results[name].to("cpu")
    return layer_results, outputs


def _rtn_model(blocks, family, config, prefix, progress, on_block):
    results = {}
    for i, block in enumerate(blocks):
        named = {}
        for n, mod in block_linears(block, family).items():
            res = rtn_result(weight_matrix(mod).float(), config.for_module(f"{prefix}.{i}.{n}"))
            set_weight_matrix(mod, res.dequantize())
            named[f"{prefix}.{i}.{n}"] = res
        results.update(named)
        if on_block:
            on_block(i, named)
        progress(i + 1, len(blocks), f"block {i}")
    return results


Inputs = list[tuple[torch.Tensor, dict]]


def capture_block_inputs(model: nn.Module, first_block: nn.Module, ids: torch.Tensor,
                         batch_size: int | None, device: torch.device) -> Inputs:
    """Run the model up to its first block on each batch; return (hidden_states, kwargs) per batch."""
    captured: Inputs = []

    def hook(_mod, args, kwargs):
        hidden = args[0] if args else kwargs.pop("hidden_states")
        kw = {k: _to(v, device) for k, v in kwargs.items() if k not in ("past_key_values", "past_key_value",
                                                                         "layer_past", "use_cache")}
        captured.append((hidden.to(device), kw))
        raise _StopForward

    home = next(model.parameters()).device
    bs = batch_size or ids.shape[0]
    with torch.no_grad(), scoped_hooks(lambda: [first_block.register_forward_pre_hook(hook, with_kwargs=True)]):
        for start in range(0, ids.shape[0], bs):
            try:
                model(ids[start:start + bs].to(home), use_cache=False)
            except _StopForward:
                pass
    return captured


def _to(v, device, dtype=None):
    """Move tensors (and tuples of them) to ``device``; cast floating ones to ``dtype``."""
    if isinstance(v, torch.Tensor):
        return v.to(device, dtype if dtype is not None and v.is_floating_point() else v.dtype)
    if isinstance(v, tuple):
        return tuple(_to(x, device, dtype) for x in v)
    return v


def _run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict) -> torch.Tensor:
    out = block(hidden, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def quantize_block(block: nn.Module, family, inputs: Inputs, config_for: Callable[[str], QuantConfig],
                   true_sequential: bool = True, masters: dict[str, torch.Tensor] | None = None,
                   prefix: str = "", *, device: torch.device | None = None, dtype: torch.dtype | None = None,
                   store: torch.device | None = None, timer=NULL_TIMER) -> tuple[dict[str, GPTQResult], Inputs]:
    """GPTQ every linear of one block in place; return (name -> result, the block's outputs).

    masters: optional float32 [out, in] weights to solve from (when the block runs in a
    lower precision); by default the block's own weights. prefix: the block's name plus a dot,
    put before a linear's name in errors and warnings. device/dtype: where and in what each batch
    of ``inputs`` runs (moved one batch at a time; None: as they are); store: where the outputs
    are kept (None: where they were computed). Under torch.distributed, each rank passes its
    share of the calibration; Hessians are summed over ranks and each layer is solved on one rank.
    """
    linears = block_linears(block, family)
    results: dict[str, GPTQResult] = {}

    def solve_group(group, acc):
        with timer("hessian"):
            distributed.all_reduce_hessian(acc)
            hessian = acc.hessian()

        factors = {}                          # the group's layers share one Hessian: factor it once

        def solve_one(name, weight):
            cfg = config_for(name)
            with timer("solve"), _layer_named(prefix + name):
                key = (cfg.damp, cfg.act_order)
                if key not in factors:
                    factors[key] = inverse_factor(hessian.to(weight.device), cfg.damp, cfg.act_order)
                res = solve(weight, hessian, cfg, factors[key])
            with timer("packing"):            # on the solve's device, by the layer's owner
                return res.pack()

        weights = {n: masters[n] if masters is not None else weight_matrix(linears[n]) for n in group}
        with timer("solve"):                  # under torch.distributed: each layer on one rank, then shared
            solved = distributed.solve_layers(weights, solve_one)
        for name, res in solved.items():
            if bool(res.dead_channels.all()):
                warnings.warn(f"{prefix}{name}: every input channel was zero for this calibration, so GPTQ "
                              f"has no information and quantized the layer to zero (result.notes records "
                              f"it); check the calibration data or the layer's preceding norm", stacklevel=2)
            set_weight_matrix(linears[name], res.dequantize())
            results[name] = res

    def run(batch):
        hidden, kwargs = _on(batch, device, dtype)
        with timer("forward"):
            out = _run_block(block, hidden, kwargs)
        return out.to(store) if store is not None else out

    groups = family.sequential
    with torch.no_grad():
        if true_sequential and len(inputs) == 1:
            def solve_on_input(group):
                def hook(_mod, args):
                    acc = HessianAccumulator(args[0].shape[-1], args[0].device)
                    with timer("hessian"), _layer_named(prefix + group[0]):
                        acc.add(args[0])
                    solve_group(group, acc)
                return hook
            with scoped_hooks(lambda: [linears[g[0]].register_forward_pre_hook(solve_on_input(g))
                                       for g in groups]):
                return results, [(run(inputs[0]), inputs[0][1])]
        for passes in ([[g] for g in groups] if true_sequential else [list(groups)]):
            accs = _accumulate(block, linears, passes, inputs, prefix, device, dtype, timer)
            for g in passes:
                solve_group(g, accs[g[0]])
        return results, [(run(b), b[1]) for b in inputs]


def _on(batch, device, dtype):
    """A batch (hidden, kwargs) moved to ``device`` with floating tensors in ``dtype`` (None: as is)."""
    hidden, kwargs = batch
    if device is None:
        return hidden, kwargs
    return _to(hidden, device, dtype), {k: _to(v, device, dtype) for k, v in kwargs.items()}


def _accumulate(block, linears, groups, inputs: Inputs, prefix: str = "", device=None, dtype=None,
                timer=NULL_TIMER) -> dict[str, HessianAccumulator]:
    """One pass over the batches, accumulating each group's Hessian; each batch stops once every
    group has seen its input."""
    firsts = [g[0] for g in groups]
    dev = device or inputs[0][0].device
    accs = {n: HessianAccumulator(in_out_features(linears[n])[0], dev) for n in firsts}
    seen: set[str] = set()

    def make_hook(name):
        def hook(_mod, args):
            with timer("hessian"), _layer_named(prefix + name):
                accs[name].add(args[0])
            seen.add(name)
            if len(seen) == len(firsts):
                raise _StopForward
        return hook

    with scoped_hooks(lambda: [linears[n].register_forward_pre_hook(make_hook(n)) for n in firsts]):
        for batch in inputs:
            seen.clear()
            hidden, kwargs = _on(batch, device, dtype)
            try:
                with timer("forward"):
                    _run_block(block, hidden, kwargs)
            except _StopForward:
                pass
    return accs


@contextlib.contextmanager
def _layer_named(name: str):
    """Put the layer's full name in front of a NumericalError raised inside."""
    try:
        yield
    except NumericalError as e:
        raise NumericalError(f"{name}: {e}") from None
