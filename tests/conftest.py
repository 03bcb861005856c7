"""Shared helpers: dtype tables, raw file crafting, byte-exact comparison."""

from __future__ import annotations

import json
import math
import multiprocessing
import multiprocessing.forkserver
import os
import re
import struct
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

# Every dtype zerockpt stores, with its safetensors name.
DTYPES: dict[torch.dtype, str] = {
    torch.bool: "BOOL",
    torch.uint8: "U8",
    torch.int8: "I8",
    torch.int16: "I16",
    torch.uint16: "U16",
    torch.int32: "I32",
    torch.uint32: "U32",
    torch.int64: "I64",
    torch.uint64: "U64",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float32: "F32",
    torch.float64: "F64",
    torch.complex64: "C64",
    torch.float8_e4m3fn: "F8_E4M3",
    torch.float8_e5m2: "F8_E5M2",
    torch.float8_e4m3fnuz: "F8_E4M3FNUZ",
    torch.float8_e5m2fnuz: "F8_E5M2FNUZ",
    torch.float8_e8m0fnu: "F8_E8M0",
}


def random_tensor(shape: tuple[int, ...], dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Random bytes reinterpreted as `dtype` (NaN payloads and all), or 0/1 for bool."""
    g = torch.Generator().manual_seed(seed)
    if dtype == torch.bool:
        return torch.randint(0, 2, shape, generator=g).bool()
    item = torch.empty((), dtype=dtype).element_size()
    numel = 1
    for d in shape:
        numel *= d
    raw = torch.randint(0, 256, (numel * item,), dtype=torch.uint8, generator=g)
    return raw.view(dtype).reshape(shape)


def raw_bytes(t: torch.Tensor) -> bytes:
    """The tensor's logical bytes in row-major order (conj/neg resolved)."""
    dense = torch.empty(t.shape, dtype=t.dtype).copy_(t.resolve_conj().resolve_neg())
    return dense.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def assert_bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> None:
    assert a.dtype == b.dtype, (a.dtype, b.dtype)
    assert a.shape == b.shape, (a.shape, b.shape)
    assert raw_bytes(a) == raw_bytes(b)


def assert_dicts_bitwise_equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert list(a) == list(b)
    for k in a:
        assert_bitwise_equal(a[k], b[k])


def craft(
    path: Path,
    header: Any,
    data: bytes = b"",
    *,
    length: int | None = None,
    raw_header: bytes | None = None,
) -> Path:
    """Writes a file with an arbitrary header (object -> JSON, or raw bytes) and data."""
    body = raw_header if raw_header is not None else json.dumps(header).encode()
    n = len(body) if length is None else length
    path.write_bytes(struct.pack("<Q", n) + body + data)
    return path


def read_header(path: Path) -> tuple[int, dict[str, Any], bytes]:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return n, json.loads(raw[8 : 8 + n]), raw[8 : 8 + n]


def temp_leftovers(directory: Path) -> list[str]:
    return [p for p in os.listdir(directory) if p.endswith(".zerockpt-tmp")]


@pytest.fixture
def sample() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return {
        "embed.weight": torch.randn(50, 16, generator=g),
        "block.0.w": torch.randn(16, 16, generator=g, dtype=torch.float64),
        "block.0.b": torch.randn(16, generator=g).half(),
        "steps": torch.tensor(7, dtype=torch.int64),
        "mask": torch.rand(4, 4, generator=g) > 0.5,
        "empty": torch.empty(0, 3),
    }


# The name of a save's temporary file: ".<destination name>.<pid>.<16 hex digits>.zerockpt-tmp".
TEMP_NAME_RE = re.compile(
    r"^\.(?P<dest>.+)\.(?P<pid>[0-9]+)\.(?P<token>[0-9a-f]{16})\.zerockpt-tmp$"
)


def forkserver_context(preload_module: str) -> multiprocessing.context.ForkServerContext:
    """A forkserver context whose children start with torch, zerockpt and ``preload_module``
    imported (a crash test then spends its time saving, not importing). Skips the test where
    there is no forkserver. The server imports them at start-up from its own sys.path (Python
    3.11 ignores the parent's), hence PYTHONPATH while it starts."""
    if "forkserver" not in multiprocessing.get_all_start_methods():
        pytest.skip("multiprocessing has no forkserver start method here")
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(["torch", "zerockpt", preload_module])
    here = str(Path(__file__).parent)
    saved = os.environ.get("PYTHONPATH")
    os.environ["PYTHONPATH"] = here if saved is None else f"{here}{os.pathsep}{saved}"
    try:
        multiprocessing.forkserver.ensure_running()
    finally:
        if saved is None:
            del os.environ["PYTHONPATH"]
        else:
            os.environ["PYTHONPATH"] = saved
    return ctx


def assert_same_state(a: Any, b: Any) -> None:
    """Equal structure, container and key types (and ``_metadata``), leaf types and values
    (tensors bitwise, floats down to NaN and the sign of zero)."""
    assert type(a) is type(b), (a, b)
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape
        assert torch.equal(a.reshape(-1).view(torch.uint8), b.reshape(-1).view(torch.uint8))
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b]
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None)
        for k in a:
            assert_same_state(a[k], b[k])
    elif isinstance(a, list | tuple):
        assert len(a) == len(b)
        for x, y in zip(a, b, strict=True):
            assert_same_state(x, y)
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b)
    else:
        assert a == b
        if isinstance(a, float):
            assert math.copysign(1.0, a) == math.copysign(1.0, b)


