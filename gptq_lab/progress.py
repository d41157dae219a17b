"""Progress callbacks. The engine reports progress(done, total, message) and never prints;
this module turns that into a tqdm.auto bar (a widget in notebooks, text elsewhere)."""
from __future__ import annotations

import sys
from collections.abc import Callable

Progress = Callable[[int, int, str], None]


def silent(done: int, total: int, message: str) -> None:
    """A callback that ignores progress."""


def tqdm_progress(desc: str) -> Progress:
    """A callback drawing one tqdm.auto bar per run (a new bar when ``total`` changes or restarts)."""
    from tqdm.auto import tqdm
    state = {}

    def progress(done: int, total: int, message: str) -> None:
        bar = state.get("bar")
        if bar is None or bar.total != total or done < bar.n:
            if bar is not None:
                bar.close()
            bar = state["bar"] = tqdm(total=total, desc=desc, leave=False, file=sys.stderr)
        bar.set_postfix_str(message[-60:], refresh=False)
        bar.update(done - bar.n)
        if done == total:
            bar.close()
            state.pop("bar")
    return progress


def resolve(progress: Progress | bool | None, desc: str) -> Progress:
    """None -> a tqdm bar; False -> silent; a callable -> itself."""
    if progress is None:
        return tqdm_progress(desc)
    if progress is False:
        return silent
    return progress
