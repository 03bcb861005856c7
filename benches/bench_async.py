"""How long a checkpoint of ~1 GB of training state blocks the training loop.

The state is GPT-2 small (tied embeddings, ~500 MB) plus SGD momentum buffers of the same size
plus a step counter, as a training job checkpoints it. Every method saves the same state in
the same run:

- ``memcpy into preallocated memory``: the floor for any snapshot: one ``memcpy`` of every
  tensor's bytes into a buffer that is already allocated and faulted in.
- ``zerockpt.save_async``: the time until it returns (the write continues in the background).
- ``dcp.async_save no_dist``: torch.distributed.checkpoint's asynchronous save, until it returns.
- ``torch.save`` and ``zerockpt.save``: synchronous, so all of their time blocks.

Each round waits for the previous background write and flushes dirty pages (untimed) first,
so no round pays for another's I/O. The ratios are printed at the end of the session.
"""

from __future__ import annotations

import ctypes
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
import zerockpt
from conftest import GPT2_SCALE, report_ratio
from models import gpt2_small_state_dict
from pytest_benchmark.fixture import BenchmarkFixture
from zerockpt.benchtools import total_nbytes, unique_tensors

ROUNDS = 5

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

# method -> min seconds, for the ratios
_BLOCKING: dict[str, float] = {}


@pytest.fixture(scope="module")
def train_state() -> dict[str, Any]:
    """GPT-2 small, one momentum buffer per parameter, a step counter: ~1 GB in all."""
    model = gpt2_small_state_dict(GPT2_SCALE)
    params = list(unique_tensors(model).values())
    optim = {
        "state": {i: {"momentum_buffer": torch.randn_like(p)} for i, p in enumerate(params)},
        "param_groups": [{"lr": 0.01, "momentum": 0.9, "params": list(range(len(params)))}],
    }
    return {"model": model, "optim": optim, "step": 1000}


def _state_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    return list(unique_tensors(state["model"]).values()) + [
        s["momentum_buffer"] for s in state["optim"]["state"].values()
    ]


def _state_nbytes(state: dict[str, Any]) -> int:
    return total_nbytes(state["model"]) + sum(
        s["momentum_buffer"].nbytes for s in state["optim"]["state"].values()
    )


@pytest.fixture(scope="module")
def out_dir(module_bench_dir: Path) -> Iterator[Path]:
    yield module_bench_dir
    zerockpt.release_snapshot_buffer()  # give its ~1 GB back to later benchmarks


def _memcpy_into(buffer: torch.Tensor, tensors: list[torch.Tensor]) -> Callable[[], None]:
    pieces: list[tuple[int, int, int]] = []
    offset = 0
    for t in tensors:
        pieces.append((buffer.data_ptr() + offset, t.data_ptr(), t.nbytes))
        offset += t.nbytes

    def run() -> None:
        for dst, src, n in pieces:
            ctypes.memmove(dst, src, n)

    return run


def _record(benchmark: BenchmarkFixture, name: str, nbytes: int) -> None:
    benchmark.extra_info["bytes"] = nbytes
    stats = getattr(benchmark, "stats", None)
    if stats is not None and stats.stats.min > 0:
        _BLOCKING[name] = stats.stats.min
        benchmark.extra_info["GB/s"] = round(nbytes / stats.stats.min / 1e9, 3)


def test_memcpy_into_preallocated(benchmark: BenchmarkFixture, train_state: dict[str, Any]) -> None:
    tensors = _state_tensors(train_state)
    nbytes = sum(t.nbytes for t in tensors)
    buffer = torch.ones(nbytes, dtype=torch.uint8)  # allocated and faulted in
    benchmark.group = "checkpoint blocking time, ~1 GB training state"
    benchmark.pedantic(_memcpy_into(buffer, tensors), rounds=ROUNDS, warmup_rounds=1)
    _record(benchmark, "memcpy", nbytes)
    assert torch.equal(buffer[: tensors[0].nbytes], tensors[0].view(-1).view(torch.uint8))


def test_zerockpt_save_async(
    benchmark: BenchmarkFixture, train_state: dict[str, Any], out_dir: Path
) -> None:
    path = out_dir / "async.safetensors"
    pending: list[zerockpt.PendingSave] = []

    def setup() -> None:
        if pending:
            pending.pop().result()
        os.sync()

    benchmark.group = "checkpoint blocking time, ~1 GB training state"
    benchmark.pedantic(
        lambda: pending.append(zerockpt.save_async(train_state, path)),
        setup=setup,
        rounds=ROUNDS,
        warmup_rounds=1,  # the first save allocates the snapshot buffer; later ones reuse it
    )
    pending.pop().result()
    _record(benchmark, "zerockpt.save_async", _state_nbytes(train_state))
    loaded = zerockpt.load(path, verify=True)
    assert loaded["step"] == 1000
    name = "transformer.h.0.mlp.c_fc.weight"
    assert torch.equal(loaded["model"][name], train_state["model"][name])


def test_dcp_async_save(
    benchmark: BenchmarkFixture, train_state: dict[str, Any], out_dir: Path
) -> None:
    path = out_dir / "dcp"
    pending: list[Any] = []

    def setup() -> None:
        if pending:
            pending.pop().result()
        shutil.rmtree(path, ignore_errors=True)
        os.sync()

    def run() -> None:
        pending.append(dcp.async_save(train_state, checkpoint_id=path, no_dist=True))

    benchmark.group = "checkpoint blocking time, ~1 GB training state"
    benchmark.pedantic(run, setup=setup, rounds=ROUNDS, warmup_rounds=1)
    pending.pop().result()
    _record(benchmark, "dcp.async_save", _state_nbytes(train_state))
    assert (path / ".metadata").exists()


SYNC_METHODS: dict[str, Callable[[dict[str, Any], Path], None]] = {
    "torch.save": lambda state, p: torch.save(state, p),
    "zerockpt.save": lambda state, p: zerockpt.save(state, p),
}


@pytest.mark.parametrize("method", list(SYNC_METHODS))
def test_synchronous_save(
    benchmark: BenchmarkFixture, train_state: dict[str, Any], out_dir: Path, method: str
) -> None:
    path = out_dir / "sync.bin"

    def setup() -> None:
        path.unlink(missing_ok=True)
        os.sync()

    benchmark.group = "checkpoint blocking time, ~1 GB training state"
    benchmark.pedantic(
        SYNC_METHODS[method], args=(train_state, path), setup=setup, rounds=3, warmup_rounds=1
    )
    _record(benchmark, method, _state_nbytes(train_state))
    assert path.stat().st_size >= _state_nbytes(train_state)


def test_report_ratios() -> None:
    """Prints the same-run ratios (not a timing)."""
    if "zerockpt.save_async" not in _BLOCKING or "memcpy" not in _BLOCKING:
        pytest.skip("timings disabled (--benchmark-disable) or not run")
    ours = _BLOCKING["zerockpt.save_async"]
    report_ratio(
        "save_async blocking / one memcpy into preallocated memory",
        ours / _BLOCKING["memcpy"],
        "target <= 1.2",
    )
    for other in ("torch.save", "dcp.async_save", "zerockpt.save"):
        if other in _BLOCKING:
            report_ratio(
                f"{other} blocking / save_async blocking",
                _BLOCKING[other] / ours,
                "target >= 5" if other == "torch.save" else "",
            )
