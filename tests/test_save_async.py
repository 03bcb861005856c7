"""save_async: the tensors are snapshotted during the call, a background C++ thread writes them.

The caller may change its tensors (take the next optimizer step) as soon as save_async returns:
the file holds the values at the time of the call, byte for byte what zerockpt.save would have
written. One save runs at a time (a second save_async waits for the first to be written), the
snapshot buffer is reused, a failed write surfaces from result() and leaves nothing at the
destination, and the interpreter waits for the save in flight when it exits.
"""

from __future__ import annotations

import contextlib
import errno
import math
import multiprocessing
import os
import subprocess
import sys
import textwrap
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import pytest
import safetensors.torch
import torch
import zerockpt
from conftest import (
    DTYPES,
    TEMP_NAME_RE,
    assert_bitwise_equal,
    assert_dicts_bitwise_equal,
    random_tensor,
    raw_bytes,
    settled,
    temp_leftovers,
)
from torch import nn
from zerockpt._args import save_options

C = zerockpt._C
MiB = 1 << 20
PAGE = 4096
# The snapshot buffer grows in steps of this (kCapacityGranule in csrc/torch/async_save.cpp).
GRANULE = 2 * MiB


@pytest.fixture(autouse=True)
def no_faults_and_no_save_left() -> Iterator[None]:
    """A failing test must leave neither an armed fault nor a save in flight behind it."""
    C._clear_faults()
    yield
    C._clear_faults()
    C.wait_async_saves()


# --- Helpers ----------------------------------------------------------------------------------


def clone_tree(obj: Any) -> Any:
    """A deep copy of nested state: tensors cloned (conj/neg resolved), containers rebuilt with
    their types and a state dict's ``_metadata``."""
    if isinstance(obj, torch.Tensor):
        return obj.detach().resolve_conj().resolve_neg().clone()
    if isinstance(obj, dict):
        out = type(obj)((k, clone_tree(v)) for k, v in obj.items())
        if hasattr(obj, "_metadata"):
            out._metadata = clone_tree(obj._metadata)  # type: ignore[attr-defined]
        return out
    if isinstance(obj, list | tuple):
        return type(obj)(clone_tree(v) for v in obj)
    return obj


def as_bytes(t: torch.Tensor) -> torch.Tensor:
    """The tensor's logical bytes in row-major order (conj/neg resolved), as a uint8 tensor."""
    return t.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)


def assert_same_tree(a: Any, b: Any, where: str = "obj") -> None:
    """Same structure, container and key types, leaves; tensors bitwise."""
    assert type(a) is type(b), (where, type(a), type(b))
    if isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and a.shape == b.shape, (where, a.dtype, b.dtype)
        assert torch.equal(as_bytes(a), as_bytes(b)), where
    elif isinstance(a, dict):
        assert [(type(k), k) for k in a] == [(type(k), k) for k in b], where
        assert getattr(a, "_metadata", None) == getattr(b, "_metadata", None), where
        for k in a:
            assert_same_tree(a[k], b[k], f"{where}[{k!r}]")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tree(x, y, f"{where}[{i}]")
    elif isinstance(a, float) and math.isnan(a):
        assert math.isnan(b), where
    else:
        assert a == b, (where, a, b)


def scramble(t: torch.Tensor) -> None:
    """Changes every byte of a contiguous tensor in place (every value of a bool one)."""
    if t.numel() == 0:
        return
    if t.dtype == torch.bool:
        t.logical_not_()
    else:
        t.reshape(-1).view(torch.uint8).bitwise_not_()


def flat_sample() -> tuple[dict[str, torch.Tensor], list[torch.Tensor]]:
    """Names to tensors of every dtype and layout, and the contiguous bases they view."""
    tensors: dict[str, torch.Tensor] = {}
    bases: list[torch.Tensor] = []
    for i, dtype in enumerate(DTYPES):
        t = random_tensor((3, 5), dtype, seed=i)
        tensors[f"dtype.{DTYPES[dtype]}"] = t
        bases.append(t)
    g = torch.Generator().manual_seed(99)
    transposed = torch.randn(6, 4, generator=g, dtype=torch.float64)
    strided = torch.arange(200, dtype=torch.int16).view(10, 20)
    offset = torch.randn(100, generator=g)
    conj = torch.randn(5, 3, generator=g, dtype=torch.complex64)
    conj_t = torch.randn(3, 5, generator=g, dtype=torch.complex64)
    neg = torch.randn(4, 4, generator=g, dtype=torch.complex64)
    tied = torch.randn(7, 3, generator=g).bfloat16()
    scalar = torch.tensor(-2.5, dtype=torch.float64)
    flag = torch.tensor(True)
    tensors.update(
        {
            "transposed": transposed.t(),
            "strided": strided[::2, 1::3],
            "offset": offset[10:40],
            "conj": conj.conj(),
            "conj.transposed": conj_t.t().conj(),
            "neg": torch._neg_view(neg),
            "tied.a": tied,
            "tied.b": tied,  # the same tensor twice: stored once
            "tied.view": tied.view(7, 3),  # the very same view: stored once too
            "scalar": scalar,
            "scalar.bool": flag,
            "empty": torch.empty(0, 3),
            "empty.bf16": torch.empty(2, 0, dtype=torch.bfloat16),
        }
    )
    bases += [transposed, strided, offset, conj, conj_t, neg, tied, scalar, flag]
    return tensors, bases


