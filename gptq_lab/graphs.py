"""The GPTQ column loop on CUDA as CUDA-graph replays.

A lazy block of 128 columns is about a thousand tiny kernels (8 per column); launched one by one
from Python, their launch cost, not the arithmetic, sets the speed of a GPU solve. Here each
block shape is captured once as a CUDA graph over static buffers and then replayed: copy the
block in, one replay, copy the results out. The kernels and their order are those of
``gptq.column_block``, so results are bitwise the same as the eager loop.

    fitted = graphed_column_block(w1, h1, c1, e1, grid, group, bits, sym)   # as column_block
"""
from __future__ import annotations

from collections import OrderedDict

import torch

MAX_GRAPHS = 16         # distinct block shapes kept (a model needs a handful)


class _BlockGraph:
    """One captured ``column_block`` for a fixed shape and config, with its static buffers."""

    def __init__(self, b: int, n: int, fixed: bool, group: int, bits: int, sym: bool,
                 device: torch.device):
        from .gptq import column_block
        new = lambda *shape: torch.zeros(*shape, device=device)
        self.w, self.h, self.c, self.e = new(b, n), new(b, b), new(b, n), new(b, n)
        self.h += torch.eye(b, device=device)                                # a harmless warm-up
        self.grid = (new(b, n), new(b, n) + 1) if fixed else None
        if self.grid is not None:
            self.grid[0].fill_(1.0)
        args = (self.w, self.h, self.c, self.e, self.grid, group, bits, sym)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):                  # warm-up outside capture (allocator, cuBLAS)
            column_block(*args)
        torch.cuda.current_stream(device).wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.fitted = column_block(*args)

    def __call__(self, w1, h1, c1, e1, grid):
        self.w.copy_(w1)
        self.h.copy_(h1)
        if grid is not None:
            self.grid[0].copy_(grid[0])
            self.grid[1].copy_(grid[1])
        self.graph.replay()
        w1.copy_(self.w)
        c1.copy_(self.c)
        e1.copy_(self.e)
        return [(s.clone(), z.clone()) for s, z in self.fitted]


_GRAPHS: OrderedDict[tuple, _BlockGraph] = OrderedDict()


def graphed_column_block(w1: torch.Tensor, h1: torch.Tensor, c1: torch.Tensor, e1: torch.Tensor,
                         grid, group: int, bits: int, sym: bool):
    """``gptq.column_block`` (same arguments, same results) replayed from a CUDA graph."""
    key = (tuple(w1.shape), grid is not None, group, bits, sym, w1.device, w1.dtype)
    graph = _GRAPHS.get(key)
    if graph is None:
        graph = _BlockGraph(w1.shape[0], w1.shape[1], grid is not None, group, bits, sym,
                            w1.device)
        _GRAPHS[key] = graph
        if len(_GRAPHS) > MAX_GRAPHS:
            _GRAPHS.popitem(last=False)
    else:
        _GRAPHS.move_to_end(key)
    return graph(w1, h1, c1, e1, grid)


def clear() -> None:
    """Drop every captured graph (and the GPU memory of its buffers and pool)."""
    _GRAPHS.clear()
