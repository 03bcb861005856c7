"""The device tests' two devices: "zpu", the test-only asynchronous accelerator of this directory
(zpu.cpp, built by ``make test-accel``), and "cuda". One way to drive streams on both.

zpu is loaded where no CUDA device is available (torch lets one accelerator be current at a
time) or where ``ZEROCKPT_TEST_ZPU=1`` asks for it. ``ZPU_DELAY_US`` ("MAX" or "MIN-MAX"
microseconds before each queued item) and ``ZPU_SEED`` set its delays; ``set_delay`` too.
"""

from __future__ import annotations

import os
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

# make test-accel builds it here; make compat points ZEROCKPT_TEST_ACCEL at a build for its torch.
LIBRARY = Path(
    os.environ.get("ZEROCKPT_TEST_ACCEL")
    or Path(__file__).resolve().parents[2] / "build" / "accel" / "libzerockpt_test_accel.so"
)
DEVICE_TYPES = ["zpu", "cuda"]
_zpu_loaded: bool | None = None
_zpu_why_not = ""


def _device_module() -> types.ModuleType:
    """What ``torch.zpu`` answers (torch.accelerator asks it for counts and synchronisation)."""
    mod = types.ModuleType("torch.zpu")

    def device_count() -> int:
        return 2

    def current_device() -> int:
        return torch.accelerator.current_device_index()

    def synchronize(device: int | str | torch.device | None = None) -> None:
        torch.accelerator.synchronize(device)

    mod.is_available = lambda: True  # type: ignore[attr-defined]
    mod.is_initialized = lambda: True  # type: ignore[attr-defined]
    mod._is_in_bad_fork = lambda: False  # type: ignore[attr-defined]
    mod.manual_seed_all = lambda seed: None  # type: ignore[attr-defined]  # no generators
    mod.device_count = device_count  # type: ignore[attr-defined]
    mod.current_device = current_device  # type: ignore[attr-defined]
    mod.synchronize = synchronize  # type: ignore[attr-defined]
    return mod


def load_zpu() -> bool:
    """Loads and registers zpu once; False (see ``why_not``) where it is not built or not wanted."""
    global _zpu_loaded, _zpu_why_not
    if _zpu_loaded is not None:
        return _zpu_loaded
    _zpu_loaded = False
    if torch.cuda.is_available() and os.environ.get("ZEROCKPT_TEST_ZPU") != "1":
        _zpu_why_not = "a CUDA device is present (ZEROCKPT_TEST_ZPU=1 loads zpu anyway)"
    elif not LIBRARY.exists():
        _zpu_why_not = f"the test accelerator is not built ({LIBRARY}): run `make test-accel`"
    else:
        torch.ops.load_library(str(LIBRARY))
        torch.utils.rename_privateuse1_backend("zpu")
        torch._register_device_module("zpu", _device_module())
        _zpu_loaded = True
    return _zpu_loaded


def why_not(device_type: str) -> str | None:
    """None if `device_type` can run the device tests here, else why not."""
    if device_type == "cuda":
        return None if torch.cuda.is_available() else "needs a CUDA device"
    return None if load_zpu() else _zpu_why_not


def set_delay(min_us: int, max_us: int) -> None:
    """Random delay before each item queued on a zpu stream (no-op where zpu is not loaded)."""
    if load_zpu():
        torch.ops.zpu.set_delay(min_us, max_us)


def get_delay() -> tuple[int, int]:
    lo, hi = torch.ops.zpu.get_delay()
    return int(lo), int(hi)


def violations() -> int:
    """Queued zpu work seen touching device memory after its owner freed it (racy uses)."""
    return int(torch.ops.zpu.violations())


def sleep_on_current_stream(device: torch.device, ms: int) -> None:
    """Queues about `ms` milliseconds of work on `device`'s current stream (a slow kernel)."""
    if device.type == "cuda":
        torch.cuda._sleep(int(ms * 2_000_000))  # cycles: at least `ms` on any current GPU
    else:
        torch.ops.zpu.sleep_on_stream(device.index or 0, ms)


def new_stream(device: torch.device) -> torch.Stream:
    return torch.Stream(device=device)


@contextmanager
def on_stream(stream: torch.Stream) -> Iterator[None]:
    """Makes `stream` the current stream of its device for the block."""
    device = stream.device
    before = torch.accelerator.current_stream(device)
    torch.accelerator.set_stream(stream)
    try:
        yield
    finally:
        torch.accelerator.set_stream(before)


def synchronize(device: torch.device) -> None:
    torch.accelerator.synchronize(device)


def memory_allocated(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device)
    return int(torch.ops.zpu.memory_allocated(device.index or 0))


def max_memory_allocated(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return int(torch.ops.zpu.max_memory_allocated(device.index or 0))


def reset_peak_memory_stats(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    else:
        torch.ops.zpu.reset_peak_memory_stats(device.index or 0)
