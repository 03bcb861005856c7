"""Running one task per file (shard) on a few threads, for sharded loads, opens and verifies."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from zerockpt import _C

_T = TypeVar("_T")
_R = TypeVar("_R")


def thread_budget(threads: int, tasks: int) -> tuple[int, int]:
    """Workers for ``tasks`` parallel tasks, and threads for each, from a total budget."""
    total = threads or _C.default_threads()
    workers = max(1, min(tasks, total))
    return workers, -(-total // workers)


def run_parallel(
    func: Callable[[_T], _R],
    items: Sequence[_T],
    workers: int,
    progress: _C.Progress | None = None,
) -> list[_R]:
    """``[func(x) for x in items]`` on ``workers`` threads; the first failure (in order) raises.

    When this thread stops waiting (a failure, or Ctrl-C: signals reach only this thread),
    ``progress``, which ``func`` passes to its C++ calls, is cancelled, so the calls still
    running stop at their next chunk; the threads are joined before the error propagates.
    """
    if workers <= 1 or len(items) <= 1:
        return [func(x) for x in items]
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="zerockpt-shard")
    try:
        return list(pool.map(func, items))
    except BaseException:
        if progress is not None:
            progress.cancel()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
