"""The GIL is released for all I/O: other Python threads run while a save or load works."""

from __future__ import annotations

import itertools
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
import zerockpt


def longest_pause_while(work: Callable[[], None]) -> tuple[float, float]:
    """Runs `work` in a thread; returns (its duration, the longest gap in this thread's ticks)."""
    done = threading.Event()
    span: list[float] = []

    def run() -> None:
        t0 = time.perf_counter()
        try:
            work()
        finally:
            span.append(time.perf_counter() - t0)
            done.set()

    ticks = [time.perf_counter()]
    worker = threading.Thread(target=run)
    worker.start()
    while not done.is_set():
        ticks.append(time.perf_counter())
        time.sleep(0.0005)
    worker.join()
    gaps = [b - a for a, b in itertools.pairwise(ticks)]
    return span[0], max(gaps, default=0.0)


@pytest.fixture(scope="module")
def tensors() -> dict[str, torch.Tensor]:
    return {f"w{i}": torch.randn(8 << 20) for i in range(12)}  # 384 MiB


@pytest.mark.parametrize("kind", ["save-buffered", "save-direct", "load-read"], ids=lambda k: k)
def test_gil_released_during_io(tmp_path: Path, tensors: dict, kind: str) -> None:
    path = tmp_path / "g.safetensors"
    zerockpt.save(tensors, path, durable=False)
    works = {
        "save-buffered": lambda: zerockpt.save(tensors, path, durable=False, direct_io=False),
        "save-direct": lambda: zerockpt.save(tensors, path, durable=True, direct_io=True),
        "load-read": lambda: zerockpt.load(path, mmap=False),
    }
    duration, pause = longest_pause_while(works[kind])
    # Holding the GIL through the I/O would stall this thread for the whole call.
    assert pause < 0.5 * duration, f"main thread stalled {pause:.3f}s of a {duration:.3f}s call"


def test_threads_save_and_load_different_files_at_once(tmp_path: Path) -> None:
    results: dict[int, bool] = {}

    def job(i: int) -> None:
        data = {f"t{k}": torch.full((1000 + i,), float(i * 100 + k)) for k in range(20)}
        path = tmp_path / f"f{i}.safetensors"
        for _ in range(5):
            zerockpt.save(data, path, durable=False)
            loaded = zerockpt.load(path, mmap=bool(i % 2))
            results[i] = all(torch.equal(loaded[k], v) for k, v in data.items())

    threads = [threading.Thread(target=job, args=(i,)) for i in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {i: True for i in range(6)}
