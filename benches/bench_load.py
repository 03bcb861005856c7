"""Load benchmarks: zerockpt against torch.load and safetensors, all from a warm page cache.

Each format's file is written once per input and read through once before any timing, so that
every method loads from the page cache rather than the disk.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import safetensors.torch
import torch
import zerockpt
from pytest_benchmark.fixture import BenchmarkFixture
from zerockpt.benchtools import bits, read_every_byte, read_through, total_nbytes, unique_tensors

LoadFn = Callable[[Path], dict[str, torch.Tensor]]

LOAD_ROUNDS = 5

WRITERS: dict[str, Callable[[dict[str, torch.Tensor], Path], None]] = {
    "torch": lambda sd, p: torch.save(sd, p),
    "safetensors": lambda sd, p: safetensors.torch.save_file(unique_tensors(sd), p),
    "zerockpt": lambda sd, p: zerockpt.save(sd, p),
}

# name -> (format of the file it reads, loader)
LOAD_METHODS: dict[str, tuple[str, LoadFn]] = {
    "torch.load": ("torch", lambda p: torch.load(p)),
    "torch.load mmap=True": ("torch", lambda p: torch.load(p, mmap=True)),
    "safetensors.load_file": ("safetensors", lambda p: safetensors.torch.load_file(p)),
    "zerockpt.load mmap=True": ("zerockpt", lambda p: zerockpt.load(p)),
    "zerockpt.load mmap=False": ("zerockpt", lambda p: zerockpt.load(p, mmap=False)),
}


@pytest.fixture(scope="module")
def files(
    datasets: dict[str, dict[str, torch.Tensor]], module_bench_dir: Path
) -> dict[tuple[str, str], Path]:
    """(input, format) -> a file written once by that format's writer, then read once."""
    out: dict[tuple[str, str], Path] = {}
    for dataset, sd in datasets.items():
        for fmt, write in WRITERS.items():
            path = module_bench_dir / f"{dataset}.{fmt}"
            write(sd, path)
            out[dataset, fmt] = path
    os.sync()  # no writeback of these files during the timings
    for path in out.values():
        read_through(path)
    return out


def _check_loaded(loaded: dict[str, torch.Tensor], sd: dict[str, torch.Tensor]) -> None:
    """Every name of ``loaded`` is in ``sd`` with the same bytes; only tied names may be missing."""
    assert set(unique_tensors(sd)) <= set(loaded) <= set(sd)
    for name, t in loaded.items():
        assert t.dtype == sd[name].dtype and t.shape == sd[name].shape, name
        assert torch.equal(bits(t), bits(sd[name])), name


@pytest.mark.parametrize("method", list(LOAD_METHODS))
@pytest.mark.parametrize("dataset", ["gpt2", "small"])
def test_load(
    benchmark: BenchmarkFixture,
    datasets: dict[str, dict[str, torch.Tensor]],
    files: dict[tuple[str, str], Path],
    dataset: str,
    method: str,
) -> None:
    """One loader returning the whole dict (mmap loaders return before reading the bytes)."""
    fmt, load = LOAD_METHODS[method]
    benchmark.group = f"load {dataset}"
    benchmark.extra_info["bytes"] = total_nbytes(datasets[dataset])
    loaded = benchmark.pedantic(
        load, args=(files[dataset, fmt],), rounds=LOAD_ROUNDS, warmup_rounds=1, iterations=1
    )
    _check_loaded(loaded, datasets[dataset])


# --- in memory: a file's bytes in, no file ----------------------------------------------------

LOAD_BYTES_METHODS: dict[str, Callable[[bytes], dict[str, torch.Tensor]]] = {
    "safetensors.torch.load": lambda data: safetensors.torch.load(data),
    "zerockpt.load_bytes": lambda data: zerockpt.load_bytes(data),
}


@pytest.fixture(scope="module")
def file_bytes(
    datasets: dict[str, dict[str, torch.Tensor]],
) -> dict[str, bytes]:
    """input -> the bytes of its file, written by safetensors (which both methods read)."""
    return {name: safetensors.torch.save(unique_tensors(sd)) for name, sd in datasets.items()}


@pytest.mark.parametrize("method", list(LOAD_BYTES_METHODS))
@pytest.mark.parametrize("dataset", ["gpt2", "small"])
def test_load_bytes(
    benchmark: BenchmarkFixture,
    datasets: dict[str, dict[str, torch.Tensor]],
    file_bytes: dict[str, bytes],
    dataset: str,
    method: str,
) -> None:
    """One loader turning the bytes of one file into independent tensors."""
    benchmark.group = f"load bytes {dataset}"
    benchmark.extra_info["bytes"] = total_nbytes(datasets[dataset])
    loaded = benchmark.pedantic(
        LOAD_BYTES_METHODS[method],
        args=(file_bytes[dataset],),
        rounds=LOAD_ROUNDS,
        warmup_rounds=1,
        iterations=1,
    )
    _check_loaded(loaded, datasets[dataset])


# --- load + touch every byte ------------------------------------------------------------------


def _touch_loaded(load: LoadFn) -> Callable[[Path], int]:
    def run(path: Path) -> int:
        return read_every_byte(load(path))  # tied tensors once, for every method

    return run


def _raw_mmap_touch(path: Path) -> int:
    """Reference: map the file privately and touch its data section as one uint8 tensor."""
    with path.open("rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        mm = mmap.mmap(f.fileno(), 0, flags=mmap.MAP_PRIVATE)
    data = torch.frombuffer(mm, dtype=torch.uint8)[8 + header_len :]
    return read_every_byte({"data": data})


TOUCH_METHODS: dict[str, tuple[str, Callable[[Path], int]]] = {
    "zerockpt.load mmap=True + touch": ("zerockpt", _touch_loaded(zerockpt.load)),
    "zerockpt.load mmap=False + touch": (
        "zerockpt",
        _touch_loaded(lambda p: zerockpt.load(p, mmap=False)),
    ),
    # verify=True reads and checksums every byte before returning, then the touch reads them.
    "zerockpt.load verify=True + touch": (
        "zerockpt",
        _touch_loaded(lambda p: zerockpt.load(p, verify=True)),
    ),
    "zerockpt.load mmap=False verify=True + touch": (
        "zerockpt",
        _touch_loaded(lambda p: zerockpt.load(p, mmap=False, verify=True)),
    ),
    "torch.load mmap=True + touch": ("torch", _touch_loaded(lambda p: torch.load(p, mmap=True))),
    "safetensors.load_file + touch": ("safetensors", _touch_loaded(safetensors.torch.load_file)),
    "raw mmap read + touch": ("zerockpt", _raw_mmap_touch),
}


@pytest.mark.parametrize("method", list(TOUCH_METHODS))
def test_load_touch_gpt2(
    benchmark: BenchmarkFixture,
    gpt2_sd: dict[str, torch.Tensor],
    files: dict[tuple[str, str], Path],
    method: str,
) -> None:
    """Load the GPT-2 file (mapped afresh each round) and read every tensor byte."""
    fmt, run = TOUCH_METHODS[method]
    benchmark.group = "load+touch gpt2"
    benchmark.extra_info["bytes"] = total_nbytes(gpt2_sd)
    checksum = benchmark.pedantic(
        run, args=(files["gpt2", fmt],), rounds=LOAD_ROUNDS, warmup_rounds=1, iterations=1
    )
    assert checksum == read_every_byte(gpt2_sd)
