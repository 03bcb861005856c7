"""Progress bars for long calls, drawn with tqdm (an optional extra: ``zerockpt[progress]``).

The work runs on the caller's thread, as without a bar (so torch's thread-local state, grad
mode, dispatch and function modes, the current stream, is the caller's), passing a
``_C.Progress`` counter to the C++ calls, which count the bytes they write, read or check as
they go. A helper thread only reads the counter and draws. Ctrl-C is seen by the C++ calls
between chunks (they take the GIL to check for signals): they stop, commit nothing, and the
KeyboardInterrupt propagates from the caller's thread.
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


def tqdm_class() -> Any:
    """tqdm.auto.tqdm; ImportError saying what to install when it is missing."""
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
    """Bytes of ``tensors``, a view that appears twice (tied weights) counted once.

    Bookkeeping for the bar: no ``__torch_function__`` mode or subclass sees these calls, so a
    call with a bar runs the same torch functions as one without.
    """
    views = list(tensors)
    alias_of, _ = _C.memory_sharing(views)
    with torch._C.DisableTorchFunction():
        return sum(
            t.numel() * t.element_size() for t, a in zip(views, alias_of, strict=True) if a < 0
        )


def run(
    enabled: bool,
    description: str,
    work: Callable[[_C.Progress], _T],
    total: int = 0,
) -> _T:
    """``work(counter)`` on this thread; with ``enabled``, a helper thread draws the counter.

    Args:
        enabled: Draw a bar (tqdm must be installed).
        description: The bar's label.
        work: Does the job, passing the counter to the C++ calls' ``progress`` (which also
            lets calls on other threads be cancelled, see ``_parallel.run_parallel``).
        total: The bytes to expect when the work spans several C++ calls (0: the calls say).

    Returns:
        What ``work`` returns.

    Raises:
        ImportError: ``enabled`` and tqdm is missing (before any work starts).
        BaseException: Whatever ``work`` raised (KeyboardInterrupt on Ctrl-C); the bar is
            then cleared.
    """
    counter = _C.Progress(total)
    if not enabled:
        return work(counter)
    tqdm = tqdm_class()
    with tqdm(
        desc=description,
        total=total or None,
        unit="B",
        unit_scale=True,
        unit_divisor=1024,
        dynamic_ncols=True,
    ) as bar:
        stop = threading.Event()
        helper = threading.Thread(
            target=_draw_until, args=(bar, counter, stop), name="zerockpt-progress", daemon=True
        )
        helper.start()
        try:
            value = work(counter)
        except BaseException:
            bar.leave = False  # the error, not a half-drawn bar, is the last word
            raise
        finally:
            stop.set()
            helper.join()  # it only draws: a second Ctrl-C here interrupts nothing else
        # Done is done, even where the estimate was off (keys skipped, no checksums).
        final = max(counter.done, counter.total)
        _draw(bar, final, final)
    return value


def _draw_until(bar: Any, counter: _C.Progress, stop: threading.Event) -> None:
    while not stop.wait(POLL_SECONDS):
        _draw(bar, counter.done, counter.total)


def _draw(bar: Any, done: int, total: int) -> None:
    if total and bar.total != total:
        bar.total = total
    if done > bar.n:
        bar.update(done - bar.n)
    else:
        bar.refresh()


def stored_bytes(f: _C._File) -> int:
    """Bytes of an open file's stored tensors (aliases counted once), from its header."""
    total = 0
    names = f.keys()  # a _File is not iterable
    for name in names:
        _, _, begin, end, alias_of = f.info(name)
        if alias_of is None:
            total += end - begin
    return total
