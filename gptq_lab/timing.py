"""Per-phase wall time of a run, for benchmarks: exclusive time, phases may nest.

    timer = PhaseTimer(sync=torch.cuda.synchronize)     # or PhaseTimer() on CPU
    quantize_model(model, ids, config, timer=timer)
    timer.totals    # {"capture inputs": s, "hessian": s, "solve": s, ...}

Entering a phase pauses the enclosing one, so the totals add up to the timed wall time.
``sync`` is called at every boundary (CUDA work is asynchronous: without it a phase would
be charged for its predecessor's kernels). The engine uses ``NULL_TIMER`` unless given one.
"""
from __future__ import annotations

import contextlib
import time
from collections import defaultdict
from collections.abc import Callable


class PhaseTimer:
    def __init__(self, sync: Callable[[], None] | None = None):
        self.sync = sync or (lambda: None)
        self.totals: dict[str, float] = defaultdict(float)
        self._stack: list[list] = []          # [name, start of its current running stretch]

    @contextlib.contextmanager
    def __call__(self, name: str):
        self.sync()
        now = time.perf_counter()
        if self._stack:
            parent = self._stack[-1]
            self.totals[parent[0]] += now - parent[1]
        self._stack.append([name, now])
        try:
            yield
        finally:
            self.sync()
            now = time.perf_counter()
            phase, start = self._stack.pop()
            self.totals[phase] += now - start
            if self._stack:
                self._stack[-1][1] = now


class _NullTimer:
    @contextlib.contextmanager
    def __call__(self, name: str):
        yield


NULL_TIMER = _NullTimer()