class Net(nn.Module):
    """~2 MiB of parameters and buffers (BatchNorm's running stats change in training mode)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(256, 512)
        self.bn = nn.BatchNorm1d(512)
        self.b = nn.Linear(512, 64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.b(torch.relu(self.bn(self.a(x))))
        return out


class TiedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(100, 16)
        self.head = nn.Linear(16, 100, bias=False)
        self.head.weight = self.embed.weight


def train_step(model: nn.Module, opt: torch.optim.Optimizer) -> None:
    opt.zero_grad()
    model(torch.randn(32, 256)).square().mean().backward()
    opt.step()


def make_training(seed: int = 0) -> tuple[Net, torch.optim.Optimizer]:
    """A model and an Adam optimizer one step in (so it has state: step, exp_avg...)."""
    torch.manual_seed(seed)
    model = Net()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    train_step(model, opt)
    return model, opt


def training_state(seed: int = 0) -> dict[str, Any]:
    model, opt = make_training(seed)
    return {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 7,
        "rng": torch.get_rng_state(),
    }


def small_tensors(seed: int, n: int = 64 * 1024) -> dict[str, torch.Tensor]:
    """~n * 12 bytes: contiguous and transposed tensors."""
    g = torch.Generator().manual_seed(seed)
    return {
        "w": torch.randn(n, generator=g),
        "t": torch.randn(n // 64, 64, generator=g, dtype=torch.float64).t(),
        "i": torch.arange(1000 + seed),
    }


@pytest.fixture(scope="module")
def large() -> dict[str, torch.Tensor]:
    """~96 MiB: over the 64 MiB from which save_async writes with O_DIRECT; a durable save of
    it takes long enough to be caught in flight. Tests only read it."""
    return {
        "w": torch.arange((24 << 20) + 4093, dtype=torch.float32),
        "b": torch.arange(999, dtype=torch.int16),
        "t": torch.arange(1200.0).view(30, 40).t(),
    }


def os_error(pending: zerockpt.PendingSave) -> OSError:
    error = pending.exception()
    assert isinstance(error, OSError), repr(error)
    return error


def descriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


def tasks() -> int:
    return len(os.listdir("/proc/self/task"))


def in_flight() -> bool:
    return C.snapshot_stats()[3]


# --- Snapshot semantics: changes right after the call do not reach the file -------------------


def test_module_mutated_right_after_the_call(tmp_path: Path) -> None:
    model, opt = make_training()
    expected = clone_tree(model.state_dict())
    path = tmp_path / "model.safetensors"
    pending = zerockpt.save_async(model, path)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1)
    train_step(model, opt)  # optimizer.step() and BatchNorm's running stats, in place
    live = model.state_dict()
    assert not torch.equal(live["a.weight"], expected["a.weight"])
    assert not torch.equal(live["bn.running_mean"], expected["bn.running_mean"])
    pending.result()
    loaded = zerockpt.load(path, verify=True)
    assert isinstance(loaded, OrderedDict)
    assert_same_tree(loaded, expected)  # _metadata (module versions) included
    assert pending.done() and pending.path == str(path)


def test_training_state_mutated_by_an_optimizer_step(tmp_path: Path) -> None:
    model, opt = make_training()
    state = {
        "model": model.state_dict(),
        "optim": opt.state_dict(),
        "step": 7,
        "rng": torch.get_rng_state(),
    }
    expected = clone_tree(state)
    path = tmp_path / "state.safetensors"
    pending = zerockpt.save_async(state, path)
    train_step(model, opt)  # exp_avg, exp_avg_sq, step and the parameters change in place
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(-3)
    live = opt.state_dict()["state"][0]
    assert not torch.equal(live["exp_avg"], expected["optim"]["state"][0]["exp_avg"])
    assert not torch.equal(live["step"], expected["optim"]["state"][0]["step"])
    pending.result()
    loaded: Any = zerockpt.load(path, verify=True)
    assert_same_tree(loaded, expected)
    # And the state resumes: a fresh model and optimizer load it as torch would.
    model2 = Net()
    opt2 = torch.optim.Adam(model2.parameters(), lr=1e-2)
    model2.load_state_dict(loaded["model"])
    opt2.load_state_dict(loaded["optim"])
    assert_same_tree(clone_tree(opt2.state_dict()), expected["optim"])


def test_every_dtype_and_layout_mutated_right_after_the_call(tmp_path: Path) -> None:
    tensors, bases = flat_sample()
    expected = clone_tree(tensors)
    path = tmp_path / "flat.safetensors"
    pending = zerockpt.save_async(tensors, path)
    for base in bases:
        scramble(base)
    for name, t in tensors.items():
        if t.numel():
            assert raw_bytes(t) != raw_bytes(expected[name]), name
    pending.result()
    loaded = zerockpt.load(path, verify=True)
    assert_dicts_bitwise_equal(loaded, expected)
    # Tied tensors were stored once and come back as one tensor.
    assert loaded["tied.a"] is loaded["tied.b"] is loaded["tied.view"]
    with zerockpt.open(path) as f:
        assert f.info("tied.b").alias_of == "tied.a"
        assert f.info("tied.view").alias_of == "tied.a"
    assert zerockpt.load(path, mmap=False)["conj"].is_conj() is False


def test_tied_module_mutated_right_after_the_call(tmp_path: Path) -> None:
    torch.manual_seed(5)
    model = TiedNet()
    expected = clone_tree(model.state_dict())
    path = tmp_path / "tied.safetensors"
    pending = zerockpt.save_async(model, path)
    with torch.no_grad():
        model.embed.weight.zero_()
    pending.result()
    loaded = zerockpt.load(path)
    assert_same_tree(loaded, expected)
    assert loaded["embed.weight"] is loaded["head.weight"]


def test_empty_state_and_empty_tensors(tmp_path: Path) -> None:
    objs: list[Any] = [
        {},
        {"e": torch.empty(0)},
        {"z": torch.zeros(())},
        [torch.ones(0)],
        {"step": 7, "name": "no tensors", "lr": [0.1, None]},
    ]
    for i, obj in enumerate(objs):
        path = tmp_path / f"e{i}.safetensors"
        zerockpt.save_async(obj, path).result()
        assert_same_tree(zerockpt.load(path, verify=True), obj)


# --- The same bytes as zerockpt.save ----------------------------------------------------------


def odd_sized() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(4)
    return {"x": torch.randn(1000, 37, generator=g), "y": torch.randn(3, generator=g).half()}


IDENTICAL: dict[str, tuple[Callable[[], Any], dict[str, Any]]] = {
    "flat-defaults": (lambda: flat_sample()[0], {}),
    "nested": (training_state, {}),
    "module": (lambda: make_training()[0], {}),
    "tied-module": (TiedNet, {}),
    "metadata": (lambda: small_tensors(1), {"metadata": {"epoch": "3", "format": "pt"}}),
    "direct-odd-size": (odd_sized, {"direct_io": True}),
    "direct-not-durable": (odd_sized, {"direct_io": True, "durable": False}),
    "buffered": (lambda: small_tensors(2), {"direct_io": False}),
    "buffered-not-durable": (lambda: flat_sample()[0], {"direct_io": False, "durable": False}),
    "no-checksums": (lambda: flat_sample()[0], {"checksums": False}),
    "threads-1": (lambda: small_tensors(3), {"threads": 1}),
}
LARGE_IDENTICAL: dict[str, dict[str, Any]] = {
    "large-auto-direct": {},
    "large-not-durable-threads": {"durable": False, "threads": 3},
}


def assert_same_as_save(tmp_path: Path, obj: Any, kw: dict[str, Any]) -> Path:
    expected = clone_tree(obj.state_dict() if isinstance(obj, nn.Module) else obj)
    sync_path, async_path = tmp_path / "sync.safetensors", tmp_path / "async.safetensors"
    zerockpt.save(obj, sync_path, **kw)
    pending = zerockpt.save_async(obj, async_path, **kw)
    pending.result()
    data = async_path.read_bytes()
    assert data == sync_path.read_bytes()  # same header (checksums included), same data
    result = zerockpt.verify(async_path)
    assert result.ok and result.has_checksums == kw.get("checksums", True)
    assert_same_tree(zerockpt.load(async_path), expected)
    # Another reader sees an ordinary safetensors file.
    other = safetensors.torch.load_file(async_path)
    with zerockpt.open(async_path) as f:
        stored = [k for k in f if f.info(k).alias_of is None]
        assert sorted(other) == sorted(stored)
        for name, t in other.items():
            assert_bitwise_equal(t, f.get_tensor(name))
        if "metadata" in kw:
            assert kw["metadata"].items() <= f.metadata().items()
    assert temp_leftovers(tmp_path) == []
    return async_path


@pytest.mark.parametrize("case", list(IDENTICAL))
def test_same_file_as_save(tmp_path: Path, case: str) -> None:
    make, kw = IDENTICAL[case]
    path = assert_same_as_save(tmp_path, make(), kw)
    if case.startswith("direct"):
        assert path.stat().st_size % PAGE != 0  # O_DIRECT pads the last page, then truncates


@pytest.mark.parametrize("case", list(LARGE_IDENTICAL))
def test_same_large_file_as_save(tmp_path: Path, large: dict[str, torch.Tensor], case: str) -> None:
    path = assert_same_as_save(tmp_path, large, LARGE_IDENTICAL[case])
    size = path.stat().st_size
    assert size >= 64 * MiB and size % PAGE != 0


# --- One save at a time, one reused buffer ----------------------------------------------------


def test_second_save_waits_for_the_first(tmp_path: Path, large: dict[str, torch.Tensor]) -> None:
    first = zerockpt.save_async(large, tmp_path / "first.safetensors")
    second = zerockpt.save_async(small_tensors(1), tmp_path / "second.safetensors")
    assert first.done()
    assert first.exception(timeout=0) is None
    assert zerockpt.verify(tmp_path / "first.safetensors").ok
    second.result()
    assert_dicts_bitwise_equal(zerockpt.load(tmp_path / "first.safetensors"), large)
    assert_dicts_bitwise_equal(zerockpt.load(tmp_path / "second.safetensors"), small_tensors(1))
    # Saves to one path land in the order they were started: the last one stays.
    pendings = [
        zerockpt.save_async(small_tensors(i), tmp_path / "same.safetensors") for i in range(3)
    ]
    pendings[-1].result()
    assert all(p.done() for p in pendings)
    assert_dicts_bitwise_equal(zerockpt.load(tmp_path / "same.safetensors"), small_tensors(2))


def test_extension_holds_one_save_in_flight(tmp_path: Path, large: dict[str, torch.Tensor]) -> None:
    # Below the Python layer (which waits for the previous save itself): the extension's second
    # save_async returns only once the first file is complete and in place.
    first, second = tmp_path / "first.safetensors", tmp_path / "second.safetensors"
    h1 = C.save_async(large, str(first), save_options())
    h2 = C.save_async(small_tensors(2), str(second), save_options(durable=False))
    assert zerockpt.verify(first).ok
    assert_dicts_bitwise_equal(zerockpt.load(first), large)
    h2.result()
    h1.result()
    assert h1.done() and h2.done()
    assert_dicts_bitwise_equal(zerockpt.load(second), small_tensors(2))


def test_in_flight_while_writing_and_not_after_result(
    tmp_path: Path, large: dict[str, torch.Tensor]
) -> None:
    seen = 0
    for attempt in range(5):
        pending = zerockpt.save_async(large, tmp_path / f"f{attempt}.safetensors", durable=True)
        seen += in_flight()
        pending.result()
        assert not in_flight()
        assert pending.done()
        if seen:
            break
    assert seen, "a ~96 MiB durable save was never seen in flight right after save_async"


def snapshot_capacity_for(path: Path) -> int:
    """The buffer a save of this file needs: its size rounded to a page, then to the granule."""
    size = path.stat().st_size
    padded = -(-size // PAGE) * PAGE
    return -(-padded // GRANULE) * GRANULE


def test_snapshot_buffer_is_reused_and_released(tmp_path: Path) -> None:
    zerockpt.release_snapshot_buffer()
    capacity, allocations, pinned, busy = C.snapshot_stats()
    assert (capacity, pinned, busy) == (0, False, False)

    small, bigger = small_tensors(1), small_tensors(2, n=1 << 20)  # ~0.8 MiB, ~12 MiB
    path = tmp_path / "s.safetensors"
    zerockpt.save_async(small, path).result()
    cap_small = C.snapshot_stats()[0]
    assert C.snapshot_stats()[1] == allocations + 1
    assert cap_small == snapshot_capacity_for(path)
    for i in range(3):  # the same state again: the same buffer
        zerockpt.save_async(small, tmp_path / f"s{i}.safetensors").result()
        assert C.snapshot_stats() == (cap_small, allocations + 1, False, False)

    big_path = tmp_path / "b.safetensors"
    zerockpt.save_async(bigger, big_path).result()  # a larger state: one new allocation
    cap_big = C.snapshot_stats()[0]
    assert cap_big == snapshot_capacity_for(big_path) > cap_small
    assert C.snapshot_stats()[1] == allocations + 2
    for i, obj in enumerate([bigger, small, bigger, small]):  # smaller or equal: reused
        zerockpt.save_async(obj, tmp_path / f"m{i}.safetensors").result()
        assert C.snapshot_stats() == (cap_big, allocations + 2, False, False)
    assert_dicts_bitwise_equal(zerockpt.load(tmp_path / "m3.safetensors"), small)
    assert_dicts_bitwise_equal(zerockpt.load(tmp_path / "m2.safetensors"), bigger)

    zerockpt.release_snapshot_buffer()
    assert C.snapshot_stats() == (0, allocations + 2, False, False)
    zerockpt.save_async(small, path).result()  # allocates anew
    assert C.snapshot_stats() == (cap_small, allocations + 3, False, False)
    assert_dicts_bitwise_equal(zerockpt.load(path), small)


def test_release_waits_for_the_save_in_flight(
    tmp_path: Path, large: dict[str, torch.Tensor]
) -> None:
    path = tmp_path / "r.safetensors"
    pending = zerockpt.save_async(large, path)
    zerockpt.release_snapshot_buffer()
    assert not in_flight()
    assert C.snapshot_stats()[0] == 0
    pending.result()
    assert_dicts_bitwise_equal(zerockpt.load(path, verify=True), large)


# --- Failures ---------------------------------------------------------------------------------

OLD = {"old": torch.arange(100.0), "v": torch.tensor(1)}

# (op, errno, save options, whether a file is already there, calls of the kind to let pass)
FAULTS = [
    ("write", errno.ENOSPC, {}, False, 0),
    ("write", errno.EIO, {"durable": False}, True, 0),
    ("write", errno.ENOSPC, {"direct_io": True}, True, 0),
    ("write", errno.EIO, {"threads": 4}, True, 3),  # large: O_DIRECT, some chunks written
    ("fsync", errno.EIO, {"durable": True}, True, 0),
    ("fsync", errno.ENOSPC, {"durable": True, "direct_io": True}, False, 0),
    ("rename", errno.EIO, {}, True, 0),
    ("rename", errno.ENOSPC, {"durable": False}, False, 0),
    ("fallocate", errno.ENOSPC, {}, True, 0),
    ("fallocate", errno.EIO, {"durable": False}, False, 0),
]


@pytest.mark.parametrize(
    ("op", "err", "kw", "replace", "after"),
    [
        pytest.param(*case, id=f"{case[0]}-{errno.errorcode[case[1]]}-{i}")
        for i, case in enumerate(FAULTS)
    ],
)
def test_failed_write_surfaces_from_result(
    tmp_path: Path,
    large: dict[str, torch.Tensor],
    op: str,
    err: int,
    kw: dict[str, Any],
    replace: bool,
    after: int,
) -> None:
    path = tmp_path / "ckpt.safetensors"
    tensors = large if after else small_tensors(1)
    before = None
    if replace:
        zerockpt.save(OLD, path)
        before = path.read_bytes()
    fds = descriptors()
    C._inject_fault(op, err, after=after)
    pending = zerockpt.save_async(tensors, path, **kw)  # the write fails later, in the thread
    error = os_error(pending)
    assert error.errno == err, error
    assert error.filename == str(path)
    assert pending.done()
    assert pending.exception() is error
    with pytest.raises(OSError) as info:
        pending.result()
    assert info.value is error
    assert "failed" in repr(pending)
    assert not in_flight()
    if before is None:
        assert not path.exists()
    else:
        assert path.read_bytes() == before
    assert temp_leftovers(tmp_path) == []
    assert descriptors() == fds

    C._clear_faults()
    again = zerockpt.save_async(tensors, path, **kw)
    again.result()
    assert_dicts_bitwise_equal(zerockpt.load(path, verify=True), tensors)
    assert temp_leftovers(tmp_path) == []


def test_directory_fsync_failure_comes_after_the_rename(tmp_path: Path) -> None:
    # The file's fsync passes and it is renamed into place; the directory's fsync then fails:
    # the error still surfaces (the rename may not be durable), naming the destination.
    path = tmp_path / "ckpt.safetensors"
    zerockpt.save(OLD, path)
    tensors = small_tensors(3)
    C._inject_fault("fsync", errno.EIO, after=1)
    error = os_error(zerockpt.save_async(tensors, path, durable=True))
    C._clear_faults()
    assert error.errno == errno.EIO and error.filename == str(path)
    assert "directory" in str(error)
    assert temp_leftovers(tmp_path) == []
    assert zerockpt.verify(path).ok
    assert_dicts_bitwise_equal(zerockpt.load(path), tensors)


def test_missing_directory_is_raised_by_the_call(tmp_path: Path) -> None:
    path = tmp_path / "no" / "such" / "dir.safetensors"
    with pytest.raises(FileNotFoundError) as info:
        zerockpt.save_async(small_tensors(1), path)
    assert info.value.errno == errno.ENOENT
    assert info.value.filename == str(path.parent)  # the directory that is missing
    assert "makedirs=True" in str(info.value)
    assert not in_flight()
    assert os.listdir(tmp_path) == []


def test_a_failure_does_not_block_the_next_save(tmp_path: Path) -> None:
    # The failed save's error belongs to its own handle only.
    C._inject_fault("rename", errno.EIO)
    failed = zerockpt.save_async(small_tensors(1), tmp_path / "a.safetensors")
    deadline = time.monotonic() + 60
    while not failed.done() and time.monotonic() < deadline:  # its outcome not asked for yet
        time.sleep(0.001)
    C._clear_faults()
    ok = zerockpt.save_async(small_tensors(2), tmp_path / "b.safetensors")
    ok.result()
    assert os_error(failed).errno == errno.EIO
    assert not (tmp_path / "a.safetensors").exists()
    assert_dicts_bitwise_equal(zerockpt.load(tmp_path / "b.safetensors"), small_tensors(2))


# --- Bad input raises during the call and frees the slot --------------------------------------


class Opaque:
    pass


def overlapping() -> dict[str, torch.Tensor]:
    base = torch.arange(10.0)
    return {"x": base[:6], "y": base[4:]}


BAD_INPUT: list[tuple[str, Callable[[], Any], dict[str, Any], type[Exception], str]] = [
    ("opaque-leaf", lambda: {"a": {"b": [1, Opaque()]}}, {}, TypeError, r"obj\['a'\]\['b'\]\[1\]"),
    ("complex-leaf", lambda: {"opt": 1j}, {}, TypeError, r"obj\['opt'\] is a builtins.complex"),
    ("float-key", lambda: {1.5: torch.ones(1)}, {}, TypeError, "key 1.5"),
    ("overlap", overlapping, {}, ValueError, "'x' and 'y' are different views"),
    ("meta", lambda: {"m": torch.empty(3, device="meta")}, {}, ValueError, "'m' is on meta"),
    ("reserved-metadata", lambda: {"a": torch.ones(1)}, {"metadata": {"zerockpt.x": "1"}},
     ValueError, "reserved"),
    ("metadata-value", lambda: {"a": torch.ones(1)}, {"metadata": {"k": 1}}, TypeError, "str"),
    ("threads", lambda: {"a": torch.ones(1)}, {"threads": 0}, ValueError, "threads"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("make", "kw", "exc", "words"),
    [pytest.param(*case[1:], id=case[0]) for case in BAD_INPUT],
)
def test_bad_input_raises_during_the_call(
    tmp_path: Path, make: Callable[[], Any], kw: dict[str, Any], exc: type[Exception], words: str
) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(exc, match=words):
        zerockpt.save_async(make(), path, **kw)
    assert not in_flight()
    assert os.listdir(tmp_path) == []
    # The slot is free: the next save runs.
    zerockpt.save_async(OLD, path).result()
    assert_dicts_bitwise_equal(zerockpt.load(path), OLD)


def test_bad_input_while_a_save_is_in_flight(
    tmp_path: Path, large: dict[str, torch.Tensor]
) -> None:
    first = zerockpt.save_async(large, tmp_path / "first.safetensors")
    with pytest.raises(ValueError, match="different views"):
        zerockpt.save_async(overlapping(), tmp_path / "bad.safetensors")
    first.result()
    assert not in_flight()
    assert not (tmp_path / "bad.safetensors").exists()
    zerockpt.save_async(OLD, tmp_path / "next.safetensors").result()
    assert_dicts_bitwise_equal(zerockpt.load(tmp_path / "first.safetensors"), large)


# --- result(timeout=...) ----------------------------------------------------------------------


def test_result_timeout(tmp_path: Path, large: dict[str, torch.Tensor]) -> None:
    timeouts = 0
    for attempt in range(5):
        path = tmp_path / f"t{attempt}.safetensors"
        pending = zerockpt.save_async(large, path, durable=True)
        try:
            pending.result(timeout=0)
        except TimeoutError as e:
            timeouts += 1
            assert str(path) in str(e)
        try:
            pending.exception(timeout=0.0001)
        except TimeoutError:
            timeouts += 1
        pending.result(timeout=None)
        assert pending.done()
        assert pending.result(timeout=0) is None  # type: ignore[func-returns-value]
        assert pending.exception(timeout=0) is None
        assert "done" in repr(pending)
        assert zerockpt.verify(path).ok
        if timeouts:
            break
    assert timeouts, "a ~96 MiB durable save was never still running at result(timeout=0)"


def test_result_timeout_then_failure(tmp_path: Path, large: dict[str, torch.Tensor]) -> None:
    # A save that times out once still reports its failure afterwards.
    path = tmp_path / "f.safetensors"
    C._inject_fault("fsync", errno.EIO)
    pending = zerockpt.save_async(large, path, durable=True)
    with contextlib.suppress(TimeoutError, OSError):
        pending.result(timeout=0)
    with pytest.raises(OSError) as info:
        pending.result(timeout=None)
    assert info.value.errno == errno.EIO and info.value.filename == str(path)
    assert not path.exists()


# --- Interpreter exit -------------------------------------------------------------------------

EXIT_ELEMENTS = 25 << 20  # int32: 100 MiB
FORK_WAIT = 20.0  # seconds a forked child gets to exit before it counts as hung (~1 s under load)
FORKED_PARENT = "forked-parent.safetensors"

# Each mode starts a ~100 MiB durable save, changes the tensor, then exits while the save is
# (most likely) still being written: by falling off the end, sys.exit(3) or an uncaught
# exception. "fault" first forks a child that exits in the ordinary way while a save of its
# parent is in flight, then starts a save whose writes fail, and never asks for its result.
EXIT_SCRIPT = textwrap.dedent(
    f"""
    import errno, os, sys, time
    import torch, zerockpt

    mode, path = sys.argv[1], sys.argv[2]
    x = torch.arange({EXIT_ELEMENTS}, dtype=torch.int32)
    state = {{"x": x, "t": torch.arange(12.0).view(3, 4).t(), "step": 7}}

    if mode == "fault":
        pending = zerockpt.save_async(state, os.path.join(os.path.dirname(path), {FORKED_PARENT!r}))
        pid = os.fork()
        if pid == 0:
            print("child sees", "running" if not pending.done() else "done", flush=True)
            sys.exit(0)  # an ordinary exit: atexit handlers run
        deadline = time.monotonic() + {FORK_WAIT}
        code = None
        while time.monotonic() < deadline:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            time.sleep(0.02)
        else:
            os.kill(pid, 9)
            os.waitpid(pid, 0)
        print("child exit code", code, flush=True)
        pending.result()
        zerockpt._C._inject_fault("write", errno.ENOSPC, 3)  # a few chunks, then ENOSPC

    pending = zerockpt.save_async(state, path)
    x.add_(1)  # the file must hold the values at the call
    print("save", "running" if not pending.done() else "done", "at exit", flush=True)
    if mode == "exit":
        sys.exit(3)
    if mode == "raise":
        raise RuntimeError("boom after save_async")
    """
)
EXIT_MODES = ["end", "exit", "raise", "fault"]


@dataclass(repr=False)
class Run:
    path: Path
    returncode: int
    stdout: str
    stderr: str

    def __repr__(self) -> str:  # shown whole in assertion messages
        return f"rc={self.returncode}\nstdout:\n{self.stdout}\nstderr:\n{self.stderr}"


@pytest.fixture(scope="module")
def exit_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Run]:
    """Every exit scenario, each in its own interpreter (in its own directory), all at once."""
    started = {}
    for mode in EXIT_MODES:
        path = tmp_path_factory.mktemp(f"exit-{mode}") / "ckpt.safetensors"
        started[mode] = (
            path,
            subprocess.Popen(
                [sys.executable, "-c", EXIT_SCRIPT, mode, str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            ),
        )
    runs = {}
    for mode, (path, proc) in started.items():
        try:
            out, err = proc.communicate(timeout=120)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, err = proc.communicate()
            err += "\n(killed after 120 s)"
        runs[mode] = Run(path, proc.returncode, out, err)
    return runs


def assert_complete(path: Path, run: Run) -> None:
    assert path.exists(), run
    result = zerockpt.verify(path)
    assert result.has_checksums and result.ok, run
    loaded = zerockpt.load(path)
    assert torch.equal(loaded["x"], torch.arange(EXIT_ELEMENTS, dtype=torch.int32)), run
    assert torch.equal(loaded["t"], torch.arange(12.0).view(3, 4).t())
    assert loaded["step"] == 7
    assert temp_leftovers(path.parent) == []


@pytest.mark.parametrize(
    ("mode", "returncode"), [("end", 0), ("exit", 3), ("raise", 1)], ids=["end", "exit", "raise"]
)
def test_exit_finishes_the_save_in_flight(
    exit_runs: dict[str, Run], mode: str, returncode: int
) -> None:
    run = exit_runs[mode]
    assert run.returncode == returncode, run
    assert_complete(run.path, run)
    assert os.listdir(run.path.parent) == [run.path.name]
    assert "zerockpt" not in run.stderr, run
    if mode == "raise":
        assert "RuntimeError: boom after save_async" in run.stderr, run


def test_exit_reports_a_failure_never_asked_for(exit_runs: dict[str, Run]) -> None:
    run = exit_runs["fault"]
    assert run.returncode == 0, run
    assert f"background save to {run.path} failed" in run.stderr, run
    assert os.strerror(errno.ENOSPC) in run.stderr, run
    assert not run.path.exists()
    assert temp_leftovers(run.path.parent) == []


def test_forked_child_exits_while_the_parents_save_is_in_flight(
    exit_runs: dict[str, Run],
) -> None:
    run = exit_runs["fault"]
    if "child sees done" in run.stdout:
        pytest.skip("the parent's save finished before the fork")
    assert "child sees running" in run.stdout, run
    assert "child exit code 0" in run.stdout, run
    assert_complete(run.path.parent / FORKED_PARENT, run)


# --- Threads ----------------------------------------------------------------------------------


def test_threads_save_at_once(tmp_path: Path) -> None:
    count, rounds = 4, 3
    barrier = threading.Barrier(count)
    expected: dict[str, dict[str, torch.Tensor]] = {}
    errors: list[BaseException] = []

    def job(i: int) -> None:
        try:
            barrier.wait()
            for r in range(rounds):
                tensors = small_tensors(10 * i + r, n=(32 + 16 * i) * 1024)
                name = f"t{i}-{r}.safetensors"
                expected[name] = clone_tree(tensors)
                pending = zerockpt.save_async(tensors, tmp_path / name, durable=r % 2 == 0)
                for t in tensors.values():
                    t.zero_()  # this thread's next step, right after the snapshot
                pending.result()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=job, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert sorted(os.listdir(tmp_path)) == sorted(expected)
    for name, tensors in expected.items():
        assert_dicts_bitwise_equal(zerockpt.load(tmp_path / name, verify=True), tensors)


def test_other_threads_run_while_a_save_is_awaited(
    tmp_path: Path, large: dict[str, torch.Tensor]
) -> None:
    # While this thread waits in result(), another Python thread keeps running: it counts its
    # loops that see this thread inside result() and the save not yet done. That is possible
    # only if the wait releases the GIL.
    ticks = 0
    for attempt in range(5):
        pending = zerockpt.save_async(large, tmp_path / f"g{attempt}.safetensors", durable=True)
        waiting, stop = threading.Event(), threading.Event()

        def spin(
            pending: zerockpt.PendingSave = pending,
            waiting: threading.Event = waiting,
            stop: threading.Event = stop,
        ) -> None:
            nonlocal ticks
            while not stop.is_set():
                if waiting.is_set() and not pending.done():
                    ticks += 1

        spinner = threading.Thread(target=spin)
        spinner.start()
        waiting.set()
        try:
            pending.result()
        finally:
            stop.set()
            spinner.join()
        if ticks:
            break
    assert ticks > 0


# --- Fork -------------------------------------------------------------------------------------


def _child_saves(conn: Connection, parent: zerockpt.PendingSave, path: str, layer: str) -> None:
    """In a forked child: reports what it inherited, then saves through `layer`."""
    try:
        conn.send(("forked", parent.done(), in_flight()))
        tensors = {"c": torch.arange(5.0), "t": torch.ones(2, 3).t()}
        if layer == "extension":
            C.save_async(tensors, path, save_options(durable=False, threads=1)).result()
        else:
            zerockpt.save_async(tensors, path, durable=False).result()
        conn.send(("saved", C.snapshot_stats()))
    except BaseException as e:
        conn.send(("error", repr(e)))


def fork_while_saving(
    tmp_path: Path, large: dict[str, torch.Tensor], layer: str, wait: float
) -> tuple[Any, Path]:
    """Forks a child that saves while this process's save is in flight; returns what the child
    reported (None if it did not finish within `wait` seconds) and the child's file."""
    ctx = multiprocessing.get_context("fork")
    for attempt in range(3):
        parent_path = tmp_path / f"parent{attempt}.safetensors"
        child_path = tmp_path / f"child{attempt}.safetensors"
        pending = zerockpt.save_async(large, parent_path)
        recv, send = ctx.Pipe(duplex=False)
        child = ctx.Process(target=_child_saves, args=(send, pending, str(child_path), layer))
        child.start()
        send.close()
        try:
            assert recv.poll(60), "the child did not start"
            _, parent_done, child_in_flight = recv.recv()
            outcome = recv.recv() if recv.poll(wait) else None
        finally:
            if child.is_alive():
                child.kill()  # hung
            child.join()
            recv.close()
        pending.result()
        assert_dicts_bitwise_equal(zerockpt.load(parent_path, verify=True), large)
        if parent_done:
            continue  # the parent's save ended before the fork: try again
        assert child_in_flight is False  # the child does not own the parent's slot
        return outcome, child_path
    pytest.skip("the parent's save finished before every fork")


