"""Write files and directories so that they appear whole or not at all.

Each writer builds its output in a temporary sibling of the target (same filesystem), gives
it the modes a plain create would have (mkdtemp/mkstemp make private 0o700/0o600 entries),
fsyncs it and renames it into place. On any failure the temporary is deleted and the target
is left as it was.
"""
from __future__ import annotations

import os
import shutil
import tempfile
import uuid
from collections.abc import Callable
from pathlib import Path


def atomic_dir(target: Path, write: Callable[[Path], None], *,
               keep: Callable[[Path], bool] | None = None) -> Path:
    """Run ``write(tmp)`` in a fresh sibling directory, then move it to ``target``; return ``target``.

    Without ``keep``, an existing ``target`` is replaced: swapped out atomically (Linux
    renameat2), or by two renames where that is unsupported (the old one put back if the second
    fails), then deleted. Callers check beforehand that it may be replaced.

    With ``keep``, an existing ``target`` is never replaced: the move (os.replace) succeeds only
    onto an absent or empty one. If it fails and ``keep(target)`` holds (a concurrent writer
    finished first), that one stays and ours is deleted; otherwise the OSError propagates.
    """
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        write(tmp)
        chmod_per_umask(tmp)
        _fsync_tree(tmp)
        if keep is not None:
            try:
                os.replace(tmp, target)
            except OSError:
                if not keep(target):
                    raise
        elif not target.exists():
            os.rename(tmp, target)
        else:
            tmp = _swap(tmp, target)                  # now the old directory, deleted below
        _fsync(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)        # the failed write, or the replaced target
    return target


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` as UTF-8 (newlines as given) through a temporary sibling file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.tmp-", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        chmod_per_umask(Path(tmp))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def chmod_per_umask(path: Path) -> None:
    """Give ``path`` (and, for a directory, everything under it) the modes a plain create would:
    0o777 for directories and 0o666 for files, less the umask."""
    umask = os.umask(0)
    os.umask(umask)
    for p in [path, *path.rglob("*")] if path.is_dir() else [path]:
        p.chmod((0o777 if p.is_dir() else 0o666) & ~umask)


def _swap(new: Path, target: Path) -> Path:
    """Put directory ``new`` at ``target``; return where the old ``target`` now is."""
    if _exchange(new, target):
        return new
    old = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
    os.rename(target, old)
    try:
        os.rename(new, target)
    except BaseException:                             # OSError, or KeyboardInterrupt between the renames
        os.rename(old, target)
        raise
    return old


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths with Linux renameat2(RENAME_EXCHANGE); False where unsupported."""
    import ctypes
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    return fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0


def _fsync_tree(path: Path) -> None:
    """fsync every file and directory under ``path``, then ``path`` itself (links are skipped)."""
    for p in [*sorted(path.rglob("*")), path]:
        if not p.is_symlink():
            _fsync(p)


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