T = TypeVar("T")


def settled(measure: Callable[[], T], expected: T | None = None, limit: float = 10.0) -> T:
    """``measure()`` once it equals ``expected`` or, with no ``expected``, once it has stayed the
    same for 0.2 s; after ``limit`` seconds, its last value.

    Threads that a call joined, or detached to finish, take a moment to leave /proc/self/task
    (longer on a loaded machine), so resource baselines and their checks go through this
    instead of reading the count at once."""
    deadline = time.monotonic() + limit
    last = measure()
    stable_since = time.monotonic()
    while time.monotonic() < deadline:
        if expected is not None and last == expected:
            return last
        if expected is None and time.monotonic() - stable_since >= 0.2:
            return last
        time.sleep(0.01)
        now = measure()
        if now != last:
            last, stable_since = now, time.monotonic()
    return last


_TORCH_LOADS_SAFETENSORS: bool | None = None


def torch_load_reads_safetensors(tmp_dir: Path) -> bool:
    """Whether this torch's ``torch.load`` hands safetensors files to safetensors (newer torch
    does; torch 2.11 does not)."""
    global _TORCH_LOADS_SAFETENSORS
    if _TORCH_LOADS_SAFETENSORS is None:
        import safetensors.torch

        probe = tmp_dir / "probe.safetensors"
        safetensors.torch.save_file({"a": torch.zeros(1)}, str(probe))
        try:
            torch.load(probe)
            _TORCH_LOADS_SAFETENSORS = True
        except Exception:
            _TORCH_LOADS_SAFETENSORS = False
    return _TORCH_LOADS_SAFETENSORS


def mixed_state(big_elements: int = 5_000_000) -> dict[str, torch.Tensor]:
    """Dense, strided, conjugate, negative, empty, 0-d, tied and multi-chunk tensors."""
    g = torch.Generator().manual_seed(0)
    state = {
        "big": torch.randn(big_elements, generator=g),  # 20 MB: spans chunks
        "w": torch.randn(1500, 1000, generator=g),
        "wt": torch.randn(1000, 1500, generator=g).t(),  # strided
        "half": torch.randn(333, 77, generator=g).half(),
        "bf16": torch.randn(4097, generator=g).bfloat16(),
        "cx": torch.randn(100, dtype=torch.complex64, generator=g).conj(),
        "neg": torch.randn(64, dtype=torch.complex64, generator=g).conj().imag,
        "mask": torch.rand(7, 9, generator=g) > 0.5,
        "i8": random_tensor((1000,), torch.int8, seed=3),
        "f8": random_tensor((513,), torch.float8_e4m3fn, seed=4),
        "u16": random_tensor((11, 3), torch.uint16, seed=5),
        "empty": torch.empty(0, 4),
        "scalar": torch.tensor(3.5, dtype=torch.float64),
    }
    state["tied"] = state["w"]
    return state


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(1000, 3000)
        self.b = nn.Linear(3000, 100)
        self.norm = nn.LayerNorm(100)
        self.register_buffer("strided", torch.zeros(64, 32).t())  # a non-contiguous target
        self.register_buffer("steps", torch.zeros((), dtype=torch.int64))


def filled(net: Net, seed: int) -> Net:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in net.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=g).to(t.dtype) * 10)
    return net


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    """Runs ``code`` in a fresh interpreter (nothing imported), capturing its output."""
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )


@pytest.fixture(scope="module")
def hide_the_test_accelerator() -> Iterator[None]:
    """Shows the libraries this machine's accelerators only, not tests/accel's "zpu".

    An earlier test in this process may have registered zpu (PrivateUse1): accelerate would
    take it for the machine's accelerator (``torch.accelerator.current_accelerator()``), and
    its allocator, a test fake, fails ``torch.accelerator.empty_cache()``.
    """
    if torch._C._get_privateuse1_backend_name() == "privateuseone":  # not registered
        yield
        return

    def current(check_available: bool = False) -> torch.device | None:
        return torch.device("cuda") if torch.cuda.is_available() else None

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.accelerator, "current_accelerator", current)
        patch.setattr(torch.accelerator, "is_available", torch.cuda.is_available)
        yield


class DispatchLog(TorchDispatchMode):
    """Records the ATen ops that reach it (only those run on the thread that entered it)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))