def test_forked_child_saves_through_the_extension(
    tmp_path: Path, large: dict[str, torch.Tensor]
) -> None:
    outcome, child_path = fork_while_saving(tmp_path, large, "extension", wait=60)
    assert outcome is not None and outcome[0] == "saved", outcome
    assert outcome[1][3] is False
    loaded = zerockpt.load(child_path, verify=True)
    assert_dicts_bitwise_equal(loaded, {"c": torch.arange(5.0), "t": torch.ones(2, 3).t()})


def test_forked_child_saves_while_the_parents_save_is_in_flight(
    tmp_path: Path, large: dict[str, torch.Tensor]
) -> None:
    outcome, child_path = fork_while_saving(tmp_path, large, "package", wait=FORK_WAIT)
    assert outcome is not None, f"the child's save_async did not return in {FORK_WAIT} s"
    assert outcome[0] == "saved", outcome
    loaded = zerockpt.load(child_path, verify=True)
    assert_dicts_bitwise_equal(loaded, {"c": torch.arange(5.0), "t": torch.ones(2, 3).t()})


# --- Resources --------------------------------------------------------------------------------


def test_threads_and_descriptors_return_to_baseline(
    tmp_path: Path, large: dict[str, torch.Tensor]
) -> None:
    tensors = small_tensors(4)
    zerockpt.save_async(tensors, tmp_path / "warm.safetensors").result()
    base_tasks = settled(tasks)
    base_fds, base_threads = descriptors(), threading.active_count()
    kinds: list[dict[str, Any]] = [{}, {"direct_io": True}, {"durable": False}, {"threads": 4}]
    for i, kw in enumerate(kinds):
        zerockpt.save_async(tensors, tmp_path / f"r{i}.safetensors", **kw).result()
    zerockpt.save_async(large, tmp_path / "large.safetensors").result()
    C._inject_fault("write", errno.EIO, after=2)
    assert os_error(zerockpt.save_async(large, tmp_path / "failed.safetensors")).errno == errno.EIO
    C._clear_faults()
    assert settled(tasks, base_tasks) == base_tasks
    assert settled(descriptors, base_fds) == base_fds
    assert settled(threading.active_count, base_threads) == base_threads
    names = os.listdir(tmp_path)
    assert not [n for n in names if TEMP_NAME_RE.match(n)]
    assert "failed.safetensors" not in names
