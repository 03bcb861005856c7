"""Progress bars for long calls, drawn with tqdm (an optional extra: ``zerockpt[progress]``).

The work runs on a helper thread, passing a ``_C.Progress`` counter to the C++ calls, which
count the bytes they write, read or check as they go; this thread polls the counter and draws.
Ctrl-C here cancels the counter: the C++ calls stop at their next chunk (a save commits
nothing), and KeyboardInterrupt is raised once the helper has stopped.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import torch

from zerockpt import _C

_T = TypeVar("_T")

POLL_SECONDS = 0.1


def _tqdm() -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        raise ImportError(
            "progress=True draws with tqdm, which is not installed: "
            "pip install tqdm (or zerockpt[progress])"
        ) from None
    return tqdm


def label(verb: str, path: str | os.PathLike[str]) -> str:
    """``"Saving model.safetensors"``: the bar's description."""
    return f"{verb} {os.path.basename(os.fspath(path).rstrip(os.sep)) or os.fspath(path)}"


def unique_nbytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of ``tensors``, a view that appears twice (tied weights) counted once."""
    seen: set[tuple[Any, ...]] = set()
    total = 0
    for t in tensors:
        try:
            key: tuple[Any, ...] = (
                t.untyped_storage().data_ptr(),
                t.storage_offset(),
                tuple(t.shape),
                t.stride(),
                t.dtype,
            )
        except (RuntimeError, NotImplementedError):  # no storage: count it, let save judge it
            key = (id(t),)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def run(
    enabled: bool,
    description: str,
    work: Callable[[_C.Progress | None], _T],
    total: int = 0,
) -> _T:
    """``work(None)`` when not ``enabled``; else ``work(counter)`` under a progress bar.

    Args:
        enabled: Draw a bar (tqdm must be installed).
        description: The bar's label.
        work: Does the job, passing its argument to the C++ calls' ``progress``. It runs on
            another thread, with the caller's current accelerator stream: it must not rely on
            other thread-local torch state (grad mode, dispatch or function modes) of the
            caller.
        total: The bytes to expect when the work spans several C++ calls (0: the calls say).

    Returns:
        What ``work`` returns.

    Raises:
        ImportError: ``enabled`` and tqdm is missing (before any work starts).
        KeyboardInterrupt: Ctrl-C while waiting; the work was cancelled and has stopped.
        BaseException: Whatever ``work`` raised.
    """
    if not enabled:
        return work(None)
    tqdm = _tqdm()
    counter = _C.Progress(total)
    outcome: list[tuple[bool, Any]] = []
    # Device copies go to the caller's current stream (of the current device), as without a bar.
    stream = torch.accelerator.current_stream() if torch.accelerator.is_available() else None

    def target() -> None:
        if stream is not None:
            torch.accelerator.set_stream(stream)
        try:
            outcome.append((True, work(counter)))
        except BaseException as e:  # re-raised on the caller's thread
            outcome.append((False, e))

    helper = threading.Thread(target=target, name="zerockpt-progress", daemon=True)
    with tqdm(
        desc=description,
        total=total or None,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
    ) as bar:
        helper.start()
        try:
            while helper.is_alive():
                helper.join(POLL_SECONDS)
                _draw(bar, counter.done, counter.total)
        except BaseException:  # KeyboardInterrupt, most likely: stop the work, then re-raise
            counter.cancel()
            helper.join()
            raise
        ok, value = outcome[0]
        if ok:  # done is done, even where the estimate was off (keys skipped, no checksums)
            final = max(counter.done, counter.total)
            _draw(bar, final, final)
    if not ok:
        raise value
    return value  # type: ignore[no-any-return]


def _draw(bar: Any, done: int, total: int) -> None:
    if total and bar.total != total:
        bar.total = total
    if done > bar.n:
        bar.update(done - bar.n)
    else:
        bar.refresh()
